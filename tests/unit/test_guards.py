"""gateway.guards: the Host allow-list and the API's cross-site (CSRF) rules."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway.app import request_context
from gateway.context import SETTINGS
from gateway.guards import host_allowed, host_name, intake_guard
from shared.settings import Settings
from shared.settings_security import IntakeSettings


@pytest.mark.parametrize(
    ("value", "name"),
    [
        ("127.0.0.1:8080", "127.0.0.1"),
        ("LocalHost", "localhost"),
        ("localhost.:80", "localhost"),
        ("[::1]:8080", "::1"),
        ("[::1]", "::1"),
        ("::1", "::1"),
        ("evil.example", "evil.example"),
    ],
)
def test_host_name(value: str, name: str) -> None:
    assert host_name(value) == name


def test_host_allowed() -> None:
    allowed = IntakeSettings().allowed_hosts
    assert host_allowed("127.0.0.1", allowed) and host_allowed("::1", allowed)
    assert not host_allowed("attacker.example", allowed)
    assert host_allowed("attacker.example", ("*",))


@pytest.fixture
async def client() -> AsyncIterator[TestClient[Any, Any]]:
    async def ok(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app = web.Application(middlewares=[request_context, intake_guard])
    app[SETTINGS] = replace(Settings(), auth=replace(Settings().auth, access_log=False))
    app.router.add_get("/healthz", ok)
    app.router.add_get("/v1/functions", ok)
    app.router.add_post("/v1/functions/{name}/invoke", ok)
    app.router.add_post("/v1/functions/{name}/batches", ok)
    app.router.add_put("/v1/functions/{name}", ok)
    app.router.add_route("*", "/web/{name}/{tail:.*}", ok)
    async with TestClient(TestServer(app)) as c:
        yield c


async def test_a_host_not_allowed_is_421_naming_host_and_setting(
    client: TestClient[Any, Any],
) -> None:
    resp = await client.get("/v1/functions", headers={"Host": "rebound.example:8080"})
    assert resp.status == 421
    err = (await resp.json())["error"]
    assert err["type"] == "MisdirectedRequest"
    assert err["host"] == "rebound.example"
    assert err["setting"] == "IMAGEFN_ALLOWED_HOSTS"
    # Web functions too: a rebinding page must not reach them either.
    resp = await client.get("/web/app/x", headers={"Host": "rebound.example"})
    assert resp.status == 421


async def test_allowed_hosts_and_healthz_pass(client: TestClient[Any, Any]) -> None:
    for host in ("127.0.0.1:1234", "localhost", "[::1]:8080"):
        resp = await client.get("/v1/functions", headers={"Host": host})
        assert resp.status == 200, host
    # A load balancer's health check may use the machine's address.
    resp = await client.get("/healthz", headers={"Host": "10.1.2.3:8080"})
    assert resp.status == 200


@pytest.mark.parametrize(
    "ctype",
    ["application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "text/plain"],
)
async def test_form_bodies_are_refused_on_api_writes(
    client: TestClient[Any, Any], ctype: str
) -> None:
    resp = await client.post("/v1/functions/f/invoke", data=b"a=1", headers={"Content-Type": ctype})
    assert resp.status == 415
    err = (await resp.json())["error"]
    assert err["type"] == "UnsupportedMediaType"
    assert "application/json" in err["message"]


async def test_api_bodies_the_clients_send_pass(client: TestClient[Any, Any]) -> None:
    assert (await client.post("/v1/functions/f/invoke", json={"a": 1})).status == 200
    assert (await client.post("/v1/functions/f/invoke", data=b"{}")).status == 200  # octet-stream
    assert (await client.post("/v1/functions/f/invoke")).status == 200  # no body
    ndjson = {"Content-Type": "application/x-ndjson"}
    assert (await client.post("/v1/functions/f/batches", data=b"1\n", headers=ndjson)).status == 200
    yaml = {"Content-Type": "application/yaml"}
    assert (await client.put("/v1/functions/f", data=b"image: x", headers=yaml)).status == 200


async def test_cross_site_browser_requests_are_403(client: TestClient[Any, Any]) -> None:
    resp = await client.post(
        "/v1/functions/f/invoke", json={}, headers={"Sec-Fetch-Site": "cross-site"}
    )
    assert resp.status == 403
    assert (await resp.json())["error"]["type"] == "CrossSiteRequest"
    for origin in ("https://evil.example", "null"):
        resp = await client.post("/v1/functions/f/invoke", json={}, headers={"Origin": origin})
        assert resp.status == 403, origin
    # Same origin, and reads, pass.
    headers = {"Origin": "http://127.0.0.1:8080", "Sec-Fetch-Site": "same-origin"}
    assert (await client.post("/v1/functions/f/invoke", json={}, headers=headers)).status == 200
    cross = {"Sec-Fetch-Site": "cross-site", "Origin": "https://evil.example"}
    assert (await client.get("/v1/functions", headers=cross)).status == 200


async def test_web_functions_get_no_csrf_rules(client: TestClient[Any, Any]) -> None:
    headers = {
        "Content-Type": "application/x-www-form-urlencoded",
        "Origin": "https://elsewhere.example",
        "Sec-Fetch-Site": "cross-site",
    }
    resp = await client.post("/web/app/form", data=b"a=1", headers=headers)
    assert resp.status == 200


async def test_a_client_that_went_away_is_logged_as_aborted_not_crashed(
    capsys: pytest.CaptureFixture[str],
) -> None:
    async def aborted(request: web.Request) -> web.Response:
        raise ConnectionResetError("Connection lost")

    app = web.Application(middlewares=[request_context])
    app[SETTINGS] = replace(Settings(), auth=replace(Settings().auth, access_log=False))
    app.router.add_post("/v1/functions/{name}/invoke", aborted)
    async with TestClient(TestServer(app)) as c:
        resp = await c.post("/v1/functions/f/invoke", json={})
        assert resp.status == 499
        assert (await resp.json())["error"]["type"] == "RequestCanceled"
    out = capsys.readouterr().out
    assert "client_aborted" in out and "request_crashed" not in out
