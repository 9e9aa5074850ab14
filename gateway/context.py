"""Typed application state of the gateway (aiohttp AppKeys)."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis
from aiohttp import web

from gateway.images import ImageResolver
from gateway.routing import WarmRouter
from gateway.tokens import TokenIssuer
from shared.apikeys import ApiKeyStore
from shared.audit import AuditLog
from shared.concurrency import ConcurrencyLimiter
from shared.invocations import InvocationLog
from shared.logreader import LogReader
from shared.queue.base import InvocationPublisher
from shared.registry import FunctionRegistry
from shared.scopes import Principal
from shared.settings import Settings

SETTINGS = web.AppKey("settings", Settings)
REDIS = web.AppKey("redis", aioredis.Redis)
# Typed as the producer side: handlers publish and call, never consume.
QUEUE = web.AppKey("queue", InvocationPublisher)
REGISTRY = web.AppKey("registry", FunctionRegistry)
IMAGES = web.AppKey("images", ImageResolver)
# Signs registry tokens; absent when no signing key is configured (the token route then
# answers 503).
TOKENS = web.AppKey("tokens", TokenIssuer)

# The request id of the request being handled (set by the request_context middleware).
REQUEST_ID = web.RequestKey("request_id", str)
# Who is calling (set by the auth middleware, gateway/auth.py): the key's id and scopes;
# ANONYMOUS for the caller of a public web function.
PRINCIPAL = web.RequestKey("principal", Principal)
LIMITER = web.AppKey("limiter", ConcurrencyLimiter)
# Invocation records (GET /v1/invocations/ID; async calls are accepted through it).
INVOCATIONS = web.AppKey("invocations", InvocationLog)
ROUTER = web.AppKey("router", WarmRouter)
# The logs API: its reader, and the stop signals of the streams now open (set at shutdown).
# API keys (checked on every request) and the audit log of control actions.
API_KEYS = web.AppKey("api_keys", ApiKeyStore)
AUDIT = web.AppKey("audit", AuditLog)
LOG_READER = web.AppKey("log_reader", LogReader)
LOG_STREAMS = web.AppKey("log_streams", set[asyncio.Event])
