"""workers.decisions: the pool's pure placement rules."""

from __future__ import annotations

from typing import Any

import pytest

from workers.decisions import (
    StartInstance,
    UseInstance,
    Wait,
    choose,
    evictable,
    idle_deadline,
    stale_revisions,
)
from workers.instance import InstanceView, State

S = State


def view(id: str, **kw: Any) -> InstanceView:
    kw.setdefault("function", "f")
    kw.setdefault("revision", 1)
    kw.setdefault("state", S.READY)
    kw.setdefault("inflight", 0)
    kw.setdefault("last_used", 0.0)
    kw.setdefault("memory_mb", 128)
    return InstanceView(id=id, **kw)


def pick(instances: list[InstanceView], **kw: Any) -> object:
    args: dict[str, Any] = {
        "function": "f",
        "revision": 1,
        "memory_mb": 128,
        "max_instances": 10,
        "per_instance": 1,
        "memory_capacity_mb": 4096,
    }
    args.update(kw)
    return choose(instances, **args)


def test_no_instances_starts_one() -> None:
    assert pick([]) == StartInstance()


def test_warm_idle_instance_is_reused() -> None:
    assert pick([view("a")]) == UseInstance("a")


def test_most_recently_used_idle_instance_wins() -> None:
    instances = [view("old", last_used=1.0), view("new", last_used=3.0), view("mid", last_used=2.0)]
    assert pick(instances) == UseInstance("new")


def test_busy_instance_is_not_reused_with_one_request_per_instance() -> None:
    instances = [view("a", state=S.BUSY, inflight=1, last_used=9.0)]
    assert pick(instances) == StartInstance()
    instances.append(view("b", last_used=1.0))
    assert pick(instances) == UseInstance("b")


def test_web_packs_onto_a_busy_instance_with_room() -> None:
    instances = [
        view("idle", last_used=9.0),
        view("busy", state=S.BUSY, inflight=2, last_used=1.0),
    ]
    assert pick(instances, per_instance=4) == UseInstance("busy")


def test_full_web_instance_is_skipped() -> None:
    instances = [
        view("full", state=S.BUSY, inflight=4, last_used=9.0),
        view("room", state=S.BUSY, inflight=3, last_used=1.0),
    ]
    assert pick(instances, per_instance=4) == UseInstance("room")
    instances[1] = view("room", state=S.BUSY, inflight=4)
    assert pick(instances, per_instance=4) == StartInstance()


def test_older_revision_is_not_reused() -> None:
    assert pick([view("old", revision=1)], revision=2) == StartInstance()


def test_newer_revision_is_not_reused_either() -> None:
    assert pick([view("new", revision=3)], revision=2) == StartInstance()


def test_other_functions_are_not_reused() -> None:
    assert pick([view("g1", function="g")]) == StartInstance()


@pytest.mark.parametrize("state", [S.CREATING, S.STARTING, S.INITIALIZING, S.STOPPING, S.GONE])
def test_instances_not_ready_or_busy_are_not_used(state: State) -> None:
    assert not isinstance(pick([view("a", state=state)]), UseInstance)


def test_retiring_instance_is_ignored() -> None:
    # Not reused, and not counted against max_instances.
    instances = [view("r", retiring=True, last_used=9.0)]
    assert pick(instances, max_instances=1) == StartInstance()


def test_under_max_instances_starts_one() -> None:
    instances = [view("a", state=S.BUSY, inflight=1), view("b", state=S.BUSY, inflight=1)]
    assert pick(instances, max_instances=3) == StartInstance()


def test_at_max_instances_waits() -> None:
    instances = [view("a", state=S.BUSY, inflight=1), view("b", state=S.BUSY, inflight=1)]
    decision = pick(instances, max_instances=2)
    assert isinstance(decision, Wait)
    assert "2 of 2" in decision.reason


@pytest.mark.parametrize("state", [S.CREATING, S.STARTING, S.INITIALIZING])
def test_starting_instances_count_against_max_instances(state: State) -> None:
    instances = [view("a", state=S.BUSY, inflight=1), view("b", state=state, inflight=1)]
    assert isinstance(pick(instances, max_instances=2), Wait)


def test_stopping_instances_do_not_count_against_max_instances() -> None:
    instances = [view("a", state=S.STOPPING), view("b", state=S.GONE)]
    assert pick(instances, max_instances=1) == StartInstance()


def test_older_revisions_count_against_max_instances() -> None:
    instances = [view("old", revision=1, state=S.BUSY, inflight=1)]
    assert isinstance(pick(instances, revision=2, max_instances=1), Wait)


def test_other_functions_do_not_count_against_max_instances() -> None:
    instances = [view(f"g{i}", function="g", state=S.BUSY, inflight=1) for i in range(3)]
    assert pick(instances, max_instances=1) == StartInstance()


def test_memory_full_evicts_least_recently_used_idle_of_other_functions() -> None:
    instances = [
        view("g-lru", function="g", memory_mb=256, last_used=1.0),
        view("h-newest", function="h", memory_mb=256, last_used=3.0),
        view("g-mid", function="g", memory_mb=256, last_used=2.0),
        view("busy", function="h", memory_mb=256, state=S.BUSY, inflight=1, last_used=0.0),
    ]
    decision = pick(instances, memory_mb=512, memory_capacity_mb=1024)
    # Only as many as needed, oldest first; never the busy one.
    assert decision == StartInstance(evict=("g-lru", "g-mid"))


def test_memory_exactly_free_needs_no_eviction() -> None:
    instances = [view("g", function="g", memory_mb=512)]
    assert pick(instances, memory_mb=512, memory_capacity_mb=1024) == StartInstance()


def test_memory_of_stopping_instances_still_counts_but_not_gone() -> None:
    stopping = [view("g", function="g", memory_mb=1024, state=S.STOPPING)]
    assert isinstance(pick(stopping, memory_capacity_mb=1024), Wait)
    gone = [view("g", function="g", memory_mb=1024, state=S.GONE)]
    assert pick(gone, memory_capacity_mb=1024) == StartInstance()


def test_memory_full_and_nothing_evictable_waits() -> None:
    instances = [
        view("busy", function="g", memory_mb=512, state=S.BUSY, inflight=1),
        view("starting", function="g", memory_mb=256, state=S.STARTING),
        view("retiring", function="g", memory_mb=256, retiring=True),
    ]
    decision = pick(instances, memory_mb=128, memory_capacity_mb=1024)
    assert isinstance(decision, Wait)
    assert "memory" in decision.reason


def test_not_enough_evictable_memory_waits_without_evicting() -> None:
    instances = [
        view("g", function="g", memory_mb=128),
        view("busy", function="h", memory_mb=896, state=S.BUSY, inflight=1),
    ]
    assert isinstance(pick(instances, memory_mb=512, memory_capacity_mb=1024), Wait)


def test_own_busy_instances_are_never_evicted() -> None:
    instances = [view("mine", memory_mb=1024, state=S.BUSY, inflight=1)]
    decision = pick(instances, memory_mb=128, memory_capacity_mb=1024)
    assert isinstance(decision, Wait)


def test_evictable() -> None:
    instances = [
        view("g-idle", function="g"),
        view("g-busy", function="g", state=S.BUSY, inflight=1),
        view("g-retiring", function="g", retiring=True),
        view("g-starting", function="g", state=S.INITIALIZING),
        view("f-idle", function="f"),
    ]
    assert [v.id for v in evictable(instances, "f")] == ["g-idle"]


def test_own_idle_older_revision_is_not_evicted_for_memory() -> None:
    # An older revision's idle instances are retired through stale_revisions() instead
    # (the pool does that before choosing); choose() only evicts other functions'.
    instances = [view("f-old", revision=1, memory_mb=1024)]
    decision = pick(instances, revision=2, memory_mb=128, memory_capacity_mb=1024)
    assert isinstance(decision, Wait)
    assert evictable(instances, "f") == []


def test_stale_revisions() -> None:
    instances = [
        view("old-idle", revision=1),
        view("older-idle", revision=0),
        view("old-busy", revision=1, state=S.BUSY, inflight=1),
        view("old-retiring", revision=1, retiring=True),
        view("old-starting", revision=1, state=S.STARTING),
        view("current", revision=2),
        view("newer", revision=3),
        view("other-fn", function="g", revision=1),
    ]
    assert stale_revisions(instances, "f", 2) == ["old-idle", "older-idle"]
    assert stale_revisions(instances, "f", 1) == ["older-idle"]
    assert stale_revisions(instances, "nobody", 5) == []


def test_idle_deadline() -> None:
    assert idle_deadline(100.0, 30.0) == 130.0
