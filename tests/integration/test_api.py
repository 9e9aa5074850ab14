"""The control API's validation and the gateway's error mapping."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import yaml

from gateway.app import build_app
from shared.settings import Settings
from tests.integration.conftest import TESTFN, Platform, unique

REPO = Path(__file__).resolve().parents[2]


async def test_bad_specs_are_refused_naming_every_field(
    platform: Platform, client: aiohttp.ClientSession
) -> None:
    name = unique("bad")
    spec = {
        "image": "no-such-image:never",
        "memory_mb": 5,
        "timeout_s": 0,
        "type": "cron",
        "surprise": True,
        "command": "python3 app.py",
        "env": {"SCF_X": "1"},
    }
    async with client.put(f"{platform.url}/v1/functions/{name}", json=spec) as resp:
        assert resp.status == 400
        assert resp.headers["X-Scf-Error-Type"] == "InvalidSpec"
        err = (await resp.json())["error"]
    assert set(err["fields"]) == {
        "image",
        "memory_mb",
        "timeout_s",
        "type",
        "surprise",
        "command",
        "env",
    }
    # Nothing was half-written.
    async with client.get(f"{platform.url}/v1/functions/{name}") as resp:
        assert resp.status == 404


async def test_missing_image_is_refused(platform: Platform, client: aiohttp.ClientSession) -> None:
    async with client.put(
        f"{platform.url}/v1/functions/{unique('noimg')}", json={"image": "nope/nothing:1"}
    ) as resp:
        assert resp.status == 400
        assert "not in the registry" in (await resp.json())["error"]["fields"]["image"]


async def test_crud_and_yaml_specs(platform: Platform, client: aiohttp.ClientSession) -> None:
    name = unique("crud")
    doc = yaml.safe_dump({"image": TESTFN, "memory_mb": 256})
    async with client.put(
        f"{platform.url}/v1/functions/{name}",
        data=doc,
        headers={"Content-Type": "application/yaml"},
    ) as resp:
        assert resp.status == 201
        first = await resp.json()
    assert first["memory_mb"] == 256 and first["image_digest"].startswith("sha256:")
    async with client.put(f"{platform.url}/v1/functions/{name}", json={"image": TESTFN}) as resp:
        assert resp.status == 200
        second = await resp.json()
    assert second["version"] > first["version"]
    assert second["created_at"] == first["created_at"]
    async with client.get(f"{platform.url}/v1/functions") as resp:
        names = [f["name"] for f in (await resp.json())["functions"]]
    assert name in names
    async with client.delete(f"{platform.url}/v1/functions/{name}") as resp:
        assert resp.status == 204
    async with client.delete(f"{platform.url}/v1/functions/{name}") as resp:
        assert resp.status == 404


async def test_unknown_function_is_404(platform: Platform, client: aiohttp.ClientSession) -> None:
    async with client.post(f"{platform.url}/v1/functions/nobody-here/invoke", json={}) as resp:
        assert resp.status == 404
        assert resp.headers["X-Scf-Error-Type"] == "FunctionNotFound"
        assert resp.headers["X-Request-Id"]
    async with client.get(f"{platform.url}/web/nobody-here/x") as resp:
        assert resp.status == 404


async def test_oversized_request_is_413(platform: Platform, client: aiohttp.ClientSession) -> None:
    name = unique("huge")
    await platform.deploy(client, name)
    body = b'{"x": "' + b"a" * (6 * 1024 * 1024 + 10) + b'"}'
    async with client.post(
        f"{platform.url}/v1/functions/{name}/invoke",
        data=body,
        headers={"Content-Type": "application/json"},
    ) as resp:
        assert resp.status == 413
        assert resp.headers["X-Scf-Error-Type"] == "RequestTooLarge"


async def test_wrong_kind_and_bad_json_are_400(
    platform: Platform, client: aiohttp.ClientSession
) -> None:
    name = unique("kind")
    await platform.deploy(client, name)
    async with client.get(f"{platform.url}/web/{name}/") as resp:
        assert resp.status == 400
    async with client.post(f"{platform.url}/v1/functions/{name}/invoke", data=b"{not json") as resp:
        assert resp.status == 400


def test_openapi_describes_exactly_the_served_routes() -> None:
    spec = yaml.safe_load((REPO / "gateway/openapi.yaml").read_text())
    documented = {
        (path, method.upper())
        for path, ops in spec["paths"].items()
        for method in ops
        if method in ("get", "put", "post", "delete", "patch", "head", "options")
    }
    # aiohttp answers HEAD wherever it answers GET.
    documented |= {(path, "HEAD") for path, method in documented if method == "GET"}
    app = build_app(Settings())
    served = set()
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource else {}
        path = info.get("path") or info.get("formatter", "")
        path = path.replace("{tail}", "{path}")
        served.add((path, route.method))
    assert documented == served


async def test_concurrent_deploys_leave_latest_on_the_highest_version(
    platform: Platform, client: aiohttp.ClientSession
) -> None:
    name = unique("race")

    async def deploy(i: int) -> int:
        spec = {"image": TESTFN, "env": {"TEST_N": str(i)}}
        async with client.put(f"{platform.url}/v1/functions/{name}", json=spec) as resp:
            assert resp.status in (200, 201)
            version: int = (await resp.json())["version"]
            return version

    versions = await asyncio.gather(*(deploy(i) for i in range(8)))
    async with client.get(f"{platform.url}/v1/functions/{name}/versions") as resp:
        listing = await resp.json()
    assert sorted(versions) == [v["version"] for v in listing["versions"]]
    assert listing["latest"] == max(versions)
