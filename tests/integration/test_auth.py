"""API keys against the real platform (Redis, a worker, real containers): scoped keys
calling functions, revocation reaching a second gateway within the key cache time,
request ids that another caller cannot take over or read, and secrets kept out of every
answer, record and log line."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway.app import build_app
from shared.settings import load_settings
from tests.integration.conftest import Platform, free_port, unique

SECRET = "s3cr3t-db-password-value"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def make_key(
    client: aiohttp.ClientSession, p: Platform, *scopes: str, name: str = "it"
) -> tuple[str, str]:
    async with client.post(f"{p.url}/v1/keys", json={"name": name, "scopes": list(scopes)}) as r:
        assert r.status == 201, await r.text()
        doc = await r.json()
        return doc["id"], doc["key"]


@contextlib.asynccontextmanager
async def second_gateway(p: Platform, **env: str) -> AsyncIterator[str]:
    """Another gateway on the same Redis and queue (as on another machine)."""
    runner = web.AppRunner(build_app(load_settings({**p.env, **env})), access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def test_a_revoked_key_stops_working_on_every_gateway_within_seconds(
    platform: Platform, client: aiohttp.ClientSession
) -> None:
    name = unique("auth")
    await platform.deploy(client, name)
    key_id, key = await make_key(client, platform, f"invoke:{name}")
    async with second_gateway(platform) as other:
        url = f"{other}/v1/functions/{name}/invoke"
        async with client.post(url, json={}, headers=bearer(key)) as r:
            assert r.status == 200, await r.text()
        async with client.delete(f"{platform.url}/v1/keys/{key_id}") as r:
            assert r.status == 200
        revoked_at = time.monotonic()
        while True:
            async with client.post(url, json={}, headers=bearer(key)) as r:
                if r.status == 401:
                    assert f"API key {key_id} is revoked" in await r.text()
                    break
                assert r.status == 200
            assert time.monotonic() - revoked_at < 5, "the other gateway still takes the key"
            await asyncio.sleep(0.1)
    # The key cache holds a key 2 s (IMAGEFN_KEY_CACHE_S).
    assert time.monotonic() - revoked_at < 3


async def test_another_callers_request_id_is_neither_taken_over_nor_read(
    platform: Platform, client: aiohttp.ClientSession
) -> None:
    name = unique("rid")
    await platform.deploy(client, name)
    _, alice = await make_key(client, platform, f"invoke:{name}", name="alice")
    _, mallory = await make_key(client, platform, f"invoke:{name}", name="mallory")
    rid = f"order-{unique('x')}"
    url = f"{platform.url}/v1/functions/{name}/invoke"

    # Alice's synchronous call keeps a record only she (and admins) can read.
    async with client.post(url, json={"v": 1}, headers={**bearer(alice), "X-Request-Id": rid}) as r:
        assert r.status == 200 and r.headers["X-Request-Id"] == rid
    rec = f"{platform.url}/v1/invocations/{rid}"

    async def record_as(key: str) -> tuple[int, dict[str, Any]]:
        async with client.get(rec, headers=bearer(key)) as r:
            return r.status, await r.json()

    deadline = time.monotonic() + 10
    while (got := await record_as(alice))[0] != 200:
        assert time.monotonic() < deadline, got
        await asyncio.sleep(0.1)
    assert got[1]["state"] == "succeeded"
    status, body = await record_as(mallory)
    assert status == 404 and body["error"]["type"] == "InvocationNotFound"

    # Mallory's synchronous call with Alice's id runs, but writes nothing over her record.
    async with client.post(
        url, json={"v": 2}, headers={**bearer(mallory), "X-Request-Id": rid}
    ) as r:
        assert r.status == 200
    await asyncio.sleep(0.5)
    status, mine = await record_as(alice)
    assert status == 200 and mine["attempts"] == got[1]["attempts"]

    # An asynchronous call with an id that is another caller's is refused, not merged.
    async_rid = f"event-{unique('y')}"
    event = {"X-Imagefn-Invocation-Type": "Event", "X-Request-Id": async_rid}
    async with client.post(url, json={}, headers={**bearer(alice), **event}) as r:
        assert r.status == 202
    async with client.post(url, json={}, headers={**bearer(mallory), **event}) as r:
        assert r.status == 409
        assert (await r.json())["error"]["type"] == "RequestIdConflict"
    # Alice's own retry is still recognised as a duplicate.
    async with client.post(url, json={}, headers={**bearer(alice), **event}) as r:
        assert r.status == 202 and (await r.json())["duplicate"] is True


async def test_secrets_stay_out_of_answers_records_and_logs(
    platform: Platform, client: aiohttp.ClientSession
) -> None:
    name = unique("secret")
    await platform.deploy(client, name, env={"DB_PASSWORD": SECRET})
    _, key = await make_key(client, platform, f"invoke:{name}", f"read:{name}")
    h = bearer(key)
    seen: list[str] = []
    async with client.get(f"{platform.url}/v1/functions/{name}", headers=h) as r:
        seen.append(await r.text())
    async with client.get(f"{platform.url}/v1/functions", headers=h) as r:
        seen.append(await r.text())
    rid = f"sec-{unique('z')}"
    async with client.post(
        f"{platform.url}/v1/functions/{name}/invoke",
        json={"exit": 3},
        headers={**h, "X-Request-Id": rid},
    ) as r:
        text = await r.text()
        assert r.status >= 500 and "needs the logs scope" in text, text
        seen.append(text)
    async with client.get(f"{platform.url}/v1/invocations/{rid}", headers=h) as r:
        seen.append(await r.text())
    async with client.get(f"{platform.url}/v1/audit?limit=1000") as r:
        seen.append(await r.text())
    for text in seen:
        assert SECRET not in text
    # Nor in any log line the platform's processes wrote.
    for path in platform.log_dir.glob("*.log"):
        assert SECRET not in path.read_text(errors="replace"), path


@pytest.mark.parametrize("auth", ["key", "public"])
async def test_web_function_auth_against_a_real_container(
    platform: Platform, client: aiohttp.ClientSession, auth: str
) -> None:
    name = unique("webauth")
    await platform.deploy(client, name, type="web", auth=auth)
    async with aiohttp.ClientSession() as anonymous:
        async with anonymous.get(f"{platform.url}/web/{name}/hello") as r:
            assert r.status == (200 if auth == "public" else 401), await r.text()
