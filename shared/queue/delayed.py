"""Where retries wait for their time, on both queue backends: a Redis sorted set.

``{p}:delayed`` holds one member per waiting invocation, ``"{request_id}:{attempt}"``,
scored by the time it is due; ``{p}:delayed:{member}`` holds its encoded fields (``m``,
``r``, ``b``: ``Invocation.encode``). The member name makes scheduling idempotent: a
worker that schedules the same retry twice (a duplicate delivery) writes the same member.

Nothing waits as a sleeping task: a retry is data in Redis until the scheduler holding
the lease releases it into the queue (``release_due``). The Redis Streams backend moves
it with one Lua script (read, XADD, delete: atomic, so never twice and never lost); the
Kafka backend reads what is due, produces it, and only then deletes it (a scheduler that
dies between the two produces it again; the worker's attempt fence drops the duplicate).

Redis is the platform's state store on either backend (functions, heartbeats, records),
and a sorted set is exactly a delay queue; Kafka has none (a retry topic per delay would
still need someone to hold records back until they are due).
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from shared.errors import ServiceUnavailable
from shared.keys import Keys
from shared.messages import Invocation

# KEYS: delayed set, target stream. ARGV: now, max count, item key prefix.
# Item keys are built in the script (not declared in KEYS): fine on one Redis, not on a
# Redis Cluster, where the delayed set and its items would need one hash tag.
_MOVE_DUE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, member in ipairs(due) do
  local key = ARGV[3] .. member
  local fields = redis.call('HGETALL', key)
  if #fields > 0 then
    redis.call('XADD', KEYS[2], '*', unpack(fields))
  end
  redis.call('DEL', key)
  redis.call('ZREM', KEYS[1], member)
end
return #due
"""


def member(inv: Invocation) -> str:
    return f"{inv.request_id}:{inv.attempt}"


class DelayedSet:
    def __init__(self, client: aioredis.Redis, keys: Keys) -> None:
        self._r = client
        self._keys = keys
        self._move = client.register_script(_MOVE_DUE)

    async def add(self, inv: Invocation, due_at: float) -> None:
        name = member(inv)
        try:
            async with self._r.pipeline(transaction=True) as pipe:
                pipe.hset(self._keys.delayed_item(name), mapping=inv.encode())  # type: ignore[arg-type]
                pipe.zadd(self._keys.delayed, {name: due_at})
                await pipe.execute()
        except RedisError as e:
            raise ServiceUnavailable(f"retry store unavailable: {e}") from e

    async def move_to_stream(self, stream: str, now: float, max_count: int) -> int:
        """Redis Streams backend: move what is due into ``stream``, atomically."""
        try:
            moved: Any = await self._move(
                keys=[self._keys.delayed, stream],
                args=[now, max_count, self._keys.delayed_item("")],
            )
        except RedisError as e:
            raise ServiceUnavailable(f"retry store unavailable: {e}") from e
        return int(moved)

    async def due(self, now: float, max_count: int) -> list[tuple[str, Invocation | None]]:
        """What is due (member, invocation; None when its fields are gone or undecodable),
        left in place until ``remove``."""
        try:
            names = [
                n.decode() if isinstance(n, bytes) else str(n)
                for n in await self._r.zrangebyscore(
                    self._keys.delayed, "-inf", now, start=0, num=max_count
                )
            ]
            if not names:
                return []
            async with self._r.pipeline(transaction=False) as pipe:
                for name in names:
                    pipe.hgetall(self._keys.delayed_item(name))
                rows: list[Any] = await pipe.execute()
        except RedisError as e:
            raise ServiceUnavailable(f"retry store unavailable: {e}") from e
        out: list[tuple[str, Invocation | None]] = []
        for name, fields in zip(names, rows, strict=True):
            try:
                out.append((name, Invocation.decode(fields) if fields else None))
            except (KeyError, ValueError, TypeError):
                out.append((name, None))
        return out

    async def remove(self, names: list[str]) -> None:
        if not names:
            return
        try:
            async with self._r.pipeline(transaction=True) as pipe:
                pipe.delete(*[self._keys.delayed_item(n) for n in names])
                pipe.zrem(self._keys.delayed, *names)
                await pipe.execute()
        except RedisError as e:
            raise ServiceUnavailable(f"retry store unavailable: {e}") from e

    async def count(self) -> int:
        return int(await self._r.zcard(self._keys.delayed))
