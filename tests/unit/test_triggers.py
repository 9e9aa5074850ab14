"""Triggers: validation of every field, cron schedules with seconds, the timer event and
request ids, and the timer runner's due ticks and catch-up (over fakes)."""

from __future__ import annotations

import datetime
import json
from typing import Any

import pytest

from shared.errors import InvalidRequest
from shared.triggers import (
    RUNNABLE_TYPES,
    Trigger,
    _cos_config,
    _kafka_config,
    next_fire,
    parse_trigger,
    prev_fire,
)
from workers.timers import TimerRunner, tick_request_id, timer_event

T0 = datetime.datetime(2026, 12, 3, 10, 0, 0, tzinfo=datetime.UTC).timestamp()
NOON_2027 = datetime.datetime(2027, 1, 1, 12, tzinfo=datetime.UTC).timestamp()


def fields_of(doc: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(InvalidRequest) as e:
        parse_trigger("fn", doc)
    fields: dict[str, str] = e.value.details["fields"]
    return fields


def test_a_timer_with_defaults() -> None:
    t = parse_trigger("fn", {"name": "nightly", "type": "timer", "cron": "0 0 2 * * *"}, now=T0)
    assert t == Trigger(
        function="fn",
        name="nightly",
        type="timer",
        config={"cron": "0 0 2 * * *", "payload": "", "catch_up": "skip"},
        created_at=T0,
        updated_at=T0,
    )
    assert Trigger.from_json(t.to_json()) == t and t.id == "fn/nightly"


def test_every_bad_field_is_named_at_once() -> None:
    fields = fields_of(
        {
            "name": "1bad",
            "type": "timer",
            "cron": "* * *",
            "catch_up": "later",
            "payload": 5,
            "qualifier": "a/b",
            "enabled": "yes",
            "topic": "t",
        }
    )
    assert set(fields) == {"name", "cron", "catch_up", "payload", "qualifier", "enabled", "topic"}
    assert "6 or 7" in fields["cron"]
    assert "type" in fields_of({"name": "x", "type": "webhook"})
    with pytest.raises(InvalidRequest):
        parse_trigger("fn", ["not", "a", "mapping"])


def test_types_not_runnable_yet_are_refused_after_a_full_check() -> None:
    for ttype in ("kafka", "cos"):
        if ttype in RUNNABLE_TYPES:
            continue
        fields = fields_of({"name": "x", "type": ttype})
        assert "not built yet" in fields["type"]


def test_kafka_and_cos_configuration_checks() -> None:
    errors: dict[str, str] = {}
    _kafka_config({"topic": "orders", "batch_size": 1001, "start": "middle"}, errors)
    assert set(errors) == {"batch_size", "start"}
    errors = {}
    got = _kafka_config({"topic": "orders", "start": 1700000000000}, errors)
    assert errors == {} and got["batch_size"] == 10 and got["on_failure"] == "error_topic"
    errors = {}
    _cos_config({"bucket": "UPPER", "events": ["created", "renamed"]}, errors)
    assert set(errors) == {"bucket", "events"}


@pytest.mark.parametrize(
    ("expr", "after", "expected"),
    [
        ("* * * * * *", T0, T0 + 1),
        ("*/5 * * * * *", T0 + 1, T0 + 5),
        ("0 */2 * * * *", T0, T0 + 120),
        ("30 0 10 * * *", T0, T0 + 30),
        (
            "0 0 12 * * * 2027",
            T0,
            datetime.datetime(2027, 1, 1, 12, tzinfo=datetime.UTC).timestamp(),
        ),
    ],
)
def test_schedules_have_their_seconds_field_first(expr: str, after: float, expected: float) -> None:
    assert next_fire(expr, after) == expected


def test_the_previous_tick_includes_the_present_one() -> None:
    assert prev_fire("*/5 * * * * *", T0 + 7) == T0 + 5
    assert prev_fire("*/5 * * * * *", T0 + 5) == T0 + 5


def test_the_timer_event_and_its_request_id() -> None:
    t = parse_trigger(
        "fn", {"name": "tick", "type": "timer", "cron": "* * * * * *", "payload": "p"}
    )
    assert json.loads(timer_event(t, T0)) == {
        "Type": "Timer",
        "TriggerName": "tick",
        "Time": "2026-12-03T10:00:00Z",
        "Message": "p",
    }
    assert tick_request_id(t, T0) == f"timer-fn-tick-{int(T0 * 1000)}"


class FakeStore:
    def __init__(self, triggers: list[Trigger], state: dict[str, Any]) -> None:
        self.triggers = triggers
        self._state = state
        self.notes: list[dict[str, Any]] = []

    async def list(self) -> list[Trigger]:
        return self.triggers

    async def state(self, trigger_id: str) -> dict[str, Any]:
        return self._state

    async def note(self, trigger_id: str, **state: Any) -> None:
        self.notes.append(state)


class FakeInvoker:
    def __init__(self) -> None:
        self.submitted: list[tuple[str, bytes]] = []

    async def submit(self, trigger: Trigger, body: bytes, request_id: str) -> str:
        self.submitted.append((request_id, body))
        return "queued"


def timer(catch_up: str, cron: str = "0 * * * * *") -> Trigger:
    doc = {"name": "t", "type": "timer", "cron": cron, "catch_up": catch_up}
    return parse_trigger("fn", doc)


@pytest.mark.parametrize(("catch_up", "fired"), [("once", 1), ("skip", 0)])
async def test_a_missed_tick_is_fired_once_or_skipped(catch_up: str, fired: int) -> None:
    t = timer(catch_up)
    # Last fired 10 minutes before; the schedule ticks every minute: nine missed.
    store = FakeStore([t], {"last_tick": T0 - 600})
    invoker = FakeInvoker()
    runner = TimerRunner(store, invoker)  # type: ignore[arg-type]
    await runner._reload(T0 + 30)
    assert len(invoker.submitted) == fired
    if fired:
        # The latest missed tick, not each of them.
        assert invoker.submitted[0][0] == tick_request_id(t, T0)
    # The next tick is scheduled either way.
    assert runner._due[t.id][1] == T0 + 60


async def test_no_catch_up_for_a_trigger_that_never_fired_or_is_up_to_date() -> None:
    for state in ({}, {"last_tick": T0}):
        invoker = FakeInvoker()
        runner = TimerRunner(FakeStore([timer("once")], state), invoker)  # type: ignore[arg-type]
        await runner._reload(T0 + 30)
        assert invoker.submitted == []


async def test_due_ticks_fire_and_the_next_one_is_scheduled() -> None:
    t = timer("skip", "* * * * * *")
    store = FakeStore([t], {})
    invoker = FakeInvoker()
    runner = TimerRunner(store, invoker)  # type: ignore[arg-type]
    await runner._reload(T0)
    await runner._fire_due(T0 + 0.5)
    assert invoker.submitted == []
    await runner._fire_due(T0 + 1.01)
    assert [rid for rid, _ in invoker.submitted] == [tick_request_id(t, T0 + 1)]
    assert runner._due[t.id][1] == T0 + 2
    # A disabled or deleted trigger is dropped at the next reload.
    store.triggers = []
    await runner._reload(T0 + 1.5)
    assert runner._due == {}
