"""Reserved concurrency: at most ``max_concurrency`` invocations of a function in flight
across every gateway; beyond it, ConcurrencyLimitExceeded at once (the contract's 432).

The slots live in Redis, in one sorted set per function: member = call, score = the
call's deadline. A gateway that dies holding slots cannot leak them: a slot past its
deadline no longer counts (the worker stops that invocation at the deadline too).
"""

from __future__ import annotations

import time
import uuid

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from shared.errors import ConcurrencyLimitExceeded, ServiceUnavailable
from shared.keys import Keys

# Drop expired slots, count, and take one if there is room, atomically.
_ACQUIRE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[4]) then
  return 0
end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[3])
-- GT: only ever extend, so a short call never expires a longer one's slot.
redis.call('EXPIREAT', KEYS[1], math.ceil(tonumber(ARGV[2])) + 1, 'GT')
if redis.call('TTL', KEYS[1]) < 0 then
  redis.call('EXPIREAT', KEYS[1], math.ceil(tonumber(ARGV[2])) + 1)
end
return 1
"""


class ConcurrencyLimiter:
    def __init__(self, client: aioredis.Redis, keys: Keys) -> None:
        self._r = client
        self._keys = keys
        self._acquire: AsyncScript | None = None

    async def acquire(self, function: str, limit: int, deadline: float) -> str:
        """Take a slot until ``deadline`` (epoch seconds); returns its id."""
        slot = uuid.uuid4().hex
        if self._acquire is None:
            self._acquire = self._r.register_script(_ACQUIRE)
        try:
            got = await self._acquire(
                keys=[self._keys.inflight(function)],
                args=[time.time(), deadline, slot, limit],
            )
        except RedisError as e:
            raise ServiceUnavailable(f"concurrency limiter unavailable: {e}") from e
        if not got:
            raise ConcurrencyLimitExceeded(
                f"{function} already has {limit} invocations in flight (max_concurrency)"
            )
        return slot

    async def release(self, function: str, slot: str) -> None:
        try:
            await self._r.zrem(self._keys.inflight(function), slot)
        except RedisError:
            pass  # the slot lapses at its deadline anyway
