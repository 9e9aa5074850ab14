"""What happens after an asynchronous attempt: a pure decision, tested without Redis.

Three kinds of failure, as SCF and Lambda treat them:

* the function's own (UserCodeError, FunctionTimeout, UserProcessExited, OutOfMemory, a
  crashed container, an oversized result, an HTTP answer of 400 or more): retried after
  growing delays, each retry counted against ``max_retries``;
* throttling and the platform's own (ConcurrencyLimitExceeded, ResourceLimitReached,
  ServiceUnavailable, InternalError, image pull and container start failures): retried
  with exponential backoff *without* using a retry, until ``max_event_age_s``;
* the caller's (InvalidRequest, FunctionNotFound, VersionNotFound, RequestTooLarge): no
  attempt can succeed, so dead-lettered at once.

An event whose next attempt would fall after ``accepted_at + max_event_age_s`` is not
retried: it ends ``expired`` (and is parked in the dead-letter queue like the others).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from shared.messages import Invocation, InvocationResult

Kind = Literal["ok", "user", "platform", "caller"]

USER_ERRORS = frozenset(
    {
        "UserCodeError",
        "FunctionTimeout",
        "UserProcessExited",
        "OutOfMemory",
        "ContainerStateExited",
        "ResultTooLarge",
        "RequestCanceled",
    }
)
CALLER_ERRORS = frozenset(
    {"InvalidRequest", "InvalidSpec", "FunctionNotFound", "VersionNotFound", "RequestTooLarge"}
)

# Terminal states of an asynchronous invocation.
SUCCEEDED = "succeeded"
DEAD_LETTERED = "dead-lettered"
EXPIRED = "expired"
CANCELLED = "cancelled"
TERMINAL = frozenset({SUCCEEDED, DEAD_LETTERED, EXPIRED, CANCELLED})


@dataclass(frozen=True)
class Delays:
    """Backoff settings (shared.settings.AsyncSettings), in seconds."""

    retry_base_s: float = 1.0
    retry_max_s: float = 300.0
    throttle_base_s: float = 0.5
    throttle_max_s: float = 60.0


@dataclass(frozen=True)
class Succeed:
    pass


@dataclass(frozen=True)
class Retry:
    due_at: float
    # True: a user-code failure, counted against max_retries.
    uses_retry: bool


@dataclass(frozen=True)
class GiveUp:
    state: str  # DEAD_LETTERED or EXPIRED
    reason: str


Decision = Succeed | Retry | GiveUp


def classify(result: InvocationResult) -> Kind:
    if result.error is None:
        return "user" if result.status >= 400 else "ok"
    kind = str(result.error.get("type", ""))
    if kind in USER_ERRORS:
        return "user"
    if kind in CALLER_ERRORS:
        return "caller"
    return "platform"


def failure_summary(result: InvocationResult) -> dict[str, str] | None:
    """The attempt's error as a record shows it (None for a success)."""
    if result.error is not None:
        return {
            "type": str(result.error.get("type", "InternalError")),
            "message": str(result.error.get("message", "")),
        }
    if result.status >= 400:
        return {"type": "UserCodeError", "message": f"the function answered HTTP {result.status}"}
    return None


def backoff_s(base_s: float, cap_s: float, n: int) -> float:
    """The delay before the ``n``-th retry (1-based): base, 2 base, 4 base ... capped."""
    return float(min(cap_s, base_s * 2 ** max(0, n - 1)))


def expired(inv: Invocation, now: float) -> bool:
    return now > inv.first_accepted_at + inv.age_limit_s


def decide(inv: Invocation, result: InvocationResult, now: float, delays: Delays) -> Decision:
    kind = classify(result)
    if kind == "ok":
        return Succeed()
    error = failure_summary(result) or {}
    what = f"{error.get('type')}: {error.get('message')}"
    if kind == "caller":
        return GiveUp(DEAD_LETTERED, f"not retryable ({what})")
    if kind == "user":
        if inv.retries >= inv.retry_limit:
            return GiveUp(
                DEAD_LETTERED, f"retries exhausted ({inv.retry_limit} retries); last: {what}"
            )
        due_at = now + backoff_s(delays.retry_base_s, delays.retry_max_s, inv.retries + 1)
        uses_retry = True
    else:
        due_at = now + backoff_s(delays.throttle_base_s, delays.throttle_max_s, inv.throttles + 1)
        uses_retry = False
    deadline = inv.first_accepted_at + inv.age_limit_s
    if due_at > deadline:
        return GiveUp(
            EXPIRED,
            f"max_event_age_s ({inv.age_limit_s} s) would pass before the next attempt; "
            f"last: {what}",
        )
    return Retry(due_at, uses_retry)


def next_attempt(inv: Invocation, decision: Retry) -> Invocation:
    """The invocation as it is scheduled for its next attempt."""
    return replace(
        inv,
        attempt=inv.attempt + 1,
        retries=inv.retries + (1 if decision.uses_retry else 0),
        throttles=inv.throttles + (0 if decision.uses_retry else 1),
        accepted_at=inv.first_accepted_at,
        call_id="",
    )
