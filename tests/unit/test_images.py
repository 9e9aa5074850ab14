"""workers.images: the worker's image store (pull by digest once, verify, collect least
recently used) over the FakeRuntime, and the pull-token source against a token service."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from structlog.testing import capture_logs

from gateway import token_service
from gateway.context import SETTINGS, TOKENS
from gateway.tokens import TokenIssuer
from shared.errors import PullImageFailed, PullImageTimeout, ServiceUnavailable
from shared.settings import WORKER_USER, RegistrySettings, Settings
from tests.integration.registry_support import make_token_keys
from workers.images import ImageStore, TokenSource

from .fakes import FakeRuntime, FakeTokens, PullBehaviour, fake_digest, pull_failure
from .helpers import eventually

REGISTRY = "registry.test:5000"
SETTINGS_ = RegistrySettings(address=REGISTRY, pull_timeout_s=2.0, image_cache_mb=1000)


def ref(name: str, content: str | None = None) -> str:
    return f"{REGISTRY}/{name}@{fake_digest(content or name)}"


A, B, C, D = ref("team/a"), ref("team/b"), ref("c"), ref("d")


@dataclasses.dataclass
class Kit:
    runtime: FakeRuntime
    tokens: FakeTokens
    store: ImageStore
    in_use: set[str]


@pytest.fixture
def make_store() -> Callable[..., Kit]:
    def make(**settings: Any) -> Kit:
        runtime, tokens, in_use = FakeRuntime(), FakeTokens(), set[str]()
        store = ImageStore(
            runtime,
            tokens.pull_token,
            dataclasses.replace(SETTINGS_, **settings),
            in_use=lambda: set(in_use),
        )
        return Kit(runtime, tokens, store, in_use)

    return make


@pytest.fixture
def kit(make_store: Callable[..., Kit]) -> Kit:
    return make_store()


# -- ensure --------------------------------------------------------------------------------


async def test_image_already_present_takes_no_time_and_no_pull(kit: Kit) -> None:
    kit.runtime.add_image(A)
    assert await kit.store.ensure(A) == 0.0
    assert kit.runtime.pulls == [] and kit.tokens.issued == []


async def test_missing_image_is_pulled_by_digest_with_a_token_for_its_repository(
    kit: Kit,
) -> None:
    kit.runtime.queue_pulls(PullBehaviour(delay_s=0.05))
    took = await kit.store.ensure(A)
    assert took >= 0.05
    [(repository, token)] = kit.tokens.issued
    assert repository == "team/a"
    # The credential goes to the engine for this pull only, as a registry token.
    assert kit.runtime.pulls == [(A, {"registrytoken": token})]
    assert A in kit.runtime.images
    # Present now: no second pull.
    assert await kit.store.ensure(A) == 0.0
    assert len(kit.runtime.pulls) == 1


async def test_concurrent_ensures_of_one_image_pull_once(kit: Kit) -> None:
    kit.runtime.queue_pulls(PullBehaviour(delay_s=0.1))
    took = await asyncio.gather(*(kit.store.ensure(A) for _ in range(5)))
    assert len(kit.runtime.pulls) == 1
    assert len(kit.tokens.issued) == 1
    assert all(t >= 0.09 for t in took)


async def test_concurrent_ensures_of_different_images_pull_each(kit: Kit) -> None:
    kit.runtime.pull_default = PullBehaviour(delay_s=0.05)
    await asyncio.gather(kit.store.ensure(A), kit.store.ensure(B), kit.store.ensure(A))
    assert sorted(r for r, _ in kit.runtime.pulls) == sorted([A, B])


async def test_pull_error_is_pull_image_failed_and_a_later_ensure_retries(kit: Kit) -> None:
    kit.runtime.queue_pulls(pull_failure("unauthorized: authentication required"))
    results = await asyncio.gather(kit.store.ensure(A), kit.store.ensure(A), return_exceptions=True)
    # Both callers hear the one pull's failure.
    assert [type(r) for r in results] == [PullImageFailed, PullImageFailed]
    assert "unauthorized" in str(results[0])
    assert len(kit.runtime.pulls) == 1
    assert A not in kit.runtime.images
    # Nothing sticks: the next ensure pulls again (with a fresh token).
    assert await kit.store.ensure(A) > 0
    assert len(kit.runtime.pulls) == 2
    assert len({t for _, t in kit.tokens.issued}) == 2


async def test_token_service_failure_is_pull_image_failed_without_a_pull(kit: Kit) -> None:
    kit.tokens.error = PullImageFailed("the token service refused a pull token (HTTP 401)")
    with pytest.raises(PullImageFailed, match="HTTP 401"):
        await kit.store.ensure(A)
    assert kit.runtime.pulls == []


async def test_slow_pull_is_pull_image_timeout(make_store: Callable[..., Kit]) -> None:
    kit = make_store(pull_timeout_s=0.1)
    kit.runtime.queue_pulls(PullBehaviour(delay_s=5.0))
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(PullImageTimeout) as info:
        await kit.store.ensure(A)
    assert loop.time() - started < 1.0
    assert A in info.value.message and "0.1 s" in info.value.message
    # The engine's pull was abandoned, and a later ensure starts over.
    assert kit.runtime.pulls_cancelled == [A]
    assert await kit.store.ensure(A) > 0
    assert len(kit.runtime.pulls) == 2


async def test_slow_token_service_counts_against_the_pull_timeout(
    make_store: Callable[..., Kit],
) -> None:
    kit = make_store(pull_timeout_s=0.1)
    kit.tokens.delay_s = 5.0
    with pytest.raises(PullImageTimeout):
        await kit.store.ensure(A)
    assert kit.runtime.pulls == []


async def test_wrong_digest_is_pull_image_failed(kit: Kit) -> None:
    kit.runtime.queue_pulls(PullBehaviour(wrong_digest=True))
    with pytest.raises(PullImageFailed) as info:
        await kit.store.ensure(A)
    assert A in info.value.message
    # Not taken for present: the next ensure pulls again.
    assert await kit.store.ensure(A) > 0
    assert len(kit.runtime.pulls) == 2


async def test_image_found_without_the_digest_is_pull_image_failed(kit: Kit) -> None:
    # The engine reports the image, but not under the digest asked for.
    async def pull_other(image_ref: str, auth: dict[str, str], progress: Any) -> None:
        kit.runtime.images[image_ref] = dataclasses.replace(
            kit.runtime.images.get(image_ref) or _image(), digests=[ref("team/a", "other")]
        )

    kit.runtime.pull = pull_other  # type: ignore[method-assign]
    with pytest.raises(PullImageFailed) as info:
        await kit.store.ensure(A)
    assert ref("team/a", "other") in info.value.message


def _image() -> Any:
    from .fakes import FakeImage

    return FakeImage(size_bytes=1, digests=[])


@pytest.mark.parametrize("image", [f"{REGISTRY}/team/a:1", "team/a", f"{REGISTRY}/team/a:latest"])
async def test_image_not_pinned_by_digest_is_refused(kit: Kit, image: str) -> None:
    with pytest.raises(PullImageFailed, match="not pinned by digest"):
        await kit.store.ensure(image)
    assert kit.runtime.pulls == [] and kit.tokens.issued == []


async def test_a_cancelled_caller_does_not_cancel_the_pull_for_the_others(kit: Kit) -> None:
    kit.runtime.queue_pulls(PullBehaviour(delay_s=0.1))
    first = asyncio.create_task(kit.store.ensure(A))
    second = asyncio.create_task(kit.store.ensure(A))
    await asyncio.sleep(0.02)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert await second >= 0.09
    assert kit.runtime.pulls_cancelled == []
    assert len(kit.runtime.pulls) == 1 and A in kit.runtime.images


# -- logging: progress yes, credentials never ------------------------------------------------


async def test_pull_progress_is_logged_and_the_token_never_is(kit: Kit) -> None:
    many = [{"status": "Downloading", "id": "l1", "progress": f"{i}MB"} for i in range(50)]
    kit.runtime.queue_pulls(
        PullBehaviour(progress=[*many, {"status": "Pull complete", "id": "l1"}]),
        pull_failure("denied: requested access to the resource is denied"),
    )
    with capture_logs() as logs:
        await kit.store.ensure(A)
        with pytest.raises(PullImageFailed) as info:
            await kit.store.ensure(B)
    events = [e["event"] for e in logs]
    assert events.count("image_pull_started") == 2
    assert events.count("image_pulled") == 1
    progress = [e for e in logs if e["event"] == "image_pull_progress"]
    # Rate-limited (at most one a second), but every finished layer is logged.
    assert len(progress) < 5
    assert progress[-1]["status"] == "Pull complete"
    [pulled] = [e for e in logs if e["event"] == "image_pulled"]
    assert pulled["image"] == A and pulled["size_mb"] == 100.0
    tokens = [t for _, t in kit.tokens.issued]
    assert len(tokens) == 2
    seen = repr(logs) + str(info.value) + repr(info.value.to_dict())
    for token in tokens:
        assert token not in seen


# -- garbage collection ----------------------------------------------------------------------


async def test_no_collection_within_the_bound(make_store: Callable[..., Kit]) -> None:
    kit = make_store(image_cache_mb=300)
    for image in (A, B, C):
        await kit.store.ensure(image)
    assert kit.runtime.removed_images == []
    assert await kit.store.collect_garbage() == []


async def test_least_recently_used_images_go_first_past_the_bound(
    make_store: Callable[..., Kit],
) -> None:
    kit = make_store(image_cache_mb=250)
    await kit.store.ensure(A)
    await kit.store.collections_done()
    await kit.store.ensure(B)
    # A is used again (present: no pull), so B is now the least recently used.
    assert await kit.store.ensure(A) == 0.0
    await kit.store.ensure(C)
    await kit.store.collections_done()
    assert kit.runtime.removed_images == [B]
    assert set(kit.runtime.images) == {A, C}
    await kit.store.ensure(D)
    await kit.store.collections_done()
    assert kit.runtime.removed_images == [B, A]
    assert set(kit.runtime.images) == {C, D}


async def test_images_in_use_are_kept_even_past_the_bound(make_store: Callable[..., Kit]) -> None:
    kit = make_store(image_cache_mb=150)
    await kit.store.ensure(A)
    await kit.store.collections_done()
    kit.in_use.add(A)
    await kit.store.ensure(B)
    await kit.store.collections_done()
    # A is the least recently used but an instance runs it; B was just pulled. Both stay,
    # over the bound, until one is free.
    assert kit.runtime.removed_images == []
    kit.in_use.clear()
    kit.in_use.add(B)
    assert await kit.store.collect_garbage() == [A]
    assert set(kit.runtime.images) == {B}


async def test_an_image_the_engine_refuses_to_remove_is_skipped(
    make_store: Callable[..., Kit],
) -> None:
    kit = make_store(image_cache_mb=150)
    await kit.store.ensure(A)
    await kit.store.collections_done()
    kit.runtime.image_locked.add(A)  # a container still uses it
    await kit.store.ensure(B)
    await kit.store.collections_done()
    assert kit.runtime.removed_images == []
    await kit.store.ensure(C)
    await kit.store.collections_done()
    assert kit.runtime.removed_images == [B]
    assert set(kit.runtime.images) == {A, C}
    # Once it can go, the next collection removes it.
    kit.runtime.image_locked.clear()
    assert await kit.store.collect_garbage() == [A]


async def test_a_collected_image_is_pulled_again_when_needed(
    make_store: Callable[..., Kit],
) -> None:
    kit = make_store(image_cache_mb=150)
    await kit.store.ensure(A)
    await kit.store.collections_done()
    await kit.store.ensure(B)
    assert kit.runtime.removed_images == [A]
    assert await kit.store.ensure(A) > 0
    await kit.store.collections_done()
    assert [r for r, _ in kit.runtime.pulls] == [A, B, A]


async def test_images_found_on_the_worker_count_towards_the_bound(
    make_store: Callable[..., Kit],
) -> None:
    kit = make_store(image_cache_mb=250)
    kit.runtime.add_image(A, size_mb=200)  # pulled before the worker restarted, say
    assert await kit.store.ensure(A) == 0.0
    await kit.store.ensure(B)  # 300 MB on disk now
    assert kit.runtime.removed_images == [A]


async def test_concurrent_collections_do_not_fail_the_pulls(
    make_store: Callable[..., Kit],
) -> None:
    kit = make_store(image_cache_mb=150)
    await kit.store.ensure(A)
    kit.in_use.update({B, C})  # the instances that asked for them
    real_remove = kit.runtime.remove_image

    async def slow_remove(image_ref: str) -> bool:
        await asyncio.sleep(0.05)  # an engine call takes a while
        return await real_remove(image_ref)

    kit.runtime.remove_image = slow_remove  # type: ignore[method-assign]
    kit.runtime.pull_default = PullBehaviour(delay_s=0.01)
    results = await asyncio.gather(kit.store.ensure(B), kit.store.ensure(C))
    assert all(r > 0 for r in results)
    # Collection runs after the pull, off the caller's path.
    await eventually(lambda: kit.runtime.removed_images == [A])
    await asyncio.sleep(0.2)
    assert kit.runtime.removed_images == [A]


async def test_a_collection_error_does_not_fail_the_pull(make_store: Callable[..., Kit]) -> None:
    kit = make_store(image_cache_mb=150)
    await kit.store.ensure(A)

    async def broken_remove(image_ref: str) -> bool:
        raise ServiceUnavailable("docker image delete failed: engine restarting")

    kit.runtime.remove_image = broken_remove  # type: ignore[method-assign]
    assert await kit.store.ensure(B) > 0


# -- TokenSource -----------------------------------------------------------------------------


def _worker_settings(url: str, secret: str = "w0rker-secret") -> RegistrySettings:
    return RegistrySettings(
        address=REGISTRY,
        service="imagefn-registry",
        token_url=url,
        worker_secret=secret,
        deploy_password="dep1oy-pass",
    )


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def _serve(handler: Callable[[web.Request], Any]) -> TestServer:
    app = web.Application()
    app.router.add_get("/v1/registry/token", handler)
    server = TestServer(app)
    await server.start_server()
    return server


async def test_token_source_asks_as_the_worker_for_a_pull_scope(
    session: aiohttp.ClientSession,
) -> None:
    asked: list[web.Request] = []

    async def handler(request: web.Request) -> web.Response:
        asked.append(request)
        return web.json_response({"token": "the-token", "expires_in": 300})

    server = await _serve(handler)
    try:
        source = TokenSource(_worker_settings(str(server.make_url("/v1/registry/token"))), session)
        assert await source.pull_token("team/app") == "the-token"
    finally:
        await server.close()
    [request] = asked
    assert dict(request.query) == {
        "service": "imagefn-registry",
        "scope": "repository:team/app:pull",
    }
    auth = aiohttp.BasicAuth.decode(request.headers["Authorization"])
    assert (auth.login, auth.password) == (WORKER_USER, "w0rker-secret")


@pytest.mark.parametrize(
    ("status", "body", "match"),
    [
        (401, {"error": {"message": "invalid credentials"}}, "HTTP 401"),
        (503, {"error": {"message": "no signing key"}}, "HTTP 503"),
        (200, {"expires_in": 300}, "without a token"),
        (200, {"token": ""}, "without a token"),
        (200, {"token": 5}, "without a token"),
    ],
)
async def test_token_source_failures_are_pull_image_failed(
    session: aiohttp.ClientSession, status: int, body: dict[str, Any], match: str
) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.json_response(body, status=status)

    server = await _serve(handler)
    try:
        source = TokenSource(_worker_settings(str(server.make_url("/v1/registry/token"))), session)
        with pytest.raises(PullImageFailed, match=match) as info:
            await source.pull_token("team/app")
    finally:
        await server.close()
    assert "w0rker-secret" not in str(info.value)


async def test_unreachable_token_service_is_pull_image_failed(
    session: aiohttp.ClientSession,
) -> None:
    from .fakes import closed_port

    url = f"http://127.0.0.1:{closed_port()}/v1/registry/token"
    with pytest.raises(PullImageFailed, match="unreachable") as info:
        await TokenSource(_worker_settings(url), session).pull_token("team/app")
    assert "w0rker-secret" not in str(info.value)


def _issuer(settings: RegistrySettings) -> TokenIssuer:
    # The same key material the integration fixtures make, in a throwaway directory.
    with tempfile.TemporaryDirectory() as d:
        key, cert = make_token_keys(Path(d))
        return TokenIssuer.from_files(
            key, cert, issuer=settings.issuer, service=settings.service, ttl_s=settings.token_ttl_s
        )


def _claims(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    claims: dict[str, Any] = json.loads(
        base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    )
    return claims


@pytest.mark.parametrize("with_issuer", [True, False])
async def test_token_source_against_the_gateways_token_service(
    session: aiohttp.ClientSession, with_issuer: bool
) -> None:
    server_settings = _worker_settings("unused")
    app = web.Application()
    app[SETTINGS] = Settings(registry=server_settings)
    if with_issuer:
        app[TOKENS] = _issuer(server_settings)
    app.router.add_routes(token_service.routes)
    server = TestServer(app)
    await server.start_server()
    url = str(server.make_url(token_service.TOKEN_PATH))
    try:
        source = TokenSource(_worker_settings(url), session)
        if not with_issuer:
            # The credentials were accepted; only the signing key is missing.
            with pytest.raises(PullImageFailed, match="HTTP 503"):
                await source.pull_token("team/app")
            return
        token = await source.pull_token("team/app")
        wrong = TokenSource(_worker_settings(url, secret="guess"), session)
        with pytest.raises(PullImageFailed, match="HTTP 401") as info:
            await wrong.pull_token("team/app")
        assert "guess" not in str(info.value)
    finally:
        await server.close()
    claims = _claims(token)
    assert claims["sub"] == WORKER_USER
    assert claims["aud"] == server_settings.service
    # Exactly the one repository, pull only.
    assert claims["access"] == [{"type": "repository", "name": "team/app", "actions": ["pull"]}]
