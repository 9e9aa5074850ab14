"""Who may call what: the ``authenticate`` middleware and the route → scope table.

Every ``/v1/`` route needs an API key (``Authorization: Bearer ifn_…``) except the
registry's token route, which has its own HTTP Basic credentials; ``/healthz`` and
``/openapi.yaml`` are open. The middleware enforces the scope of each route from
``ROUTE_SCOPES`` — one table, so that a route cannot be added without deciding who may
call it (a test checks every ``/v1/`` route is in it; a route missing from it is refused).
Routes whose function is known only after a lookup (an invocation record, a batch) are
marked ``LOOKUP`` and checked by their handler with ``require``.

Web functions (``/web/{name}/…``) are the user's own HTTP app: a ``public`` one is open
to anyone and its caller's ``Authorization`` header reaches it untouched; a ``key`` one
(the default) needs a key with ``invoke`` on it, and that header is removed before the
request is forwarded (a function must never see a platform credential). The handler
decides, once it knows the function's spec (``require_web_caller``).
"""

from __future__ import annotations

from typing import Any, Final

from aiohttp import hdrs, web

from gateway.context import API_KEYS, PRINCIPAL
from gateway.errors import Handler
from shared.errors import Forbidden, ImagefnError, Unauthorized
from shared.scopes import ANONYMOUS, Principal

ADMIN: Final = "admin"
# Any valid key; the handler checks the function once it has looked it up.
LOOKUP: Final = "lookup"
# Any valid key; the handler shows only what the key may read (lists).
ANY_KEY: Final = "any-key"

OPEN_PATHS = frozenset({"/healthz", "/openapi.yaml", "/v1/registry/token"})
WEB_PREFIX = "/web/"
CHALLENGE = 'Bearer realm="imagefn"'
# Why a web caller's key was not accepted, for the handler to answer with if the
# function needs a key.
AUTH_FAILURE = web.RequestKey("auth_failure", str)

# (method, route pattern) → the scope it needs: an action on the route's {name}, or
# ADMIN, LOOKUP, ANY_KEY. HEAD is checked as GET.
ROUTE_SCOPES: dict[tuple[str, str], str] = {
    ("GET", "/v1/functions"): ANY_KEY,
    ("PUT", "/v1/functions/{name}"): "deploy",
    ("GET", "/v1/functions/{name}"): "read",
    ("DELETE", "/v1/functions/{name}"): "deploy",
    ("GET", "/v1/functions/{name}/versions"): "read",
    ("PUT", "/v1/functions/{name}/aliases/{alias}"): "deploy",
    ("DELETE", "/v1/functions/{name}/aliases/{alias}"): "deploy",
    ("POST", "/v1/functions/{name}/invoke"): "invoke",
    ("GET", "/v1/functions/{name}/logs"): "logs",
    ("GET", "/v1/functions/{name}/dlq"): "read",
    ("GET", "/v1/functions/{name}/dlq/{request_id}"): "read",
    ("POST", "/v1/functions/{name}/dlq/redrive"): "invoke",
    ("DELETE", "/v1/functions/{name}/dlq"): "deploy",
    ("DELETE", "/v1/functions/{name}/dlq/{request_id}"): "deploy",
    ("GET", "/v1/functions/{name}/destinations"): "read",
    ("POST", "/v1/functions/{name}/batches"): "invoke",
    ("GET", "/v1/functions/{name}/triggers"): "read",
    ("PUT", "/v1/functions/{name}/triggers/{trigger}"): "deploy",
    ("GET", "/v1/functions/{name}/triggers/{trigger}"): "read",
    ("DELETE", "/v1/functions/{name}/triggers/{trigger}"): "deploy",
    ("POST", "/v1/functions/{name}/triggers/{trigger}/enable"): "deploy",
    ("POST", "/v1/functions/{name}/triggers/{trigger}/disable"): "deploy",
    # S3 event notifications: each matching trigger fires if the key has invoke on its
    # function (gateway/s3events.py).
    ("POST", "/v1/triggers/s3-events"): LOOKUP,
    ("GET", "/v1/invocations/{request_id}"): LOOKUP,
    ("GET", "/v1/batches/{batch_id}"): LOOKUP,
    ("DELETE", "/v1/batches/{batch_id}"): LOOKUP,
    ("GET", "/v1/batches/{batch_id}/results"): LOOKUP,
    ("GET", "/v1/keys"): ADMIN,
    ("POST", "/v1/keys"): ADMIN,
    ("DELETE", "/v1/keys/{key_id}"): ADMIN,
    ("GET", "/v1/audit"): ADMIN,
}


def bearer_token(request: web.Request) -> str | None:
    scheme, _, token = request.headers.get(hdrs.AUTHORIZATION, "").strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def route_pattern(request: web.Request) -> str | None:
    """The matched route's pattern (``/v1/functions/{name}``), None when nothing matched."""
    info = request.match_info
    if info.http_exception is not None:
        return None
    resource = info.route.resource
    return None if resource is None else resource.canonical


def scope_of(request: web.Request) -> str | None:
    pattern = route_pattern(request)
    if pattern is None:
        return None
    method = "GET" if request.method == "HEAD" else request.method
    return ROUTE_SCOPES.get((method, pattern))


@web.middleware
async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    path = request.path
    if path in OPEN_PATHS:
        return await handler(request)
    if path.startswith(WEB_PREFIX) or path == WEB_PREFIX.rstrip("/"):
        token = bearer_token(request)
        # Only a token shaped like ours is ours; a public function's own bearer tokens
        # pass through to it untouched.
        if token is not None and token.startswith("ifn_"):
            try:
                request[PRINCIPAL] = await request.app[API_KEYS].authenticate(token)
            except Unauthorized as e:
                request[AUTH_FAILURE] = e.message
        return await handler(request)
    if route_pattern(request) is None:
        # No such route (404/405): nothing to protect, and the answer says so.
        return await handler(request)
    token = bearer_token(request)
    if token is None:
        raise Unauthorized(
            "an API key is required: send 'Authorization: Bearer <key>' "
            "(an admin creates keys with 'imagefn keys create')"
        )
    principal = await request.app[API_KEYS].authenticate(token)
    request[PRINCIPAL] = principal
    scope = scope_of(request)
    if scope is None:
        # Fail closed: a route nobody gave a scope to is reachable by admins only.
        if not principal.admin:
            raise Forbidden("this route needs the admin scope")
    elif scope == ADMIN:
        if not principal.admin:
            raise Forbidden(f"key {principal.key_id} lacks the admin scope")
    elif scope not in (LOOKUP, ANY_KEY):
        require(request, scope, request.match_info.get("name", ""))
    return await handler(request)


def principal_of(request: web.Request) -> Principal:
    return request.get(PRINCIPAL) or ANONYMOUS


def require(request: web.Request, action: str, function: str) -> Principal:
    """The caller, if it may do ``action`` on ``function``; else Unauthorized/Forbidden."""
    principal = principal_of(request)
    if not principal.authenticated:
        raise Unauthorized(
            request.get(AUTH_FAILURE)
            or f"an API key with {action}:{function} is required (Authorization: Bearer)"
        )
    if not principal.allows(action, function):
        raise Forbidden(f"key {principal.key_id} lacks the scope {action}:{function}")
    return principal


def require_web_caller(request: web.Request, function: str, auth: str) -> Principal:
    """The caller of a web function whose spec says ``auth`` ("public" or "key")."""
    if auth == "public":
        return principal_of(request)
    return require(request, "invoke", function)


# Details of an error answer that quote what a function printed or answered: given only
# to callers that may read that function's logs.
OUTPUT_DETAILS = ("logs", "function_body")


def redact_output(err: ImagefnError, request: web.Request) -> None:
    """Drop the error's quotes of function output unless the caller has ``logs`` on it."""
    present = [k for k in OUTPUT_DETAILS if k in err.details]
    if not present:
        return
    function = request.match_info.get("name", "")
    if function and principal_of(request).allows("logs", function):
        return
    for k in present:
        err.details.pop(k)
    err.details["withheld"] = f"{', '.join(present)}: needs the logs scope on this function"


def hide_env(doc: dict[str, Any], request: web.Request, function: str) -> dict[str, Any]:
    """A function record's document with its env values hidden unless the caller has
    ``secrets`` on the function (the names stay: they say what the function expects)."""
    env = doc.get("env")
    if env and not principal_of(request).allows("secrets", function):
        doc = {**doc, "env": {k: "(hidden)" for k in env}, "env_hidden": True}
    return doc
