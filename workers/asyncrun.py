"""How a worker runs an asynchronous invocation (``mode == "async"``): nobody waits for
the result, so the worker itself records it, schedules the retry or parks the dead
letter, and only then acknowledges the delivery.

Order, chosen so that nothing accepted is lost and nothing is counted twice
(docs/architecture.md, section 15):

1. ``begin`` — the attempt fence: a duplicate delivery (an attempt already finished, a
   retry released twice) stops here; a cancelled batch's item ends ``cancelled``;
2. too old (``max_event_age_s``) → expired, without running;
3. run it on the pool; ``shared.retry.decide`` says what follows;
4. the idempotent side effect: schedule the next attempt (``publish_at``: the same member
   however often) or park the dead letter (keyed by request id);
5. ``finish`` — the attempt, state, result, batch counters and line, destination outbox
   entry, atomically and once per attempt;
6. acknowledge. A crash anywhere before 6 redelivers; the fence makes the rerun harmless.

Redis or queue trouble in steps 1, 4 and 5 is retried with backoff for as long as the
worker runs (the delivery is not acknowledged meanwhile; if the worker stops, another
takes it over).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import structlog
from redis.exceptions import RedisError

from shared.backoff import Backoff
from shared.concurrency import ConcurrencyLimiter
from shared.deadletter import DeadLetters, entry_of
from shared.errors import FunctionNotFound, ImagefnError, InternalError
from shared.invocations import (
    InvocationLog,
    Outcome,
    attempt_doc,
    result_doc,
    result_value,
)
from shared.messages import BatchResultLine, Invocation, InvocationResult
from shared.queue.base import MAX_ATTEMPTS, Delivery, InvocationPublisher
from shared.registry import FunctionRegistry
from shared.retry import (
    DEAD_LETTERED,
    EXPIRED,
    SUCCEEDED,
    Decision,
    Delays,
    GiveUp,
    Retry,
    decide,
    expired,
    failure_summary,
    next_attempt,
)
from shared.settings import AsyncSettings
from shared.spec import Destination

log = structlog.get_logger("imagefn.worker")

T = TypeVar("T")
Invoke = Callable[[Invocation], Awaitable[InvocationResult]]


def delays_of(s: AsyncSettings) -> Delays:
    return Delays(
        retry_base_s=s.retry_base_delay_s,
        retry_max_s=s.retry_max_delay_s,
        throttle_base_s=s.throttle_base_delay_s,
        throttle_max_s=s.throttle_max_delay_s,
    )


def destination_for(inv: Invocation, succeeded: bool) -> Destination | None:
    d = inv.record.spec.destinations
    return d.on_success if succeeded else d.on_failure


def destination_record(
    inv: Invocation, state: str, result: InvocationResult | None, error: Any, now: float
) -> dict[str, Any]:
    """What a destination receives (the dispatcher adds the attempts from the record)."""
    doc: dict[str, Any] = {
        "request_id": inv.request_id,
        "function": inv.function,
        "version": inv.record.version,
        "qualifier": inv.qualifier,
        "status": state,
        "attempt_count": inv.attempt,
        "timestamps": {"accepted_at": inv.first_accepted_at, "finished_at": now},
    }
    if state == SUCCEEDED and result is not None:
        doc["result"] = result_value(result)
    else:
        doc["error"] = error
    if inv.batch:
        doc.update(batch=inv.batch, index=inv.index)
    return doc


class AsyncRunner:
    def __init__(
        self,
        worker_id: str,
        queue: InvocationPublisher,
        invocations: InvocationLog,
        dead_letters: DeadLetters,
        settings: AsyncSettings,
        limiter: ConcurrencyLimiter,
        registry: FunctionRegistry,
        slot_grace_s: float,
    ) -> None:
        self._worker = worker_id
        self._queue = queue
        self._log = invocations
        self._dlq = dead_letters
        self._delays = delays_of(settings)
        self._limiter = limiter
        self._registry = registry
        # A slot lapses at its deadline even if this worker dies holding it: the
        # function's timeouts plus this (image pull, queueing).
        self._slot_grace_s = slot_grace_s

    async def run(self, d: Delivery, invoke: Invoke, ack: Callable[[], Awaitable[None]]) -> None:
        inv = d.invocation
        verdict = await self._retrying("begin", lambda: self._log.begin(inv, self._worker))
        if verdict != "run":
            log.info("async_not_run", verdict=verdict, attempt=inv.attempt)
            await ack()
            return
        started = time.time()
        result: InvocationResult
        decision: Decision
        ran = False
        if expired(inv, started):
            result = InvocationResult.failure(
                inv.request_id, InternalError("not run: older than max_event_age_s")
            )
            decision = GiveUp(
                EXPIRED, f"max_event_age_s ({inv.age_limit_s} s) passed before it could run"
            )
        elif not await self._function_exists(inv):
            result = InvocationResult.failure(
                inv.request_id, FunctionNotFound(f"function {inv.function} was deleted")
            )
            decision = GiveUp(DEAD_LETTERED, "the function was deleted before it ran")
        elif d.attempt > MAX_ATTEMPTS:
            result = InvocationResult.failure(
                inv.request_id, InternalError(f"abandoned after {d.attempt} deliveries")
            )
            decision = GiveUp(DEAD_LETTERED, "it crashed every worker that ran it")
        else:
            result = await self._invoke_within_limit(inv, invoke)
            decision = decide(inv, result, time.time(), self._delays)
            ran = True
        finished = time.time()
        attempt = attempt_doc(inv, result, started, finished)
        if not ran:
            attempt["ran"] = False
        outcome = await self._outcome(inv, result, decision, attempt, finished)
        wrote = await self._retrying("finish", lambda: self._log.finish(inv, outcome))
        log.info(
            "async_attempt_done",
            attempt=inv.attempt,
            state=outcome.state,
            error=(attempt["error"] or {}).get("type"),
            duplicate=not wrote,
            next_at=outcome.next_at,
        )
        await ack()

    async def _function_exists(self, inv: Invocation) -> bool:
        """A deleted function's accepted events are dead-lettered, not run (nor lost).
        Answered from a short cache: one Redis read per function and second at most."""
        try:
            await self._retrying("resolve", lambda: self._registry.resolve(inv.function))
        except FunctionNotFound:
            return False
        return True

    async def _invoke_within_limit(self, inv: Invocation, invoke: Invoke) -> InvocationResult:
        """Run it, holding one of the function's ``max_concurrency`` slots (the same slots
        synchronous calls take at the gateway). No slot: ConcurrencyLimitExceeded, which
        ``decide`` retries with backoff without using a retry."""
        spec = inv.record.spec
        if not spec.max_concurrency:
            return await invoke(inv)
        deadline = time.time() + spec.timeout_s + spec.init_timeout_s + self._slot_grace_s
        try:
            slot = await self._limiter.acquire(inv.function, spec.max_concurrency, deadline)
        except ImagefnError as e:
            return InvocationResult.failure(inv.request_id, e)
        try:
            return await invoke(inv)
        finally:
            await self._limiter.release(inv.function, slot)

    async def _outcome(
        self,
        inv: Invocation,
        result: InvocationResult,
        decision: Decision,
        attempt: dict[str, Any],
        now: float,
    ) -> Outcome:
        if isinstance(decision, Retry):
            nxt = next_attempt(inv, decision)
            await self._retrying(
                "schedule_retry", lambda: self._queue.publish_at(nxt, decision.due_at)
            )
            return Outcome(attempt=attempt, state="retrying", next_at=decision.due_at)
        if isinstance(decision, GiveUp):
            error = failure_summary(result) or {"type": "InternalError", "message": ""}
            earlier = await self._retrying(
                "read_attempts", lambda: self._log.attempts(inv.request_id)
            )
            entry = entry_of(inv, decision.state, decision.reason, [*earlier, attempt], now)
            await self._retrying("park", lambda: self._dlq.park(entry))
            line = BatchResultLine(
                inv.index, inv.request_id, "failed", error={**error, "reason": decision.reason}
            )
            dest = destination_for(inv, succeeded=False)
            return Outcome(
                attempt=attempt,
                state=decision.state,
                reason=decision.reason,
                batch_counter="failed" if inv.batch else "",
                batch_line=line if inv.batch else None,
                destination=dest.to_dict() if dest else None,
                destination_record=(
                    destination_record(inv, decision.state, None, error, now) if dest else None
                ),
            )
        line = BatchResultLine(inv.index, inv.request_id, SUCCEEDED, result_value(result))
        dest = destination_for(inv, succeeded=True)
        return Outcome(
            attempt=attempt,
            state=SUCCEEDED,
            result=result_doc(result),
            batch_counter="succeeded" if inv.batch else "",
            batch_line=line if inv.batch else None,
            destination=dest.to_dict() if dest else None,
            destination_record=(
                destination_record(inv, SUCCEEDED, result, None, now) if dest else None
            ),
        )

    async def _retrying(self, step: str, fn: Callable[[], Awaitable[T]]) -> T:
        """Run ``fn`` until Redis (or the queue) answers; the delivery stays unacknowledged
        meanwhile. Cancellation (worker shutdown) ends the wait."""
        backoff = Backoff(0.05, 2.0)
        while True:
            try:
                return await fn()
            except (RedisError, ImagefnError, OSError) as e:
                if isinstance(e, ImagefnError) and e.http_status < 500:
                    raise
                log.warning("async_step_failed", step=step, error=str(e))
                await backoff.sleep()
