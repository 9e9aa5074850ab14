"""Backoff doubles its wait per failure up to the cap, and starts over after a success."""

from __future__ import annotations

import asyncio

import pytest

from shared.backoff import Backoff


async def test_doubles_up_to_the_cap_and_starts_over_after_reset(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    waited: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        waited.append(seconds)

    monkeypatch.setattr(asyncio, "sleep", fake_sleep)
    b = Backoff(0.1, 0.5)
    for _ in range(5):
        await b.sleep()
    assert waited == [0.1, 0.2, 0.4, 0.5, 0.5]
    b.reset()
    assert b.delay_s == 0.1
    await b.sleep()
    assert waited[-1] == 0.1 and b.delay_s == 0.2
