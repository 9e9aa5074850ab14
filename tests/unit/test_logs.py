"""The logs API's pieces without a broker: parameters and times, SSE framing (and the
CLI's parsing of it), the duplicate filter, partitioning, query matching, rendering, and
the route's answers that come before Kafka is asked."""

from __future__ import annotations

import base64
import contextlib
import json
import types
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from aiokafka.partitioner import DefaultPartitioner
from structlog.testing import capture_logs

from cli.logs import format_ts, line_text, render, sse_events
from gateway.app import build_app
from gateway.context import LOG_READER
from gateway.logs import (
    DEFAULT_LIMIT,
    DEFAULT_REPORT_TIMEOUT_S,
    LogParams,
    parse_params,
    parse_time,
    sse_event,
    wants_sse,
)
from shared import logrecords
from shared.errors import InvalidRequest, ServiceUnavailable
from shared.logreader import (
    DEFAULT_WINDOW_S,
    REQUEST_WINDOW_S,
    Backlog,
    SeqDeduper,
    _Kept,
    is_report_of,
    partition_for,
    with_default_window,
)
from shared.logrecords import LogQuery
from shared.queue.memory import MemoryQueue
from shared.settings import KafkaSettings, Settings
from tests.credentials import ADMIN_HEADERS

from .conftest import EVENT_SPEC, GATEWAY_SETTINGS, FakeImages, Gateway
from .fakes import FakeRedis, closed_port

NOW = 1_795_860_000.0  # 2026-11-28T10:40:00Z

# -- times and parameters --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("30s", NOW - 30),
        ("10m", NOW - 600),
        ("2h", NOW - 7200),
        ("1d", NOW - 86400),
        ("1h30m", NOW - 5400),
        ("1.5h", NOW - 5400),
        ("500ms", NOW - 0.5),
        ("0s", NOW),
        ("2026-11-28T10:00:00Z", datetime(2026, 11, 28, 10, tzinfo=UTC).timestamp()),
        (
            "2026-11-28T11:00:00.250+01:00",
            datetime(2026, 11, 28, 10, tzinfo=UTC).timestamp() + 0.25,
        ),
        ("1795860000", 1795860000.0),
        ("1795860000.5", 1795860000.5),
        (" 10m ", NOW - 600),
    ],
)
def test_parse_time(raw: str, expected: float) -> None:
    assert parse_time("since", raw, NOW) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        ("yesterday", "is not a duration"),
        ("10", None),  # epoch seconds: valid, just early
        ("-5m", "is not a duration"),
        ("10x", "is not a duration"),
        ("m", "is not a duration"),
        ("2026-11-28T10:00:00", "no time zone offset"),
        ("1795860000000", "milliseconds?"),
        ("", "is not a duration"),
    ],
)
def test_parse_time_refusals_name_the_parameter(raw: str, says: str | None) -> None:
    if says is None:
        assert parse_time("until", raw, NOW) == 10.0
        return
    with pytest.raises(InvalidRequest) as info:
        parse_time("until", raw, NOW)
    assert info.value.message.startswith("until: ")
    assert says in info.value.message


def test_parse_params_defaults() -> None:
    assert parse_params({}, NOW) == LogParams()
    assert LogParams().limit == DEFAULT_LIMIT and LogParams().timeout_s == DEFAULT_REPORT_TIMEOUT_S


def test_parse_params_all() -> None:
    got = parse_params(
        {
            "version": "prod",
            "request_id": "req-1.a_b",
            "since": "2h",
            "until": "1h",
            "follow": "",
            "limit": "10",
            "wait_report": "true",
            "timeout": "2.5",
        },
        NOW,
    )
    assert got == LogParams(
        version="prod",
        request_id="req-1.a_b",
        since=NOW - 7200,
        until=NOW - 3600,
        follow=True,
        limit=10,
        wait_report=True,
        timeout_s=2.5,
    )
    assert parse_params({"follow": "off", "version": "$LATEST"}, NOW).follow is False


@pytest.mark.parametrize(
    ("query", "name"),
    [
        ({"colour": "red"}, "colour"),
        ({"version": ""}, "version"),
        ({"version": "0"}, "version"),
        ({"request_id": "a b"}, "request_id"),
        ({"request_id": "x" * 129}, "request_id"),
        ({"since": "later"}, "since"),
        ({"until": "2026-13-01T00:00:00Z"}, "until"),
        ({"since": "1h", "until": "2h"}, "since"),
        ({"limit": "0"}, "limit"),
        ({"limit": "10001"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"limit": "-1"}, "limit"),
        ({"limit": "\u00b2"}, "limit"),  # a digit to str.isdigit(), not to int()
        ({"since": "9" * 400 + "s"}, "since"),  # an infinite duration
        ({"follow": "maybe"}, "follow"),
        ({"wait_report": "1"}, "wait_report"),
        ({"wait_report": "nah", "request_id": "r1"}, "wait_report"),
        ({"timeout": "0"}, "timeout"),
        ({"timeout": "901"}, "timeout"),
        ({"timeout": "nan"}, "timeout"),
        ({"timeout": "soon"}, "timeout"),
    ],
)
def test_bad_parameters_are_named(query: dict[str, str], name: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_params(query, NOW)
    assert info.value.message.startswith(f"{name}: "), info.value.message


@pytest.mark.parametrize(
    ("accept", "sse"),
    [
        ("text/event-stream", True),
        ("application/json, Text/Event-Stream;q=0.9", True),
        ("text/event-stream;q=0", False),
        ("text/event-stream; q=0.0", False),
        ("text/event-stream;q=0.5", True),
        ("application/x-ndjson", False),
        ("*/*", False),
        ("", False),
    ],
)
def test_wants_sse(accept: str, sse: bool) -> None:
    assert wants_sse(accept) is sse


# -- SSE framing, and the CLI's parsing of it ---------------------------------------------------


def test_sse_event_framing() -> None:
    assert sse_event(b'{"a":1}') == b'data: {"a":1}\n\n'
    assert sse_event(b'{"reason":"until"}', "end") == b'event: end\ndata: {"reason":"until"}\n\n'
    # Every line of the data becomes a data field, whatever ends it.
    assert sse_event(b"one\ntwo\r\nthree\rfour") == (
        b"data: one\ndata: two\ndata: three\ndata: four\n\n"
    )


def test_sse_round_trip_through_the_cli_parser() -> None:
    # JSON keeps U+2028 raw (ensure_ascii=False): it must not split an event.
    record = {"type": "line", "line": "a\u2028b \u00e9 \n end", "ts": 1.5}
    stream = (
        b": keepalive\n\n"
        + sse_event(logrecords.dumps(record))
        + sse_event(b"multi\nline", "notice")
        + b": keepalive\n\n"
        + sse_event(b'{"reason":"complete"}', "end")
    )
    lines = stream.split(b"\n")
    events = list(sse_events(line + b"\n" for line in lines))
    assert [(e.event, e.data) for e in events] == [
        ("message", logrecords.dumps(record).decode()),
        ("notice", "multi\nline"),
        ("end", '{"reason":"complete"}'),
    ]
    assert logrecords.loads(events[0].data.encode()) == record


def test_sse_parser_follows_the_specification() -> None:
    raw = [
        b"event: notice\r\n",
        b"data:no space\r\n",
        b"id: 7\r\n",  # ignored field
        b"retry: 100\n",
        b"\n",
        b"data\n",  # a field with no colon: empty data
        b"\n",
        b"event: lonely\n",  # an event with no data is not dispatched
        b"\n",
        b"data: tail without blank line\n",  # never dispatched: the stream was cut
    ]
    assert [(e.event, e.data) for e in sse_events(raw)] == [
        ("notice", "no space"),
        ("message", ""),
    ]


# -- the reader's pieces --------------------------------------------------------------------------


def test_partition_for_is_javas_murmur2_partitioning() -> None:
    # Known values of Java's Utils.murmur2 (Kafka's own tests).
    for key, java in [(b"21", -973932308), (b"foobar", -790332482), (b"abc", 479470107)]:
        for n in (1, 2, 8, 16, 7):
            assert partition_for(key.decode(), n) == (java & 0x7FFFFFFF) % n
    # ... and what aiokafka's default partitioner picks, for any name.
    for name in ("hello-event", "web-app", "ünïcode-fn", "x"):
        for n in (1, 3, 8):
            assert partition_for(name, n) == DefaultPartitioner()(
                name.encode(), list(range(n)), list(range(n))
            )


def rec(instance: str | None, seq: Any) -> dict[str, Any]:
    return {"instance": instance, "seq": seq}


def test_dedupe_drops_repeats_and_keeps_everything_else() -> None:
    d = SeqDeduper()
    first = [d.first_time(rec("a", s)) for s in (1, 2, 3)]
    assert first == [True, True, True]
    # A retried batch repeats 2-3; another instance's seqs are its own.
    assert [d.first_time(rec("a", s)) for s in (2, 3)] == [False, False]
    assert d.first_time(rec("b", 2)) is True
    # Out of order is not a duplicate: 5 then 4 both count, then 4 again does not.
    assert [d.first_time(rec("a", s)) for s in (5, 4, 4, 6)] == [True, True, False, True]
    assert d.dropped == 3
    # Nothing to tell them by: always new.
    for r in (rec(None, 1), rec("a", None), rec("a", True), rec("a", "1"), {}):
        assert d.first_time(r) is True
        assert d.first_time(r) is True


def test_dedupe_keeps_runs_compact() -> None:
    d = SeqDeduper()
    for s in [*range(1, 1000), *range(2000, 3000), 1500, 1000]:
        assert d.first_time(rec("a", s))
    los, his = d._runs["a"]
    assert list(zip(los, his, strict=True)) == [(1, 1000), (1500, 1500), (2000, 2999)]
    for s in (1, 500, 1000, 1500, 2999):
        assert not d.first_time(rec("a", s))
    # Filling the holes merges the runs into one.
    for s in [*range(1001, 1500), *range(1501, 2000)]:
        assert d.first_time(rec("a", s))
    assert list(zip(*d._runs["a"], strict=True)) == [(1, 2999)]


def test_dedupe_forgets_past_its_bounds_but_never_drops_a_new_record() -> None:
    d = SeqDeduper(max_instances=2, max_runs=3)
    for s in (1, 3, 5, 7):  # four runs: the lowest is forgotten
        assert d.first_time(rec("a", s))
    assert d.first_time(rec("a", 1)) is True  # a repeat let through, not a loss
    assert d.first_time(rec("a", 7)) is False
    assert d.first_time(rec("b", 1)) and d.first_time(rec("c", 1))  # "a" is forgotten
    assert d.first_time(rec("a", 7)) is True
    assert d.first_time(rec("c", 1)) is False


def test_default_window() -> None:
    q = LogQuery(function="f")
    assert with_default_window(q, NOW).since == NOW - DEFAULT_WINDOW_S
    q = LogQuery(function="f", request_id="r")
    assert with_default_window(q, NOW).since == NOW - REQUEST_WINDOW_S
    q = LogQuery(function="f", request_id="r", since=5.0)
    assert with_default_window(q, NOW) is q


def test_is_report_of() -> None:
    report = {"type": "REPORT", "request_id": "r1"}
    assert is_report_of(report, "r1")
    assert not is_report_of(report, "r2")
    assert not is_report_of(report, None)
    assert not is_report_of({"type": "END", "request_id": "r1"}, "r1")


def test_query_matching() -> None:
    base = {"function": "f", "version": 2, "request_id": "r1", "ts": 100.0}
    assert LogQuery("f").matches(base)
    assert not LogQuery("g").matches(base)
    assert LogQuery("f", version=2).matches(base)
    assert not LogQuery("f", version=1).matches(base)
    assert LogQuery("f", request_id="r1").matches(base)
    assert not LogQuery("f", request_id="r2").matches(base)
    shared = {**base, "request_id": None, "concurrent": ["r2", "r3"]}
    assert LogQuery("f", request_id="r3").matches(shared)
    assert not LogQuery("f", request_id="r1").matches(shared)
    assert LogQuery("f", since=100.0, until=100.0).matches(base)
    assert not LogQuery("f", since=100.5).matches(base)
    assert not LogQuery("f", until=99.5).matches(base)


# -- rendering ----------------------------------------------------------------------------------

TS = datetime(2026, 11, 28, 10, 0, 0, 123000, tzinfo=UTC).timestamp()


def line(**fields: Any) -> dict[str, Any]:
    return {
        "type": "line",
        "ts": TS,
        "function": "f",
        "version": 1,
        "instance": "imagefn-f-abc",
        "request_id": "1a2b3c4d-5e6f-7a8b",
        "stream": "stdout",
        "line": "hello",
        "seq": 1,
        **fields,
    }


def test_format_ts() -> None:
    assert format_ts(TS) == "2026-11-28T10:00:00.123Z"
    assert format_ts(0) == "1970-01-01T00:00:00.000Z"
    assert format_ts("soon") == "soon"
    assert format_ts(None) == "None"
    assert format_ts(1e20) == "1e+20"


def test_render_lines() -> None:
    assert render(line()) == "2026-11-28T10:00:00.123Z  stdout    1a2b3c4d  hello"
    assert render(line(stream="stderr", request_id=None)) == (
        "2026-11-28T10:00:00.123Z  stderr    -         hello"
    )
    assert render(line(request_id=None, concurrent=["a", "b", "c"])) == (
        "2026-11-28T10:00:00.123Z  stdout    (3 req)   hello"
    )
    assert render(line(part=1, last=False)).endswith("  hello  [part 1]")
    assert render(line(part=2, last=True)).endswith("  hello  [part 2, last]")


def test_base64_lines_are_decoded_with_replacement() -> None:
    raw = "caf\u00e9 ".encode() + b"\xff\xfe!"
    record = line(**logrecords.encode_line_text(raw))
    assert record["encoding"] == "base64"
    assert line_text(record) == "caf\u00e9 \ufffd\ufffd!"
    assert render(record).endswith("  caf\u00e9 \ufffd\ufffd!")
    broken = line(line="not base64!!", encoding="base64")
    assert line_text(broken) == "not base64!!"
    assert line_text(line(line=base64.b64encode(b"ok").decode(), encoding="base64")) == "ok"


def test_render_platform_records() -> None:
    head = "2026-11-28T10:00:00.123Z  platform  1a2b3c4d  "
    rid = "1a2b3c4d-5e6f-7a8b"
    start = line(type="START", stream="platform", cold=True)
    assert (
        render(start)
        == head + f"START RequestId: {rid}  Version: 1  Instance: imagefn-f-abc  (cold start)"
    )
    end = line(type="END", stream="platform", status=502, error="UserCodeError", duration_ms=3.0)
    assert render(end) == head + f"END RequestId: {rid}  Status: 502  Error: UserCodeError"
    report = line(
        type="REPORT",
        stream="platform",
        duration_ms=12.34,
        status=200,
        cold=True,
        init_ms=850,
        memory_peak_mb=23.5,
        memory_limit_mb=128,
        lines=4,
    )
    assert render(report) == head + (
        f"REPORT RequestId: {rid}  Duration: 12.3 ms  Status: 200  Cold start  "
        "Init: 850.0 ms  Max memory used: 23.5 MB of 128 MB  Lines: 4"
    )
    warm = {**report, "cold": False, "init_ms": None, "memory_peak_mb": None, "lines": None}
    assert render(warm) == head + (
        f"REPORT RequestId: {rid}  Duration: 12.3 ms  Status: 200  Max memory used: n/a of 128 MB"
    )
    gap = line(
        type="GAP",
        stream="platform",
        request_id=None,
        dropped_lines=12,
        dropped_bytes=3400,
        first_ts=TS,
        last_ts=TS + 2,
    )
    assert render(gap) == (
        "2026-11-28T10:00:00.123Z  platform  -         GAP 12 lines (3400 bytes) of instance "
        "imagefn-f-abc dropped between 2026-11-28T10:00:00.123Z and 2026-11-28T10:00:02.123Z "
        "(the worker's buffer was full while Kafka was slow or away)"
    )


# -- the route, before Kafka is asked ------------------------------------------------------------


async def error_of(resp: Any, status: int, type_name: str) -> str:
    assert resp.status == status, await resp.text()
    assert resp.headers["X-Scf-Error-Type"] == type_name
    message: str = (await resp.json())["error"]["message"]
    return message


async def test_unknown_function_and_version(gw: Gateway) -> None:
    await error_of(await gw.client.get("/v1/functions/nobody/logs"), 404, "FunctionNotFound")
    await gw.deploy(EVENT_SPEC)
    resp = await gw.client.get("/v1/functions/hello/logs", params={"version": "7"})
    await error_of(resp, 404, "VersionNotFound")
    resp = await gw.client.get("/v1/functions/hello/logs", params={"version": "prod"})
    await error_of(resp, 404, "VersionNotFound")


async def test_bad_parameters_are_400_before_anything_else(gw: Gateway) -> None:
    # Checked first: even an unknown function gets the parameter named.
    resp = await gw.client.get("/v1/functions/nobody/logs", params={"since": "later"})
    assert (await error_of(resp, 400, "InvalidRequest")).startswith("since: ")
    resp = await gw.client.get("/v1/functions/nobody/logs", params={"wait_report": "1"})
    assert (await error_of(resp, 400, "InvalidRequest")).startswith("wait_report: ")


@pytest.fixture
async def gateway_with(
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[Any]:
    """``start(settings)``: a gateway over the fakes with other settings."""
    clients: list[TestClient[Any, Any]] = []

    async def start(settings: Settings, reader: Any = None) -> TestClient[Any, Any]:
        redis = FakeRedis()
        monkeypatch.setattr(
            "gateway.app.aioredis",
            types.SimpleNamespace(Redis=types.SimpleNamespace(from_url=lambda url: redis)),
        )
        app = build_app(settings, queue=MemoryQueue(), images=FakeImages())
        if reader is not None:
            app[LOG_READER] = reader
        client = TestClient(TestServer(app), headers=ADMIN_HEADERS)
        await client.start_server()
        clients.append(client)
        resp = await client.put("/v1/functions/hello", json=EVENT_SPEC)
        assert resp.status == 201
        return client

    yield start
    for c in clients:
        await c.close()


async def test_logs_off_is_503(gateway_with: Any) -> None:
    settings = Settings(
        gateway=GATEWAY_SETTINGS.gateway,
        registry=GATEWAY_SETTINGS.registry,
        auth=GATEWAY_SETTINGS.auth,
        kafka=KafkaSettings(bootstrap=""),
    )
    # load_settings turns logs off with an empty bootstrap.
    settings = replace(settings, logs=replace(settings.logs, enabled=False))
    client = await gateway_with(settings)
    msg = await error_of(await client.get("/v1/functions/hello/logs"), 503, "ServiceUnavailable")
    assert msg == "container logs are off on this gateway (IMAGEFN_KAFKA_BOOTSTRAP is empty)"


async def test_unreachable_kafka_is_503(gateway_with: Any) -> None:
    settings = Settings(
        gateway=GATEWAY_SETTINGS.gateway,
        registry=GATEWAY_SETTINGS.registry,
        auth=GATEWAY_SETTINGS.auth,
        kafka=KafkaSettings(bootstrap=f"127.0.0.1:{closed_port()}"),
    )
    client = await gateway_with(settings)
    resp = await client.get("/v1/functions/hello/logs", params={"follow": "1"})
    msg = await error_of(resp, 503, "ServiceUnavailable")
    assert msg.startswith(f"Kafka at {settings.kafka.bootstrap} unavailable: ")


class FailingReader:
    """A reader whose stream gives one backlog record, then fails while following."""

    def __init__(self, failure: Exception) -> None:
        self.failure = failure

    @contextlib.asynccontextmanager
    async def open(self, query: LogQuery, *, now: float | None = None) -> AsyncIterator[Any]:
        yield FailingStream(self.failure)


class FailingStream:
    partition = 0
    unreadable = 0

    def __init__(self, failure: Exception) -> None:
        self.failure = failure
        self.dedupe = SeqDeduper()

    async def backlog(self, limit: int) -> Backlog:
        return Backlog(self, deque([_Kept(0, 10, line())]), 1, False)  # type: ignore[arg-type]

    async def live(self, poll_s: float) -> AsyncIterator[dict[str, Any] | None]:
        raise self.failure
        yield None


@pytest.mark.parametrize(
    ("failure", "kind", "message"),
    [
        (
            ServiceUnavailable("reading the logs from Kafka failed: gone"),
            "ServiceUnavailable",
            "reading the logs from Kafka failed: gone",
        ),
        (RuntimeError("a bug"), "InternalError", "internal error; see the gateway log"),
    ],
)
async def test_a_failure_after_the_answer_began_goes_in_band(
    gateway_with: Any, failure: Exception, kind: str, message: str
) -> None:
    client = await gateway_with(GATEWAY_SETTINGS, FailingReader(failure))
    with capture_logs():
        resp = await client.get("/v1/functions/hello/logs", params={"follow": "1"})
        assert resp.status == 200
        got = [json.loads(x) for x in (await resp.text()).splitlines()]
    assert got[0] == line()
    notice = got[1]
    assert (notice["notice"], notice["message"]) == ("error", message)
    assert notice["error"]["type"] == kind
    assert notice["error"]["request_id"] == resp.headers["X-Request-Id"]
    assert len(got) == 2
    with capture_logs():
        resp = await client.get(
            "/v1/functions/hello/logs",
            params={"follow": "1"},
            headers={"Accept": "text/event-stream"},
        )
        events = list(sse_events((await resp.read()).splitlines(keepends=True)))
    assert [e.event for e in events] == ["message", "notice", "end"]
    assert json.loads(events[2].data) == {"reason": "error"}
