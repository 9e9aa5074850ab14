"""Which workers exist, without scanning the keyspace.

Every worker adds itself to the sorted set ``{p}:workers`` (score: its last heartbeat) next
to its heartbeat key. Readers (gateways routing, the cold-start manager, workers adopting a
dead worker's stream) list the index and read the heartbeats with one MGET; a SCAN would
walk every key, invocation records included, on each pass.
"""

from __future__ import annotations

import time
from typing import Any

import redis.asyncio as aioredis

from shared.keys import Keys

# Index entries of workers silent this long are dropped (their heartbeat is long gone).
FORGET_AFTER_S = 86400.0


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def announce(
    r: aioredis.Redis, keys: Keys, worker_id: str, inventory: str, ttl_ms: int
) -> None:
    """One heartbeat: the inventory with its TTL, and the worker's place in the index."""
    now = time.time()
    async with r.pipeline(transaction=False) as pipe:
        pipe.set(keys.worker_heartbeat(worker_id), inventory, px=ttl_ms)
        pipe.zadd(keys.workers_index, {worker_id: now})
        pipe.zremrangebyscore(keys.workers_index, "-inf", now - FORGET_AFTER_S)
        await pipe.execute()


async def known_workers(r: aioredis.Redis, keys: Keys) -> list[str]:
    members: list[Any] = await r.zrange(keys.workers_index, 0, -1)
    return [_text(w) for w in members]


async def heartbeats(r: aioredis.Redis, keys: Keys) -> dict[str, bytes | str | None]:
    """Every known worker's heartbeat value; None for those whose heartbeat is gone."""
    ids = await known_workers(r, keys)
    if not ids:
        return {}
    values = await r.mget([keys.worker_heartbeat(w) for w in ids])
    return dict(zip(ids, values, strict=True))


async def forget(r: aioredis.Redis, keys: Keys, worker_id: str) -> None:
    await r.zrem(keys.workers_index, worker_id)
