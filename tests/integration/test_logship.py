"""Container output shipped to Kafka (workers/logship.py), read back from the logs topic
with a plain consumer: order, attribution, START/END/REPORT, exits, binary and long
lines, a broker outage during output, and Kafka away when the worker starts."""

from __future__ import annotations

import asyncio
import base64
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from shared import logrecords
from tests.integration.conftest import (
    KAFKA,
    Platform,
    RegistryInfo,
    free_port,
    running_platform,
    start_broker,
    unique,
    wait_for,
)

Records = list[dict[str, Any]]


class LogReader:
    """A platform's logs topic, read from its beginning; ``records`` grows as ``until``
    reads (with each record's Kafka key and timestamp in ``meta``). The consumer starts
    once the topic exists: one started earlier would not see it."""

    def __init__(self, bootstrap: str, prefix: str) -> None:
        self.topic = f"{prefix}.logs"
        self.records: Records = []
        self.meta: list[tuple[bytes | None, int]] = []
        self._bootstrap = bootstrap
        self._consumer: AIOKafkaConsumer | None = None

    async def __aenter__(self) -> LogReader:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._consumer is not None:
            await self._consumer.stop()

    async def _start(self) -> bool:
        admin = AIOKafkaAdminClient(bootstrap_servers=self._bootstrap, client_id="it-logs")
        try:
            await admin.start()
            if self.topic not in await admin.list_topics():
                return False
        except KafkaError:
            return False  # not up yet
        finally:
            await admin.close()
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self._bootstrap,
            enable_auto_commit=False,
            client_id="it-logs",
            fetch_max_wait_ms=100,
        )
        await consumer.start()
        tps = [
            TopicPartition(self.topic, p) for p in consumer.partitions_for_topic(self.topic) or []
        ]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        self._consumer = consumer
        return True

    async def until(
        self, predicate: Callable[[Records], bool], timeout_s: float, what: str
    ) -> Records:
        deadline = time.monotonic() + timeout_s
        while not predicate(self.records):
            if time.monotonic() > deadline:
                kinds = [(r["type"], r.get("line", "")[:30]) for r in self.records[-8:]]
                raise AssertionError(
                    f"timed out waiting for {what}: {len(self.records)} records, last {kinds}"
                )
            if self._consumer is None and not await self._start():
                await asyncio.sleep(0.2)
                continue
            assert self._consumer is not None
            batches = await self._consumer.getmany(timeout_ms=200, max_records=20_000)
            for msgs in batches.values():
                for m in msgs:
                    self.records.append(logrecords.loads(m.value))
                    self.meta.append((m.key, m.timestamp))
        return self.records


def has(kind: str, rid: str) -> Callable[[Records], bool]:
    return lambda rs: any(r["type"] == kind and r["request_id"] == rid for r in rs)


def deduped(records: Records) -> Records:
    """A reader's view: the first of each (instance, seq); at-least-once may repeat."""
    seen: set[tuple[str, int]] = set()
    out = []
    for r in records:
        if (r["instance"], r["seq"]) not in seen:
            seen.add((r["instance"], r["seq"]))
            out.append(r)
    return out


def index_of(records: Records, kind: str, rid: str) -> int:
    return next(i for i, r in enumerate(records) if r["type"] == kind and r["request_id"] == rid)


def numbered(records: Records, prefix: str) -> list[int]:
    return [
        int(r["line"][len(prefix) :])
        for r in records
        if r["type"] == "line" and r["line"].startswith(prefix)
    ]


def cgroups_readable() -> bool:
    return any(
        Path(p).is_dir()
        for p in (
            "/sys/fs/cgroup/memory/docker",
            "/sys/fs/cgroup/docker",
            "/sys/fs/cgroup/system.slice",
        )
    )


async def test_ten_thousand_lines_arrive_in_order_with_start_end_report(
    platform: Platform, client: aiohttp.ClientSession
) -> None:
    name = unique("logs-many")
    await platform.deploy(client, name, memory_mb=128)
    event = {
        "output": [
            {"lines": 10_000, "prefix": "out "},
            {"lines": 300, "prefix": "err ", "stream": "stderr"},
        ]
    }
    status, headers, _ = await platform.invoke(client, name, event)
    assert status == 200
    rid = headers["X-Request-Id"]
    async with LogReader(KAFKA["bootstrap"], platform.prefix) as reader:
        await reader.until(has("REPORT", rid), 60, "the first REPORT")
        # (After the first REPORT: the engine has read all of the first request's output,
        # so nothing of it can still be queued in front of the second's.)
        status, headers, _ = await platform.invoke(
            client,
            name,
            {"print": ["second"], "output_after": [{"lines": 3, "prefix": "after "}]},
        )
        assert status == 200
        rid2 = headers["X-Request-Id"]
        await reader.until(has("REPORT", rid2), 30, "the second REPORT")
    for (key, ts_ms), r in zip(reader.meta, reader.records, strict=True):
        if r["function"] == name:
            # Keyed by function (one partition, in order), stamped with the line's time.
            assert key == name.encode() and abs(ts_ms - r["ts"] * 1000) <= 0.5 + 1e-3
    mine = deduped([r for r in reader.records if r["function"] == name])
    assert [r["seq"] for r in mine] == list(range(1, len(mine) + 1))
    assert len({r["instance"] for r in mine}) == 1
    assert mine[0]["instance"].startswith(f"imagefn-{name}-")

    # The init output belongs to no request and comes first.
    first = mine[0]
    assert first["type"] == "line" and first["line"].startswith("testfn listening on")
    assert first["request_id"] is None and first["stream"] == "stdout"

    out = [r for r in mine if r.get("line", "").startswith("out ")]
    err = [r for r in mine if r.get("line", "").startswith("err ")]
    assert numbered(mine, "out ") == list(range(10_000))
    assert numbered(mine, "err ") == list(range(300))
    assert {(r["request_id"], r["stream"]) for r in out} == {(rid, "stdout")}
    assert {(r["request_id"], r["stream"]) for r in err} == {(rid, "stderr")}
    start, end, report = (index_of(mine, k, rid) for k in ("START", "END", "REPORT"))
    lines_at = [i for i, r in enumerate(mine) if r in out or r in err]
    assert start < min(lines_at) and max(lines_at) < end < report
    # testfn's access log line goes to stderr just after the response: still the
    # request's output (its window runs to the next start), and before its END.
    [access] = [i for i, r in enumerate(mine[:end]) if "POST /event-invoke" in r.get("line", "")]
    # (stderr has no backlog: the engine may read it before the end of stdout's.)
    assert mine[access]["request_id"] == rid and start < access
    assert mine[start]["cold"] is True
    assert (mine[end]["status"], mine[end]["error"]) == (200, None)
    rep = mine[report]
    assert rep["stream"] == "platform"
    assert rep["cold"] is True and rep["init_ms"] > 0
    assert rep["lines"] == 10_301 and rep["status"] == 200
    assert rep["duration_ms"] == mine[end]["duration_ms"] > 0
    assert rep["memory_limit_mb"] == 128
    if cgroups_readable():
        assert 0 < rep["memory_peak_mb"] <= 128
    # The second, warm request: its own START/END/REPORT; what it printed after answering
    # is still its own (the window runs to the next start) and, written at once, comes
    # before its END (placed once the output has been quiet for a moment).
    s2, e2, r2 = (index_of(mine, k, rid2) for k in ("START", "END", "REPORT"))
    assert report < s2 < e2 < r2
    assert mine[s2]["cold"] is False and "init_ms" not in mine[r2]
    second = next(i for i, r in enumerate(mine) if r.get("line") == "second")
    assert s2 < second < e2 and mine[second]["request_id"] == rid2
    after = [i for i, r in enumerate(mine) if r.get("line", "").startswith("after ")]
    assert all(s2 < i < e2 and mine[i]["request_id"] == rid2 for i in after)
    assert mine[r2]["lines"] == 1 + 3 + 1  # "second", the three after, the access log


async def test_binary_and_long_lines_arrive_byte_exact(
    platform: Platform, client: aiohttp.ClientSession
) -> None:
    name = unique("logs-bytes")
    await platform.deploy(client, name)
    raw = b"\xff\xfe\x00binary\x80 tail\n"
    event = {"output": [{"raw_b64": base64.b64encode(raw).decode()}, {"long_line": 40_000}]}
    status, headers, _ = await platform.invoke(client, name, event)
    assert status == 200
    rid = headers["X-Request-Id"]
    async with LogReader(KAFKA["bootstrap"], platform.prefix) as reader:
        await reader.until(has("REPORT", rid), 60, "REPORT")
    mine = [r for r in deduped(reader.records) if r["request_id"] == rid and r["type"] == "line"]
    # stdout's first whole line; the access log line (stderr) may come before it: the
    # engine copies the two streams separately and stamps each when it reads it.
    binary = next(r for r in mine if r["stream"] == "stdout" and "part" not in r)
    parts = [r for r in mine if "part" in r]
    assert binary["encoding"] == "base64"
    assert logrecords.line_bytes(binary) == raw[:-1]
    # Longer than max_line_bytes (16 KiB): parts, which join to the exact line.
    assert [(p["part"], p["last"]) for p in parts] == [(1, False), (2, False), (3, True)]
    assert "".join(p["line"] for p in parts) == ("0123456789" * 4000)[:40_000]


async def test_a_crashing_instance_still_ships_its_last_lines(
    platform: Platform, client: aiohttp.ClientSession
) -> None:
    name = unique("logs-crash")
    await platform.deploy(client, name)
    status, headers, _ = await platform.invoke(client, name, {"print": ["last words"], "exit": 3})
    assert status == 502 and headers["X-Scf-Error-Type"] == "UserProcessExited"
    rid = headers["X-Request-Id"]
    doomed = unique("logs-initexit")
    await platform.deploy(client, doomed, args=["exit-at-start", "4"])
    status, headers, _ = await platform.invoke(client, doomed, {})
    assert status == 502
    async with LogReader(KAFKA["bootstrap"], platform.prefix) as reader:
        await reader.until(has("REPORT", rid), 60, "REPORT of the crashed request")
        await reader.until(
            lambda rs: any(r["function"] == doomed and r.get("line") == "boom" for r in rs),
            30,
            "the output of the container that exited at start",
        )
    crashed = [r for r in deduped(reader.records) if r["request_id"] == rid]
    assert [(r["type"], r.get("line")) for r in crashed] == [
        ("START", None),
        ("line", "last words"),
        ("line", "testfn: exiting with code 3 mid-request"),
        ("END", None),
        ("REPORT", None),
    ]
    assert crashed[3]["error"] == "UserProcessExited"
    [boom] = [r for r in reader.records if r["function"] == doomed]
    assert (boom["line"], boom["stream"], boom["request_id"]) == ("boom", "stderr", None)


def stop_broker(proc: subprocess.Popen[bytes]) -> None:
    """Abruptly (a crash): a broker asked to stop may go on serving for a while."""
    proc.kill()
    proc.wait(10)


async def test_broker_outage_does_not_slow_the_function_and_drops_are_counted(
    pushed_images: None,
    redis_url: str,
    log_dir: Path,
    registry: RegistryInfo,
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """A broker of its own, stopped while the function writes and started again (empty:
    it keeps records in memory) on the same port: the worker's buffer (1 MB) overflows,
    the function runs as fast as with the broker up, and once the broker is back every
    kept line arrives and every other one is counted by a GAP record."""
    port = free_port()
    bootstrap = f"127.0.0.1:{port}"
    broker = start_broker(port, tmp_path / "broker.log")
    # Phase a is read before the outage; the broker goes during the pause and comes back
    # while phase b is being written.
    event = {
        "output": [
            {"lines": 500, "prefix": "a "},
            {"sleep": 2.0},
            {"lines": 20_000, "prefix": "b ", "over_s": 4.0},
        ]
    }
    try:
        async with running_platform(
            redis_url,
            log_dir,
            registry,
            extra_env={"IMAGEFN_KAFKA_BOOTSTRAP": bootstrap, "IMAGEFN_LOG_BUFFER_MB": "1"},
        ) as p:
            name = unique("logs-outage")
            # Quiet: no access log line, so every line counted below is the event's.
            await p.deploy(client, name, timeout_s=30, env={"TESTFN_QUIET": "1"})
            await p.invoke(client, name, {})  # warm: both runs below find the instance
            started = time.monotonic()
            status, headers, _ = await p.invoke(client, name, event)
            with_broker_s = time.monotonic() - started
            assert status == 200
            before: Records = []
            async with LogReader(bootstrap, p.prefix) as reader:
                await reader.until(has("REPORT", headers["X-Request-Id"]), 60, "REPORT")

                started = time.monotonic()
                call = asyncio.create_task(p.invoke(client, name, event))
                await reader.until(
                    lambda rs: any(r.get("line") == "a 499" for r in rs[-600:]), 30, "phase a"
                )
                before = list(reader.records)
            stop_broker(broker)
            # Gone before phase b begins: nothing of it can have reached the old broker.
            assert time.monotonic() - started < 1.8, "reading phase a took too long"
            await asyncio.sleep(max(0.0, started + 4.0 - time.monotonic()))
            broker = start_broker(port, tmp_path / "broker.log")
            status, headers, _ = await call
            without_broker_s = time.monotonic() - started
            assert status == 200
            rid = headers["X-Request-Id"]
            # Not slowed: output goes to the engine's log file whatever Kafka does.
            assert without_broker_s < with_broker_s * 1.25 + 0.5, (
                with_broker_s,
                without_broker_s,
            )
            async with LogReader(bootstrap, p.prefix) as reader:
                await reader.until(has("REPORT", rid), 90, "REPORT after the outage")
            after = reader.records
            worker_log = p.workers[0].log_text()
    finally:
        stop_broker(broker)

    mine = deduped([r for r in before + after if r["function"] == name])
    # Nothing vanished: the instance's sequence has no hole across the outage.
    assert [r["seq"] for r in mine] == list(range(1, len(mine) + 1))
    this = [r for r in mine if r["request_id"] == rid]
    assert numbered(this, "a ") == list(range(500))
    kept = numbered(this, "b ")
    assert kept == sorted(kept)
    gaps = [r for r in this if r["type"] == "GAP"]
    assert gaps, "the 1 MB buffer must have overflowed"
    dropped = sum(g["dropped_lines"] for g in gaps)
    assert dropped > 0 and len(kept) + dropped == 20_000
    missing = sorted(set(range(20_000)) - set(kept))
    assert len(missing) == dropped
    # The GAPs sit where their lines went missing: those between two kept lines add up
    # to exactly the lines skipped there.
    last, counted = -1, 0
    for r in this:
        if r["type"] == "GAP":
            counted += r["dropped_lines"]
            assert r["first_ts"] <= r["last_ts"]
        elif r["type"] == "line" and r["line"].startswith("b "):
            n = int(r["line"][2:])
            assert n - last - 1 == counted, (last, n, counted)
            last, counted = n, 0
    assert 20_000 - last - 1 == counted
    report = next(r for r in this if r["type"] == "REPORT")
    assert report["dropped_lines"] == dropped
    assert report["lines"] == 500 + len(kept)
    assert "log_lines_dropping" in worker_log and "log_gap" in worker_log


async def test_worker_serves_while_kafka_is_away_and_ships_once_it_comes(
    pushed_images: None,
    redis_url: str,
    log_dir: Path,
    registry: RegistryInfo,
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    port = free_port()  # nothing listens here yet
    bootstrap = f"127.0.0.1:{port}"
    broker: subprocess.Popen[bytes] | None = None
    try:
        async with running_platform(
            redis_url, log_dir, registry, extra_env={"IMAGEFN_KAFKA_BOOTSTRAP": bootstrap}
        ) as p:
            name = unique("logs-late")
            await p.deploy(client, name)
            status, headers, _ = await p.invoke(client, name, {"print": ["said while away"]})
            assert status == 200
            rid = headers["X-Request-Id"]
            await wait_for(
                lambda: "log_kafka_unavailable" in p.workers[0].log_text(), 10, "the warning"
            )
            broker = start_broker(port, tmp_path / "broker.log")
            async with LogReader(bootstrap, p.prefix) as reader:
                await reader.until(has("REPORT", rid), 60, "REPORT once Kafka is there")
            mine = [r for r in reader.records if r["request_id"] == rid]
            assert [r.get("line") for r in mine if r["stream"] != "stderr"] == [
                None,  # START
                "said while away",
                None,  # END
                None,  # REPORT
            ]
    finally:
        if broker is not None:
            stop_broker(broker)
