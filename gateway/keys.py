"""API key management (admin only; the scope table in gateway/auth.py says so):
``POST /v1/keys`` creates a key and answers its secret once, ``GET /v1/keys`` lists keys
(never their secrets), ``DELETE /v1/keys/{key_id}`` revokes one — on every gateway within
``IMAGEFN_KEY_CACHE_S``."""

from __future__ import annotations

import structlog
from aiohttp import web

from gateway.auth import principal_of
from gateway.context import API_KEYS
from gateway.params import json_object
from shared.errors import InvalidRequest
from shared.scopes import parse_scopes

routes = web.RouteTableDef()
log = structlog.get_logger("imagefn.gateway.keys")


@routes.post("/v1/keys")
async def create_key(request: web.Request) -> web.Response:
    doc = await json_object(
        request,
        "key body",
        frozenset({"name", "scopes", "expires_in_s"}),
        '{"name": ..., "scopes": [...], "expires_in_s"?: N}',
    )
    name = doc.get("name")
    if not isinstance(name, str):
        raise InvalidRequest("name: required, a short label for the key")
    scopes = parse_scopes(doc.get("scopes"))
    ttl = doc.get("expires_in_s")
    if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, int | float)):
        raise InvalidRequest("expires_in_s: a number of seconds")
    key, secret = await request.app[API_KEYS].create(
        name, scopes, principal_of(request).key_id, None if ttl is None else float(ttl)
    )
    log.info("api_key_created", key_id=key.id, scopes=list(key.scopes))
    return web.json_response({**key.public_dict(), "key": secret}, status=201)


@routes.get("/v1/keys")
async def list_keys(request: web.Request) -> web.Response:
    keys = await request.app[API_KEYS].list()
    return web.json_response({"keys": [k.public_dict() for k in keys]})


@routes.delete("/v1/keys/{key_id}")
async def revoke_key(request: web.Request) -> web.Response:
    key = await request.app[API_KEYS].revoke(request.match_info["key_id"])
    log.info("api_key_revoked", key_id=key.id)
    return web.json_response(key.public_dict())
