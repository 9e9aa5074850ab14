"""The floor of the queue hop: a bare Redis Streams request/reply round trip between two
Python processes, with the platform's client stack (redis-py + hiredis on uvloop) and
the platform's pattern (XADD → XREADGROUP BLOCK → pipelined XADD reply + XACK + XDEL →
XREAD BLOCK), no HTTP and no payload. Whatever the gateway adds on top of a direct call
cannot be less than this.

    .venv/bin/python bench/queue_floor.py [--redis-url URL] [--n 2000]

Sends traffic only to the given Redis (default 127.0.0.1:6379) under a random key prefix,
deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import time
import uuid

import redis.asyncio as aioredis
import uvloop
from peers.common import local_redis_url  # bench/peers, beside this script


async def _worker(url: str, prefix: str, stop_after_s: float) -> None:
    r = aioredis.Redis.from_url(url)
    stream, group = f"{prefix}:inv", "g"
    try:
        await r.xgroup_create(stream, group, id="0", mkstream=True)
    except aioredis.ResponseError:
        pass
    deadline = time.monotonic() + stop_after_s
    while time.monotonic() < deadline:
        resp = await r.xreadgroup(group, "w", {stream: ">"}, count=10, block=500)
        for _s, entries in resp or []:
            for eid, fields in entries:
                if fields[b"c"] == b"stop":
                    await r.aclose()
                    return
                async with r.pipeline(transaction=False) as p:
                    p.xadd(f"{prefix}:rep", {"c": fields[b"c"]})
                    p.xack(stream, group, eid)
                    p.xdel(stream, eid)
                    await p.execute()
    await r.aclose()


def _worker_main(url: str, prefix: str, stop_after_s: float) -> None:
    uvloop.run(_worker(url, prefix, stop_after_s))


async def _caller(url: str, prefix: str, n: int) -> list[float]:
    r, r2 = aioredis.Redis.from_url(url), aioredis.Redis.from_url(url)
    waiters: dict[str, asyncio.Future[None]] = {}

    done = False

    async def reader() -> None:
        last: object = "0"
        while not done:
            resp = await r2.xread({f"{prefix}:rep": last}, block=100)
            for _s, entries in resp or []:
                for eid, fields in entries:
                    last = eid
                    fut = waiters.pop(fields[b"c"].decode(), None)
                    if fut is not None:
                        fut.set_result(None)

    task = asyncio.create_task(reader())
    loop = asyncio.get_running_loop()
    out: list[float] = []
    for i in range(n):
        t = time.perf_counter()
        fut: asyncio.Future[None] = loop.create_future()
        waiters[str(i)] = fut
        await r.xadd(f"{prefix}:inv", {"c": str(i)})
        await asyncio.wait_for(fut, 5)
        out.append(time.perf_counter() - t)
    done = True
    await task
    await r.xadd(f"{prefix}:inv", {"c": "stop"})
    await asyncio.sleep(0.2)
    keys = [k async for k in r.scan_iter(f"{prefix}:*")]
    if keys:
        await r.delete(*keys)
    await r.aclose()
    await r2.aclose()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--redis-url", default=local_redis_url(0))
    ap.add_argument("--n", type=int, default=2000)
    args = ap.parse_args()
    prefix = f"bench-floor-{uuid.uuid4().hex[:8]}"
    worker = multiprocessing.Process(target=_worker_main, args=(args.redis_url, prefix, 120))
    worker.start()
    try:
        time.sleep(0.5)
        lat = sorted(uvloop.run(_caller(args.redis_url, prefix, args.n))[args.n // 10 :])
    finally:
        worker.join(5)
        if worker.is_alive():
            worker.terminate()
    p = lambda q: lat[min(len(lat) - 1, int(len(lat) * q))] * 1000  # noqa: E731
    print(
        f"| queue hop floor (n={len(lat)}) | p50 {p(0.5):.3f} ms | p90 {p(0.9):.3f} ms "
        f"| p99 {p(0.99):.3f} ms |"
    )


if __name__ == "__main__":
    main()
