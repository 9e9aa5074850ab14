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

from shared.errors import (
    ImagefnError,
    InternalError,
    InvalidRequest,
    RequestTooLarge,
)
from shared.http import REQUEST_ID_HEADER, SCF_ERROR_TYPE_HEADER, SCF_REQUEST_ID_HEADER

log = structlog.get_logger("imagefn.gateway")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class RouteNotFound(ImagefnError):
    http_status = 404


class MethodNotAllowed(ImagefnError):
    http_status = 405


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
