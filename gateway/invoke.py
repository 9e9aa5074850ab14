"""Invocation endpoints: events (``POST /v1/functions/{name}/invoke``) and web requests
(any method under ``/web/{name}/...``). Both put an invocation on the queue and wait for
its result up to the function's timeout plus, for a cold start, its init timeout and the
pull timeout (see ``_wait_s``)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable

import structlog
from aiohttp import web

from gateway.auth import principal_of, require_web_caller
from gateway.context import INVOCATIONS, LIMITER, QUEUE, REGISTRY, REQUEST_ID, ROUTER, SETTINGS
from shared.asyncsubmit import async_invocation, submit_async
from shared.errors import (
    FunctionTimeout,
    InvalidRequest,
    RequestTooLarge,
    error_from_dict,
)
from shared.http import (
    REQUEST_ID_HEADER,
    SCF_REQUEST_ID_HEADER,
    forwarded_headers,
    scope_cookie,
    strip_hop_by_hop,
)
from shared.messages import Invocation, InvocationResult
from shared.registry import LATEST
from shared.spec import FunctionRecord

routes = web.RouteTableDef()
log = structlog.get_logger("imagefn.gateway")

# Names the version or alias a web invocation runs (events use ?qualifier=).
QUALIFIER_HEADER = "X-Imagefn-Qualifier"
# "Event": asynchronous (202 once enqueued); "RequestResponse" (the default): wait.
# SCF spells it as the query parameter InvocationType.
INVOCATION_TYPE_HEADER = "X-Imagefn-Invocation-Type"
INVOCATION_TYPES = ("RequestResponse", "Event")
WEB_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def _scf_version(qualifier: str, record: FunctionRecord) -> str:
    """X-Scf-Version: $LATEST, or the published version number an alias or number named."""
    return LATEST if qualifier in ("", LATEST) else str(record.version)


def _wait_s(request: web.Request, record: FunctionRecord) -> float:
    spec = record.spec
    settings = request.app[SETTINGS]
    # A cold start may first pull the image, then start it, then run the function.
    return (
        spec.timeout_s
        + spec.init_timeout_s
        + settings.registry.pull_timeout_s
        + settings.gateway.result_grace_s
    )


async def _call(request: web.Request, inv: Invocation, wait_s: float) -> InvocationResult:
    limit = inv.record.spec.max_concurrency
    slot = ""
    if limit:
        slot = await request.app[LIMITER].acquire(inv.function, limit, inv.deadline)
    worker = request.app[ROUTER].route(inv.function, inv.record.version)
    try:
        result = await request.app[QUEUE].call(inv, wait_s, worker)
    finally:
        if slot:
            await request.app[LIMITER].release(inv.function, slot)
    if result is None:
        raise FunctionTimeout(
            f"no result for {inv.function} within {wait_s:g} s "
            "(function timeout + init/pull timeouts + grace); is a worker running?"
        )
    if result.error is not None:
        err = error_from_dict(result.error)
        if result.instance:
            err.details.setdefault("instance", result.instance)
        raise err
    return result


def _platform_headers(request_id: str, result: InvocationResult) -> dict[str, str]:
    headers = {
        REQUEST_ID_HEADER: request_id,
        SCF_REQUEST_ID_HEADER: request_id,
        "X-Imagefn-Instance": result.instance,
        "X-Imagefn-Cold-Start": "true" if result.cold_start else "false",
    }
    if result.timings:
        # Server-Timing shows up in browsers' dev tools; durations are in milliseconds.
        headers["Server-Timing"] = ", ".join(
            f"{k};dur={v * 1000:.3f}" for k, v in result.timings.items()
        )
    return headers


@routes.post("/v1/functions/{name}/invoke")
async def invoke_event(request: web.Request) -> web.Response:
    structlog.contextvars.bind_contextvars(function=request.match_info["name"])
    qualifier = request.query.get("qualifier", LATEST)
    record = await request.app[REGISTRY].resolve(request.match_info["name"], qualifier)
    if record.spec.type != "event":
        raise InvalidRequest(
            f"{record.spec.name} is a web function; call it under /web/{record.spec.name}/"
        )
    invocation_type = _invocation_type(request)
    body = await request.read()
    if invocation_type == "Event":
        limit = request.app[SETTINGS].asyncinv.max_event_bytes
        if len(body) > limit:
            raise RequestTooLarge(
                f"asynchronous event is {len(body)} bytes; the limit is {limit} bytes "
                f"({limit // 1024} KB; synchronous calls take up to "
                f"{request.app[SETTINGS].gateway.max_body_bytes // (1024 * 1024)} MB)"
            )
    if body.strip():
        try:
            json.loads(body)
        except ValueError as e:
            raise InvalidRequest(f"event body is not valid JSON: {e}") from None
    else:
        body = b"{}"
    if invocation_type == "Event":
        return await _accept_async(request, record, qualifier, body)
    request_id: str = request[REQUEST_ID]
    wait_s = _wait_s(request, record)
    inv = Invocation(
        request_id=request_id,
        record=record,
        kind="event",
        body=body,
        deadline=time.time() + wait_s,
        reply_to=request.app[QUEUE].reply_address(),
        version=_scf_version(qualifier, record),
        owner=principal_of(request).key_id,
    )
    result = await _call(request, inv, wait_s)
    ctype = next((v for k, v in result.headers if k.lower() == "content-type"), None)
    headers = _platform_headers(request_id, result)
    if ctype:
        headers["Content-Type"] = ctype
    return web.Response(status=result.status, body=result.body, headers=headers)


def _invocation_type(request: web.Request) -> str:
    value = request.headers.get(INVOCATION_TYPE_HEADER) or request.query.get(
        "InvocationType", "RequestResponse"
    )
    if value not in INVOCATION_TYPES:
        raise InvalidRequest(
            f"invocation type {value!r}: use Event (asynchronous) or RequestResponse"
        )
    return value


async def _accept_async(
    request: web.Request, record: FunctionRecord, qualifier: str, body: bytes
) -> web.Response:
    """Enqueue an asynchronous event; 202 only once it is durably in the queue."""
    inv = async_invocation(
        record, qualifier, body, request[REQUEST_ID], principal_of(request).key_id
    )
    answer = {"request_id": inv.request_id, "function": inv.function, "qualifier": qualifier}
    worker = request.app[ROUTER].route(inv.function, record.version)
    verdict = await submit_async(request.app[INVOCATIONS], request.app[QUEUE], inv, worker)
    if verdict == "duplicate":
        # The same request id again (a client retrying after a lost answer): accepted
        # once already, so not enqueued twice.
        return web.json_response({**answer, "state": "queued", "duplicate": True}, status=202)
    log.info("async_accepted", function=inv.function, version=record.version)
    return web.json_response({**answer, "state": "queued"}, status=202)


async def invoke_web(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    structlog.contextvars.bind_contextvars(function=name)
    qualifier = request.headers.get(QUALIFIER_HEADER, LATEST)
    record = await request.app[REGISTRY].resolve(name, qualifier)
    if record.spec.type != "web":
        raise InvalidRequest(
            f"{name} is an event function; invoke it with POST /v1/functions/{name}/invoke"
        )
    caller = require_web_caller(request, name, record.spec.auth)
    # The function sees the path after /web/{name}, still percent-encoded as sent.
    raw_path = request.rel_url.raw_path
    prefix = f"/web/{name}"
    path = raw_path[len(prefix) :] if raw_path.startswith(prefix) else "/"
    if not path.startswith("/"):
        path = "/" + path
    incoming: Iterable[tuple[str, str]] = request.headers.items()
    if record.spec.auth != "public":
        # The platform key was for the gateway; the function never sees it.
        incoming = [(k, v) for k, v in incoming if k.lower() != "authorization"]
    headers = forwarded_headers(
        incoming, request.remote or "", request.host, request.scheme, prefix
    )
    request_id: str = request[REQUEST_ID]
    wait_s = _wait_s(request, record)
    inv = Invocation(
        request_id=request_id,
        record=record,
        kind="web",
        method=request.method,
        path=path,
        query=request.rel_url.raw_query_string,
        headers=headers,
        body=await request.read(),
        deadline=time.time() + wait_s,
        reply_to=request.app[QUEUE].reply_address(),
        version=_scf_version(qualifier, record),
        owner=caller.key_id,
    )
    result = await _call(request, inv, wait_s)
    resp = web.Response(status=result.status, body=result.body)
    for k, v in strip_hop_by_hop(result.headers):
        low = k.lower()
        if low == "set-cookie":
            resp.headers.add(k, scope_cookie(v, prefix))
        elif low not in ("date", "server"):
            resp.headers.add(k, v)
    resp.headers.update(_platform_headers(request_id, result))
    return resp


def add_web_routes(app: web.Application) -> None:
    for pattern in ("/web/{name}", "/web/{name}/{tail:.*}"):
        for method in WEB_METHODS:
            app.router.add_route(method, pattern, invoke_web)
