"""The worker's side of the log shipper process.

The shipper (workers/logship.py) costs CPU per line and per invocation; on the worker's
event loop that CPU delayed every invocation the loop forwarded (p99 x1.3-1.9 with
shipping on, bench/logship.py ``--only cost``). So it runs in a child process
(workers/logship_main.py) with its own event loop, and the pool talks to it through
``ShipperProcess``, which implements ``InstanceLogs``:

* ``follow``, ``request_started`` and ``request_ended`` write one line to the child's
  stdin through the pipe transport's buffer and return: no await, no answer.
* ``drained`` sends a request with an id and waits for the child's answer.

Wire format: newline-delimited JSON arrays, first element the operation. The first line
to the child is its configuration (``child_config``): the worker's own settings, so the
child reads nothing from the environment for them. Worker to child:

* ``["f", container, function, version, instance, concurrency, memory_limit_mb,
  since_ns, seq_from]`` follow a container
* ``["s", container, request, cold, init_ms, at_ns]`` request started (worker's clock)
* ``["e", container, request, status, error, at_ns]`` request ended
* ``["d", id, container]`` drained?  -- answered by ``["d", id, true|false]``
* ``["c"]`` close: flush within drain_timeout_s and exit (EOF on stdin does the same)

If the child dies, it is restarted (bounded backoff) and told again to follow every
container not yet drained, with ``since_ns`` = when the death was noticed and a fresh
``seq_from`` (so its seqs do not repeat the old child's, which readers would drop as
duplicates). Lost: what the old child had read but not yet produced to Kafka, output the
engine stamped before the death but the old child had not read, and the START/END of
requests that ended while no child ran (requests still open are started again with their
original times). Drain requests in flight are sent again to the new child.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import structlog

from shared.backoff import Backoff
from shared.settings import Settings
from workers.logship import LogSource, MiB

log = structlog.get_logger("imagefn.logship")

# A drain answer may take the child's drain_timeout_s plus its own second to cancel the
# follower; beyond that plus transit, the child is taken to be stuck.
DRAIN_MARGIN_S = 3.0
# At shutdown the child flushes for up to drain_timeout_s, then stops its producer.
CLOSE_MARGIN_S = 5.0
RESTART_MIN_S = 0.2
RESTART_MAX_S = 5.0
# A child that ran this long before dying restarts after the shortest backoff again.
HEALTHY_RUN_S = 30.0
# Messages waiting in the pipe beyond this are dropped (a stuck child must not grow the
# worker's memory without bound); they are counted and logged.
MAX_PENDING_BYTES = 64 * MiB
# Lines from the child are short answers; this bounds a corrupted one.
LINE_LIMIT = 1 * MiB
WARN_EVERY_S = 5.0

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def child_config(settings: Settings) -> bytes:
    """The child's first stdin line: the settings it needs, exactly as the worker has
    them (the worker id included, which may have been generated at start)."""
    cfg = {
        "logs": asdict(settings.logs),
        "kafka": asdict(settings.kafka),
        "worker_id": settings.worker.worker_id,
        "docker_url": settings.worker.docker_url,
        "rotate_bytes": settings.worker.container_log_max_mb * MiB,
        "log_level": settings.log_level,
        "uvloop": settings.uvloop,
    }
    return (_dumps(cfg) + "\n").encode()


def child_command() -> list[str]:
    return [sys.executable, "-m", "workers.logship_main"]


class ShipperProcess:
    """``InstanceLogs`` over a shipper child process; owns the child (``start``,
    ``close``) and restarts it when it dies."""

    def __init__(self, settings: Settings, *, command: Sequence[str] | None = None) -> None:
        self._config = child_config(settings)
        self._command = list(command) if command is not None else child_command()
        self._drain_wait_s = settings.logs.drain_timeout_s + DRAIN_MARGIN_S
        self._close_wait_s = settings.logs.drain_timeout_s + CLOSE_MARGIN_S
        self._proc: asyncio.subprocess.Process | None = None
        self._stdin: asyncio.StreamWriter | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._closing = False
        # Containers followed and not yet drained, and their open requests' start
        # messages: what a restarted child is told again.
        self._followed: dict[str, LogSource] = {}
        self._open: dict[str, dict[str, list[Any]]] = {}
        self._waiting: dict[int, tuple[str, asyncio.Future[bool]]] = {}
        self._ids = itertools.count(1)
        self._warned_at = -WARN_EVERY_S
        # Messages waiting for this pass of the event loop to end (see _send).
        self._outbox: list[str] = []
        self._flush_scheduled = False
        # Counters, for tests and the shutdown line.
        self.restarts = 0
        self.dropped_messages = 0

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the child (raises if it cannot be started at all) and its supervisor."""
        await self._spawn()
        self._supervisor = asyncio.create_task(self._supervise(), name="logship-supervisor")

    async def close(self) -> None:
        """Ask the child to flush and exit; kill it after drain_timeout_s + a margin.
        Call after the pool drained its containers."""
        self._closing = True
        proc = self._proc
        if proc is not None and proc.returncode is None:
            self._send(["c"])
            self._flush()  # now, not at the end of this pass: stdin closes next
            if self._stdin is not None:
                self._stdin.close()
            try:
                await asyncio.wait_for(proc.wait(), self._close_wait_s)
            except TimeoutError:
                log.error("log_shipper_process_kill", after_s=self._close_wait_s)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if self._supervisor is not None:
            # It returns by itself once the child's stdout ended; it may instead be
            # waiting out a restart backoff.
            try:
                await asyncio.wait_for(self._supervisor, 2.0)
            except (TimeoutError, asyncio.CancelledError):
                pass
            except Exception as e:
                log.error("log_shipper_supervisor_failed", error=repr(e))
        if self._proc is not None and self._proc is not proc and self._proc.returncode is None:
            # Spawned by a restart while closing.
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
            await self._proc.wait()
        for _, fut in self._waiting.values():
            if not fut.done():
                fut.set_result(False)
        log.info(
            "log_shipper_process_stopped",
            returncode=None if proc is None else proc.returncode,
            restarts=self.restarts,
            dropped_messages=self.dropped_messages,
        )

    async def _spawn(self) -> None:
        # stderr is inherited: the child's structlog lines join the worker's. Its own
        # session: a terminal's Ctrl-C goes to the worker, which then closes the child
        # after draining instead of the child dying with unsent records.
        proc = await asyncio.create_subprocess_exec(
            *self._command,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=LINE_LIMIT,
            start_new_session=True,
        )
        assert proc.stdin is not None
        self._proc = proc
        self._stdin = proc.stdin
        self._stdin.write(self._config)
        log.info("log_shipper_process_started", pid=proc.pid)

    async def _supervise(self) -> None:
        backoff = Backoff(RESTART_MIN_S, RESTART_MAX_S)
        while True:
            proc = self._proc
            assert proc is not None
            started = time.monotonic()
            await self._read_answers(proc)
            rc = await proc.wait()
            self._stdin = None
            if self._closing:
                return
            died_ns = time.time_ns()
            if time.monotonic() - started >= HEALTHY_RUN_S:
                backoff.reset()
            log.error(
                "log_shipper_process_died",
                returncode=rc,
                restart_in_s=backoff.delay_s,
                following=len(self._followed),
            )
            while True:
                await backoff.sleep()
                if self._closing:
                    return
                try:
                    await self._spawn()
                    break
                except OSError as e:
                    log.error("log_shipper_process_start_failed", error=str(e))
            self.restarts += 1
            self._refollow(died_ns)

    def _refollow(self, since_ns: int) -> None:
        # Microseconds since the epoch: above any seq the old child can have reached.
        seq_from = time.time_ns() // 1000
        for cid, src in self._followed.items():
            self._send(self._follow_msg(cid, src, since_ns, seq_from))
            for start in self._open.get(cid, {}).values():
                self._send(start)
        for rid, (cid, fut) in self._waiting.items():
            if not fut.done():
                self._send(["d", rid, cid])
        log.info(
            "log_shipper_process_refollowed", containers=len(self._followed), since_ns=since_ns
        )

    async def _read_answers(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while True:
            try:
                line = await proc.stdout.readline()
            except (ValueError, asyncio.LimitOverrunError) as e:
                log.error("log_shipper_bad_answer", error=str(e))
                continue
            if not line:
                return
            try:
                msg = json.loads(line)
                op = msg[0]
            except (ValueError, IndexError, TypeError):
                log.error("log_shipper_bad_answer", line=line[:200].decode(errors="replace"))
                continue
            if op == "d":
                waiting = self._waiting.get(msg[1])
                if waiting is not None and not waiting[1].done():
                    waiting[1].set_result(bool(msg[2]))

    # -- InstanceLogs ----------------------------------------------------------------------

    def _send(self, msg: list[Any]) -> None:
        w = self._stdin
        if w is None or w.transport.is_closing():
            self.dropped_messages += 1
            return
        if w.transport.get_write_buffer_size() > MAX_PENDING_BYTES:
            self.dropped_messages += 1
            now = time.monotonic()
            if now - self._warned_at >= WARN_EVERY_S:
                self._warned_at = now
                log.warning("log_shipper_process_behind", dropped_messages=self.dropped_messages)
            return
        # Coalesced: every invocation sends two messages, and one pipe write per message
        # cost the worker's event loop more than the rest of a warm invocation's
        # bookkeeping (measured: ~18 % of its CPU under a batch). Messages written in one
        # pass of the loop go out in one write, in order.
        self._outbox.append(_dumps(msg))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        lines, self._outbox = self._outbox, []
        w = self._stdin
        if not lines:
            return
        if w is None or w.transport.is_closing():
            self.dropped_messages += len(lines)
            return
        w.write(("\n".join(lines) + "\n").encode())

    @staticmethod
    def _follow_msg(cid: str, src: LogSource, since_ns: int | None, seq_from: int) -> list[Any]:
        return [
            "f",
            cid,
            src.function,
            src.version,
            src.instance,
            src.concurrency,
            src.memory_limit_mb,
            since_ns,
            seq_from,
        ]

    def follow(self, container_id: str, source: LogSource) -> None:
        if self._closing or container_id in self._followed:
            return
        self._followed[container_id] = source
        self._send(self._follow_msg(container_id, source, None, 0))

    def request_started(
        self, container_id: str, request_id: str, *, cold: bool, init_ms: float | None
    ) -> None:
        msg: list[Any] = ["s", container_id, request_id, cold, init_ms, time.time_ns()]
        opened = self._open.get(container_id)
        if opened is None:
            if container_id not in self._followed:
                return
            opened = self._open[container_id] = {}
        opened[request_id] = msg
        self._send(msg)

    def request_ended(
        self, container_id: str, request_id: str, *, status: int | None, error: str | None
    ) -> None:
        opened = self._open.get(container_id)
        if opened is None or opened.pop(request_id, None) is None:
            return
        self._send(["e", container_id, request_id, status, error, time.time_ns()])

    async def drained(self, container_id: str) -> bool:
        if container_id not in self._followed:
            return True
        rid = next(self._ids)
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiting[rid] = (container_id, fut)
        try:
            self._send(["d", rid, container_id])
            return await asyncio.wait_for(fut, self._drain_wait_s)
        except TimeoutError:
            log.warning(
                "log_drain_no_answer", container=container_id[:12], after_s=self._drain_wait_s
            )
            return False
        finally:
            self._waiting.pop(rid, None)
            self._followed.pop(container_id, None)
            self._open.pop(container_id, None)

    # -- for tests -------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def following(self) -> list[str]:
        return list(self._followed)
