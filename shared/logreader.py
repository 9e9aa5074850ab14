"""Reading a function's log records back out of Kafka: the engine of the logs API.

Every record of one function is on one partition of ``{prefix}.logs`` (records are keyed
by the function name and producers use the default partitioner: murmur2 of the key, as
Java's client, modulo the partition count), so a query reads that one partition, with a
consumer of its own: manually assigned, in no group, committing nothing.

A query reads in two parts:

* the **backlog**: the records already in Kafka when the query started, from the offset
  ``since`` seeks to up to the end offset taken at the start. Only the newest ``limit``
  matching records are given (like ``tail -n``), oldest first; how many older ones were
  left out is counted. Memory stays bounded: the kept records are held only while they
  fit in ``BACKLOG_MEMORY_BYTES``; past that only their offsets are, and the kept
  records are read a second time.
* the **live** part (followers): records appended after the start, as they arrive.

``until`` only filters: the backlog is always read to the end offset. Records of one
function come from several workers whose clocks and shipping delays differ, and a worker
that kept its lines through a Kafka outage ships them minutes late, so a record written
before ``until`` can sit anywhere after the first one written after it; stopping early
would lose exactly the lines of an incident. The partition's retention bounds the read.

Seeking by time: Kafka's ``offsets_for_times`` answers the first offset whose timestamp is
at or after the time asked. Producers set the timestamp to the record's ``ts``; a broker
that indexes by append time instead (Tansu does) answers an offset at or before every
record with ``ts >= since`` as well, since a record is appended after it was written. So
the seek never skips a record of the range; ``LogQuery.matches`` drops the extra ones.
Tansu answers "no record that late" with offset 0 and timestamp -1 rather than nothing:
that is read as "none" too (starting at offset 0 would read the whole partition).

Duplicates: producers retry at least once, so a record may be in Kafka twice;
``SeqDeduper`` drops the second by (instance, seq).
"""

from __future__ import annotations

import asyncio
import bisect
import time
from collections import OrderedDict, deque
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.partitioner import murmur2

from shared import logrecords
from shared.errors import ServiceUnavailable
from shared.kafka import Topics, consumer, ensure_topics
from shared.logrecords import LogQuery
from shared.settings import KafkaSettings, LogSettings

log = structlog.get_logger("imagefn.logs")

# The window a query without ``since`` reads: the last hour, or, for one request id, the
# last day (a request id is often looked up well after the call; the topic's retention
# bounds it anyway).
DEFAULT_WINDOW_S = 3600.0
REQUEST_WINDOW_S = 86400.0
# Backlog records are held in memory up to this many bytes (their size in Kafka); past
# it, the kept ones are read a second time instead.
BACKLOG_MEMORY_BYTES = 4 * 1024 * 1024
# Bounds of the duplicate filter (see SeqDeduper).
MAX_DEDUPE_INSTANCES = 4096
MAX_DEDUPE_RUNS = 256
# Records asked of the consumer at once.
BATCH_RECORDS = 500


def partition_for(function: str, partitions: int) -> int:
    """The partition the producers' default partitioner puts ``function``'s records on,
    for a topic of ``partitions`` partitions (ids 0..n-1)."""
    return int(murmur2(function.encode("utf-8")) & 0x7FFFFFFF) % partitions


def with_default_window(query: LogQuery, now: float) -> LogQuery:
    """``query`` with ``since`` filled in when it has none (see DEFAULT_WINDOW_S)."""
    if query.since is not None:
        return query
    window = REQUEST_WINDOW_S if query.request_id is not None else DEFAULT_WINDOW_S
    return replace(query, since=now - window)


def is_report_of(record: dict[str, Any], request_id: str | None) -> bool:
    """Whether ``record`` is the REPORT that closes the records of ``request_id``."""
    return (
        request_id is not None
        and record.get("type") == logrecords.REPORT
        and record.get("request_id") == request_id
    )


class SeqDeduper:
    """Tells records seen before apart by (instance, seq), in bounded memory.

    An instance's seqs come one after the other, so the seen ones are kept as disjoint
    runs ``[lo, hi]``: a handful per instance however long the stream. Past the bounds
    the oldest knowledge is forgotten (the least recently seen instance, an instance's
    lowest run), which can only let a duplicate through, never drop a record that was
    not seen. Records without an instance or an integer seq are always new.
    """

    def __init__(
        self, max_instances: int = MAX_DEDUPE_INSTANCES, max_runs: int = MAX_DEDUPE_RUNS
    ) -> None:
        self._max_instances = max_instances
        self._max_runs = max_runs
        # instance -> (run starts, run ends), both sorted; least recently seen first.
        self._runs: OrderedDict[str, tuple[list[int], list[int]]] = OrderedDict()
        self.dropped = 0

    def first_time(self, record: dict[str, Any]) -> bool:
        instance, seq = record.get("instance"), record.get("seq")
        if not isinstance(instance, str) or not isinstance(seq, int) or isinstance(seq, bool):
            return True
        runs = self._runs.get(instance)
        if runs is None:
            runs = ([], [])
            self._runs[instance] = runs
            if len(self._runs) > self._max_instances:
                self._runs.popitem(last=False)
        else:
            self._runs.move_to_end(instance)
        los, his = runs
        i = bisect.bisect_right(los, seq) - 1
        if i >= 0 and seq <= his[i]:
            self.dropped += 1
            return False
        joins_left = i >= 0 and his[i] == seq - 1
        joins_right = i + 1 < len(los) and los[i + 1] == seq + 1
        if joins_left and joins_right:
            his[i] = his[i + 1]
            del los[i + 1], his[i + 1]
        elif joins_left:
            his[i] = seq
        elif joins_right:
            los[i + 1] = seq
        else:
            los.insert(i + 1, seq)
            his.insert(i + 1, seq)
            if len(los) > self._max_runs:
                del los[0], his[0]
        return True


@dataclass
class _Kept:
    offset: int
    size: int
    record: dict[str, Any] | None  # None once the backlog outgrew the memory budget


class Backlog:
    """The newest ``limit`` matching records of the backlog; iterate ``records()`` once."""

    def __init__(self, stream: LogStream, kept: deque[_Kept], matched: int, report_seen: bool):
        self._stream = stream
        self._kept = kept
        self.matched = matched
        self.omitted = matched - len(kept)
        # The query's request id has its REPORT in the backlog (omitted or not).
        self.report_seen = report_seen

    async def records(self) -> AsyncGenerator[dict[str, Any]]:
        if not self._kept:
            return
        if all(k.record is not None for k in self._kept):
            for k in self._kept:
                assert k.record is not None
                yield k.record
            return
        wanted = {k.offset for k in self._kept}
        first, last = self._kept[0].offset, self._kept[-1].offset
        async with aclosing(self._stream._read(first, last + 1)) as again:
            async for offset, _, record in again:
                if offset in wanted:
                    yield record


class LogStream:
    """One query's position in its partition. ``backlog()`` first, then ``live()``."""

    def __init__(
        self,
        kafka_consumer: AIOKafkaConsumer,
        tp: TopicPartition,
        query: LogQuery,
        *,
        start: int,
        end: int,
        stall_s: float,
    ) -> None:
        self._c = kafka_consumer
        self._tp = tp
        self.query = query
        self._start, self._end = start, end
        self._stall_s = stall_s
        self._key = query.function.encode("utf-8")
        self.dedupe = SeqDeduper()
        self.unreadable = 0

    @property
    def partition(self) -> int:
        return int(self._tp.partition)

    async def backlog(self, limit: int) -> Backlog:
        """Read the backlog once, keeping the newest ``limit`` matching records."""
        kept: deque[_Kept] = deque()
        held = 0
        in_memory = True
        matched = 0
        report_seen = False
        async for offset, size, record in self._read(self._start, self._end):
            if not self.dedupe.first_time(record) or not self.query.matches(record):
                continue
            matched += 1
            report_seen = report_seen or is_report_of(record, self.query.request_id)
            if len(kept) == limit:
                held -= kept.popleft().size
            kept.append(_Kept(offset, size, record if in_memory else None))
            if in_memory:
                held += size
                if held > BACKLOG_MEMORY_BYTES:
                    in_memory = False
                    held = 0
                    for k in kept:
                        k.record, k.size = None, 0
        return Backlog(self, kept, matched, report_seen)

    async def live(self, poll_s: float) -> AsyncGenerator[dict[str, Any] | None]:
        """Matching records appended after the query started, as they arrive. Yields
        ``None`` after every poll (at most ``poll_s`` apart), so the caller can look at
        its own reasons to stop even while nothing matches."""
        await self._seek(self._end)
        while True:
            for message in await self._poll(poll_s):
                record = self._parse(message)
                if (
                    record is not None
                    and self.dedupe.first_time(record)
                    and self.query.matches(record)
                ):
                    yield record
            yield None

    async def _seek(self, offset: int) -> None:
        # A seek drops what the consumer fetched ahead and waits out a fetch in flight
        # (up to fetch_max_wait_ms): skip it when already there.
        if await self._position() != offset:
            self._c.seek(self._tp, offset)

    async def _position(self) -> int:
        try:
            return int(await self._c.position(self._tp))
        except KafkaError as e:
            raise ServiceUnavailable(f"reading the logs from Kafka failed: {e}") from e

    async def _poll(self, wait_s: float) -> list[ConsumerRecord[bytes, bytes]]:
        try:
            batch = await self._c.getmany(
                self._tp, timeout_ms=int(wait_s * 1000), max_records=BATCH_RECORDS
            )
        except KafkaError as e:
            raise ServiceUnavailable(f"reading the logs from Kafka failed: {e}") from e
        messages: list[ConsumerRecord[bytes, bytes]] = batch.get(self._tp, [])
        return messages

    async def _read(self, start: int, stop: int) -> AsyncGenerator[tuple[int, int, dict[str, Any]]]:
        """(offset, size, record) of the query's function's records in [start, stop)."""
        if start >= stop:
            return
        await self._seek(start)
        progress = time.monotonic()
        while True:
            messages = await self._poll(0.5)
            if not messages:
                # Offsets may be missing (control records, retention): the position
                # still moves past them.
                if await self._position() >= stop:
                    return
                if time.monotonic() - progress > self._stall_s:
                    raise ServiceUnavailable(
                        f"Kafka stopped answering while the logs were read "
                        f"(partition {self._tp.partition}, offset "
                        f"{await self._position()} of {stop})"
                    )
                continue
            progress = time.monotonic()
            for message in messages:
                if message.offset >= stop:
                    return
                record = self._parse(message)
                if record is not None:
                    yield message.offset, len(message.value or b""), record
            if messages[-1].offset + 1 >= stop:
                return

    def _parse(self, message: ConsumerRecord[bytes, bytes]) -> dict[str, Any] | None:
        """The record if it is one of the query's function, else None."""
        if message.key is not None and message.key != self._key:
            return None  # another function on this partition: no need to parse it
        try:
            record = logrecords.loads(message.value)
        except (ValueError, TypeError):
            self.unreadable += 1
            return None
        if record.get("function") != self.query.function:
            return None
        if not _well_formed(record):
            self.unreadable += 1
            return None
        return record


def _well_formed(record: dict[str, Any]) -> bool:
    """Whether the fields ``LogQuery.matches`` reads have their types: one malformed
    record must not break every query of its function."""
    ts = record.get("ts")
    concurrent = record.get("concurrent")
    return (
        isinstance(ts, int | float)
        and not isinstance(ts, bool)
        and (concurrent is None or isinstance(concurrent, list))
    )


class LogReader:
    """Opens log streams; holds no connection between them."""

    def __init__(
        self,
        kafka: KafkaSettings,
        logs: LogSettings,
        *,
        open_timeout_s: float = 10.0,
        close_timeout_s: float = 5.0,
        stall_s: float = 10.0,
    ) -> None:
        self._kafka = kafka
        self._logs = logs
        self._topic = Topics.of(kafka).logs
        self._open_timeout_s = open_timeout_s
        self._close_timeout_s = close_timeout_s
        self._stall_s = stall_s

    @asynccontextmanager
    async def open(self, query: LogQuery, *, now: float | None = None) -> AsyncIterator[LogStream]:
        """A stream positioned at the start of ``query``'s backlog (``since`` defaulted,
        see ``with_default_window``). Raises ServiceUnavailable when Kafka cannot
        answer. The consumer is closed on leaving, however that happens."""
        query = with_default_window(query, time.time() if now is None else now)
        kafka_consumer, partitions = await self._connect()
        try:
            tp = TopicPartition(self._topic, partition_for(query.function, partitions))
            try:
                start, end = await asyncio.wait_for(
                    self._offsets(kafka_consumer, tp, query), self._open_timeout_s
                )
            except (KafkaError, TimeoutError) as e:
                raise self._unavailable(e) from e
            # Seek before the consumer's first fetch: a seek later waits one out.
            kafka_consumer.assign([tp])
            kafka_consumer.seek(tp, start)
            yield LogStream(kafka_consumer, tp, query, start=start, end=end, stall_s=self._stall_s)
        finally:
            await self._close(kafka_consumer)

    def _unavailable(self, e: BaseException) -> ServiceUnavailable:
        reason = str(e) or type(e).__name__
        return ServiceUnavailable(f"Kafka at {self._kafka.bootstrap} unavailable: {reason}")

    async def _connect(self) -> tuple[AIOKafkaConsumer, int]:
        """A started consumer and the logs topic's partition count, creating the topic
        if nothing made it yet (a query may come before any worker shipped a line)."""
        for attempt in range(2):
            c = consumer(
                self._kafka,
                client_id="imagefn-logs",
                # Where a seek lands on a deleted offset (retention), go to the oldest.
                auto_offset_reset="earliest",
                request_timeout_ms=int(self._open_timeout_s * 1000),
            )
            try:
                await asyncio.wait_for(c.start(), self._open_timeout_s)
                # The start fetched every topic's metadata.
                partitions = c.partitions_for_topic(self._topic)
            except (KafkaError, OSError, TimeoutError) as e:
                await self._close(c)
                raise self._unavailable(e) from e
            except BaseException:
                await self._close(c)
                raise
            if partitions:
                return c, len(partitions)
            await self._close(c)
            if attempt == 0:
                try:
                    await asyncio.wait_for(
                        ensure_topics(self._kafka, self._logs, which=("logs",)),
                        self._open_timeout_s,
                    )
                except (KafkaError, OSError, TimeoutError) as e:
                    raise self._unavailable(e) from e
        raise ServiceUnavailable(f"the logs topic {self._topic} has no partitions in Kafka")

    async def _offsets(
        self, c: AIOKafkaConsumer, tp: TopicPartition, query: LogQuery
    ) -> tuple[int, int]:
        """(start, end): the backlog is [start, end); live reading starts at end."""
        end = int((await c.end_offsets([tp]))[tp])
        if query.since is None:
            start = int((await c.beginning_offsets([tp]))[tp])
        else:
            start = await self._offset_at(c, tp, query.since, end)
        return start, end

    @staticmethod
    async def _offset_at(c: AIOKafkaConsumer, tp: TopicPartition, ts: float, end: int) -> int:
        """The first offset at or after time ``ts``; ``end`` if there is none."""
        found = (await c.offsets_for_times({tp: max(0, int(ts * 1000))}))[tp]
        if found is None or found.offset < 0 or found.timestamp < 0:
            return end
        return min(int(found.offset), end)

    async def _close(self, c: AIOKafkaConsumer) -> None:
        try:
            await asyncio.wait_for(c.stop(), self._close_timeout_s)
        except TimeoutError:
            log.warning("logs_consumer_close_timeout", timeout_s=self._close_timeout_s)
        except KafkaError as e:
            log.warning("logs_consumer_close_failed", error=str(e))
