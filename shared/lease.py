"""A Redis lease: of several processes doing the same job (cold-start managers, retry
schedulers), only the holder acts. The holder renews it every tick; a dead holder's lease
lapses within ``ttl_ms`` and another process takes it over."""

from __future__ import annotations

import contextlib

import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

log = structlog.get_logger("imagefn.lease")

# Extend the lease only if we still hold it (compare and extend, atomically).
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Lease:
    def __init__(self, redis: aioredis.Redis, key: str, holder: str, ttl_ms: int) -> None:
        self._r = redis
        self._key = key
        self.holder = holder
        self._ttl_ms = ttl_ms
        self.held = False
        self._renew = redis.register_script(_RENEW)
        self._release = redis.register_script(_RELEASE)

    async def hold(self) -> bool:
        """Take or renew the lease; whether this process holds it now."""
        got = await self._r.set(self._key, self.holder, nx=True, px=self._ttl_ms)
        if not got:
            got = bool(await self._renew(keys=[self._key], args=[self.holder, self._ttl_ms]))
        if bool(got) != self.held:
            self.held = bool(got)
            log.info("lease_changed", lease=self._key, holder=self.holder, leader=self.held)
        return self.held

    async def release(self) -> None:
        """Hand over at once rather than after the lease lapses (it lapses anyway)."""
        if self.held:
            with contextlib.suppress(RedisError):
                await self._release(keys=[self._key], args=[self.holder])
            self.held = False
