"""Warm-affinity routing: send an invocation to a worker that holds a free warm instance
of its function version, so that it does not start one while another worker could serve.

The gateway keeps the workers' inventories (their heartbeats, found through the worker
index of ``shared.liveness``) in memory, refreshed every ``REFRESH_S`` by one owned task;
the choice itself is the pure ``pick_worker``. With no worker holding a free instance, the
invocation goes to the shared queue (Redis: the stream every worker reads; Kafka: a live
worker's partition) and the worker that takes it starts an instance if it must. Each
refresh also hands the queue every live worker's ``"queue"`` entry (``learn_consumers``):
the Kafka backend routes by the partitions the workers report there.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Mapping
from typing import Any

import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

from shared.keys import Keys
from shared.liveness import heartbeats
from shared.messages import Heartbeat, MalformedMessage
from shared.queue.base import InvocationPublisher

log = structlog.get_logger("imagefn.routing")

REFRESH_S = 0.5

# worker id → "name@version" → {"ready": n, "paused": n, ...}
Inventories = dict[str, dict[str, dict[str, int]]]


def pick_worker(inventories: Mapping[str, Mapping[str, Mapping[str, int]]], key: str) -> str | None:
    """The worker with the most free warm instances of ``key`` ("name@version"): idle ones
    first, then frozen ones (a wake costs milliseconds); None when no worker has one."""
    best: tuple[int, int] = (0, 0)
    chosen: list[str] = []
    for worker, functions in inventories.items():
        counts = functions.get(key) or {}
        score = (int(counts.get("ready", 0)), int(counts.get("paused", 0)))
        if score == (0, 0):
            continue
        if score > best:
            best, chosen = score, [worker]
        elif score == best:
            chosen.append(worker)
    # Among equals, spread rather than always pick the same worker.
    return random.choice(chosen) if chosen else None


class WarmRouter:
    def __init__(
        self, client: aioredis.Redis, keys: Keys, queue: InvocationPublisher | None = None
    ) -> None:
        self._r = client
        self._keys = keys
        # Told, on each refresh, how every live worker reads the queue (its heartbeat's
        # "queue" entry), so that a routed publish reaches the chosen worker.
        self._queue = queue
        self._inventories: Inventories = {}
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    async def start(self) -> None:
        await self._refresh()
        self._task = asyncio.create_task(self._loop(), name="gateway-router-refresh")

    async def close(self) -> None:
        # The flag as well as the cancel: a cancel that lands inside a Redis call can be
        # swallowed by the client (seen as a gateway that never finished stopping); the
        # loop then ends at its next turn instead of running on.
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def route(self, function: str, version: int) -> str | None:
        key = f"{function}@{version}"
        worker = pick_worker(self._inventories, key)
        if worker is not None:
            # Count the instance as taken until the next refresh, so a burst spreads
            # over the free instances instead of piling onto the first.
            counts = self._inventories[worker][key]
            field = "ready" if counts.get("ready", 0) > 0 else "paused"
            counts[field] = counts.get(field, 0) - 1
        return worker

    async def _loop(self) -> None:
        while not self._closing:
            await asyncio.sleep(REFRESH_S)
            try:
                await self._refresh()
            except RedisError as e:
                log.warning("router_refresh_failed", error=str(e))

    async def _refresh(self) -> None:
        inventories: Inventories = {}
        consumers: dict[str, dict[str, Any]] = {}
        for raw in (await heartbeats(self._r, self._keys)).values():
            if raw is None:
                continue
            try:
                beat = Heartbeat.decode(raw)
            except MalformedMessage:
                continue
            # Copies: route() counts taken instances down in place until the next refresh.
            inventories[beat.worker] = {k: dict(v) for k, v in beat.functions.items()}
            # A draining worker reads nothing new: nothing should be sent its way.
            if beat.queue is not None and not beat.draining:
                consumers[beat.worker] = beat.queue
        self._inventories = inventories
        if self._queue is not None:
            self._queue.learn_consumers(consumers)
