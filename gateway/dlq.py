"""Dead-letter queue routes (``/v1/functions/{name}/dlq``) and destination delivery
counts (``/v1/functions/{name}/destinations``).

A redrive sends parked events through the function again with their original request id:
the record is set back to ``queued`` (its earlier attempts stay), the invocation is
published as the next attempt with a fresh retry budget and event age, and only then is
the entry removed from the DLQ — a gateway that dies in between leaves it parked *and*
running, never lost.
"""

from __future__ import annotations

import time
from typing import Any

import structlog
from aiohttp import web
from redis.exceptions import RedisError

from gateway.context import INVOCATIONS, QUEUE, REDIS, REGISTRY, SETTINGS
from gateway.params import json_object, whole_number
from shared.deadletter import DeadLetters, invocation_for_redrive, public
from shared.errors import InvalidRequest, InvocationNotFound, ServiceUnavailable
from shared.keys import Keys
from shared.spec import FunctionRecord

routes = web.RouteTableDef()
log = structlog.get_logger("imagefn.gateway")

MAX_LIMIT = 1000
# Ids one redrive names at most (``all`` is not bounded by it: it goes in pages).
MAX_REDRIVE_IDS = 10_000


def _dlq(request: web.Request) -> DeadLetters:
    return DeadLetters(request.app[REDIS], Keys(request.app[SETTINGS].queue.prefix))


@routes.get("/v1/functions/{name}/dlq")
async def list_dead_letters(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    limit = whole_number(request.query, "limit", 100, 0, MAX_LIMIT)
    offset = whole_number(request.query, "offset", 0, 0, 10**9)
    try:
        count, entries = await _dlq(request).page(name, limit, offset)
    except RedisError as e:
        raise ServiceUnavailable(f"dead-letter queue unavailable: {e}") from e
    items = [public(e, with_event=False) for e in entries]
    return web.json_response({"function": name, "count": count, "items": items})


@routes.get("/v1/functions/{name}/dlq/{request_id}")
async def show_dead_letter(request: web.Request) -> web.Response:
    name, rid = request.match_info["name"], request.match_info["request_id"]
    try:
        entry = await _dlq(request).get(name, rid)
    except RedisError as e:
        raise ServiceUnavailable(f"dead-letter queue unavailable: {e}") from e
    return web.json_response(public(entry, with_event=True))


async def _redrive_body(request: web.Request) -> tuple[list[str] | None, str | None]:
    """(ids, or None for all; qualifier or None for each entry's own)."""
    doc = await json_object(
        request,
        "redrive body",
        frozenset({"ids", "all", "qualifier"}),
        '{"ids": [...]} or {"all": true}',
    )
    qualifier = doc.get("qualifier")
    if qualifier is not None and (not isinstance(qualifier, str) or not qualifier):
        raise InvalidRequest("redrive body: qualifier must be a version or alias name")
    if doc.get("all") is True and "ids" not in doc:
        return None, qualifier
    ids = doc.get("ids")
    if (
        not isinstance(ids, list)
        or not ids
        or not all(isinstance(i, str) and i for i in ids)
        or len(ids) > MAX_REDRIVE_IDS
    ):
        raise InvalidRequest(
            f'redrive body: "ids" (1 to {MAX_REDRIVE_IDS} request ids) or "all": true'
        )
    return list(dict.fromkeys(ids)), qualifier


@routes.post("/v1/functions/{name}/dlq/redrive")
async def redrive(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    ids, qualifier = await _redrive_body(request)
    dlq = _dlq(request)
    records = request.app[INVOCATIONS]
    resolved: dict[str, FunctionRecord] = {}
    redriven: list[str] = []
    missing: list[str] = []
    try:
        wanted = ids if ids is not None else await dlq.ids(name)
        for rid in wanted:
            try:
                entry = await dlq.get(name, rid)
            except InvocationNotFound:
                missing.append(rid)
                continue
            q = qualifier or str(entry.get("qualifier") or "$LATEST")
            if q not in resolved:
                # Resolved now, not when it was parked: a redeployed fix is what runs.
                resolved[q] = await request.app[REGISTRY].resolve(name, q)
            attempt = max(await records.done_count(rid), len(entry.get("attempts", []))) + 1
            inv = invocation_for_redrive(entry, resolved[q], q, attempt, time.time())
            await records.requeue(rid)
            await request.app[QUEUE].publish(inv)
            await dlq.remove(name, [rid])
            redriven.append(rid)
    except RedisError as e:
        raise ServiceUnavailable(f"dead-letter queue unavailable: {e}") from e
    log.info("dlq_redriven", function=name, count=len(redriven), missing=len(missing))
    return web.json_response({"function": name, "redriven": redriven, "missing": missing})


@routes.delete("/v1/functions/{name}/dlq")
async def purge(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    try:
        count = await _dlq(request).purge(name)
    except RedisError as e:
        raise ServiceUnavailable(f"dead-letter queue unavailable: {e}") from e
    log.info("dlq_purged", function=name, count=count)
    return web.json_response({"function": name, "purged": count})


@routes.delete("/v1/functions/{name}/dlq/{request_id}")
async def purge_one(request: web.Request) -> web.Response:
    name, rid = request.match_info["name"], request.match_info["request_id"]
    try:
        count = await _dlq(request).remove(name, [rid])
    except RedisError as e:
        raise ServiceUnavailable(f"dead-letter queue unavailable: {e}") from e
    if not count:
        raise InvocationNotFound(f"no dead letter {rid!r} for function {name!r}")
    return web.json_response({"function": name, "purged": count})


@routes.get("/v1/functions/{name}/destinations")
async def destination_stats(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    keys = Keys(request.app[SETTINGS].queue.prefix)
    try:
        raw: dict[Any, Any] = await request.app[REDIS].hgetall(keys.destination_stats(name))
    except RedisError as e:
        raise ServiceUnavailable(f"destination counts unavailable: {e}") from e
    stats = {(k.decode() if isinstance(k, bytes) else k): v.decode() for k, v in raw.items()}
    doc: dict[str, Any] = {
        "function": name,
        "delivered": int(stats.get("delivered", 0)),
        "failed": int(stats.get("failed", 0)),
    }
    if "last_error" in stats:
        doc.update(last_error=stats["last_error"], last_error_at=float(stats["last_error_at"]))
    return web.json_response(doc)
