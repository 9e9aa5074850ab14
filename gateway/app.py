"""Builds the gateway's aiohttp application. Running it is the caller's business
(``cli`` uses an ``AppRunner``; tests use the aiohttp test server).

Each resource gets one ``cleanup_ctx`` generator: set up, yield, tear down — in reverse
order, and only for what started.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from importlib import resources

import redis.asyncio as aioredis
import structlog
from aiohttp import web
from redis.exceptions import RedisError

from gateway import (
    admission,
    audit,
    batches,
    dlq,
    functions,
    guards,
    invoke,
    keys,
    logs,
    s3events,
    token_service,
    triggers,
)
from gateway.auth import CHALLENGE, authenticate, principal_of, redact_output
from gateway.context import (
    API_KEYS,
    AUDIT,
    IMAGES,
    INVOCATIONS,
    LIMITER,
    QUEUE,
    REDIS,
    REGISTRY,
    REQUEST_ID,
    ROUTER,
    SETTINGS,
    TOKENS,
)
from gateway.errors import Handler, error_response, http_exception_to_error, log, redis_error
from gateway.images import ImageResolver, RegistryImageResolver, UncheckedImageResolver
from gateway.routing import WarmRouter
from gateway.tokens import REPOSITORY, Access, TokenIssuer
from shared.apikeys import ApiKeyStore
from shared.audit import AuditLog
from shared.concurrency import ConcurrencyLimiter
from shared.errors import ImagefnError, InternalError, RequestCanceled, ServiceUnavailable
from shared.http import CALLER_REQUEST_ID, REQUEST_ID_HEADER, SCF_REQUEST_ID_HEADER
from shared.invocations import InvocationLog
from shared.keys import Keys
from shared.queue.base import InvocationQueue
from shared.queue.factory import make_queue
from shared.registry import FunctionRegistry
from shared.settings import Settings

access_log = structlog.get_logger("imagefn.access")

# A caller may name its own request id (to trace it end to end); anything else is
# replaced, since the id lands in headers and log lines.


@web.middleware
async def request_context(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.monotonic()
    given = request.headers.get(REQUEST_ID_HEADER, "")
    request_id = given if CALLER_REQUEST_ID.match(given) else str(uuid.uuid4())
    request[REQUEST_ID] = request_id
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(request_id=request_id)
    response = await _answer(request, handler, request_id)
    if request.app[SETTINGS].auth.access_log:
        access_log.info(
            "access",
            method=request.method,
            path=request.path,
            status=response.status,
            duration_ms=round((time.monotonic() - started) * 1000, 3),
            key_id=principal_of(request).key_id,
            remote=request.remote or "",
        )
    return response


async def _answer(request: web.Request, handler: Handler, request_id: str) -> web.StreamResponse:
    """The handler's answer, or the error answer of what it raised (the one place errors
    become HTTP)."""
    max_body = request.app[SETTINGS].gateway.max_body_bytes
    try:
        length = request.content_length
        # A batch streams its body item by item; each item has its own limit.
        if length is not None and length > max_body and not batches.streams_body(request):
            raise web.HTTPRequestEntityTooLarge(max_size=max_body, actual_size=length)
        response = await handler(request)
    except ImagefnError as e:
        if e.http_status >= 500:
            log.warning("request_failed", error=e.type_name, reason=e.message)
        redact_output(e, request)
        answer = error_response(e, request_id)
        if e.http_status == 401 and not request.path.startswith(token_service.TOKEN_PATH):
            answer.headers["WWW-Authenticate"] = CHALLENGE
        return answer
    except web.HTTPException as e:
        return error_response(http_exception_to_error(e, max_body), request_id)
    except RedisError as e:
        err = redis_error(e)
        log.warning("request_failed", error=err.type_name, reason=err.message)
        return error_response(err, request_id)
    except ConnectionResetError as e:
        # The client went away mid-request (aiohttp's ClientConnectionResetError too, and
        # a slow body the connection guard closed): not the gateway's failure. The answer
        # goes nowhere; it only keeps aiohttp from logging the exception.
        log.info("client_aborted", method=request.method, path=request.path, reason=str(e))
        return error_response(RequestCanceled("the client closed the connection"), request_id)
    except Exception:
        log.exception("request_crashed")
        return error_response(InternalError("internal error; see the gateway log"), request_id)
    response.headers.setdefault(REQUEST_ID_HEADER, request_id)
    return response


async def healthz(request: web.Request) -> web.Response:
    try:
        await request.app[REDIS].ping()
    except RedisError as e:
        raise ServiceUnavailable(f"Redis unavailable: {e}") from e
    return web.json_response({"status": "ok"})


async def openapi(request: web.Request) -> web.Response:
    text = resources.files("gateway").joinpath("openapi.yaml").read_text()
    return web.Response(text=text, content_type="application/yaml")


def build_app(
    settings: Settings,
    *,
    queue: InvocationQueue | None = None,
    images: ImageResolver | None = None,
) -> web.Application:
    """The gateway application. ``queue``/``images`` override the real ones (tests)."""
    app = web.Application(
        client_max_size=settings.gateway.max_body_bytes,
        # Outermost first: errors become answers; Host and cross-site checks (no state);
        # the audit (it sees every control call, refused ones too); who is calling;
        # admission and rate limits (per key: after authenticate).
        middlewares=[
            request_context,
            guards.intake_guard,
            audit.audit,
            authenticate,
            admission.intake_limits,
        ],
    )
    app[SETTINGS] = settings

    async def redis_ctx(app: web.Application) -> AsyncIterator[None]:
        client = aioredis.Redis.from_url(settings.redis.url)
        app[REDIS] = client
        app[REGISTRY] = FunctionRegistry(
            client, Keys(settings.queue.prefix), settings.gateway.function_cache_s
        )
        app[LIMITER] = ConcurrencyLimiter(client, Keys(settings.queue.prefix))
        app[INVOCATIONS] = InvocationLog(
            client,
            Keys(settings.queue.prefix),
            settings.queue.invocation_ttl_s,
            settings.asyncinv.result_ttl_s,
        )
        app[API_KEYS] = ApiKeyStore(
            client,
            Keys(settings.queue.prefix),
            admin_key=settings.auth.admin_key,
            cache_s=settings.auth.key_cache_s,
        )
        app[AUDIT] = AuditLog(client, Keys(settings.queue.prefix), settings.auth.audit_max_entries)
        if not settings.auth.admin_key:
            log.warning(
                "no_admin_key",
                hint="IMAGEFN_ADMIN_KEY is not set: only keys created earlier work",
            )
        yield
        await client.aclose()

    async def queue_ctx(app: web.Application) -> AsyncIterator[None]:
        q = queue or make_queue(settings, app[REDIS])
        await q.open()
        app[QUEUE] = q
        router = WarmRouter(app[REDIS], Keys(settings.queue.prefix), q)
        await router.start()
        app[ROUTER] = router
        yield
        await router.close()
        await q.close()

    async def images_ctx(app: web.Application) -> AsyncIterator[None]:
        resolver: ImageResolver
        if images is not None:
            resolver = images
        elif settings.gateway.check_images:
            issuer = TokenIssuer.from_settings(settings.registry)
            app[TOKENS] = issuer

            async def pull_token(repository: str) -> str:
                # The gateway's own short-lived token, to read manifests at deploy.
                access = [Access(REPOSITORY, repository, ("pull",))]
                return issuer.issue("imagefn-gateway", access, ttl_s=60).token

            resolver = RegistryImageResolver(settings.registry.address, pull_token)
        else:
            resolver = UncheckedImageResolver()
        app[IMAGES] = resolver
        yield
        await resolver.close()

    app.cleanup_ctx.extend([redis_ctx, queue_ctx, images_ctx])
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/openapi.yaml", openapi)
    app.router.add_routes(functions.routes)
    logs.setup(app)
    app.router.add_routes(token_service.routes)
    app.router.add_routes(invoke.routes)
    app.router.add_routes(dlq.routes)
    app.router.add_routes(keys.routes)
    app.router.add_routes(triggers.routes)
    app.router.add_routes(s3events.routes)
    app.router.add_routes(audit.routes)
    batches.setup(app)
    admission.setup(app)
    invoke.add_web_routes(app)

    async def on_prepare(request: web.Request, response: web.StreamResponse) -> None:
        rid = request.get(REQUEST_ID)
        if rid:
            response.headers.setdefault(REQUEST_ID_HEADER, rid)
            response.headers.setdefault(SCF_REQUEST_ID_HEADER, rid)

    app.on_response_prepare.append(on_prepare)
    return app
