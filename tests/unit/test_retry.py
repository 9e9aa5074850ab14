"""shared.retry: what follows an asynchronous attempt (pure; no Redis)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from shared.errors import (
    ConcurrencyLimitExceeded,
    FunctionNotFound,
    FunctionTimeout,
    ImagefnError,
    InvalidRequest,
    OutOfMemory,
    PullImageFailed,
    ServiceUnavailable,
    UserCodeError,
    UserProcessExited,
)
from shared.messages import Invocation, InvocationResult
from shared.retry import (
    DEAD_LETTERED,
    EXPIRED,
    Delays,
    GiveUp,
    Retry,
    Succeed,
    backoff_s,
    classify,
    decide,
    expired,
    failure_summary,
    next_attempt,
)

from .helpers import make_invocation, make_record

NOW = 1_800_000_000.0
DELAYS = Delays(retry_base_s=1.0, retry_max_s=300.0, throttle_base_s=0.5, throttle_max_s=60.0)


def async_inv(**kw: object) -> Invocation:
    inv = make_invocation(make_record(), deadline_in_s=None, mode="async", accepted_at=NOW)
    return replace(inv, **kw)  # type: ignore[arg-type]


def failed(err: ImagefnError) -> InvocationResult:
    return InvocationResult.failure("r", err)


@pytest.mark.parametrize(
    ("result", "kind"),
    [
        (InvocationResult("r", status=200), "ok"),
        (InvocationResult("r", status=302), "ok"),
        (InvocationResult("r", status=404), "user"),
        (InvocationResult("r", status=500), "user"),
        (failed(UserCodeError("x")), "user"),
        (failed(FunctionTimeout("x")), "user"),
        (failed(OutOfMemory("x")), "user"),
        (failed(UserProcessExited("x")), "user"),
        (failed(ConcurrencyLimitExceeded("x")), "platform"),
        (failed(ServiceUnavailable("x")), "platform"),
        (failed(PullImageFailed("x")), "platform"),
        (failed(InvalidRequest("x")), "caller"),
        (failed(FunctionNotFound("x")), "caller"),
    ],
)
def test_classify(result: InvocationResult, kind: str) -> None:
    assert classify(result) == kind


def test_success_is_final() -> None:
    assert decide(async_inv(), InvocationResult("r"), NOW, DELAYS) == Succeed()


def test_user_errors_retry_at_growing_delays_then_dead_letter() -> None:
    inv = async_inv()
    assert inv.retry_limit == 2  # SCF's default
    dues = []
    for _ in range(2):
        d = decide(inv, failed(UserCodeError("bug")), NOW, DELAYS)
        assert isinstance(d, Retry) and d.uses_retry
        dues.append(d.due_at - NOW)
        inv = next_attempt(inv, d)
    assert dues == [1.0, 2.0]
    assert (inv.attempt, inv.retries, inv.throttles) == (3, 2, 0)
    last = decide(inv, failed(UserCodeError("bug")), NOW, DELAYS)
    assert isinstance(last, GiveUp) and last.state == DEAD_LETTERED
    assert "retries exhausted (2 retries)" in last.reason and "UserCodeError: bug" in last.reason


def test_no_retries_means_one_attempt() -> None:
    inv = async_inv(max_retries=0)
    d = decide(inv, InvocationResult("r", status=500), NOW, DELAYS)
    assert isinstance(d, GiveUp) and d.state == DEAD_LETTERED


def test_throttling_is_retried_without_using_a_retry() -> None:
    inv = async_inv(max_retries=0)
    gaps = []
    for _ in range(4):
        d = decide(inv, failed(ConcurrencyLimitExceeded("busy")), NOW, DELAYS)
        assert isinstance(d, Retry) and not d.uses_retry
        gaps.append(d.due_at - NOW)
        inv = next_attempt(inv, d)
    assert gaps == [0.5, 1.0, 2.0, 4.0]
    assert (inv.retries, inv.throttles) == (0, 4)


def test_platform_retries_stop_when_the_event_would_be_too_old() -> None:
    inv = async_inv(max_event_age_s=60)
    late = NOW + 59.8
    d = decide(inv, failed(ServiceUnavailable("down")), late, DELAYS)
    assert isinstance(d, GiveUp) and d.state == EXPIRED
    assert "max_event_age_s (60 s)" in d.reason


def test_caller_errors_are_dead_lettered_at_once() -> None:
    d = decide(async_inv(), failed(FunctionNotFound("gone")), NOW, DELAYS)
    assert isinstance(d, GiveUp) and d.state == DEAD_LETTERED
    assert d.reason.startswith("not retryable")


def test_backoff_is_capped() -> None:
    assert [backoff_s(1, 5, n) for n in (1, 2, 3, 4, 10)] == [1, 2, 4, 5, 5]


def test_expiry_counts_from_first_acceptance() -> None:
    inv = async_inv(max_event_age_s=60)
    assert not expired(inv, NOW + 60)
    assert expired(inv, NOW + 60.1)
    # A retry keeps the first acceptance time.
    d = decide(inv, failed(UserCodeError("x")), NOW + 10, DELAYS)
    assert isinstance(d, Retry)
    assert next_attempt(inv, d).first_accepted_at == NOW


def test_failure_summary_names_http_failures() -> None:
    assert failure_summary(InvocationResult("r", status=200)) is None
    assert failure_summary(InvocationResult("r", status=503)) == {
        "type": "UserCodeError",
        "message": "the function answered HTTP 503",
    }
    assert failure_summary(failed(FunctionTimeout("slow"))) == {
        "type": "FunctionTimeout",
        "message": "slow",
    }


def test_async_fields_cross_the_queue() -> None:
    inv = async_inv(attempt=3, retries=1, throttles=1, batch="b-1", index=7, qualifier="prod")
    again = Invocation.decode({k.encode(): v for k, v in inv.encode().items()})
    assert again == inv
    sync = make_invocation(make_record())
    assert b"attempt" not in sync.encode()["m"]  # the synchronous path carries none
