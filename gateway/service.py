"""Runs the gateway application on its socket until told to stop.

The socket is served by ``GuardedSite`` (gateway/connguard.py) rather than aiohttp's
``TCPSite``: it bounds slow headers and bodies and the number of connections. aiohttp
closes idle keep-alive connections itself, after ``keepalive_timeout_s``.
"""

from __future__ import annotations

import asyncio

import structlog
from aiohttp import web

from gateway.app import build_app
from gateway.connguard import GuardedSite
from shared.settings import Settings

log = structlog.get_logger("imagefn.gateway")


async def start_gateway(
    app: web.Application, settings: Settings, host: str, port: int
) -> tuple[web.AppRunner, GuardedSite]:
    """``app`` served on ``host:port`` (0: any free port; the site's ``port`` says which)
    with the intake bounds of ``settings``; the caller cleans the runner up."""
    runner = web.AppRunner(
        app,
        access_log=None,
        shutdown_timeout=10,
        keepalive_timeout=settings.intake.keepalive_timeout_s,
    )
    await runner.setup()
    try:
        site = GuardedSite(runner, host, port, settings.intake)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner, site


async def serve_gateway(settings: Settings, stop: asyncio.Event) -> None:
    runner, site = await start_gateway(
        build_app(settings), settings, settings.gateway.host, settings.gateway.port
    )
    try:
        log.info("gateway_listening", host=settings.gateway.host, port=site.port)
        await stop.wait()
    finally:
        await runner.cleanup()
        log.info("gateway_stopped")
