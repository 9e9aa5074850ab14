"""workers.rules: the idle/freeze rules, provisioning arithmetic and reachability, pure."""

from __future__ import annotations

import math

import pytest

from workers.instance_state import InstanceView, State
from workers.rules import (
    Freeze,
    IdleLimits,
    ProvisionPlan,
    ProvisionTarget,
    RetireIdle,
    Sleep,
    idle_limits,
    idle_step,
    plan_provisioned,
    provision_backoff_s,
    provision_starts,
    provision_surplus,
    unreachable,
)

from .helpers import make_spec

S = State
LIMITS = IdleLimits(idle_ttl_s=60.0, pause_after_s=2.0)


def view(
    iid: str,
    *,
    function: str = "f",
    version: int = 1,
    state: State = S.READY,
    inflight: int = 0,
    last_used: float = 0.0,
    retiring: bool = False,
    provisioned: bool = False,
) -> InstanceView:
    return InstanceView(
        id=iid,
        function=function,
        version=version,
        state=state,
        inflight=inflight,
        last_used=last_used,
        memory_mb=1024,
        retiring=retiring,
        provisioned=provisioned,
    )


# -- idle limits ----------------------------------------------------------------------------


def test_ordinary_instances_freeze_after_the_workers_pause_and_retire_at_the_specs_ttl() -> None:
    spec = make_spec("f", idle_ttl_s=90)
    assert idle_limits(spec, provisioned=False, pause_after_s=2.0) == IdleLimits(90.0, 2.0)


def test_freeze_idle_false_never_freezes_but_still_retires_at_the_ttl() -> None:
    spec = make_spec("f", idle_ttl_s=90, freeze_idle=False)
    assert idle_limits(spec, provisioned=False, pause_after_s=2.0) == IdleLimits(90.0, 0.0)


def test_provisioned_instances_neither_freeze_nor_retire_for_idleness() -> None:
    for freeze in (True, False):
        spec = make_spec("f", freeze_idle=freeze)
        assert idle_limits(spec, provisioned=True, pause_after_s=2.0) == IdleLimits(math.inf, 0.0)


# -- idle step ------------------------------------------------------------------------------


def step(state: State, idle_for: float, limits: IdleLimits = LIMITS, **kw: bool) -> object:
    return idle_step(state, last_used=100.0, now=100.0 + idle_for, limits=limits, **kw)


def test_ready_sleeps_until_the_freeze_then_freezes() -> None:
    assert step(S.READY, 0.5, retiring=False) == Sleep(1.5)
    assert step(S.READY, 2.0, retiring=False) == Freeze()
    assert step(S.READY, 30.0, retiring=False) == Freeze()


def test_paused_sleeps_until_the_ttl_counted_from_last_use_then_retires() -> None:
    assert step(S.PAUSED, 10.0, retiring=False) == Sleep(50.0)
    assert step(S.PAUSED, 60.0, retiring=False) == RetireIdle()


def test_past_the_ttl_retires_even_before_freezing() -> None:
    assert step(S.READY, 61.0, retiring=False) == RetireIdle()
    short = IdleLimits(idle_ttl_s=1.0, pause_after_s=2.0)
    assert step(S.READY, 0.25, short, retiring=False) == Sleep(0.75)


def test_without_freezing_ready_sleeps_until_the_ttl() -> None:
    no_freeze = IdleLimits(idle_ttl_s=60.0, pause_after_s=0.0)
    assert step(S.READY, 30.0, no_freeze, retiring=False) == Sleep(30.0)
    assert step(S.READY, 60.0, no_freeze, retiring=False) == RetireIdle()


def test_an_infinite_ttl_sleeps_until_something_changes() -> None:
    forever = IdleLimits(idle_ttl_s=math.inf, pause_after_s=0.0)
    assert step(S.READY, 1e9, forever, retiring=False) == Sleep(None)


@pytest.mark.parametrize(
    "state",
    [S.CREATING, S.STARTING, S.INITIALIZING, S.BUSY, S.PAUSING, S.RESUMING, S.STOPPING],
)
def test_states_that_are_not_idle_have_no_idle_limit(state: State) -> None:
    assert step(state, 1e6, retiring=False) == Sleep(None)


def test_a_retiring_instance_has_no_idle_limit() -> None:
    assert step(S.READY, 1e6, retiring=True) == Sleep(None)


# -- provisioning ---------------------------------------------------------------------------


def starts(**kw: int) -> int:
    args = dict(
        missing=3,
        max_instances=10,
        live_of_function=0,
        free_mb=100_000,
        reserved_mb=1024,
        burst=4,
        provisioned_starting=0,
    )
    args.update(kw)
    return provision_starts(**args)


def test_provision_starts_what_is_missing_when_nothing_limits_it() -> None:
    assert starts() == 3


def test_provision_starts_within_max_instances_memory_and_burst() -> None:
    assert starts(max_instances=4, live_of_function=3) == 1
    assert starts(free_mb=2047) == 1
    assert starts(burst=4, provisioned_starting=3) == 1
    # Never negative: over every limit, nothing starts.
    assert starts(max_instances=2, live_of_function=5) == 0
    assert starts(free_mb=-500) == 0
    assert starts(provisioned_starting=9) == 0
    assert starts(missing=0) == 0


def test_provision_surplus_demotes_the_busiest_keeping_the_least_busy() -> None:
    have = [view("a", inflight=2), view("b", inflight=0), view("c", inflight=1)]
    assert provision_surplus(have, 1) == ["c", "a"]
    assert provision_surplus(have, 3) == []
    assert provision_surplus(have, 0) == ["b", "c", "a"]


def test_provision_backoff_doubles_up_to_a_minute() -> None:
    assert [provision_backoff_s(n) for n in (1, 2, 3, 4, 7, 20)] == [1, 2, 4, 8, 60, 60]


# -- reachability ---------------------------------------------------------------------------


def test_a_deleted_functions_idle_and_frozen_instances_are_unreachable() -> None:
    views = [
        view("ready", state=S.READY),
        view("paused", state=S.PAUSED),
        view("busy", state=S.BUSY, inflight=1),
        view("starting", state=S.STARTING, inflight=1),
        view("other", function="g"),
    ]
    assert unreachable(views, {"f": frozenset()}, now=10.0) == ["ready", "paused"]


def test_versions_neither_latest_nor_aliased_are_unreachable() -> None:
    views = [view("v1", version=1), view("v2", version=2), view("v3", version=3)]
    # $LATEST is 3, an alias still names 1.
    assert unreachable(views, {"f": frozenset({1, 3})}, now=10.0) == ["v2"]


def test_recently_used_retiring_and_provisioned_instances_are_left() -> None:
    views = [
        view("recent", last_used=9.5),
        view("retiring", retiring=True),
        view("provisioned", provisioned=True),
        view("old", last_used=8.0),
    ]
    assert unreachable(views, {"f": frozenset()}, now=10.0, grace_s=1.0) == ["old"]


def test_functions_not_asked_about_are_not_judged() -> None:
    assert unreachable([view("a", function="g")], {"f": frozenset()}, now=10.0) == []


# -- the provisioning plan --------------------------------------------------------------------


def target(want: int, max_instances: int = 10, reserved_mb: int = 1024) -> ProvisionTarget:
    return ProvisionTarget(want=want, max_instances=max_instances, reserved_mb=reserved_mb)


def test_plan_starts_what_is_missing_and_demotes_the_surplus() -> None:
    views = [
        view("p1", provisioned=True, inflight=1, state=S.BUSY),
        view("p2", provisioned=True),
        view("q1", function="g", provisioned=True),
    ]
    plan = plan_provisioned(
        views,
        {("f", 1): target(1), ("g", 1): target(3)},
        backing_off=(),
        memory_capacity_mb=100_000,
        burst=4,
    )
    assert plan.demote == ("p1",)
    assert dict(plan.start) == {("g", 1): 2}


def test_plan_skips_versions_backing_off_and_ignores_retiring_and_gone_instances() -> None:
    views = [
        view("old", provisioned=True, retiring=True),
        view("gone", provisioned=True, state=S.GONE),
    ]
    targets = {("f", 1): target(2)}
    assert (
        plan_provisioned(
            views, targets, backing_off={("f", 1)}, memory_capacity_mb=100_000, burst=4
        )
        == ProvisionPlan()
    )
    plan = plan_provisioned(views, targets, backing_off=(), memory_capacity_mb=100_000, burst=4)
    assert dict(plan.start) == {("f", 1): 2}


def test_plan_shares_the_burst_and_the_memory_between_targets_in_order() -> None:
    views = [view("s1", function="h", provisioned=True, state=S.STARTING)]
    targets = {("f", 1): target(2), ("g", 1): target(2)}
    plan = plan_provisioned(views, targets, backing_off=(), memory_capacity_mb=100_000, burst=3)
    # One slot of the burst is taken by the instance already starting.
    assert dict(plan.start) == {("f", 1): 2}
    # 1024 MiB in use by the starting one: room for two more of 1024 each, then none.
    plan = plan_provisioned(views, targets, backing_off=(), memory_capacity_mb=3072, burst=10)
    assert dict(plan.start) == {("f", 1): 2}


def test_plan_stays_within_max_instances_counting_ordinary_instances() -> None:
    views = [view("o1"), view("o2", version=2)]
    plan = plan_provisioned(
        views,
        {("f", 2): target(3, max_instances=3)},
        backing_off=(),
        memory_capacity_mb=100_000,
        burst=4,
    )
    assert dict(plan.start) == {("f", 2): 1}
