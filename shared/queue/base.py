"""The one queue interface between gateways and workers.

Gateways put invocations on the queue and wait for their results; workers take
invocations, run them and hand results back. Every backend (Redis Streams now, Kafka next)
implements ``InvocationQueue`` and keeps these promises:

* ``publish`` returns only once the invocation is durably accepted by the backend.
* Delivery is at least once: an invocation taken by ``consume`` stays owned by that
  consumer until ``finish``; if the consumer stops refreshing its claim (``keep_alive``)
  for longer than the backend's reclaim idle time, ``reclaim`` hands it to another
  consumer. A worker therefore may see an invocation twice; the waiting gateway takes the
  first result and ignores the rest.
* ``finish`` delivers the result to the invocation's ``reply_to`` (if any) *before* the
  invocation is acknowledged, so a crash between the two redelivers rather than loses.
* ``call`` publishes and waits for the result; ``None`` means no result arrived in time.

Callers never see backend types: only ``Invocation``, ``InvocationResult`` and
``Delivery``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from shared.messages import Invocation, InvocationResult


@dataclass(frozen=True)
class Delivery:
    invocation: Invocation
    # Backend handle that identifies this delivery for keep_alive/finish.
    receipt: str
    # How many times the backend has handed this invocation out (1 on first delivery).
    attempt: int = 1


class InvocationQueue(ABC):
    """Abstract base of every queue backend; see the module text for its promises."""

    @abstractmethod
    async def open(self) -> None:
        """Connect and create what the backend needs (streams, groups, readers)."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections and stop readers; idempotent."""

    # -- producer side (gateways) ----------------------------------------------------------

    @abstractmethod
    async def publish(self, invocation: Invocation) -> None:
        """Accept an invocation durably; nobody waits for its result here."""

    @abstractmethod
    def reply_address(self) -> str:
        """Where results for this process's ``call``s are delivered (goes in ``reply_to``)."""

    @abstractmethod
    async def call(self, invocation: Invocation, timeout_s: float) -> InvocationResult | None:
        """Publish ``invocation`` (whose reply_to is ``reply_address()``) and wait for its
        result up to ``timeout_s``; None when none arrived in time."""

    # -- consumer side (workers) -----------------------------------------------------------

    @abstractmethod
    async def consume(self, consumer: str, max_count: int, block_s: float) -> list[Delivery]:
        """Take up to ``max_count`` new invocations, waiting up to ``block_s`` for one."""

    @abstractmethod
    async def reclaim(self, consumer: str, max_count: int) -> list[Delivery]:
        """Take over invocations whose owner stopped refreshing its claim."""

    @abstractmethod
    async def keep_alive(self, consumer: str, deliveries: list[Delivery]) -> None:
        """Refresh this consumer's claim on invocations it is still working on."""

    @abstractmethod
    async def finish(self, delivery: Delivery, result: InvocationResult | None) -> None:
        """Deliver ``result`` to the invocation's reply_to (if any), then acknowledge."""
