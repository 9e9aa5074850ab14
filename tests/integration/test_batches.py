"""Batches against a real Redis: the store (staging all or nothing, cancel, results, expiry)
and the feeder (concurrency, rate, crash and cancel races, a deleted function), with the
workers' own begin/finish scripts (shared/invocations.py) standing in for workers."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest
import redis.asyncio as aioredis

from shared.batches import BatchStore
from shared.errors import InvalidRequest
from shared.invocations import InvocationLog, Outcome
from shared.keys import Keys
from shared.messages import BatchResultLine, Invocation
from shared.queue.memory import MemoryQueue
from shared.registry import FunctionRegistry
from shared.settings import AsyncSettings
from shared.spec import parse_spec
from workers.feeder import BatchFeeder

pytestmark = pytest.mark.integration

SETTINGS = AsyncSettings(batch_rate_per_function=100_000, batch_ttl_s=600)


class Kit:
    def __init__(self, redis: aioredis.Redis, prefix: str, settings: AsyncSettings) -> None:
        self.redis = redis
        self.keys = Keys(prefix)
        self.settings = settings
        self.store = BatchStore(redis, self.keys, settings)
        self.queue = MemoryQueue()
        self.registry = FunctionRegistry(redis, self.keys)
        self.now = 100.0
        self.feeder = self.make_feeder()
        self.log = InvocationLog(redis, self.keys, 3600)

    def make_feeder(self) -> BatchFeeder:
        return BatchFeeder(
            self.redis, self.queue, self.keys, self.registry, self.settings, lambda: self.now
        )

    async def deploy(self, name: str = "fn", type_: str = "event") -> None:
        spec = parse_spec({"name": name, "image": "repo/fn:1", "type": type_})
        await self.registry.put(spec, "reg/repo/fn:1", "")

    async def submit(self, n: int, max_concurrency: int = 4, function: str = "fn") -> str:
        info = await self.store.create(function, "$LATEST", items(n), max_concurrency, 0, 0)
        return info.batch_id

    async def taken(self) -> list[Invocation]:
        """What the feeder published since the last call."""
        return [d.invocation for d in await self.queue.consume("w", 100_000, 0.01)]

    async def run(self, inv: Invocation, ok: bool = True) -> str:
        """One worker attempt: the fence, then the outcome (both are the workers' scripts)."""
        began = await self.log.begin(inv, "w")
        if began != "run":
            return began
        await self.finish(inv, ok)
        return "ran"

    async def finish(self, inv: Invocation, ok: bool = True) -> None:
        if ok:
            line = BatchResultLine(inv.index, inv.request_id, "succeeded", {"n": inv.index})
        else:
            error = {"type": "UserCodeError", "message": "no"}
            line = BatchResultLine(inv.index, inv.request_id, "failed", error=error)
        outcome = Outcome(
            attempt={"attempt": inv.attempt, "status": 200 if ok else 502},
            state="succeeded" if ok else "dead-lettered",
            batch_counter="succeeded" if ok else "failed",
            batch_line=line,
        )
        await self.log.finish(inv, outcome)

    async def keys_of(self, batch_id: str) -> dict[str, int]:
        """Each key of the batch that exists → its TTL (-1: none)."""
        k = self.keys
        found = {}
        for key in (k.batch(batch_id), k.batch_items(batch_id), k.batch_results(batch_id)):
            if await self.redis.exists(key):
                found[key.rsplit(":", 1)[-1]] = int(await self.redis.ttl(key))
        return found

    async def live(self) -> list[str]:
        return [m.decode() for m in await self.redis.zrange(self.keys.batches, 0, -1)]


async def items(n: int, fail_at: int | None = None) -> AsyncIterator[bytes]:
    for i in range(n):
        if i == fail_at:
            raise InvalidRequest("bad item", details={"item": i, "line": i + 1})
        yield b'{"n":%d}' % i


@pytest.fixture
async def kit(redis_url: str) -> AsyncIterator[Kit]:
    redis = aioredis.Redis.from_url(redis_url)
    prefix = f"bt-{uuid.uuid4().hex[:8]}"
    k = Kit(redis, prefix, SETTINGS)
    await k.deploy()
    yield k
    leftover = [key async for key in redis.scan_iter(f"{prefix}:*")]
    if leftover:
        await redis.delete(*leftover)
    await redis.aclose()


async def test_a_batch_is_stored_whole(kit: Kit) -> None:
    batch_id = await kit.submit(5000)
    status = await kit.store.status(batch_id)
    assert (status["total"], status["queued"], status["state"]) == (5000, 5000, "running")
    assert await kit.redis.llen(kit.keys.batch_items(batch_id)) == 5000
    assert await kit.redis.lindex(kit.keys.batch_items(batch_id), 4321) == b'{"n":4321}'
    # Running: nothing expires (the staging TTL is gone); the feeder will look at it.
    assert await kit.keys_of(batch_id) == {batch_id: -1, "items": -1}
    assert await kit.live() == [batch_id]


async def test_a_bad_item_leaves_nothing_behind(kit: Kit) -> None:
    with pytest.raises(InvalidRequest):
        await kit.store.create("fn", "$LATEST", items(7000, fail_at=6500), 4, 0, 0)
    assert [k async for k in kit.redis.scan_iter(f"{kit.keys.prefix}:batch*")] == []


async def test_the_feeder_keeps_max_concurrency_in_flight_until_done(kit: Kit) -> None:
    batch_id = await kit.submit(10, max_concurrency=3)
    assert await kit.feeder.tick() == 3
    first = await kit.taken()
    assert [i.index for i in first] == [0, 1, 2]
    assert first[0].request_id == f"{batch_id}-0" and first[0].batch == batch_id
    assert await kit.feeder.tick() == 0  # all three still in flight
    await kit.run(first[0])
    await kit.run(first[1], ok=False)
    assert await kit.feeder.tick() == 2
    status = await kit.store.status(batch_id)
    assert (status["queued"], status["in_flight"], status["succeeded"], status["failed"]) == (
        5,
        3,
        1,
        1,
    )
    pending = [first[2], *await kit.taken()]
    while pending:
        for inv in pending:
            await kit.run(inv)
        await kit.feeder.tick()
        pending = await kit.taken()
    status = await kit.store.status(batch_id)
    assert status["state"] == "completed" and status["finished_at"] is not None
    assert (status["succeeded"], status["failed"], status["eta_s"]) == (9, 1, 0.0)
    await kit.feeder.tick()  # settles it: its keys expire, the feeder forgets it
    ttls = await kit.keys_of(batch_id)
    assert "items" not in ttls and all(0 < t <= 600 for t in ttls.values()), ttls
    assert await kit.live() == []
    page = await kit.store.results(batch_id, 0, 100)
    assert page.over and [line is not None for line in page.lines] == [True] * 10
    assert b'"status":"failed"' in (page.lines[1] or b"")


async def test_the_rate_is_per_function_and_shared(kit: Kit) -> None:
    kit.settings = replace(SETTINGS, batch_rate_per_function=20)
    kit.feeder = kit.make_feeder()
    a = await kit.submit(100, max_concurrency=100)
    b = await kit.submit(100, max_concurrency=100)
    assert await kit.feeder.tick() == 10  # a full bucket: 0.5 s of 20/s
    kit.now += 0.25
    assert await kit.feeder.tick() == 5
    kit.now += 10
    assert await kit.feeder.tick() == 10  # capped: no more than 0.5 s saved up
    fed = {x: 100 - (await kit.store.status(x))["queued"] for x in (a, b)}
    assert fed == {a: 25, b: 0}  # the oldest batch first


async def test_cancel_counts_what_was_not_fed_and_running_items_finish(kit: Kit) -> None:
    batch_id = await kit.submit(50, max_concurrency=4)
    await kit.feeder.tick()
    running = await kit.taken()
    await kit.run(running[0])
    assert await kit.log.begin(running[1], "w") == "run"  # running when cancelled
    doc = await kit.store.cancel(batch_id)
    assert doc["state"] == "cancelled"
    assert (doc["queued"], doc["in_flight"], doc["cancelled"], doc["succeeded"]) == (0, 3, 46, 1)
    assert "items" not in await kit.keys_of(batch_id)  # nothing more will be fed
    assert await kit.feeder.tick() == 0
    # One was already running and finishes; two start only now: they end cancelled.
    await kit.finish(running[1])
    assert await kit.run(running[2]) == "cancelled"
    assert await kit.run(running[3]) == "cancelled"
    page = await kit.store.results(batch_id, 0, 100)
    statuses = [line and line.split(b'"status":"')[1].split(b'"')[0] for line in page.lines]
    assert statuses == [b"succeeded", b"succeeded"] + [b"cancelled"] * 48
    assert page.over
    doc = await kit.store.status(batch_id)
    assert (doc["succeeded"], doc["cancelled"], doc["state"]) == (2, 48, "cancelled")
    await kit.feeder.tick()
    assert all(0 < t <= 600 for t in (await kit.keys_of(batch_id)).values())
    assert await kit.live() == []
    # Cancelling again changes nothing.
    assert (await kit.store.cancel(batch_id))["cancelled"] == 48


async def test_a_cancel_between_publish_and_advance_counts_each_item_once(kit: Kit) -> None:
    batch_id = await kit.submit(10, max_concurrency=4)
    p = (await kit.store.progress_many([batch_id]))[0]
    assert p is not None
    # The feeder read the items and published them ...
    await kit.store.items(batch_id, 0, 4)
    # ... one starts running at once; then the batch is cancelled; then fed advances.
    record = await kit.registry.get("fn")
    published = [
        Invocation(f"{batch_id}-{i}", record, "event", mode="async", batch=batch_id, index=i)
        for i in range(4)
    ]
    began = await kit.log.begin(published[0], "w")
    assert began == "run"
    assert (await kit.store.cancel(batch_id))["cancelled"] == 10
    assert not await kit.store.advance(p, 0, 4)
    assert (await kit.store.status(batch_id))["cancelled"] == 6  # the 4 are the workers'
    await kit.run(published[1])  # began after the cancel: cancelled
    await kit.finish(published[0])
    for inv in published[2:]:
        await kit.run(inv)
    doc = await kit.store.status(batch_id)
    assert (doc["succeeded"], doc["cancelled"], doc["in_flight"]) == (1, 9, 0)
    assert doc["finished_at"] is not None
    await kit.feeder.tick()
    assert await kit.live() == []


async def test_a_crash_between_publish_and_advance_publishes_again(kit: Kit) -> None:
    batch_id = await kit.submit(6, max_concurrency=3)

    async def crash(*args: Any) -> bool:
        raise ConnectionError("scheduler died")

    kit.feeder._store.advance = crash  # type: ignore[method-assign]
    with pytest.raises(ConnectionError):
        await kit.feeder.tick()
    kit.feeder = kit.make_feeder()  # the next scheduler
    assert await kit.feeder.tick() == 3
    twice = await kit.taken()
    assert [i.index for i in twice] == [0, 1, 2, 0, 1, 2]
    results = [await kit.run(inv) for inv in twice]
    assert results == ["ran", "ran", "ran", "duplicate", "duplicate", "duplicate"]
    while (await kit.store.status(batch_id))["state"] == "running":
        await kit.feeder.tick()
        for inv in await kit.taken():
            await kit.run(inv)
    doc = await kit.store.status(batch_id)
    assert (doc["succeeded"], doc["failed"], doc["state"]) == (6, 0, "completed")


async def test_two_feeders_never_skip_an_item(kit: Kit) -> None:
    batch_id = await kit.submit(8, max_concurrency=4)
    p = (await kit.store.progress_many([batch_id]))[0]
    assert p is not None
    assert await kit.store.advance(p, 0, 4)
    assert not await kit.store.advance(p, 0, 4)  # read fed=0 too, came second
    assert (await kit.store.status(batch_id))["queued"] == 4


async def test_a_deleted_function_fails_the_rest_with_a_line_each(kit: Kit) -> None:
    batch_id = await kit.submit(2500, max_concurrency=2)
    await kit.feeder.tick()
    running = await kit.taken()
    await kit.registry.delete("fn")
    assert await kit.feeder.tick() == 0
    doc = await kit.store.status(batch_id)
    assert (doc["failed"], doc["queued"], doc["in_flight"], doc["state"]) == (2498, 0, 2, "running")
    page = await kit.store.results(batch_id, 2, 1)
    assert page.lines[0] is not None and b'"type":"FunctionNotFound"' in page.lines[0]
    assert page.lines[0].startswith(b'{"index":2,"request_id":"' + batch_id.encode() + b'-2"')
    for inv in running:
        await kit.run(inv)
    doc = await kit.store.status(batch_id)
    assert (doc["state"], doc["succeeded"], doc["failed"]) == ("completed", 2, 2498)
    await kit.feeder.tick()
    assert await kit.live() == []


async def test_a_gone_batch_is_forgotten(kit: Kit) -> None:
    batch_id = await kit.submit(3)
    await kit.redis.delete(kit.keys.batch(batch_id))
    await kit.feeder.tick()
    assert await kit.live() == []


async def test_a_redriven_item_of_a_cancelled_batch_runs(kit: Kit) -> None:
    batch_id = await kit.submit(4, max_concurrency=4)
    await kit.feeder.tick()
    items_ = await kit.taken()
    await kit.run(items_[0], ok=False)  # dead-lettered: its line says failed
    await kit.store.cancel(batch_id)
    # The user redrives it by name after the cancel: it runs (it is not "not started").
    redriven = replace(items_[0], attempt=2)
    await kit.log.requeue(redriven.request_id)  # what a redrive does first
    assert await kit.log.begin(redriven, "w") == "run"
    # An item that never started still ends cancelled.
    assert await kit.run(items_[1]) == "cancelled"


async def test_a_redriven_item_of_an_expired_batch_leaves_no_batch_keys(kit: Kit) -> None:
    batch_id = await kit.submit(2, max_concurrency=2)
    await kit.feeder.tick()
    first, _ = await kit.taken()
    await kit.run(first, ok=False)
    for key in (kit.keys.batch(batch_id), kit.keys.batch_results(batch_id)):
        await kit.redis.delete(key)  # the batch's retention passed
    await kit.log.requeue(first.request_id)  # what a redrive does first
    assert await kit.run(replace(first, attempt=2)) == "ran"
    assert not await kit.redis.exists(kit.keys.batch(batch_id), kit.keys.batch_results(batch_id))
