"""The function registry: deployed functions, their immutable versions and aliases, in
Redis.

Every deploy publishes a new version (numbered 1, 2, ... per function, never reused) with
the image pinned by digest; ``$LATEST`` is the newest. An alias names a version and can be
moved (rollback). A deploy is written by one Lua script, so readers see it whole or not at
all, and $LATEST only ever moves to a higher version.
"""

from __future__ import annotations

import re
import time
from collections.abc import Collection
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from shared.errors import FunctionNotFound, InvalidRequest, ServiceUnavailable, VersionNotFound
from shared.keys import Keys
from shared.spec import FunctionRecord, FunctionSpec

# Publish a version and make it $LATEST only if no newer one is: two deploys of one
# function racing (through two gateways) must leave $LATEST on the higher version.
PUBLISH_SCRIPT = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
local current = redis.call('HGET', KEYS[2], ARGV[3])
if current and tonumber(cjson.decode(current)['version']) > tonumber(ARGV[1]) then
  return 0
end
redis.call('HSET', KEYS[2], ARGV[3], ARGV[2])
return 1
"""
# Bound on the records one gateway caches (it simply starts over past this).
MAX_CACHED = 10_000
LATEST = "$LATEST"
ALIAS_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,39}\Z")


@dataclass(frozen=True)
class FunctionVersions:
    latest: int
    versions: list[FunctionRecord]
    aliases: dict[str, int]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _unavailable(e: RedisError) -> ServiceUnavailable:
    return ServiceUnavailable(f"function registry unavailable: {e}")


class FunctionRegistry:
    """``resolve`` may serve a record from a per-process cache for up to ``cache_ttl_s``: a
    deploy, alias move or delete made through another gateway is seen within that time
    (through this one, at once). It saves a Redis round trip on every invocation."""

    def __init__(self, client: aioredis.Redis, keys: Keys, cache_ttl_s: float = 0.0) -> None:
        self._r = client
        self._keys = keys
        self._cache_ttl_s = cache_ttl_s
        self._cache: dict[tuple[str, str], tuple[float, FunctionRecord]] = {}
        self._publish: AsyncScript | None = None

    def _forget(self, name: str) -> None:
        for key in [k for k in self._cache if k[0] == name]:
            del self._cache[key]

    async def put(
        self, spec: FunctionSpec, image_ref: str, image_digest: str
    ) -> tuple[FunctionRecord, bool]:
        """Publish a new version and make it $LATEST; returns it and whether the function
        is new."""
        try:
            existing_raw = await self._r.hget(self._keys.functions, spec.name)
            version = int(await self._r.hincrby(self._keys.version_counter, spec.name, 1))
            now = time.time()
            created_at = now
            if existing_raw is not None:
                created_at = FunctionRecord.from_json(existing_raw).created_at
            record = FunctionRecord(
                spec=spec,
                image_ref=image_ref,
                image_digest=image_digest,
                version=version,
                created_at=created_at,
                updated_at=now,
            )
            raw = record.to_json()
            if self._publish is None:
                self._publish = self._r.register_script(PUBLISH_SCRIPT)
            await self._publish(
                keys=[self._keys.versions(spec.name), self._keys.functions],
                args=[version, raw, spec.name],
            )
        except RedisError as e:
            raise _unavailable(e) from e
        self._forget(spec.name)
        return record, existing_raw is None

    async def resolve(self, name: str, qualifier: str = LATEST) -> FunctionRecord:
        """The record an invocation of ``name`` runs: $LATEST, a version number or an
        alias."""
        qualifier = qualifier or LATEST
        key = (name, qualifier)
        now = time.monotonic()
        cached = self._cache.get(key)
        if cached is not None and cached[0] > now:
            return cached[1]
        record = await self._load(name, qualifier)
        if self._cache_ttl_s > 0:
            if len(self._cache) > MAX_CACHED:
                self._cache.clear()
            self._cache[key] = (now + self._cache_ttl_s, record)
        return record

    async def get(self, name: str) -> FunctionRecord:
        return await self._load(name, LATEST)

    async def _load(self, name: str, qualifier: str) -> FunctionRecord:
        try:
            if qualifier == LATEST:
                raw = await self._r.hget(self._keys.functions, name)
                if raw is None:
                    raise FunctionNotFound(f"function {name!r} does not exist")
                return FunctionRecord.from_json(raw)
            version = qualifier
            if not qualifier.isdigit():
                target = await self._r.hget(self._keys.aliases(name), qualifier)
                if target is None:
                    await self._require_function(name)
                    raise VersionNotFound(f"function {name!r} has no alias {qualifier!r}")
                version = _text(target)
            raw = await self._r.hget(self._keys.versions(name), version)
            if raw is None:
                await self._require_function(name)
                raise VersionNotFound(f"function {name!r} has no version {version}")
        except RedisError as e:
            raise _unavailable(e) from e
        return FunctionRecord.from_json(raw)

    async def _require_function(self, name: str) -> None:
        if not await self._r.hexists(self._keys.functions, name):
            raise FunctionNotFound(f"function {name!r} does not exist")

    async def list(self) -> list[FunctionRecord]:
        try:
            raw = await self._r.hgetall(self._keys.functions)
        except RedisError as e:
            raise _unavailable(e) from e
        records = [FunctionRecord.from_json(v) for v in raw.values()]
        return sorted(records, key=lambda r: r.spec.name)

    async def reachable_versions(self, names: Collection[str]) -> dict[str, frozenset[int]]:
        """The versions of each named function that a call can still reach without naming
        a version number: its $LATEST and its aliases' targets. A function that does not
        exist (deleted) maps to an empty set. One round trip, uncached: workers ask with
        every heartbeat to retire what nothing reaches any more."""
        ordered = list(names)
        try:
            async with self._r.pipeline(transaction=False) as pipe:
                for name in ordered:
                    pipe.hget(self._keys.functions, name)
                    pipe.hgetall(self._keys.aliases(name))
                replies = await pipe.execute()
        except RedisError as e:
            raise _unavailable(e) from e
        out: dict[str, frozenset[int]] = {}
        for i, name in enumerate(ordered):
            raw, aliases = replies[2 * i], replies[2 * i + 1]
            if raw is None:
                out[name] = frozenset()
                continue
            versions = {FunctionRecord.from_json(raw).version}
            versions.update(int(v) for v in (aliases or {}).values())
            out[name] = frozenset(versions)
        return out

    async def versions(self, name: str) -> FunctionVersions:
        try:
            await self._require_function(name)
            raw_versions = await self._r.hgetall(self._keys.versions(name))
            raw_aliases = await self._r.hgetall(self._keys.aliases(name))
            latest = FunctionRecord.from_json(
                await self._r.hget(self._keys.functions, name) or b"{}"
            ).version
        except RedisError as e:
            raise _unavailable(e) from e
        records = sorted(
            (FunctionRecord.from_json(v) for v in raw_versions.values()), key=lambda r: r.version
        )
        aliases = {_text(k): int(v) for k, v in raw_aliases.items()}
        return FunctionVersions(latest=latest, versions=records, aliases=aliases)

    async def set_alias(self, name: str, alias: str, version: int) -> None:
        if not ALIAS_RE.match(alias) or alias == LATEST:
            raise InvalidRequest(
                f"alias {alias!r}: 1-40 characters, letters, digits, '-' and '_', "
                "starting with a letter"
            )
        try:
            await self._require_function(name)
            if not await self._r.hexists(self._keys.versions(name), str(version)):
                raise VersionNotFound(f"function {name!r} has no version {version}")
            await self._r.hset(self._keys.aliases(name), alias, str(version))
        except RedisError as e:
            raise _unavailable(e) from e
        self._forget(name)

    async def delete_alias(self, name: str, alias: str) -> None:
        try:
            removed = await self._r.hdel(self._keys.aliases(name), alias)
            if not removed:
                await self._require_function(name)
        except RedisError as e:
            raise _unavailable(e) from e
        self._forget(name)
        if not removed:
            raise VersionNotFound(f"function {name!r} has no alias {alias!r}")

    async def delete(self, name: str) -> None:
        """Delete the function with all its versions and aliases."""
        self._forget(name)
        try:
            async with self._r.pipeline(transaction=True) as pipe:
                pipe.hdel(self._keys.functions, name)
                pipe.delete(self._keys.versions(name), self._keys.aliases(name))
                removed, _ = await pipe.execute()
        except RedisError as e:
            raise _unavailable(e) from e
        if not removed:
            raise FunctionNotFound(f"function {name!r} does not exist")
