"""Invocation records: what happened to each invocation (status, error type, cold or
warm, instance, worker, phase timings), kept in Redis for ``ttl_s`` so a user can look up
where a slow call spent its time: ``GET /v1/invocations/{request_id}``.

Written by the worker after the result is delivered, so the caller never waits for it.
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis.asyncio as aioredis

from shared.errors import InvocationNotFound
from shared.keys import Keys
from shared.messages import Invocation, InvocationResult


class InvocationLog:
    def __init__(self, client: aioredis.Redis, keys: Keys, ttl_s: int) -> None:
        self._r = client
        self._keys = keys
        self._ttl_s = ttl_s

    async def record(self, inv: Invocation, result: InvocationResult) -> None:
        doc: dict[str, Any] = {
            "request_id": inv.request_id,
            "function": inv.function,
            "version": inv.record.version,
            "qualifier": inv.version,
            "status": result.status,
            "error": (result.error or {}).get("type"),
            "cold_start": result.cold_start,
            "instance": result.instance,
            "worker": result.worker,
            "timings_ms": {k: round(v * 1000, 3) for k, v in result.timings.items()},
            "enqueued_at": inv.enqueued_at,
            "finished_at": time.time(),
        }
        await self._r.set(
            self._keys.invocation(inv.request_id),
            json.dumps(doc, separators=(",", ":")),
            ex=self._ttl_s,
        )

    async def get(self, request_id: str) -> dict[str, Any]:
        raw = await self._r.get(self._keys.invocation(request_id))
        if raw is None:
            raise InvocationNotFound(
                f"no record of invocation {request_id!r} (unknown, or older than the "
                "retention of invocation records)"
            )
        doc: dict[str, Any] = json.loads(raw)
        return doc
