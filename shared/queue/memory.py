"""In-memory queue backend, for unit tests only: one process, no durability.

It keeps the interface's promises within a process (claims, reclaim after idle time,
results delivered before acknowledgement) so worker and gateway logic can be tested
without Redis.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass

from shared.messages import Invocation, InvocationResult
from shared.queue.base import Delivery, InvocationQueue


@dataclass
class _Pending:
    invocation: Invocation
    consumer: str
    claimed_at: float
    attempt: int


class MemoryQueue(InvocationQueue):
    def __init__(self, reclaim_idle_s: float = 15.0) -> None:
        self._reclaim_idle_s = reclaim_idle_s
        self._new: asyncio.Queue[tuple[str, Invocation]] = asyncio.Queue()
        self._pending: dict[str, _Pending] = {}
        super().__init__()
        self._ids = itertools.count(1)
        self.results: list[InvocationResult] = []
        # Delayed invocations: (request id, attempt) → (due time, invocation).
        self._delayed: dict[tuple[str, int], tuple[float, Invocation]] = {}

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        self._cancel_waiters()

    async def publish(self, invocation: Invocation, worker: str | None = None) -> None:
        # One process: every consumer is "the" worker, so the target changes nothing.
        await self._new.put((str(next(self._ids)), invocation))

    async def publish_at(self, invocation: Invocation, due_at: float) -> None:
        self._delayed[(invocation.request_id, invocation.attempt)] = (due_at, invocation)

    async def release_due(self, now: float, max_count: int) -> int:
        due = sorted(
            (item for item in self._delayed.items() if item[1][0] <= now),
            key=lambda item: item[1][0],
        )[:max_count]
        for key, (_, inv) in due:
            del self._delayed[key]
            await self.publish(inv)
        return len(due)

    @property
    def delayed_count(self) -> int:
        return len(self._delayed)

    def reply_address(self) -> str:
        return "memory"

    async def consume(self, consumer: str, max_count: int, block_s: float) -> list[Delivery]:
        out: list[Delivery] = []
        try:
            receipt, inv = await asyncio.wait_for(self._new.get(), block_s)
        except TimeoutError:
            return out
        while True:
            self._pending[receipt] = _Pending(inv, consumer, time.monotonic(), 1)
            out.append(Delivery(inv, receipt, 1))
            if len(out) >= max_count or self._new.empty():
                return out
            receipt, inv = self._new.get_nowait()

    async def reclaim(self, consumer: str, max_count: int) -> list[Delivery]:
        now = time.monotonic()
        out: list[Delivery] = []
        for receipt, p in self._pending.items():
            if len(out) >= max_count:
                break
            if now - p.claimed_at >= self._reclaim_idle_s:
                p.consumer, p.claimed_at, p.attempt = consumer, now, p.attempt + 1
                out.append(Delivery(p.invocation, receipt, p.attempt))
        return out

    async def keep_alive(self, consumer: str, deliveries: list[Delivery]) -> None:
        now = time.monotonic()
        for d in deliveries:
            p = self._pending.get(d.receipt)
            if p is not None:
                p.consumer, p.claimed_at = consumer, now

    async def finish(self, delivery: Delivery, result: InvocationResult | None) -> None:
        if result is not None:
            self.results.append(result)
            self._resolve(delivery.invocation.call_id, result)
        self._pending.pop(delivery.receipt, None)

    @property
    def pending_count(self) -> int:
        return len(self._pending) + self._new.qsize()
