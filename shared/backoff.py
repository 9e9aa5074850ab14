"""Exponential back-off between retries of a call that keeps failing (an engine, a
broker or Redis that is away): the first wait is short, each failure doubles it up to a
cap, a success starts again from the first."""

from __future__ import annotations

import asyncio


class Backoff:
    def __init__(self, first_s: float, cap_s: float) -> None:
        self.first_s = first_s
        self.cap_s = cap_s
        self.delay_s = first_s  # what the next sleep() waits

    def reset(self) -> None:
        """The call succeeded: the next failure waits ``first_s`` again."""
        self.delay_s = self.first_s

    async def sleep(self) -> None:
        """Wait the current delay, then double it (up to ``cap_s``) for the next time."""
        await asyncio.sleep(self.delay_s)
        self.delay_s = min(self.delay_s * 2, self.cap_s)
