"""workers.instance: the instance state machine."""

from __future__ import annotations

import itertools

import pytest

from workers.instance import LIVE_STATES, Instance, InvalidTransition, State

from .helpers import make_record

S = State
# Written out from the module's diagram (plus INITIALIZING→BUSY: a new instance is reserved
# for the invocation that started it, and BUSY→BUSY: another request on a busy web instance).
EXPECTED_ALLOWED: set[tuple[State, State]] = {
    (S.CREATING, S.STARTING),
    (S.CREATING, S.STOPPING),
    (S.STARTING, S.INITIALIZING),
    (S.STARTING, S.STOPPING),
    (S.INITIALIZING, S.READY),
    (S.INITIALIZING, S.BUSY),
    (S.INITIALIZING, S.STOPPING),
    (S.READY, S.BUSY),
    (S.READY, S.PAUSING),
    (S.READY, S.STOPPING),
    (S.PAUSING, S.PAUSED),
    (S.PAUSING, S.STOPPING),
    (S.PAUSED, S.RESUMING),
    (S.PAUSED, S.STOPPING),
    (S.RESUMING, S.BUSY),
    (S.RESUMING, S.READY),
    (S.RESUMING, S.STOPPING),
    (S.BUSY, S.READY),
    (S.BUSY, S.BUSY),
    (S.BUSY, S.STOPPING),
    (S.STOPPING, S.GONE),
}
# Shortest path from CREATING to each state, to put an instance there legally.
PATH = {
    S.CREATING: [],
    S.STARTING: [S.STARTING],
    S.INITIALIZING: [S.STARTING, S.INITIALIZING],
    S.READY: [S.STARTING, S.INITIALIZING, S.READY],
    S.BUSY: [S.STARTING, S.INITIALIZING, S.BUSY],
    S.PAUSING: [S.STARTING, S.INITIALIZING, S.READY, S.PAUSING],
    S.PAUSED: [S.STARTING, S.INITIALIZING, S.READY, S.PAUSING, S.PAUSED],
    S.RESUMING: [S.STARTING, S.INITIALIZING, S.READY, S.PAUSING, S.PAUSED, S.RESUMING],
    S.STOPPING: [S.STOPPING],
    S.GONE: [S.STOPPING, S.GONE],
}


def instance_in(state: State) -> Instance:
    inst = Instance(id="i1", record=make_record())
    for step in PATH[state]:
        inst.transition(step)
    assert inst.state is state
    return inst


def by_value(pair: tuple[State, State]) -> tuple[str, str]:
    return (pair[0].value, pair[1].value)


ALLOWED = sorted(EXPECTED_ALLOWED, key=by_value)


@pytest.mark.parametrize(("old", "new"), ALLOWED)
def test_allowed_transition(old: State, new: State) -> None:
    inst = instance_in(old)
    inst.wakeup.clear()
    before = inst.state_since
    inst.transition(new)
    assert inst.state is new
    assert inst.state_since >= before
    # Whoever waits on the instance hears about it.
    assert inst.wakeup.is_set()


FORBIDDEN = sorted(set(itertools.product(State, State)) - EXPECTED_ALLOWED, key=by_value)


@pytest.mark.parametrize(("old", "new"), FORBIDDEN)
def test_forbidden_transition_raises_and_changes_nothing(old: State, new: State) -> None:
    inst = instance_in(old)
    inst.wakeup.clear()
    with pytest.raises(InvalidTransition, match=f"{old.value} -> {new.value}"):
        inst.transition(new)
    assert inst.state is old
    assert not inst.wakeup.is_set()


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (S.GONE, S.READY),
        (S.READY, S.CREATING),
        (S.CREATING, S.READY),
        (S.STOPPING, S.READY),
        (S.GONE, S.STOPPING),
        (S.CREATING, S.BUSY),
        (S.READY, S.READY),
    ],
)
def test_named_forbidden_transitions(old: State, new: State) -> None:
    with pytest.raises(InvalidTransition):
        instance_in(old).transition(new)


def test_live_states() -> None:
    assert LIVE_STATES == {
        S.CREATING,
        S.STARTING,
        S.INITIALIZING,
        S.READY,
        S.BUSY,
        S.PAUSING,
        S.PAUSED,
        S.RESUMING,
    }
    assert instance_in(S.READY).live
    assert not instance_in(S.STOPPING).live
    assert not instance_in(S.GONE).live


def test_retire_is_idempotent_and_keeps_the_first_reason() -> None:
    inst = instance_in(S.READY)
    inst.wakeup.clear()
    inst.retire("idle")
    assert inst.retire_reason == "idle"
    assert inst.wakeup.is_set()
    inst.wakeup.clear()
    inst.retire("timeout")
    assert inst.retire_reason == "idle"
    # Still pokes the owner, so a second request to stop is never lost.
    assert inst.wakeup.is_set()
    # Retiring does not change the state: the owner task does that.
    assert inst.state is S.READY


def test_view_is_a_snapshot() -> None:
    inst = Instance(id="i9", record=make_record("f", version=3, memory_mb=256))
    inst.transition(S.STARTING)
    inst.inflight = 2
    view = inst.view()
    assert (view.id, view.function, view.version) == ("i9", "f", 3)
    # The memory the worker reserves: memory_mb plus the /tmp budget (tmp_mb, 512).
    assert (view.state, view.inflight, view.memory_mb, view.retiring) == (S.STARTING, 2, 768, False)
    inst.retire("evicted")
    inst.inflight = 0
    assert view.inflight == 2 and not view.retiring
    assert inst.view().retiring
