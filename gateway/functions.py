"""Control API: create/replace, read, list and delete function specs."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web
from redis.exceptions import RedisError

from gateway.auth import hide_env, principal_of
from gateway.capacity import check_spec_fits
from gateway.context import IMAGES, INVOCATIONS, REDIS, REGISTRY, SETTINGS
from gateway.errors import log
from gateway.specbody import MAX_SPEC_BYTES, parse_spec_body
from shared.errors import (
    ImagefnError,
    InvalidRequest,
    InvalidSpec,
    RequestTooLarge,
    ServiceUnavailable,
)
from shared.invocations import record_not_found
from shared.keys import Keys
from shared.spec import parse_spec
from shared.triggers import TriggerStore

routes = web.RouteTableDef()


async def _document(request: web.Request) -> Any:
    if request.content_length is not None and request.content_length > MAX_SPEC_BYTES:
        raise RequestTooLarge(
            f"a spec body is at most {MAX_SPEC_BYTES} bytes; this one is "
            f"{request.content_length} bytes"
        )
    raw = await request.read()
    # Off the event loop: parsing is CPU work, and other requests must not wait for it.
    return await asyncio.to_thread(parse_spec_body, raw, request.content_type or "")


@routes.get("/v1/functions")
async def list_functions(request: web.Request) -> web.Response:
    records = await request.app[REGISTRY].list()
    principal = principal_of(request)
    # Only the functions the key may read are listed: the others stay unknown to it.
    shown = [
        hide_env(r.to_dict(), request, r.spec.name)
        for r in records
        if principal.allows("read", r.spec.name)
    ]
    return web.json_response({"functions": shown})


@routes.put("/v1/functions/{name}")
async def put_function(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    doc = await _document(request)
    if isinstance(doc, dict):
        if "name" not in doc:
            doc = {"name": name, **doc}
        elif doc["name"] != name:
            raise InvalidSpec({"name": f"{doc['name']!r} does not match the URL's {name!r}"})
    try:
        spec = parse_spec(doc)
    except InvalidSpec as bad:
        # Name every bad field in one answer, the image included.
        image = doc.get("image") if isinstance(doc, dict) else None
        if "image" not in bad.fields and isinstance(image, str):
            try:
                await request.app[IMAGES].resolve(image)
            except InvalidSpec as bad_image:
                raise InvalidSpec({**bad.fields, **bad_image.fields}) from None
            except ImagefnError:
                pass  # the registry cannot say now; the other fields are still wrong
        raise
    await check_spec_fits(request, spec)
    image = await request.app[IMAGES].resolve(spec.image)
    record, created = await request.app[REGISTRY].put(spec, image.ref, image.digest)
    log.info("function_deployed", function=name, version=record.version, image_ref=image.ref)
    return web.json_response(
        hide_env(record.to_dict(), request, name), status=201 if created else 200
    )


@routes.get("/v1/functions/{name}")
async def get_function(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    record = await request.app[REGISTRY].get(name)
    return web.json_response(hide_env(record.to_dict(), request, name))


@routes.get("/v1/functions/{name}/versions")
async def list_versions(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    found = await request.app[REGISTRY].versions(name)
    return web.json_response(
        {
            "latest": found.latest,
            "aliases": found.aliases,
            "versions": [hide_env(r.to_dict(), request, name) for r in found.versions],
        }
    )


@routes.put("/v1/functions/{name}/aliases/{alias}")
async def put_alias(request: web.Request) -> web.Response:
    name, alias = request.match_info["name"], request.match_info["alias"]
    doc = await _document(request)
    version = doc.get("version") if isinstance(doc, dict) else None
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise InvalidRequest('body must be {"version": N} with N a published version number')
    await request.app[REGISTRY].set_alias(name, alias, version)
    log.info("alias_set", function=name, alias=alias, version=version)
    return web.json_response({"function": name, "alias": alias, "version": version})


@routes.delete("/v1/functions/{name}/aliases/{alias}")
async def delete_alias(request: web.Request) -> web.Response:
    name, alias = request.match_info["name"], request.match_info["alias"]
    await request.app[REGISTRY].delete_alias(name, alias)
    log.info("alias_deleted", function=name, alias=alias)
    return web.Response(status=204)


@routes.get("/v1/invocations/{request_id}")
async def get_invocation(request: web.Request) -> web.Response:
    request_id = request.match_info["request_id"]
    try:
        doc = await request.app[INVOCATIONS].get(request_id)
    except RedisError as e:
        raise ServiceUnavailable(f"invocation records unavailable: {e}") from e
    principal = principal_of(request)
    if not principal.admin and doc.get("owner") != principal.key_id:
        # Another caller's record reads exactly like one that does not exist.
        raise record_not_found(request_id)
    return web.json_response(doc)


@routes.delete("/v1/functions/{name}")
async def delete_function(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    await request.app[REGISTRY].delete(name)
    # Its triggers go with it: a trigger of a deleted function would only fail.
    dropped = await TriggerStore(
        request.app[REDIS], Keys(request.app[SETTINGS].queue.prefix)
    ).delete_all(name)
    log.info("function_deleted", function=name, triggers=dropped)
    return web.Response(status=204)
