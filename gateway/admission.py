"""Admission: what one gateway takes on before it refuses, and how fast each caller and
function may call.

Two bounds, checked by the ``intake_limits`` middleware before a handler runs:

* **In flight** (this gateway, in memory): calls and request bytes held while an
  invocation is in the queue or running — synchronous event invokes and web calls until
  their answer, asynchronous events until they are published (202). Past
  ``max_inflight_calls`` or ``max_inflight_bytes``: 503 ServiceUnavailable with
  Retry-After. A request is counted from admission to its answer, so its body (held in
  memory by the handler) is counted for as long as it is held; a chunked body, whose size
  is unknown up front, is counted at the largest body the gateway accepts.
* **Rate** (all gateways, in Redis; ``gateway/ratelimit.py``): a token bucket per API key
  (every request made with a key) and per function (its invocations). Past either: 429
  ResourceLimitReached with Retry-After.

The in-flight bound is checked first: it costs nothing, and an overloaded gateway should
not spend a Redis round trip on a call it will refuse anyway.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import structlog
from aiohttp import web

from gateway.context import PRINCIPAL, REDIS, REQUEST_ID, SETTINGS
from gateway.errors import Handler, error_response
from gateway.ratelimit import (
    Limit,
    RateLimiter,
    RedisRateLimiter,
    function_limit,
    key_limit,
)
from shared.errors import ImagefnError, ResourceLimitReached, ServiceUnavailable
from shared.keys import Keys
from shared.settings import Settings

log = structlog.get_logger("imagefn.gateway")

# Invocation routes (aiohttp's canonical form of their patterns): the ones that hold a
# call in the queue, and that the per-function rate limit applies to.
INVOKE_ROUTES = frozenset({"/v1/functions/{name}/invoke", "/web/{name}", "/web/{name}/{tail}"})
# How long a caller refused for load should wait: the queue drains in about a call's time.
BUSY_RETRY_AFTER_S = 1


class InflightBudget:
    """Calls and bytes held by this gateway (one event loop: no lock needed)."""

    def __init__(self, max_calls: int, max_bytes: int) -> None:
        self.max_calls = max_calls
        self.max_bytes = max_bytes
        self.calls = 0
        self.bytes = 0

    def try_take(self, nbytes: int) -> str | None:
        """Hold one call of ``nbytes``; None when taken, else the setting in the way."""
        if self.calls + 1 > self.max_calls:
            return "max_inflight_calls"
        # A single call larger than the whole budget still goes when nothing else is held,
        # or it could never run (the body size limit bounds it anyway).
        if self.calls and self.bytes + nbytes > self.max_bytes:
            return "max_inflight_bytes"
        self.calls += 1
        self.bytes += nbytes
        return None

    def give_back(self, nbytes: int) -> None:
        self.calls -= 1
        self.bytes -= nbytes


BUDGET = web.AppKey("inflight_budget", InflightBudget)
RATE_LIMITER = web.AppKey("rate_limiter", RateLimiter)


def setup(app: web.Application, limiter: RateLimiter | None = None) -> None:
    """The budget now; the Redis limiter once Redis is up (``limiter``: tests' own)."""
    settings = app[SETTINGS]
    app[BUDGET] = InflightBudget(
        settings.intake.max_inflight_calls, settings.intake.max_inflight_bytes
    )

    async def limiter_ctx(app: web.Application) -> AsyncIterator[None]:
        app[RATE_LIMITER] = limiter or RedisRateLimiter(app[REDIS])
        yield

    app.cleanup_ctx.append(limiter_ctx)


def invoked_function(request: web.Request) -> str | None:
    """The function an invocation route calls; None for any other route."""
    route = request.match_info.route
    resource = route.resource
    if resource is None or resource.canonical not in INVOKE_ROUTES:
        return None
    return request.match_info.get("name")


def held_bytes(request: web.Request, max_body: int) -> int:
    length = request.content_length
    if length is not None:
        return length
    return max_body if request.body_exists else 0


def limits_for(request: web.Request, settings: Settings, function: str | None) -> list[Limit]:
    intake = settings.intake
    keys = Keys(settings.queue.prefix)
    limits: list[Limit] = []
    principal = request.get(PRINCIPAL)
    if intake.rate_per_key > 0 and principal is not None and principal.authenticated:
        limits.append(key_limit(keys, principal.key_id, intake.rate_per_key, intake.burst_per_key))
    if intake.rate_per_function > 0 and function is not None:
        limits.append(
            function_limit(keys, function, intake.rate_per_function, intake.burst_per_function)
        )
    return limits


def _refusal(request: web.Request, err: ImagefnError, retry_after_s: int) -> web.Response:
    # Answered here rather than raised: the error answer needs its Retry-After header.
    log.info("request_refused", error=err.type_name, reason=err.message, path=request.path)
    answer = error_response(err, request.get(REQUEST_ID, ""))
    answer.headers["Retry-After"] = str(retry_after_s)
    return answer


@web.middleware
async def intake_limits(request: web.Request, handler: Handler) -> web.StreamResponse:
    settings = request.app[SETTINGS]
    function = invoked_function(request)
    nbytes = 0
    budget: InflightBudget | None = None
    if function is not None:
        budget = request.app[BUDGET]
        nbytes = held_bytes(request, settings.gateway.max_body_bytes)
        over = budget.try_take(nbytes)
        if over is not None:
            limit = budget.max_calls if over == "max_inflight_calls" else budget.max_bytes
            busy = ServiceUnavailable(
                f"this gateway holds as many calls as it may ({over}={limit}); retry shortly",
                details={"limit": over},
            )
            return _refusal(request, busy, BUSY_RETRY_AFTER_S)
    try:
        limits = limits_for(request, settings, function)
        if limits:
            denied = await request.app[RATE_LIMITER].check(limits)
            if denied is not None:
                lim = denied.limit
                name = "RATE_PER_KEY" if lim.scope == "key" else "RATE_PER_FUNCTION"
                err = ResourceLimitReached(
                    f"rate limit of this {lim.scope} reached ({lim.rate:g} calls/s, burst "
                    f"{lim.burst}; IMAGEFN_{name}); retry in {denied.retry_after_s} s",
                    details={"limit": f"rate_per_{lim.scope}"},
                )
                return _refusal(request, err, denied.retry_after_s)
        return await handler(request)
    finally:
        if budget is not None:
            budget.give_back(nbytes)
