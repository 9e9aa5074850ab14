"""Runs the gateway application on its socket until told to stop."""

from __future__ import annotations

import asyncio

import structlog
from aiohttp import web

from gateway.app import build_app
from shared.settings import Settings

log = structlog.get_logger("imagefn.gateway")


async def serve_gateway(settings: Settings, stop: asyncio.Event) -> None:
    runner = web.AppRunner(build_app(settings), access_log=None, shutdown_timeout=10)
    await runner.setup()
    try:
        site = web.TCPSite(runner, settings.gateway.host, settings.gateway.port)
        await site.start()
        log.info("gateway_listening", host=settings.gateway.host, port=settings.gateway.port)
        await stop.wait()
    finally:
        await runner.cleanup()
        log.info("gateway_stopped")
