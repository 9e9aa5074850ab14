"""``imagefn up`` with the gateway in a process of its own.

One Python process runs one event loop on one core. With gateway and worker in it, every
invocation's HTTP parsing, queue hops and forwarding shared that core while the machine's
other core idled (issue 12: about 0.9 cores used at saturation). So ``up`` starts the
gateway as a child process (``multiprocessing`` "spawn": a fresh interpreter that receives
the parent's already loaded settings, so it runs with exactly the credentials ``up`` has)
and runs the worker, cold-start manager, scheduler and trigger runner in its own loop.

The child is one more part of ``up``: when ``up`` stops (Ctrl-C, SIGTERM, another part
failed), the child is told to stop (SIGTERM) and waited for; when the child dies, ``up``
stops the rest rather than run half a platform. Only with
``IMAGEFN_UP_GATEWAY_PROCESS=true``: on a 2-core machine the second process measured slower
(its wake-ups compete with the container, Redis and docker-proxy for the same two cores),
so one process stays the default; try it where there are more cores.
"""

from __future__ import annotations

import asyncio
import multiprocessing
from collections.abc import Callable

import structlog

from shared.settings import Settings

log = structlog.get_logger("imagefn.up")

# The gateway stops within its own shutdown timeout (10 s, gateway/service.py); after this
# long it is killed.
GATEWAY_STOP_S = 20.0


class GatewayProcessDied(RuntimeError):
    """The gateway child exited while ``up`` was running."""


async def _wait(event: asyncio.Event) -> None:
    await event.wait()


def _gateway_main(settings: Settings) -> None:
    # In the child: the same server loop ``imagefn gateway`` runs.
    from cli.main import _serve
    from gateway.service import serve_gateway

    _serve(settings, serve_gateway)


async def serve_gateway_process(
    settings: Settings,
    stop: asyncio.Event,
    target: Callable[[Settings], None] = _gateway_main,
) -> None:
    """Runs ``target`` (the gateway; tests pass another) in a child process until ``stop``
    is set, then stops it; raises ``GatewayProcessDied`` if it exits before that."""
    proc = multiprocessing.get_context("spawn").Process(
        target=target, args=(settings,), name="imagefn-gateway"
    )
    proc.start()
    log.info("gateway_process_started", pid=proc.pid)
    loop = asyncio.get_running_loop()
    exited: asyncio.Future[None] = loop.create_future()

    def on_exit() -> None:
        if not exited.done():
            exited.set_result(None)

    # The sentinel becomes readable when the child exits: no polling.
    loop.add_reader(proc.sentinel, on_exit)
    stopping = asyncio.ensure_future(_wait(stop))
    try:
        await asyncio.wait({exited, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if exited.done() and not stop.is_set():
            # The sentinel closes as the child exits, a moment before it can be reaped.
            await asyncio.to_thread(proc.join, 5)
            raise GatewayProcessDied(f"the gateway process exited with code {proc.exitcode}")
    finally:
        stopping.cancel()
        if proc.is_alive() and proc.pid is not None:
            proc.terminate()  # SIGTERM: the child's own clean shutdown
            try:
                await asyncio.wait_for(asyncio.shield(exited), GATEWAY_STOP_S)
            except TimeoutError:
                log.warning("gateway_process_killed", pid=proc.pid)
                proc.kill()
        loop.remove_reader(proc.sentinel)
        await asyncio.to_thread(proc.join, 5)
        log.info("gateway_process_stopped", exitcode=proc.exitcode)
