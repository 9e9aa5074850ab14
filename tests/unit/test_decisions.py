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
)
from workers.instance import InstanceView, State

S = State


def view(id: str, **kw: Any) -> InstanceView:
    kw.setdefault("function", "f")
    kw.setdefault("version", 1)
    kw.setdefault("state", S.READY)
    kw.setdefault("inflight", 0)
    kw.setdefault("last_used", 0.0)
    kw.setdefault("memory_mb", 128)
    return InstanceView(id=id, **kw)


def pick(instances: list[InstanceView], **kw: Any) -> object:
    args: dict[str, Any] = {
        "function": "f",
        "version": 1,
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


def test_older_version_is_not_reused() -> None:
    assert pick([view("old", version=1)], version=2) == StartInstance()


def test_newer_version_is_not_reused_either() -> None:
    assert pick([view("new", version=3)], version=2) == StartInstance()


def test_other_functions_are_not_reused() -> None:
    assert pick([view("g1", function="g")]) == StartInstance()


@pytest.mark.parametrize("state", [S.STOPPING, S.GONE])
def test_instances_going_away_are_not_used(state: State) -> None:
    assert not isinstance(pick([view("a", state=state)]), UseInstance)


@pytest.mark.parametrize("state", [S.CREATING, S.STARTING, S.INITIALIZING])
def test_starting_instance_is_shared_only_when_it_has_room(state: State) -> None:
    # Reserved by the invocation that started it: one request at a time, no room.
    assert not isinstance(pick([view("a", state=state, inflight=1)]), UseInstance)
    # A web instance taking 4 at once shares its start with the next 3.
    shared = pick([view("a", state=state, inflight=1)], per_instance=4)
    assert shared == UseInstance("a")


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


def test_older_versions_count_against_max_instances() -> None:
    instances = [view("old", version=1, state=S.BUSY, inflight=1)]
    assert isinstance(pick(instances, version=2, max_instances=1), Wait)


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
        view("f-old-idle", function="f", version=0),
        view("f-new-idle", function="f", version=2),
        view("f-old-busy", function="f", version=0, state=S.BUSY, inflight=1),
        view("f-old-retiring", function="f", version=0, retiring=True),
        view("f-old-starting", function="f", version=0, state=S.STARTING),
    ]
    # Other functions' idle instances, and this function's idle instances of any other
    # version (older or newer); never its own version's, busy, starting or retiring ones.
    assert [v.id for v in evictable(instances, "f", 1)] == ["g-idle", "f-old-idle", "f-new-idle"]
    assert [v.id for v in evictable(instances, "f", 0)] == ["g-idle", "f-idle", "f-new-idle"]
    assert [v.id for v in evictable(instances, "h", 1)] == [
        "g-idle",
        "f-idle",
        "f-old-idle",
        "f-new-idle",
    ]


def test_own_idle_other_version_is_evicted_for_memory() -> None:
    # Old versions are no longer retired on sight (an alias may still use them), but an
    # idle one gives its memory up like any other function's idle instance.
    instances = [view("f-old", version=1, memory_mb=1024)]
    decision = pick(instances, version=2, memory_mb=128, memory_capacity_mb=1024)
    assert decision == StartInstance(evict=("f-old",))


def test_own_busy_other_version_is_not_evicted_for_memory() -> None:
    instances = [view("f-old", version=1, memory_mb=1024, state=S.BUSY, inflight=1)]
    decision = pick(instances, version=2, memory_mb=128, memory_capacity_mb=1024)
    assert isinstance(decision, Wait) and decision.for_memory


def test_other_versions_are_kept_while_there_is_room() -> None:
    # Neither max_instances nor memory is short: the old version stays for its alias.
    instances = [view("f-old", version=1)]
    assert pick(instances, version=2, max_instances=2) == StartInstance()


def test_at_max_instances_an_idle_other_version_gives_up_its_place() -> None:
    instances = [view("old", version=1, last_used=5.0)]
    assert pick(instances, version=2, max_instances=1) == StartInstance(evict=("old",))


def test_at_max_instances_the_least_recently_used_other_version_goes() -> None:
    instances = [
        view("v1-recent", version=1, last_used=9.0),
        view("v3-lru", version=3, last_used=1.0),
        view("v2-busy", version=2, state=S.BUSY, inflight=1, last_used=0.0),
    ]
    assert pick(instances, version=2, max_instances=3) == StartInstance(evict=("v3-lru",))


@pytest.mark.parametrize(
    "kw",
    [
        {"state": S.BUSY, "inflight": 1},
        {"state": S.STARTING},
        {"state": S.INITIALIZING},
    ],
)
def test_at_max_instances_other_versions_that_are_not_idle_make_it_wait(
    kw: dict[str, Any],
) -> None:
    instances = [view("old", version=1, **kw)]
    decision = pick(instances, version=2, max_instances=1)
    assert isinstance(decision, Wait) and not decision.for_memory
    assert "1 of 1" in decision.reason


def test_at_max_instances_own_version_busy_waits_even_with_other_functions_idle() -> None:
    instances = [
        view("mine", version=2, state=S.BUSY, inflight=1),
        view("g", function="g"),
    ]
    assert isinstance(pick(instances, version=2, max_instances=1), Wait)


def test_replaced_instance_memory_counts_as_freed() -> None:
    # The replaced instance's memory is enough: no other eviction.
    instances = [
        view("old", version=1, memory_mb=1024),
        view("g", function="g", memory_mb=512, last_used=0.0),
    ]
    decision = pick(instances, version=2, max_instances=1, memory_mb=1024, memory_capacity_mb=1536)
    assert decision == StartInstance(evict=("old",))


def test_replacement_plus_memory_eviction() -> None:
    instances = [
        view("old", version=1, memory_mb=256, last_used=8.0),
        view("g-lru", function="g", memory_mb=512, last_used=1.0),
        view("h", function="h", memory_mb=256, last_used=2.0),
    ]
    decision = pick(instances, version=2, max_instances=1, memory_mb=768, memory_capacity_mb=1024)
    # First the replaced instance (for max_instances), then as little as needed, LRU first.
    assert decision == StartInstance(evict=("old", "g-lru"))


def test_replacement_that_does_not_free_enough_memory_waits_for_memory() -> None:
    instances = [
        view("old", version=1, memory_mb=128),
        view("busy", function="g", memory_mb=896, state=S.BUSY, inflight=1),
    ]
    decision = pick(instances, version=2, max_instances=1, memory_mb=512, memory_capacity_mb=1024)
    assert isinstance(decision, Wait) and decision.for_memory


def test_retiring_other_version_is_neither_counted_nor_replaced() -> None:
    instances = [view("old", version=1, retiring=True)]
    assert pick(instances, version=2, max_instances=1) == StartInstance()


def test_idle_deadline() -> None:
    assert idle_deadline(100.0, 30.0) == 130.0
