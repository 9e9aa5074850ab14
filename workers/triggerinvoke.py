"""How a trigger runner invokes its function: through the queue, as the gateway does.

* ``submit`` — asynchronously (timers, object-storage events: SCF runs those async), with
  the retries, dead letters and destinations of any async call. Request ids are chosen by
  the caller so that the same event submitted twice (two runners, a redelivery) is
  accepted once (``shared/asyncsubmit.py``).
* ``call`` — synchronously (Kafka batches: the next batch of a partition waits for this
  one's answer); the result, or the platform error as an ``InvocationResult.error``.

Invocations carry the owner ``trigger/{function}/{name}``: their records are readable by
admins (the trigger has no API key of its own).
"""

from __future__ import annotations

import time

from shared.asyncsubmit import Verdict, async_invocation, submit_async
from shared.errors import FunctionTimeout, ImagefnError
from shared.invocations import InvocationLog
from shared.messages import Invocation, InvocationResult
from shared.queue.base import InvocationQueue
from shared.registry import LATEST, FunctionRegistry
from shared.settings import Settings
from shared.triggers import Trigger


def owner_of(trigger: Trigger) -> str:
    return f"trigger/{trigger.id}"


class TriggerInvoker:
    def __init__(
        self,
        queue: InvocationQueue,
        registry: FunctionRegistry,
        records: InvocationLog,
        settings: Settings,
    ) -> None:
        self._queue = queue
        self._registry = registry
        self._records = records
        self._settings = settings

    async def submit(self, trigger: Trigger, body: bytes, request_id: str) -> Verdict:
        """Accept one asynchronous invocation of the trigger's function and qualifier."""
        record = await self._registry.resolve(trigger.function, trigger.qualifier)
        inv = async_invocation(record, trigger.qualifier, body, request_id, owner_of(trigger))
        return await submit_async(self._records, self._queue, inv)

    async def call(self, trigger: Trigger, body: bytes, request_id: str) -> InvocationResult:
        """One synchronous invocation; platform failures come back as ``error``."""
        try:
            record = await self._registry.resolve(trigger.function, trigger.qualifier)
        except ImagefnError as e:
            return InvocationResult(request_id=request_id, status=e.http_status, error=e.to_dict())
        spec = record.spec
        wait_s = (
            spec.timeout_s
            + spec.init_timeout_s
            + self._settings.registry.pull_timeout_s
            + self._settings.gateway.result_grace_s
        )
        inv = Invocation(
            request_id=request_id,
            record=record,
            kind="event",
            body=body,
            deadline=time.time() + wait_s,
            reply_to=self._queue.reply_address(),
            version=LATEST if trigger.qualifier == LATEST else str(record.version),
            owner=owner_of(trigger),
        )
        try:
            result = await self._queue.call(inv, wait_s, None)
        except ImagefnError as e:
            return InvocationResult(request_id=request_id, status=e.http_status, error=e.to_dict())
        if result is None:
            err = FunctionTimeout(f"no result for {trigger.function} within {wait_s:g} s")
            return InvocationResult(request_id=request_id, status=504, error=err.to_dict())
        return result
