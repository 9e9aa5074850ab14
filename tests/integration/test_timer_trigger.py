"""Timer triggers on a real platform (Redis, a worker, two trigger runners, containers):
a one-second schedule fires once per tick with two runners alive, keeps firing when one
is killed, stops when disabled; bad triggers are refused naming the field."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from shared.keys import Keys
from tests.integration.conftest import Platform, WorkerProcess, unique

TICK = "* * * * * *"  # every second


@pytest.fixture
async def timer_platform(platform: Platform) -> Platform:
    """The shared platform with a scheduler (async retries) and two trigger runners."""
    if not any(m.command == "scheduler" for m in platform.managers):
        await platform.add_scheduler()
    while sum(m.command == "triggers" for m in platform.managers) < 2:
        await platform.add_trigger_runner()
    return platform


async def fired_ticks(redis_url: str, p: Platform, function: str, name: str) -> dict[int, Any]:
    """Tick (ms) → its invocation record's fields, for every tick the trigger fired."""
    r = aioredis.Redis.from_url(redis_url)
    try:
        prefix = Keys(p.prefix).invocation(f"timer-{function}-{name}-")
        out: dict[int, Any] = {}
        async for key in r.scan_iter(f"{prefix}*"):
            fields = await r.hgetall(key)
            out[int(key.decode().rsplit("-", 1)[1])] = fields
        return out
    finally:
        await r.aclose()


async def put(client: aiohttp.ClientSession, p: Platform, fn: str, doc: dict[str, Any]) -> Any:
    async with client.put(f"{p.url}/v1/functions/{fn}/triggers/{doc['name']}", json=doc) as r:
        return r.status, await r.json()


async def test_a_one_second_timer_fires_once_per_tick_across_runners_and_stops_when_disabled(
    timer_platform: Platform, client: aiohttp.ClientSession, redis_url: str
) -> None:
    p = timer_platform
    fn = unique("tick")
    await p.deploy(client, fn)
    status, body = await put(
        client, p, fn, {"name": "every-second", "type": "timer", "cron": TICK, "payload": "hi"}
    )
    assert status == 201, body
    await asyncio.sleep(6)
    ticks = sorted(await fired_ticks(redis_url, p, fn, "every-second"))
    assert len(ticks) >= 4, ticks
    # One invocation per second, none skipped, none twice (two runners fire each tick).
    assert all(b - a == 1000 for a, b in itertools.pairwise(ticks)), ticks

    # Each ran once, with the timer event.
    records = await fired_ticks(redis_url, p, fn, "every-second")
    deadline = time.monotonic() + 20
    while True:
        records = await fired_ticks(redis_url, p, fn, "every-second")
        done = [f for f in records.values() if f.get(b"state") == b"succeeded"]
        if len(done) >= len(ticks):
            break
        assert time.monotonic() < deadline, {k: v.get(b"state") for k, v in records.items()}
        await asyncio.sleep(0.2)
    # Each tick ran exactly once: one attempt, no duplicate delivery.
    for fields in done:
        assert b"a:2" not in fields and int(fields.get(b"duplicates", 0)) == 0, fields
    some = done[0]
    result = json.loads(await _result(redis_url, p, json.loads(some[b"meta"])["request_id"]))
    event = json.loads(result["body"])["event"]
    assert event["Type"] == "Timer" and event["TriggerName"] == "every-second"
    assert event["Message"] == "hi" and event["Time"].endswith("Z")

    # The trigger shows its state.
    async with client.get(f"{p.url}/v1/functions/{fn}/triggers/every-second") as r:
        state = (await r.json())["state"]
    assert state["next_fire_at"] > time.time() - 1 and state["last_fired_at"] > 0

    # A runner killed with SIGKILL: the other keeps firing every tick.
    victim: WorkerProcess = next(m for m in p.managers if m.command == "triggers")
    victim.kill()
    p.managers.remove(victim)
    killed_at = time.time()
    await asyncio.sleep(4)
    after = sorted(
        t for t in await fired_ticks(redis_url, p, fn, "every-second") if t / 1000 > killed_at
    )
    assert len(after) >= 3, after
    assert all(b - a == 1000 for a, b in itertools.pairwise(after)), after
    await p.add_trigger_runner()  # back to two for the next test

    # Disabled: no tick after it (one may be in flight as it is disabled).
    async with client.post(f"{p.url}/v1/functions/{fn}/triggers/every-second/disable") as r:
        assert r.status == 200 and (await r.json())["enabled"] is False
    disabled_at = time.time()
    await asyncio.sleep(3.5)
    late = [
        t for t in await fired_ticks(redis_url, p, fn, "every-second") if t / 1000 > disabled_at + 2
    ]
    assert late == []


async def _result(redis_url: str, p: Platform, request_id: str) -> bytes:
    r = aioredis.Redis.from_url(redis_url)
    try:
        raw = await r.get(Keys(p.prefix).result(request_id))
        assert raw is not None
        return bytes(raw)
    finally:
        await r.aclose()


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        ({"type": "timer", "cron": "* * * *"}, "cron"),
        ({"type": "timer", "cron": "61 * * * * *"}, "cron"),
        ({"type": "timer"}, "cron"),
        ({"type": "timer", "cron": TICK, "catch_up": "always"}, "catch_up"),
        ({"type": "timer", "cron": TICK, "payload": "x" * 5000}, "payload"),
        ({"type": "timer", "cron": TICK, "qualifier": "no such/alias"}, "qualifier"),
        ({"type": "cron", "cron": TICK}, "type"),
        ({"type": "timer", "cron": TICK, "topic": "t"}, "topic"),
    ],
)
async def test_bad_triggers_are_refused_naming_the_field_and_nothing_is_created(
    platform: Platform, client: aiohttp.ClientSession, doc: dict[str, Any], field: str
) -> None:
    fn = unique("badtrig")
    await platform.deploy(client, fn)
    status, body = await put(client, platform, fn, {"name": "t", **doc})
    assert status == 400, body
    assert field in body["error"]["fields"], body
    async with client.get(f"{platform.url}/v1/functions/{fn}/triggers") as r:
        assert (await r.json())["triggers"] == []


async def test_a_trigger_needs_its_function_and_goes_with_it(
    platform: Platform, client: aiohttp.ClientSession
) -> None:
    fn = unique("trigfn")
    status, body = await put(client, platform, fn, {"name": "t", "type": "timer", "cron": TICK})
    assert status == 404 and body["error"]["type"] == "FunctionNotFound"
    await platform.deploy(client, fn)
    status, _ = await put(
        client, platform, fn, {"name": "t", "type": "timer", "cron": "0 0 * * * *"}
    )
    assert status == 201
    async with client.delete(f"{platform.url}/v1/functions/{fn}") as r:
        assert r.status == 204
    await platform.deploy(client, fn)
    async with client.get(f"{platform.url}/v1/functions/{fn}/triggers") as r:
        assert (await r.json())["triggers"] == []
