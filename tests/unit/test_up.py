"""``imagefn up``'s gateway child process (cli/up.py): stopped with ``up``, and ``up``
stops when it dies. The child runs a stand-in target, not a gateway."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from cli.up import GatewayProcessDied, serve_gateway_process
from shared.settings import Settings


def _sleep_forever(settings: Settings) -> None:
    time.sleep(3600)


def _exit_at_once(settings: Settings) -> None:
    os._exit(3)


async def test_the_child_is_stopped_when_up_stops() -> None:
    stop = asyncio.Event()
    serving = asyncio.create_task(serve_gateway_process(Settings(), stop, _sleep_forever))
    await asyncio.sleep(1.0)
    assert not serving.done()
    stop.set()
    # SIGTERM ends the stand-in at once (it installs no handler).
    await asyncio.wait_for(serving, 10)


async def test_up_stops_when_the_child_dies() -> None:
    stop = asyncio.Event()
    with pytest.raises(GatewayProcessDied, match="code 3"):
        await asyncio.wait_for(serve_gateway_process(Settings(), stop, _exit_at_once), 15)
