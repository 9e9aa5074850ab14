"""A worker: takes invocations from the queue and runs them on its container pool.

Lifecycle (the temporal worker's shape): ``run()`` starts the loops below and returns after
``shutdown()``: stop taking work, wait for in-flight invocations up to the drain timeout,
abandon the rest *unacknowledged* (another worker reclaims them), stop the pool's
containers, then the housekeeping loops.

Loops, each a named task owned here:
* consume   — takes new invocations, as many as there are free permits;
* reclaim   — takes over invocations whose worker stopped refreshing its claim;
* keepalive — refreshes this worker's claims on what it is running;
* heartbeat — keeps ``worker:{id}`` alive in Redis, so others know this worker lives;
* janitor   — removes containers of workers whose heartbeat is gone;
* deaths    — follows the engine's die events for this worker's containers.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

from shared.backoff import Backoff
from shared.concurrency import ConcurrencyLimiter
from shared.deadletter import DeadLetters
from shared.errors import (
    FunctionNotFound,
    ImagefnError,
    InternalError,
    ServiceUnavailable,
    VersionNotFound,
)
from shared.invocations import InvocationLog
from shared.keys import Keys
from shared.liveness import announce
from shared.messages import ControlCommand, Heartbeat, InvocationResult, MalformedMessage
from shared.queue.base import MAX_ATTEMPTS, Delivery, InvocationConsumer, InvocationQueue
from shared.registry import FunctionRegistry
from shared.settings import Settings
from shared.spec import FunctionRecord
from workers.asyncrun import AsyncRunner
from workers.pool import ContainerPool
from workers.runtime import LABEL_INSTALLATION, LABEL_WORKER, ContainerRuntime
from workers.sandbox import require_networks

log = structlog.get_logger("imagefn.worker")

# What a queue backend raises when it cannot be reached for now (QueueUnavailable, a
# ServiceUnavailable; never its client's exceptions): retried with backoff.
QUEUE_ERRORS = (ServiceUnavailable,)

CONSUME_BLOCK_S = 1.0


class Worker:
    def __init__(
        self,
        settings: Settings,
        queue: InvocationQueue,
        pool: ContainerPool,
        runtime: ContainerRuntime,
        redis: aioredis.Redis,
    ) -> None:
        self._settings = settings
        self._ws = settings.worker
        self.worker_id = settings.worker.worker_id
        # The worker's own loops only consume; its async runner publishes retries.
        self._queue: InvocationConsumer = queue
        self._owned_queue = queue
        self._pool = pool
        self._runtime = runtime
        self._redis = redis
        self._keys = Keys(settings.queue.prefix)
        # Set whenever a handler finishes, so the consume loop can read more.
        self._capacity_freed = asyncio.Event()
        self._inflight: dict[str, Delivery] = {}
        self._handlers: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
        self._loops: list[asyncio.Task[None]] = []
        self._registry = FunctionRegistry(redis, self._keys)
        self._invocations = InvocationLog(
            redis,
            self._keys,
            settings.queue.invocation_ttl_s,
            settings.asyncinv.result_ttl_s,
        )
        self._async = AsyncRunner(
            self.worker_id,
            queue,
            self._invocations,
            DeadLetters(redis, self._keys),
            settings.asyncinv,
            ConcurrencyLimiter(redis, self._keys),
            FunctionRegistry(redis, self._keys, cache_ttl_s=1.0),
            settings.registry.pull_timeout_s + settings.gateway.result_grace_s,
        )
        # The cold-start manager's last command ("name@version" → instances), echoed in
        # the heartbeat so it can tell whether this worker has it.
        self._desired: dict[str, int] = {}

    # -- lifecycle -------------------------------------------------------------------------

    async def run(self) -> None:
        log.info("worker_starting", worker=self.worker_id)
        # Before taking any work: without its networks no instance could start safely.
        await require_networks(self._runtime, self._settings.network)
        await self._owned_queue.open()
        await self._heartbeat_once()
        # A worker restarted under the same id finds its previous run's containers: none of
        # them belongs to this run, so they go too.
        await self._remove_orphans(include_own=True)
        self._loops = [
            asyncio.create_task(self._consume_loop(), name="worker-consume"),
            asyncio.create_task(
                self._every(self._reclaim_interval(), self._reclaim), name="worker-reclaim"
            ),
            asyncio.create_task(
                self._every(self._settings.queue.claim_refresh_s, self._keep_alive),
                name="worker-keepalive",
            ),
            asyncio.create_task(
                self._every(self._ws.heartbeat_s, self._heartbeat_once), name="worker-heartbeat"
            ),
            asyncio.create_task(
                self._every(self._ws.janitor_interval_s, self._remove_orphans),
                name="worker-janitor",
            ),
            asyncio.create_task(self._watch_deaths(), name="worker-deaths"),
            asyncio.create_task(self._follow_control(), name="worker-control"),
        ]
        log.info("worker_ready", worker=self.worker_id)
        await self._stopping.wait()
        await self._drain()

    def shutdown(self) -> None:
        """Ask the worker to stop; idempotent and safe before ``run``."""
        self._stopping.set()

    async def _drain(self) -> None:
        log.info("worker_draining", inflight=len(self._handlers))
        with contextlib.suppress(RedisError):
            await self._heartbeat_once()  # now empty: gateways stop routing here
        consume = self._loops[0]
        # Let the consume loop finish its current read (at most CONSUME_BLOCK_S) rather
        # than cancel it mid-read: entries Redis already handed us would otherwise sit
        # unprocessed until another worker's reclaim.
        self._capacity_freed.set()
        try:
            await asyncio.wait_for(asyncio.shield(consume), CONSUME_BLOCK_S + 2)
        except TimeoutError:
            consume.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await consume
        if self._handlers:
            _done, pending = await asyncio.wait(
                set(self._handlers), timeout=self._ws.drain_timeout_s
            )
            if pending:
                # Not acknowledged: another worker reclaims them once our claim lapses.
                log.warning("worker_abandoning", count=len(pending))
                for task in pending:
                    task.cancel()
                await asyncio.wait(pending, timeout=5)
        await self._pool.shutdown(timeout_s=30)
        for task in self._loops[1:]:
            task.cancel()
        await asyncio.gather(*self._loops[1:], return_exceptions=True)
        with contextlib.suppress(RedisError):
            # Gone: no heartbeat, and no control stream left behind. (Its invocation
            # stream, if anything is left in it, is adopted by another worker.)
            await self._redis.delete(
                self._keys.worker_heartbeat(self.worker_id),
                self._keys.worker_control(self.worker_id),
            )
        log.info("worker_stopped", worker=self.worker_id)

    # -- taking work -----------------------------------------------------------------------

    def _free_permits(self) -> int:
        return self._ws.max_inflight - len(self._handlers)

    async def _consume_loop(self) -> None:
        backoff = Backoff(0.1, 5.0)
        while not self._stopping.is_set():
            # Read only what there is room for: what we read, we own until it is finished.
            while self._free_permits() <= 0 and not self._stopping.is_set():
                self._capacity_freed.clear()
                await self._capacity_freed.wait()
            if self._stopping.is_set():
                return
            try:
                deliveries = await self._queue.consume(
                    self.worker_id, max(1, self._free_permits()), CONSUME_BLOCK_S
                )
                backoff.reset()
            except QUEUE_ERRORS as e:
                log.warning("consume_failed", error=str(e))
                await backoff.sleep()
                continue
            for d in deliveries:
                self._dispatch(d)

    def _dispatch(self, d: Delivery) -> None:
        self._inflight[d.receipt] = d
        task = asyncio.create_task(self._handle(d), name=f"invocation-{d.invocation.request_id}")
        self._handlers.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._handlers.discard(t)
            self._inflight.pop(d.receipt, None)
            self._capacity_freed.set()

        task.add_done_callback(done)

    async def _handle(self, d: Delivery) -> None:
        inv = d.invocation
        structlog.contextvars.bind_contextvars(request_id=inv.request_id, function=inv.function)
        if inv.is_async:
            # Nobody waits: the runner records, retries or dead-letters, then acknowledges.
            await self._async.run(d, self._pool.invoke, lambda: self._finish(d, None))
            return
        if inv.deadline and time.time() > inv.deadline:
            # The caller stopped waiting; running it now would only do surprising work.
            log.warning("invocation_expired", waited_s=round(time.time() - inv.enqueued_at, 3))
            await self._finish(d, None)
            return
        if d.attempt > MAX_ATTEMPTS:
            log.error("invocation_poison", attempts=d.attempt)
            err = InternalError(f"invocation abandoned after {d.attempt} deliveries")
            await self._finish(d, InvocationResult.failure(inv.request_id, err))
            return
        if d.attempt > 1:
            log.warning("invocation_redelivered", attempt=d.attempt)
        result = await self._pool.invoke(inv)
        log.info(
            "invocation_done",
            status=result.status,
            error=(result.error or {}).get("type"),
            cold=result.cold_start,
            timings=result.timings,
        )
        await self._finish(d, result)
        try:
            # After the result is delivered: the caller does not wait for the record.
            await self._invocations.record(inv, result)
        except RedisError as e:
            log.warning("invocation_record_failed", error=str(e))

    async def _finish(self, d: Delivery, result: InvocationResult | None) -> None:
        # A result that cannot be delivered must not be acknowledged: retry until the queue
        # answers or we are cancelled (then the invocation is reclaimed elsewhere).
        delay_s = 0.05
        while True:
            try:
                await self._queue.finish(d, result)
                return
            except QUEUE_ERRORS as e:
                log.warning("finish_failed", error=str(e))
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, 2.0)

    def _reclaim_interval(self) -> float:
        return max(0.2, self._settings.queue.reclaim_idle_ms / 1000 / 3)

    async def _reclaim(self) -> None:
        free = self._free_permits()
        if free <= 0 or self._stopping.is_set():
            return
        for d in await self._queue.reclaim(self.worker_id, free):
            if d.receipt in self._inflight:
                continue
            log.warning("invocation_reclaimed", request_id=d.invocation.request_id)
            self._dispatch(d)

    async def _keep_alive(self) -> None:
        await self._queue.keep_alive(self.worker_id, list(self._inflight.values()))

    # -- housekeeping ----------------------------------------------------------------------

    async def _every(self, interval_s: float, fn: Callable[[], Awaitable[None]]) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await fn()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("periodic_task_failed", task=fn.__name__, error=str(e))

    async def _heartbeat_once(self) -> None:
        # The heartbeat carries the inventory the cold-start manager plans with and the
        # gateways route by. A draining worker shows no instances: nothing is routed to
        # it while it stops reading.
        draining = self._stopping.is_set()
        if not draining:
            self._pool.reconcile_provisioned()
        beat = Heartbeat(
            worker=self.worker_id,
            functions={} if draining else self._pool.inventory(),
            draining=draining,
            memory_capacity_mb=self._ws.memory_capacity_mb,
            memory_used_mb=self._pool.memory_used_mb(),
            cpus_capacity=os.cpu_count(),
            desired=self._desired,
            queue=self._queue.consumer_info(),
        )
        await announce(
            self._redis,
            self._keys,
            self.worker_id,
            beat.encode(),
            int(self._ws.heartbeat_ttl_s * 1000),
        )
        # A deleted function's idle instances (and those of versions nothing names any
        # more) go within a heartbeat, not at their idle TTL.
        await self._pool.retire_unreachable(self._registry.reachable_versions)

    async def _follow_control(self) -> None:
        """Apply the cold-start manager's desired state for this worker: the newest
        command on start, then each new one."""
        stream = self._keys.worker_control(self.worker_id)
        last_id: Any = None
        while True:
            try:
                if last_id is None:
                    last: Any = await self._redis.xrevrange(stream, count=1)
                    # From the newest command, or from the very start of an empty stream
                    # (not "$": a command added between two reads would be missed).
                    last_id = last[0][0] if last else "0-0"
                    if last:
                        await self._apply_control(last[0][1])
                resp: Any = await self._redis.xread({stream: last_id}, block=2000)
            except RedisError as e:
                log.warning("control_read_failed", error=str(e))
                await asyncio.sleep(1)
                continue
            for _s, entries in resp or []:
                for entry_id, fields in entries:
                    last_id = entry_id
                    await self._apply_control(fields)

    async def _apply_control(self, fields: Any) -> None:
        try:
            command = ControlCommand.decode(fields)
        except MalformedMessage as e:
            log.error("control_undecodable", error=str(e))
            return
        desired = command.targets
        targets: dict[tuple[str, int], tuple[FunctionRecord, int]] = {}
        for key, count in desired.items():
            name, _, version = key.rpartition("@")
            try:
                record = await self._registry.resolve(name, version)
            except (FunctionNotFound, VersionNotFound) as e:
                log.warning("provision_target_unknown", target=key, error=e.message)
                continue  # deleted meanwhile: nothing to keep ready
            except ImagefnError as e:
                # Cannot tell now (Redis trouble): keep the current state and do not
                # report this command as applied, so the manager sends it again.
                log.warning("provision_targets_deferred", error=e.message)
                return
            targets[(name, record.version)] = (record, count)
        self._desired = desired
        log.info("provisioning_targets", targets=desired)
        self._pool.set_provisioned(targets)
        self._pool.prepull(command.images)

    async def _remove_orphans(self, include_own: bool = False) -> None:
        """Remove containers of workers that no longer exist (their heartbeat is gone)."""
        alive: dict[str, bool] = {self.worker_id: not include_own}
        prefix = self._settings.queue.prefix
        for c in await self._runtime.list_managed():
            if c.labels.get(LABEL_INSTALLATION) != prefix:
                continue  # another installation's, judged by its own workers
            owner = c.labels.get(LABEL_WORKER, "")
            if owner not in alive:
                alive[owner] = bool(
                    owner and await self._redis.exists(self._keys.worker_heartbeat(owner))
                )
            if not alive[owner]:
                log.info("orphan_removed", container=c.id[:12], dead_worker=owner)
                await self._runtime.remove(c.id, 0)

    async def _watch_deaths(self) -> None:
        backoff = Backoff(0.5, 10.0)
        while True:
            try:
                async for container_id in self._runtime.die_events(self.worker_id):
                    self._pool.container_died(container_id)
                    backoff.reset()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("events_stream_failed", error=str(e))
            await backoff.sleep()
