"""Asynchronous invocation on each queue backend: 202 once enqueued, retries at growing
delays, dead letters with their attempts, redrive with the original request id, expiry,
throttling that uses no retry, duplicates, limits. Real Docker, Redis and broker."""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from shared.keys import Keys
from shared.messages import Invocation
from shared.queue.factory import make_queue
from shared.registry import FunctionRegistry
from shared.settings import load_settings
from tests.integration.conftest import TESTFN, Platform, unique

TERMINAL = {"succeeded", "dead-lettered", "expired", "cancelled"}


@pytest.fixture
async def platform(queue_platform: Platform) -> Platform:
    """Every test here runs on each queue backend (redis, kafka), with a scheduler."""
    if not any(m.command == "scheduler" for m in queue_platform.managers):
        await queue_platform.add_scheduler()
    return queue_platform


async def invoke_async(
    client: aiohttp.ClientSession,
    p: Platform,
    name: str,
    event: Any,
    request_id: str | None = None,
    via_query: bool = False,
) -> tuple[int, dict[str, Any]]:
    headers = {"X-Request-Id": request_id} if request_id else {}
    url = f"{p.url}/v1/functions/{name}/invoke"
    if via_query:
        url += "?InvocationType=Event"
    else:
        headers["X-Imagefn-Invocation-Type"] = "Event"
    async with client.post(url, json=event, headers=headers) as resp:
        return resp.status, await resp.json()


async def record(client: aiohttp.ClientSession, p: Platform, rid: str) -> dict[str, Any]:
    async with client.get(f"{p.url}/v1/invocations/{rid}") as resp:
        assert resp.status == 200, await resp.text()
        doc: dict[str, Any] = await resp.json()
        return doc


async def until_state(
    client: aiohttp.ClientSession,
    p: Platform,
    rid: str,
    states: set[str],
    timeout_s: float = 60,
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    doc: dict[str, Any] = {}
    while time.monotonic() < deadline:
        async with client.get(f"{p.url}/v1/invocations/{rid}") as resp:
            # 404 until a worker begins it, when it was not accepted by a gateway.
            if resp.status == 200:
                doc = await resp.json()
                if doc["state"] in states:
                    return doc
        await asyncio.sleep(0.1)
    raise AssertionError(f"{rid} never reached {states}: {doc}")


async def test_accepted_with_202_and_the_record_shows_the_result(
    platform: Platform, client: aiohttp.ClientSession
) -> None:
    name = unique("async-ok")
    await platform.deploy(client, name)
    status, answer = await invoke_async(client, platform, name, {"body": {"hello": 1}})
    assert status == 202, answer
    assert answer["state"] == "queued" and answer["function"] == name
    doc = await until_state(client, platform, answer["request_id"], TERMINAL)
    assert doc["state"] == "succeeded" and doc["mode"] == "async"
    assert [a["attempt"] for a in doc["attempts"]] == [1]
    assert doc["attempts"][0]["error"] is None
    assert doc["result"]["status"] == 200 and '"hello": 1' in doc["result"]["body"]
    # SCF's spelling, as a query parameter.
    status, answer = await invoke_async(client, platform, name, {}, via_query=True)
    assert status == 202
    assert (await until_state(client, platform, answer["request_id"], TERMINAL))["state"] == (
        "succeeded"
    )


async def test_failing_function_is_retried_then_dead_lettered_and_redriven_after_a_fix(
    platform: Platform, client: aiohttp.ClientSession
) -> None:
    name = unique("async-fail")
    broken = {"env": {"TESTFN_FAIL_STATUS": "500"}, "async": {"max_retries": 2}}
    await platform.deploy(client, name, **broken)
    rid = f"it-{unique('dlq')}"
    status, _ = await invoke_async(client, platform, name, {"n": 1}, request_id=rid)
    assert status == 202
    doc = await until_state(client, platform, rid, TERMINAL)
    assert doc["state"] == "dead-lettered"
    attempts = doc["attempts"]
    # max_retries + 1 attempts, each a user-code failure.
    assert [a["attempt"] for a in attempts] == [1, 2, 3]
    assert all(a["error"]["type"] == "UserCodeError" for a in attempts)
    # Growing delays (1 s, then 2 s, IMAGEFN_RETRY_BASE_DELAY_S=1), within a tolerance:
    # the scheduler ticks every 0.1 s and a release costs a queue hop.
    gaps = [b["started_at"] - a["finished_at"] for a, b in itertools.pairwise(attempts)]
    assert 0.9 <= gaps[0] <= 2.5, gaps
    assert 1.9 <= gaps[1] <= 3.5, gaps
    assert "retries exhausted" in doc["reason"]

    async with client.get(f"{platform.url}/v1/functions/{name}/dlq") as resp:
        listing = await resp.json()
    assert listing["count"] == 1
    [parked] = listing["items"]
    assert parked["request_id"] == rid and parked["state"] == "dead-lettered"
    assert [a["error"]["type"] for a in parked["attempts"]] == ["UserCodeError"] * 3
    async with client.get(f"{platform.url}/v1/functions/{name}/dlq/{rid}") as resp:
        assert (await resp.json())["event"] == {"n": 1}

    # The fix: a redeploy without the bug; the redrive runs the same request id again.
    await platform.deploy(client, name)
    async with client.post(
        f"{platform.url}/v1/functions/{name}/dlq/redrive", json={"ids": [rid, "nope-1234"]}
    ) as resp:
        assert resp.status == 200
        assert await resp.json() == {"function": name, "redriven": [rid], "missing": ["nope-1234"]}
    doc = await until_state(client, platform, rid, {"succeeded"})
    assert [a["attempt"] for a in doc["attempts"]] == [1, 2, 3, 4]
    assert doc["attempts"][-1]["error"] is None
    async with client.get(f"{platform.url}/v1/functions/{name}/dlq") as resp:
        assert (await resp.json())["count"] == 0


async def test_caller_errors_are_not_retried_and_purge_empties_the_dlq(
    platform: Platform, client: aiohttp.ClientSession
) -> None:
    name = unique("async-purge")
    await platform.deploy(client, name, **{"async": {"max_retries": 0}})
    rids = []
    for _ in range(2):
        status, answer = await invoke_async(client, platform, name, {"status": 502})
        assert status == 202
        rids.append(answer["request_id"])
    for rid in rids:
        doc = await until_state(client, platform, rid, TERMINAL)
        assert doc["state"] == "dead-lettered" and len(doc["attempts"]) == 1
    async with client.delete(f"{platform.url}/v1/functions/{name}/dlq/{rids[0]}") as resp:
        assert (await resp.json())["purged"] == 1
    async with client.delete(f"{platform.url}/v1/functions/{name}/dlq") as resp:
        assert (await resp.json())["purged"] == 1
    async with client.get(f"{platform.url}/v1/functions/{name}/dlq/{rids[1]}") as resp:
        assert resp.status == 404


async def test_throttled_event_is_retried_without_using_a_retry(
    platform: Platform, client: aiohttp.ClientSession
) -> None:
    name = unique("async-throttle")
    # One call at a time, and no retries for user errors: an event that still succeeds
    # after being throttled was retried without using one.
    await platform.deploy(client, name, max_concurrency=1, **{"async": {"max_retries": 0}})
    rids = []
    for _ in range(3):
        status, answer = await invoke_async(client, platform, name, {"sleep": 1.0})
        assert status == 202
        rids.append(answer["request_id"])
    docs = [await until_state(client, platform, rid, TERMINAL, timeout_s=90) for rid in rids]
    assert [d["state"] for d in docs] == ["succeeded"] * 3, docs
    throttled = [
        a
        for d in docs
        for a in d["attempts"]
        if (a["error"] or {}).get("type") == ("ConcurrencyLimitExceeded")
    ]
    assert throttled, "with max_concurrency 1, some of three 1 s events must have waited"


async def test_an_event_older_than_its_max_age_ends_expired_in_the_dlq(
    platform: Platform, client: aiohttp.ClientSession
) -> None:
    name = unique("async-old")
    await platform.deploy(client, name, **{"async": {"max_event_age_s": 60}})
    settings = load_settings(platform.env)
    r = aioredis.Redis.from_url(settings.redis.url)
    queue = make_queue(settings, r)
    rid = f"it-{unique('old')}"
    try:
        fn = await FunctionRegistry(r, Keys(platform.prefix)).resolve(name)
        # An event accepted 61 s ago that only now reaches a worker (a long outage, say).
        old = time.time() - 61
        await queue.open()
        await queue.publish(
            Invocation(
                request_id=rid,
                record=fn,
                kind="event",
                body=b"{}",
                enqueued_at=old,
                mode="async",
                accepted_at=old,
            )
        )
    finally:
        await queue.close()
        await r.aclose()
    doc = await until_state(client, platform, rid, TERMINAL)
    assert doc["state"] == "expired" and "max_event_age_s" in doc["reason"]
    assert doc["attempts"][0].get("ran") is False
    async with client.get(f"{platform.url}/v1/functions/{name}/dlq/{rid}") as resp:
        assert (await resp.json())["state"] == "expired"


async def test_the_same_request_id_is_accepted_once(
    platform: Platform, client: aiohttp.ClientSession
) -> None:
    name = unique("async-dup")
    await platform.deploy(client, name)
    rid = f"it-{unique('dup')}"
    first = await invoke_async(client, platform, name, {}, request_id=rid)
    second = await invoke_async(client, platform, name, {}, request_id=rid)
    assert first[0] == second[0] == 202
    assert "duplicate" not in first[1] and second[1]["duplicate"] is True
    doc = await until_state(client, platform, rid, TERMINAL)
    await asyncio.sleep(0.5)
    assert len((await record(client, platform, rid))["attempts"]) == 1 == len(doc["attempts"])


async def test_limits_and_bad_policies_are_refused_naming_the_problem(
    platform: Platform, client: aiohttp.ClientSession
) -> None:
    name = unique("async-limits")
    await platform.deploy(client, name)
    big = {"pad": "x" * (129 * 1024)}
    status, answer = await invoke_async(client, platform, name, big)
    assert status == 413
    assert "131072 bytes" in answer["error"]["message"]
    # The synchronous limit stays 6 MB.
    status, _, _ = await platform.invoke(client, name, big)
    assert status == 200
    async with client.put(
        f"{platform.url}/v1/functions/{name}",
        json={"image": TESTFN, "async": {"max_retries": 11, "max_event_age_s": 10}},
    ) as resp:
        assert resp.status == 400
        fields = (await resp.json())["error"]["fields"]
    assert set(fields) == {"async.max_retries", "async.max_event_age_s"}
    async with client.post(
        f"{platform.url}/v1/functions/{name}/invoke",
        json={},
        headers={"X-Imagefn-Invocation-Type": "Later"},
    ) as resp:
        assert resp.status == 400
        assert "Later" in (await resp.json())["error"]["message"]


async def test_a_deleted_functions_events_are_dead_lettered_not_lost(
    platform: Platform, client: aiohttp.ClientSession
) -> None:
    name = unique("async-del")
    await platform.deploy(client, name, env={"TESTFN_FAIL_STATUS": "500"})
    status, answer = await invoke_async(client, platform, name, {})
    assert status == 202
    rid = answer["request_id"]
    # Wait until it is retrying, then delete the function under it.
    await until_state(client, platform, rid, {"retrying"})
    async with client.delete(f"{platform.url}/v1/functions/{name}") as resp:
        assert resp.status == 204
    doc = await until_state(client, platform, rid, TERMINAL)
    assert doc["state"] == "dead-lettered" and "deleted" in doc["reason"]
