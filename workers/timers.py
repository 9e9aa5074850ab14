"""Timer triggers: fire each tick of a cron schedule (with seconds, as SCF's timers) once,
whatever the number of trigger runners.

Every runner watches every enabled timer and fires each tick it sees come due; a tick's
request id is made from the trigger and the tick's time (``tick_request_id``), so the
asynchronous accept (``shared/asyncsubmit.py``) takes the first runner's and answers the
others ``duplicate``. No runner holds a lease to lose: when one dies the others keep
firing, without a gap. The tick then runs like any asynchronous invocation (retries,
dead letters).

Catch-up: a runner that starts and finds the trigger's last fired tick older than the
schedule's previous tick (no runner ran meanwhile) fires that previous tick once with
``catch_up: once``, and none with ``skip``.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import time

import structlog

from shared.errors import ImagefnError
from shared.triggers import Trigger, TriggerStore, next_fire, prev_fire
from workers.triggerinvoke import TriggerInvoker

log = structlog.get_logger("imagefn.triggers.timer")

# How often the list of triggers is read again (new, changed, disabled, deleted ones).
RELOAD_S = 1.0
# The longest sleep between looks at the clock.
MAX_SLEEP_S = 0.5


def tick_request_id(trigger: Trigger, tick: float) -> str:
    return f"timer-{trigger.function}-{trigger.name}-{int(tick * 1000)}"


def timer_event(trigger: Trigger, tick: float) -> bytes:
    """SCF's timer event."""
    when = datetime.datetime.fromtimestamp(tick, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    doc = {
        "Type": "Timer",
        "TriggerName": trigger.name,
        "Time": when,
        "Message": trigger.config.get("payload", ""),
    }
    return json.dumps(doc, separators=(",", ":")).encode()


class TimerRunner:
    def __init__(self, store: TriggerStore, invoker: TriggerInvoker) -> None:
        self._store = store
        self._invoker = invoker
        # trigger id → (the trigger as last read, its next tick)
        self._due: dict[str, tuple[Trigger, float]] = {}

    async def run(self, stop: asyncio.Event) -> None:
        loaded_at = 0.0
        while not stop.is_set():
            now = time.time()
            if now - loaded_at >= RELOAD_S:
                try:
                    await self._reload(now)
                except ImagefnError as e:
                    log.warning("timer_reload_failed", error=e.message)
                loaded_at = now
            await self._fire_due(time.time())
            soonest = min((due for _, due in self._due.values()), default=now + MAX_SLEEP_S)
            wait = max(0.0, min(MAX_SLEEP_S, soonest - time.time()))
            try:
                await asyncio.wait_for(stop.wait(), wait)
            except TimeoutError:
                pass

    async def _reload(self, now: float) -> None:
        timers = [t for t in await self._store.list() if t.type == "timer" and t.enabled]
        seen = {t.id for t in timers}
        for gone in set(self._due) - seen:
            del self._due[gone]
        for t in timers:
            known = self._due.get(t.id)
            if known is not None and known[0] == t:
                continue
            if known is None:
                await self._catch_up(t, now)
            self._due[t.id] = (t, next_fire(t.config["cron"], now))
            await self._store.note(t.id, next_fire_at=self._due[t.id][1])

    async def _catch_up(self, trigger: Trigger, now: float) -> None:
        state = await self._store.state(trigger.id)
        last = state.get("last_tick")
        if last is None or trigger.config.get("catch_up") != "once":
            return
        missed = prev_fire(trigger.config["cron"], now)
        if missed > float(last) + 0.5:
            log.info("timer_catch_up", trigger=trigger.id, tick=missed)
            await self._fire(trigger, missed)

    async def _fire_due(self, now: float) -> None:
        for tid, (trigger, due) in list(self._due.items()):
            if due > now:
                continue
            await self._fire(trigger, due)
            following = next_fire(trigger.config["cron"], max(due, now))
            self._due[tid] = (trigger, following)
            await self._store.note(tid, next_fire_at=following)

    async def _fire(self, trigger: Trigger, tick: float) -> None:
        rid = tick_request_id(trigger, tick)
        try:
            verdict = await self._invoker.submit(trigger, timer_event(trigger, tick), rid)
        except ImagefnError as e:
            log.warning("timer_fire_failed", trigger=trigger.id, tick=tick, error=e.message)
            await self._store.note(trigger.id, last_error=e.message, errors=1)
            return
        if verdict == "queued":
            log.info("timer_fired", trigger=trigger.id, request_id=rid, late_ms=_late(tick))
        await self._store.note(trigger.id, last_tick=tick, last_fired_at=tick)


def _late(tick: float) -> float:
    return round((time.time() - tick) * 1000, 1)
