"""The log shipper process: ``python -m workers.logship_main``, started by a worker
(workers/logship_proxy.py documents the wire format). It runs the worker's
``LogShipper`` on its own event loop, with its own Docker client for the log streams,
so shipping costs the worker's event loop one pipe write per event.

stdin: the configuration line, then messages; stdout: answers only (anything else
written to file descriptor 1 goes to stderr, so a stray print cannot corrupt them);
stderr: structlog lines. The process ends after ``close`` or EOF on stdin (the worker
gone), once the shipper flushed (bounded by drain_timeout_s). It ignores SIGINT and
SIGTERM: the worker decides when it ends, after the containers' output drained.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

import structlog

from shared.logs import configure_logging
from shared.settings import KafkaSettings, LogSettings
from workers.logship import LogShipper, LogSource
from workers.logship_proxy import LINE_LIMIT
from workers.runtime import DockerRuntime

log = structlog.get_logger("imagefn.logship")

_dumps = json.JSONEncoder(separators=(",", ":")).encode


@dataclass(frozen=True)
class ChildConfig:
    logs: LogSettings
    kafka: KafkaSettings
    worker_id: str
    docker_url: str | None
    rotate_bytes: int
    log_level: str
    uvloop: bool

    @classmethod
    def decode(cls, line: bytes) -> ChildConfig:
        raw = json.loads(line)
        return cls(
            logs=LogSettings(**raw["logs"]),
            kafka=KafkaSettings(**raw["kafka"]),
            worker_id=raw["worker_id"],
            docker_url=raw["docker_url"],
            rotate_bytes=int(raw["rotate_bytes"]),
            log_level=raw["log_level"],
            uvloop=bool(raw["uvloop"]),
        )


def handle(shipper: LogShipper, msg: list[Any], answer: Callable[[int, str], None]) -> bool:
    """Apply one message; False for ``close``."""
    op = msg[0]
    if op == "s":
        shipper.request_started(msg[1], msg[2], cold=msg[3], init_ms=msg[4], at_ns=msg[5])
    elif op == "e":
        shipper.request_ended(msg[1], msg[2], status=msg[3], error=msg[4], at_ns=msg[5])
    elif op == "f":
        src = LogSource(
            function=msg[2],
            version=msg[3],
            instance=msg[4],
            concurrency=msg[5],
            memory_limit_mb=msg[6],
        )
        shipper.follow(msg[1], src, since_ns=msg[7], seq_from=msg[8])
    elif op == "d":
        answer(msg[1], msg[2])
    elif op == "c":
        return False
    else:
        log.error("log_shipper_unknown_message", op=str(op)[:32])
    return True


async def serve(cfg: ChildConfig, stdin: BinaryIO, stdout: BinaryIO) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=LINE_LIMIT)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), stdin)
    out, _ = await loop.connect_write_pipe(asyncio.Protocol, stdout)
    runtime = DockerRuntime.connect(cfg.docker_url)
    shipper = LogShipper.for_kafka(
        cfg.logs, cfg.kafka, runtime, worker=cfg.worker_id, rotate_bytes=cfg.rotate_bytes
    )
    shipper.start()
    drains: set[asyncio.Task[None]] = set()

    async def drained(rid: int, cid: str) -> None:
        ok = False
        try:
            ok = await shipper.drained(cid)
        finally:
            if not out.is_closing():
                out.write((_dumps(["d", rid, ok]) + "\n").encode())

    def answer(rid: int, cid: str) -> None:
        # Each drain waits on its own (bounded by drain_timeout_s inside the shipper).
        task = asyncio.create_task(drained(rid, cid), name=f"logship-drained-{cid[:12]}")
        drains.add(task)
        task.add_done_callback(drains.discard)

    try:
        while True:
            try:
                line = await reader.readline()
            except (ValueError, asyncio.LimitOverrunError) as e:
                log.error("log_shipper_bad_message", error=str(e))
                continue
            if not line:
                log.info("log_shipper_stdin_closed")
                break
            try:
                msg = json.loads(line)
                if not handle(shipper, msg, answer):
                    break
            except (ValueError, IndexError, TypeError, KeyError) as e:
                log.error(
                    "log_shipper_bad_message",
                    error=repr(e),
                    line=line[:200].decode("utf-8", "replace"),
                )
    finally:
        if drains:
            # Bounded: each is bounded by drain_timeout_s plus a second.
            await asyncio.wait(drains, timeout=cfg.logs.drain_timeout_s + 2.0)
        for t in drains:
            t.cancel()
        await shipper.close()
        await runtime.close()
        out.close()


def _loop_factory(use_uvloop: bool) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if not use_uvloop:
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _read_line(fd: int) -> bytes:
    line = bytearray()
    while not line.endswith(b"\n"):
        b = os.read(fd, 1)
        if not b:
            break
        line += b
    return bytes(line)


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Answers get a private copy of fd 1; fd 1 itself becomes stderr.
    answers = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    # Before any loop runs, so a blocking read is fine here; byte by byte, so that no
    # message after it is read ahead and hidden from the event loop's pipe reader.
    first = _read_line(0)
    if not first:
        return 0
    cfg = ChildConfig.decode(first)
    configure_logging(cfg.log_level)
    structlog.contextvars.bind_contextvars(component="logship", worker=cfg.worker_id)
    with asyncio.Runner(loop_factory=_loop_factory(cfg.uvloop)) as runner:
        runner.run(serve(cfg, sys.stdin.buffer, answers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
