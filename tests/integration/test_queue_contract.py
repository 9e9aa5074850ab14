"""One contract suite for every invocation queue backend.

Each test turns one promise of ``shared/queue/base.py`` into a check, and runs on all
three backends through the ``queue_factory`` fixture: ``MemoryQueue``,
``RedisStreamsQueue`` (the session's Redis, ``redis_url``) and ``KafkaQueue`` (the
session's broker, ``kafka_broker``). Every test gets a fresh namespace (a unique key
prefix and topic prefix), so tests never see each other's invocations.

Where a backend keeps a promise in its own documented way (its module docstring, or
docs/architecture.md sections 3 and 14), the difference is a field of ``Capabilities``
and the test asserts that backend's documented behaviour. Nothing is skipped.

A new promise is one more test function taking ``queue_factory`` (see the end of the
file for delayed delivery).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, TopicPartition

import shared.kafka
from shared.keys import Keys
from shared.liveness import announce
from shared.messages import Invocation, InvocationResult
from shared.queue.base import Delivery, InvocationQueue
from shared.queue.factory import make_queue
from shared.queue.kafka import parse_receipt
from shared.queue.memory import MemoryQueue
from shared.settings import KafkaSettings, QueueSettings, Settings
from tests.unit.helpers import make_invocation, make_record

BACKENDS = ("memory", "redis", "kafka")

# An unrefreshed claim may be reclaimed after this long (memory, Redis): short, so that
# takeover costs a fraction of a second instead of the production 15 s.
RECLAIM_IDLE_S = 0.3
# Kafka group timings. Tansu completes a join or a rebalance in about half the session
# timeout, so a short one keeps each group change near a second. The heartbeat interval
# stays a tenth of it, so a member on a busy 2-core machine does not miss its session.
KAFKA_SESSION_TIMEOUT_MS = 1000
KAFKA_HEARTBEAT_MS = 100
# Two partitions: with two members each owns one, which the routing and rebalance tests
# need; more would only make every group change slower.
KAFKA_PARTITIONS = 2
# Upper bound of every wait for something that must happen (a group join, a rebalance);
# reached only when a test fails.
WAIT_S = 20.0
# "Gets nothing" means nothing within this long once the consumer is reading.
QUIET_S = 1.0
# How long one consume waits in the helpers' loops.
POLL_S = 0.1
# Kafka: a record read while this member's assignment is still being set up counts as a
# first delivery (1) although the partition's previous owner may have had it: a broken
# promise, reproduced deterministically by
# test_kafka_marks_a_redelivery_read_while_its_partition_is_being_assigned. Until it is
# fixed the shared tests accept 1 there, so that they do not fail at random; set this to
# False once that test passes.
KAFKA_ASSIGNMENT_RACE = True


# -- what differs between backends ----------------------------------------------------------


@dataclass(frozen=True)
class Capabilities:
    # memory.py: "one process, no durability": an invocation exists only in the queue
    # object it was published to. The others keep it in Redis / the broker.
    durable: bool
    # How a claim whose consumer stopped passes on. "reclaim": it lapses after the reclaim
    # idle time and ``reclaim`` hands it to another consumer (memory, Redis). "rebalance"
    # (Kafka): the claim is the partition; ``keep_alive`` does nothing, ``reclaim`` always
    # returns [], and when the member leaves the group the partition's next owner gets the
    # unfinished invocation again through ``consume``.
    takeover: Literal["reclaim", "rebalance"]
    # Delivery.attempt: an exact count (memory, Redis: times delivered), or Kafka's
    # 1 / 2 ("may have been delivered before"), which never grows past 2.
    exact_attempts: bool
    # publish(worker=W): "ignored" (memory: every consumer is the one worker),
    # "worker_stream" (Redis: W's own stream, read before the shared one, adopted by a live
    # worker once W's heartbeat is gone), "partitions" (Kafka: one of the partitions W
    # reported through consumer_info/learn_consumers; they move to a live member when W
    # leaves the group).
    routing: Literal["ignored", "worker_stream", "partitions"]
    # Whether a live consumer keeps its unfinished invocations when another consumer
    # starts. Kafka: no. A join revokes and reassigns every partition, and a partition
    # that moves is read again from its committed offset, so the new owner gets the
    # unfinished invocations (attempt 2) while the old owner still runs them
    # (docs/architecture.md section 14, "Rebalances" and the table's last row).
    claims_survive_join: bool
    # Whether delivering a result can fail at all. Memory resolves the waiting call in
    # process (it ignores reply_to); the others write to a stream / topic partition.
    reply_can_fail: bool


class QueueFactory(ABC):
    """Hands out handles on one test's queue, each opened; closes them all at the end.

    A handle stands for one process: a gateway or a worker. Tests name consumers
    ("w-a", "w-b", ...) as workers do.
    """

    backend: str
    caps: Capabilities

    def __init__(self) -> None:
        self._handles: list[InvocationQueue] = []

    @abstractmethod
    async def _new(self) -> InvocationQueue: ...

    async def __call__(self) -> InvocationQueue:
        q = await self._new()
        if q not in self._handles:
            await q.open()
            self._handles.append(q)
        return q

    def reading(self, q: InvocationQueue) -> bool:
        """Whether ``q`` has started reading: Kafka's first consume joins the group, and
        only a member with partitions can be said to "get nothing"."""
        return True

    async def publish_spread(self, q: InvocationQueue, invocations: Sequence[Invocation]) -> None:
        """Publish so that the invocations are spread over the queue's units of ownership
        (Kafka: one per partition, so that whichever partition moves takes one along)."""
        for inv in invocations:
            await q.publish(inv)

    @abstractmethod
    async def undeliverable_reply_to(self) -> str:
        """A reply address that refuses results (only where ``reply_can_fail``)."""

    @abstractmethod
    async def worker_gone(self, worker: str, q: InvocationQueue) -> None:
        """Make ``worker`` (reading through ``q``) gone as the backend sees it."""

    async def aclose(self) -> None:
        errors: list[BaseException] = []
        for q in self._handles:
            try:
                # Bounded: a close that hangs must fail this test's teardown, not the run.
                await asyncio.wait_for(q.close(), WAIT_S)
            except Exception as e:
                errors.append(e)  # the other handles are still closed
        if errors:
            raise errors[0]


class MemoryFactory(QueueFactory):
    backend = "memory"
    caps = Capabilities(
        durable=False,
        takeover="reclaim",
        exact_attempts=True,
        routing="ignored",
        claims_survive_join=True,
        reply_can_fail=False,
    )

    def __init__(self) -> None:
        super().__init__()
        # One process: every handle is the same queue (it is the whole backend).
        self.queue = MemoryQueue(reclaim_idle_s=RECLAIM_IDLE_S)

    async def _new(self) -> InvocationQueue:
        return self.queue

    async def undeliverable_reply_to(self) -> str:
        raise AssertionError("the memory queue delivers results in process; nothing refuses")

    async def worker_gone(self, worker: str, q: InvocationQueue) -> None:
        return None  # routing is ignored: nothing belongs to a worker


class RedisFactory(QueueFactory):
    backend = "redis"
    caps = Capabilities(
        durable=True,
        takeover="reclaim",
        exact_attempts=True,
        routing="worker_stream",
        claims_survive_join=True,
        reply_can_fail=True,
    )

    def __init__(self, redis_url: str, prefix: str) -> None:
        super().__init__()
        self._url = redis_url
        self.prefix = prefix
        self.settings = Settings(
            queue=QueueSettings(prefix=prefix, reclaim_idle_ms=int(RECLAIM_IDLE_S * 1000))
        )
        # One client per handle, as each process has its own; plus one for the test's own
        # look at Redis.
        self._clients: list[aioredis.Redis] = []
        self.redis = self._client()

    def _client(self) -> aioredis.Redis:
        client = aioredis.Redis.from_url(self._url)
        self._clients.append(client)
        return client

    async def _new(self) -> InvocationQueue:
        return make_queue(self.settings, self._client())

    async def undeliverable_reply_to(self) -> str:
        # A key of another type: XADD to it fails (WRONGTYPE), as it does for any key
        # when Redis refuses writes that need memory (OOM; XADD is denyoom, XACK is not).
        key = f"{self.prefix}:not-a-stream"
        await self.redis.set(key, "x")
        return key

    async def worker_gone(self, worker: str, q: InvocationQueue) -> None:
        # Dead as the Redis backend sees it: listed in the worker index, heartbeat expired.
        await announce(self.redis, Keys(self.prefix), worker, "{}", ttl_ms=1)
        await asyncio.sleep(0.05)

    async def aclose(self) -> None:
        try:
            await super().aclose()
        finally:
            with contextlib.suppress(Exception):
                keys = [k async for k in self.redis.scan_iter(f"{self.prefix}:*")]
                if keys:
                    await self.redis.delete(*keys)
            for client in self._clients:
                await client.aclose()


class KafkaFactory(RedisFactory):
    """Kafka handles; the Redis side (a client per handle, key clean-up) is
    RedisFactory's, since the Kafka backend keeps its retry store in Redis."""

    backend = "kafka"
    caps = Capabilities(
        durable=True,
        takeover="rebalance",
        exact_attempts=False,
        routing="partitions",
        claims_survive_join=False,
        reply_can_fail=True,
    )

    def __init__(self, redis_url: str, bootstrap: str, prefix: str) -> None:
        super().__init__(redis_url, prefix)
        self.kafka = KafkaSettings(
            bootstrap=bootstrap,
            topic_prefix=prefix,
            invocation_partitions=KAFKA_PARTITIONS,
            reply_partitions=1,
            session_timeout_ms=KAFKA_SESSION_TIMEOUT_MS,
            heartbeat_interval_ms=KAFKA_HEARTBEAT_MS,
        )
        # Built as gateways and workers build it (make_queue): with its Redis retry store,
        # so delayed-delivery tests can use these handles too.
        self.settings = Settings(
            queue=QueueSettings(backend="kafka", prefix=prefix), kafka=self.kafka
        )

    def reading(self, q: InvocationQueue) -> bool:
        return bool(q.consumer_info().get("partitions"))

    async def publish_spread(self, q: InvocationQueue, invocations: Sequence[Invocation]) -> None:
        # Routing by a made-up report, one "worker" per partition, is the one way the
        # interface lets a publisher choose the partition.
        q.learn_consumers({f"part-{p}": {"partitions": [p]} for p in range(KAFKA_PARTITIONS)})
        try:
            for i, inv in enumerate(invocations):
                await q.publish(inv, worker=f"part-{i % KAFKA_PARTITIONS}")
        finally:
            q.learn_consumers({})

    async def undeliverable_reply_to(self) -> str:
        # A partition the replies topic does not have: the producer refuses the record.
        return f"{self.kafka.topic_prefix}.replies:{self.kafka.reply_partitions + 5}"

    async def worker_gone(self, worker: str, q: InvocationQueue) -> None:
        # Gone as the group sees it: the member left (a clean stop; a crash ends the same
        # way after the session timeout).
        await q.close()


@pytest.fixture(params=BACKENDS)
async def queue_factory(
    request: pytest.FixtureRequest, redis_url: str, kafka_broker: str
) -> AsyncIterator[QueueFactory]:
    prefix = f"qc-{uuid.uuid4().hex[:10]}"
    factory: QueueFactory
    if request.param == "memory":
        factory = MemoryFactory()
    elif request.param == "redis":
        factory = RedisFactory(redis_url, prefix)
    else:
        factory = KafkaFactory(redis_url, kafka_broker, prefix)
    try:
        yield factory
    finally:
        await factory.aclose()


# -- helpers ---------------------------------------------------------------------------------


def invocation(request_id: str | None = None, **kw: Any) -> Invocation:
    # A deadline far enough out for the slowest test: nothing here runs it, but a worker
    # would drop an expired one unrun.
    return make_invocation(make_record(), deadline_in_s=120, request_id=request_id or uid(), **kw)


def uid() -> str:
    return uuid.uuid4().hex


def ids(deliveries: Iterable[Delivery]) -> list[str]:
    return [d.invocation.request_id for d in deliveries]


async def take(
    q: InvocationQueue,
    consumer: str,
    request_ids: Iterable[str],
    have: Sequence[Delivery] = (),
    timeout_s: float = WAIT_S,
) -> list[Delivery]:
    """Consume (a worker's consume loop) until every one of ``request_ids`` was delivered
    (``have``: what this consumer got already); returns ``have`` and everything delivered
    meanwhile. Fails naming what never came."""
    wanted = set(request_ids)
    out = list(have)
    deadline = time.monotonic() + timeout_s
    while not wanted <= set(ids(out)):
        if time.monotonic() > deadline:
            missing = sorted(wanted - set(ids(out)))
            raise AssertionError(f"{consumer} never got {missing} (got {ids(out)})")
        out += await q.consume(consumer, 10, POLL_S)
    return out


async def quiet(
    factory: QueueFactory, q: InvocationQueue, consumer: str, for_s: float = QUIET_S
) -> list[Delivery]:
    """Everything ``consumer`` gets from the moment it reads (Kafka: it owns partitions)
    until ``for_s`` later."""
    out: list[Delivery] = []
    deadline = time.monotonic() + WAIT_S
    while not factory.reading(q):
        if time.monotonic() > deadline:
            raise AssertionError(f"{consumer} never started reading")
        out += await q.consume(consumer, 10, POLL_S)
    end = time.monotonic() + for_s
    while time.monotonic() < end:
        out += await q.consume(consumer, 10, POLL_S)
    return out


async def handed_out_again(
    factory: QueueFactory, owner: InvocationQueue, consumer: str
) -> tuple[InvocationQueue, list[Delivery]]:
    """The owner of some claims stops (without finishing them); what does another
    consumer get, once the backend lets claims pass on? Returns that consumer's handle
    and what it got.

    reclaim: the owner no longer refreshes; after the reclaim idle time ``reclaim``.
    rebalance: the owner leaves the group; the partitions' next owner ``consume``s."""
    if factory.caps.takeover == "reclaim":
        await asyncio.sleep(RECLAIM_IDLE_S + 0.1)
        other = await factory()
        return other, await other.reclaim(consumer, 10)
    await owner.close()
    other = await factory()
    return other, await quiet(factory, other, consumer)


async def settle_members(members: dict[str, InvocationQueue]) -> None:
    """Kafka: run every member's consume loop until the group gave each of them
    partitions, together all of them, none twice (each join rebalances everyone)."""
    done = asyncio.Event()

    def settled() -> bool:
        parts = [q.consumer_info().get("partitions", []) for q in members.values()]
        flat = sorted(p for ps in parts for p in ps)
        return all(parts) and flat == list(range(KAFKA_PARTITIONS))

    async def loop(consumer: str, q: InvocationQueue) -> None:
        while not done.is_set():
            assert await q.consume(consumer, 10, POLL_S) == []  # nothing published yet
            if settled():
                done.set()

    await asyncio.wait_for(asyncio.gather(*(loop(c, q) for c, q in members.items())), WAIT_S)


async def pick_up(q: InvocationQueue, consumer: str, request_id: str) -> Delivery:
    """A worker's two loops, consume and reclaim, until ``request_id`` comes."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        for d in await q.consume(consumer, 10, POLL_S) + await q.reclaim(consumer, 10):
            if d.invocation.request_id == request_id:
                return d
    raise AssertionError(f"{consumer} never took over {request_id}")


def redelivery_attempts(caps: Capabilities, exact: int) -> set[int]:
    """The attempt a delivery that is the ``exact``-th may show: that number where the
    backend counts exactly; on Kafka 2 ("may have been delivered before"; 1 as well while
    KAFKA_ASSIGNMENT_RACE is open)."""
    if caps.exact_attempts:
        return {exact}
    return {1, 2} if KAFKA_ASSIGNMENT_RACE else {2}


def result_for(d: Delivery, body: bytes | None = None) -> InvocationResult:
    return InvocationResult(
        request_id=d.invocation.request_id,
        body=d.invocation.body if body is None else body,
        worker="contract",
    )


# -- the promises ------------------------------------------------------------------------------


async def test_publish_returns_once_the_invocation_is_durably_accepted(
    queue_factory: QueueFactory,
) -> None:
    """publish (and publish_many) return only once the backend holds the invocation: a
    consumer that starts after the publisher is gone still gets it, as a first delivery
    (Kafka: a partition nobody committed on counts as never read)."""
    publisher = await queue_factory()
    one, *batch = [invocation() for _ in range(4)]
    await publisher.publish(one)
    await publisher.publish_many(batch)
    wanted = [one.request_id, *(inv.request_id for inv in batch)]

    if queue_factory.caps.durable:
        # Another process, after the publishing one has gone: only the backend has it.
        await publisher.close()
        got = await take(await queue_factory(), "w-late", wanted)
    else:
        # Memory: accepted by the time publish returns (no wait needed to see it), but only
        # in that object; a second queue object is a separate, empty queue.
        assert await MemoryQueue().consume("w-other", 10, 0.01) == []
        got = []
        for _ in range(len(wanted)):
            got += await publisher.consume("w-late", 10, 0.01)
    assert sorted(ids(got)) == sorted(wanted)
    assert [d.attempt for d in got] == [1] * len(wanted)


async def test_consume_takes_at_most_max_count_each_once_and_waits_at_most_block_s(
    queue_factory: QueueFactory,
) -> None:
    """consume takes up to max_count new invocations (one more at most, when reading
    from several sources), each once, and waits up to block_s for one."""
    q = await queue_factory()
    # Kafka's first consume joins the group (seconds on Tansu): that is not a read.
    assert await quiet(queue_factory, q, "w-a", for_s=0) == []

    started = time.monotonic()
    assert await q.consume("w-a", 5, 0.3) == []
    assert time.monotonic() - started < 0.3 + 1.0

    invs = [invocation() for _ in range(7)]
    await q.publish_many(invs)
    got: list[Delivery] = []
    deadline = time.monotonic() + WAIT_S
    while len(got) < len(invs) and time.monotonic() < deadline:
        batch = await q.consume("w-a", 2, POLL_S)
        assert len(batch) <= 2 + 1, ids(batch)
        got += batch
    assert sorted(ids(got)) == sorted(inv.request_id for inv in invs)
    assert len({d.receipt for d in got}) == len(invs)
    assert {d.attempt for d in got} == {1}
    # Each once: nothing is delivered again while its claim is live.
    assert await q.consume("w-a", 10, 0.2) == []
    # Decoded as published: every field crosses every backend unchanged.
    by_id = {inv.request_id: inv for inv in invs}
    assert all(d.invocation == by_id[d.invocation.request_id] for d in got)


async def test_a_claim_that_is_not_kept_alive_goes_to_another_consumer(
    queue_factory: QueueFactory,
) -> None:
    """At least once: an invocation taken by consume stays its consumer's until finish;
    once the consumer stops keeping its claim, another consumer gets it."""
    publisher = await queue_factory()
    inv = invocation()
    await publisher.publish(inv)
    a = await queue_factory()
    [first] = await take(a, "w-a", [inv.request_id])
    assert first.attempt == 1

    b = await queue_factory()
    # Not before the claim lapsed (reclaim), and never by reclaim on Kafka, where
    # redelivery is the group's.
    assert await b.reclaim("w-b", 10) == []
    if queue_factory.caps.takeover == "rebalance":
        await a.keep_alive("w-a", [first])  # does nothing; the group heartbeats are the claim

    b, got = await handed_out_again(queue_factory, a, "w-b")
    assert ids(got) == [inv.request_id]
    [again] = got
    assert again.invocation == first.invocation
    assert again.attempt in redelivery_attempts(queue_factory.caps, 2)
    # The same entry (Redis) / partition and offset (Kafka) changed hands.
    assert again.receipt == first.receipt
    if queue_factory.caps.takeover == "reclaim":
        assert await b.reclaim("w-b", 10) == []  # the new owner's claim is fresh


async def test_a_kept_claim_stays_with_its_consumer(queue_factory: QueueFactory) -> None:
    """While the consumer keeps its claims (keep_alive; Kafka: the group membership, with
    keep_alive a no-op), nobody else gets them. Another consumer starting does not take
    them either, except on Kafka, where the join moves a partition and its unfinished
    invocations with it (claims_survive_join)."""
    publisher = await queue_factory()
    invs = [invocation() for _ in range(KAFKA_PARTITIONS)]
    await queue_factory.publish_spread(publisher, invs)
    a = await queue_factory()
    held = await take(a, "w-a", [inv.request_id for inv in invs])
    assert sorted(ids(held)) == sorted(inv.request_id for inv in invs)

    b = await queue_factory()
    if queue_factory.caps.takeover == "reclaim":
        # Refreshed well within the idle time, for three idle times.
        for _ in range(9):
            await asyncio.sleep(RECLAIM_IDLE_S / 3)
            await a.keep_alive("w-a", held)
            assert await b.reclaim("w-b", 10) == []
    else:
        owned = a.consumer_info()
        # Idle (no consume, keep_alive does nothing) for two session timeouts: the
        # client's background heartbeats keep the membership and with it the partitions.
        for _ in range(4):
            await asyncio.sleep(KAFKA_SESSION_TIMEOUT_MS / 2000)
            await a.keep_alive("w-a", held)
            assert await b.reclaim("w-b", 10) == []
        assert a.consumer_info() == owned
        assert sorted(owned["partitions"]) == list(range(KAFKA_PARTITIONS))

    # Another consumer starts reading while A still holds everything (A goes on reading
    # too, as a worker's loop does, so a rebalance completes).
    got_a, got_b = await asyncio.gather(
        quiet(queue_factory, a, "w-a"), quiet(queue_factory, b, "w-b")
    )
    assert got_a == []
    if queue_factory.caps.claims_survive_join:
        assert got_b == []
        return
    # Kafka: exactly the held invocations on B's partitions come again, marked as
    # possibly delivered before, while A still runs them.
    b_parts = set(b.consumer_info()["partitions"])
    assert b_parts, "the join gave the new member no partition"
    moved = [d for d in held if parse_receipt(d.receipt)[0] in b_parts]
    assert moved, "publish_spread put one invocation on every partition"
    assert sorted(ids(got_b)) == sorted(ids(moved))
    assert {d.attempt for d in got_b} <= redelivery_attempts(queue_factory.caps, 2)


async def test_delivery_attempt_counts_deliveries_as_far_as_the_backend_knows(
    queue_factory: QueueFactory,
) -> None:
    """Delivery.attempt: 1 on the first delivery; memory and Redis count every further
    one exactly; Kafka can only say "may have been delivered before" (2), never more, so
    the worker's poison limit (MAX_ATTEMPTS) never trips there."""
    publisher = await queue_factory()
    inv = invocation()
    await publisher.publish(inv)
    owner = await queue_factory()
    [d] = await take(owner, "w-0", [inv.request_id])
    assert d.attempt == 1
    for n in (2, 3):
        owner, got = await handed_out_again(queue_factory, owner, f"w-{n}")
        assert ids(got) == [inv.request_id]
        # Exact: 2, 3. Kafka: 2 each time, never more (its poison limit never trips).
        assert got[0].attempt in redelivery_attempts(queue_factory.caps, n), (n, got[0])


async def test_kafka_marks_a_redelivery_read_while_its_partition_is_being_assigned(
    redis_url: str,
    kafka_broker: str,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    """Kafka only (its attempt is derived from the assignment): a record below the end
    offset its partition had when assigned here is attempt 2, however soon it is read.

    aiokafka sets a new assignment, and hands out the assigned partitions' records, before
    it runs the queue's on_partitions_assigned (which reads the end and committed offsets
    and sets ``redelivery_below``). A record read in between meets no partition state;
    OffsetTracker.delivered makes one with redelivery_below 0, so the redelivery counts 1.
    The window is two broker round trips; here the broker's end-offsets answer is slowed
    (a busy broker) so the read lands in it every time. Seen unprovoked too:
    test_a_kept_claim_stays_with_its_consumer[kafka] failed this way in one of seven runs
    here, before the shared tests allowed for it (KAFKA_ASSIGNMENT_RACE).
    """
    # strict: this fails once the backend keeps the promise; drop the marker and set
    # KAFKA_ASSIGNMENT_RACE to False then.
    request.applymarker(
        pytest.mark.xfail(
            strict=True,
            reason="Kafka counts a redelivery read before its assignment callback ran as 1",
        )
    )
    factory = KafkaFactory(redis_url, kafka_broker, f"qc-{uuid.uuid4().hex[:10]}")
    try:
        publisher = await factory()
        inv = invocation()
        await publisher.publish(inv)
        first = await factory()
        [d] = await take(first, "w-1", [inv.request_id])
        assert d.attempt == 1
        # Left without finishing; the next member's assignment answers slowly.
        await first.close()
        monkeypatch.setattr(shared.kafka, "consumer", slow_end_offsets(shared.kafka.consumer))
        [again] = await take(await factory(), "w-2", [inv.request_id])
        assert again.attempt == 2
    finally:
        await factory.aclose()


def slow_end_offsets(make: Callable[..., AIOKafkaConsumer]) -> Callable[..., AIOKafkaConsumer]:
    """``shared.kafka.consumer`` whose group members take 0.5 s to learn end offsets."""

    def consumer(settings: KafkaSettings, *topics: str, **options: Any) -> AIOKafkaConsumer:
        c = make(settings, *topics, **options)
        if options.get("group_id"):
            fast = c.end_offsets

            async def end_offsets(partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
                await asyncio.sleep(0.5)
                result: dict[TopicPartition, int] = await fast(partitions)
                return result

            c.end_offsets = end_offsets
        return c

    return consumer


async def test_call_returns_the_result_and_finish_acknowledges(
    queue_factory: QueueFactory,
) -> None:
    """call publishes and returns the result a worker finished with; finish delivers it
    to reply_to (when there is one; none for a result of None) and acknowledges: the
    invocation is not handed out again."""
    gateway = await queue_factory()
    worker = await queue_factory()
    fire_and_forget = invocation()
    await gateway.publish(fire_and_forget)
    inv = invocation(body=b'{"n": 1}', reply_to=gateway.reply_address())
    call = asyncio.create_task(gateway.call(inv, WAIT_S))

    got = await take(worker, "w-a", [inv.request_id, fire_and_forget.request_id])
    [d] = [d for d in got if d.invocation.request_id == inv.request_id]
    # The queue stamped a call id; everything else crossed as published.
    assert d.invocation.call_id
    assert d.invocation == replace(inv, call_id=d.invocation.call_id)
    result = result_for(d, b"result")
    await worker.finish(d, result)
    assert await asyncio.wait_for(call, WAIT_S) == result

    [plain] = [d for d in got if d.invocation.request_id == fire_and_forget.request_id]
    await worker.finish(plain, None)
    _, again = await handed_out_again(queue_factory, worker, "w-b")
    assert again == []


async def test_call_without_a_result_in_time_returns_none(queue_factory: QueueFactory) -> None:
    gateway = await queue_factory()
    started = time.monotonic()
    result = await gateway.call(invocation(reply_to=gateway.reply_address()), 0.3)
    elapsed = time.monotonic() - started
    assert result is None
    # It waited its timeout, not much more (Kafka starts its reply reader first).
    assert 0.3 <= elapsed < 0.3 + 5.0


async def test_two_callers_with_the_same_request_id_each_get_their_own_result(
    queue_factory: QueueFactory,
) -> None:
    """Results find their call by the call id, not the request id: two calls on one
    gateway and one on another, all with one request id, each get their own result,
    whatever order they are finished in."""
    g1, g2 = await queue_factory(), await queue_factory()
    worker = await queue_factory()
    rid = uid()
    calls = {
        body: asyncio.create_task(
            g.call(invocation(rid, body=body, reply_to=g.reply_address()), WAIT_S)
        )
        for g, body in ((g1, b"one"), (g1, b"two"), (g2, b"three"))
    }
    got: list[Delivery] = []
    deadline = time.monotonic() + WAIT_S
    while len(got) < len(calls) and time.monotonic() < deadline:
        got += await worker.consume("w-a", 10, POLL_S)
    assert sorted(d.invocation.body for d in got) == sorted(calls)
    assert len({d.invocation.call_id for d in got}) == len(calls)
    # The last caller's first: a mix-up by request id would hand it to the first waiter.
    for d in reversed(got):
        await worker.finish(d, result_for(d))
    for body, call in calls.items():
        result = await asyncio.wait_for(call, WAIT_S)
        assert result is not None and (result.request_id, result.body) == (rid, body)


async def test_finish_acknowledges_only_after_the_result_is_delivered(
    queue_factory: QueueFactory, request: pytest.FixtureRequest
) -> None:
    """finish delivers the result to reply_to *before* acknowledging: when the result
    cannot be delivered, finish fails and the invocation stays unacknowledged, so it is
    handed out again rather than lost."""
    publisher = await queue_factory()
    if not queue_factory.caps.reply_can_fail:
        # Memory resolves the waiting call in process, which cannot fail: the result is
        # recorded and the waiter resolved first, then the claim is dropped.
        inv = invocation()
        await publisher.publish(inv)
        [d] = await take(publisher, "w-a", [inv.request_id])
        assert isinstance(publisher, MemoryQueue)
        await publisher.finish(d, result_for(d))
        assert publisher.results == [result_for(d)]
        assert publisher.pending_count == 0
        return

    inv = invocation(reply_to=await queue_factory.undeliverable_reply_to(), call_id=uid())
    await publisher.publish(inv)
    a = await queue_factory()
    [d] = await take(a, "w-a", [inv.request_id])
    failed = False
    try:
        await a.finish(d, result_for(d))
    except Exception:
        failed = True
    assert failed, "finish reported success for a result it could not deliver"
    _, again = await handed_out_again(queue_factory, a, "w-b")
    assert ids(again) == [inv.request_id], "acknowledged although its result was not delivered"


async def test_a_routed_invocation_goes_to_its_worker_and_to_a_live_one_when_it_is_gone(
    queue_factory: QueueFactory,
) -> None:
    """publish/call with a worker: that worker takes it (before shared work, where the
    backend has shared work); once that worker is gone, a live one takes it over.
    Routing is best effort, delivery is not."""
    caps = queue_factory.caps
    gateway = await queue_factory()
    target, other = await queue_factory(), await queue_factory()

    if caps.routing == "ignored":
        # Memory: one process, every consumer is "the" worker; the target changes nothing.
        inv = invocation()
        await gateway.publish(inv, worker="w-target")
        assert ids(await take(other, "w-other", [inv.request_id])) == [inv.request_id]
        assert target.consumer_info() == {} == other.consumer_info()
        return

    if caps.routing == "partitions":
        # Both members, partitions split between them, reported to the gateway as the
        # workers' heartbeats and the router would.
        await settle_members({"w-target": target, "w-other": other})
        gateway.learn_consumers(
            {"w-target": target.consumer_info(), "w-other": other.consumer_info()}
        )
    else:
        assert target.consumer_info() == {}  # Redis routes by stream name, needs no report

    unrouted = invocation()
    await gateway.publish(unrouted)
    routed = [invocation() for _ in range(3)]
    for inv in routed:
        await gateway.publish(inv, worker="w-target")
    routed_call = invocation(reply_to=gateway.reply_address())
    call = asyncio.create_task(gateway.call(routed_call, WAIT_S, worker="w-target"))
    routed_ids = {inv.request_id for inv in [*routed, routed_call]}

    first_batch = await target.consume("w-target", 10, 1.0)
    got_target = await take(target, "w-target", routed_ids, have=first_batch)
    if caps.routing == "worker_stream":
        # Its own stream before the shared one, although the unrouted invocation came first.
        kinds = [d.invocation.request_id in routed_ids for d in first_batch]
        assert kinds and kinds == sorted(kinds, reverse=True), ids(first_batch)
    got_other = await quiet(queue_factory, other, "w-other")
    assert not routed_ids & set(ids(got_other)), "another worker took a routed invocation"
    # The unrouted one: delivered once, to whichever worker (Kafka: a live one's partition).
    got_target += await quiet(queue_factory, target, "w-target", for_s=0.2)
    assert ids(got_target + got_other).count(unrouted.request_id) == 1
    # Finished as a worker does (a result to the waiting call): nothing of this is left
    # to hand over below.
    for d in got_target + got_other:
        await (target if d in got_target else other).finish(d, result_for(d))
    result = await asyncio.wait_for(call, WAIT_S)
    assert result is not None and result.request_id == routed_call.request_id

    # The target goes away; the gateway still routes by what it last learned.
    await queue_factory.worker_gone("w-target", target)
    late = invocation()
    await gateway.publish(late, worker="w-target")
    got = await pick_up(other, "w-other", late.request_id)
    # Redis adopts the dead worker's stream: a first delivery. Kafka cannot tell a record
    # published before the new owner's assignment from one read before (attempt 2).
    assert got.attempt == 1 or not caps.exact_attempts


async def test_close_is_idempotent(queue_factory: QueueFactory) -> None:
    """close, once the queue started what it starts lazily (the reply reader; Kafka's
    group member), may be called again; the fixture closes every handle once more."""
    q = await queue_factory()
    assert await q.call(invocation(reply_to=q.reply_address()), 0.05) is None
    await quiet(queue_factory, q, "w-a", for_s=0)
    for _ in range(2):
        await asyncio.wait_for(q.close(), WAIT_S)


# -- delayed delivery -------------------------------------------------------------------------
#
# publish_at(inv, due_at) / release_due(now, max_count) go here, one test function per
# promise, each taking ``queue_factory`` like the tests above. Every handle the factory
# gives is built by make_queue, so the Kafka ones carry their Redis retry store.


async def test_a_delayed_invocation_is_delivered_only_once_it_is_due_and_released(
    queue_factory: QueueFactory,
) -> None:
    """publish_at keeps it from every consumer; release_due before its time moves
    nothing; at its time it moves once and is consumed like a published one."""
    q = await queue_factory()
    worker = await queue_factory() if queue_factory.caps.durable else q
    due = time.time() + 3600
    inv = replace(invocation(), mode="async", attempt=2)
    await q.publish_at(inv, due)
    assert await quiet(queue_factory, worker, "w-a", for_s=0.3) == []
    assert await q.release_due(due - 1, 100) == 0
    assert await q.release_due(due, 100) == 1
    [d] = await take(worker, "w-a", [inv.request_id])
    assert d.invocation == inv  # every field, the async ones included, crosses
    assert await q.release_due(due + 1, 100) == 0  # moved once


async def test_scheduling_the_same_attempt_twice_keeps_it_once(
    queue_factory: QueueFactory,
) -> None:
    """A duplicate delivery that schedules the same retry again changes nothing: one
    (request id, attempt) is kept once; another attempt of it is another entry."""
    q = await queue_factory()
    inv = replace(invocation(), mode="async", attempt=2)
    await q.publish_at(inv, time.time() - 1)
    await q.publish_at(inv, time.time() - 1)
    await q.publish_at(replace(inv, attempt=3), time.time() - 1)
    assert await q.release_due(time.time(), 100) == 2
    got = await take(q, "w-a", [inv.request_id])
    await asyncio.sleep(0.5)
    got += await q.consume("w-a", 10, POLL_S)
    assert sorted(d.invocation.attempt for d in got) == [2, 3]


async def test_release_due_moves_at_most_max_count_oldest_first(
    queue_factory: QueueFactory,
) -> None:
    q = await queue_factory()
    now = time.time()
    invs = [replace(invocation(), mode="async", attempt=2) for _ in range(5)]
    for i, inv in enumerate(invs):
        await q.publish_at(inv, now - 10 + i)
    assert await q.release_due(now, 2) == 2
    first = await take(q, "w-a", [i.request_id for i in invs[:2]])
    assert sorted(ids(first)) == sorted(i.request_id for i in invs[:2])
    assert await q.release_due(now, 100) == 3
    await take(q, "w-a", [i.request_id for i in invs[2:]], have=first)


async def test_publish_many_accepts_every_invocation(queue_factory: QueueFactory) -> None:
    q = await queue_factory()
    worker = await queue_factory() if queue_factory.caps.durable else q
    invs = [invocation() for _ in range(50)]
    await q.publish_many(invs)
    got = await take(worker, "w-a", [i.request_id for i in invs])
    assert sorted(ids(got)) == sorted(i.request_id for i in invs)
