"""gateway.ratelimit (the token bucket) and gateway.admission (the in-flight bound and
the rate limits, as the middleware applies them)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway import admission
from gateway.admission import InflightBudget, intake_limits
from gateway.app import request_context
from gateway.context import PRINCIPAL, SETTINGS
from gateway.errors import Handler
from gateway.ratelimit import Bucket, Limit, MemoryRateLimiter, take
from shared.scopes import Principal
from shared.settings import Settings


def lim(rate: float, burst: int, key: str = "k") -> Limit:
    return Limit.of(key, "key", rate, burst)


def test_a_full_bucket_allows_its_burst_then_refuses_with_the_wait() -> None:
    limits = [lim(10, 3)]
    buckets: list[Bucket | None] = [None]
    for _ in range(3):
        after, denied = take(buckets, limits, 100.0)
        assert denied is None
        buckets = list(after)
    after, denied = take(buckets, limits, 100.0)
    assert denied is not None and denied.wait_s == pytest.approx(0.1)
    assert denied.retry_after_s == 1
    # Refilled at the rate: one token a tenth of a second later.
    _, denied = take(after, limits, 100.1)
    assert denied is None


def test_a_refusal_by_one_bucket_spends_no_token_of_the_other() -> None:
    limits = [lim(100, 10, "key"), lim(1, 1, "fn")]
    after, denied = take([None, Bucket(0.0, 50.0)], limits, 50.5)
    assert denied is not None and denied.limit.key == "fn"
    assert denied.wait_s == pytest.approx(0.5)
    assert after[0].tokens == 10  # untouched (full)


def test_burst_zero_means_one_seconds_worth() -> None:
    assert lim(5, 0).burst == 5
    assert lim(0.2, 0).burst == 1


async def test_memory_limiter_follows_its_clock() -> None:
    now = [0.0]
    limiter = MemoryRateLimiter(clock=lambda: now[0])
    limits = [lim(1, 2)]
    assert await limiter.check(limits) is None
    assert await limiter.check(limits) is None
    denied = await limiter.check(limits)
    assert denied is not None and denied.wait_s == pytest.approx(1.0)
    now[0] = 1.0
    assert await limiter.check(limits) is None


def test_inflight_budget() -> None:
    b = InflightBudget(max_calls=2, max_bytes=100)
    assert b.try_take(500) is None  # alone, a call larger than the budget still goes
    assert b.try_take(1) == "max_inflight_bytes"
    b.give_back(500)
    assert b.try_take(60) is None and b.try_take(40) is None
    assert b.try_take(0) == "max_inflight_calls"
    b.give_back(60)
    assert b.try_take(61) == "max_inflight_bytes"
    assert (b.calls, b.bytes) == (1, 40)


class App:
    def __init__(self, client: TestClient[Any, Any], release: asyncio.Event) -> None:
        self.client = client
        self.release = release


async def make_app(intake: dict[str, Any]) -> tuple[web.Application, asyncio.Event]:
    release = asyncio.Event()
    release.set()

    async def ok(request: web.Request) -> web.Response:
        await request.read()
        await release.wait()
        return web.json_response({"ok": True})

    @web.middleware
    async def as_key(request: web.Request, handler: Handler) -> web.StreamResponse:
        # Stands in for gateway.auth: X-Test-Key names the caller's key.
        key = request.headers.get("X-Test-Key")
        if key:
            request[PRINCIPAL] = Principal(key_id=key)
        return await handler(request)

    base = Settings()
    settings = replace(
        base,
        auth=replace(base.auth, access_log=False),
        intake=replace(base.intake, **intake),
    )
    app = web.Application(middlewares=[request_context, as_key, intake_limits])
    app[SETTINGS] = settings
    admission.setup(app, MemoryRateLimiter())
    app.router.add_get("/v1/functions", ok)
    app.router.add_post("/v1/functions/{name}/invoke", ok)
    app.router.add_route("*", "/web/{name}", ok)
    app.router.add_route("*", "/web/{name}/{tail:.*}", ok)
    return app, release


@pytest.fixture
async def make() -> AsyncIterator[Any]:
    clients: list[TestClient[Any, Any]] = []

    async def build(**intake: Any) -> App:
        app, release = await make_app(intake)
        client = TestClient(TestServer(app))
        await client.start_server()
        clients.append(client)
        return App(client, release)

    yield build
    for c in clients:
        await c.close()


async def test_per_function_rate_limit_is_429_with_retry_after(make: Any) -> None:
    a = await make(rate_per_function=1.0, burst_per_function=2, rate_per_key=0)
    statuses = [(await a.client.post("/v1/functions/f/invoke", json={})).status for _ in range(2)]
    assert statuses == [200, 200]
    resp = await a.client.post("/v1/functions/f/invoke", json={})
    assert resp.status == 429
    assert resp.headers["Retry-After"] == "1"
    err = (await resp.json())["error"]
    assert err["type"] == "ResourceLimitReached" and err["limit"] == "rate_per_function"
    assert "IMAGEFN_RATE_PER_FUNCTION" in err["message"]
    # Another function has its own bucket; web routes count as invocations of theirs.
    assert (await a.client.post("/v1/functions/g/invoke", json={})).status == 200
    for _ in range(2):
        assert (await a.client.get("/web/w/x")).status == 200
    assert (await a.client.get("/web/w")).status == 429
    # Not an invocation: no per-function limit.
    assert (await a.client.get("/v1/functions")).status == 200


async def test_per_key_rate_limit_needs_a_key(make: Any) -> None:
    a = await make(rate_per_key=0.5, burst_per_key=1)
    key = {"X-Test-Key": "k1"}
    assert (await a.client.get("/v1/functions", headers=key)).status == 200
    resp = await a.client.get("/v1/functions", headers=key)
    assert resp.status == 429 and resp.headers["Retry-After"] == "2"
    assert (await resp.json())["error"]["limit"] == "rate_per_key"
    # Another key, and no key (anonymous: a public web function's caller) are not limited.
    assert (await a.client.get("/v1/functions", headers={"X-Test-Key": "k2"})).status == 200
    assert (await a.client.get("/v1/functions")).status == 200


async def test_past_max_inflight_calls_is_503_with_retry_after(make: Any) -> None:
    a = await make(max_inflight_calls=2, rate_per_key=0)
    a.release.clear()
    held = [asyncio.create_task(a.client.post("/v1/functions/f/invoke", json={})) for _ in range(2)]
    budget = a.client.app[admission.BUDGET]
    await wait_until(lambda: budget.calls == 2)
    resp = await a.client.post("/v1/functions/f/invoke", json={})
    assert resp.status == 503 and resp.headers["Retry-After"] == "1"
    err = (await resp.json())["error"]
    assert err["type"] == "ServiceUnavailable" and err["limit"] == "max_inflight_calls"
    a.release.set()
    assert [(await t).status for t in held] == [200, 200]
    assert (budget.calls, budget.bytes) == (0, 0)


async def test_past_max_inflight_bytes_is_503(make: Any) -> None:
    a = await make(max_inflight_bytes=1000, rate_per_key=0)
    a.release.clear()
    first = asyncio.create_task(a.client.post("/v1/functions/f/invoke", data=b"x" * 800))
    budget = a.client.app[admission.BUDGET]
    await wait_until(lambda: budget.calls == 1)
    resp = await a.client.post("/web/w/upload", data=b"y" * 300)
    assert resp.status == 503
    assert (await resp.json())["error"]["limit"] == "max_inflight_bytes"
    a.release.set()
    assert (await first).status == 200
    assert budget.bytes == 0


async def wait_until(predicate: Callable[[], bool], timeout_s: float = 3) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)
