"""The one place where errors become HTTP responses.

Every platform error is answered as JSON ``{"error": {"type", "message", "code"?,
"request_id", ...details}}`` with ``X-Scf-Error-Type`` naming the contract's error type
and ``X-Request-Id``/``X-Scf-Request-Id`` naming the request.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web
from redis.exceptions import AuthenticationError, NoPermissionError, RedisError

from shared.errors import (
    ImagefnError,
    InternalError,
    InvalidRequest,
    RequestTooLarge,
    ServiceUnavailable,
)
from shared.http import REQUEST_ID_HEADER, SCF_ERROR_TYPE_HEADER, SCF_REQUEST_ID_HEADER
from shared.roles import credentials_refused

log = structlog.get_logger("imagefn.gateway")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class RouteNotFound(ImagefnError):
    http_status = 404


class MethodNotAllowed(ImagefnError):
    http_status = 405


# Refused at intake (gateway/guards.py, gateway/connguard.py): these never cross the queue.


class MisdirectedRequest(ImagefnError):
    """The Host header names a host this gateway does not answer."""

    http_status = 421


class CrossSiteRequest(ImagefnError):
    """A browser request from another site to a state-changing API route."""

    http_status = 403


class UnsupportedMediaType(ImagefnError):
    """A body type the route does not take (here: one a cross-site form can send)."""

    http_status = 415


class RequestTimeout(ImagefnError):
    """The client did not send its request's headers in time."""

    http_status = 408


def error_body(err: ImagefnError, request_id: str) -> dict[str, Any]:
    """The ``error`` object of an error answer; also what a stream that has already
    started sends in-band when it fails (the logs API's ``error`` notice)."""
    return {**err.to_dict(), "request_id": request_id}


def error_response(err: ImagefnError, request_id: str) -> web.Response:
    body = {"error": error_body(err, request_id)}
    return web.Response(
        status=err.http_status,
        body=json.dumps(body).encode(),
        content_type="application/json",
        headers={
            SCF_ERROR_TYPE_HEADER: err.type_name,
            REQUEST_ID_HEADER: request_id,
            SCF_REQUEST_ID_HEADER: request_id,
        },
    )


def redis_error(e: RedisError) -> ServiceUnavailable:
    """A Redis failure no handler caught: 503 naming the cause, never a 500. A Redis at
    its maxmemory (policy noeviction, docs/security.md) refuses writes with "OOM ...";
    one whose ACL refuses the gateway's user says NOAUTH, WRONGPASS or NOPERM."""
    text = str(e) or type(e).__name__
    if text.startswith("OOM"):
        return ServiceUnavailable(
            "Redis is out of memory (its maxmemory is reached) and refuses writes until "
            f"memory is freed or maxmemory raised: {text}"
        )
    if isinstance(e, AuthenticationError | NoPermissionError) or credentials_refused(text):
        return ServiceUnavailable(f"Redis refused the gateway's credentials: {text}")
    return ServiceUnavailable(f"Redis unavailable: {text}")


def http_exception_to_error(exc: web.HTTPException, max_body: int) -> ImagefnError:
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return RequestTooLarge(f"request body is larger than {max_body} bytes")
    if isinstance(exc, web.HTTPNotFound):
        return RouteNotFound("no such route; see /openapi.yaml")
    if isinstance(exc, web.HTTPMethodNotAllowed):
        return MethodNotAllowed(
            f"method not allowed; allowed: {', '.join(sorted(exc.allowed_methods))}"
        )
    if exc.status >= 500:
        return InternalError(exc.reason)
    return InvalidRequest(exc.reason)
