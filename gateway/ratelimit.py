"""Rate limits per API key and per function: token buckets shared by every gateway, kept
in Redis and taken by one Lua script (one round trip per request, and only when a limit is
on).

A bucket holds up to ``burst`` tokens and refills at ``rate`` tokens a second; a call takes
one token from every bucket that applies (its key's, its function's) or from none: a call
refused by one bucket must not spend the other's tokens. Time is Redis's own clock
(``TIME`` in the script), so gateways whose clocks disagree still share one refill rate.

``take`` is the same arithmetic in Python: the unit tests check the policy with it, and the
in-memory limiter (unit tests of the gateway) runs it; the integration tests check that the
script agrees. Why not the ``limits`` library: see docs/security.md ("Bounded intake").
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import redis.asyncio as aioredis
import structlog
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from shared.autopipe import AutoPipeline
from shared.keys import Keys

log = structlog.get_logger("imagefn.gateway")

# A token counts as whole from this much of it: refill arithmetic in floating point lands
# a hair below 1 exactly when a caller comes back after the wait it was told.
WHOLE = 0.999999

# KEYS: the buckets; ARGV: rate, burst of each, in KEYS order. Returns {0, 0} when the
# call may go (a token taken from each bucket), else {i, wait_ms}: bucket i (1-based) is
# empty for wait_ms more milliseconds (the longest wait among the empty ones).
TAKE_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local tokens = {}
local worst, wait = 0, 0
for i = 1, #KEYS do
  local rate, burst = tonumber(ARGV[2 * i - 1]), tonumber(ARGV[2 * i])
  local b = redis.call('HMGET', KEYS[i], 'tokens', 'at')
  local have, at = tonumber(b[1]), tonumber(b[2])
  if have == nil or at == nil then have, at = burst, now end
  have = math.min(burst, have + math.max(0, now - at) * rate)
  tokens[i] = have
  if have < 0.999999 then
    local w = (1 - have) / rate
    if w > wait then worst, wait = i, w end
  end
end
if worst > 0 then return {worst, math.ceil(wait * 1000)} end
for i = 1, #KEYS do
  local rate, burst = tonumber(ARGV[2 * i - 1]), tonumber(ARGV[2 * i])
  -- %.17g: tostring keeps 14 digits, a tenth of a millisecond of an epoch time.
  redis.call('HSET', KEYS[i], 'tokens', string.format('%.17g', tokens[i] - 1),
    'at', string.format('%.17g', now))
  -- Gone once it would be full again anyway: an idle key or function costs no memory.
  redis.call('PEXPIRE', KEYS[i], math.ceil(burst / rate * 1000) + 1000)
end
return {0, 0}
"""


@dataclass(frozen=True)
class Limit:
    """One bucket: its Redis key, and ``scope`` naming it in answers ("key" or "function")."""

    key: str
    scope: str
    rate: float
    burst: int

    @classmethod
    def of(cls, key: str, scope: str, rate: float, burst: int) -> Limit:
        # A burst of 0 means "one second's worth": a bucket that can never hold a whole
        # token would refuse everything.
        return cls(key, scope, rate, burst if burst >= 1 else max(1, math.ceil(rate)))


@dataclass(frozen=True)
class Denied:
    limit: Limit
    wait_s: float

    @property
    def retry_after_s(self) -> int:
        """Whole seconds for a Retry-After header: at least 1."""
        return max(1, math.ceil(self.wait_s))


@dataclass(frozen=True)
class Bucket:
    tokens: float
    at: float


def take(
    buckets: Sequence[Bucket | None], limits: Sequence[Limit], now: float
) -> tuple[list[Bucket], Denied | None]:
    """The buckets after one call at ``now`` and whether it was refused (then they are
    unchanged but refilled). A missing bucket is full."""
    filled: list[Bucket] = []
    denied: Denied | None = None
    for bucket, limit in zip(buckets, limits, strict=True):
        have, at = (limit.burst, now) if bucket is None else (bucket.tokens, bucket.at)
        have = min(limit.burst, have + max(0.0, now - at) * limit.rate)
        filled.append(Bucket(have, now))
        if have < WHOLE:
            wait = (1 - have) / limit.rate
            if denied is None or wait > denied.wait_s:
                denied = Denied(limit, wait)
    if denied is not None:
        return filled, denied
    return [Bucket(b.tokens - 1, b.at) for b in filled], None


class RateLimiter(Protocol):
    async def check(self, limits: Sequence[Limit]) -> Denied | None:
        """Take one token from every bucket of ``limits``, or say which refused."""


class RedisRateLimiter:
    """Buckets in Redis. The script calls of concurrent requests go out in one pipeline
    (``AutoPipeline``): under load, one round trip serves many requests."""

    def __init__(self, client: aioredis.Redis) -> None:
        self._script: AsyncScript = client.register_script(TAKE_SCRIPT)
        self._pipe = AutoPipeline(client)
        # The last time a Redis failure was logged: a dead Redis must not flood the log.
        self._logged_at = 0.0

    async def check(self, limits: Sequence[Limit]) -> Denied | None:
        if not limits:
            return None
        args: list[Any] = []
        for limit in limits:
            args.extend((repr(float(limit.rate)), limit.burst))
        try:
            answer = await self._pipe.script(self._script, [lim.key for lim in limits], args)
        except (RedisError, OSError) as e:
            # Fail open: a rate limit is about fairness, and the call itself needs Redis
            # (or Kafka) anyway; refusing everything while Redis blinks would be worse.
            now = time.monotonic()
            if now - self._logged_at > 10:
                self._logged_at = now
                log.warning("rate_limit_unavailable", error=str(e))
            return None
        worst, wait_ms = int(answer[0]), int(answer[1])
        if worst == 0:
            return None
        return Denied(limits[worst - 1], wait_ms / 1000)


class MemoryRateLimiter:
    """The same policy in one process (unit tests; a gateway alone needs no sharing)."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, Bucket] = {}

    async def check(self, limits: Sequence[Limit]) -> Denied | None:
        now = self._clock()
        buckets, denied = take([self._buckets.get(lim.key) for lim in limits], limits, now)
        for limit, bucket in zip(limits, buckets, strict=True):
            self._buckets[limit.key] = bucket
        return denied


def key_limit(keys: Keys, key_id: str, rate: float, burst: int) -> Limit:
    return Limit.of(keys.rate_key(key_id), "key", rate, burst)


def function_limit(keys: Keys, function: str, rate: float, burst: int) -> Limit:
    return Limit.of(keys.rate_function(function), "function", rate, burst)
