"""Authentication and authorization at the gateway: API keys and their scopes, hidden env
values, withheld function output, invocation records by owner, and the audit log."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from gateway.auth import ROUTE_SCOPES
from gateway.context import API_KEYS
from shared.errors import InvalidRequest
from shared.keys import Keys
from shared.messages import Invocation, InvocationResult
from shared.scopes import Principal, parse_scopes

from .conftest import EVENT_SPEC, WEB_SPEC, Gateway

# A value for each path parameter, to call every route.
SAMPLE = {
    "name": "hello",
    "alias": "live",
    "request_id": "req-00000001",
    "batch_id": "b-0",
    "key_id": "0123456789ab",
    "tail": "x",
    "trigger": "tick",
}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def make_key(gw: Gateway, *scopes: str, name: str = "k") -> tuple[str, str]:
    resp = await gw.client.post("/v1/keys", json={"name": name, "scopes": list(scopes)})
    assert resp.status == 201, await resp.text()
    doc = await resp.json()
    return doc["id"], doc["key"]


def v1_routes(gw: Gateway) -> list[tuple[str, str]]:
    found = set()
    for route in gw.client.app.router.routes():  # type: ignore[union-attr]
        pattern = route.resource.canonical if route.resource else ""
        if pattern.startswith("/v1/") and route.method != "HEAD":
            found.add((route.method, pattern))
    return sorted(found)


def fill(pattern: str) -> str:
    return re.sub(r"\{(\w+)(:[^}]*)?\}", lambda m: SAMPLE[m.group(1)], pattern)


async def test_every_v1_route_has_a_scope_rule(gw: Gateway) -> None:
    missing = [r for r in v1_routes(gw) if r not in ROUTE_SCOPES]
    assert missing == [("GET", "/v1/registry/token")]  # its own HTTP Basic credentials


async def test_every_v1_route_refuses_a_call_without_a_key(gw: Gateway) -> None:
    routes = [r for r in v1_routes(gw) if r[1] != "/v1/registry/token"]
    assert len(routes) >= 20
    for method, pattern in routes:
        for headers in ({"Authorization": ""}, bearer("nope"), bearer("ifn_0123456789ab_x" * 2)):
            resp = await gw.client.request(method, fill(pattern), headers=headers, data=b"{}")
            assert resp.status == 401, (method, pattern, await resp.text())
            assert resp.headers["WWW-Authenticate"] == 'Bearer realm="imagefn"'
            assert (await resp.json())["error"]["type"] == "Unauthorized"


async def test_open_routes_need_no_key(gw: Gateway) -> None:
    for path in ("/healthz", "/openapi.yaml"):
        resp = await gw.client.get(path, headers={"Authorization": ""})
        assert resp.status == 200, path


async def test_scopes_allow_their_functions_and_nothing_else(gw: Gateway) -> None:
    await gw.deploy(EVENT_SPEC)
    await gw.deploy({**EVENT_SPEC, "name": "team-a-one"})
    await gw.deploy({**EVENT_SPEC, "name": "team-b-one"})
    _, key = await make_key(gw, "invoke:team-a-*", "read:hello")
    h = bearer(key)

    assert (await gw.client.post("/v1/functions/team-a-one/invoke", headers=h)).status == 200
    denied = await gw.client.post("/v1/functions/team-b-one/invoke", headers=h)
    assert denied.status == 403
    err = (await denied.json())["error"]
    assert err["type"] == "Forbidden" and "invoke:team-b-one" in err["message"]
    # read on hello, but no deploy, delete, logs or key management.
    assert (await gw.client.get("/v1/functions/hello", headers=h)).status == 200
    put = await gw.client.put("/v1/functions/hello", json=EVENT_SPEC, headers=h)
    assert put.status == 403
    assert (await gw.client.delete("/v1/functions/hello", headers=h)).status == 403
    assert (await gw.client.get("/v1/functions/hello/logs", headers=h)).status == 403
    assert (await gw.client.get("/v1/keys", headers=h)).status == 403
    assert (await gw.client.get("/v1/audit", headers=h)).status == 403
    # A list shows only what the key may read.
    listed = await (await gw.client.get("/v1/functions", headers=h)).json()
    assert [f["name"] for f in listed["functions"]] == ["hello"]


async def test_env_values_need_the_secrets_scope(gw: Gateway) -> None:
    await gw.deploy({**EVENT_SPEC, "env": {"DB_PASSWORD": "hunter2", "MODE": "x"}})
    _, reader = await make_key(gw, "read:hello")
    _, insider = await make_key(gw, "read:hello", "secrets:hello")
    for path in ("/v1/functions/hello", "/v1/functions", "/v1/functions/hello/versions"):
        hidden = await (await gw.client.get(path, headers=bearer(reader))).text()
        assert "hunter2" not in hidden and "(hidden)" in hidden and "DB_PASSWORD" in hidden
        shown = await (await gw.client.get(path, headers=bearer(insider))).text()
        assert "hunter2" in shown
    # A deployer without secrets gets its answer without the values either.
    _, deployer = await make_key(gw, "deploy:hello")
    spec = {**EVENT_SPEC, "env": {"DB_PASSWORD": "hunter3"}}
    resp = await gw.client.put("/v1/functions/hello", json=spec, headers=bearer(deployer))
    assert resp.status == 200
    assert "hunter3" not in await resp.text()


async def test_function_output_in_errors_needs_the_logs_scope(gw: Gateway) -> None:
    await gw.deploy(EVENT_SPEC)

    def crash(inv: Invocation) -> InvocationResult:
        return InvocationResult(
            request_id=inv.request_id,
            status=502,
            error={
                "type": "UserCodeError",
                "message": "the function failed",
                "function_body": "Traceback: password=hunter2",
                "logs": ["connecting with hunter2"],
            },
        )

    gw.handler = crash
    _, invoker = await make_key(gw, "invoke:hello")
    _, debugger = await make_key(gw, "invoke:hello", "logs:hello")
    plain = await gw.client.post("/v1/functions/hello/invoke", headers=bearer(invoker))
    err = (await plain.json())["error"]
    assert "hunter2" not in json.dumps(err)
    assert err["withheld"].endswith("needs the logs scope on this function")
    assert "function_body" not in err and "logs" not in err
    full = await gw.client.post("/v1/functions/hello/invoke", headers=bearer(debugger))
    assert "hunter2" in json.dumps((await full.json())["error"])


async def test_web_functions_are_key_by_default_and_public_on_request(gw: Gateway) -> None:
    await gw.deploy(WEB_SPEC)
    await gw.deploy({**WEB_SPEC, "name": "open-site", "auth": "public"})
    anon = {"Authorization": ""}
    resp = await gw.client.get("/web/site/", headers=anon)
    assert resp.status == 401
    assert (
        await gw.client.get("/web/site/", headers=bearer("ifn_0123456789ab_wrongwrongwrong1"))
    ).status == 401
    _, key = await make_key(gw, "invoke:site")
    assert (await gw.client.get("/web/site/", headers=bearer(key))).status == 200
    # The platform key never reaches the function.
    assert all(k.lower() != "authorization" for k, _ in gw.seen[-1].headers)

    resp = await gw.client.get("/web/open-site/", headers={"Authorization": "Bearer app-own"})
    assert resp.status == 200
    # A public function's own credentials pass through to it.
    assert ("Authorization", "Bearer app-own") in gw.seen[-1].headers
    # Public is for web functions only.
    bad = await gw.client.put(
        "/v1/functions/ev", json={**EVENT_SPEC, "name": "ev", "auth": "public"}
    )
    assert bad.status == 400
    assert "only web functions may be public" in await bad.text()


async def test_keys_are_shown_once_listed_without_secrets_and_revoked(gw: Gateway) -> None:
    await gw.deploy(EVENT_SPEC)
    key_id, key = await make_key(gw, "read:hello", name="ci")
    raw = b"".join(gw.redis.hashes[Keys("imagefn").api_keys].values()).decode()
    secret = key.split("_", 2)[2]
    assert secret not in raw  # only its hash is stored
    listed = await (await gw.client.get("/v1/keys")).json()
    [entry] = [k for k in listed["keys"] if k["id"] == key_id]
    assert entry["state"] == "active" and "key" not in entry and "digest" not in entry
    assert (await gw.client.get("/v1/functions/hello", headers=bearer(key))).status == 200
    assert (await gw.client.delete(f"/v1/keys/{key_id}")).status == 200
    resp = await gw.client.get("/v1/functions/hello", headers=bearer(key))
    assert resp.status == 401
    assert f"API key {key_id} is revoked" in await resp.text()
    assert (await gw.client.delete("/v1/keys/ffffffffffff")).status == 404


async def test_an_expired_key_stops_working(gw: Gateway) -> None:
    key_id, key = await make_key(gw, "read:*")
    stored = json.loads(gw.redis.hashes[Keys("imagefn").api_keys][key_id])
    stored["expires_at"] = 1.0
    gw.redis.hashes[Keys("imagefn").api_keys][key_id] = json.dumps(stored).encode()
    gw.client.app[API_KEYS]._cache.clear()  # type: ignore[index]  # as after key_cache_s
    resp = await gw.client.get("/v1/functions", headers=bearer(key))
    assert resp.status == 401 and "expired" in await resp.text()


@pytest.mark.parametrize(
    "body",
    [
        {"name": "x", "scopes": []},
        {"name": "x", "scopes": ["invoke"]},
        {"name": "x", "scopes": ["root"]},
        {"name": "x", "scopes": ["invoke:bad name"]},
        {"name": "", "scopes": ["admin"]},
        {"scopes": ["admin"]},
        {"name": "x", "scopes": ["admin"], "expires_in_s": -1},
        {"name": "x", "scopes": ["admin"], "extra": 1},
    ],
)
async def test_bad_key_requests_are_400(gw: Gateway, body: dict[str, Any]) -> None:
    resp = await gw.client.post("/v1/keys", json=body)
    assert resp.status == 400, await resp.text()


async def test_invocation_records_are_read_by_their_owner_only(gw: Gateway) -> None:
    a_id, a = await make_key(gw, "invoke:*", name="a")
    _, b = await make_key(gw, "invoke:*", name="b")
    key = Keys("imagefn").invocation("req-00000001")
    gw.redis.hashes[key] = {
        "meta": b'{"function":"hello"}',
        "state": b"succeeded",
        "owner": a_id.encode(),
    }
    assert (await gw.client.get("/v1/invocations/req-00000001", headers=bearer(a))).status == 200
    other = await gw.client.get("/v1/invocations/req-00000001", headers=bearer(b))
    assert other.status == 404
    missing = await gw.client.get("/v1/invocations/req-00000002", headers=bearer(b))
    # Another caller's record reads exactly like a missing one.
    assert (await other.json())["error"]["message"].replace("1", "2") == (await missing.json())[
        "error"
    ]["message"]
    assert (await gw.client.get("/v1/invocations/req-00000001")).status == 200  # admin


async def test_control_actions_are_audited_with_key_source_and_outcome(gw: Gateway) -> None:
    key_id, key = await make_key(gw, "read:hello", name="auditee")
    await gw.deploy(EVENT_SPEC)
    await gw.client.put("/v1/functions/hello", json=EVENT_SPEC, headers=bearer(key))
    await gw.client.delete("/v1/functions/hello")
    entries = (await (await gw.client.get("/v1/audit?limit=10")).json())["entries"]
    summary = [(e["action"], e["outcome"], e["status"]) for e in entries]
    assert summary[:4] == [
        ("function.delete", "ok", 204),
        ("function.deploy", "denied", 403),
        ("function.deploy", "ok", 201),
        ("key.create", "ok", 201),
    ]
    denied = entries[1]
    assert denied["key_id"] == key_id and denied["function"] == "hello"
    assert denied["source"] == "127.0.0.1" and denied["at"] > 0 and denied["request_id"]
    only = (await (await gw.client.get("/v1/audit?function=hello")).json())["entries"]
    assert {e["function"] for e in only} == {"hello"}


def test_scope_parsing_and_matching() -> None:
    assert parse_scopes(["admin", "invoke:a-*", "read:*", "logs:exact"]) == (
        "admin",
        "invoke:a-*",
        "read:*",
        "logs:exact",
    )
    for bad in (["invoke:"], ["write:x"], ["invoke:*x"], [1], "admin", []):
        with pytest.raises(InvalidRequest):
            parse_scopes(bad)
    p = Principal.from_scopes("k", ("invoke:a-*", "read:b"))
    assert p.allows("invoke", "a-1") and p.allows("invoke", "a-")
    assert not p.allows("invoke", "b") and not p.allows("read", "a-1")
    assert not p.allows("secrets", "b")
    assert Principal.from_scopes("k", ("admin",)).allows("secrets", "anything")
