"""workers.logship: frame parsing, line assembly, attribution, platform records, the
bounded buffer with its gap accounting, the sender's retries, and the pool's
drain-before-remove, over the FakeRuntime and a fake Kafka producer."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from types import SimpleNamespace
from typing import Any, cast

import pytest
from aiokafka.errors import KafkaConnectionError, KafkaTimeoutError, UnknownTopicOrPartitionError

from shared import logrecords
from shared.errors import FunctionTimeout
from shared.settings import LogSettings
from workers.forwarder import Forwarder, Response
from workers.logship import (
    ENGINE_FRAGMENT_BYTES,
    QUIET_GRACE_S,
    LogShipper,
    LogSource,
    MiB,
    _Clock,
    _Tail,
)
from workers.pool import ContainerPool
from workers.runtime import ContainerConfig

from .conftest import FAST_WORKER, INSTALLATION, PoolKit
from .fakes import Behaviour, log_frame
from .helpers import eventually, make_invocation, make_record

MS = 1_000_000
T0 = 1_795_000_000 * 1_000_000_000  # a fixed engine time, in ns
SOURCE = LogSource(
    function="fn", version=3, instance="imagefn-fn-abc", concurrency=1, memory_limit_mb=256
)
WEB_SOURCE = dataclasses.replace(SOURCE, concurrency=4)


# -- a fake producer -------------------------------------------------------------------------


class FakeBatch:
    def __init__(self, max_records: int) -> None:
        self.records: list[tuple[int | None, bytes | None, bytes | None]] = []
        self.closed = False
        self.max_records = max_records

    def append(self, *, timestamp: int | None, key: bytes | None, value: bytes | None) -> Any:
        if self.closed or len(self.records) >= self.max_records:
            return None
        self.records.append((timestamp, key, value))
        return object()

    def close(self) -> None:
        self.closed = True


class FakeProducer:
    """Kafka as the sender sees it. ``down``: every batch fails (after ``fail_after_s``);
    ``lose_acks``: that many batches are stored but reported failed (a lost ack, so the
    retry duplicates them); ``unknown_topic``: the topic is missing until ``ensure``;
    ``topic_lost``: a broker that restarted without its topic -- it acknowledges
    batches and keeps nothing -- until ``ensure``."""

    def __init__(self) -> None:
        self.partitions = {0, 1}
        self.delivered: list[tuple[int, list[tuple[int | None, bytes | None, bytes | None]]]] = []
        self.down = False
        self.fail_after_s = 0.01
        self.lose_acks = 0
        self.unknown_topic = False
        self.topic_lost = False
        # A check of the topic that finds it gone recreates it first (as a broker
        # asked about a topic by name may do): only the offsets tell.
        self.recreate_when_asked = False
        self.swallowed = 0
        # Per partition, the log's end offset.
        self.ends: dict[int, int] = {}
        self.start_failures = 0
        self.starts = 0
        self.stopped = False
        self.max_records = 100_000

    async def start(self) -> None:
        self.starts += 1
        if self.start_failures:
            self.start_failures -= 1
            raise KafkaConnectionError("no broker")

    async def stop(self) -> None:
        self.stopped = True

    async def partitions_for(self, topic: str) -> set[int]:
        if self.unknown_topic:
            raise UnknownTopicOrPartitionError()
        return set(self.partitions)

    async def topic_exists(self, topic: str) -> bool:
        if self.topic_lost and self.recreate_when_asked:
            self.topic_lost = False
            self.ends = {}
        return not (self.unknown_topic or self.topic_lost)

    def lose_topic(self) -> None:
        """The broker restarted empty."""
        self.topic_lost = True
        self.ends = {}

    def create_batch(self) -> FakeBatch:
        return FakeBatch(self.max_records)

    async def send_batch(self, batch: Any, topic: str, *, partition: int) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        records = list(cast(FakeBatch, batch).records)
        if self.down:
            asyncio.get_running_loop().call_later(
                self.fail_after_s, fut.set_exception, KafkaTimeoutError()
            )
        elif self.topic_lost:
            # What the in-memory test broker does after a restart: acknowledge, keep
            # nothing, report offset 0.
            self.swallowed += len(records)
            fut.set_result(SimpleNamespace(offset=0))
        elif self.lose_acks:
            self.lose_acks -= 1
            self.append(partition, records)
            fut.set_exception(KafkaTimeoutError())
        else:
            fut.set_result(SimpleNamespace(offset=self.append(partition, records)))
        return fut

    def append(self, partition: int, records: list[Any]) -> int:
        offset = self.ends.get(partition, 0)
        self.ends[partition] = offset + len(records)
        self.delivered.append((partition, records))
        return offset

    def records(self) -> list[dict[str, Any]]:
        return [logrecords.loads(v or b"") for _, batch in self.delivered for _, _, v in batch]

    def raw(self) -> list[tuple[int, int | None, bytes | None, dict[str, Any]]]:
        return [
            (p, ts, k, logrecords.loads(v or b""))
            for p, batch in self.delivered
            for ts, k, v in batch
        ]


def deduped(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What a reader keeps: the first of each (instance, seq)."""
    seen: set[tuple[str, int]] = set()
    out = []
    for r in records:
        key = (r["instance"], r["seq"])
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def lines_of(records: list[dict[str, Any]]) -> list[str]:
    return [r["line"] for r in records if r["type"] == "line"]


@dataclasses.dataclass
class Kit:
    shipper: LogShipper
    producer: FakeProducer
    ensured: list[float]


@pytest.fixture
async def make_shipper(kit: PoolKit) -> AsyncIterator[Callable[..., Kit]]:
    kits: list[Kit] = []

    def make(start: bool = True, **settings: Any) -> Kit:
        producer = FakeProducer()
        ensured: list[float] = []

        async def ensure() -> None:
            ensured.append(time.monotonic())
            if producer.topic_lost:
                producer.ends = {}
            producer.unknown_topic = producer.topic_lost = False

        shipper = LogShipper(
            LogSettings(**{"drain_timeout_s": 2.0, **settings}),
            kit.runtime,
            worker="w-test",
            topic="t.logs",
            producer_factory=lambda: producer,
            ensure_topic=ensure,
            memory_peak=lambda cid: 50 * MiB,
        )
        if start:
            shipper.start()
        k = Kit(shipper, producer, ensured)
        kits.append(k)
        return k

    yield make
    for k in kits:
        await k.shipper.close(timeout_s=1.0)


def tail_for(k: Kit, source: LogSource = SOURCE, cid: str = "c1") -> _Tail:
    """An instance's log state driven by hand (no follower task)."""
    return _Tail(k.shipper, cid, source)


def buffered(k: Kit) -> list[dict[str, Any]]:
    return [logrecords.loads(v) for q in k.shipper.buffer.queues.values() for _, v in q.items]


def frames(*lines: tuple[int, int, bytes]) -> bytes:
    """(stream, ts_ns, payload) frames, concatenated."""
    return b"".join(log_frame(p, stream=s, ts_ns=ts) for s, ts, p in lines)


# -- frames and lines ------------------------------------------------------------------------


def test_engine_timestamps_parse_to_nanoseconds() -> None:
    c = _Clock()
    base = 1_795_859_870 * 1_000_000_000
    assert c.ns(b"2026-11-28T09:57:50.382351862Z") == base + 382_351_862
    # The engine trims trailing zeros (RFC 3339 "Nano"): a shorter fraction scales up.
    assert c.ns(b"2026-11-28T09:57:50.5Z") == base + 500_000_000
    assert c.ns(b"2026-11-28T09:57:50Z") == base
    assert c.ns(b"2026-11-28T09:57:51.000000001Z") == base + 1_000_000_001
    assert c.ns(b"2026-11-28T11:57:50.25+02:00") == base + 250_000_000
    assert c.ns(b"not a timestamp at all") is None


@pytest.mark.parametrize("step", [1, 3, 7, 8, 9, 64, 10_000])
async def test_frames_split_anywhere_give_the_same_lines(
    make_shipper: Callable[..., Kit], step: int
) -> None:
    k = make_shipper(start=False)
    t = tail_for(k)
    data = frames(*[(1 + i % 2, T0 + i * MS, f"line {i}\n".encode()) for i in range(50)])
    for pos in range(0, len(data), step):
        t.feed(data[pos : pos + step])
    records = buffered(k)
    assert [r["line"] for r in records] == [f"line {i}" for i in range(50)]
    assert [r["stream"] for r in records] == ["stdout", "stderr"] * 25
    assert [r["seq"] for r in records] == list(range(1, 51))
    assert records[7]["ts"] == pytest.approx((T0 + 7 * MS) / 1e9)
    assert all(
        (r["function"], r["version"], r["instance"], r["worker"], r["request_id"])
        == ("fn", 3, "imagefn-fn-abc", "w-test", None)
        for r in records
    )
    # Kafka record timestamps are the lines' engine times, in milliseconds.
    [q] = k.shipper.buffer.queues.values()
    assert [ts for ts, _ in q.items][:3] == [T0 // MS, T0 // MS + 1, T0 // MS + 2]


async def test_engine_split_messages_are_joined_per_stream(
    make_shipper: Callable[..., Kit],
) -> None:
    """The engine cuts a message longer than its 16 KiB buffer into fragments of exactly
    16 KiB that share the message's timestamp, then the rest (with its newline from
    json-file, without from local); stdout and stderr fragments interleave."""
    k = make_shipper(start=False, max_line_bytes=64 * 1024)
    t = tail_for(k)
    a = b"a" * ENGINE_FRAGMENT_BYTES  # two identical fragments: neither is a replay
    e = b"e" * ENGINE_FRAGMENT_BYTES
    t.feed(
        frames(
            (1, T0, a),
            (2, T0 + 1, e),
            (1, T0, a),
            (2, T0 + 1, b"err-end"),  # local: the last fragment has no newline
            (1, T0, b"tail\n"),  # json-file: it has
            (1, T0 + 4, b"next\n"),
        )
    )
    records = buffered(k)
    assert [(r["stream"], r["line"]) for r in records] == [
        ("stderr", "e" * ENGINE_FRAGMENT_BYTES + "err-end"),
        ("stdout", "a" * 2 * ENGINE_FRAGMENT_BYTES + "tail"),
        ("stdout", "next"),
    ]
    assert records[1]["ts"] == pytest.approx(T0 / 1e9)
    assert "part" not in records[1]
    # A pending message is also complete once a frame of another message (another
    # timestamp) arrives on its stream.
    t.feed(frames((1, T0 + 5, a), (1, T0 + 6, b"after\n")))
    assert [r["line"][:3] for r in buffered(k)[3:]] == ["aaa", "aft"]
    assert t.replayed == 0


async def test_long_lines_become_parts_as_they_fill(make_shipper: Callable[..., Kit]) -> None:
    k = make_shipper(start=False, max_line_bytes=1000)
    t = tail_for(k)
    t.feed(frames((1, T0, b"x" * 2500 + b"\n")))
    assert [(r["part"], r["last"]) for r in buffered(k)] == [(1, False), (2, False), (3, True)]
    assert "".join(r["line"] for r in buffered(k)) == "x" * 2500
    # A message in engine fragments: parts go out as each fragment fills them, so an
    # endless line never holds more than max_line_bytes.
    y = b"y" * ENGINE_FRAGMENT_BYTES
    t.feed(frames((1, T0 + MS, y)))
    assert len(buffered(k)) == 3 + 16
    t.feed(frames((1, T0 + MS, y)))
    assert len(buffered(k)) == 3 + 32
    t.feed(frames((1, T0 + MS, b"z")))
    records = buffered(k)[3:]
    assert [r["part"] for r in records] == list(range(1, 34))
    assert [r["last"] for r in records] == [False] * 32 + [True]
    assert "".join(r["line"] for r in records) == "y" * 2 * ENGINE_FRAGMENT_BYTES + "z"
    assert max(len(r["line"]) for r in buffered(k)) <= 1000
    assert all(r["ts"] == pytest.approx((T0 + MS) / 1e9) for r in records)


async def test_parts_do_not_split_utf8_characters(make_shipper: Callable[..., Kit]) -> None:
    k = make_shipper(start=False, max_line_bytes=100)
    t = tail_for(k)
    text = "ab" + "€" * 60  # 3 bytes each: a cut at 100 bytes would split one
    t.feed(frames((1, T0, text.encode() + b"\n")))
    records = buffered(k)
    assert len(records) == 2
    assert all("encoding" not in r for r in records)
    assert "".join(r["line"] for r in records) == text
    assert all(len(r["line"].encode()) <= 100 for r in records)


async def test_binary_output_travels_base64_byte_exact(make_shipper: Callable[..., Kit]) -> None:
    k = make_shipper(start=False, max_line_bytes=8)
    t = tail_for(k)
    raw = bytes(range(256)).replace(b"\n", b"")
    t.feed(frames((1, T0, b"\xff\xfe plain? no\n"), (2, T0 + 1, raw + b"\n")))
    records = buffered(k)
    first = [r for r in records if r["stream"] == "stdout"]
    assert first[0]["encoding"] == "base64"
    assert b"".join(logrecords.line_bytes(r) for r in first) == b"\xff\xfe plain? no"
    second = [r for r in records if r["stream"] == "stderr"]
    assert b"".join(logrecords.line_bytes(r) for r in second) == raw
    assert second[-1]["last"] is True
    assert logrecords.line_bytes(second[0]) == raw[:8]  # ASCII control bytes: valid text
    assert any(r.get("encoding") == "base64" for r in second)
    high = next(r for r in second if r.get("encoding") == "base64")
    assert base64.b64decode(high["line"]) == logrecords.line_bytes(high)


async def test_replayed_frames_are_dropped_per_stream(make_shipper: Callable[..., Kit]) -> None:
    """After a log rotation the engine may send output again; each stream's timestamps
    only increase, so anything not newer than the stream's last frame is a replay."""
    k = make_shipper(start=False)
    t = tail_for(k)
    t.feed(frames(*[(1, T0 + i * MS, f"o{i}\n".encode()) for i in range(5)]))
    t.feed(frames((2, T0 + 2 * MS, b"e0\n")))  # stderr has its own order
    t.feed(frames(*[(1, T0 + i * MS, f"o{i}\n".encode()) for i in range(2, 8)]))
    # Two different lines the engine stamped alike are both kept.
    t.feed(frames((1, T0 + 9 * MS, b"same-ts-a\n"), (1, T0 + 9 * MS, b"same-ts-b\n")))
    assert lines_of(buffered(k)) == [
        *[f"o{i}" for i in range(5)],
        "e0",
        "o5",
        "o6",
        "o7",
        "same-ts-a",
        "same-ts-b",
    ]
    assert t.replayed == 3
    assert t.needs_catchup(rotate_bytes=1 << 40)
    assert t.resume_from() == T0 + 2 * MS  # the stream furthest behind (stderr)
    # A replay that reaches the last timestamp drops what was taken there, no more.
    t.feed(frames((1, T0 + 7 * MS, b"o7\n"), (1, T0 + 9 * MS, b"same-ts-a\n")))
    t.feed(frames((1, T0 + 9 * MS, b"same-ts-b\n"), (1, T0 + 9 * MS, b"same-ts-c\n")))
    # A resumed read starts at the last timestamp, inclusive.
    t.new_stream()
    t.feed(frames((1, T0 + 9 * MS, b"same-ts-a\n"), (1, T0 + 9 * MS, b"same-ts-b\n")))
    t.feed(frames((1, T0 + 9 * MS, b"same-ts-c\n"), (1, T0 + 10 * MS, b"new\n")))
    assert lines_of(buffered(k))[-2:] == ["same-ts-c", "new"]
    assert t.replayed == 3 + 3 + 3  # o7, a, b replayed; a, b, c of the resumed read


async def test_unterminated_output_is_a_line(make_shipper: Callable[..., Kit]) -> None:
    k = make_shipper(start=False)
    t = tail_for(k)
    # Output without a newline, flushed by the engine when the process exits.
    t.feed(frames((1, T0, b"done\n"), (1, T0 + MS, b"no newline at exit")))
    assert lines_of(buffered(k)) == ["done", "no newline at exit"]
    # A fragment waiting for the rest of its message when the stream ends.
    t.feed(frames((1, T0 + 2 * MS, b"f" * ENGINE_FRAGMENT_BYTES)))
    assert len(buffered(k)) == 2
    t.finish()
    assert lines_of(buffered(k))[2] == "f" * ENGINE_FRAGMENT_BYTES


# -- attribution -----------------------------------------------------------------------------


async def test_event_windows_run_from_one_start_to_the_next(
    make_shipper: Callable[..., Kit], monkeypatch: pytest.MonkeyPatch
) -> None:
    k = make_shipper(start=False)
    s = k.shipper
    now = [T0]
    monkeypatch.setattr(time, "time_ns", lambda: now[0])
    t = tail_for(k)
    s._tails["c1"] = t
    t.feed(frames((1, T0 - 5 * MS, b"init\n")))
    now[0] = T0
    s.request_started("c1", "r1", cold=True, init_ms=12.5)
    now[0] = T0 + 10 * MS
    s.request_ended("c1", "r1", status=200, error=None)
    now[0] = T0 + 20 * MS
    s.request_started("c1", "r2", cold=False, init_ms=None)
    t.feed(
        frames(
            (1, T0 + 1 * MS, b"during r1\n"),
            (1, T0 + 15 * MS, b"after r1 answered\n"),  # still r1: before r2 started
            (2, T0 + 20 * MS, b"r2 begins\n"),
            (1, T0 + 30 * MS, b"r2 late\n"),
        )
    )
    owners = {r["line"]: r["request_id"] for r in buffered(k) if r["type"] == "line"}
    assert owners == {
        "init": None,
        "during r1": "r1",
        "after r1 answered": "r1",
        "r2 begins": "r2",
        "r2 late": "r2",
    }


async def test_concurrent_requests_share_lines_only_when_alone(
    make_shipper: Callable[..., Kit], monkeypatch: pytest.MonkeyPatch
) -> None:
    k = make_shipper(start=False)
    s = k.shipper
    now = [T0]
    monkeypatch.setattr(time, "time_ns", lambda: now[0])
    t = tail_for(k, WEB_SOURCE)
    s._tails["c1"] = t
    s.request_started("c1", "a", cold=False, init_ms=None)
    now[0] = T0 + 10 * MS
    s.request_started("c1", "b", cold=False, init_ms=None)
    now[0] = T0 + 20 * MS
    s.request_ended("c1", "a", status=200, error=None)
    now[0] = T0 + 30 * MS
    s.request_ended("c1", "b", status=200, error=None)
    t.feed(
        frames(
            (1, T0 - MS, b"before"),
            (1, T0 - MS + 1, b"\n"),
            (1, T0 + 5 * MS, b"only a\n"),
            (1, T0 + 15 * MS, b"a and b\n"),
            (1, T0 + 25 * MS, b"only b\n"),
            (1, T0 + 35 * MS, b"nobody\n"),
        )
    )
    lines = {r["line"]: r for r in buffered(k) if r["type"] == "line"}
    assert lines["before"]["request_id"] is None and "concurrent" not in lines["before"]
    assert lines["only a"]["request_id"] == "a"
    assert lines["a and b"]["request_id"] is None
    assert lines["a and b"]["concurrent"] == ["a", "b"]
    assert lines["only b"]["request_id"] == "b"
    assert lines["nobody"]["request_id"] is None and "concurrent" not in lines["nobody"]
    q = logrecords.LogQuery(function="fn", request_id="b")
    assert [r["line"] for r in lines.values() if q.matches(r)] == ["a and b", "only b"]


async def test_end_is_placed_by_the_next_request_or_quiet(
    make_shipper: Callable[..., Kit], monkeypatch: pytest.MonkeyPatch
) -> None:
    """One request at a time: output stamped after the response is still the request's
    (the engine stamps a burst's tail when it reads it, after the response), so END goes
    after it -- placed by the next request's output, or by quiet. Several at once: a
    line stamped after the end is not the request's, so it places END at once."""
    k = make_shipper(start=False)
    s = k.shipper
    now = [T0]
    monkeypatch.setattr(time, "time_ns", lambda: now[0])
    t = tail_for(k)
    s._tails["c1"] = t
    s.request_started("c1", "r1", cold=False, init_ms=None)
    now[0] = T0 + 10 * MS
    s.request_ended("c1", "r1", status=200, error=None)
    # A burst's tail, read after the response.
    t.feed(frames(*[(1, T0 + 9 * MS + i * 10_000, f"b{i}\n".encode()) for i in range(300)]))
    assert [r["type"] for r in buffered(k)] == ["START"] + ["line"] * 300
    now[0] = T0 + 50 * MS
    s.request_started("c1", "r2", cold=False, init_ms=None)
    t.feed(frames((1, T0 + 51 * MS, b"r2 says\n")))
    kinds = [(r["type"], r.get("line", ""), r["request_id"]) for r in buffered(k)]
    assert kinds == [
        ("START", "", "r1"),
        *[("line", f"b{i}", "r1") for i in range(300)],
        ("END", "", "r1"),
        ("REPORT", "", "r1"),
        ("START", "", "r2"),
        ("line", "r2 says", "r2"),
    ]
    assert buffered(k)[302]["lines"] == 300
    # No next request: quiet places it.
    now[0] = T0 + 60 * MS
    s.request_ended("c1", "r2", status=200, error=None)
    t.feed(frames((1, T0 + 61 * MS, b"r2 after\n")))
    assert buffered(k)[-1]["type"] == "line"
    t.tick(T0 + 61 * MS + 1, time.monotonic(), int(5e9))  # not quiet yet
    assert buffered(k)[-1]["type"] == "line"
    t.tick(T0 + 60 * MS + int(QUIET_GRACE_S * 1e9), time.monotonic() + QUIET_GRACE_S, int(5e9))
    assert [r["type"] for r in buffered(k)[-3:]] == ["line", "END", "REPORT"]

    # Several requests at once.
    k2 = make_shipper(start=False)
    w = tail_for(k2, WEB_SOURCE, cid="c2")
    k2.shipper._tails["c2"] = w
    now[0] = T0
    k2.shipper.request_started("c2", "a", cold=False, init_ms=None)
    now[0] = T0 + 10 * MS
    k2.shipper.request_ended("c2", "a", status=200, error=None)
    w.feed(frames((1, T0 + 5 * MS, b"a's\n"), (1, T0 + 11 * MS, b"nobody's\n")))
    kinds = [(r["type"], r.get("line"), r["request_id"]) for r in buffered(k2)]
    assert kinds == [
        ("START", None, "a"),
        ("line", "a's", "a"),
        ("END", None, "a"),
        ("REPORT", None, "a"),
        ("line", "nobody's", None),
    ]


# -- platform records, with followers --------------------------------------------------------


async def start_container(kit: PoolKit, *, logs: list[str] | None = None) -> str:
    kit.runtime.queue(Behaviour(logs=logs if logs is not None else ["booting"]))
    cid = await kit.runtime.create(CONFIG)
    await kit.runtime.start(cid)
    return cid


CONFIG = ContainerConfig(
    name="imagefn-fn-abc",
    image="img",
    command=None,
    args=None,
    env={},
    labels={},
    memory_mb=256,
    cpus=1.0,
    pids_limit=10,
    nofile_limit=10,
    tmp_mb=16,
    network="imagefn-fn",
)


def of_type(records: list[dict[str, Any]], *types: str) -> list[dict[str, Any]]:
    return [r for r in records if r["type"] in types]


async def test_start_end_report_frame_each_request(
    kit: PoolKit, make_shipper: Callable[..., Kit]
) -> None:
    k = make_shipper()
    cid = await start_container(kit)
    k.shipper.follow(cid, SOURCE)
    k.shipper.request_started(cid, "r1", cold=True, init_ms=123.4567)
    kit.runtime.write_log(cid, "working", "still working")
    kit.runtime.write_log(cid, "oops", stream=2)
    await asyncio.sleep(0.02)
    k.shipper.request_ended(cid, "r1", status=200, error=None)
    await eventually(lambda: len(of_type(k.producer.records(), "REPORT")) == 1)
    k.shipper.request_started(cid, "r2", cold=False, init_ms=None)
    kit.runtime.write_log(cid, "second")
    k.shipper.request_ended(cid, "r2", status=502, error="UserCodeError")
    await eventually(lambda: len(of_type(k.producer.records(), "REPORT")) == 2)

    records = k.producer.records()
    assert [(r["type"], r.get("line"), r["request_id"]) for r in records] == [
        ("line", "booting", None),
        ("START", None, "r1"),
        ("line", "working", "r1"),
        ("line", "still working", "r1"),
        ("line", "oops", "r1"),
        ("END", None, "r1"),
        ("REPORT", None, "r1"),
        ("START", None, "r2"),
        ("line", "second", "r2"),
        ("END", None, "r2"),
        ("REPORT", None, "r2"),
    ]
    assert [r["seq"] for r in records] == list(range(1, 12))
    assert all(r["stream"] == "platform" for r in of_type(records, "START", "END", "REPORT"))
    start1, end1, report1 = of_type(records, "START", "END", "REPORT")[:3]
    assert start1["cold"] is True
    assert end1["status"] == 200 and end1["error"] is None
    assert end1["duration_ms"] >= 20
    assert end1["ts"] - start1["ts"] == pytest.approx(end1["duration_ms"] / 1000, abs=1e-3)
    assert report1 == {
        **{f: report1[f] for f in ("ts", "seq", "duration_ms")},
        "type": "REPORT",
        "function": "fn",
        "version": 3,
        "instance": "imagefn-fn-abc",
        "worker": "w-test",
        "request_id": "r1",
        "stream": "platform",
        "status": 200,
        "error": None,
        "cold": True,
        "init_ms": 123.457,
        "memory_peak_mb": 50.0,
        "memory_limit_mb": 256,
        "lines": 3,
    }
    report2 = of_type(records, "REPORT")[1]
    assert (report2["cold"], report2["status"], report2["error"], report2["lines"]) == (
        False,
        502,
        "UserCodeError",
        1,
    )
    assert "init_ms" not in report2
    # Every record is keyed by the function and stamped with its own time.
    assert {(p, key) for p, _, key, _ in k.producer.raw()} == {
        (k.shipper._partition_of[b"fn"], b"fn")
    }
    assert all(ts == round(r["ts"] * 1000) for _, ts, _, r in k.producer.raw())


async def test_a_shipper_taking_over_uses_the_given_times_since_and_seqs(
    kit: PoolKit, make_shipper: Callable[..., Kit]
) -> None:
    # What a restarted shipper process is told (workers/logship_proxy.py): follow from
    # a time on, seqs from a number on, and requests timed by the worker.
    k = make_shipper()
    cid = await start_container(kit, logs=["before the takeover"])
    since = time.time_ns()
    await asyncio.sleep(0.01)
    kit.runtime.write_log(cid, "after the takeover")
    k.shipper.follow(cid, SOURCE, since_ns=since, seq_from=1000)
    start_ns = time.time_ns() - 50 * MS
    k.shipper.request_started(cid, "r1", cold=False, init_ms=None, at_ns=start_ns)
    k.shipper.request_ended(cid, "r1", status=200, error=None, at_ns=start_ns + 7 * MS)
    await eventually(lambda: len(of_type(k.producer.records(), "REPORT")) == 1)
    records = k.producer.records()
    assert [r.get("line") for r in of_type(records, "line")] == ["after the takeover"]
    assert kit.runtime.log_reads[0] == (cid, True, since)
    assert [r["seq"] for r in records] == list(range(1001, 1001 + len(records)))
    start, end = of_type(records, "START", "END")
    assert start["ts"] == pytest.approx(start_ns / 1e9)
    assert end["duration_ms"] == pytest.approx(7.0)


async def test_end_waits_for_the_output_written_before_it(
    kit: PoolKit, make_shipper: Callable[..., Kit]
) -> None:
    """Output the engine stamped before the request's end but which reaches the shipper
    after the pool reported the end still goes before END."""
    k = make_shipper()
    cid = await start_container(kit, logs=[])
    k.shipper.follow(cid, SOURCE)
    k.shipper.request_started(cid, "r1", cold=False, init_ms=None)
    written = time.time_ns()
    await asyncio.sleep(0.002)
    k.shipper.request_ended(cid, "r1", status=200, error=None)
    await asyncio.sleep(QUIET_GRACE_S / 3)
    # Arrives late (a slow engine), stamped before the end.
    kit.runtime.write_log(cid, *[f"late {i}" for i in range(3)], ts_ns=written)
    await eventually(lambda: len(of_type(k.producer.records(), "REPORT")) == 1)
    types = [(r["type"], r.get("line")) for r in k.producer.records()]
    assert types == [
        ("START", None),
        ("line", "late 0"),
        ("line", "late 1"),
        ("line", "late 2"),
        ("END", None),
        ("REPORT", None),
    ]


async def test_the_next_requests_output_places_end_at_once(
    kit: PoolKit, make_shipper: Callable[..., Kit]
) -> None:
    k = make_shipper()
    cid = await start_container(kit, logs=[])
    k.shipper.follow(cid, SOURCE)
    k.shipper.request_started(cid, "r1", cold=False, init_ms=None)
    kit.runtime.write_log(cid, "in r1")
    k.shipper.request_ended(cid, "r1", status=200, error=None)
    await asyncio.sleep(0.002)
    kit.runtime.write_log(cid, "after r1's answer")
    k.shipper.request_started(cid, "r2", cold=False, init_ms=None)
    kit.runtime.write_log(cid, "in r2")
    # Well within the quiet grace: r2's output shows everything of r1 was read.
    await eventually(lambda: len(k.producer.records()) == 7, timeout_s=QUIET_GRACE_S * 0.8)
    assert [(r["type"], r["request_id"]) for r in k.producer.records()] == [
        ("START", "r1"),
        ("line", "r1"),
        ("line", "r1"),  # the window rule: written after r1 answered, still r1's
        ("END", "r1"),
        ("REPORT", "r1"),
        ("START", "r2"),
        ("line", "r2"),
    ]


# -- the buffer and gaps ---------------------------------------------------------------------


async def test_full_buffer_drops_lines_and_reports_them_in_place(
    kit: PoolKit, make_shipper: Callable[..., Kit]
) -> None:
    k = make_shipper(buffer_mb=1)
    k.producer.down = True
    cid = await start_container(kit, logs=[])
    k.shipper.follow(cid, SOURCE)
    k.shipper.request_started(cid, "r1", cold=False, init_ms=None)
    t0 = time.time_ns()
    kit.runtime.write_log(cid, *[f"first {i:05d} " + "." * 100 for i in range(10_000)], ts_ns=t0)
    await eventually(lambda: k.shipper._tails[cid].gap is not None)
    await eventually(lambda: k.shipper._tails[cid].lines == 10_000)
    assert k.shipper.buffer.used <= k.shipper.buffer.limit
    assert k.producer.records() == []
    k.producer.down = False
    await eventually(lambda: k.shipper.gaps == 1, timeout_s=5)
    kit.runtime.write_log(cid, "second 0", "second 1")
    k.shipper.request_ended(cid, "r1", status=200, error=None)
    await eventually(lambda: len(of_type(k.producer.records(), "REPORT")) == 1, timeout_s=5)

    records = deduped(k.producer.records())
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    [gap] = of_type(records, "GAP")
    kept = [r["line"] for r in records if r["type"] == "line" and r["line"].startswith("first")]
    assert kept == sorted(kept) and 1000 < len(kept) < 10_000
    numbers = {int(line.split()[1]) for line in kept}
    dropped = [i for i in range(10_000) if i not in numbers]
    # Every line is either shipped or counted: none vanished silently.
    assert gap["dropped_lines"] == len(dropped) == 10_000 - len(kept)
    assert gap["dropped_bytes"] == len(dropped) * len("first 00000 " + "." * 100)
    assert gap["first_ts"] == pytest.approx((t0 + dropped[0] * 1000) / 1e9)
    assert gap["last_ts"] == pytest.approx((t0 + dropped[-1] * 1000) / 1e9)
    assert gap["request_id"] == "r1" and gap["stream"] == "platform"
    # The GAP sits where the lines went missing: after the kept ones, before what followed.
    order = [r["type"] if r["type"] != "line" else r["line"].split()[0] for r in records]
    gi = order.index("GAP")
    assert set(order[:gi]) == {"START", "first"} and order[gi + 1 :] == [
        "second",
        "second",
        "END",
        "REPORT",
    ]
    report = of_type(records, "REPORT")[0]
    assert report["lines"] == len(kept) + 2
    assert report["dropped_lines"] == len(dropped)
    assert k.shipper.dropped_lines == len(dropped)


async def test_platform_records_use_a_reserve_and_are_counted_beyond_it(
    make_shipper: Callable[..., Kit], monkeypatch: pytest.MonkeyPatch
) -> None:
    k = make_shipper(start=False, buffer_mb=1)
    s = k.shipper
    t = tail_for(k)
    s._tails["c1"] = t
    # Fill the line buffer exactly: lines are refused from here on.
    t.feed(frames(*[(1, T0 + i, b"x" * 200 + b"\n") for i in range(10_000)]))
    assert s.buffer.used <= s.buffer.limit
    lines_kept = len(buffered(k))
    # Platform records still fit, in the reserve; first the pending GAP goes in.
    s.request_started("c1", "r1", cold=False, init_ms=None)
    t.emit_due(1 << 62)
    types = [r["type"] for r in buffered(k)[lines_kept:]]
    assert types == ["GAP", "START"]
    # A flood of invocations exhausts the reserve: the rest is counted, not lost.
    for i in range(2_000):
        s.request_started("c1", f"x{i}", cold=False, init_ms=None)
        s.request_ended("c1", f"x{i}", status=200, error=None)
    t.emit_due(1 << 62)
    assert s.buffer.used <= s.buffer.hard
    gap = t.gap
    assert gap is not None and gap.platform > 0
    placed = len(of_type(buffered(k), "START", "END", "REPORT"))
    assert placed + gap.platform == 1 + 2_000 * 3
    t.finish()  # the stream's end puts the GAP in regardless
    assert of_type(buffered(k), "GAP")[-1]["dropped_platform"] == gap.platform


# -- the sender ------------------------------------------------------------------------------


async def test_failed_batches_are_retried_in_order(
    kit: PoolKit, make_shipper: Callable[..., Kit]
) -> None:
    k = make_shipper(batch_records=50)
    k.producer.lose_acks = 3  # stored, but the sender never hears so: it sends again
    cid = await start_container(kit, logs=[])
    k.shipper.follow(cid, SOURCE)
    kit.runtime.write_log(cid, *[f"l{i}" for i in range(500)])
    await eventually(lambda: k.shipper.shipped == 500, timeout_s=5)
    raw = k.producer.records()
    assert len(raw) > 500  # duplicates of the unacknowledged batches
    records = deduped(raw)
    assert lines_of(records) == [f"l{i}" for i in range(500)]
    assert [r["seq"] for r in records] == list(range(1, 501))
    # Per batch, never more than batch_records.
    assert max(len(b) for _, b in k.producer.delivered) <= 50
    assert k.shipper.buffer.used == 0


@pytest.mark.parametrize("recreated_when_asked", [False, True])
async def test_records_a_broker_swallowed_are_sent_again(
    kit: PoolKit, make_shipper: Callable[..., Kit], recreated_when_asked: bool
) -> None:
    """A broker that restarted without its topic acknowledges writes and keeps nothing.
    Records leave the buffer only once the topic was seen to exist after their
    acknowledgement, and an acknowledgement at an offset lower than before means the
    log was reset: either way they are sent again, in order."""
    k = make_shipper()
    k.producer.recreate_when_asked = recreated_when_asked
    cid = await start_container(kit, logs=[])
    k.shipper.follow(cid, SOURCE)
    kit.runtime.write_log(cid, *[f"kept {i}" for i in range(100)])
    await eventually(lambda: k.shipper.shipped == 100)
    k.producer.lose_topic()
    kit.runtime.write_log(cid, *[f"again {i}" for i in range(100)])
    await eventually(lambda: k.producer.swallowed >= 100)
    await eventually(lambda: k.shipper.shipped == 200, timeout_s=3)
    assert not k.producer.topic_lost
    records = deduped(k.producer.records())
    assert lines_of(records) == [f"kept {i}" for i in range(100)] + [
        f"again {i}" for i in range(100)
    ]
    assert [r["seq"] for r in records] == list(range(1, 201))
    assert k.shipper.buffer.used == 0


async def test_kafka_unreachable_at_start_then_missing_topic(
    kit: PoolKit, make_shipper: Callable[..., Kit]
) -> None:
    k = make_shipper(start=False)
    k.producer.start_failures = 2
    k.producer.unknown_topic = True
    k.shipper.start()
    cid = await start_container(kit, logs=["hello"])
    k.shipper.follow(cid, SOURCE)  # following does not wait for Kafka
    await eventually(lambda: k.shipper._tails[cid].lines == 1)
    await eventually(lambda: lines_of(k.producer.records()) == ["hello"], timeout_s=5)
    assert k.producer.starts == 3
    assert k.ensured  # the topic was created once Kafka answered


async def test_close_flushes_and_is_bounded_when_kafka_is_away(
    kit: PoolKit, make_shipper: Callable[..., Kit]
) -> None:
    k = make_shipper()
    cid = await start_container(kit, logs=[])
    k.shipper.follow(cid, SOURCE)
    k.shipper.request_started(cid, "r1", cold=False, init_ms=None)
    kit.runtime.write_log(cid, "a", "b")
    await eventually(lambda: k.shipper._tails[cid].lines == 2)
    await k.shipper.close(timeout_s=2)
    records = k.producer.records()
    # The request that never ended gets its END from the shutdown.
    assert [r["type"] for r in records] == ["START", "line", "line", "END", "REPORT"]
    assert of_type(records, "END")[0]["error"] == "WorkerShutdown"
    assert k.producer.stopped

    k2 = make_shipper()
    k2.producer.down = True
    k2.producer.fail_after_s = 30
    cid2 = await start_container(kit, logs=["never shipped"])
    k2.shipper.follow(cid2, SOURCE)
    await eventually(lambda: k2.shipper._tails[cid2].lines == 1)
    started = time.monotonic()
    await k2.shipper.close(timeout_s=0.5)
    assert time.monotonic() - started < 3
    assert k2.producer.records() == []


# -- the pool --------------------------------------------------------------------------------


@pytest.fixture
async def logged_pool(
    kit: PoolKit, make_shipper: Callable[..., Kit]
) -> AsyncIterator[tuple[PoolKit, Kit]]:
    k = make_shipper()
    kit.pool = ContainerPool(
        kit.runtime,
        cast(Forwarder, kit.forwarder),
        FAST_WORKER,
        FAST_WORKER.worker_id,
        INSTALLATION,
        kit.images,
        logs=k.shipper,
    )
    yield kit, k
    await kit.pool.shutdown(timeout_s=2)


async def test_pool_ships_each_invocation_and_drains_before_removal(
    logged_pool: tuple[PoolKit, Kit],
) -> None:
    kit, k = logged_pool
    record = make_record("fn", memory_mb=256)

    async def chatty(port: int, inv: Any, timeout_s: float) -> Response:
        cid = kit.runtime.by_port(port).id
        kit.runtime.write_log(cid, *[f"{inv.request_id} {i}" for i in range(300)])
        return Response(200, [], b"ok")

    kit.forwarder.then(chatty, chatty)
    r1 = await kit.pool.invoke(make_invocation(record, request_id="req-1"))
    r2 = await kit.pool.invoke(make_invocation(record, request_id="req-2"))
    assert r1.error is None and r2.error is None
    [c] = kit.runtime.live()
    assert c.config.to_docker()["HostConfig"]["LogConfig"] == {
        "Type": "local",
        "Config": {"max-size": "64m", "max-file": "2", "compress": "false"},
    }
    await eventually(lambda: len(of_type(k.producer.records(), "REPORT")) == 2)
    # A slow engine: output is still being read when the instance is retired.
    kit.runtime.log_chunk_delay_s = 0.0005
    kit.runtime.write_log(c.id, *[f"bye {i}" for i in range(200)])
    [inst] = kit.pool.instances()
    inst.retire("idle")
    await eventually(lambda: not kit.pool.instances(), timeout_s=5)
    assert [e for e in kit.runtime.events if e[1] == c.id] == [
        ("stop", c.id),
        ("log_end", c.id),
        ("remove", c.id),
    ]
    await eventually(lambda: k.shipper.buffer.used == 0)
    records = k.producer.records()
    lines = lines_of(records)
    assert lines == [
        "booting",
        "listening",
        *[f"req-1 {i}" for i in range(300)],
        *[f"req-2 {i}" for i in range(300)],
        *[f"bye {i}" for i in range(200)],
    ]
    starts = of_type(records, "START")
    assert [(s["request_id"], s["cold"]) for s in starts] == [("req-1", True), ("req-2", False)]
    reports = of_type(records, "REPORT")
    assert [(r["request_id"], r["lines"], r["status"]) for r in reports] == [
        ("req-1", 300, 200),
        ("req-2", 300, 200),
    ]
    assert reports[0]["init_ms"] > 0 and reports[0]["memory_limit_mb"] == 256
    assert {r["instance"] for r in records} == {f"imagefn-fn-{inst.id}"}
    # The output after req-2 answered is still req-2's (its window runs until the next).
    assert {r["request_id"] for r in records if r.get("line", "").startswith("bye")} == {"req-2"}


async def test_pool_reports_failures_and_a_container_that_exits_at_start(
    logged_pool: tuple[PoolKit, Kit],
) -> None:
    kit, k = logged_pool
    kit.runtime.queue(Behaviour(exit_code=3, logs=["starting", "fatal: no config"]))
    record = make_record("dies")
    result = await kit.pool.invoke(make_invocation(record, request_id="doomed"))
    assert result.error is not None and result.error["type"] == "UserProcessExited"
    await eventually(lambda: not kit.pool.instances(), timeout_s=5)
    await eventually(lambda: len(k.producer.records()) == 2)
    # Its last words arrive, as init output (no request ran on it), before removal.
    assert [(r["line"], r["request_id"]) for r in k.producer.records()] == [
        ("starting", None),
        ("fatal: no config", None),
    ]
    cid = next(iter(kit.runtime.containers))
    events = [e for e, c in kit.runtime.events if c == cid]
    assert events.index("log_end") < events.index("remove")

    # An event function answering 500: END carries its status and the error type.
    kit.forwarder.then(Response(500, [], b"boom"))
    result = await kit.pool.invoke(make_invocation(make_record("fails"), request_id="bad"))
    assert result.error is not None
    await eventually(lambda: len(of_type(k.producer.records(), "END")) == 1, timeout_s=3)
    [end] = of_type(k.producer.records(), "END")
    assert (end["request_id"], end["status"], end["error"]) == ("bad", 500, "UserCodeError")


class RecordingLogs:
    """InstanceLogs that only remembers what the pool told it."""

    def __init__(self) -> None:
        self.calls: deque[tuple[str, ...]] = deque()

    def follow(self, container_id: str, source: LogSource) -> None:
        self.calls.append(("follow", container_id, source.instance))

    def request_started(
        self, container_id: str, request_id: str, *, cold: bool, init_ms: float | None
    ) -> None:
        self.calls.append(("started", request_id, str(cold), str(init_ms is not None)))

    def request_ended(
        self, container_id: str, request_id: str, *, status: int | None, error: str | None
    ) -> None:
        self.calls.append(("ended", request_id, str(status), str(error)))

    async def drained(self, container_id: str) -> bool:
        self.calls.append(("drained", container_id))
        return True


async def test_pool_tells_the_shipper_in_order(kit: PoolKit) -> None:
    rec = RecordingLogs()
    kit.pool = ContainerPool(
        kit.runtime,
        cast(Forwarder, kit.forwarder),
        FAST_WORKER,
        FAST_WORKER.worker_id,
        INSTALLATION,
        kit.images,
        logs=rec,
    )
    record = make_record("fn")
    kit.forwarder.then(Response(200, [], b"ok"), FunctionTimeout("too slow"))
    await kit.pool.invoke(make_invocation(record, request_id="a"))
    await kit.pool.invoke(make_invocation(record, request_id="b"))
    await eventually(lambda: not kit.pool.instances(), timeout_s=5)
    [cid] = kit.runtime.containers
    assert list(rec.calls) == [
        ("follow", cid, next(iter(kit.runtime.containers.values())).config.name),
        ("started", "a", "True", "True"),
        ("ended", "a", "200", "None"),
        ("started", "b", "False", "False"),
        ("ended", "b", "504", "FunctionTimeout"),
        ("drained", cid),
    ]
    # Stopped (killed: a timeout), then drained, then removed.
    assert kit.runtime.events == [("stop", cid), ("remove", cid)]
