"""Deploy and invoke event and web functions end to end: gateway → queue (Redis or Kafka) →
worker → container."""

from __future__ import annotations

import asyncio
import os

import aiohttp
import pytest

from tests.integration.conftest import Platform, unique


@pytest.fixture
def platform(queue_platform: Platform) -> Platform:
    """Every test here runs on each queue backend (redis, kafka)."""
    return queue_platform


async def test_event_invoke_carries_contract_headers_and_reuses_warm_instance(
    platform: Platform, client: aiohttp.ClientSession
) -> None:
    name = unique("evt")
    await platform.deploy(client, name, memory_mb=128, timeout_s=5, env={"TEST_GREETING": "hi"})

    status, headers, body = await platform.invoke(client, name, {"hello": "world"})
    assert status == 200, body
    request_id = headers["X-Request-Id"]
    assert body["request_id"] == request_id
    assert body["event"] == {"hello": "world"}
    sent = {k.lower(): v for k, v in body["headers"].items()}
    assert sent["x-scf-request-id"] == request_id
    assert sent["x-scf-name"] == name
    assert sent["x-scf-memory"] == "128"
    assert sent["x-scf-timeout"] == "5000"
    assert sent["x-scf-namespace"] == "default"
    assert sent["x-scf-version"] == "$LATEST"
    assert sent["content-type"] == "application/json"
    assert body["env"] == {"TEST_GREETING": "hi"}
    assert headers["X-Imagefn-Cold-Start"] == "true"
    assert "ready;dur=" in headers["Server-Timing"]

    status2, headers2, body2 = await platform.invoke(client, name, {"n": 2})
    assert status2 == 200
    assert headers2["X-Imagefn-Cold-Start"] == "false"
    assert headers2["X-Imagefn-Instance"] == headers["X-Imagefn-Instance"]
    assert body2["hostname"] == body["hostname"]
    assert body2["request_id"] == headers2["X-Request-Id"] != request_id


async def test_caller_request_id_travels_to_the_container(
    platform: Platform, client: aiohttp.ClientSession
) -> None:
    name = unique("rid")
    await platform.deploy(client, name)
    rid = "trace-0123456789"
    async with client.post(
        f"{platform.url}/v1/functions/{name}/invoke", json={}, headers={"X-Request-Id": rid}
    ) as resp:
        body = await resp.json()
        assert resp.headers["X-Request-Id"] == rid
    assert body["request_id"] == rid


async def test_parallel_invocations_run_on_separate_instances(
    platform: Platform, client: aiohttp.ClientSession
) -> None:
    name = unique("par")
    n = 4
    await platform.deploy(client, name, max_instances=n, timeout_s=10, memory_mb=64)
    results = await asyncio.gather(
        *(platform.invoke(client, name, {"sleep": 1.0}) for _ in range(n))
    )
    assert all(status == 200 for status, _, _ in results), results
    instances = {headers["X-Imagefn-Instance"] for _, headers, _ in results}
    hostnames = {body["hostname"] for _, _, body in results}
    assert len(instances) == n
    assert len(hostnames) == n


async def test_max_instances_queues_instead_of_overrunning(
    platform: Platform, client: aiohttp.ClientSession
) -> None:
    name = unique("cap")
    await platform.deploy(client, name, max_instances=1, timeout_s=10)
    results = await asyncio.gather(
        *(platform.invoke(client, name, {"sleep": 0.3}) for _ in range(3))
    )
    assert [s for s, _, _ in results] == [200, 200, 200]
    assert len({h["X-Imagefn-Instance"] for _, h, _ in results}) == 1


async def test_event_function_error_status_is_user_code_error(
    platform: Platform, client: aiohttp.ClientSession
) -> None:
    name = unique("err")
    await platform.deploy(client, name)
    status, headers, body = await platform.invoke(client, name, {"status": 500, "body": "nope"})
    assert status == 502
    assert headers["X-Scf-Error-Type"] == "UserCodeError"
    assert body["error"]["function_status"] == 500
    assert "nope" in body["error"]["function_body"]
    # The instance answered properly, so it stays warm.
    status2, headers2, _ = await platform.invoke(client, name, {})
    assert status2 == 200
    assert headers2["X-Imagefn-Cold-Start"] == "false"


async def test_web_function_gets_the_native_request(
    platform: Platform, client: aiohttp.ClientSession
) -> None:
    name = unique("web")
    await platform.deploy(client, name, type="web")
    async with client.put(
        f"{platform.url}/web/{name}/some/path%20x?a=1&b=two",
        data=b"payload-bytes",
        headers={
            "X-Custom": "yes",
            "Connection": "keep-alive, X-Hop",
            "X-Hop": "must-not-pass",
            "X-Scf-Name": "spoofed",
        },
    ) as resp:
        assert resp.status == 200
        echo = await resp.json()
        rid = resp.headers["X-Request-Id"]
    assert echo["method"] == "PUT"
    assert echo["path"] == "/some/path%20x"
    assert echo["query"] in ("a=1&b=two", {"a": ["1"], "b": ["two"]}, {"a": "1", "b": "two"})
    assert echo["body"] == "payload-bytes"
    hdrs = {k.lower(): v for k, v in echo["headers"].items()}
    assert hdrs["x-custom"] == "yes"
    assert "x-hop" not in hdrs
    assert hdrs["x-scf-request-id"] == rid
    assert hdrs["x-scf-name"] == name  # the platform's, not the caller's


async def test_a_six_megabyte_body_crosses_the_queue_both_ways(
    platform: Platform, client: aiohttp.ClientSession
) -> None:
    name = unique("bigbody")
    await platform.deploy(client, name, type="web", timeout_s=30)
    # Text, so the echo (JSON, within the 6 MiB result limit) carries it back unchanged.
    payload = os.urandom(3_000_000).hex()
    async with client.put(f"{platform.url}/web/{name}/big", data=payload) as resp:
        assert resp.status == 200, (await resp.read())[:500]
        echo = await resp.json()
    assert len(echo["body"]) == 6_000_000
    assert echo["body"] == payload


async def test_web_app_example_routes_and_statuses(
    platform: Platform, client: aiohttp.ClientSession
) -> None:
    name = unique("webapp")
    await platform.deploy(client, name, type="web", image="imagefn-examples/web-app:latest")
    base = f"{platform.url}/web/{name}"
    async with client.post(f"{base}/items", json={"name": "first"}) as resp:
        assert resp.status == 201
        created = await resp.json()
    async with client.get(f"{base}/items") as resp:
        assert resp.status == 200
        listing = await resp.json()
    assert created in (listing if isinstance(listing, list) else listing.get("items", []))
    async with client.get(f"{base}/items/999999") as resp:
        # The app's own 404 passes through untouched: it is not a platform error.
        assert resp.status == 404
        assert "X-Scf-Error-Type" not in resp.headers
    async with client.get(f"{base}") as resp:
        assert resp.status == 200


async def test_two_callers_with_the_same_request_id_get_their_own_results(
    platform: Platform, client: aiohttp.ClientSession
) -> None:
    name = unique("dup")
    await platform.deploy(client, name, max_instances=2)

    async def call(n: int) -> dict[str, object]:
        async with client.post(
            f"{platform.url}/v1/functions/{name}/invoke",
            json={"n": n, "sleep": 0.2},
            headers={"X-Request-Id": "same-id-for-both"},
        ) as resp:
            assert resp.status == 200
            body: dict[str, object] = await resp.json()
            return body

    a, b = await asyncio.gather(call(1), call(2))
    assert a["event"] == {"n": 1, "sleep": 0.2}
    assert b["event"] == {"n": 2, "sleep": 0.2}


async def test_burst_beyond_max_concurrency_fails_fast(
    platform: Platform, client: aiohttp.ClientSession
) -> None:
    name = unique("reserved")
    await platform.deploy(client, name, max_concurrency=2, max_instances=4, timeout_s=10)
    await platform.invoke(client, name, {})  # warm one up
    results = await asyncio.gather(
        *(platform.invoke(client, name, {"sleep": 1.5}) for _ in range(4))
    )
    statuses = sorted(s for s, _, _ in results)
    assert statuses == [200, 200, 429, 429], statuses
    refused = [h for s, h, _ in results if s == 429]
    assert all(h["X-Scf-Error-Type"] == "ConcurrencyLimitExceeded" for h in refused)
    # The slots come back once those calls are done.
    status, _, _ = await platform.invoke(client, name, {})
    assert status == 200


async def test_web_instance_serves_instance_concurrency_requests_at_once(
    platform: Platform, client: aiohttp.ClientSession
) -> None:
    name = unique("multi")
    await platform.deploy(client, name, type="web", args=["serve-threaded"], instance_concurrency=4)
    async with client.get(f"{platform.url}/web/{name}/warm") as resp:
        assert resp.status == 200

    async def call() -> tuple[str, dict[str, object]]:
        async with client.get(f"{platform.url}/web/{name}/x", params={"sleep": "1"}) as resp:
            assert resp.status == 200, await resp.text()
            return resp.headers["X-Imagefn-Instance"], await resp.json()

    started = asyncio.get_running_loop().time()
    results = await asyncio.gather(*(call() for _ in range(4)))
    elapsed = asyncio.get_running_loop().time() - started
    assert len({inst for inst, _ in results}) == 1
    # They ran together on that instance, not one after another (4 x 1 s).
    assert elapsed < 3.0, elapsed


async def test_a_hot_function_at_saturation_does_not_stall_another(
    platform: Platform, client: aiohttp.ClientSession
) -> None:
    """Stated bound: while one function is saturated (its one instance busy, a queue of
    callers waiting), another warm function still answers within 1 s (normally ~5 ms)."""
    hot, other = unique("hot"), unique("calm")
    await platform.deploy(client, hot, max_instances=1, timeout_s=30)
    await platform.deploy(client, other)
    await platform.invoke(client, hot, {})
    await platform.invoke(client, other, {})
    flood = [asyncio.create_task(platform.invoke(client, hot, {"sleep": 0.5})) for _ in range(24)]
    await asyncio.sleep(0.5)
    loop = asyncio.get_running_loop()
    for _ in range(5):
        started = loop.time()
        status, headers, _ = await platform.invoke(client, other, {})
        assert status == 200 and headers["X-Imagefn-Cold-Start"] == "false"
        assert loop.time() - started < 1.0
    outcomes = await asyncio.gather(*flood)
    assert {s for s, _, _ in outcomes} <= {200, 429}
    assert any(s == 200 for s, _, _ in outcomes)


async def test_invocation_record_shows_where_the_time_went(
    platform: Platform, client: aiohttp.ClientSession
) -> None:
    name = unique("record")
    await platform.deploy(client, name)
    _, headers, _ = await platform.invoke(client, name, {})
    rid = headers["X-Request-Id"]
    record: dict[str, object] = {}
    for _ in range(50):  # written just after the reply
        async with client.get(f"{platform.url}/v1/invocations/{rid}") as resp:
            if resp.status == 200:
                record = await resp.json()
                break
        await asyncio.sleep(0.05)
    assert record["function"] == name and record["status"] == 200
    assert record["cold_start"] is True and record["error"] is None
    assert record["instance"] == headers["X-Imagefn-Instance"]
    timings = record["timings_ms"]
    assert isinstance(timings, dict) and {"create", "start", "ready", "run"} <= set(timings)
    async with client.get(f"{platform.url}/v1/invocations/never-was-1234") as resp:
        assert resp.status == 404
        assert resp.headers["X-Scf-Error-Type"] == "InvocationNotFound"
