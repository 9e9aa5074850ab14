"""The scheduler (``imagefn scheduler``; ``imagefn up`` runs one): what asynchronous work
needs besides workers.

* Releases retries that are due from where they wait (``queue.release_due``: the Redis
  sorted set ``{p}:delayed``) into the queue;
* feeds running batches into the queue at a bounded rate (``workers/feeder.py``);
* sends destination records (``workers/destinations.py``).

Several schedulers may run; only the holder of the Redis lease releases retries and
feeds batches (like the cold-start manager), and a dead holder's lease lapses within
``LEASE_TTL_MS``. A scheduler that dies loses nothing: a retry stays in Redis until it
has been moved into the queue, a batch item until the feeder has published it.
Destination records are shared out by a consumer group, so every scheduler sends some.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid

import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

from shared.errors import ImagefnError
from shared.invocations import InvocationLog
from shared.keys import Keys
from shared.lease import Lease
from shared.queue.base import InvocationPublisher
from shared.queue.factory import make_queue
from shared.registry import FunctionRegistry
from shared.settings import Settings
from workers.destinations import DestinationDispatcher
from workers.feeder import BatchFeeder

log = structlog.get_logger("imagefn.scheduler")

LEASE_TTL_MS = 5000
# Retries moved per round trip; a tick keeps moving while rounds come back full.
RELEASE_BATCH = 500
# A tick moves at most this many, so the lease is renewed in time under any backlog.
RELEASE_PER_TICK = 20_000


class Scheduler:
    def __init__(
        self,
        redis: aioredis.Redis,
        queue: InvocationPublisher,
        settings: Settings,
        feeder: BatchFeeder | None = None,
    ) -> None:
        self.id = uuid.uuid4().hex[:12]
        self._queue = queue
        self._tick_s = settings.asyncinv.scheduler_tick_s
        self._feed_tick_s = min(self._tick_s, settings.asyncinv.batch_tick_s)
        self._lease = Lease(
            redis, Keys(settings.queue.prefix).scheduler_lease, self.id, LEASE_TTL_MS
        )
        self._feeder = feeder

    async def run(self, stop: asyncio.Event) -> None:
        log.info("scheduler_started", scheduler=self.id)
        while not stop.is_set():
            try:
                if await self._lease.hold():
                    await self.tick()
            except (RedisError, ImagefnError) as e:
                log.warning("scheduler_tick_failed", error=str(e))
            busy = self._feeder is not None and self._feeder.active and self._lease.held
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._feed_tick_s if busy else self._tick_s)
        await self._lease.release()
        log.info("scheduler_stopped", scheduler=self.id)

    async def tick(self) -> None:
        released = 0
        while released < RELEASE_PER_TICK:
            n = await self._queue.release_due(time.time(), RELEASE_BATCH)
            released += n
            if n < RELEASE_BATCH:
                break
        if released:
            log.info("retries_released", count=released)
        if self._feeder is not None:
            await self._feeder.tick()


async def serve_scheduler(settings: Settings, stop: asyncio.Event) -> None:
    async with contextlib.AsyncExitStack() as stack:
        redis = aioredis.Redis.from_url(settings.redis.url)
        stack.push_async_callback(redis.aclose)
        queue = make_queue(settings, redis)
        await queue.open()
        stack.push_async_callback(queue.close)
        keys = Keys(settings.queue.prefix)
        feeder = BatchFeeder(redis, queue, keys, FunctionRegistry(redis, keys), settings.asyncinv)
        scheduler = Scheduler(redis, queue, settings, feeder)
        dispatcher = DestinationDispatcher(
            redis,
            settings,
            f"scheduler-{scheduler.id}",
            InvocationLog(redis, keys, settings.queue.invocation_ttl_s),
        )
        tasks = [
            asyncio.create_task(scheduler.run(stop), name="scheduler"),
            asyncio.create_task(dispatcher.run(stop), name="destination-dispatcher"),
        ]
        # If one dies, stop the other rather than run half a scheduler.
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        stop.set()
        for result in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                raise result
