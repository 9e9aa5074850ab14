"""workers.destinations: one lane per destination, so a dead URL holds only its own."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from shared.invocations import InvocationLog
from shared.keys import Keys
from shared.settings import Settings
from workers import destinations
from workers.destinations import DestinationDispatcher

from .fakes import FakeRedis
from .helpers import eventually


def entry(n: int, url: str) -> tuple[Any, dict[bytes, bytes]]:
    return (
        f"{n}-0".encode(),
        {b"d": json.dumps({"url": url}).encode(), b"v": json.dumps({"request_id": n}).encode()},
    )


async def test_a_dead_destination_does_not_hold_up_the_others() -> None:
    redis: Any = FakeRedis()
    d = DestinationDispatcher(redis, Settings(), "c1", InvocationLog(redis, Keys("p"), 60))
    dead_url_waits = asyncio.Event()
    sent: list[str] = []

    async def handle(entry_id: Any, fields: dict[bytes, bytes]) -> None:
        url = json.loads(fields[b"d"])["url"]
        if url == "http://dead":
            await dead_url_waits.wait()  # every try times out, for a long time
        sent.append(url)

    d._handle = handle  # type: ignore[method-assign]
    # More records to the dead URL than the whole dispatcher may send at once, then one
    # to a healthy URL.
    many = destinations.MAX_SENDING + 10
    await d._take([entry(i, "http://dead") for i in range(many)] + [entry(999, "http://ok")])
    await eventually(lambda: sent == ["http://ok"])
    assert d._running == {json.dumps({"url": "http://dead"}).encode(): destinations.PER_DESTINATION}
    assert d._waiting_count == many - destinations.PER_DESTINATION
    # When the dead URL answers again, its waiting records follow in order.
    dead_url_waits.set()
    await eventually(lambda: len(sent) == many + 1)
    assert d._waiting_count == 0 and not d._running
