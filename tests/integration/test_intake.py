"""Bounded intake against a real gateway (build_app served by gateway.service's
GuardedSite, real Redis with the gateway's ACL user): slow headers, slow bodies, idle
keep-alive, the connection cap, the Host allow-list, CSRF and the Redis rate limits.

The close times measured here are the figures in docs/security.md ("Bounded intake");
run with ``-s`` to see them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis

from gateway.app import build_app
from gateway.connguard import GuardedSite
from gateway.service import start_gateway
from shared.settings import load_settings
from tests.credentials import ADMIN_HEADERS
from tests.integration.conftest import RegistryInfo, platform_env

pytestmark = pytest.mark.integration

AUTH = "Authorization: " + ADMIN_HEADERS["Authorization"]


class Gw:
    def __init__(self, site: GuardedSite, prefix: str) -> None:
        self.site = site
        self.port = site.port
        self.url = f"http://127.0.0.1:{site.port}"
        self.prefix = prefix

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.port)


@contextlib.asynccontextmanager
async def gateway(redis_url: str, registry: RegistryInfo, **env: str) -> AsyncIterator[Gw]:
    prefix = f"it-{uuid.uuid4().hex[:8]}"
    settings = load_settings({**platform_env(redis_url, prefix, registry), **env})
    runner, site = await start_gateway(build_app(settings), settings, "127.0.0.1", 0)
    try:
        yield Gw(site, prefix)
    finally:
        await runner.cleanup()


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
    body = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", "0"))), 10)
    return int(lines[0].split()[1]), headers, body


async def until_closed(reader: asyncio.StreamReader, timeout_s: float) -> None:
    # A reset counts as closed: the server closes with the client's bytes still unread.
    async with asyncio.timeout(timeout_s):
        with contextlib.suppress(ConnectionResetError):
            while await reader.read(65536):
                pass


async def drip(writer: asyncio.StreamWriter, data: bytes, every_s: float) -> None:
    with contextlib.suppress(ConnectionError):
        for i in range(len(data)):
            writer.write(data[i : i + 1])
            await writer.drain()
            await asyncio.sleep(every_s)


async def test_slowloris_headers_are_closed_while_healthz_answers(
    redis_url: str, registry: RegistryInfo
) -> None:
    async with gateway(redis_url, registry, IMAGEFN_HEADER_TIMEOUT_S="1") as gw:
        request = b"GET /v1/functions HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-Pad: a\r\n" * 20

        async def slow_client() -> float:
            reader, writer = await gw.connect()
            started = time.monotonic()
            sending = asyncio.create_task(drip(writer, request, 1.0))  # 1 byte a second
            try:
                status, _, body = await read_answer(reader)
                assert status == 408, body
                await until_closed(reader, 3)
                return time.monotonic() - started
            finally:
                sending.cancel()
                writer.close()

        clients = [asyncio.create_task(slow_client()) for _ in range(50)]
        health: list[float] = []
        async with aiohttp.ClientSession() as s:
            while not all(c.done() for c in clients):
                t0 = time.monotonic()
                async with s.get(f"{gw.url}/healthz") as resp:
                    assert resp.status == 200
                health.append(time.monotonic() - t0)
                await asyncio.sleep(0.1)
        closes = [await c for c in clients]
        print(
            f"\nslow headers (1 B/s, header_timeout 1 s, 50 clients): closed after "
            f"median {statistics.median(closes):.3f} s, max {max(closes):.3f} s; "
            f"/healthz meanwhile: {len(health)} answers, max {max(health) * 1000:.1f} ms"
        )
        assert max(closes) < 1.5
        assert gw.site.guard.header_timeouts == 50


async def test_a_slow_body_is_closed(redis_url: str, registry: RegistryInfo) -> None:
    env = {"IMAGEFN_BODY_GRACE_S": "1", "IMAGEFN_BODY_MIN_RATE": "1024"}
    async with gateway(redis_url, registry, **env) as gw:
        reader, writer = await gw.connect()
        head = (
            f"PUT /v1/functions/slow HTTP/1.1\r\nHost: 127.0.0.1\r\n{AUTH}\r\n"
            "Content-Type: application/json\r\nContent-Length: 60000\r\n\r\n"
        )
        writer.write(head.encode())
        started = time.monotonic()
        sending = asyncio.create_task(drip(writer, b"x" * 60000, 0.01))  # ~100 B/s
        await until_closed(reader, 5)
        elapsed = time.monotonic() - started
        sending.cancel()
        writer.close()
        print(f"\nslow body (100 B/s, grace 1 s, min 1024 B/s): closed after {elapsed:.3f} s")
        assert 1.0 <= elapsed < 2.6
        assert gw.site.guard.slow_bodies == 1


async def test_an_idle_keep_alive_connection_is_closed(
    redis_url: str, registry: RegistryInfo
) -> None:
    async with gateway(redis_url, registry, IMAGEFN_KEEPALIVE_TIMEOUT_S="1") as gw:
        reader, writer = await gw.connect()
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert (await read_answer(reader))[0] == 200
        started = time.monotonic()
        await until_closed(reader, 5)
        idle = time.monotonic() - started
        writer.close()
        print(f"\nidle keep-alive (keepalive_timeout 1 s): closed after {idle:.3f} s")
        assert 0.9 <= idle < 2.0


async def test_past_the_connection_cap_a_503_then_room_again(
    redis_url: str, registry: RegistryInfo
) -> None:
    env = {"IMAGEFN_MAX_CONNECTIONS": "5", "IMAGEFN_HEADER_TIMEOUT_S": "10"}
    async with gateway(redis_url, registry, **env) as gw:
        held = [await gw.connect() for _ in range(5)]
        deadline = time.monotonic() + 3
        while len(gw.site.guard.open) < 5:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        reader, writer = await gw.connect()
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        status, headers, body = await read_answer(reader)
        assert status == 503 and headers["retry-after"] == "1"
        err = json.loads(body)["error"]
        assert err["type"] == "ServiceUnavailable" and err["limit"] == "max_connections"
        await until_closed(reader, 5)
        writer.close()
        for _, w in held:
            w.close()
        deadline = time.monotonic() + 3
        while gw.site.guard.open:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        async with aiohttp.ClientSession() as s, s.get(f"{gw.url}/healthz") as resp:
            assert resp.status == 200


async def test_host_and_csrf_rules(redis_url: str, registry: RegistryInfo) -> None:
    async with (
        gateway(redis_url, registry) as gw,
        aiohttp.ClientSession(headers=ADMIN_HEADERS) as s,
    ):
        async with s.get(f"{gw.url}/v1/functions", headers={"Host": "rebind.example"}) as r:
            assert r.status == 421
            assert (await r.json())["error"]["host"] == "rebind.example"
        async with s.get(f"{gw.url}/v1/functions") as r:
            assert r.status == 200
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        async with s.post(f"{gw.url}/v1/functions/f/invoke", data=b"a=1", headers=form) as r:
            assert r.status == 415
        cross = {"Origin": "https://evil.example"}
        async with s.post(f"{gw.url}/v1/functions/f/invoke", json={}, headers=cross) as r:
            assert r.status == 403


async def test_rate_limits_in_redis(redis_url: str, registry: RegistryInfo) -> None:
    env = {
        "IMAGEFN_RATE_PER_FUNCTION": "1",
        "IMAGEFN_BURST_PER_FUNCTION": "2",
        "IMAGEFN_RATE_PER_KEY": "0.1",
        "IMAGEFN_BURST_PER_KEY": "5",
    }
    async with (
        gateway(redis_url, registry, **env) as gw,
        aiohttp.ClientSession(headers=ADMIN_HEADERS) as s,
    ):
        # The function need not exist: the limit applies before the lookup.
        statuses = []
        for _ in range(3):
            async with s.post(f"{gw.url}/v1/functions/nofn/invoke", json={}) as r:
                statuses.append(r.status)
                last = r
                body = await r.json()
        assert statuses == [404, 404, 429]
        assert last.headers["Retry-After"] == "1"
        assert body["error"]["type"] == "ResourceLimitReached"
        assert body["error"]["limit"] == "rate_per_function"
        # The key's bucket (burst 5) gave two tokens: the call the function's bucket
        # refused took none. Three left, then 429 per key, whatever the route.
        for expected in (200, 200, 200, 429):
            async with s.get(f"{gw.url}/v1/functions") as r:
                assert r.status == expected
                if r.status == 429:
                    assert (await r.json())["error"]["limit"] == "rate_per_key"
        # The buckets are in Redis under the prefix, with a TTL.
        rc = aioredis.Redis.from_url(redis_url)
        try:
            keys = sorted([k.decode() async for k in rc.scan_iter(f"{gw.prefix}:rate:*")])
            assert keys == [f"{gw.prefix}:rate:fn:nofn", f"{gw.prefix}:rate:key:0123456789ab"]
            assert 0 < await rc.pttl(keys[0]) <= 3000  # full again in 2 s, + 1 s
            await rc.delete(*keys)
        finally:
            await rc.aclose()


async def test_rate_limit_is_shared_by_two_gateways(
    redis_url: str, registry: RegistryInfo, tmp_path: Path
) -> None:
    env = {"IMAGEFN_RATE_PER_FUNCTION": "0.1", "IMAGEFN_BURST_PER_FUNCTION": "4"}
    prefix = f"it-{uuid.uuid4().hex[:8]}"
    settings = load_settings({**platform_env(redis_url, prefix, registry), **env})
    started = [await start_gateway(build_app(settings), settings, "127.0.0.1", 0) for _ in "ab"]
    try:
        statuses = []
        async with aiohttp.ClientSession(headers=ADMIN_HEADERS) as s:
            for i in range(6):
                site = started[i % 2][1]
                url = f"http://127.0.0.1:{site.port}/v1/functions/shared/invoke"
                async with s.post(url, json={}) as r:
                    statuses.append(r.status)
        assert statuses == [404, 404, 404, 404, 429, 429]
    finally:
        for runner, _ in started:
            await runner.cleanup()
