"""Image delivery against the real registry: tag → digest pinning, versions and aliases,
pulls by digest with temporary credentials, and every way a pull can fail."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.integration.conftest import (
    TESTFN,
    Platform,
    RegistryInfo,
    docker,
    push_image,
    running_platform,
    unique,
)
from tests.integration.proxy import SlowProxy

JWT_RE = re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}")


def build_variant(tag: str, marker: str) -> None:
    """An image distinguishable by its TEST_IMAGE_VERSION, which testfn reports."""
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "Dockerfile").write_text(f"FROM {TESTFN}\nENV TEST_IMAGE_VERSION={marker}\n")
        subprocess.run(
            ["docker", "build", "-q", "-t", tag, d], check=True, capture_output=True, timeout=300
        )


def forget_locally(*refs: str) -> None:
    """Remove images from the local engine so the next instance must pull."""
    for ref in refs:
        docker("rmi", "-f", ref, check=False)


async def push_variant(registry: RegistryInfo, repository: str, marker: str) -> None:
    local = f"{registry.address}/{repository}:latest"
    build_variant(local, marker)
    await push_image(registry, local, repository, "latest")
    forget_locally(local)


def marker_of(body: Any) -> str:
    return str(body["env"].get("TEST_IMAGE_VERSION"))


async def kill_instances(function: str) -> None:
    ids = docker("ps", "-q", "--filter", f"label=imagefn.function={function}").stdout.split()
    for cid in ids:
        docker("rm", "-f", cid, check=False)
    await asyncio.sleep(0.5)


async def test_same_tag_push_changes_nothing_until_redeploy_then_versions_and_aliases(
    platform: Platform, registry: RegistryInfo, client: aiohttp.ClientSession
) -> None:
    name = unique("pin")
    repo = f"it/{name}"
    await push_variant(registry, repo, "one")
    v1 = await platform.deploy(client, name, image=f"{repo}:latest")
    assert v1["version"] >= 1
    assert v1["image_ref"] == f"{registry.address}/{repo}@{v1['image_digest']}"

    status, headers, body = await platform.invoke(client, name, {})
    assert status == 200, body
    assert marker_of(body) == "one"
    assert "pull;dur=" in headers["Server-Timing"]  # it was not on the worker: pulled

    # New content under the same tag: what runs does not change, even on a new instance.
    await push_variant(registry, repo, "two")
    forget_locally(v1["image_ref"])
    await kill_instances(name)
    status, headers, body = await platform.invoke(client, name, {})
    assert status == 200 and headers["X-Imagefn-Cold-Start"] == "true"
    assert marker_of(body) == "one"

    v2 = await platform.deploy(client, name, image=f"{repo}:latest")
    assert v2["version"] > v1["version"] and v2["image_digest"] != v1["image_digest"]
    _, _, body = await platform.invoke(client, name, {})
    assert marker_of(body) == "two"

    # An explicit version, and an alias moved forward and rolled back.
    async def run(qualifier: str) -> Any:
        async with client.post(
            f"{platform.url}/v1/functions/{name}/invoke",
            params={"qualifier": qualifier},
            json={},
        ) as resp:
            assert resp.status == 200, await resp.text()
            return await resp.json()

    body = await run(str(v1["version"]))
    assert marker_of(body) == "one"
    assert body["headers"]["X-Scf-Version"] == str(v1["version"])

    async def alias(version: int) -> None:
        async with client.put(
            f"{platform.url}/v1/functions/{name}/aliases/prod", json={"version": version}
        ) as resp:
            assert resp.status == 200, await resp.text()

    await alias(v2["version"])
    assert marker_of(await run("prod")) == "two"
    await alias(v1["version"])  # rollback
    assert marker_of(await run("prod")) == "one"

    async with client.get(f"{platform.url}/v1/functions/{name}/versions") as resp:
        listing = await resp.json()
    assert listing["latest"] == v2["version"]
    assert listing["aliases"] == {"prod": v1["version"]}
    assert [v["image_digest"] for v in listing["versions"]] == [
        v1["image_digest"],
        v2["image_digest"],
    ]
    async with client.post(
        f"{platform.url}/v1/functions/{name}/invoke", params={"qualifier": "nope"}, json={}
    ) as resp:
        assert resp.status == 404
        assert resp.headers["X-Scf-Error-Type"] == "VersionNotFound"


async def test_concurrent_cold_starts_pull_once(
    platform: Platform, registry: RegistryInfo, client: aiohttp.ClientSession
) -> None:
    name = unique("once")
    repo = f"it/{name}"
    await push_variant(registry, repo, "once")
    record = await platform.deploy(client, name, image=f"{repo}:latest", max_instances=3)
    results = await asyncio.gather(
        *(platform.invoke(client, name, {"sleep": 0.5}) for _ in range(3))
    )
    assert [s for s, _, _ in results] == [200, 200, 200]
    assert len({h["X-Imagefn-Instance"] for _, h, _ in results}) == 3
    log = platform.workers[0].log_text()
    pulls = [
        line
        for line in log.splitlines()
        if "image_pull_started" in line and record["image_ref"] in line
    ]
    assert len(pulls) == 1, pulls


async def test_image_deleted_from_registry_gives_pull_image_failed(
    platform: Platform, registry: RegistryInfo, client: aiohttp.ClientSession
) -> None:
    name = unique("gone")
    repo = f"it/{name}"
    await push_variant(registry, repo, "gone")
    record = await platform.deploy(client, name, image=f"{repo}:latest")
    # Delete the manifest in the registry (as an operator would), and the local copy.
    from gateway.tokens import REPOSITORY, Access

    token = registry.issuer.issue("it-operator", [Access(REPOSITORY, repo, ("*",))]).token
    async with client.delete(
        f"http://{registry.address}/v2/{repo}/manifests/{record['image_digest']}",
        headers={"Authorization": f"Bearer {token}"},
    ) as resp:
        assert resp.status == 202, await resp.text()
    status, headers, body = await platform.invoke(client, name, {})
    assert status == 502
    assert headers["X-Scf-Error-Type"] == "PullImageFailed"
    assert "no longer in the registry" in body["error"]["message"]
    # Deploying it again is refused: the registry no longer has it.
    async with client.put(
        f"{platform.url}/v1/functions/{name}", json={"image": f"{repo}@{record['image_digest']}"}
    ) as resp:
        assert resp.status == 400
        assert "not in the registry" in (await resp.json())["error"]["fields"]["image"]


@pytest.fixture
async def proxied(
    redis_url: str, log_dir: Path, registry: RegistryInfo, pushed_images: None
) -> Any:
    """A platform whose registry address is a proxy in front of the real registry."""
    proxy = SlowProxy(int(registry.address.rsplit(":", 1)[1]))
    await proxy.start()
    env = {"IMAGEFN_REGISTRY": f"127.0.0.1:{proxy.port}", "IMAGEFN_PULL_TIMEOUT_S": "3"}
    async with running_platform(redis_url, log_dir, registry, extra_env=env) as p:
        yield p, proxy
    await proxy.stop()


async def test_unreachable_registry_gives_pull_image_failed(
    proxied: tuple[Platform, SlowProxy], registry: RegistryInfo, client: aiohttp.ClientSession
) -> None:
    p, proxy = proxied
    name = unique("down")
    repo = f"it/{name}"
    await push_variant(registry, repo, "down")
    record = await p.deploy(client, name, image=f"{repo}:latest")
    assert record["image_ref"].startswith(f"127.0.0.1:{proxy.port}/")
    await proxy.stop()
    status, headers, body = await p.invoke(client, name, {})
    assert status == 502, body
    assert headers["X-Scf-Error-Type"] == "PullImageFailed"
    assert "unreachable" in body["error"]["message"]


async def test_slow_registry_gives_pull_image_timeout(
    proxied: tuple[Platform, SlowProxy], registry: RegistryInfo, client: aiohttp.ClientSession
) -> None:
    p, proxy = proxied
    name = unique("slowreg")
    repo = f"it/{name}"
    await push_variant(registry, repo, "slow")
    await p.deploy(client, name, image=f"{repo}:latest")
    proxy.delay_s = 10.0
    status, headers, body = await p.invoke(client, name, {})
    assert status == 504, body
    assert headers["X-Scf-Error-Type"] == "PullImageTimeout"


async def test_no_credential_in_logs_or_container_environments(
    platform: Platform,
    registry: RegistryInfo,
    client: aiohttp.ClientSession,
    capfd: pytest.CaptureFixture[str],
) -> None:
    name = unique("secret")
    repo = f"it/{name}"
    await push_variant(registry, repo, "secret")
    await platform.deploy(client, name, image=f"{repo}:latest")
    status, _, _ = await platform.invoke(client, name, {})
    assert status == 200
    captured = capfd.readouterr()
    texts = [captured.out, captured.err]
    texts += [p.read_text(errors="replace") for p in platform.log_dir.glob("*.log")]
    # This installation's containers only: inspecting takes the engine's lock on each
    # container, and containers of other installations on the machine (left by an
    # earlier run, or being removed right now) are no business of this test.
    mine = f"label=imagefn.installation={platform.prefix}"
    cids = docker("ps", "-aq", "--filter", mine).stdout.split()
    assert cids, "the function's instance should be among this installation's containers"
    for cid in cids:
        info = json.loads(docker("inspect", cid, check=False).stdout or "[{}]")[0]
        texts.append(json.dumps((info.get("Config") or {}).get("Env") or []))
    secrets = [registry.settings.deploy_password, registry.settings.worker_secret]
    for text in texts:
        for secret in secrets:
            assert secret not in text
        assert not JWT_RE.search(text), JWT_RE.search(text)
    # The pulls did happen with tokens: the worker logged them, without the token.
    assert any("image_pulled" in t for t in texts)


async def test_image_for_another_platform_is_refused_at_deploy(
    platform: Platform, registry: RegistryInfo, client: aiohttp.ClientSession
) -> None:
    """An image whose only manifest is for another architecture cannot run here."""
    import hashlib

    from gateway.tokens import REPOSITORY, Access

    repo = f"it/{unique('arm')}"
    token = registry.issuer.issue("it-deployer", [Access(REPOSITORY, repo, ("pull", "push"))])
    auth = {"Authorization": f"Bearer {token.token}"}
    base = f"http://{registry.address}/v2/{repo}"
    config = json.dumps(
        {"architecture": "s390x", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}
    ).encode()
    digest = "sha256:" + hashlib.sha256(config).hexdigest()
    async with client.post(f"{base}/blobs/uploads/", headers=auth) as resp:
        assert resp.status == 202, await resp.text()
        location = resp.headers["Location"]
    sep = "&" if "?" in location else "?"
    async with client.put(
        f"{location}{sep}digest={digest}",
        data=config,
        headers={**auth, "Content-Type": "application/octet-stream"},
    ) as resp:
        assert resp.status == 201, await resp.text()
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {
            "mediaType": "application/vnd.docker.container.image.v1+json",
            "size": len(config),
            "digest": digest,
        },
        "layers": [],
    }
    async with client.put(
        f"{base}/manifests/v1",
        data=json.dumps(manifest).encode(),
        headers={**auth, "Content-Type": manifest["mediaType"]},
    ) as resp:
        assert resp.status == 201, await resp.text()
    async with client.put(
        f"{platform.url}/v1/functions/{unique('arm')}", json={"image": f"{repo}:v1"}
    ) as resp:
        assert resp.status == 400
        message = (await resp.json())["error"]["fields"]["image"]
    assert "linux/s390x" in message


async def test_reference_to_another_registry_is_refused(
    platform: Platform, client: aiohttp.ClientSession
) -> None:
    async with client.put(
        f"{platform.url}/v1/functions/{unique('elsewhere')}",
        json={"image": "registry.invalid:5000/some/image:1"},
    ) as resp:
        assert resp.status == 400
        assert "platform registry" in (await resp.json())["error"]["fields"]["image"]
