"""The function registry: deployed function records, kept in one Redis hash.

A record is written with a single HSET of its complete JSON, so a reader sees the old
record or the new one, never half of either.
"""

from __future__ import annotations

import time

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from shared.errors import FunctionNotFound, ServiceUnavailable
from shared.keys import Keys
from shared.spec import FunctionRecord, FunctionSpec

# Bound on the records one gateway caches (it simply starts over past this).
MAX_CACHED = 10_000


class FunctionRegistry:
    """``get`` may serve a record from a per-process cache for up to ``cache_ttl_s``: a
    deploy or delete made through another gateway is seen within that time (through this
    one, at once). It saves a Redis round trip on every invocation."""

    def __init__(self, client: aioredis.Redis, keys: Keys, cache_ttl_s: float = 0.0) -> None:
        self._r = client
        self._keys = keys
        self._cache_ttl_s = cache_ttl_s
        self._cache: dict[str, tuple[float, FunctionRecord]] = {}

    async def put(self, spec: FunctionSpec, image_id: str) -> tuple[FunctionRecord, bool]:
        """Create or replace; returns the stored record and whether it is new."""
        try:
            existing_raw = await self._r.hget(self._keys.functions, spec.name)
            revision = await self._r.hincrby(self._keys.revisions, spec.name, 1)
            now = time.time()
            created_at = now
            if existing_raw is not None:
                created_at = FunctionRecord.from_json(existing_raw).created_at
            record = FunctionRecord(
                spec=spec,
                image_id=image_id,
                revision=int(revision),
                created_at=created_at,
                updated_at=now,
            )
            await self._r.hset(self._keys.functions, spec.name, record.to_json())
            self._cache.pop(spec.name, None)
        except RedisError as e:
            raise ServiceUnavailable(f"function registry unavailable: {e}") from e
        return record, existing_raw is None

    async def get(self, name: str) -> FunctionRecord:
        cached = self._cache.get(name)
        now = time.monotonic()
        if cached is not None and cached[0] > now:
            return cached[1]
        try:
            raw = await self._r.hget(self._keys.functions, name)
        except RedisError as e:
            raise ServiceUnavailable(f"function registry unavailable: {e}") from e
        if raw is None:
            raise FunctionNotFound(f"function {name!r} does not exist")
        record = FunctionRecord.from_json(raw)
        if self._cache_ttl_s > 0:
            if len(self._cache) > MAX_CACHED:
                self._cache.clear()
            self._cache[name] = (now + self._cache_ttl_s, record)
        return record

    async def list(self) -> list[FunctionRecord]:
        try:
            raw = await self._r.hgetall(self._keys.functions)
        except RedisError as e:
            raise ServiceUnavailable(f"function registry unavailable: {e}") from e
        records = [FunctionRecord.from_json(v) for v in raw.values()]
        return sorted(records, key=lambda r: r.spec.name)

    async def delete(self, name: str) -> None:
        self._cache.pop(name, None)
        try:
            removed = await self._r.hdel(self._keys.functions, name)
        except RedisError as e:
            raise ServiceUnavailable(f"function registry unavailable: {e}") from e
        if not removed:
            raise FunctionNotFound(f"function {name!r} does not exist")
