"""The dead-letter queue: asynchronous invocations that were given up, parked per function
with everything needed to look at them and to send them through again.

``{p}:dlq:{function}`` maps request id → entry (JSON): the original event (base64), what
it ran as (record of the version, qualifier, kind, batch item), its attempts (error type,
message, times) and the reason. ``{p}:dlq-index:{function}`` orders them by parking time.
Parking is idempotent (keyed by request id), so a duplicate delivery parks nothing twice.

A redrive (gateway) sends an entry through the function again with its **original
request id**: its record keeps the earlier attempts and counts on from them.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from shared.errors import InvocationNotFound, ServiceUnavailable
from shared.keys import Keys
from shared.messages import Invocation
from shared.spec import FunctionRecord


def entry_of(
    inv: Invocation, state: str, reason: str, attempts: list[dict[str, Any]], now: float
) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "request_id": inv.request_id,
        "function": inv.function,
        "version": inv.record.version,
        "qualifier": inv.qualifier,
        "kind": inv.kind,
        "state": state,
        "reason": reason,
        "parked_at": now,
        "accepted_at": inv.first_accepted_at,
        "attempts": attempts,
        "event_base64": base64.b64encode(inv.body).decode(),
        "record": inv.record.to_dict(),
    }
    if inv.batch:
        entry.update(batch=inv.batch, index=inv.index)
    return entry


def public(entry: dict[str, Any], with_event: bool) -> dict[str, Any]:
    """An entry as the API shows it: no internal record; the event decoded when asked."""
    out = {k: v for k, v in entry.items() if k not in ("record", "event_base64")}
    if with_event:
        raw = base64.b64decode(entry.get("event_base64", ""))
        try:
            out["event"] = json.loads(raw)
        except ValueError:
            out["event_base64"] = entry.get("event_base64", "")
    return out


def invocation_for_redrive(
    entry: dict[str, Any], record: FunctionRecord, qualifier: str, attempt: int, now: float
) -> Invocation:
    """The entry as a fresh asynchronous invocation: same request id, the next attempt
    number, a new retry budget and a new event age (it starts over)."""
    return Invocation(
        request_id=str(entry["request_id"]),
        record=record,
        kind=str(entry.get("kind", "event")),
        body=base64.b64decode(entry.get("event_base64", "")),
        deadline=0.0,
        enqueued_at=now,
        mode="async",
        attempt=attempt,
        accepted_at=now,
        batch=str(entry.get("batch", "")),
        index=int(entry.get("index", -1)),
        qualifier=qualifier,
        version="$LATEST" if qualifier == "$LATEST" else str(record.version),
    )


class DeadLetters:
    def __init__(self, client: aioredis.Redis, keys: Keys) -> None:
        self._r = client
        self._keys = keys

    async def park(self, entry: dict[str, Any]) -> None:
        function = str(entry["function"])
        try:
            async with self._r.pipeline(transaction=True) as pipe:
                pipe.hset(
                    self._keys.dlq(function),
                    str(entry["request_id"]),
                    json.dumps(entry, separators=(",", ":")),
                )
                pipe.zadd(
                    self._keys.dlq_index(function),
                    {str(entry["request_id"]): float(entry["parked_at"])},
                )
                pipe.sadd(self._keys.dlq_functions, function)
                await pipe.execute()
        except RedisError as e:
            raise ServiceUnavailable(f"dead-letter queue unavailable: {e}") from e

    async def page(
        self, function: str, limit: int, offset: int
    ) -> tuple[int, list[dict[str, Any]]]:
        """How many are parked, and ``limit`` of them from ``offset`` (oldest first)."""
        index = self._keys.dlq_index(function)
        count = int(await self._r.zcard(index))
        ids: list[Any] = (
            list(await self._r.zrange(index, offset, offset + limit - 1)) if limit > 0 else []
        )
        if not ids:
            return count, []
        rows = await self._r.hmget(self._keys.dlq(function), ids)
        return count, [json.loads(row) for row in rows if row is not None]

    async def get(self, function: str, request_id: str) -> dict[str, Any]:
        raw = await self._r.hget(self._keys.dlq(function), request_id)
        if raw is None:
            raise InvocationNotFound(f"no dead letter {request_id!r} for function {function!r}")
        entry: dict[str, Any] = json.loads(raw)
        return entry

    async def ids(self, function: str) -> list[str]:
        return [
            i.decode() if isinstance(i, bytes) else str(i)
            for i in await self._r.zrange(self._keys.dlq_index(function), 0, -1)
        ]

    async def remove(self, function: str, request_ids: list[str]) -> int:
        if not request_ids:
            return 0
        async with self._r.pipeline(transaction=True) as pipe:
            pipe.hdel(self._keys.dlq(function), *request_ids)
            pipe.zrem(self._keys.dlq_index(function), *request_ids)
            removed, _ = await pipe.execute()
        return int(removed)

    async def purge(self, function: str) -> int:
        async with self._r.pipeline(transaction=True) as pipe:
            pipe.hlen(self._keys.dlq(function))
            pipe.delete(self._keys.dlq(function), self._keys.dlq_index(function))
            pipe.srem(self._keys.dlq_functions, function)
            count, _, _ = await pipe.execute()
        return int(count)
