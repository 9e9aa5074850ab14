"""Log shipping: every instance's stdout and stderr, read from outside the container
through the Docker Engine API, into Kafka (``{prefix}.logs``) as the records of
shared/logrecords.py.

One ``LogShipper`` per worker. It runs in a child process of the worker
(workers/logship_main.py, driven through workers/logship_proxy.py) so that its CPU work
does not delay the worker's event loop, which forwards invocations. Its tasks:

* one follower per container (``follow``), reading the engine's raw multiplexed log
  stream (``GET /containers/{id}/logs?follow=1&stdout=1&stderr=1&timestamps=1``): 8-byte
  frame headers (stream, 0, 0, 0, size as big-endian u32), each payload an RFC 3339 UTC
  timestamp (when the engine read the output), a space, and the output. The engine
  cuts a message longer than its 16 KiB buffer into fragments of exactly 16 KiB sharing
  one timestamp, then the rest (with its newline from json-file, without from local);
  lines are put back together per stream: complete at a newline, at a shorter fragment
  without one, or when a frame of another message (another timestamp) arrives. A line
  longer than ``max_line_bytes`` becomes parts (``part`` 1, 2, ... and ``last``), sent
  as they fill, so one endless line cannot hold memory; output that is not UTF-8
  travels base64-encoded (``encoding``).
* the sender, producing the buffered records in batches (one per partition and round,
  ``acks=all``); a failed batch is sent again, in order, until the cluster takes it.
* the ticker, which places an invocation's START/END/REPORT once no more of the output
  before it can come, and GAP records once the buffer has room.

Attribution (which invocation a line belongs to) goes by the line's engine timestamp and
the times the pool reports through ``request_started``/``request_ended``:

* An instance serving one request at a time (every event function; web functions with
  ``instance_concurrency`` 1): request k owns the window [start of k, start of k+1), so
  output written just after the response (a flush, a log line after returning) is still
  k's. Output before the first request (the init phase) has ``request_id`` null.
* An instance serving several requests at once: a line written while exactly one request
  was in flight (between its start and end) is that request's; while several were, its
  ``request_id`` is null and ``concurrent`` lists them all; while none was, null.

Ordering: every record of an instance carries ``seq``, increasing by one. The platform
records are merged into the output by time, each placed once no output from before it
can still come: START before the first line stamped at or after the request's start;
END and REPORT (at the request's end) -- with the window rule -- before the first line
of the next request, since everything until then is still this request's; with several
requests at once, before the first line stamped after the end. Without such a line, a
record is placed once the stream has been quiet for ``QUIET_GRACE_S`` (at the latest
``drain_timeout_s`` after its time), or when the stream ends. So a request's lines
precede its END, including what it wrote just after answering and the tail of a burst
of output, which the engine reads -- and stamps -- after the response; only output
after a pause longer than the grace follows END (still carrying the request's id).
REPORT's ``lines`` counts the request's lines placed before its END.

The engine stamps output when it reads it from the container's pipes, not when the
process wrote it: after a burst (more than the pipes hold, some 64-128 KiB), the tail is
stamped up to tens of milliseconds after the response. If the next request on the
instance starts before the engine has read that tail, the tail counts as the next
request's output. Nothing outside the container can tell the two apart.

Back-pressure: reading from the engine never waits for Kafka (a slow reader would let
the log file's rotation remove lines unseen). Records wait in a buffer of ``buffer_mb``
per worker; a line that does not fit is dropped and counted per instance, and a GAP
record (dropped_lines, dropped_bytes, first_ts, last_ts) takes its place in the
instance's sequence as soon as there is room again (before the instance's next record of
any kind). Platform records may use a small reserve beyond the bound; what does not fit
even there is counted in the GAP (``dropped_platform``). Records leave the buffer only
once Kafka acknowledged them and the topic was seen to exist after that (a broker that
restarted empty -- the in-memory test broker -- acknowledges writes to a topic it no
longer has and keeps nothing; an acknowledged offset lower than before gives it away
too): such records are sent again once the topic is recreated. A retry after an unclear
failure may duplicate records, which readers drop by (instance, seq).

Docker 20.10's follow of a log file (local and json-file drivers alike) mishandles
rotation: it can replay part of a file, and it can end before the new file's tail is
read. Replays are dropped per stream (a stream's timestamps never decrease; of the
frames at its last timestamp, as many as were taken are skipped); after an instance
wrote about half a log file's worth, or a replay was seen, the stream's end is followed
by one more read from the last timestamp (``since``) to pick up a tail the follow
missed. Files are large (``container_log_max_mb``) so rotation is rare; a follow that
falls a whole file behind during one burst can still lose lines unseen.

Removal: the pool stops a container, then waits in ``drained`` until its stream ended
and everything read is in the buffer (bounded by ``drain_timeout_s``), then removes it.
"""

from __future__ import annotations

import asyncio
import base64
import calendar
import contextlib
import itertools
import json
import struct
import time
from bisect import bisect_right
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import structlog
from aiokafka.partitioner import DefaultPartitioner

from shared import logrecords
from shared.backoff import Backoff
from shared.kafka import Topics, ensure_topics, producer
from shared.settings import KafkaSettings, LogSettings
from workers.runtime import ContainerRuntime

log = structlog.get_logger("imagefn.logship")

MiB = 1024 * 1024
# The engine's frame header: stream (1 stdout, 2 stderr), three zero bytes, payload size.
FRAME_HEADER = struct.Struct(">BxxxI")
STREAM_NAMES = ("stdout", "stderr")
# The engine copies a container's output through a buffer of this size: a longer message
# arrives as fragments of exactly this many bytes (sharing one timestamp), then the rest.
ENGINE_FRAGMENT_BYTES = 16 * 1024
# A platform record is placed once the stream has been quiet this long after its time.
QUIET_GRACE_S = 0.2
# How often the ticker looks at instances with platform records or gaps waiting.
TICK_S = 0.025
# Bytes counted per buffered record beyond its value (tuple, deque slot, key reference):
# the buffer bound is about memory, not payload.
RECORD_OVERHEAD = 64
# Bytes the engine's log file takes per line beyond the line itself, about (json-file's
# {"log":...,"stream":...,"time":...} more, local's protobuf less): used to tell whether
# a log file may have rotated under the follower, so erring high only costs a re-read.
ENGINE_LOG_OVERHEAD = 64
# Attribution history: windows that began this long before the newest line read (at most
# WINDOWS_KEPT of them), and requests of a concurrent instance that ended this long
# before (at most ENDED_KEPT: every line is checked against them), are forgotten. Output
# read later than that about its time is attributed to nobody.
WINDOW_HORIZON_NS = 10 * 1_000_000_000
WINDOWS_KEPT = 4096
ENDED_HORIZON_NS = 2 * 1_000_000_000
ENDED_KEPT = 256
# A Kafka batch holds at most this many bytes; a record alone may be larger.
MAX_BATCH_BYTES = MiB
# The topic is (re)created at most this often when producing fails (a broker that
# lost it, like the in-memory test broker after a restart).
ENSURE_TOPIC_EVERY_S = 2.0
# Acknowledged records are confirmed (the topic still exists) at most this often.
VERIFY_EVERY_S = 0.25
# Warnings about dropped lines are logged at most this often (a long outage drops a lot).
WARN_EVERY_S = 5.0
_NS = 1_000_000_000
NEVER = 1 << 62
_FRAC_SCALE: tuple[int, ...] = tuple(int(10 ** (9 - i)) for i in range(10))
_json_str: Callable[[str], str] = json.encoder.encode_basestring


# -- interfaces ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LogSource:
    """An instance as its log records name it."""

    function: str
    version: int
    # The container name (what ``instance`` holds in the records).
    instance: str
    # Requests the instance serves at once: 1 selects the window rule (module docstring).
    concurrency: int
    memory_limit_mb: int


class InstanceLogs(Protocol):
    """What the pool tells the shipper. Every method but ``drained`` is synchronous and
    cheap: none of it may add latency to an invocation."""

    def follow(self, container_id: str, source: LogSource) -> None: ...

    def request_started(
        self, container_id: str, request_id: str, *, cold: bool, init_ms: float | None
    ) -> None: ...

    def request_ended(
        self, container_id: str, request_id: str, *, status: int | None, error: str | None
    ) -> None: ...

    async def drained(self, container_id: str) -> bool: ...


class BatchLike(Protocol):
    def append(self, *, timestamp: int | None, key: bytes | None, value: bytes | None) -> Any: ...
    def close(self) -> None: ...


class ProducerLike(Protocol):
    """The part of AIOKafkaProducer the sender uses, and a fresh look at the topic."""

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def partitions_for(self, topic: str) -> set[int]: ...
    async def topic_exists(self, topic: str) -> bool: ...
    def create_batch(self) -> BatchLike: ...
    async def send_batch(
        self, batch: BatchLike, topic: str, *, partition: int
    ) -> Awaitable[Any]: ...


class KafkaLogProducer:
    """ProducerLike over an AIOKafkaProducer."""

    def __init__(self, producer: Any) -> None:
        self._p = producer

    async def start(self) -> None:
        await self._p.start()

    async def stop(self) -> None:
        await self._p.stop()

    async def partitions_for(self, topic: str) -> set[int]:
        return set(await self._p.partitions_for(topic))

    async def topic_exists(self, topic: str) -> bool:
        """Asks the cluster now, for all topics: a request naming the topic would ask
        the broker to create it, and so could not tell that it was gone."""
        cluster = await self._p.client.fetch_all_metadata()
        return cluster.partitions_for_topic(topic) is not None

    def create_batch(self) -> BatchLike:
        batch: BatchLike = self._p.create_batch()
        return batch

    async def send_batch(self, batch: BatchLike, topic: str, *, partition: int) -> Awaitable[Any]:
        fut: Awaitable[Any] = await self._p.send_batch(batch, topic, partition=partition)
        return fut


# -- helpers ---------------------------------------------------------------------------------


class _Clock:
    """Engine timestamps (b"2026-11-28T09:45:01.872659934Z") to integer nanoseconds. The
    date-time part changes once a second, so its conversion is cached."""

    def __init__(self) -> None:
        self._prefix = b""
        self._base = 0

    def ns(self, raw: bytes) -> int | None:
        prefix = raw[:19]
        if prefix != self._prefix:
            try:
                self._base = _NS * calendar.timegm(
                    (
                        int(prefix[0:4]),
                        int(prefix[5:7]),
                        int(prefix[8:10]),
                        int(prefix[11:13]),
                        int(prefix[14:16]),
                        int(prefix[17:19]),
                    )
                )
            except ValueError:
                return None
            self._prefix = prefix
        if raw[-1:] != b"Z":
            return _iso_ns(raw)  # not the engine's UTC form: take the slow, general way
        if len(raw) == 20:
            return self._base
        if raw[19:20] != b"." or len(raw) > 30:
            return None
        frac = raw[20:-1]
        try:
            return self._base + int(frac) * _FRAC_SCALE[len(frac)]
        except ValueError:
            return None


def _iso_ns(raw: bytes) -> int | None:
    try:
        text = raw.decode("ascii")
        head, dot, rest = text.partition(".")
        digits = ""
        tz = rest
        if dot:
            n = 0
            while n < len(rest) and rest[n].isdigit():
                n += 1
            digits, tz = rest[:n], rest[n:]
        base = datetime.fromisoformat(head + (tz if tz != "Z" else "+00:00"))
        frac = int(digits[:9].ljust(9, "0")) if digits else 0
        return int(base.timestamp()) * _NS + frac
    except (UnicodeDecodeError, ValueError):
        return None


def _utf8_cut(data: bytes | bytearray, limit: int) -> int:
    """Where to cut ``data`` at most ``limit`` bytes in without splitting a UTF-8
    character (so each part of valid text stays valid text)."""
    cut = limit
    # Up to three continuation bytes (10xxxxxx) may precede the cut.
    for _ in range(3):
        if cut <= 0 or (data[cut] & 0xC0) != 0x80:
            break
        cut -= 1
    return cut if cut > 0 else limit


# Where the engine's cgroups keep a container's peak memory, tried in this order:
# cgroup v1 (memory.max_usage_in_bytes) and v2 (memory.peak), cgroupfs and systemd drivers.
_PEAK_PATHS = (
    "/sys/fs/cgroup/memory/docker/{id}/memory.max_usage_in_bytes",
    "/sys/fs/cgroup/memory/system.slice/docker-{id}.scope/memory.max_usage_in_bytes",
    "/sys/fs/cgroup/docker/{id}/memory.peak",
    "/sys/fs/cgroup/system.slice/docker-{id}.scope/memory.peak",
)


def read_memory_peak(container_id: str) -> int | None:
    """The container's peak memory in bytes from its cgroup, or None where the engine's
    cgroups cannot be read from here (another machine's engine, a stopped container).
    Blocking file reads: call it in a thread."""
    for pattern in _PEAK_PATHS:
        try:
            with open(pattern.format(id=container_id), encoding="ascii") as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            continue
    return None


# -- the buffer ------------------------------------------------------------------------------


@dataclass(eq=False)
class _Queue:
    """One function's records waiting for Kafka, oldest first: (timestamp ms, value).
    The first ``acked`` were acknowledged but not yet confirmed (see ``LogShipper``)."""

    key: bytes
    items: deque[tuple[int, bytes]] = field(default_factory=deque)
    acked: int = 0
    acked_bytes: int = 0


class _Buffer:
    """All records of the worker waiting for Kafka, per function (the Kafka key), within
    ``limit`` bytes for lines and ``hard`` bytes for platform records."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        # The platform records' reserve: small, and enough for a few hundred of them.
        self.hard = limit + max(64 * 1024, limit // 16)
        self.used = 0
        self.queues: dict[str, _Queue] = {}
        self.ready = asyncio.Event()

    def queue(self, function: str) -> _Queue:
        q = self.queues.get(function)
        if q is None:
            q = self.queues[function] = _Queue(function.encode("utf-8"))
        return q

    def put(self, q: _Queue, ts_ns: int, value: bytes, bound: int) -> bool:
        size = len(value) + RECORD_OVERHEAD
        if self.used + size > bound:
            return False
        self.used += size
        q.items.append(((ts_ns + 500_000) // 1_000_000, value))
        self.ready.set()
        return True

    def records(self) -> int:
        return sum(len(q.items) for q in self.queues.values())


# -- one instance ----------------------------------------------------------------------------


@dataclass(eq=False)
class _Request:
    rid: str
    rid_json: str
    start_ns: int
    cold: bool
    init_ms: float | None
    end_ns: int | None = None
    status: int | None = None
    error: str | None = None
    lines: int = 0
    dropped: int = 0
    # Kept for REPORT: counted up to END.
    lines_at_end: int = 0
    memory_peak_mb: float | None = None
    memory_read: bool = False


@dataclass(eq=False)
class _Event:
    kind: str  # START or END (END brings REPORT)
    ts_ns: int
    req: _Request


@dataclass
class _Gap:
    first_ns: int
    last_ns: int
    lines: int = 0
    bytes: int = 0
    platform: int = 0
    # The requests the dropped lines belonged to (two are enough to know it is not one).
    requests: set[str] = field(default_factory=set)


Owner = _Request | list[_Request] | None


class _Tail:
    """An instance's log state: frame parsing, line assembly, attribution, records.
    Everything here is synchronous; the shipper's tasks drive it."""

    def __init__(self, shipper: LogShipper, container_id: str, source: LogSource) -> None:
        self.shipper = shipper
        self.container_id = container_id
        self.source = source
        self.buffer = shipper.buffer
        self.queue = shipper.buffer.queue(source.function)
        self.max_line = shipper.settings.max_line_bytes
        self.clock = _Clock()
        self.seq = 0
        f, i, w = _json_str(source.function), _json_str(source.instance), _json_str(shipper.worker)
        self.heads = tuple(
            f'{{"type":"line","function":{f},"version":{source.version},"instance":{i},'
            f'"worker":{w},"stream":"{name}"'
            for name in STREAM_NAMES
        )
        # Frame parsing: the bytes of an incomplete frame, per stream the last frame seen
        # (replays are dropped by it) and the line being assembled.
        self.rest = b""
        self.last_ts = [-1, -1]
        # Frames accepted at the stream's last timestamp (the fragments of one long
        # message share it), and how many of them a replay will bring again.
        self.same = [0, 0]
        self.skip = [0, 0]
        self.pbuf = [bytearray(), bytearray()]
        self.pts = [0, 0]
        self.pparts = [0, 0]
        self.powner: list[Owner] = [None, None]
        self.newest_ns = 0
        self.last_data = time.monotonic()
        self.est_bytes = 0
        self.replayed = 0
        # Attribution: windows (one request at a time) or in-flight requests.
        self.windows = source.concurrency <= 1
        self.wstarts: list[int] = []
        self.wreqs: list[_Request] = []
        self.cur_start = NEVER
        self.cur: _Request | None = None
        self.active: list[_Request] = []
        self.open: dict[str, list[_Request]] = {}
        self.pending: deque[_Event] = deque()
        # The engine time from which a line places the first pending record (never: 2**62).
        self.due_ns = NEVER
        self.gap: _Gap | None = None
        self.mem_wanted = False
        self.mem_task: asyncio.Task[None] | None = None
        self.task: asyncio.Task[None] | None = None
        self.stream_done = False
        self.removed = False
        self.lines = 0

    # -- requests ------------------------------------------------------------------------

    def started(self, req: _Request) -> None:
        self.open.setdefault(req.rid, []).append(req)
        newest = max(self.newest_ns, req.start_ns)
        if self.windows:
            # Forget windows no output can fall into any more (all but the last).
            horizon = newest - WINDOW_HORIZON_NS
            drop = max(0, len(self.wstarts) + 1 - WINDOWS_KEPT)
            while drop + 1 < len(self.wstarts) and self.wstarts[drop + 1] < horizon:
                drop += 1
            if drop:
                del self.wstarts[:drop], self.wreqs[:drop]
            self.wstarts.append(req.start_ns)
            self.wreqs.append(req)
            self.cur_start, self.cur = req.start_ns, req
        else:
            horizon = newest - ENDED_HORIZON_NS
            ended = [r for r in self.active if r.end_ns is not None and r.end_ns >= horizon]
            inflight = [r for r in self.active if r.end_ns is None]
            self.active = ended[-ENDED_KEPT:] + inflight + [req]
        self.pending.append(_Event(logrecords.START, req.start_ns, req))
        self.refresh_due()

    def ended(self, rid: str, end_ns: int, status: int | None, error: str | None) -> bool:
        reqs = self.open.get(rid)
        if not reqs:
            return False
        req = reqs.pop(0)
        if not reqs:
            del self.open[rid]
        req.end_ns, req.status, req.error = max(end_ns, req.start_ns), status, error
        self.pending.append(_Event(logrecords.END, req.end_ns, req))
        self.refresh_due()
        self.mem_wanted = True
        return True

    def trigger(self, i: int) -> int:
        """The engine time from which output shows that pending record ``i`` is due.

        START: its time. END: its time, except on an instance serving one request at a
        time, where output after the response still belongs to the request (its window
        runs to the next start), so only the next request's start -- or quiet -- places
        it; that also keeps a burst's tail, which the engine reads (and stamps) after the
        response, before END."""
        ev = self.pending[i]
        if ev.kind != logrecords.END or not self.windows:
            return ev.ts_ns
        if i + 1 < len(self.pending):
            return self.pending[i + 1].ts_ns  # the next request's START
        return NEVER

    def refresh_due(self) -> None:
        self.due_ns = self.trigger(0) if self.pending else NEVER

    def owner(self, ts: int) -> Owner:
        if self.windows:
            if ts >= self.cur_start:
                return self.cur
            i = bisect_right(self.wstarts, ts) - 1
            return self.wreqs[i] if i >= 0 else None
        inflight = [
            r for r in self.active if r.start_ns <= ts and (r.end_ns is None or ts < r.end_ns)
        ]
        if not inflight:
            return None
        return inflight[0] if len(inflight) == 1 else inflight

    # -- the stream ----------------------------------------------------------------------

    def new_stream(self) -> None:
        """A new engine stream begins (a reconnect, or the catch-up read): it starts at
        the last timestamp seen (inclusive), so the frames already taken there come
        again."""
        self.rest = b""
        self.skip = list(self.same)

    def resume_from(self) -> int | None:
        """Where a new read must start so that nothing unseen is skipped (the overlap is
        dropped as replay)."""
        seen = [t for t in self.last_ts if t >= 0]
        return min(seen) if seen else None

    def needs_catchup(self, rotate_bytes: int) -> bool:
        return bool(self.replayed) or self.est_bytes >= rotate_bytes // 2

    def feed(self, chunk: bytes) -> None:
        """Parse a chunk of the multiplexed stream; complete frames become records.

        The common case -- a whole, short, UTF-8 line of an instance with no gap and no
        platform record due -- is handled inline (this runs for every line the worker's
        containers write); everything else goes through ``frame``, which does the same
        and more, one call at a time."""
        data = self.rest + chunk if self.rest else chunk
        n = len(data)
        pos = 0
        unpack = FRAME_HEADER.unpack_from
        clock = self.clock
        last_ts, pbuf, pparts, same = self.last_ts, self.pbuf, self.pparts, self.same
        heads, buffer, items = self.heads, self.buffer, self.queue.items
        max_line = self.max_line + 1  # the newline is not the line's
        windows = self.windows
        jstr = _json_str
        while n - pos >= 8:
            stream, size = unpack(data, pos)
            start = pos + 8
            end = start + size
            if end > n:
                break
            pos = end
            s = 1 if stream == 2 or stream == 3 else 0
            sp = data.find(b" ", start, min(end, start + 40))
            ts = clock.ns(data[start:sp]) if sp > 0 else None
            if ts is None:
                # Not a timestamp: a stream without them; the time it was read will do.
                ts, sp = time.time_ns(), start - 1
            msg = data[sp + 1 : end]
            m = len(msg)
            if (
                ts <= last_ts[s]
                or not 0 < m <= max_line
                or msg[m - 1] != 10
                or pbuf[s]
                or pparts[s]
                or self.gap is not None
                or ts >= self.due_ns
                or msg.find(b"\n", 0, m - 1) >= 0
            ):
                self.frame(s, ts, msg)
                continue
            owner: _Request | None
            if windows and ts >= self.cur_start:
                owner = self.cur
            else:
                found = self.owner(ts)
                if isinstance(found, list):
                    self.frame(s, ts, msg)  # several requests in flight
                    continue
                owner = found
            try:
                text = jstr(msg[:-1].decode("utf-8"))
            except UnicodeDecodeError:
                self.frame(s, ts, msg)
                continue
            seq = self.seq + 1
            value = (
                f'{heads[s]},"ts":{ts / _NS!r},"request_id":'
                f'{"null" if owner is None else owner.rid_json},"seq":{seq},"line":{text}}}'
            ).encode()
            size = len(value) + RECORD_OVERHEAD
            if buffer.used + size > buffer.limit:
                self.frame(s, ts, msg)  # it drops the line and opens the gap
                continue
            last_ts[s] = ts
            same[s] = 1
            self.skip[s] = 0
            if ts > self.newest_ns:
                self.newest_ns = ts
            self.est_bytes += m + ENGINE_LOG_OVERHEAD
            self.lines += 1
            self.seq = seq
            buffer.used += size
            items.append(((ts + 500_000) // 1_000_000, value))
            if owner is not None:
                owner.lines += 1
        if pos:
            buffer.ready.set()
        self.rest = data[pos:] if pos < n else b""

    def frame(self, s: int, ts: int, msg: bytes) -> None:
        last = self.last_ts[s]
        if ts < last:
            # Each stream's timestamps never decrease: the engine replays output after a
            # log rotation (or a resumed read overlaps). The frames at ``last`` will come
            # again too.
            self.replayed += 1
            self.skip[s] = self.same[s]
            return
        if ts == last:
            if self.skip[s]:
                self.skip[s] -= 1
                self.replayed += 1
                return
            self.same[s] += 1  # the next fragment of a long message
        else:
            self.last_ts[s] = ts
            self.same[s] = 1
            self.skip[s] = 0
            if self.pbuf[s] or self.pparts[s]:
                # The fragments of one message share its timestamp: a new one means the
                # message being put together is complete.
                self.finish_line(s)
        if ts > self.newest_ns:
            self.newest_ns = ts
        n = len(msg)
        self.est_bytes += n + ENGINE_LOG_OVERHEAD
        if ts >= self.due_ns:
            self.emit_due(ts)
        start = 0
        while True:
            nl = msg.find(b"\n", start)
            if nl < 0:
                if start < n:
                    self.partial(s, ts, msg[start:])
                    if n < ENGINE_FRAGMENT_BYTES:
                        # Shorter than the engine's buffer, without a newline: the end of
                        # a long message (the local driver drops its newline) or output
                        # flushed at exit. Either way the message is complete.
                        self.finish_line(s)
                return
            if self.pbuf[s] or self.pparts[s]:
                self.partial(s, ts, msg[start:nl])
                self.finish_line(s)
            else:
                self.line(s, ts, msg[start:nl])
            start = nl + 1

    def line(self, s: int, ts: int, raw: bytes) -> None:
        owner = self.owner(ts)
        self.lines += 1
        if len(raw) <= self.max_line:
            self.record(s, ts, raw, owner, 0, False)
            return
        part, pos, n = 0, 0, len(raw)
        while pos < n:
            cut = pos + _utf8_cut(raw[pos:], self.max_line) if n - pos > self.max_line else n
            part += 1
            self.record(s, ts, raw[pos:cut], owner, part, cut >= n)
            pos = cut

    def partial(self, s: int, ts: int, data: bytes) -> None:
        """Output without its newline yet: kept until the newline, but sent in parts as
        soon as more than ``max_line_bytes`` is waiting."""
        pb = self.pbuf[s]
        if not pb and not self.pparts[s]:
            self.pts[s] = ts
            self.powner[s] = self.owner(ts)
            self.lines += 1
        pb += data
        while len(pb) > self.max_line:
            cut = _utf8_cut(pb, self.max_line)
            self.pparts[s] += 1
            self.record(s, self.pts[s], bytes(pb[:cut]), self.powner[s], self.pparts[s], False)
            del pb[:cut]

    def finish_line(self, s: int) -> None:
        pb, parts = self.pbuf[s], self.pparts[s]
        if parts:
            self.record(s, self.pts[s], bytes(pb), self.powner[s], parts + 1, True)
        elif pb:
            self.record(s, self.pts[s], bytes(pb), self.powner[s], 0, False)
        pb.clear()
        self.pparts[s] = 0
        self.powner[s] = None

    def record(self, s: int, ts: int, raw: bytes, owner: Owner, part: int, last: bool) -> None:
        req: _Request | None = None
        if owner is None:
            rid_json, extra = "null", ""
        elif isinstance(owner, _Request):
            req, rid_json, extra = owner, owner.rid_json, ""
        else:
            rid_json = "null"
            extra = ',"concurrent":' + json.dumps([r.rid for r in owner])
        if part:
            extra += f',"part":{part},"last":{"true" if last else "false"}'
        if self.gap is not None and not self.flush_gap(self.buffer.limit):
            self.drop(ts, len(raw), req, part <= 1)
            return
        try:
            text = _json_str(raw.decode("utf-8"))
        except UnicodeDecodeError:
            text = '"' + base64.b64encode(raw).decode("ascii") + '","encoding":"base64"'
        seq = self.seq + 1
        value = (
            f'{self.heads[s]},"ts":{ts / _NS!r},"request_id":{rid_json},"seq":{seq},'
            f'"line":{text}{extra}}}'
        ).encode()
        if not self.buffer.put(self.queue, ts, value, self.buffer.limit):
            self.drop(ts, len(raw), req, part <= 1)
            return
        self.seq = seq
        if req is not None and part <= 1:
            req.lines += 1

    # -- drops and gaps --------------------------------------------------------------------

    def drop(self, ts: int, nbytes: int, req: _Request | None, is_line: bool) -> None:
        g = self.gap
        if g is None:
            g = self.gap = _Gap(first_ns=ts, last_ns=ts)
            self.shipper.gap_opened(self)
        g.first_ns = min(g.first_ns, ts)
        g.last_ns = max(g.last_ns, ts)
        g.bytes += nbytes
        if is_line:
            g.lines += 1
            if req is not None:
                req.dropped += 1
        if req is not None and len(g.requests) < 2:
            g.requests.add(req.rid)

    def flush_gap(self, bound: int | None) -> bool:
        """Put the pending GAP record in if it fits within ``bound`` (None: regardless)."""
        g = self.gap
        if g is None:
            return True
        rid = next(iter(g.requests)) if len(g.requests) == 1 else None
        fields: dict[str, Any] = {
            "dropped_lines": g.lines,
            "dropped_bytes": g.bytes,
            "first_ts": g.first_ns / _NS,
            "last_ts": g.last_ns / _NS,
        }
        if g.platform:
            fields["dropped_platform"] = g.platform
        value = self.platform_value(logrecords.GAP, g.last_ns, rid, fields)
        if not self.buffer.put(self.queue, g.last_ns, value, bound or (1 << 62)):
            self.seq -= 1
            return False
        self.gap = None
        self.shipper.gap_closed(self, g)
        return True

    # -- platform records ----------------------------------------------------------------

    def platform_value(self, kind: str, ts: int, rid: str | None, fields: dict[str, Any]) -> bytes:
        self.seq += 1
        record: dict[str, Any] = {
            "type": kind,
            "ts": ts / _NS,
            "function": self.source.function,
            "version": self.source.version,
            "instance": self.source.instance,
            "worker": self.shipper.worker,
            "request_id": rid,
            "stream": "platform",
            "seq": self.seq,
        }
        record.update(fields)
        return logrecords.dumps(record)

    def platform(self, kind: str, ts: int, req: _Request, fields: dict[str, Any]) -> None:
        if self.gap is not None and not self.flush_gap(self.buffer.hard):
            self.gap.platform += 1
            return
        value = self.platform_value(kind, ts, req.rid, fields)
        if not self.buffer.put(self.queue, ts, value, self.buffer.hard):
            self.seq -= 1
            self.drop(ts, 0, None, False)
            assert self.gap is not None
            self.gap.platform += 1

    def emit(self, ev: _Event) -> None:
        req = ev.req
        if ev.kind == logrecords.START:
            self.platform(logrecords.START, ev.ts_ns, req, {"cold": req.cold})
            return
        duration_ms = round((ev.ts_ns - req.start_ns) / 1e6, 3)
        req.lines_at_end = req.lines
        self.platform(
            logrecords.END,
            ev.ts_ns,
            req,
            {"status": req.status, "error": req.error, "duration_ms": duration_ms},
        )
        report: dict[str, Any] = {
            "duration_ms": duration_ms,
            "status": req.status,
            "error": req.error,
            "cold": req.cold,
        }
        if req.cold:
            report["init_ms"] = req.init_ms
        report.update(
            memory_peak_mb=req.memory_peak_mb,
            memory_limit_mb=self.source.memory_limit_mb,
            lines=req.lines_at_end,
        )
        if req.dropped:
            report["dropped_lines"] = req.dropped
        self.platform(logrecords.REPORT, ev.ts_ns, req, report)

    def emit_due(self, upto_ns: int) -> None:
        """Place the platform records that output stamped ``upto_ns`` shows are due."""
        while self.pending and self.trigger(0) <= upto_ns:
            self.emit(self.pending.popleft())
        self.refresh_due()

    def tick(self, now_ns: int, mono: float, drain_ns: int) -> None:
        """Place what is due by time: after a quiet grace, at the latest ``drain_ns``
        after the event, at once once the stream has ended; and a waiting GAP."""
        quiet = self.stream_done or mono - self.last_data >= QUIET_GRACE_S
        grace_ns = int(QUIET_GRACE_S * _NS)
        while self.pending:
            ev = self.pending[0]
            age = now_ns - ev.ts_ns
            if not (self.stream_done or (quiet and age >= grace_ns) or age >= drain_ns):
                break
            self.emit(self.pending.popleft())
        self.refresh_due()
        if self.gap is not None:
            self.flush_gap(self.buffer.limit)

    def finish(self) -> None:
        """The stream ended: what was read becomes records, in time order, and a
        waiting GAP goes in regardless of room."""
        self.stream_done = True
        for s in (0, 1):
            if self.pbuf[s] or self.pparts[s]:
                self.emit_due(self.pts[s])
                self.finish_line(s)
        self.emit_all()
        self.flush_gap(None)

    def emit_all(self) -> None:
        while self.pending:
            self.emit(self.pending.popleft())
        self.refresh_due()


# -- the shipper -----------------------------------------------------------------------------


@dataclass
class _Plan:
    """One partition's batch in a send round, and what it took from which queue."""

    batch: BatchLike
    partition: int
    count: int = 0
    full: bool = False
    takes: list[tuple[_Queue, int, int]] = field(default_factory=list)


class LogShipper:
    """Follows this worker's containers and ships their output to Kafka."""

    def __init__(
        self,
        settings: LogSettings,
        runtime: ContainerRuntime,
        *,
        worker: str,
        topic: str,
        producer_factory: Callable[[], ProducerLike],
        ensure_topic: Callable[[], Awaitable[object]],
        rotate_bytes: int = 64 * MiB,
        memory_peak: Callable[[str], int | None] = read_memory_peak,
    ) -> None:
        self.settings = settings
        self.worker = worker
        self.buffer = _Buffer(settings.buffer_mb * MiB)
        self._runtime = runtime
        self._topic = topic
        self._producer_factory = producer_factory
        self._ensure_topic = ensure_topic
        self._rotate_bytes = rotate_bytes
        self._memory_peak = memory_peak
        self._drain_ns = int(settings.drain_timeout_s * _NS)
        self._tails: dict[str, _Tail] = {}
        self._producer: ProducerLike | None = None
        self._sender: asyncio.Task[None] | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._tick_wanted = asyncio.Event()
        self._emptied = asyncio.Event()
        self._closing = False
        self._partitions: list[int] = []
        self._partition_of: dict[bytes, int] = {}
        self._round = 0
        self._ensured_at = 0.0
        self._verified_at = 0.0
        # Per partition, the end of what this worker saw acknowledged there.
        self._log_end: dict[int, int] = {}
        self._kafka_down_since: float | None = None
        self._warned_drop_at = self._warned_gap_at = -WARN_EVERY_S
        # Counters, for the shutdown line and for tests.
        self.shipped = 0
        self.dropped_lines = 0
        self.gaps = 0

    @classmethod
    def for_kafka(
        cls,
        settings: LogSettings,
        kafka: KafkaSettings,
        runtime: ContainerRuntime,
        *,
        worker: str,
        rotate_bytes: int,
    ) -> LogShipper:
        def make_producer() -> ProducerLike:
            # Big batches: one round ships thousands of lines in one request per partition.
            return KafkaLogProducer(
                producer(
                    kafka,
                    client_id=f"imagefn-logs-{worker}",
                    max_batch_size=MAX_BATCH_BYTES,
                    max_request_size=max(2 * MAX_BATCH_BYTES, 4 * settings.max_line_bytes + 4096),
                )
            )

        return cls(
            settings,
            runtime,
            worker=worker,
            topic=Topics.of(kafka).logs,
            producer_factory=make_producer,
            ensure_topic=lambda: ensure_topics(kafka, settings, which=("logs",)),
            rotate_bytes=rotate_bytes,
        )

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start the sender and the ticker. Kafka need not be reachable: the sender keeps
        trying, and the buffer (with its gap accounting) bridges the wait."""
        self._sender = asyncio.create_task(self._send_loop(), name="logship-sender")
        self._ticker = asyncio.create_task(self._tick_loop(), name="logship-ticker")

    async def close(self, timeout_s: float | None = None) -> None:
        """Stop following, place what was read, and give Kafka up to ``timeout_s``
        (default ``drain_timeout_s``) to take the rest; then stop."""
        timeout_s = self.settings.drain_timeout_s if timeout_s is None else timeout_s
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        self._closing = True
        followers = {t.task for t in self._tails.values() if t.task is not None}
        for task in followers:
            task.cancel()
        if followers:
            await asyncio.wait(followers, timeout=1.0)
        for tail in self._tails.values():
            if tail.mem_task is not None:
                tail.mem_task.cancel()
            tail.finish()
            # Requests still open never get their END from the pool now.
            for rid, reqs in list(tail.open.items()):
                for _ in range(len(reqs)):
                    tail.ended(rid, time.time_ns(), None, "WorkerShutdown")
            tail.emit_all()
        if self._sender is not None and not self._sender.done() and self.buffer.used:
            self._emptied.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._emptied.wait(), max(0.0, deadline - loop.time()))
        own = [t for t in (self._sender, self._ticker) if t is not None]
        for t in own:
            t.cancel()
        await asyncio.gather(*own, return_exceptions=True)
        if self._producer is not None:
            try:
                await asyncio.wait_for(self._producer.stop(), max(1.0, deadline - loop.time()))
            except Exception as e:
                log.warning("log_producer_stop_failed", error=str(e) or type(e).__name__)
        left = self.buffer.records()
        (log.warning if left else log.info)(
            "log_shipper_stopped",
            shipped=self.shipped,
            dropped_lines=self.dropped_lines,
            unsent_records=left,
        )

    # -- what the pool tells ---------------------------------------------------------------

    def follow(
        self,
        container_id: str,
        source: LogSource,
        *,
        since_ns: int | None = None,
        seq_from: int = 0,
    ) -> None:
        """Follow a container's output. ``since_ns`` skips output stamped before it, and
        ``seq_from`` is where the instance's ``seq`` continues from: a shipper taking over
        a container another one followed (a restarted shipper process) neither re-ships
        what was read before nor reuses its seqs, which readers would drop as duplicates."""
        if self._closing or container_id in self._tails:
            return
        tail = _Tail(self, container_id, source)
        tail.seq = seq_from
        self._tails[container_id] = tail
        tail.task = asyncio.create_task(
            self._follow(tail, since_ns), name=f"logship-follow-{container_id[:12]}"
        )

    def request_started(
        self,
        container_id: str,
        request_id: str,
        *,
        cold: bool,
        init_ms: float | None,
        at_ns: int | None = None,
    ) -> None:
        """``at_ns``: when the request started (default now); a shipper in another
        process gets the time the pool saw, as attribution must not depend on transit."""
        tail = self._tails.get(container_id)
        if tail is None:
            return
        tail.started(
            _Request(
                rid=request_id,
                rid_json=_json_str(request_id),
                start_ns=time.time_ns() if at_ns is None else at_ns,
                cold=cold,
                init_ms=None if init_ms is None else round(init_ms, 3),
            )
        )
        self._tick_wanted.set()

    def request_ended(
        self,
        container_id: str,
        request_id: str,
        *,
        status: int | None,
        error: str | None,
        at_ns: int | None = None,
    ) -> None:
        tail = self._tails.get(container_id)
        end_ns = time.time_ns() if at_ns is None else at_ns
        if tail is not None and tail.ended(request_id, end_ns, status, error):
            self._tick_wanted.set()

    async def drained(self, container_id: str) -> bool:
        """Wait (at most ``drain_timeout_s``) until the container's stream has ended and
        all it said is in the buffer; True if it ended by itself. Call it after the
        container stopped, before removing it."""
        tail = self._tails.get(container_id)
        if tail is None:
            return True
        clean = True
        task = tail.task
        if task is not None and not task.done():
            done, _ = await asyncio.wait({task}, timeout=self.settings.drain_timeout_s)
            if not done:
                clean = False
                # Whatever the engine had not delivered by now is lost with the container.
                log.warning(
                    "log_drain_timeout",
                    container=container_id[:12],
                    timeout_s=self.settings.drain_timeout_s,
                    unread_output="lost",
                )
                task.cancel()
                await asyncio.wait({task}, timeout=1.0)
        tail.removed = True
        if not tail.open and not tail.pending:
            self._tails.pop(container_id, None)
        else:
            self._tick_wanted.set()  # the ticker forgets it once its last END is placed
        return clean

    # -- following -------------------------------------------------------------------------

    async def _follow(self, tail: _Tail, since: int | None = None) -> None:
        cid = tail.container_id
        backoff = Backoff(0.2, 5.0)
        try:
            while True:
                try:
                    await self._read(tail, follow=True, since_ns=since)
                    backoff.reset()
                except asyncio.CancelledError:
                    raise
                except Exception as e:
                    log.warning("log_follow_failed", container=cid[:12], error=str(e))
                    await backoff.sleep()
                # The stream ends when the container stops; if it still runs, the engine
                # dropped the stream: follow again from where this one was.
                try:
                    running = (await self._runtime.state(cid)).running
                except Exception:
                    running = False
                if not running:
                    break
                since = tail.resume_from()
            if tail.needs_catchup(self._rotate_bytes):
                since = tail.resume_from()
                try:
                    await self._read(tail, follow=False, since_ns=since)
                except Exception as e:
                    log.warning("log_catchup_failed", container=cid[:12], error=str(e))
            await self._memory(tail)
        finally:
            tail.finish()
            if tail.replayed:
                log.info("log_replay_dropped", container=cid[:12], frames=tail.replayed)
            self._tick_wanted.set()

    async def _read(self, tail: _Tail, *, follow: bool, since_ns: int | None) -> None:
        tail.new_stream()
        stream = self._runtime.log_stream(tail.container_id, follow=follow, since_ns=since_ns)
        async with contextlib.aclosing(stream) as chunks:
            async for chunk in chunks:
                tail.last_data = time.monotonic()
                if tail.mem_wanted or tail.mem_task is not None:
                    await self._memory(tail)
                tail.feed(chunk)

    async def _memory(self, tail: _Tail) -> None:
        """Read the instance's peak memory for the ENDs waiting for it (in a thread: file
        reads block). Followers and the ticker share one read per instance."""
        for _ in range(3):
            if tail.mem_task is None:
                if not tail.mem_wanted:
                    return
                tail.mem_wanted = False
                waiting = [
                    ev.req
                    for ev in tail.pending
                    if ev.kind == logrecords.END and not ev.req.memory_read
                ]
                tail.mem_task = asyncio.create_task(self._read_memory(tail, waiting))
            await asyncio.wait({tail.mem_task}, timeout=1.0)
            if tail.mem_task is not None and not tail.mem_task.done():
                return  # a stuck read: the ENDs go without it

    async def _read_memory(self, tail: _Tail, reqs: list[_Request]) -> None:
        try:
            peak = await asyncio.to_thread(self._memory_peak, tail.container_id)
        except Exception:
            peak = None
        finally:
            tail.mem_task = None
        for req in reqs:
            req.memory_read = True
            req.memory_peak_mb = None if peak is None else round(peak / MiB, 1)

    async def _tick_loop(self) -> None:
        while True:
            await self._tick_wanted.wait()
            await asyncio.sleep(TICK_S)
            # Let output that arrived meanwhile reach its follower first: in a loop that
            # was busy, timers can run before I/O, and unread output is not quiet.
            for _ in range(3):
                await asyncio.sleep(0)
            busy = False
            for cid, tail in list(self._tails.items()):
                if tail.pending or tail.gap is not None:
                    if tail.mem_wanted or tail.mem_task is not None:
                        await self._memory(tail)
                    tail.tick(time.time_ns(), time.monotonic(), self._drain_ns)
                busy = busy or bool(tail.pending) or tail.gap is not None
                if tail.removed and not tail.open and not tail.pending:
                    self._tails.pop(cid, None)
            if not busy:
                self._tick_wanted.clear()

    def gap_opened(self, tail: _Tail) -> None:
        self._tick_wanted.set()
        now = time.monotonic()
        if now - self._warned_drop_at >= WARN_EVERY_S:
            self._warned_drop_at = now
            log.warning(
                "log_lines_dropping",
                container=tail.container_id[:12],
                buffered_bytes=self.buffer.used,
                buffer_bytes=self.buffer.limit,
            )

    def gap_closed(self, tail: _Tail, gap: _Gap) -> None:
        self.dropped_lines += gap.lines
        self.gaps += 1
        now = time.monotonic()
        if now - self._warned_gap_at >= WARN_EVERY_S:
            self._warned_gap_at = now
            log.warning(
                "log_gap",
                container=tail.container_id[:12],
                dropped_lines=gap.lines,
                dropped_bytes=gap.bytes,
                dropped_lines_total=self.dropped_lines,
            )

    # -- sending ---------------------------------------------------------------------------

    async def _send_loop(self) -> None:
        backoff = Backoff(0.1, 2.0)
        while True:
            if not self._unsent():
                if not self._unverified():
                    self.buffer.ready.clear()
                    self._emptied.set()
                    await self.buffer.ready.wait()
                    continue
                # Only acknowledged records left: confirm them soon, with whatever
                # comes meanwhile.
                self.buffer.ready.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.buffer.ready.wait(), VERIFY_EVERY_S)
            if self._producer is None:
                self._producer = await self._connect()
            try:
                if self._unsent():
                    await self._send_round(self._producer)
                await self._maybe_verify(self._producer)
                backoff.reset()
                if self._kafka_down_since is not None:
                    log.info(
                        "log_kafka_back",
                        after_s=round(time.monotonic() - self._kafka_down_since, 1),
                    )
                    self._kafka_down_since = None
            except asyncio.CancelledError:
                raise
            except Exception as e:
                if self._kafka_down_since is None:
                    self._kafka_down_since = time.monotonic()
                    log.warning("log_produce_failed", error=str(e) or type(e).__name__, retry=True)
                # A broker that lost the topic (or never had it) gets it again.
                await self._ensure(force=False)
                await backoff.sleep()

    def _offset_plausible(self, partition: int, result: Any, count: int) -> bool:
        """Offsets only grow: an acknowledgement at an offset below the end of what this
        worker saw acknowledged on the partition means its log was reset -- a broker
        that restarted empty, which may acknowledge and keep nothing (and recreate the
        topic when asked about it). Such a batch is sent again: a possible duplicate
        (readers drop it by seq) rather than a silent loss."""
        offset = getattr(result, "offset", None)
        if not isinstance(offset, int) or offset < 0:
            return True  # nothing to judge by
        expected = self._log_end.get(partition)
        if expected is not None and offset < expected:
            log.warning(
                "log_partition_reset", partition=partition, offset=offset, expected=expected
            )
            del self._log_end[partition]  # the resend is judged afresh
            return False
        self._log_end[partition] = offset + count
        return True

    def _unsent(self) -> bool:
        return any(q.acked < len(q.items) for q in self.buffer.queues.values())

    def _unverified(self) -> bool:
        return any(q.acked for q in self.buffer.queues.values())

    async def _maybe_verify(self, producer: ProducerLike) -> None:
        """Confirm acknowledged records before they leave the buffer: the topic must
        still exist after they were acknowledged. A broker that restarted without its
        records (the in-memory test broker) acknowledges writes to a topic it no longer
        has and keeps nothing: such records are sent again, after the topic is
        recreated. Checked at most every VERIFY_EVERY_S, sooner when unconfirmed records
        take a quarter of the buffer."""
        queues = [q for q in self.buffer.queues.values() if q.acked]
        if not queues:
            return
        pending = sum(q.acked_bytes for q in queues)
        due = time.monotonic() - self._verified_at >= VERIFY_EVERY_S
        if not (due or self._closing or pending >= self.buffer.limit // 4):
            return
        exists = await asyncio.wait_for(producer.topic_exists(self._topic), 10.0)
        self._verified_at = time.monotonic()
        if not exists:
            records = sum(q.acked for q in queues)
            log.warning("log_topic_lost", topic=self._topic, resending=records)
            for q in queues:
                q.acked = q.acked_bytes = 0
            await self._ensure(force=True)
            return
        for q in queues:
            for _ in range(q.acked):
                q.items.popleft()
            self.buffer.used -= q.acked_bytes
            self.shipped += q.acked
            q.acked = q.acked_bytes = 0

    async def _connect(self) -> ProducerLike:
        backoff = Backoff(0.5, 5.0)
        warned = False
        while True:
            producer = self._producer_factory()
            try:
                await producer.start()
            except asyncio.CancelledError:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(producer.stop(), 1.0)
                raise
            except Exception as e:
                if not warned:
                    log.warning("log_kafka_unavailable", error=str(e) or type(e).__name__)
                    warned = True
                with contextlib.suppress(Exception):
                    await producer.stop()
                await backoff.sleep()
                continue
            log.info("log_kafka_connected", topic=self._topic)
            await self._ensure(force=True)
            return producer

    async def _ensure(self, *, force: bool) -> None:
        now = time.monotonic()
        if not force and now - self._ensured_at < ENSURE_TOPIC_EVERY_S:
            return
        self._ensured_at = now
        try:
            await asyncio.wait_for(self._ensure_topic(), 10.0)
        except Exception as e:
            log.debug("log_topic_ensure_failed", error=str(e) or type(e).__name__)

    def _partition(self, q: _Queue) -> int:
        p = self._partition_of.get(q.key)
        if p is None:
            # The same partition a keyed send() would choose (murmur2 of the key).
            p = self._partition_of[q.key] = DefaultPartitioner()(
                q.key, self._partitions, self._partitions
            )
        return p

    async def _send_round(self, producer: ProducerLike) -> None:
        """One batch per partition, from the heads of the queues; acknowledged records
        leave the buffer, the rest stays where it was for the next round (so a retry
        sends the same records in the same order)."""
        buffer = self.buffer
        queues = [q for q in buffer.queues.values() if q.acked < len(q.items)]
        if not queues:
            return
        partitions = sorted(await producer.partitions_for(self._topic))
        if partitions != self._partitions:
            self._partitions, self._partition_of = partitions, {}
        self._round += 1
        start = self._round % len(queues)
        plans: dict[int, _Plan] = {}
        limit = self.settings.batch_records
        for q in queues[start:] + queues[:start]:
            p = self._partition(q)
            plan = plans.get(p)
            if plan is None:
                plan = plans[p] = _Plan(producer.create_batch(), p)
            if plan.full:
                continue
            n = nbytes = 0
            for ts_ms, value in itertools.islice(q.items, q.acked, None):
                if plan.count >= limit or (
                    plan.batch.append(timestamp=ts_ms, key=q.key, value=value) is None
                ):
                    plan.full = True
                    break
                plan.count += 1
                n += 1
                nbytes += len(value) + RECORD_OVERHEAD
            if n:
                plan.takes.append((q, n, nbytes))
            elif plan.count == 0:
                # Too big for any batch (a huge max_line_bytes): never sendable, so it
                # must not block its queue.
                _ts, value = q.items[q.acked]
                del q.items[q.acked]
                buffer.used -= len(value) + RECORD_OVERHEAD
                log.error("log_record_too_large", bytes=len(value))
        sent: list[tuple[_Plan, Awaitable[Any]]] = []
        error: BaseException | None = None
        for p, plan in plans.items():
            if not plan.count:
                continue
            plan.batch.close()
            try:
                sent.append((plan, await producer.send_batch(plan.batch, self._topic, partition=p)))
            except Exception as e:
                error = e
                break
        results = await asyncio.gather(*(fut for _, fut in sent), return_exceptions=True)
        reset = False
        for (plan, _), result in zip(sent, results, strict=True):
            if isinstance(result, BaseException):
                error = error or result
                continue
            if not self._offset_plausible(plan.partition, result, plan.count):
                reset = True  # sent again next round, into a topic that exists
                continue
            for q, n, nbytes in plan.takes:
                q.acked += n
                q.acked_bytes += nbytes
        if reset:
            await self._ensure(force=True)
        if error is not None:
            raise error

    # -- for tests and the benchmark --------------------------------------------------------

    def following(self) -> list[str]:
        return [cid for cid, t in self._tails.items() if t.task is not None and not t.task.done()]
