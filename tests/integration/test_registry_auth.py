"""Token authentication against the real registry (docker-registry, distribution 2.8):
a registry of this module's own whose realm is a small app serving only the gateway's
token route, checked with plain HTTP and through the Docker engine."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiodocker
import aiohttp
import pytest
from aiodocker.exceptions import DockerError
from aiohttp import web

from gateway import token_service
from gateway.context import SETTINGS, TOKENS
from gateway.tokens import Access, TokenIssuer
from shared.settings import WORKER_USER, RegistrySettings, Settings

from .conftest import docker, free_port
from .registry_support import (
    make_token_keys,
    start_registry,
    stop_registry,
    write_registry_config,
)

pytestmark = pytest.mark.integration

SERVICE = "imagefn-it-registry"
ISSUER = "imagefn-it"
MANIFEST_TYPES = ", ".join(
    [
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.oci.image.manifest.v1+json",
    ]
)


@dataclass
class Registry:
    address: str  # host:port
    token_url: str
    settings: RegistrySettings
    issuer: TokenIssuer
    repository: str  # pushed by the deployer (module fixture)
    digest: str  # of the pushed manifest
    image_id: str  # the local image that was pushed
    token_requests: list[str]  # query strings the token app has answered

    @property
    def base(self) -> str:
        return f"http://{self.address}/v2"

    def deployer_auth(self) -> dict[str, str]:
        return {
            "username": self.settings.deploy_user,
            "password": self.settings.deploy_password,
            "serveraddress": self.address,
        }

    def worker_auth(self) -> dict[str, str]:
        return {
            "username": WORKER_USER,
            "password": self.settings.worker_secret,
            "serveraddress": self.address,
        }


def claims_of(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    decoded: dict[str, Any] = json.loads(
        base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    )
    return decoded


async def fetch_token(
    client: aiohttp.ClientSession, reg: Registry, user: str, password: str, *scopes: str
) -> str:
    params = [("service", SERVICE), *(("scope", s) for s in scopes)]
    async with client.get(reg.token_url, params=params, headers=basic(user, password)) as resp:
        body = await resp.json()
        assert resp.status == 200, body
        token: str = body["token"]
        return token


def basic(user: str, password: str) -> dict[str, str]:
    raw = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {raw}"}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def push_stream(docker_client: aiodocker.Docker, name: str, tag: str, auth: Any) -> str:
    """Pushes and returns the manifest digest the engine reports."""
    digest = ""
    for item in await docker_client.images.push(name, tag=tag, auth=auth):
        aux = item.get("aux") or {}
        digest = aux.get("Digest", digest)
    assert digest.startswith("sha256:"), "the push reported no digest"
    return digest


def remove_local(*refs: str) -> None:
    """Removes local images, so that the next pull must fetch from the registry."""
    for ref in refs:
        docker("rmi", "-f", ref, check=False)
        assert docker("image", "inspect", ref, check=False).returncode != 0


@pytest.fixture(scope="module")
async def docker_client(docker_engine: None) -> AsyncIterator[aiodocker.Docker]:
    client = aiodocker.Docker()
    yield client
    await client.close()


@pytest.fixture(scope="module")
async def registry(
    tmp_path_factory: pytest.TempPathFactory, docker_client: aiodocker.Docker
) -> AsyncIterator[Registry]:
    """A registry with token auth, its token app, and one image pushed by the deployer."""
    work = tmp_path_factory.mktemp("registry-auth")
    key_path, cert_path = make_token_keys(work / "keys")
    registry_port, token_port = free_port(), free_port()
    token_url = f"http://127.0.0.1:{token_port}{token_service.TOKEN_PATH}"
    settings = Settings(
        registry=RegistrySettings(
            address=f"127.0.0.1:{registry_port}",
            service=SERVICE,
            issuer=ISSUER,
            token_ttl_s=120,
            signing_key=str(key_path),
            signing_cert=str(cert_path),
            deploy_password=uuid.uuid4().hex,
            worker_secret=uuid.uuid4().hex,
            token_url=token_url,
        )
    )
    issuer = TokenIssuer.from_settings(settings.registry)
    token_requests: list[str] = []

    @web.middleware
    async def count(request: web.Request, handler: Any) -> web.StreamResponse:
        token_requests.append(request.query_string)
        response: web.StreamResponse = await handler(request)
        return response

    app = web.Application(middlewares=[count])
    app[SETTINGS] = settings
    app[TOKENS] = issuer
    app.router.add_routes(token_service.routes)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", token_port).start()

    config = write_registry_config(
        work / "registry", registry_port, token_url, SERVICE, ISSUER, cert_path, work / "data"
    )
    proc = await asyncio.to_thread(start_registry, config, registry_port)

    # A tiny image of this run's own (so the registry cannot already hold it).
    context = work / "image"
    context.mkdir()
    busybox = shutil.which("busybox")
    assert busybox, "busybox-static is not installed; run deploy/setup.sh first"
    shutil.copy(busybox, context / "busybox")
    (context / "stamp").write_text(uuid.uuid4().hex)
    (context / "Dockerfile").write_text(
        'FROM scratch\nCOPY busybox /bin/busybox\nCOPY stamp /stamp\nCMD ["/bin/busybox", "true"]\n'
    )
    repository = f"it/auth-{uuid.uuid4().hex[:8]}"
    name = f"127.0.0.1:{registry_port}/{repository}"
    built = docker("build", "-q", "-t", f"{name}:v1", str(context), check=False, timeout_s=400)
    assert built.returncode == 0, built.stderr
    image_id = built.stdout.strip()
    reg = Registry(
        address=settings.registry.address,
        token_url=token_url,
        settings=settings.registry,
        issuer=issuer,
        repository=repository,
        digest="",
        image_id=image_id,
        token_requests=token_requests,
    )
    try:
        # The engine does the realm dance with the deployer's credentials.
        reg.digest = await push_stream(docker_client, name, "v1", reg.deployer_auth())
        yield reg
    finally:
        remove_local(image_id)
        stop_registry(proc)
        await runner.cleanup()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
        yield s


# -- plain HTTP against the registry -------------------------------------------------------


async def test_no_token_is_refused_with_a_challenge_naming_our_realm(
    registry: Registry, client: aiohttp.ClientSession
) -> None:
    for path in ("/", f"/{registry.repository}/manifests/{registry.digest}"):
        async with client.get(registry.base + path) as resp:
            assert resp.status == 401
            challenge = resp.headers["WWW-Authenticate"]
            assert challenge.startswith(f'Bearer realm="{registry.token_url}"')
            assert f'service="{SERVICE}"' in challenge


async def test_the_registry_accepts_our_kid_signed_tokens(
    registry: Registry, client: aiohttp.ClientSession
) -> None:
    scope = f"repository:{registry.repository}:pull"
    token = await fetch_token(client, registry, WORKER_USER, registry.settings.worker_secret, scope)
    assert "x5c" not in json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
    headers = {**bearer(token), "Accept": MANIFEST_TYPES}
    async with client.get(
        f"{registry.base}/{registry.repository}/manifests/{registry.digest}", headers=headers
    ) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["Docker-Content-Digest"] == registry.digest


async def test_a_deployer_token_may_push_a_worker_token_may_not(
    registry: Registry, client: aiohttp.ClientSession
) -> None:
    scope = f"repository:{registry.repository}:push,pull"
    uploads = f"{registry.base}/{registry.repository}/blobs/uploads/"

    deployer = await fetch_token(
        client, registry, registry.settings.deploy_user, registry.settings.deploy_password, scope
    )
    assert claims_of(deployer)["access"] == [
        {"type": "repository", "name": registry.repository, "actions": ["push", "pull"]}
    ]
    async with client.post(uploads, headers=bearer(deployer)) as resp:
        assert resp.status == 202, await resp.text()
    # (The upload is left open: cancelling it needs "delete", which nobody is granted.)

    worker = await fetch_token(
        client, registry, WORKER_USER, registry.settings.worker_secret, scope
    )
    assert claims_of(worker)["access"] == [
        {"type": "repository", "name": registry.repository, "actions": ["pull"]}
    ]
    async with client.post(uploads, headers=bearer(worker)) as resp:
        assert resp.status == 401
        assert 'error="insufficient_scope"' in resp.headers["WWW-Authenticate"]


async def test_a_token_for_another_repository_is_refused(
    registry: Registry, client: aiohttp.ClientSession
) -> None:
    other = f"repository:it/other-{uuid.uuid4().hex[:6]}:pull"
    for user, password in (
        (WORKER_USER, registry.settings.worker_secret),
        (registry.settings.deploy_user, registry.settings.deploy_password),
    ):
        token = await fetch_token(client, registry, user, password, other)
        async with client.get(
            f"{registry.base}/{registry.repository}/manifests/{registry.digest}",
            headers={**bearer(token), "Accept": MANIFEST_TYPES},
        ) as resp:
            assert resp.status in (401, 403)


async def test_an_expired_token_is_refused(
    registry: Registry, client: aiohttp.ClientSession
) -> None:
    access = [Access("repository", registry.repository, ("pull",))]
    url = f"{registry.base}/{registry.repository}/manifests/{registry.digest}"
    # distribution 2.8 allows 60 s of clock skew past exp, so "expired" means more than
    # that: this token's exp is 90 s in the past (issued 91 s ago with a 1 s TTL).
    expired = registry.issuer.issue("it", access, ttl_s=1, now=time.time() - 91)
    fresh = registry.issuer.issue("it", access, ttl_s=1)
    async with client.get(url, headers={**bearer(expired.token), "Accept": MANIFEST_TYPES}) as r:
        assert r.status == 401
        assert 'error="invalid_token"' in r.headers["WWW-Authenticate"]
    async with client.get(url, headers={**bearer(fresh.token), "Accept": MANIFEST_TYPES}) as r:
        assert r.status == 200


async def test_a_token_signed_by_another_key_is_refused(
    registry: Registry, client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    stranger = TokenIssuer.from_files(
        *make_token_keys(tmp_path), issuer=ISSUER, service=SERVICE, ttl_s=60
    )
    token = stranger.issue("it", [Access("repository", registry.repository, ("pull",))])
    url = f"{registry.base}/{registry.repository}/manifests/{registry.digest}"
    async with client.get(url, headers={**bearer(token.token), "Accept": MANIFEST_TYPES}) as r:
        assert r.status == 401
        assert 'error="invalid_token"' in r.headers["WWW-Authenticate"]


async def test_the_token_service_refuses_bad_credentials_and_other_services(
    registry: Registry, client: aiohttp.ClientSession
) -> None:
    params = {"service": SERVICE, "scope": f"repository:{registry.repository}:pull"}
    async with client.get(
        registry.token_url, params=params, headers=basic(WORKER_USER, "x")
    ) as resp:
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"] == 'Basic realm="imagefn"'
    async with client.get(
        registry.token_url,
        params={**params, "service": "elsewhere"},
        headers=basic(WORKER_USER, registry.settings.worker_secret),
    ) as resp:
        assert resp.status == 400


# -- through the Docker engine --------------------------------------------------------------


async def test_the_engine_pulls_by_digest_with_only_a_pre_issued_token(
    registry: Registry, client: aiohttp.ClientSession, docker_client: aiodocker.Docker
) -> None:
    """The worker's path: a pull token from the token service, handed to the engine as
    X-Registry-Auth {"registrytoken": ...}; the engine never sees a password."""
    ref = f"{registry.address}/{registry.repository}@{registry.digest}"
    remove_local(registry.image_id)
    token = await fetch_token(
        client,
        registry,
        WORKER_USER,
        registry.settings.worker_secret,
        f"repository:{registry.repository}:pull",
    )
    asked = len(registry.token_requests)
    await docker_client.images.pull(ref, auth={"registrytoken": token})
    assert len(registry.token_requests) == asked, "the engine went to the realm itself"
    pulled = await docker_client.images.inspect(ref)
    assert f"{registry.address}/{registry.repository}@{registry.digest}" in pulled["RepoDigests"]
    assert pulled["Id"] == registry.image_id


async def test_the_engine_refuses_a_pull_with_a_token_for_another_repository(
    registry: Registry, client: aiohttp.ClientSession, docker_client: aiodocker.Docker
) -> None:
    ref = f"{registry.address}/{registry.repository}@{registry.digest}"
    remove_local(registry.image_id)
    token = await fetch_token(
        client,
        registry,
        WORKER_USER,
        registry.settings.worker_secret,
        f"repository:it/other-{uuid.uuid4().hex[:6]}:pull",
    )
    with pytest.raises(DockerError) as info:
        await docker_client.images.pull(ref, auth={"registrytoken": token})
    assert "unauthorized" in str(info.value).lower() or "denied" in str(info.value).lower()


async def test_the_engine_pulls_with_worker_credentials_through_the_realm(
    registry: Registry, docker_client: aiodocker.Docker
) -> None:
    ref = f"{registry.address}/{registry.repository}@{registry.digest}"
    remove_local(registry.image_id)
    asked = len(registry.token_requests)
    await docker_client.images.pull(ref, auth=registry.worker_auth())
    assert (await docker_client.images.inspect(ref))["Id"] == registry.image_id
    assert len(registry.token_requests) > asked


async def test_the_engine_cannot_push_with_worker_credentials(
    registry: Registry, docker_client: aiodocker.Docker
) -> None:
    name = f"{registry.address}/{registry.repository}"
    tag = f"worker-{uuid.uuid4().hex[:6]}"
    if docker("image", "inspect", registry.image_id, check=False).returncode != 0:
        await docker_client.images.pull(f"{name}@{registry.digest}", auth=registry.deployer_auth())
    docker("tag", registry.image_id, f"{name}:{tag}")
    try:
        with pytest.raises(DockerError):
            await push_stream(docker_client, name, tag, registry.worker_auth())
    finally:
        docker("rmi", f"{name}:{tag}", check=False)
