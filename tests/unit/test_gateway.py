"""gateway: the HTTP surface, built with build_app over a MemoryQueue, a fake image
resolver and a fake Redis (the registry's hash commands), served by aiohttp's test server."""

from __future__ import annotations

import json
import types
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from redis.exceptions import ConnectionError as RedisConnectionError

from gateway.app import build_app
from gateway.errors import error_response, http_exception_to_error
from gateway.images import ResolvedImage
from shared.errors import FunctionTimeout, ServiceUnavailable, UserProcessExited
from shared.messages import Invocation, InvocationResult
from shared.queue.memory import MemoryQueue
from tests.credentials import ADMIN_HEADERS

from .conftest import EVENT_SPEC, GATEWAY_SETTINGS, WEB_SPEC, FakeImages, Gateway
from .fakes import FakeRedis
from .helpers import REGISTRY


async def error_of(resp: Any, status: int, type_name: str) -> dict[str, Any]:
    assert resp.status == status, await resp.text()
    assert resp.headers["X-Scf-Error-Type"] == type_name
    assert resp.headers["X-Request-Id"] == resp.headers["X-Scf-Request-Id"]
    body = await resp.json()
    err: dict[str, Any] = body["error"]
    assert err["type"] == type_name
    assert err["request_id"] == resp.headers["X-Request-Id"]
    return err


# -- control API -------------------------------------------------------------------------------


async def test_deploy_creates_then_replaces_with_a_new_version(gw: Gateway) -> None:
    resp = await gw.client.put("/v1/functions/hello", json=EVENT_SPEC)
    assert resp.status == 201
    first = await resp.json()
    assert (first["name"], first["version"]) == ("hello", 1)
    # Pinned by digest in the registry; the spec keeps the tag the user gave.
    assert first["image"] == "repo/hello:1"
    assert first["image_digest"] == gw.images.digest("repo/hello:1")
    assert first["image_ref"] == f"{REGISTRY}/repo/hello@{first['image_digest']}"
    assert first["memory_mb"] == 512  # defaults filled in

    resp = await gw.client.put("/v1/functions/hello", json={**EVENT_SPEC, "memory_mb": 256})
    assert resp.status == 200
    second = await resp.json()
    assert second["version"] == 2 and second["memory_mb"] == 256
    assert second["created_at"] == first["created_at"]
    assert second["updated_at"] >= first["updated_at"]

    got = await (await gw.client.get("/v1/functions/hello")).json()
    assert got == second


async def test_deploy_takes_the_name_from_the_url_and_yaml_bodies(gw: Gateway) -> None:
    body = "image: repo/y:2\ntype: web\nenv:\n  A: '1'\n"
    resp = await gw.client.put(
        "/v1/functions/from-yaml", data=body, headers={"Content-Type": "application/yaml"}
    )
    assert resp.status == 201, await resp.text()
    rec = await resp.json()
    assert (rec["name"], rec["type"], rec["env"]) == ("from-yaml", "web", {"A": "1"})


async def test_invalid_spec_names_every_bad_field_including_the_image(gw: Gateway) -> None:
    spec = {"image": "missing/img:1", "memory_mb": 1, "colour": "red"}
    resp = await gw.client.put("/v1/functions/bad", json=spec)
    err = await error_of(resp, 400, "InvalidSpec")
    assert set(err["fields"]) == {"memory_mb", "colour", "image"}
    assert "does not exist" in err["fields"]["image"]
    assert gw.redis.hashes.get("imagefn:functions", {}) == {}


async def test_unresolvable_image_alone_is_an_invalid_spec(gw: Gateway) -> None:
    resp = await gw.client.put("/v1/functions/bad", json={"image": "missing/img:1"})
    err = await error_of(resp, 400, "InvalidSpec")
    assert list(err["fields"]) == ["image"]


async def test_registry_outage_does_not_hide_the_other_bad_fields(gw: Gateway) -> None:
    async def outage(image: str) -> ResolvedImage:
        raise ServiceUnavailable("registry 127.0.0.1:5000 unreachable: connection refused")

    gw.images.resolve = outage  # type: ignore[method-assign]
    resp = await gw.client.put("/v1/functions/bad", json={"image": "repo/x:1", "memory_mb": 1})
    err = await error_of(resp, 400, "InvalidSpec")
    assert list(err["fields"]) == ["memory_mb"]
    # A good spec hears about the outage itself.
    err = await error_of(
        await gw.client.put("/v1/functions/hello", json=EVENT_SPEC), 503, "ServiceUnavailable"
    )
    assert "unreachable" in err["message"]
    assert gw.redis.hashes.get("imagefn:functions", {}) == {}


async def test_name_must_match_the_url(gw: Gateway) -> None:
    resp = await gw.client.put("/v1/functions/hello", json={**EVENT_SPEC, "name": "other"})
    err = await error_of(resp, 400, "InvalidSpec")
    assert list(err["fields"]) == ["name"]


@pytest.mark.parametrize(
    ("body", "ctype", "kind"),
    [(b"{nope", "application/json", "JSON"), (b"a: [", "application/yaml", "YAML")],
)
async def test_unparseable_body_is_invalid_request(
    gw: Gateway, body: bytes, ctype: str, kind: str
) -> None:
    resp = await gw.client.put("/v1/functions/x", data=body, headers={"Content-Type": ctype})
    err = await error_of(resp, 400, "InvalidRequest")
    assert f"not valid {kind}" in err["message"]


@pytest.mark.parametrize(
    ("body", "ctype", "status", "says"),
    [
        (b"a: &a [1,1,1]\nb: [*a,*a]\n", "application/yaml", 400, "aliases"),
        # Within this gateway's 4 KB body limit (the spec limit is tested in test_specbody).
        (b"[" * 1500 + b"]" * 1500, "application/json", 400, "nests deeper"),
    ],
)
async def test_hostile_spec_bodies_are_clear_errors(
    gw: Gateway, body: bytes, ctype: str, status: int, says: str
) -> None:
    resp = await gw.client.put("/v1/functions/x", data=body, headers={"Content-Type": ctype})
    assert resp.status == status
    assert says in (await resp.json())["error"]["message"]


async def test_unknown_function_is_404(gw: Gateway) -> None:
    resp = await gw.client.get("/v1/functions/ghost")
    err = await error_of(resp, 404, "FunctionNotFound")
    assert "ghost" in err["message"]
    await error_of(await gw.client.delete("/v1/functions/ghost"), 404, "FunctionNotFound")
    await error_of(
        await gw.client.post("/v1/functions/ghost/invoke", json={}), 404, "FunctionNotFound"
    )


async def test_list_is_sorted_and_delete_removes(gw: Gateway) -> None:
    for name in ("zeta", "alpha", "mid"):
        await gw.deploy({**EVENT_SPEC, "name": name})
    listed = await (await gw.client.get("/v1/functions")).json()
    assert [f["name"] for f in listed["functions"]] == ["alpha", "mid", "zeta"]
    resp = await gw.client.delete("/v1/functions/mid")
    assert resp.status == 204
    listed = await (await gw.client.get("/v1/functions")).json()
    assert [f["name"] for f in listed["functions"]] == ["alpha", "zeta"]


# -- event invocation ----------------------------------------------------------------------------


async def test_event_invoke_round_trip(gw: Gateway) -> None:
    await gw.deploy(EVENT_SPEC)
    resp = await gw.client.post("/v1/functions/hello/invoke", data=b'{"x": 1}')
    assert resp.status == 200, await resp.text()
    assert await resp.read() == b'{"echo":{"x": 1}}'
    assert resp.headers["Content-Type"] == "application/json"
    assert resp.headers["X-Imagefn-Instance"] == "inst-1"
    assert resp.headers["X-Imagefn-Cold-Start"] == "true"
    assert resp.headers["Server-Timing"] == "queue;dur=1.000, run;dur=12.500"
    rid = resp.headers["X-Request-Id"]
    assert resp.headers["X-Scf-Request-Id"] == rid
    [inv] = gw.seen
    assert inv.request_id == rid
    assert (inv.kind, inv.function, inv.record.version) == ("event", "hello", 1)
    assert inv.reply_to == gw.queue.reply_address()
    # The caller waits for the function timeout + init timeout + pull timeout + grace.
    assert 0 < inv.deadline - inv.enqueued_at <= 1 + 1 + 2 + 0.5 + 0.1


async def test_empty_event_body_becomes_an_empty_object(gw: Gateway) -> None:
    await gw.deploy(EVENT_SPEC)
    resp = await gw.client.post("/v1/functions/hello/invoke")
    assert resp.status == 200
    assert gw.seen[0].body == b"{}"


async def test_event_body_must_be_json(gw: Gateway) -> None:
    await gw.deploy(EVENT_SPEC)
    resp = await gw.client.post("/v1/functions/hello/invoke", data=b"not json")
    err = await error_of(resp, 400, "InvalidRequest")
    assert "not valid JSON" in err["message"]
    assert gw.seen == []


async def test_event_invoke_of_a_web_function_is_refused(gw: Gateway) -> None:
    await gw.deploy(WEB_SPEC)
    err = await error_of(
        await gw.client.post("/v1/functions/site/invoke", json={}), 400, "InvalidRequest"
    )
    assert "/web/site/" in err["message"]


async def test_worker_error_becomes_the_contract_error(gw: Gateway) -> None:
    await gw.deploy(EVENT_SPEC)

    def crashed(inv: Invocation) -> InvocationResult:
        err = UserProcessExited("exited with 3", details={"exit_code": 3, "logs": ["bye"]})
        return InvocationResult.failure(inv.request_id, err, instance="inst-9")

    gw.handler = crashed
    resp = await gw.client.post("/v1/functions/hello/invoke", json={})
    err = await error_of(resp, 502, "UserProcessExited")
    assert err["code"] == 439
    assert (err["exit_code"], err["logs"], err["instance"]) == (3, ["bye"], "inst-9")


async def test_worker_error_without_instance_has_no_instance_field(gw: Gateway) -> None:
    await gw.deploy(EVENT_SPEC)
    gw.handler = lambda inv: InvocationResult.failure(inv.request_id, FunctionTimeout("slow"))
    err = await error_of(
        await gw.client.post("/v1/functions/hello/invoke", json={}), 504, "FunctionTimeout"
    )
    assert "instance" not in err


async def test_no_result_in_time_is_function_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class SilentQueue(MemoryQueue):
        async def call(
            self, invocation: Invocation, timeout_s: float, worker: str | None = None
        ) -> None:
            self.asked = timeout_s

    redis = FakeRedis()
    monkeypatch.setattr(
        "gateway.app.aioredis",
        types.SimpleNamespace(Redis=types.SimpleNamespace(from_url=lambda url: redis)),
    )
    queue = SilentQueue()
    async with TestClient(
        TestServer(build_app(GATEWAY_SETTINGS, queue=queue, images=FakeImages())),
        headers=ADMIN_HEADERS,
    ) as c:
        assert (await c.put("/v1/functions/hello", json=EVENT_SPEC)).status == 201
        resp = await c.post("/v1/functions/hello/invoke", json={})
        err = await error_of(resp, 504, "FunctionTimeout")
        assert "is a worker running" in err["message"]
        assert queue.asked == pytest.approx(4.5)


# -- web invocation ------------------------------------------------------------------------------


async def test_web_invoke_forwards_the_request_and_the_answer(gw: Gateway) -> None:
    await gw.deploy(WEB_SPEC)

    def page(inv: Invocation) -> InvocationResult:
        return InvocationResult(
            request_id=inv.request_id,
            status=404,
            headers=[
                ("Content-Type", "text/html"),
                ("Set-Cookie", "a=1"),
                ("Set-Cookie", "b=2"),
                ("Connection", "X-Internal"),
                ("X-Internal", "secret"),
                ("Transfer-Encoding", "chunked"),
                ("Server", "function-server"),
            ],
            body=b"<h1>nope</h1>",
            instance="inst-w",
        )

    gw.handler = page
    resp = await gw.client.patch(
        "/web/site/a/b%20c?x=1&x=2",
        data=b"\x00\x01payload",
        headers={
            "Connection": "X-Hop",
            "X-Hop": "1",
            "X-Keep": "yes",
            "X-Scf-Request-Id": "spoofed",
            "Content-Type": "application/octet-stream",
        },
    )
    assert resp.status == 404
    assert await resp.read() == b"<h1>nope</h1>"
    assert resp.headers.getall("Set-Cookie") == ["a=1", "b=2"]
    assert "X-Internal" not in resp.headers
    assert resp.headers.get("Server") != "function-server"
    assert resp.headers["X-Imagefn-Instance"] == "inst-w"
    assert resp.headers["X-Imagefn-Cold-Start"] == "false"

    [inv] = gw.seen
    assert (inv.kind, inv.method, inv.path, inv.query) == ("web", "PATCH", "/a/b%20c", "x=1&x=2")
    assert inv.body == b"\x00\x01payload"
    names = [k.lower() for k, _ in inv.headers]
    assert "x-hop" not in names and "connection" not in names
    assert ("X-Keep", "yes") in inv.headers
    assert {"host", "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto"} <= set(names)


async def test_web_root_path(gw: Gateway) -> None:
    await gw.deploy(WEB_SPEC)
    for url in ("/web/site", "/web/site/"):
        assert (await gw.client.get(url)).status == 200
    assert [inv.path for inv in gw.seen] == ["/", "/"]
    assert all(inv.body == b"" for inv in gw.seen)


async def test_web_invoke_of_an_event_function_is_refused(gw: Gateway) -> None:
    await gw.deploy(EVENT_SPEC)
    err = await error_of(await gw.client.get("/web/hello/"), 400, "InvalidRequest")
    assert "/v1/functions/hello/invoke" in err["message"]


# -- versions and aliases ------------------------------------------------------------------


async def versions_of(gw: Gateway, name: str) -> dict[str, Any]:
    resp = await gw.client.get(f"/v1/functions/{name}/versions")
    assert resp.status == 200, await resp.text()
    found: dict[str, Any] = await resp.json()
    return found


async def set_alias(gw: Gateway, name: str, alias: str, version: int) -> None:
    resp = await gw.client.put(f"/v1/functions/{name}/aliases/{alias}", json={"version": version})
    assert resp.status == 200, await resp.text()
    assert await resp.json() == {"function": name, "alias": alias, "version": version}


async def invoked(gw: Gateway, name: str, qualifier: str | None = None) -> Invocation:
    url = f"/v1/functions/{name}/invoke"
    params = {} if qualifier is None else {"qualifier": qualifier}
    resp = await gw.client.post(url, json={}, params=params)
    assert resp.status == 200, await resp.text()
    return gw.seen[-1]


async def test_a_push_under_the_same_tag_changes_nothing_until_the_next_deploy(
    gw: Gateway,
) -> None:
    v1 = await gw.deploy(EVENT_SPEC)
    gw.images.push("repo/hello:1", "new content")
    # Still v1's digest: the tag was resolved once, at deploy.
    assert (await invoked(gw, "hello")).record.image_ref == v1["image_ref"]
    v2 = await gw.deploy(EVENT_SPEC)
    assert v2["version"] == 2 and v2["image_digest"] != v1["image_digest"]
    assert (await invoked(gw, "hello")).record.image_ref == v2["image_ref"]
    # Version 1 still runs what it was deployed with.
    inv = await invoked(gw, "hello", "1")
    assert (inv.record.version, inv.record.image_ref) == (1, v1["image_ref"])


async def test_versions_lists_every_version_and_the_aliases(gw: Gateway) -> None:
    v1 = await gw.deploy(EVENT_SPEC)
    gw.images.push("repo/hello:1", "second build")
    v2 = await gw.deploy({**EVENT_SPEC, "memory_mb": 256})
    await set_alias(gw, "hello", "stable", 1)
    found = await versions_of(gw, "hello")
    assert found["latest"] == 2
    assert found["aliases"] == {"stable": 1}
    assert found["versions"] == [v1, v2]
    # Each version keeps its own spec.
    assert [v["memory_mb"] for v in found["versions"]] == [512, 256]


async def test_versions_of_an_unknown_function_is_404(gw: Gateway) -> None:
    err = await error_of(
        await gw.client.get("/v1/functions/ghost/versions"), 404, "FunctionNotFound"
    )
    assert "ghost" in err["message"]


async def test_alias_routes_rollback_and_invocation_through_an_alias(gw: Gateway) -> None:
    await gw.deploy(EVENT_SPEC)
    gw.images.push("repo/hello:1", "v2")
    await gw.deploy(EVENT_SPEC)
    await set_alias(gw, "hello", "prod", 2)
    inv = await invoked(gw, "hello", "prod")
    assert (inv.record.version, inv.version) == (2, "2")
    # Rollback: the alias moves; this gateway sees it at once (its cache is dropped).
    await set_alias(gw, "hello", "prod", 1)
    inv = await invoked(gw, "hello", "prod")
    assert (inv.record.version, inv.version) == (1, "1")
    # $LATEST is unaffected.
    inv = await invoked(gw, "hello")
    assert (inv.record.version, inv.version) == (2, "$LATEST")

    resp = await gw.client.delete("/v1/functions/hello/aliases/prod")
    assert resp.status == 204
    assert (await versions_of(gw, "hello"))["aliases"] == {}
    err = await error_of(
        await gw.client.post("/v1/functions/hello/invoke?qualifier=prod", json={}),
        404,
        "VersionNotFound",
    )
    assert "prod" in err["message"]
    await error_of(
        await gw.client.delete("/v1/functions/hello/aliases/prod"), 404, "VersionNotFound"
    )


@pytest.mark.parametrize(
    "body",
    [{}, {"version": "1"}, {"version": True}, {"version": 0}, {"version": -1}, [1], None],
)
async def test_alias_body_must_name_a_version_number(gw: Gateway, body: Any) -> None:
    await gw.deploy(EVENT_SPEC)
    resp = await gw.client.put("/v1/functions/hello/aliases/prod", json=body)
    err = await error_of(resp, 400, "InvalidRequest")
    assert '{"version": N}' in err["message"]


@pytest.mark.parametrize("alias", ["1abc", "%24LATEST", "-x", "a" * 41, "has.dot"])
async def test_alias_names_are_checked(gw: Gateway, alias: str) -> None:
    await gw.deploy(EVENT_SPEC)
    resp = await gw.client.put(f"/v1/functions/hello/aliases/{alias}", json={"version": 1})
    err = await error_of(resp, 400, "InvalidRequest")
    assert "alias" in err["message"]


async def test_alias_to_a_missing_version_or_function_is_404(gw: Gateway) -> None:
    await gw.deploy(EVENT_SPEC)
    resp = await gw.client.put("/v1/functions/hello/aliases/prod", json={"version": 9})
    err = await error_of(resp, 404, "VersionNotFound")
    assert "9" in err["message"]
    resp = await gw.client.put("/v1/functions/ghost/aliases/prod", json={"version": 1})
    await error_of(resp, 404, "FunctionNotFound")


@pytest.mark.parametrize(
    ("qualifier", "version", "scf_version"),
    [("", 2, "$LATEST"), ("$LATEST", 2, "$LATEST"), ("1", 1, "1"), ("2", 2, "2")],
)
async def test_event_qualifier_picks_the_version_and_the_scf_version(
    gw: Gateway, qualifier: str, version: int, scf_version: str
) -> None:
    await gw.deploy(EVENT_SPEC)
    await gw.deploy(EVENT_SPEC)
    inv = await invoked(gw, "hello", qualifier)
    assert (inv.record.version, inv.version) == (version, scf_version)


async def test_unknown_qualifier_is_version_not_found_unknown_function_function_not_found(
    gw: Gateway,
) -> None:
    await gw.deploy(EVENT_SPEC)
    for qualifier in ("7", "nope"):
        resp = await gw.client.post(f"/v1/functions/hello/invoke?qualifier={qualifier}", json={})
        err = await error_of(resp, 404, "VersionNotFound")
        assert qualifier in err["message"]
    for qualifier in ("1", "prod"):
        resp = await gw.client.post(f"/v1/functions/ghost/invoke?qualifier={qualifier}", json={})
        await error_of(resp, 404, "FunctionNotFound")
    assert gw.seen == []


async def test_web_qualifier_header_picks_the_version(gw: Gateway) -> None:
    await gw.deploy(WEB_SPEC)
    await gw.deploy({**WEB_SPEC, "memory_mb": 256})
    await set_alias(gw, "site", "old", 1)
    for header, version, scf_version in [
        (None, 2, "$LATEST"),
        ("1", 1, "1"),
        ("old", 1, "1"),
        ("$LATEST", 2, "$LATEST"),
    ]:
        headers = {} if header is None else {"X-Imagefn-Qualifier": header}
        resp = await gw.client.get("/web/site/page", headers=headers)
        assert resp.status == 200, await resp.text()
        inv = gw.seen[-1]
        assert (inv.record.version, inv.version, inv.path) == (version, scf_version, "/page")
    resp = await gw.client.get("/web/site/", headers={"X-Imagefn-Qualifier": "9"})
    await error_of(resp, 404, "VersionNotFound")


async def test_delete_removes_every_version_and_alias_and_numbers_go_on(gw: Gateway) -> None:
    await gw.deploy(EVENT_SPEC)
    await gw.deploy(EVENT_SPEC)
    await set_alias(gw, "hello", "prod", 1)
    assert (await gw.client.delete("/v1/functions/hello")).status == 204
    assert "imagefn:versions:hello" not in gw.redis.hashes
    assert "imagefn:aliases:hello" not in gw.redis.hashes
    await error_of(
        await gw.client.post("/v1/functions/hello/invoke?qualifier=1", json={}),
        404,
        "FunctionNotFound",
    )
    again = await gw.deploy(EVENT_SPEC)
    # Version numbers are never reused, and the old alias is gone.
    assert again["version"] == 3
    found = await versions_of(gw, "hello")
    assert (found["latest"], found["aliases"]) == (3, {})
    assert [v["version"] for v in found["versions"]] == [3]


async def test_deploy_publishes_a_version_in_one_transaction(gw: Gateway) -> None:
    await gw.deploy(EVENT_SPEC)
    assert gw.redis.transactions == [
        [("hset", "imagefn:versions:hello"), ("hset", "imagefn:functions")]
    ]


async def test_redis_failure_on_deploy_is_503_and_writes_nothing(gw: Gateway) -> None:
    gw.redis.fail["evalsha"] = RedisConnectionError("Connection reset by peer")
    resp = await gw.client.put("/v1/functions/hello", json=EVENT_SPEC)
    err = await error_of(resp, 503, "ServiceUnavailable")
    assert "Connection reset" in err["message"]
    assert "imagefn:functions" not in gw.redis.hashes
    assert "imagefn:versions:hello" not in gw.redis.hashes
    del gw.redis.fail["evalsha"]
    # The next deploy works; the lost number is simply skipped.
    assert (await gw.deploy(EVENT_SPEC))["version"] == 2


# -- middleware, routing, health -------------------------------------------------------------


async def test_caller_request_id_is_kept_when_well_formed(gw: Gateway) -> None:
    resp = await gw.client.get("/v1/functions", headers={"X-Request-Id": "trace.abc-123_X"})
    assert resp.status == 200
    assert resp.headers["X-Request-Id"] == "trace.abc-123_X"
    assert resp.headers["X-Scf-Request-Id"] == "trace.abc-123_X"


@pytest.mark.parametrize("given", ["short", "x" * 65, "has space in it", "semi;colon;;"])
async def test_malformed_caller_request_id_is_replaced(gw: Gateway, given: str) -> None:
    resp = await gw.client.get("/v1/functions", headers={"X-Request-Id": given})
    rid = resp.headers["X-Request-Id"]
    assert rid != given
    uuid.UUID(rid)


async def test_each_request_gets_its_own_id(gw: Gateway) -> None:
    a = (await gw.client.get("/v1/functions")).headers["X-Request-Id"]
    b = (await gw.client.get("/v1/functions")).headers["X-Request-Id"]
    assert a != b


async def test_unknown_route_is_route_not_found(gw: Gateway) -> None:
    err = await error_of(await gw.client.get("/v2/nothing"), 404, "RouteNotFound")
    assert "openapi" in err["message"]


async def test_wrong_method_is_method_not_allowed(gw: Gateway) -> None:
    err = await error_of(await gw.client.post("/v1/functions"), 405, "MethodNotAllowed")
    assert "GET" in err["message"]


async def test_body_over_the_limit_is_request_too_large(gw: Gateway) -> None:
    await gw.deploy(EVENT_SPEC)
    resp = await gw.client.post("/v1/functions/hello/invoke", data=b"[" + b"1," * 3000 + b"1]")
    err = await error_of(resp, 413, "RequestTooLarge")
    assert err["code"] == 406
    assert "4096" in err["message"]
    assert gw.seen == []


async def test_chunked_body_over_the_limit_is_request_too_large(gw: Gateway) -> None:
    # No Content-Length to check up front: the limit is enforced while reading.
    await gw.deploy(EVENT_SPEC)

    async def chunks() -> AsyncIterator[bytes]:
        yield b"["
        for _ in range(100):
            yield b"1," * 50
        yield b"1]"

    resp = await gw.client.post("/v1/functions/hello/invoke", data=chunks())
    await error_of(resp, 413, "RequestTooLarge")
    assert gw.seen == []


async def test_healthz(gw: Gateway) -> None:
    resp = await gw.client.get("/healthz")
    assert resp.status == 200
    assert await resp.json() == {"status": "ok"}
    gw.redis.ping_error = RedisConnectionError("Connection refused")
    err = await error_of(await gw.client.get("/healthz"), 503, "ServiceUnavailable")
    assert "Connection refused" in err["message"]


async def test_openapi_document_is_served(gw: Gateway) -> None:
    resp = await gw.client.get("/openapi.yaml")
    assert resp.status == 200
    assert "openapi:" in await resp.text()
    assert resp.content_type == "application/yaml"


async def test_unexpected_exception_is_an_internal_error_without_details(gw: Gateway) -> None:
    async def boom(image: str) -> ResolvedImage:
        raise RuntimeError("secret internals")

    gw.images.resolve = boom  # type: ignore[method-assign]
    resp = await gw.client.put("/v1/functions/hello", json=EVENT_SPEC)
    err = await error_of(resp, 500, "InternalError")
    assert "secret" not in json.dumps(err)


# -- gateway.errors directly -------------------------------------------------------------------


def test_error_response_shape() -> None:
    err = UserProcessExited("gone", details={"exit_code": 2})
    resp = error_response(err, "rid-12345678")
    assert resp.status == 502
    assert resp.content_type == "application/json"
    assert resp.headers["X-Scf-Error-Type"] == "UserProcessExited"
    assert resp.headers["X-Request-Id"] == resp.headers["X-Scf-Request-Id"] == "rid-12345678"
    assert isinstance(resp.body, bytes)
    assert json.loads(resp.body) == {
        "error": {
            "type": "UserProcessExited",
            "message": "gone",
            "code": 439,
            "exit_code": 2,
            "request_id": "rid-12345678",
        }
    }


@pytest.mark.parametrize(
    ("exc", "type_name", "status"),
    [
        (web.HTTPRequestEntityTooLarge(max_size=10, actual_size=11), "RequestTooLarge", 413),
        (web.HTTPNotFound(), "RouteNotFound", 404),
        (web.HTTPMethodNotAllowed("PUT", ["GET", "DELETE"]), "MethodNotAllowed", 405),
        (web.HTTPBadRequest(reason="bad bytes"), "InvalidRequest", 400),
        (web.HTTPUnsupportedMediaType(), "InvalidRequest", 400),
        (web.HTTPInternalServerError(reason="oops"), "InternalError", 500),
        (web.HTTPBadGateway(), "InternalError", 500),
    ],
)
def test_http_exception_to_error(exc: web.HTTPException, type_name: str, status: int) -> None:
    err = http_exception_to_error(exc, 10)
    assert err.type_name == type_name
    assert err.http_status == status


def test_method_not_allowed_lists_allowed_methods_sorted() -> None:
    err = http_exception_to_error(web.HTTPMethodNotAllowed("PUT", ["POST", "GET"]), 10)
    assert err.message.endswith("allowed: GET, POST")


def test_too_large_names_the_limit() -> None:
    err = http_exception_to_error(web.HTTPRequestEntityTooLarge(max_size=1, actual_size=2), 777)
    assert "777" in err.message
