"""Fixtures of the unit tests: a container pool over an in-memory runtime (with a real
ImageStore pulling from it), and a gateway over a MemoryQueue, a fake Redis and a fake
image resolver."""

from __future__ import annotations

import asyncio
import contextlib
import types
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import pytest
from aiohttp.test_utils import TestClient, TestServer

from gateway.app import build_app
from gateway.images import ResolvedImage
from shared.errors import InvalidSpec
from shared.imageref import parse_image_ref
from shared.messages import Invocation, InvocationResult
from shared.queue.memory import MemoryQueue
from shared.settings import GatewaySettings, RegistrySettings, Settings, WorkerSettings
from shared.settings_security import AuthSettings
from tests.credentials import ADMIN_HEADERS, TEST_ADMIN_KEY
from workers.forwarder import Forwarder
from workers.images import ImageStore
from workers.pool import ContainerPool

from .fakes import FakeForwarder, FakeRedis, FakeRuntime, FakeTokens, fake_digest
from .helpers import REGISTRY

INSTALLATION = "imagefn-test"
FAST_WORKER = WorkerSettings(
    worker_id="w-test",
    ready_poll_interval_s=0.002,
    stop_timeout_s=0.0,
    memory_capacity_mb=16384,
    log_tail_lines=5,
)
TEST_REGISTRY = RegistrySettings(address=REGISTRY, pull_timeout_s=5.0, image_cache_mb=20480)


class PoolKit:
    """A pool plus the fakes behind it, for one test. Its images come from a real
    ImageStore that pulls from the FakeRuntime with tokens from FakeTokens."""

    def __init__(self, settings: WorkerSettings, registry: RegistrySettings = TEST_REGISTRY):
        self.runtime = FakeRuntime()
        self.forwarder = FakeForwarder()
        self.tokens = FakeTokens()
        self.images = ImageStore(
            self.runtime,
            self.tokens.pull_token,
            registry,
            in_use=lambda: self.pool.images_in_use(),
        )
        self.pool = ContainerPool(
            self.runtime,
            cast(Forwarder, self.forwarder),
            settings,
            settings.worker_id,
            INSTALLATION,
            self.images,
        )


@pytest.fixture
async def make_pool() -> AsyncIterator[Callable[..., PoolKit]]:
    """``make_pool(registry=RegistrySettings(...), **worker_settings)``."""
    kits: list[PoolKit] = []

    def make(registry: RegistrySettings = TEST_REGISTRY, **settings: Any) -> PoolKit:
        kit = PoolKit(WorkerSettings(**{**FAST_WORKER.__dict__, **settings}), registry)
        kits.append(kit)
        return kit

    yield make
    for kit in kits:
        await kit.pool.shutdown(timeout_s=2)
        await kit.runtime.close()


@pytest.fixture
async def kit(make_pool: Callable[..., PoolKit]) -> PoolKit:
    return make_pool()


# -- gateway ---------------------------------------------------------------------------

GATEWAY_SETTINGS = Settings(
    gateway=GatewaySettings(max_body_bytes=4096, result_grace_s=0.5, check_images=False),
    registry=RegistrySettings(pull_timeout_s=2.0),
    auth=AuthSettings(admin_key=TEST_ADMIN_KEY),
)
EVENT_SPEC = {"name": "hello", "image": "repo/hello:1", "timeout_s": 1, "init_timeout_s": 1}
WEB_SPEC = {**EVENT_SPEC, "name": "site", "type": "web"}


class FakeImages:
    """The gateway's image resolver without a registry: a tag resolves to the digest of
    its current content (``push`` changes it); ``missing/...`` images do not exist."""

    def __init__(self) -> None:
        self.resolved: list[str] = []
        self.closed = False
        # What the registry holds under each tag: "repo:tag" -> content name.
        self.content: dict[str, str] = {}

    def push(self, image: str, content: str) -> None:
        """New content under the same tag (the tag's digest changes)."""
        self.content[image] = content

    def digest(self, image: str) -> str:
        return fake_digest(self.content.get(image, image))

    def pinned(self, image: str) -> str:
        ref = parse_image_ref(image, REGISTRY)
        return ref.pinned(self.digest(image))

    async def resolve(self, image: str) -> ResolvedImage:
        self.resolved.append(image)
        if image.startswith("missing/"):
            raise InvalidSpec({"image": f"image {image!r} does not exist"})
        return ResolvedImage(ref=self.pinned(image), digest=self.digest(image))

    async def close(self) -> None:
        self.closed = True


Handler = Callable[[Invocation], InvocationResult]


def ok(inv: Invocation) -> InvocationResult:
    return InvocationResult(
        request_id=inv.request_id,
        status=200,
        headers=[("Content-Type", "application/json")],
        body=b'{"echo":' + inv.body + b"}",
        instance="inst-1",
        cold_start=True,
        timings={"queue": 0.001, "run": 0.0125},
    )


class Gateway:
    def __init__(self, client: TestClient[Any, Any], redis: FakeRedis, queue: MemoryQueue) -> None:
        self.client = client
        self.redis = redis
        self.queue = queue
        self.images: FakeImages
        self.seen: list[Invocation] = []
        self.handler: Handler = ok

    async def work(self) -> None:
        """A stand-in worker: answers each invocation with ``self.handler``."""
        while True:
            for d in await self.queue.consume("fake-worker", 10, 0.05):
                self.seen.append(d.invocation)
                await self.queue.finish(d, self.handler(d.invocation))

    async def deploy(self, spec: dict[str, Any]) -> Any:
        resp = await self.client.put(f"/v1/functions/{spec['name']}", json=spec)
        assert resp.status in (200, 201), await resp.text()
        return await resp.json()


@pytest.fixture
async def gw(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Gateway]:
    redis = FakeRedis()
    # build_app's redis_ctx makes its client with aioredis.Redis.from_url: hand it the fake.
    monkeypatch.setattr(
        "gateway.app.aioredis",
        types.SimpleNamespace(Redis=types.SimpleNamespace(from_url=lambda url: redis)),
    )
    queue = MemoryQueue()
    images = FakeImages()
    client = TestClient(
        TestServer(build_app(GATEWAY_SETTINGS, queue=queue, images=images)),
        headers=ADMIN_HEADERS,
    )
    await client.start_server()
    g = Gateway(client, redis, queue)
    g.images = images
    worker = asyncio.create_task(g.work())
    try:
        yield g
    finally:
        worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await worker
        await client.close()
    # Cleanup contexts ran: the resources the app opened are closed.
    assert redis.closed and images.closed
