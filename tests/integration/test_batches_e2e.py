"""Batches end to end on each queue backend: submitted through the gateway, fed by the
feeder, run by real workers (their begin/finish scripts write the result lines), read
back in item order, and cancelled midway. Real Docker, Redis and broker."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from shared.keys import Keys
from shared.queue.factory import make_queue
from shared.registry import FunctionRegistry
from shared.settings import load_settings
from tests.integration.conftest import Platform, unique
from workers.feeder import BatchFeeder

pytestmark = pytest.mark.integration


@pytest.fixture
async def platform(queue_platform: Platform) -> Platform:
    return queue_platform


@pytest.fixture
async def feeder(platform: Platform) -> AsyncIterator[None]:
    """A feeder ticking in the test's loop, as the scheduler runs it."""
    settings = load_settings(platform.env)
    redis = aioredis.Redis.from_url(settings.redis.url)
    queue = make_queue(settings, redis)
    await queue.open()
    keys = Keys(settings.queue.prefix)
    f = BatchFeeder(redis, queue, keys, FunctionRegistry(redis, keys), settings.asyncinv)

    async def run() -> None:
        while True:
            await f.tick()
            await asyncio.sleep(0.1)

    task = asyncio.create_task(run())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await queue.close()
    await redis.aclose()


async def submit(
    client: aiohttp.ClientSession, p: Platform, name: str, events: list[Any], query: str
) -> str:
    body = b"".join(json.dumps(e).encode() + b"\n" for e in events)
    async with client.post(f"{p.url}/v1/functions/{name}/batches?{query}", data=body) as resp:
        doc = await resp.json()
        assert resp.status == 202, doc
        assert doc["items"] == len(events)
        return str(doc["batch_id"])


async def follow(client: aiohttp.ClientSession, p: Platform, batch_id: str) -> list[Any]:
    url = f"{p.url}/v1/batches/{batch_id}/results?follow=true"
    async with client.get(url, timeout=aiohttp.ClientTimeout(total=180)) as resp:
        assert resp.status == 200
        return [json.loads(line) async for line in resp.content if line.strip()]


async def status(client: aiohttp.ClientSession, p: Platform, batch_id: str) -> dict[str, Any]:
    async with client.get(f"{p.url}/v1/batches/{batch_id}") as resp:
        doc: dict[str, Any] = await resp.json()
        return doc


async def test_a_batch_runs_and_its_results_come_in_item_order(
    platform: Platform, client: aiohttp.ClientSession, feeder: None
) -> None:
    name = unique("batch")
    await platform.deploy(client, name, env={"TESTFN_QUIET": "1"})
    events: list[Any] = [{"body": {"n": i}} for i in range(30)]
    events[7] = {"status": 500, "body": "broken"}
    batch_id = await submit(client, platform, name, events, "max_concurrency=4&max_retries=0")
    lines = await follow(client, platform, batch_id)
    assert [line["index"] for line in lines] == list(range(30))
    assert lines[0] == {
        "index": 0,
        "request_id": f"{batch_id}-0",
        "status": "succeeded",
        "result": {"n": 0},
    }
    assert lines[7]["status"] == "failed" and lines[7]["error"]["type"] == "UserCodeError"
    assert {line["status"] for i, line in enumerate(lines) if i != 7} == {"succeeded"}
    doc = await status(client, platform, batch_id)
    assert (doc["state"], doc["succeeded"], doc["failed"], doc["queued"], doc["in_flight"]) == (
        "completed",
        29,
        1,
        0,
        0,
    )
    # Each item has its invocation record, as any asynchronous call.
    async with client.get(f"{platform.url}/v1/invocations/{batch_id}-3") as resp:
        record = await resp.json()
    assert (record["batch"], record["index"], record["state"]) == (batch_id, 3, "succeeded")


async def test_cancel_midway(
    platform: Platform, client: aiohttp.ClientSession, feeder: None
) -> None:
    name = unique("batch-cancel")
    await platform.deploy(client, name, env={"TESTFN_QUIET": "1"})
    events = [{"sleep": 0.2, "body": {"n": i}} for i in range(200)]
    batch_id = await submit(client, platform, name, events, "max_concurrency=2")
    deadline = time.monotonic() + 120
    while (await status(client, platform, batch_id))["succeeded"] < 4:
        assert time.monotonic() < deadline, "the batch does not run"
        await asyncio.sleep(0.2)
    async with client.delete(f"{platform.url}/v1/batches/{batch_id}") as resp:
        assert resp.status == 200
        cancelled = await resp.json()
    assert cancelled["state"] == "cancelled" and cancelled["queued"] == 0
    lines = await follow(client, platform, batch_id)  # ends once the running ones finish
    assert [line["index"] for line in lines] == list(range(200))
    done = [line for line in lines if line["status"] == "succeeded"]
    assert 4 <= len(done) < 20
    assert all(line["status"] == "cancelled" for line in lines[len(done) + 2 :])
    doc = await status(client, platform, batch_id)
    assert doc["state"] == "cancelled"
    assert doc["succeeded"] + doc["cancelled"] == 200 and doc["in_flight"] == 0
