"""The logs API and ``imagefn logs`` against the real Kafka-protocol broker.

Workers do not ship container output here: these tests are the producer, writing records
into ``{prefix}.logs`` exactly as the format of ``shared/logrecords.py`` says (keyed by
function name, Kafka timestamp = ts), then read them back through a real gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiokafka import AIOKafkaProducer
from structlog.testing import capture_logs

from cli.logs import render
from gateway import logs as gateway_logs
from shared import logreader, logrecords
from shared.kafka import ensure_topics, producer
from shared.logreader import partition_for
from shared.settings import load_settings
from tests.credentials import TEST_ADMIN_KEY
from tests.integration.conftest import (
    REPO,
    Platform,
    RegistryInfo,
    free_port,
    running_platform,
    unique,
    wait_for,
)

SSE = {"Accept": "text/event-stream"}
LOG_PARTITIONS = 2  # platform_env's IMAGEFN_KAFKA_LOG_PARTITIONS


class Instance:
    """Writes the records of one instance: seq counts up by one per record."""

    def __init__(self, function: str, version: int = 1) -> None:
        self.function = function
        self.version = version
        self.name = f"imagefn-{function}-{uuid.uuid4().hex[:12]}"
        self.seq = 0

    def _record(self, kind: str, ts: float, **fields: Any) -> dict[str, Any]:
        self.seq += 1
        return {
            "type": kind,
            "ts": ts,
            "function": self.function,
            "version": self.version,
            "instance": self.name,
            "worker": "it-shipper",
            "seq": self.seq,
            **fields,
        }

    def line(
        self, ts: float, text: str, request_id: str | None = None, stream: str = "stdout"
    ) -> dict[str, Any]:
        return self._record("line", ts, request_id=request_id, stream=stream, line=text)

    def start(self, ts: float, request_id: str, cold: bool = False) -> dict[str, Any]:
        return self._record("START", ts, request_id=request_id, stream="platform", cold=cold)

    def end(self, ts: float, request_id: str, status: int = 200) -> dict[str, Any]:
        return self._record(
            "END",
            ts,
            request_id=request_id,
            stream="platform",
            status=status,
            error=None,
            duration_ms=4.5,
        )

    def report(self, ts: float, request_id: str, cold: bool = False) -> dict[str, Any]:
        return self._record(
            "REPORT",
            ts,
            request_id=request_id,
            stream="platform",
            duration_ms=12.3,
            status=200,
            cold=cold,
            init_ms=850.0 if cold else None,
            memory_peak_mb=23.5,
            memory_limit_mb=128,
            lines=1,
        )


class Shipper:
    """Produces log records the way workers do."""

    def __init__(self, kafka_producer: AIOKafkaProducer, topic: str) -> None:
        self.producer = kafka_producer
        self.topic = topic

    async def send(self, *records: dict[str, Any]) -> None:
        for r in records:
            await self.send_raw(r["function"], logrecords.dumps(r), r["ts"])

    async def send_raw(self, function: str, value: bytes, ts: float) -> int:
        sent = await self.producer.send_and_wait(
            self.topic, value, key=function.encode(), timestamp_ms=int(ts * 1000)
        )
        return int(sent.partition)


@contextlib.asynccontextmanager
async def shipper_for(platform: Platform) -> AsyncIterator[Shipper]:
    settings = load_settings(platform.env)
    topics = await ensure_topics(settings.kafka, settings.logs, which=("logs",))
    p = producer(settings.kafka)
    await p.start()
    try:
        yield Shipper(p, topics.logs)
    finally:
        await p.stop()


@pytest.fixture(scope="module")
async def lp(redis_url: str, log_dir: Path, registry: RegistryInfo) -> AsyncIterator[Platform]:
    """A gateway with the broker configured and no workers (nothing here runs a
    function); images are not looked up, so deploys need no registry content."""
    async with running_platform(
        redis_url, log_dir, registry, workers=0, extra_env={"IMAGEFN_CHECK_IMAGES": "0"}
    ) as p:
        yield p


@pytest.fixture(scope="module")
async def shipper(lp: Platform) -> AsyncIterator[Shipper]:
    async with shipper_for(lp) as s:
        yield s


def logs_url(platform: Platform, name: str) -> str:
    return f"{platform.url}/v1/functions/{name}/logs"


async def query(
    client: aiohttp.ClientSession, platform: Platform, name: str, **params: str
) -> list[dict[str, Any]]:
    async with client.get(logs_url(platform, name), params=params) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"] == "application/x-ndjson"
        text = await resp.text()
    return [json.loads(line) for line in text.split("\n") if line]


def rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def neighbour_of(name: str) -> str:
    """Another function name whose records share ``name``'s partition."""
    while True:
        other = unique("logs-other")
        if partition_for(other, LOG_PARTITIONS) == partition_for(name, LOG_PARTITIONS):
            return other


async def test_the_reader_reads_the_partition_producers_pick(shipper: Shipper) -> None:
    # Names on both partitions: the producer's partitioner and partition_for agree.
    seen = set()
    for i in range(8):
        name = f"logs-part-{i}"
        inst = Instance(name)
        got = await shipper.send_raw(name, logrecords.dumps(inst.line(time.time(), "x")), 0)
        assert got == partition_for(name, LOG_PARTITIONS), name
        seen.add(got)
    assert seen == {0, 1}


async def test_queries_by_function_version_request_and_time(
    lp: Platform, shipper: Shipper, client: aiohttp.ClientSession
) -> None:
    fn = unique("logs-q")
    other = neighbour_of(fn)
    await lp.deploy(client, fn)
    await lp.deploy(client, fn)  # version 2
    await lp.deploy(client, other)
    async with client.put(f"{lp.url}/v1/functions/{fn}/aliases/prod", json={"version": 2}) as r:
        assert r.status == 200
    now = time.time()
    v1, v2, b = Instance(fn, 1), Instance(fn, 2), Instance(other, 1)
    old = v1.line(now - 7200, "two hours ago", "req-old")
    r1 = [
        v1.start(now - 60, "req-1", cold=True),
        v1.line(now - 59.5, "hello from version 1", "req-1"),
        v1.end(now - 59, "req-1"),
        v1.report(now - 59, "req-1", cold=True),
    ]
    r2 = [
        v2.start(now - 30, "req-2"),
        v2.line(now - 29.5, "hello from version 2", "req-2"),
        v2.line(now - 29.4, "an error", "req-2", stream="stderr"),
        v2.report(now - 29, "req-2"),
    ]
    raw = v2.line(now - 20, "", "req-2")
    raw.update(logrecords.encode_line_text(b"\xff\xfebinary"))
    stray = v2.line(now - 10, "no request", None, stream="stderr")
    await shipper.send(old, *r1, b.line(now - 40, "other function", "req-b"), *r2)
    # A retried batch: the same records again, later in the partition.
    await shipper.send(r1[1], r2[1])
    # Records nobody can read are skipped; they do not break the function's queries.
    for junk in (
        b"not json at all",
        b"[1, 2]",
        logrecords.dumps({"type": "line", "function": fn, "ts": "yesterday", "line": "x"}),
        logrecords.dumps({"type": "line", "function": fn, "ts": now - 15, "concurrent": 5}),
    ):
        await shipper.send_raw(fn, junk, now - 15)
    await shipper.send(raw, stray)

    recent = [*r1, *r2, raw, stray]
    assert await query(client, lp, fn) == recent
    assert await query(client, lp, other) == [
        {**b.line(now - 40, "other function", "req-b"), "seq": 1}
    ]
    assert await query(client, lp, fn, version="2") == [*r2, raw, stray]
    assert await query(client, lp, fn, version="prod") == [*r2, raw, stray]
    assert await query(client, lp, fn, version="1") == r1
    assert await query(client, lp, fn, request_id="req-1") == r1
    # A request id alone searches the last day.
    assert await query(client, lp, fn, request_id="req-old") == [old]
    assert await query(client, lp, fn, since="3h") == [old, *recent]
    assert await query(client, lp, fn, since="45s") == [*r2, raw, stray]
    assert await query(client, lp, fn, since=rfc3339(now - 65), until=f"{now - 40:.3f}") == r1
    assert await query(client, lp, fn, since="2h1m", until="1h59m") == [old]
    # The base64 line comes back exactly as shipped.
    assert logrecords.line_bytes((await query(client, lp, fn, since="25s"))[0]) == b"\xff\xfebinary"


async def test_concurrent_lines_match_each_request_in_flight(
    lp: Platform, shipper: Shipper, client: aiohttp.ClientSession
) -> None:
    fn = unique("logs-web")
    await lp.deploy(client, fn, type="web")
    inst = Instance(fn)
    shared_line = inst.line(time.time(), "while two were in flight")
    shared_line["concurrent"] = ["req-a", "req-b"]
    own = inst.line(time.time(), "req-b's own", "req-b")
    await shipper.send(shared_line, own)
    assert await query(client, lp, fn, request_id="req-a") == [shared_line]
    assert await query(client, lp, fn, request_id="req-b") == [shared_line, own]


async def test_limit_gives_the_newest_and_says_how_many_were_left_out(
    lp: Platform, shipper: Shipper, client: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    fn = unique("logs-lim")
    await lp.deploy(client, fn)
    inst = Instance(fn)
    now = time.time()
    records = [inst.line(now - 50 + i * 0.1, f"line {i}") for i in range(50)]
    await shipper.send(*records)
    got = await query(client, lp, fn, limit="7")
    assert got[0]["notice"] == "omitted" and got[0]["omitted"] == 43
    assert got[1:] == records[-7:]
    # Past the memory budget the kept records are read a second time: same answer.
    monkeypatch.setattr(logreader, "BACKLOG_MEMORY_BYTES", 300)
    again = await query(client, lp, fn, limit="7")
    assert again == got
    assert await query(client, lp, fn, limit="50") == records


async def read_lines(resp: aiohttp.ClientResponse, into: list[tuple[float, bytes]]) -> None:
    while line := await resp.content.readline():
        into.append((time.monotonic(), line))


async def wait_lines(
    lines: list[tuple[float, bytes]], pred: Callable[[bytes], bool], timeout_s: float, what: str
) -> float:
    """When the first line satisfying ``pred`` arrived (monotonic)."""
    await wait_for(lambda: any(pred(line) for _, line in lines), timeout_s, what)
    return next(t for t, line in lines if pred(line))


async def test_follow_ndjson_delivers_new_records_and_ends_when_the_client_leaves(
    lp: Platform, shipper: Shipper, client: aiohttp.ClientSession
) -> None:
    fn = unique("logs-f")
    await lp.deploy(client, fn)
    inst = Instance(fn)
    first = inst.line(time.time(), "before the request")
    await shipper.send(first)
    lines: list[tuple[float, bytes]] = []
    with capture_logs() as captured:
        async with client.get(logs_url(lp, fn), params={"follow": "1"}) as resp:
            assert resp.status == 200
            reader = asyncio.create_task(read_lines(resp, lines))
            await wait_lines(lines, lambda b: b"before the request" in b, 5, "the backlog")
            await asyncio.sleep(0.5)  # well into the live part
            later = inst.line(time.time(), "after the request started")
            sent_at = time.monotonic()
            await shipper.send(later)
            arrived = await wait_lines(lines, lambda b: b"after the request" in b, 5, "live")
            assert arrived - sent_at < 1.0, f"took {arrived - sent_at:.3f} s"
            # A duplicate of it (a producer retry) is not delivered again.
            marker = inst.line(time.time(), "marker")
            await shipper.send(later, marker)
            await wait_lines(lines, lambda b: b"marker" in b, 5, "the marker")
            assert [json.loads(b) for _, b in lines] == [first, later, marker]
            reader.cancel()
        # The client left: the gateway ends the stream and closes its consumer.
        await wait_for(
            lambda: any(
                e["event"] == "logs_stream_closed" and e.get("function") == fn for e in captured
            ),
            5,
            "the stream to close",
        )
    closed = next(e for e in captured if e["event"] == "logs_stream_closed")
    assert closed["reason"] == "client_gone" and closed["records"] == 3
    assert closed["duplicates"] == 1


async def test_follow_sse_heartbeats_delivers_and_ends_at_until(
    lp: Platform, shipper: Shipper, client: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gateway_logs, "HEARTBEAT_S", 0.5)
    fn = unique("logs-sse")
    await lp.deploy(client, fn)
    inst = Instance(fn)
    until = time.time() + 4
    lines: list[tuple[float, bytes]] = []
    async with client.get(
        logs_url(lp, fn), params={"follow": "true", "until": f"{until:.3f}"}, headers=SSE
    ) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/event-stream"
        assert resp.headers["Cache-Control"] == "no-cache"
        reader = asyncio.create_task(read_lines(resp, lines))
        await wait_lines(lines, lambda b: b == b": keepalive\n", 5, "a heartbeat")
        rec = inst.line(time.time(), "live over SSE", "req-s")
        sent_at = time.monotonic()
        await shipper.send(rec)
        arrived = await wait_lines(lines, lambda b: b"live over SSE" in b, 5, "the record")
        assert arrived - sent_at < 1.0, f"took {arrived - sent_at:.3f} s"
        await asyncio.wait_for(reader, 10)  # until passes: the gateway ends the stream
    assert time.time() >= until
    body = b"".join(line for _, line in lines).replace(b": keepalive\n\n", b"")
    assert body == (
        b"data: " + logrecords.dumps(rec) + b"\n\n" + b'event: end\ndata: {"reason":"until"}\n\n'
    )


async def test_wait_report_ends_at_the_report(
    lp: Platform, shipper: Shipper, client: aiohttp.ClientSession
) -> None:
    fn = unique("logs-rep")
    await lp.deploy(client, fn)
    inst = Instance(fn)
    now = time.time()
    start, out = inst.start(now, "req-w"), inst.line(now, "working", "req-w")
    unrelated = inst.line(now, "someone else", "req-x")
    await shipper.send(start, out, unrelated)

    async def later() -> dict[str, Any]:
        await asyncio.sleep(1.0)
        report = inst.report(time.time(), "req-w")
        await shipper.send(report, inst.line(time.time(), "after the report", "req-w"))
        return report

    producing = asyncio.create_task(later())
    t0 = time.monotonic()
    got = await query(client, lp, fn, request_id="req-w", wait_report="1", timeout="20")
    assert time.monotonic() - t0 < 5
    assert got == [start, out, await producing]
    # The REPORT already in Kafka: the whole backlog, and the answer ends at once.
    t0 = time.monotonic()
    got = await query(client, lp, fn, request_id="req-w", wait_report="1")
    assert time.monotonic() - t0 < 3
    assert [r.get("line", r["type"]) for r in got] == [
        "START",
        "working",
        "REPORT",
        "after the report",
    ]
    # No REPORT: it gives up after the timeout, saying so.
    t0 = time.monotonic()
    got = await query(client, lp, fn, request_id="req-x", wait_report="1", timeout="1.5")
    assert 1.5 <= time.monotonic() - t0 < 5
    assert got[0] == unrelated
    assert got[1]["notice"] == "report_timeout" and "req-x" in got[1]["message"]


async def test_errors(lp: Platform, client: aiohttp.ClientSession) -> None:
    fn = unique("logs-err")
    await lp.deploy(client, fn)

    async def error(name: str, status: int, kind: str, **params: str) -> str:
        async with client.get(logs_url(lp, name), params=params) as resp:
            body = await resp.json()
            assert resp.status == status, body
            assert resp.headers["X-Scf-Error-Type"] == kind
            message: str = body["error"]["message"]
            return message

    await error("nobody-here", 404, "FunctionNotFound")
    await error(fn, 404, "VersionNotFound", version="nightly")
    assert (await error(fn, 400, "InvalidRequest", since="yesterday")).startswith("since:")
    assert (await error(fn, 400, "InvalidRequest", until="10x")).startswith("until:")
    assert (await error(fn, 400, "InvalidRequest", limit="0")).startswith("limit:")
    assert (await error(fn, 400, "InvalidRequest", follow="maybe")).startswith("follow:")
    assert (await error(fn, 400, "InvalidRequest", wait_report="1")).startswith("wait_report:")
    assert (await error(fn, 400, "InvalidRequest", colour="red")).startswith("colour:")


@pytest.mark.parametrize(
    ("bootstrap", "says"),
    [("", "IMAGEFN_KAFKA_BOOTSTRAP is empty"), ("closed", "unavailable")],
)
async def test_no_kafka_is_503(
    redis_url: str,
    log_dir: Path,
    registry: RegistryInfo,
    client: aiohttp.ClientSession,
    bootstrap: str,
    says: str,
) -> None:
    if bootstrap == "closed":
        bootstrap = f"127.0.0.1:{free_port()}"  # nothing listens there
    env = {"IMAGEFN_CHECK_IMAGES": "0", "IMAGEFN_KAFKA_BOOTSTRAP": bootstrap}
    async with running_platform(redis_url, log_dir, registry, workers=0, extra_env=env) as p:
        await p.deploy(client, "logs-nokafka")
        t0 = time.monotonic()
        async with client.get(logs_url(p, "logs-nokafka")) as resp:
            body = await resp.json()
            assert resp.status == 503, body
        assert time.monotonic() - t0 < 5
    assert body["error"]["type"] == "ServiceUnavailable"
    assert says in body["error"]["message"]


async def test_gateway_shutdown_ends_a_follower(
    redis_url: str, log_dir: Path, registry: RegistryInfo, client: aiohttp.ClientSession
) -> None:
    env = {"IMAGEFN_CHECK_IMAGES": "0"}
    lines: list[tuple[float, bytes]] = []
    async with running_platform(redis_url, log_dir, registry, workers=0, extra_env=env) as p:
        await p.deploy(client, "logs-shutdown")
        resp = await client.get(logs_url(p, "logs-shutdown"), params={"follow": "1"}, headers=SSE)
        assert resp.status == 200
        reader = asyncio.create_task(read_lines(resp, lines))
        await asyncio.sleep(1.0)
        t0 = time.monotonic()
    # The gateway's cleanup did not wait for the follower to go by itself.
    assert time.monotonic() - t0 < 5
    await asyncio.wait_for(reader, 5)
    resp.release()
    body = b"".join(line for _, line in lines)
    assert b'"notice":"shutdown"' in body
    assert body.endswith(b'event: end\ndata: {"reason":"shutdown"}\n\n')


# -- the CLI ------------------------------------------------------------------------------


def cli_env(platform: Platform) -> dict[str, str]:
    return {
        **os.environ,
        "IMAGEFN_GATEWAY": platform.url,
        "IMAGEFN_ENV_FILE": "/nonexistent",
        "IMAGEFN_API_KEY": TEST_ADMIN_KEY,
    }


async def run_cli(platform: Platform, *argv: str, timeout_s: float = 60) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cli.main",
        *argv,
        cwd=REPO,
        env=cli_env(platform),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    return int(proc.returncode or 0), out.decode(), err.decode()


async def test_cli_logs_renders_and_prints_json(
    lp: Platform, shipper: Shipper, client: aiohttp.ClientSession
) -> None:
    fn = unique("logs-cli")
    await lp.deploy(client, fn)
    inst = Instance(fn)
    now = time.time()
    records = [
        inst.start(now, "req-cli-1", cold=True),
        inst.line(now, "hello", "req-cli-1"),
        inst.end(now, "req-cli-1"),
        inst.report(now, "req-cli-1", cold=True),
    ]
    other = inst.line(now, "not this one", "req-cli-2")
    await shipper.send(*records, other)
    code, out, err = await run_cli(lp, "logs", fn, "--request-id", "req-cli-1")
    assert (code, err) == (0, "")
    assert out.splitlines() == [render(r) for r in records]
    assert "REPORT RequestId: req-cli-1  Duration: 12.3 ms  Status: 200  Cold start" in out
    code, out, err = await run_cli(lp, "logs", fn, "--json", "--since", "1m", "--limit", "2")
    assert code == 0
    assert [json.loads(line) for line in out.splitlines()] == [records[-1], other]
    assert err.startswith("imagefn: 3 older matching records left out (limit=2)")
    assert len(err.splitlines()) == 1
    code, out, err = await run_cli(lp, "logs", fn, "--since", "soon")
    assert code == 1 and out == ""
    assert err.startswith("imagefn: InvalidRequest: since:")


async def test_cli_logs_follow_prints_lines_as_they_come_and_stops_on_ctrl_c(
    lp: Platform, shipper: Shipper, client: aiohttp.ClientSession
) -> None:
    fn = unique("logs-clif")
    await lp.deploy(client, fn)
    inst = Instance(fn)
    await shipper.send(inst.line(time.time(), "already there", "req-f"))
    with capture_logs() as captured:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "cli.main",
            "logs",
            fn,
            "-f",
            cwd=REPO,
            env=cli_env(lp),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert proc.stdout is not None and proc.stderr is not None
        try:
            first = await asyncio.wait_for(proc.stdout.readline(), 15)
            assert first.decode().endswith("  stdout    req-f     already there\n")
            for i in range(3):
                rec = inst.line(time.time(), f"live {i}", "req-f")
                sent_at = time.monotonic()
                await shipper.send(rec)
                line = await asyncio.wait_for(proc.stdout.readline(), 5)
                assert line.decode() == render(rec) + "\n"
                assert time.monotonic() - sent_at < 1.5
            proc.send_signal(signal.SIGINT)
            code = await asyncio.wait_for(proc.wait(), 5)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert code == 130
        err = (await proc.stderr.read()).decode()
        assert "Traceback" not in err and err == ""
        await wait_for(
            lambda: any(
                e["event"] == "logs_stream_closed" and e.get("function") == fn for e in captured
            ),
            5,
            "the gateway to end the stream",
        )


async def test_cli_invoke_log_prints_the_invocations_records(
    platform: Platform, client: aiohttp.ClientSession
) -> None:
    name = unique("logs-inv")
    await platform.deploy(client, name, memory_mb=128)
    rid = f"cli-test-{uuid.uuid4().hex[:12]}"
    inst = Instance(name)
    now = time.time()
    records = [
        inst.start(now, rid),
        inst.line(now, "shipped by the test", rid),
        inst.end(now, rid),
        inst.report(now, rid),
    ]
    async with shipper_for(platform) as s:
        await s.send(*records)
    code, out, err = await run_cli(
        platform, "invoke", name, "--log", "--request-id", rid, "--data", '{"n": 1}'
    )
    assert code == 0, err
    assert json.loads(out)["request_id"] == rid  # the result alone on stdout
    shown = err.splitlines()
    for r in records:
        assert render(r) in shown
