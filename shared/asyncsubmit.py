"""Accepting one asynchronous invocation: the record is created (``accepting``), the
invocation published, then marked ``queued`` — the one sequence every producer of async
work follows: the gateway (``X-Imagefn-Invocation-Type: Event``) and the trigger runners
(timers, object-storage events).

Accepted means durably enqueued. When the publish fails the record is forgotten, so a
retry with the same request id is enqueued rather than taken for a duplicate; a request
id accepted before answers ``duplicate`` and is not enqueued twice, which is also how a
timer tick fired by two runners runs once.
"""

from __future__ import annotations

import contextlib
import time
from typing import Literal

from redis.exceptions import RedisError

from shared.errors import RequestIdConflict, ServiceUnavailable
from shared.invocations import InvocationLog
from shared.messages import Invocation
from shared.queue.base import InvocationPublisher
from shared.registry import LATEST
from shared.spec import FunctionRecord

Verdict = Literal["queued", "duplicate"]


def async_invocation(
    record: FunctionRecord,
    qualifier: str,
    body: bytes,
    request_id: str,
    owner: str,
    now: float | None = None,
) -> Invocation:
    now = time.time() if now is None else now
    return Invocation(
        request_id=request_id,
        record=record,
        kind="event",
        body=body,
        deadline=0.0,  # nobody waits; max_event_age_s bounds it instead
        enqueued_at=now,
        version=LATEST if qualifier in ("", LATEST) else str(record.version),
        mode="async",
        accepted_at=now,
        qualifier=qualifier,
        owner=owner,
    )


async def submit_async(
    records: InvocationLog,
    queue: InvocationPublisher,
    inv: Invocation,
    worker: str | None = None,
) -> Verdict:
    """Accept ``inv``: "queued" once it is in the queue, "duplicate" when its request id
    was accepted before; RequestIdConflict when the id is another caller's,
    ServiceUnavailable when another call is accepting it right now or Redis fails."""
    try:
        verdict = await records.accept(inv)
    except RedisError as e:
        raise ServiceUnavailable(f"invocation records unavailable: {e}") from e
    if verdict == "duplicate":
        return "duplicate"
    if verdict == "conflict":
        raise RequestIdConflict(
            f"request id {inv.request_id} belongs to another caller's invocation; "
            "choose another X-Request-Id (or send none)"
        )
    if verdict == "busy":
        raise ServiceUnavailable(
            f"request id {inv.request_id} is being accepted by another call; try again shortly"
        )
    try:
        await queue.publish(inv, worker)
    except BaseException:
        with contextlib.suppress(RedisError):
            await records.forget(inv.request_id)
        raise
    with contextlib.suppress(RedisError):
        # Only a label for readers: the worker begins from "accepting" just as well.
        await records.queued(inv.request_id)
    return "queued"
