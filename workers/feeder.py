"""The batch feeder: moves items of running batches into the invocation queue, no faster
than each batch's ``max_concurrency`` and each function's rate allow
(docs/architecture.md, section 15, "Batches"). The scheduler calls ``tick`` about every
0.1 s while it holds its lease, so one feeder acts at a time.

Per batch and tick: items in flight are ``fed - (succeeded + failed + cancelled)``; up to
``max_concurrency`` minus those are fed, and no more than the function's token bucket
holds (``batch_rate_per_function`` items/s, shared by all batches of the function, so a
big batch cannot flood the queue ahead of other functions' calls). Batches are served
oldest first.

Order: items are published (``queue.publish_many``, durable when it returns), THEN
``fed`` advances (one script, fenced on ``fed`` still being where this tick read it). A
crash between the two publishes those items again on a later tick: the worker's attempt
fence (``begin`` in shared/invocations.py) drops the duplicate delivery of a finished
attempt and ``finish`` counts each item once, so that is safe; advancing first instead
could lose items. Two feeders racing (a lease lost midway) likewise publish duplicates
but never skip an item: the second advance finds ``fed`` moved and does nothing.

The function record is resolved once per (function, qualifier) and tick. When the
function or the qualifier is gone (or the function is now a web function), the items not
fed yet fail at once, each with its result line naming the error, and the batch
completes once the items in flight are done: nothing accepted is silently dropped.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import redis.asyncio as aioredis
import structlog

from shared.batches import RUNNING, BatchProgress, BatchStore
from shared.errors import FunctionNotFound, ImagefnError, InvalidRequest, VersionNotFound
from shared.keys import Keys
from shared.messages import Invocation, batch_item_id
from shared.queue.base import InvocationPublisher
from shared.registry import LATEST, FunctionRegistry
from shared.settings import AsyncSettings
from shared.spec import FunctionRecord

log = structlog.get_logger("imagefn.feeder")

# Items read and published at once (bounds the memory of a tick: items are <= 128 KB).
FEED_CHUNK = 256
# Batches looked at per tick (the oldest first).
MAX_BATCHES = 10_000
# A function's bucket holds at most this many seconds of its rate: a late tick loses
# nothing, an idle function cannot save up a flood.
BURST_S = 0.5
# Items of a batch whose function is gone, failed per script call and per tick.
FAIL_CHUNK = 1000
FAIL_PER_TICK = 20_000


# -- pure parts --------------------------------------------------------------------------


@dataclass(frozen=True)
class Bucket:
    """A token bucket: ``tokens`` items may be fed as of time ``at``."""

    tokens: float
    at: float


def refill(bucket: Bucket | None, now: float, rate: float, burst_s: float = BURST_S) -> Bucket:
    """The bucket at ``now``: it fills at ``rate`` items/s up to ``rate * burst_s`` (at
    least one item); a new one starts full."""
    cap = max(1.0, rate * burst_s)
    if bucket is None:
        return Bucket(cap, now)
    return Bucket(min(cap, bucket.tokens + max(0.0, now - bucket.at) * rate), now)


def spend(bucket: Bucket, items: int) -> Bucket:
    return Bucket(bucket.tokens - items, bucket.at)


def to_feed(total: int, fed: int, counted: int, max_concurrency: int, budget: float) -> int:
    """How many items a batch gets now: room under its concurrency, at most what is left,
    at most the whole tokens in the function's bucket."""
    in_flight = max(0, fed - counted)
    return max(0, min(max_concurrency - in_flight, total - fed, int(budget)))


def version_of(qualifier: str, record: FunctionRecord) -> str:
    """The version an invocation reports (X-Scf-Version), as the invoke route sets it."""
    return LATEST if qualifier in ("", LATEST) else str(record.version)


def item_invocation(
    p: BatchProgress, record: FunctionRecord, index: int, body: bytes
) -> Invocation:
    m = p.meta
    return Invocation(
        request_id=batch_item_id(p.batch_id, index),
        record=record,
        kind="event",
        body=body,
        deadline=0.0,
        reply_to="",
        version=version_of(m.qualifier, record),
        mode="async",
        attempt=1,
        # The event age counts from the batch's acceptance, not from feeding.
        accepted_at=m.created_at,
        batch=p.batch_id,
        index=index,
        max_retries=m.max_retries,
        max_event_age_s=m.max_event_age_s,
        qualifier=m.qualifier,
        owner=m.owner,
    )


# -- the feeder --------------------------------------------------------------------------

Resolved = FunctionRecord | ImagefnError


class BatchFeeder:
    def __init__(
        self,
        redis: aioredis.Redis,
        queue: InvocationPublisher,
        keys: Keys,
        registry: FunctionRegistry,
        settings: AsyncSettings,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = BatchStore(redis, keys, settings)
        self._queue = queue
        self._registry = registry
        self._rate = float(settings.batch_rate_per_function)
        self._clock = clock
        self._buckets: dict[str, Bucket] = {}
        # Whether the last tick saw a batch with items still to feed: the scheduler then
        # ticks faster, since a batch's items in flight finish within milliseconds and
        # its max_concurrency is refilled only by a tick.
        self.active = False

    async def tick(self) -> int:
        """Feed every running batch what it may get now; the number of items published.
        Redis or queue trouble raises (ServiceUnavailable, QueueUnavailable): nothing
        is lost, the next tick starts from ``fed`` again."""
        ids = await self._store.live_ids(MAX_BATCHES)
        self.active = False
        resolved: dict[tuple[str, str], Resolved] = {}
        buckets: dict[str, Bucket] = {}
        fed = 0
        for batch_id, p in zip(ids, await self._store.progress_many(ids), strict=True):
            if p is None or p.counted >= p.total:
                # Finished (or gone): its keys start to expire, the feeder forgets it.
                await self._store.settle(batch_id)
                continue
            if p.state != RUNNING or p.fed >= p.total:
                continue  # cancelled, or all fed: waiting for the items in flight
            self.active = True
            fn = p.meta.function
            record = await self._resolve(resolved, fn, p.meta.qualifier)
            if isinstance(record, ImagefnError):
                if not isinstance(record, FunctionNotFound | VersionNotFound | InvalidRequest):
                    log.warning("batch_resolve_failed", batch=p.batch_id, error=record.message)
                    continue  # Redis trouble: try again next tick
                await self._fail_rest(p, record)
                continue
            bucket = buckets.get(fn) or refill(self._buckets.get(fn), self._clock(), self._rate)
            n = to_feed(p.total, p.fed, p.counted, p.meta.max_concurrency, bucket.tokens)
            if n:
                published = await self._feed(p, record, n)
                bucket = spend(bucket, published)
                fed += published
            buckets[fn] = bucket
        # Buckets of functions without running batches are dropped (a later batch of the
        # function starts with a full one: at most BURST_S of its rate at once).
        self._buckets = buckets
        return fed

    async def _resolve(
        self, cache: dict[tuple[str, str], Resolved], function: str, qualifier: str
    ) -> Resolved:
        key = (function, qualifier)
        if key not in cache:
            try:
                record = await self._registry.resolve(function, qualifier)
                if record.spec.type != "event":
                    raise InvalidRequest(f"{function} is a web function now; batches run events")
                cache[key] = record
            except ImagefnError as e:
                cache[key] = e
        return cache[key]

    async def _feed(self, p: BatchProgress, record: FunctionRecord, count: int) -> int:
        start, done = p.fed, 0
        while done < count:
            want = min(FEED_CHUNK, count - done)
            bodies = await self._store.items(p.batch_id, start, want)
            if not bodies:
                break  # cancelled meanwhile (the list is deleted)
            await self._queue.publish_many(
                [item_invocation(p, record, start + i, body) for i, body in enumerate(bodies)]
            )
            done += len(bodies)
            if not await self._store.advance(p, start, len(bodies)):
                break  # cancelled or moved by another feeder meanwhile
            start += len(bodies)
            if len(bodies) < want:
                break
        return done

    async def _fail_rest(self, p: BatchProgress, error: ImagefnError) -> None:
        """The items not fed yet fail with ``error``: some per tick (the script runs
        inside Redis, so each call is kept short)."""
        body = {"type": error.type_name, "message": error.message}
        start = p.fed
        stop = min(p.total, start + FAIL_PER_TICK)
        while start < stop:
            end = min(stop, start + FAIL_CHUNK)
            if await self._store.fail(p.batch_id, start, end, body) < 0:
                return
            start = end
        log.warning(
            "batch_items_failed",
            batch=p.batch_id,
            function=p.meta.function,
            error=error.type_name,
            failed_to=stop,
            total=p.total,
        )
