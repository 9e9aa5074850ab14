"""Kafka backend of the invocation queue (``IMAGEFN_QUEUE_BACKEND=kafka``).

Topics (``shared/kafka.py`` creates them when missing):

* ``{prefix}.invocations`` — N partitions (``invocation_partitions``, 16). One record per
  invocation: the body as the value, ``m`` (metadata JSON) and ``r`` (the function
  record's JSON) as headers — the fields of ``Invocation.encode``, unchanged.
* ``{prefix}.replies`` — M partitions (``reply_partitions``, 8). One record per result:
  the body as the value, ``m`` and ``c`` (the waiting call's id) as headers.

Consumption. Every worker is a member of the consumer group ``{prefix}.workers``,
subscribed to the invocations topic; the group's assignment decides which worker reads
which partitions. Commits are manual. A worker reads ahead as far as its free permits go
and runs what it read concurrently, finishing out of order; per partition it commits the
lowest offset not finished yet (or one past the last delivered when none is in flight),
coalesced every ``commit_interval_s``, when partitions are revoked, and at close
(``OffsetTracker``, ``shared/queue/offsets.py``). So one slow function never holds up the
others on its partition: the reading goes on and only the commit lags, which costs
nothing but duplicate runs after a crash.

At least once. ``finish`` produces the result (acks=all) *before* it marks the offset
finished, so no offset is committed past an invocation whose result is not delivered.
A worker that dies stops sending the group's heartbeats; after ``session_timeout_ms`` the
group rebalances and the partition's new owner reads on from the committed offset: the
dead worker's unfinished invocations (and any finished above the lowest unfinished one)
are delivered again through ``consume``. That is why ``keep_alive`` does nothing (the
group heartbeats, sent in the background by the client, are the liveness signal) and
``reclaim`` returns nothing (there is no claim to take over: redelivery is the group's).

``Delivery.attempt``: Kafka does not count deliveries. A record gets 2 ("may have been
delivered before") when its offset lies below the end offset its partition had when it
was assigned here, else 1; a partition nobody ever committed on counts as never read
(invocations published before any worker joined are first deliveries). So the poison
limit (``MAX_ATTEMPTS``) never trips on this backend; what bounds an invocation that
kills every worker running it is its deadline, after which a worker drops it unrun.

Results. A gateway chooses one reply partition at random when it opens the queue and
reads it with a manually assigned consumer (no group): at its first ``call`` it seeks to
the partition's end before anything is published, so it sees every result meant for it.
``reply_address()`` is ``"{replies topic}:{partition}"``. Gateways sharing a partition
skip each other's results by call id, as they skip duplicates.

Warm affinity. A worker reports its assigned partitions (``consumer_info``) in its
heartbeat; the gateway's router passes every live, non-draining worker's report to
``learn_consumers``. ``publish(inv, worker=W)`` puts the record on one of W's partitions;
without W, or when W's partitions are unknown, on a partition of any live worker (so a
dead or draining worker's partitions are avoided while the group has not moved them
yet), or, knowing none, on a random one. A rebalance between the report and the publish
only moves the record to the partition's new owner: affinity is best effort, delivery is
not.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import random
from collections.abc import Mapping, Sequence
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError, MessageSizeTooLargeError
from aiokafka.protocol.group import LeaveGroupRequest

from shared import kafka
from shared.backoff import Backoff
from shared.errors import QueueUnavailable, RequestTooLarge, ResultTooLarge, ServiceUnavailable
from shared.messages import Invocation, InvocationResult
from shared.queue.base import Delivery, InvocationQueue, raising_queue_unavailable
from shared.queue.delayed import DelayedSet
from shared.queue.offsets import OffsetTracker
from shared.settings import KafkaSettings

log = structlog.get_logger("imagefn.queue")
# The client's errors leave every public method as QueueUnavailable.
_client_errors = raising_queue_unavailable(KafkaError, OSError)

# How long a gateway's reply reader waits in one fetch when nothing arrives (a result
# ends the wait at once).
REPLY_POLL_MS = 1000
# A commit waits this long at most (the client retries while the broker is away).
COMMIT_TIMEOUT_S = 5.0
# Each step of close() (final commit, leaving the group, stopping clients) gets this long.
CLOSE_STEP_S = 10.0

Headers = list[tuple[str, bytes]]


# -- the pure parts: addresses, records, partition choice ---------------------------------


def reply_address(topic: str, partition: int) -> str:
    return f"{topic}:{partition}"


def parse_reply_address(address: str) -> tuple[str, int] | None:
    """``"topic:partition"`` → (topic, partition); None if it is not one (a reply_to
    written by another backend, say)."""
    topic, sep, raw = address.rpartition(":")
    if not sep or not topic or not (raw.isascii() and raw.isdigit()):
        return None
    return topic, int(raw)


def receipt(partition: int, offset: int) -> str:
    return f"{partition}:{offset}"


def parse_receipt(value: str) -> tuple[int, int]:
    partition, _, offset = value.partition(":")
    return int(partition), int(offset)


def invocation_record(inv: Invocation) -> tuple[bytes, Headers]:
    """The record (value, headers) of an invocation: its encoded fields, body as value."""
    fields = inv.encode()
    return fields["b"], [("m", fields["m"]), ("r", fields["r"])]


def result_record(result: InvocationResult, call_id: str) -> tuple[bytes, Headers]:
    fields = result.encode()
    return fields["b"], [("m", fields["m"]), ("c", call_id.encode())]


def _fields(value: bytes | None, headers: Sequence[tuple[str, bytes]]) -> dict[bytes, bytes]:
    fields = {k.encode(): v for k, v in headers}
    fields[b"b"] = value or b""
    return fields


def decode_invocation(value: bytes | None, headers: Sequence[tuple[str, bytes]]) -> Invocation:
    return Invocation.decode(_fields(value, headers))


def decode_result(value: bytes | None, headers: Sequence[tuple[str, bytes]]) -> InvocationResult:
    return InvocationResult.decode(_fields(value, headers))


def header(headers: Sequence[tuple[str, bytes]], name: str) -> bytes | None:
    return next((v for k, v in headers if k == name), None)


def choose_partition(
    owners: Mapping[str, Sequence[int]],
    worker: str | None,
    rng: random.Random | None = None,
    live: Sequence[int] | None = None,
) -> int | None:
    """The invocations partition for a publish: one of ``worker``'s when it reported any;
    otherwise one of any live worker's (``live``: every reported partition, computed once
    per refresh by the caller, else here); None (the producer picks) when none is known."""
    pick = (rng or random).choice
    if worker is not None and owners.get(worker):
        return pick(owners[worker])
    if live is None:
        live = live_partitions(owners)
    return pick(live) if live else None


def live_partitions(owners: Mapping[str, Sequence[int]]) -> list[int]:
    return sorted({p for parts in owners.values() for p in parts})


def partitions_of(infos: Mapping[str, Mapping[str, Any]]) -> dict[str, list[int]]:
    """Workers' ``consumer_info`` reports → worker id → partitions (bad entries skipped)."""
    out: dict[str, list[int]] = {}
    for worker, info in infos.items():
        raw = info.get("partitions") if isinstance(info, Mapping) else None
        if not isinstance(raw, list):
            continue
        parts = [p for p in raw if isinstance(p, int) and not isinstance(p, bool) and p >= 0]
        if parts:
            out[str(worker)] = parts
    return out


# -- the backend ---------------------------------------------------------------------------


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]  # aiokafka is untyped
    # Holds its consumer: the first assignment may come before ``start`` has returned.
    def __init__(self, queue: KafkaQueue, consumer: AIOKafkaConsumer) -> None:
        self._queue = queue
        self._consumer = consumer

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._queue._on_revoked(self._consumer, revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self._queue._on_assigned(self._consumer, assigned)


class KafkaQueue(InvocationQueue):
    def __init__(self, settings: KafkaSettings, delayed: DelayedSet | None = None) -> None:
        super().__init__()
        self._s = settings
        # Retries wait in Redis (shared/queue/delayed.py); a queue without one (a test of
        # the plain path) refuses publish_at.
        self._delayed = delayed
        self._topics = kafka.Topics.of(settings)
        self._group = f"{settings.topic_prefix}.workers"
        self._producer: AIOKafkaProducer | None = None
        self._reply_partition: int | None = None
        # Gateways: the reply reader (started by the first call).
        self._reply_consumer: AIOKafkaConsumer | None = None
        self._reader: asyncio.Task[None] | None = None
        self._reader_lock = asyncio.Lock()
        # Workers: the group member (started by the first consume) and its commits.
        self._member: AIOKafkaConsumer | None = None
        self._member_lock = asyncio.Lock()
        self._committer: asyncio.Task[None] | None = None
        # Commits and rebalance callbacks take turns: a commit computed before a
        # revocation must not land after the revocation's own.
        self._commit_lock = asyncio.Lock()
        self._tracker = OffsetTracker()
        # What the router last learned: worker id → its invocations partitions.
        self._owners: dict[str, list[int]] = {}
        self._live: list[int] = []
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------------

    @_client_errors
    async def open(self) -> None:
        producer = kafka.producer(self._s, max_request_size=kafka.MAX_RECORD_BYTES)
        try:
            await kafka.ensure_topics(self._s, which=("invocations", "replies"))
            await producer.start()
            parts = sorted(await producer.partitions_for(self._topics.replies))
        except KafkaError as e:
            with contextlib.suppress(KafkaError):
                await producer.stop()
            raise QueueUnavailable(f"Kafka unavailable: {e}") from e
        if not parts:
            await producer.stop()
            raise ServiceUnavailable(f"topic {self._topics.replies} has no partitions")
        self._producer = producer
        # Random, so the gateways spread over the reply partitions.
        self._reply_partition = random.choice(parts)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for task in (self._committer, self._reader):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, KafkaError):
                    await task
        self._committer = self._reader = None
        if self._member is not None:
            # What is finished is committed; leaving the group (in stop) lets the others
            # take the partitions over at once instead of after the session timeout.
            await self._bounded("final_commit", self._commit_due(self._member))
            await self._bounded("leave_group", self._leave_group(self._member))
            self._member = None
        if self._reply_consumer is not None:
            await self._bounded("reply_reader_stop", self._reply_consumer.stop())
            self._reply_consumer = None
        if self._producer is not None:
            await self._bounded("producer_stop", self._producer.stop())
            self._producer = None
        self._cancel_waiters()

    async def _leave_group(self, c: AIOKafkaConsumer) -> None:
        """Stop the group member, leaving the group so that the others rebalance at once.

        aiokafka sends LeaveGroup only for a generation above 0 (Apache Kafka counts from
        1), but Tansu numbers a group's first generation 0: a member that never saw a
        second generation would otherwise hold its partitions until the session timeout.
        So for generation 0 the queue sends it itself, once the member's heartbeats have
        stopped (the coordinator closed) and before the client closes. This reaches into
        aiokafka's coordinator; if that changes, the member just leaves by timeout."""
        try:
            coord = c._coordinator
            generation, member_id, node = coord.generation, coord.member_id, coord.coordinator_id
            await coord.close()  # heartbeats stop; LeaveGroup sent when generation > 0
            if generation == 0 and member_id and node is not None:
                await c._client.send(node, LeaveGroupRequest(self._group, member_id))
                log.info("queue_group_left", group=self._group)
        except (AttributeError, KafkaError) as e:
            log.warning("queue_leave_group_failed", error=str(e) or type(e).__name__)
        await c.stop()

    @staticmethod
    async def _bounded(step: str, aw: Any) -> None:
        try:
            await asyncio.wait_for(aw, CLOSE_STEP_S)
        except (TimeoutError, KafkaError, OSError) as e:
            log.warning("queue_close_step_failed", step=step, error=str(e) or type(e).__name__)

    # -- producer side (gateways) ----------------------------------------------------------

    def reply_address(self) -> str:
        if self._reply_partition is None:
            raise QueueUnavailable("the Kafka queue is not open")
        return reply_address(self._topics.replies, self._reply_partition)

    @_client_errors
    async def publish(self, invocation: Invocation, worker: str | None = None) -> None:
        if self._producer is None:
            raise QueueUnavailable("the Kafka queue is not open")
        value, headers = invocation_record(invocation)
        partition = choose_partition(self._owners, worker, live=self._live)
        try:
            await self._producer.send_and_wait(
                self._topics.invocations, value=value, partition=partition, headers=headers
            )
        except MessageSizeTooLargeError as e:
            raise RequestTooLarge(f"invocation too large for the queue: {e}") from e
        except KafkaError as e:
            raise QueueUnavailable(f"queue unavailable: {e}") from e

    @_client_errors
    async def publish_many(self, invocations: Sequence[Invocation]) -> None:
        if self._producer is None:
            raise QueueUnavailable("the Kafka queue is not open")
        try:
            # Hand every record to the producer first, then wait for all: they travel in
            # the producer's batches instead of one round trip each.
            sent = []
            for inv in invocations:
                value, headers = invocation_record(inv)
                partition = choose_partition(self._owners, None, live=self._live)
                sent.append(
                    await self._producer.send(
                        self._topics.invocations, value=value, partition=partition, headers=headers
                    )
                )
            await asyncio.gather(*sent)
        except MessageSizeTooLargeError as e:
            raise RequestTooLarge(f"invocation too large for the queue: {e}") from e
        except KafkaError as e:
            raise QueueUnavailable(f"queue unavailable: {e}") from e

    def _delayed_set(self) -> DelayedSet:
        if self._delayed is None:
            raise ServiceUnavailable("this Kafka queue has no retry store (Redis)")
        return self._delayed

    @_client_errors
    async def publish_at(self, invocation: Invocation, due_at: float) -> None:
        await self._delayed_set().add(invocation, due_at)

    @_client_errors
    async def release_due(self, now: float, max_count: int) -> int:
        store = self._delayed_set()
        due = await store.due(now, max_count)
        # Produced (acks=all) before removed: a release that dies between the two
        # produces the same attempt again, which the worker's attempt fence drops.
        await self.publish_many([inv for _, inv in due if inv is not None])
        await store.remove([name for name, _ in due])
        return len(due)

    def learn_consumers(self, infos: Mapping[str, Mapping[str, Any]]) -> None:
        self._owners = partitions_of(infos)
        self._live = live_partitions(self._owners)

    async def _before_call(self) -> None:
        if self._reader is not None:
            return
        async with self._reader_lock:
            if self._reader is not None or self._closed:
                return
            if self._reply_partition is None:
                raise QueueUnavailable("the Kafka queue is not open")
            tp = TopicPartition(self._topics.replies, self._reply_partition)
            c = kafka.consumer(
                self._s,
                auto_offset_reset="latest",
                max_partition_fetch_bytes=kafka.MAX_RECORD_BYTES,
                fetch_max_wait_ms=self._s.queue_fetch_wait_ms,
            )
            try:
                await c.start()
                c.assign([tp])
                await c.seek_to_end(tp)
                # Resolve the end now, before the first publish: every result produced
                # from here on lies at or after this position.
                await c.position(tp)
            except KafkaError as e:
                with contextlib.suppress(KafkaError):
                    await c.stop()
                raise QueueUnavailable(f"Kafka unavailable: {e}") from e
            self._reply_consumer = c
            # A fresh context: the reader outlives the request that happened to start it,
            # and its log lines must not carry that request's id.
            self._reader = asyncio.create_task(
                self._read_replies(c), name="queue-reply-reader", context=contextvars.Context()
            )

    async def _read_replies(self, c: AIOKafkaConsumer) -> None:
        backoff = Backoff(0.1, 2.0)
        while True:
            try:
                batches = await c.getmany(timeout_ms=REPLY_POLL_MS)
                backoff.reset()
            except KafkaError as e:
                log.warning("reply_reader_error", error=str(e))
                await backoff.sleep()
                continue
            for records in batches.values():
                for rec in records:
                    raw = header(rec.headers, "c")
                    call_id = raw.decode(errors="replace") if raw is not None else ""
                    if call_id not in self._waiters:
                        continue  # another gateway's, a late one, or a duplicate
                    try:
                        self._resolve(call_id, decode_result(rec.value, rec.headers))
                    except (KeyError, ValueError, TypeError) as e:
                        log.error("reply_undecodable", offset=rec.offset, error=str(e))

    # -- consumer side (workers) -----------------------------------------------------------

    async def _group_member(self, consumer: str) -> AIOKafkaConsumer:
        if self._member is not None:
            return self._member
        async with self._member_lock:
            if self._member is not None:
                return self._member
            if self._closed:
                raise QueueUnavailable("the Kafka queue is closed")
            c = kafka.consumer(
                self._s,
                group_id=self._group,
                client_id=f"imagefn-{consumer}",
                # A partition nobody committed yet is read from its start: invocations
                # published before any worker existed still run (expired ones are dropped).
                auto_offset_reset="earliest",
                session_timeout_ms=self._s.session_timeout_ms,
                heartbeat_interval_ms=self._s.heartbeat_interval_ms,
                # Long: a worker busy with long invocations may not read for a while and
                # must keep its partitions (its heartbeats run in the background).
                max_poll_interval_ms=self._s.max_poll_interval_ms,
                max_partition_fetch_bytes=kafka.MAX_RECORD_BYTES,
                fetch_max_wait_ms=self._s.queue_fetch_wait_ms,
            )
            c.subscribe([self._topics.invocations], listener=_Rebalance(self, c))
            try:
                await c.start()
            except KafkaError:
                with contextlib.suppress(KafkaError):
                    await c.stop()
                raise
            self._member = c
            self._committer = asyncio.create_task(
                self._commit_loop(c), name="queue-commits", context=contextvars.Context()
            )
            log.info("queue_group_joined", group=self._group, consumer=consumer)
            return c

    @_client_errors
    async def consume(self, consumer: str, max_count: int, block_s: float) -> list[Delivery]:
        c = await self._group_member(consumer)
        batches = await c.getmany(timeout_ms=max(1, int(block_s * 1000)), max_records=max_count)
        # No await from here on: a revocation cannot slip between reading the records and
        # tracking them.
        out: list[Delivery] = []
        for tp, records in batches.items():
            for rec in records:
                attempt = self._tracker.delivered(tp.partition, rec.offset)
                if attempt is None:
                    continue  # running here already (its partition came back)
                try:
                    inv = decode_invocation(rec.value, rec.headers)
                except (KeyError, ValueError, TypeError) as e:
                    # Nobody can ever run it; keeping it would only hold the commit back.
                    log.error(
                        "invocation_undecodable",
                        partition=tp.partition,
                        offset=rec.offset,
                        error=str(e),
                    )
                    self._tracker.done(tp.partition, rec.offset)
                    continue
                out.append(Delivery(inv, receipt(tp.partition, rec.offset), attempt))
        return out

    @_client_errors
    async def reclaim(self, consumer: str, max_count: int) -> list[Delivery]:
        # Nothing to take over by hand: a dead worker's partitions move to the living when
        # the group rebalances, and consume delivers its unfinished invocations again.
        return []

    @_client_errors
    async def keep_alive(self, consumer: str, deliveries: list[Delivery]) -> None:
        # The group heartbeats (in the client's background task) are the claim.
        return None

    @_client_errors
    async def finish(self, delivery: Delivery, result: InvocationResult | None) -> None:
        partition, offset = parse_receipt(delivery.receipt)
        reply_to = delivery.invocation.reply_to
        if result is not None and reply_to:
            address = parse_reply_address(reply_to)
            if address is None:
                # Never deliverable; finishing it is all that is left to do.
                log.error("reply_address_invalid", reply_to=reply_to)
            else:
                await self._reply(address, result, delivery.invocation.call_id)
        # Only now: the offset may be committed past once the result is delivered.
        self._tracker.done(partition, offset)

    async def _reply(
        self, address: tuple[str, int], result: InvocationResult, call_id: str
    ) -> None:
        if self._producer is None:
            raise QueueUnavailable("the Kafka queue is not open")
        topic, partition = address
        value, headers = result_record(result, call_id)
        try:
            await self._producer.send_and_wait(
                topic, value=value, partition=partition, headers=headers
            )
        except MessageSizeTooLargeError as e:
            # Retrying cannot help; the caller gets the reason instead of a timeout.
            err = ResultTooLarge(f"result too large for the queue ({len(value)} bytes): {e}")
            value, headers = result_record(
                InvocationResult.failure(
                    result.request_id, err, instance=result.instance, worker=result.worker
                ),
                call_id,
            )
            await self._producer.send_and_wait(
                topic, value=value, partition=partition, headers=headers
            )

    def consumer_info(self) -> dict[str, Any]:
        if self._member is None:
            return {}
        return {"partitions": self._tracker.owned()}

    # -- commits and rebalances ------------------------------------------------------------

    async def _commit_loop(self, c: AIOKafkaConsumer) -> None:
        while True:
            await asyncio.sleep(self._s.commit_interval_s)
            try:
                await self._commit_due(c)
            except asyncio.CancelledError:
                raise
            except Exception:
                # A bug here must not end the commits for good: they would only lag
                # further and further, silently.
                log.exception("queue_commit_crashed")

    async def _commit_due(self, c: AIOKafkaConsumer) -> None:
        async with self._commit_lock:
            await self._commit_locked(c)

    async def _commit_locked(
        self, c: AIOKafkaConsumer, partitions: list[int] | None = None
    ) -> None:
        points = self._tracker.due(partitions)
        if not points:
            return
        topic = self._topics.invocations
        try:
            # Bounded: the client retries a commit while the broker is away, and the
            # rebalance callbacks wait for this lock.
            await asyncio.wait_for(
                c.commit({TopicPartition(topic, p): o for p, o in points.items()}),
                COMMIT_TIMEOUT_S,
            )
        except (KafkaError, TimeoutError) as e:
            # A rebalance in progress, or the broker away: the point is committed with a
            # later round (or by the revocation); meanwhile it only lags.
            log.info("queue_commit_deferred", error=str(e) or type(e).__name__)
            return
        self._tracker.committed(points)

    async def _on_revoked(self, c: AIOKafkaConsumer, revoked: set[TopicPartition]) -> None:
        mine = sorted(tp.partition for tp in revoked if tp.topic == self._topics.invocations)
        async with self._commit_lock:
            # Commit what is finished while the partitions are still ours.
            await self._commit_locked(c, mine)
            self._tracker.revoke(mine)
        if mine:
            log.info("queue_partitions_revoked", partitions=mine)

    async def _on_assigned(self, c: AIOKafkaConsumer, assigned: set[TopicPartition]) -> None:
        tps = sorted(
            (tp for tp in assigned if tp.topic == self._topics.invocations),
            key=lambda tp: tp.partition,
        )
        if not tps:
            return
        try:
            ends: dict[TopicPartition, int] = await c.end_offsets(tps)
        except KafkaError as e:
            log.warning("queue_end_offsets_failed", error=str(e))
            ends = {}
        # Where the group stands on each partition: whether a kept state continues, and
        # which records an earlier owner may have had.
        found = await asyncio.gather(*(c.committed(tp) for tp in tps), return_exceptions=True)
        committed: dict[TopicPartition, int | None] = {}
        for tp, value in zip(tps, found, strict=True):
            if isinstance(value, BaseException):
                if not isinstance(value, KafkaError):
                    raise value
                log.warning(
                    "queue_committed_fetch_failed", partition=tp.partition, error=str(value)
                )
                value = None
            committed[tp] = value
        async with self._commit_lock:
            for tp in tps:
                seek = self._tracker.assign(
                    tp.partition, committed=committed[tp], end=int(ends.get(tp, 0))
                )
                if seek is not None:
                    c.seek(tp, seek)
        log.info(
            "queue_partitions_assigned",
            partitions=[tp.partition for tp in tps],
            ends={tp.partition: ends.get(tp) for tp in tps},
        )
