"""The cold-start manager (``imagefn coldstart``; ``imagefn up`` runs one too).

Every tick it reads the targets (functions with ``provisioned_concurrency``, on their
$LATEST version) and the live workers' inventories (their heartbeats), plans where
provisioned instances go (``workers.placement``), and sends each worker whose desired
state differs its full desired state on its control stream. Workers start, keep and
replace the instances themselves; a dead worker's share is placed elsewhere on the next
tick because its heartbeat is gone.

Several managers may run; only the holder of a Redis lease acts, and a dead holder's lease
lapses within ``LEASE_TTL_MS`` so another takes over.
"""

from __future__ import annotations

import asyncio
import uuid

import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

from shared.keys import Keys
from shared.lease import Lease
from shared.liveness import heartbeats
from shared.messages import ControlCommand, Heartbeat, MalformedMessage
from shared.registry import FunctionRegistry
from shared.settings import Settings
from workers.placement import WorkerView, plan_provisioning
from workers.sandbox import reserved_mb

log = structlog.get_logger("imagefn.coldstart")

TICK_S = 1.0
LEASE_TTL_MS = 5000
CONTROL_MAXLEN = 100
RESEND_AFTER_S = 5.0
# How many of the most recently deployed functions' images workers keep pulled ahead.
PREPULL_IMAGES = 20


class ColdStartManager:
    def __init__(self, redis: aioredis.Redis, settings: Settings) -> None:
        self._r = redis
        self._keys = Keys(settings.queue.prefix)
        self._registry = FunctionRegistry(redis, self._keys)
        self.id = uuid.uuid4().hex[:12]
        self._lease = Lease(redis, self._keys.coldstart_lease, self.id, LEASE_TTL_MS)
        # What was last sent to each worker, and when: resent only if the worker's
        # heartbeat still disagrees a while later (it was lost, or the worker restarted).
        self._sent: dict[str, tuple[ControlCommand, float]] = {}

    async def run(self, stop: asyncio.Event) -> None:
        log.info("coldstart_started", manager=self.id)
        while not stop.is_set():
            try:
                if await self._lease.hold():
                    await self.reconcile()
            except RedisError as e:
                log.warning("coldstart_tick_failed", error=str(e))
            try:
                await asyncio.wait_for(stop.wait(), TICK_S)
            except TimeoutError:
                pass
        await self._lease.release()
        log.info("coldstart_stopped", manager=self.id)

    async def _workers(self) -> list[tuple[WorkerView, dict[str, int]]]:
        out: list[tuple[WorkerView, dict[str, int]]] = []
        for raw in (await heartbeats(self._r, self._keys)).values():
            if raw is None:
                continue
            try:
                beat = Heartbeat.decode(raw)
            except MalformedMessage:
                continue
            if beat.memory_capacity_mb is None or beat.memory_used_mb is None:
                continue  # an older worker's plain heartbeat: it cannot take commands
            view = WorkerView(
                id=beat.worker,
                memory_capacity_mb=beat.memory_capacity_mb,
                memory_used_mb=beat.memory_used_mb,
                provisioned={k: v.get("provisioned", 0) for k, v in beat.functions.items()},
            )
            out.append((view, beat.desired))
        return out

    async def reconcile(self) -> dict[str, dict[str, int]]:
        targets: dict[str, int] = {}
        memory: dict[str, int] = {}
        records = await self._registry.list()
        # Workers pre-pull the newest functions' images, so a cold start rarely pulls.
        newest = sorted(records, key=lambda r: r.updated_at, reverse=True)[:PREPULL_IMAGES]
        images = sorted({r.image_ref for r in newest})
        for record in records:
            n = record.spec.provisioned_concurrency
            if n > 0:
                key = f"{record.spec.name}@{record.version}"
                targets[key] = n
                # As the worker reserves it: memory_mb plus the /tmp budget.
                memory[key] = reserved_mb(record.spec)
        workers = await self._workers()
        plan = plan_provisioning(targets, memory, [w for w, _ in workers])
        live = {w.id for w, _ in workers}
        for gone in [wid for wid in self._sent if wid not in live]:
            del self._sent[gone]
        now = asyncio.get_running_loop().time()
        for view, desired in workers:
            want = plan.get(view.id, {})
            command = ControlCommand(targets=want, images=images)
            last = self._sent.get(view.id)
            same = last is not None and last[0] == command
            recently = same and last is not None and now - last[1] < RESEND_AFTER_S
            if (want != desired or not same) and not recently:
                self._sent[view.id] = (command, now)
                await self._r.xadd(
                    self._keys.worker_control(view.id),
                    command.encode(),  # type: ignore[arg-type]  # redis-py's invariant Dict
                    maxlen=CONTROL_MAXLEN,
                    approximate=True,
                )
                log.info("coldstart_sent", worker=view.id, targets=want)
        return plan


async def serve_coldstart(settings: Settings, stop: asyncio.Event) -> None:
    redis = aioredis.Redis.from_url(settings.redis.url)
    try:
        await ColdStartManager(redis, settings).run(stop)
    finally:
        await redis.aclose()
