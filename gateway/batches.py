"""Batch routes (docs/architecture.md, section 15, "Batches"): submit a batch, read its
status and results, cancel it.

``POST /v1/functions/{name}/batches`` streams its body: it is parsed item by item
(``gateway.batchparse``) and staged in Redis as it arrives, so a batch may be far larger
than ``max_body_bytes`` (the request middleware lets this one route through, see
``streams_body``) while each item stays under ``max_event_bytes``. The function is
resolved before the body is read: an unknown function or qualifier is a 404 at once.

``GET /v1/batches/{id}/results`` writes NDJSON lines in item order, ``PAGE`` items per
Redis read, so its memory does not grow with the batch. Without ``follow`` it sends the
lines of the items finished so far (the ``index`` of each line says which); with
``follow=true`` it sends each line once it and every line before it are done, polling
every ``POLL_S``, and ends when the batch is over, the client leaves or the gateway shuts
down. ``start=N`` begins at item N (to resume a stream).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass

import structlog
from aiohttp import web

from gateway.auth import principal_of
from gateway.batchparse import AUTO, NDJSON, parse_batch
from gateway.context import REDIS, REGISTRY, REQUEST_ID, SETTINGS
from gateway.errors import error_body
from gateway.logs import parse_bool
from gateway.params import whole_number
from shared.batches import BatchStore
from shared.errors import BatchNotFound, ImagefnError, InvalidRequest, ServiceUnavailable
from shared.keys import Keys
from shared.registry import ALIAS_RE, LATEST
from shared.settings import AsyncSettings

log = structlog.get_logger("imagefn.gateway")

routes = web.RouteTableDef()

SUBMIT_ROUTE = "batch-submit"
# Content types that say "NDJSON" (so a body of arrays, one per line, is not taken for
# one JSON array).
NDJSON_TYPES = ("application/x-ndjson", "application/ndjson", "application/jsonl")
CHUNK_BYTES = 64 * 1024
BATCH_ID_RE = re.compile(r"^b-[0-9a-f]{32}\Z")
# Result lines read from Redis at once.
PAGE = 1000
# How often a following stream looks for new lines (and at its reasons to stop).
POLL_S = 0.2
# Following streams one gateway serves at once (each polls Redis).
MAX_FOLLOWERS = 256
FOLLOWERS = web.AppKey("batch_followers", set[asyncio.Event])

SUBMIT_PARAMETERS = ("qualifier", "max_concurrency", "max_retries", "max_event_age_s")
RESULTS_PARAMETERS = ("follow", "start")
MAX_CONCURRENCY = (1, 10_000)
MAX_RETRIES = (0, 10)
MAX_EVENT_AGE_S = (60, 21_600)


@dataclass(frozen=True)
class SubmitParams:
    qualifier: str = LATEST
    max_concurrency: int = 32
    max_retries: int = -1  # the function's async policy
    max_event_age_s: int = 0  # the function's async policy


def _known(query: Mapping[str, str], known: tuple[str, ...]) -> None:
    for key in query:
        if key not in known:
            raise InvalidRequest(f"{key}: unknown parameter; known: {', '.join(known)}")


def _whole(query: Mapping[str, str], name: str, bounds: tuple[int, int], default: int) -> int:
    return whole_number(query, name, default, *bounds)


def parse_submit_params(query: Mapping[str, str], settings: AsyncSettings) -> SubmitParams:
    """The checked query of a submission; InvalidRequest naming the first bad one."""
    _known(query, SUBMIT_PARAMETERS)
    qualifier = query.get("qualifier", "") or LATEST
    numeric = qualifier.isascii() and qualifier.isdigit()
    if (
        qualifier != LATEST
        and not (numeric and int(qualifier) >= 1)
        and not (ALIAS_RE.match(qualifier))
    ):
        raise InvalidRequest(
            f"qualifier: {qualifier!r} is not $LATEST, a version number or an alias name"
        )
    return SubmitParams(
        qualifier=qualifier,
        max_concurrency=_whole(
            query, "max_concurrency", MAX_CONCURRENCY, settings.batch_max_concurrency
        ),
        max_retries=_whole(query, "max_retries", MAX_RETRIES, -1),
        max_event_age_s=_whole(query, "max_event_age_s", MAX_EVENT_AGE_S, 0),
    )


def parse_results_params(query: Mapping[str, str]) -> tuple[bool, int]:
    """(follow, start) of a results request."""
    _known(query, RESULTS_PARAMETERS)
    follow = parse_bool("follow", query["follow"]) if "follow" in query else False
    return follow, _whole(query, "start", (0, 10**9), 0)


def streams_body(request: web.Request) -> bool:
    """Whether the request's route reads its body as a stream (the middleware does not
    hold it to ``max_body_bytes``)."""
    return request.match_info.route.name == SUBMIT_ROUTE


def _store(request: web.Request) -> BatchStore:
    settings = request.app[SETTINGS]
    return BatchStore(request.app[REDIS], Keys(settings.queue.prefix), settings.asyncinv)


def _batch_id(request: web.Request) -> str:
    batch_id = request.match_info["batch_id"]
    if not BATCH_ID_RE.match(batch_id):
        raise BatchNotFound(f"no batch {batch_id!r} (batch ids look like b-<32 hex digits>)")
    return batch_id


async def _end_follows(app: web.Application) -> None:
    """on_shutdown: every following stream ends."""
    followers = app[FOLLOWERS]
    for stop in list(followers):
        stop.set()


def setup(app: web.Application) -> None:
    """Add the batch routes and their state to the gateway ``app``."""
    app[FOLLOWERS] = set()
    app.on_shutdown.append(_end_follows)
    app.router.add_routes(routes)


@routes.post("/v1/functions/{name}/batches", name=SUBMIT_ROUTE)
async def submit_batch(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    structlog.contextvars.bind_contextvars(function=name)
    settings = request.app[SETTINGS].asyncinv
    params = parse_submit_params(request.query, settings)
    record = await request.app[REGISTRY].resolve(name, params.qualifier)
    if record.spec.type != "event":
        raise InvalidRequest(f"{name} is a web function; batches run event functions")
    fmt = NDJSON if request.content_type in NDJSON_TYPES else AUTO
    items = parse_batch(
        request.content.iter_chunked(CHUNK_BYTES),
        max_item_bytes=settings.max_event_bytes,
        max_items=settings.batch_max_items,
        fmt=fmt,
    )
    async with contextlib.aclosing(items):
        info = await _store(request).create(
            name,
            params.qualifier,
            items,
            params.max_concurrency,
            params.max_retries,
            params.max_event_age_s,
            owner=principal_of(request).key_id,
        )
    log.info("batch_accepted", batch=info.batch_id, items=info.items)
    return web.json_response(info.to_dict(), status=202)


async def _owned_batch(request: web.Request) -> str:
    """The batch id of the route, once the caller is known to be its submitter (or an
    admin); anyone else is told there is no such batch, as if it did not exist."""
    batch_id = _batch_id(request)
    progress = await _store(request).progress(batch_id)
    principal = principal_of(request)
    if not principal.admin and progress.meta.owner != principal.key_id:
        ttl = request.app[SETTINGS].asyncinv.batch_ttl_s
        raise BatchNotFound(f"no batch {batch_id!r} (unknown, or finished longer than {ttl} s ago)")
    return batch_id


@routes.get("/v1/batches/{batch_id}")
async def get_batch(request: web.Request) -> web.Response:
    return web.json_response(await _store(request).status(await _owned_batch(request)))


@routes.delete("/v1/batches/{batch_id}")
async def cancel_batch(request: web.Request) -> web.Response:
    batch_id = await _owned_batch(request)
    doc = await _store(request).cancel(batch_id)
    log.info("batch_cancelled", batch=batch_id, state=doc["state"])
    return web.json_response(doc)


def _client_left(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


@routes.get("/v1/batches/{batch_id}/results")
async def get_results(request: web.Request) -> web.StreamResponse:
    batch_id = await _owned_batch(request)  # BatchNotFound before the stream starts
    follow, start = parse_results_params(request.query)
    store = _store(request)
    followers = request.app[FOLLOWERS]
    if follow and len(followers) >= MAX_FOLLOWERS:
        raise ServiceUnavailable(f"this gateway follows {MAX_FOLLOWERS} batches already; retry")
    stop = asyncio.Event()
    if follow:
        followers.add(stop)
    try:
        response = web.StreamResponse(
            headers={
                "Content-Type": "application/x-ndjson",
                "Cache-Control": "no-cache",
                # nginx would otherwise hold the stream back in its buffer.
                "X-Accel-Buffering": "no",
            }
        )
        await response.prepare(request)
        reason = await _write_results(request, response, store, batch_id, start, follow, stop)
        if reason != "client_gone":
            with contextlib.suppress(ConnectionError):
                await response.write_eof()
        log.info("batch_results_closed", batch=batch_id, follow=follow, reason=reason)
        return response
    finally:
        followers.discard(stop)


async def _write_results(
    request: web.Request,
    response: web.StreamResponse,
    store: BatchStore,
    batch_id: str,
    start: int,
    follow: bool,
    stop: asyncio.Event,
) -> str:
    """Write the lines from item ``start`` on; why the stream ends."""
    next_index = start
    try:
        while True:
            page = await store.results(batch_id, next_index, PAGE)
            out = bytearray()
            consumed = 0
            for line in page.lines:
                if line is None and follow and not page.over:
                    break  # lines go out in item order: wait for this one
                if line is not None:
                    out += line + b"\n"
                consumed += 1
            next_index += consumed
            if _client_left(request):
                return "client_gone"
            if out:
                await response.write(bytes(out))
            if next_index >= page.total:
                return "complete"
            if consumed == PAGE:
                continue  # a whole page: read on at once
            if not follow or page.over:
                return "complete"
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), POLL_S)
            if stop.is_set():
                return "shutdown"
    except ConnectionError:
        return "client_gone"
    except ImagefnError as e:
        # The stream has started: the error can only go in-band, as the last line.
        log.warning("batch_results_failed", batch=batch_id, error=e.type_name, reason=e.message)
        with contextlib.suppress(ConnectionError):
            body = {"error": error_body(e, request[REQUEST_ID])}
            await response.write(json.dumps(body, separators=(",", ":")).encode() + b"\n")
        return "error"
