"""The batch routes against a real Redis, served by aiohttp's test server over a
MemoryQueue (no workers: result lines are written into Redis as a worker would)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer

from gateway.app import build_app
from shared.keys import Keys
from shared.queue.memory import MemoryQueue
from shared.settings import (
    AsyncSettings,
    GatewaySettings,
    QueueSettings,
    RedisSettings,
    Settings,
)
from shared.settings_security import AuthSettings
from tests.credentials import ADMIN_HEADERS, TEST_ADMIN_KEY

pytestmark = pytest.mark.integration

# Far below the batches sent here: the batch route streams its body past this limit.
MAX_BODY = 64 * 1024
SPEC = {"image": "repo/fn:1", "timeout_s": 3}


class Api:
    def __init__(self, client: TestClient[Any, Any], redis: aioredis.Redis, keys: Keys) -> None:
        self.client = client
        self.redis = redis
        self.keys = keys

    async def submit(self, body: bytes, query: str = "", **headers: str) -> tuple[int, Any]:
        resp = await self.client.post(
            f"/v1/functions/fn/batches{query}", data=body, headers=headers
        )
        return resp.status, await resp.json()

    async def status(self, batch_id: str) -> dict[str, Any]:
        resp = await self.client.get(f"/v1/batches/{batch_id}")
        assert resp.status == 200, await resp.text()
        doc: dict[str, Any] = await resp.json()
        return doc

    async def finish(self, batch_id: str, index: int, counter: str = "succeeded") -> None:
        """What a worker's finish script writes for one item."""
        line = {"index": index, "request_id": f"{batch_id}-{index}", "status": counter}
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.keys.batch_results(batch_id), str(index), json.dumps(line))
            pipe.hincrby(self.keys.batch(batch_id), counter, 1)
            pipe.hincrby(self.keys.batch(batch_id), "fed", 0)
            await pipe.execute()

    async def batch_keys(self) -> list[bytes]:
        return [k async for k in self.redis.scan_iter(f"{self.keys.prefix}:batch*")]


@pytest.fixture
async def api(redis_url: str) -> AsyncIterator[Api]:
    prefix = f"ba-{uuid.uuid4().hex[:8]}"
    settings = Settings(
        redis=RedisSettings(url=redis_url),
        queue=QueueSettings(prefix=prefix),
        gateway=GatewaySettings(max_body_bytes=MAX_BODY, check_images=False),
        auth=AuthSettings(admin_key=TEST_ADMIN_KEY),
    )
    client = TestClient(TestServer(build_app(settings, queue=MemoryQueue())), headers=ADMIN_HEADERS)
    await client.start_server()
    redis = aioredis.Redis.from_url(redis_url)
    a = Api(client, redis, Keys(prefix))
    for name, type_ in (("fn", "event"), ("site", "web")):
        resp = await client.put(f"/v1/functions/{name}", json={**SPEC, "type": type_})
        assert resp.status == 201, await resp.text()
    try:
        yield a
    finally:
        await client.close()
        leftover = [k async for k in redis.scan_iter(f"{prefix}:*")]
        if leftover:
            await redis.delete(*leftover)
        await redis.aclose()


def ndjson(n: int) -> bytes:
    return b"".join(b'{"n": %d}\n' % i for i in range(n))


async def test_a_hundred_thousand_items_are_accepted_and_queued(api: Api) -> None:
    body = ndjson(100_000)
    assert len(body) > 10 * MAX_BODY
    started = time.perf_counter()
    status, doc = await api.submit(body, "?max_concurrency=500")
    took = time.perf_counter() - started
    assert status == 202, doc
    assert (doc["items"], doc["state"], doc["function"], doc["qualifier"]) == (
        100_000,
        "running",
        "fn",
        "$LATEST",
    )
    print(f"\n100000 items submitted in {took:.2f} s: {100_000 / took:,.0f} items/s")
    st = await api.status(doc["batch_id"])
    assert (st["total"], st["queued"], st["in_flight"], st["succeeded"]) == (100_000, 100_000, 0, 0)
    assert st["max_concurrency"] == 500 and st["eta_s"] is None
    items = api.keys.batch_items(doc["batch_id"])
    assert await api.redis.llen(items) == 100_000
    assert await api.redis.lindex(items, 99_999) == b'{"n":99999}'


async def test_a_json_array_with_options(api: Api) -> None:
    body = json.dumps([{"n": i} for i in range(1000)], indent=1).encode()
    status, doc = await api.submit(
        body, "?qualifier=1&max_retries=0&max_event_age_s=60&max_concurrency=7"
    )
    assert status == 202, doc
    assert (doc["items"], doc["qualifier"]) == (1000, "1")
    meta = json.loads(await api.redis.hget(api.keys.batch(doc["batch_id"]), "meta"))
    assert (meta["max_retries"], meta["max_event_age_s"], meta["max_concurrency"]) == (0, 60, 7)


async def test_ndjson_of_arrays_by_its_content_type(api: Api) -> None:
    status, doc = await api.submit(b"[1]\n[2, 3]\n", **{"Content-Type": "application/x-ndjson"})
    assert status == 202 and doc["items"] == 2


async def test_a_malformed_line_names_its_line_and_nothing_is_kept(api: Api) -> None:
    lines = [b'{"n": %d}' % i for i in range(50_000)]
    lines[41_999] = b'{"n": 41999,}'
    status, doc = await api.submit(b"\n".join(lines))
    assert status == 400
    err = doc["error"]
    assert err["type"] == "InvalidRequest"
    assert (err["item"], err["line"]) == (41_999, 42_000)
    assert "line 42000" in err["message"]
    assert await api.batch_keys() == []


async def test_an_oversized_item_names_the_limit(api: Api) -> None:
    big = b'{"s": "' + b"x" * (128 * 1024) + b'"}'
    status, doc = await api.submit(b"1\n2\n" + big + b"\n4\n")
    assert status == 400
    assert (doc["error"]["item"], doc["error"]["line"]) == (2, 3)
    assert "131072 bytes (max_event_bytes" in doc["error"]["message"]
    assert await api.batch_keys() == []


async def test_a_batch_over_its_byte_limit_names_the_limit_and_leaves_nothing(
    redis_url: str,
) -> None:
    prefix = f"ba-{uuid.uuid4().hex[:8]}"
    settings = Settings(
        redis=RedisSettings(url=redis_url),
        queue=QueueSettings(prefix=prefix),
        gateway=GatewaySettings(check_images=False),
        asyncinv=AsyncSettings(batch_max_bytes=100_000),
        auth=AuthSettings(admin_key=TEST_ADMIN_KEY),
    )
    client = TestClient(TestServer(build_app(settings, queue=MemoryQueue())), headers=ADMIN_HEADERS)
    await client.start_server()
    redis = aioredis.Redis.from_url(redis_url)
    try:
        resp = await client.put("/v1/functions/fn", json=SPEC)
        assert resp.status == 201
        # 20,000 items of 10 bytes: over the 100,000 bytes allowed in all.
        resp = await client.post("/v1/functions/fn/batches", data=ndjson(20_000))
        doc = await resp.json()
        assert resp.status == 413, doc
        assert "100000 bytes in all (IMAGEFN_BATCH_MAX_BYTES)" in doc["error"]["message"]
        assert [k async for k in redis.scan_iter(f"{prefix}:batch*")] == []
    finally:
        await client.close()
        leftover = [k async for k in redis.scan_iter(f"{prefix}:*")]
        if leftover:
            await redis.delete(*leftover)
        await redis.aclose()


async def test_refusals_before_the_body(api: Api) -> None:
    for path, status, type_ in (
        ("/v1/functions/nope/batches", 404, "FunctionNotFound"),
        ("/v1/functions/fn/batches?qualifier=prod", 404, "VersionNotFound"),
        ("/v1/functions/site/batches", 400, "InvalidRequest"),
        ("/v1/functions/fn/batches?max_concurrency=0", 400, "InvalidRequest"),
        ("/v1/functions/fn/batches?max_event_age_s=30", 400, "InvalidRequest"),
        ("/v1/functions/fn/batches?max_retries=11", 400, "InvalidRequest"),
    ):
        resp = await api.client.post(path, data=b"1\n")
        assert resp.status == status, (path, await resp.text())
        assert (await resp.json())["error"]["type"] == type_
    resp = await api.client.post("/v1/functions/fn/batches?max_retries=11", data=b"1\n")
    assert (await resp.json())["error"]["message"].startswith("max_retries: ")
    status, doc = await api.submit(b"")
    assert status == 400 and "no items" in doc["error"]["message"]
    assert await api.batch_keys() == []


async def test_other_routes_keep_the_body_limit(api: Api) -> None:
    resp = await api.client.post("/v1/functions/fn/invoke", data=b"1" * (MAX_BODY + 1))
    assert resp.status == 413
    assert (await resp.json())["error"]["type"] == "RequestTooLarge"


async def test_unknown_batches(api: Api) -> None:
    for method, path in (
        ("GET", "/v1/batches/b-" + "0" * 32),
        ("GET", "/v1/batches/not-a-batch-id"),
        ("DELETE", "/v1/batches/b-" + "0" * 32),
        ("GET", "/v1/batches/b-" + "0" * 32 + "/results"),
    ):
        resp = await api.client.request(method, path)
        assert resp.status == 404, path
        assert (await resp.json())["error"]["type"] == "BatchNotFound"


async def test_cancel(api: Api) -> None:
    _, doc = await api.submit(ndjson(10))
    batch_id = doc["batch_id"]
    # Three were fed and are running (what the feeder would have done).
    await api.redis.hset(api.keys.batch(batch_id), "fed", 3)
    resp = await api.client.delete(f"/v1/batches/{batch_id}")
    assert resp.status == 200
    doc = await resp.json()
    assert (doc["state"], doc["cancelled"], doc["queued"], doc["in_flight"]) == (
        "cancelled",
        7,
        0,
        3,
    )
    resp = await api.client.get(f"/v1/batches/{batch_id}/results")
    lines = [json.loads(line) for line in (await resp.read()).splitlines()]
    assert [line["index"] for line in lines] == list(range(3, 10))
    assert {line["status"] for line in lines} == {"cancelled"}
    assert lines[0]["request_id"] == f"{batch_id}-3"
    again = await (await api.client.delete(f"/v1/batches/{batch_id}")).json()
    assert again["cancelled"] == 7


async def test_results_come_in_item_order(api: Api) -> None:
    _, doc = await api.submit(ndjson(2500))
    batch_id = doc["batch_id"]
    await api.redis.hset(api.keys.batch(batch_id), "fed", 2500)
    for i in (5, 3, 1500, 0, 2499):
        await api.finish(batch_id, i)
    resp = await api.client.get(f"/v1/batches/{batch_id}/results")
    assert resp.headers["Content-Type"] == "application/x-ndjson"
    got = [json.loads(line)["index"] for line in (await resp.read()).splitlines()]
    assert got == [0, 3, 5, 1500, 2499]
    resp = await api.client.get(f"/v1/batches/{batch_id}/results?start=4")
    assert [json.loads(x)["index"] for x in (await resp.read()).splitlines()] == [5, 1500, 2499]


async def test_follow_sends_each_line_once_it_and_those_before_are_done(api: Api) -> None:
    n = 1200
    _, doc = await api.submit(ndjson(n))
    batch_id = doc["batch_id"]
    await api.redis.hset(api.keys.batch(batch_id), "fed", n)
    resp = await api.client.get(f"/v1/batches/{batch_id}/results?follow=true")
    assert resp.status == 200
    seen: list[int] = []

    async def read() -> None:
        while line := await resp.content.readline():
            seen.append(json.loads(line)["index"])

    reader = asyncio.create_task(read())
    # Items finish out of order: nothing goes out until item 0 is done.
    for i in range(1, 10):
        await api.finish(batch_id, i, "failed")
    await asyncio.sleep(0.5)
    assert seen == []
    await api.finish(batch_id, 0)
    await asyncio.sleep(0.5)
    assert seen == list(range(10))
    for i in reversed(range(10, n)):
        await api.finish(batch_id, i)
    await api.redis.hset(api.keys.batch(batch_id), "state", "completed")
    await asyncio.wait_for(reader, 10)  # the stream ends once the batch is over
    assert seen == list(range(n))


async def test_a_client_gone_midway_leaves_nothing_behind(api: Api) -> None:
    server = api.client.server
    _, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(
        b"POST /v1/functions/fn/batches HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        + f"Authorization: {ADMIN_HEADERS['Authorization']}\r\n".encode()
        + b"Content-Type: application/x-ndjson\r\nContent-Length: 100000000\r\n\r\n"
        + ndjson(20_000)
    )
    await writer.drain()
    # Staged while the body arrives ...
    deadline = time.monotonic() + 10
    while not await api.batch_keys():
        assert time.monotonic() < deadline, "nothing was staged"
        await asyncio.sleep(0.05)
    writer.close()
    # ... and deleted once the client is gone.
    deadline = time.monotonic() + 10
    while await api.batch_keys():
        assert time.monotonic() < deadline, "the staged items were left behind"
        await asyncio.sleep(0.05)
