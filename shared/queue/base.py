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
* ``publish``/``call`` may name a ``worker``: the invocation is then meant for that worker
  (it holds a warm instance), which takes it before shared work; if that worker dies, a
  live one takes it over like any other claim. Where the backend needs to know how the
  workers read (Kafka: which partitions each owns), a worker's ``consumer_info()`` goes
  into its heartbeat and the gateways hand every live worker's to ``learn_consumers``.
  Routing is best effort; delivery is not.
* ``publish_many`` is ``publish`` for several invocations at once (batches): it returns
  only once every one of them is durably accepted; on failure some may have been.
* Delayed delivery: ``publish_at(inv, due_at)`` keeps an invocation out of every
  consumer's reach until ``due_at`` (epoch seconds); returns once durably kept.
  ``release_due(now, max_count)`` (called by the one scheduler holding the lease) moves up
  to ``max_count`` invocations due by ``now`` into the queue and returns how many. An
  invocation kept once with one (request id, attempt) is kept once however often it is
  published (a duplicate delivery that schedules the same retry again changes nothing).
  Moving is at least once: a release that dies midway may deliver an invocation twice,
  never lose it (the Redis backend moves atomically; Kafka cannot).
* ``Delivery.attempt`` counts deliveries as far as the backend knows them (Redis counts
  exactly; Kafka can only say "may have been delivered before"); the worker answers an
  invocation past ``MAX_ATTEMPTS`` with an error instead of running it again.

Callers never see backend types: only ``Invocation``, ``InvocationResult`` and
``Delivery``; and every failure to reach the backend is ``QueueUnavailable`` (a
``ServiceUnavailable``), never the client library's exception
(``raising_queue_unavailable``).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, ParamSpec, Protocol, TypeVar

from shared.errors import QueueUnavailable
from shared.messages import Invocation, InvocationResult

# An invocation handed out this many times has crashed workers repeatedly; stop retrying.
MAX_ATTEMPTS = 5


P = ParamSpec("P")
R = TypeVar("R")


def raising_queue_unavailable(
    *client_errors: type[BaseException],
) -> Callable[[Callable[P, Coroutine[Any, Any, R]]], Callable[P, Coroutine[Any, Any, R]]]:
    """Decorates a backend method so that its client's errors (``client_errors``) leave
    it as ``QueueUnavailable``, naming the cause."""

    def wrap(fn: Callable[P, Coroutine[Any, Any, R]]) -> Callable[P, Coroutine[Any, Any, R]]:
        @functools.wraps(fn)
        async def inner(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return await fn(*args, **kwargs)
            except client_errors as e:
                raise QueueUnavailable(f"queue unavailable: {e or type(e).__name__}") from e

        return inner

    return wrap


class InvocationPublisher(Protocol):
    """The producer side of the queue: what gateways use (publish, call), and the
    scheduler and a worker scheduling a retry (publish_at, release_due, publish_many).
    Code that only produces is typed against this, so it cannot consume."""

    async def publish(self, invocation: Invocation, worker: str | None = None) -> None: ...
    async def publish_many(self, invocations: Sequence[Invocation]) -> None: ...
    async def publish_at(self, invocation: Invocation, due_at: float) -> None: ...
    async def release_due(self, now: float, max_count: int) -> int: ...
    async def call(
        self, invocation: Invocation, timeout_s: float, worker: str | None = None
    ) -> InvocationResult | None: ...
    def reply_address(self) -> str: ...
    def learn_consumers(self, infos: Mapping[str, Mapping[str, Any]]) -> None: ...


class InvocationConsumer(Protocol):
    """The consumer side of the queue: what a worker's loops use."""

    def consumer_info(self) -> dict[str, Any]: ...
    async def consume(self, consumer: str, max_count: int, block_s: float) -> list[Delivery]: ...
    async def reclaim(self, consumer: str, max_count: int) -> list[Delivery]: ...
    async def keep_alive(self, consumer: str, deliveries: list[Delivery]) -> None: ...
    async def finish(self, delivery: Delivery, result: InvocationResult | None) -> None: ...


@dataclass(frozen=True)
class Delivery:
    invocation: Invocation
    # Backend handle that identifies this delivery for keep_alive/finish.
    receipt: str
    # How many times the backend has handed this invocation out (1 on first delivery).
    attempt: int = 1


class InvocationQueue(ABC):
    """Abstract base of every queue backend; see the module text for its promises. A
    backend is both an ``InvocationPublisher`` and an ``InvocationConsumer``; it is opened
    and closed by whoever owns it (the process's composition root).

    ``call`` is implemented here once: a backend delivers a result to the waiting call by
    handing it to ``_resolve`` with the invocation's ``call_id``.
    """

    def __init__(self) -> None:
        self._waiters: dict[str, asyncio.Future[InvocationResult]] = {}
        # Call ids: a random prefix per queue object and a counter, not a uuid4 per call
        # (an os.urandom system call each; issue 12). Unique within this process by the
        # counter, and across gateways (a Kafka reply partition may be shared) by the
        # 64 random bits of the prefix.
        self._call_prefix = uuid.uuid4().hex[:16]
        self._call_seq = itertools.count(1)

    async def call(
        self, invocation: Invocation, timeout_s: float, worker: str | None = None
    ) -> InvocationResult | None:
        """Publish ``invocation`` (whose reply_to is ``reply_address()``) and wait for its
        result up to ``timeout_s``; None when none arrived in time."""
        await self._before_call()
        # A fresh id per call: the result finds exactly this caller, even when two
        # callers chose the same request id.
        call_id = f"{self._call_prefix}{next(self._call_seq):x}"
        fut: asyncio.Future[InvocationResult] = asyncio.get_running_loop().create_future()
        # Register before publishing: a fast worker may answer before publish returns.
        self._waiters[call_id] = fut
        try:
            await self.publish(replace(invocation, call_id=call_id), worker)
            return await asyncio.wait_for(fut, timeout_s)
        except TimeoutError:
            return None
        finally:
            self._waiters.pop(call_id, None)

    async def _before_call(self) -> None:  # noqa: B027 - an optional hook, empty by default
        """Hook: start whatever receives results (a reader task), once."""

    def _resolve(self, call_id: str, result: InvocationResult) -> None:
        """Hand a result to its waiting call; late or duplicate results are dropped."""
        fut = self._waiters.get(call_id)
        if fut is not None and not fut.done():
            fut.set_result(result)

    def _cancel_waiters(self) -> None:
        for fut in self._waiters.values():
            if not fut.done():
                fut.cancel()
        self._waiters.clear()

    @abstractmethod
    async def open(self) -> None:
        """Connect and create what the backend needs (streams, groups, readers)."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections and stop readers; idempotent."""

    # -- producer side (gateways) ----------------------------------------------------------

    @abstractmethod
    async def publish(self, invocation: Invocation, worker: str | None = None) -> None:
        """Accept an invocation durably; nobody waits for its result here."""

    async def publish_many(self, invocations: Sequence[Invocation]) -> None:
        """Accept several invocations durably (backends send them in one round trip)."""
        for inv in invocations:
            await self.publish(inv)

    @abstractmethod
    async def publish_at(self, invocation: Invocation, due_at: float) -> None:
        """Keep ``invocation`` durably until ``due_at`` (epoch seconds), then it is
        delivered like a published one (released by ``release_due``)."""

    @abstractmethod
    async def release_due(self, now: float, max_count: int) -> int:
        """Move up to ``max_count`` invocations due by ``now`` into the queue; how many."""

    @abstractmethod
    def reply_address(self) -> str:
        """Where results for this process's ``call``s are delivered (goes in ``reply_to``)."""

    def learn_consumers(self, infos: Mapping[str, Mapping[str, Any]]) -> None:  # noqa: B027
        """Gateways: every live worker's ``consumer_info()`` (worker id → report), as its
        heartbeat carries it, refreshed by the router. Backends that route by queue
        layout (Kafka: partitions) use it in ``publish``; the default ignores it."""

    # -- consumer side (workers) -----------------------------------------------------------

    def consumer_info(self) -> dict[str, Any]:
        """Workers: what gateways need to know about how this consumer reads (Kafka: its
        assigned partitions), sent in the worker's heartbeat as ``"queue"``; JSON-able.
        Empty by default."""
        return {}

    @abstractmethod
    async def consume(self, consumer: str, max_count: int, block_s: float) -> list[Delivery]:
        """Take up to ``max_count`` new invocations (one more at most, when reading from
        several sources), waiting up to ``block_s`` for one."""

    @abstractmethod
    async def reclaim(self, consumer: str, max_count: int) -> list[Delivery]:
        """Take over invocations whose owner stopped refreshing its claim."""

    @abstractmethod
    async def keep_alive(self, consumer: str, deliveries: list[Delivery]) -> None:
        """Refresh this consumer's claim on invocations it is still working on."""

    @abstractmethod
    async def finish(self, delivery: Delivery, result: InvocationResult | None) -> None:
        """Deliver ``result`` to the invocation's reply_to (if any), then acknowledge."""
