"""workers.placement.plan_provisioning: stable, spread, within memory."""

from __future__ import annotations

from workers.placement import WorkerView, plan_provisioning


def w(wid: str, used: int = 0, cap: int = 4096, **held: int) -> WorkerView:
    return WorkerView(wid, cap, used, {k.replace("_", "@"): v for k, v in held.items()})


def test_spreads_new_instances_across_workers() -> None:
    plan = plan_provisioning({"f@1": 3}, {"f@1": 128}, [w("a"), w("b"), w("c")])
    assert plan == {"a": {"f@1": 1}, "b": {"f@1": 1}, "c": {"f@1": 1}}


def test_keeps_what_workers_hold() -> None:
    workers = [w("a", used=256, f_1=2), w("b"), w("c")]
    plan = plan_provisioning({"f@1": 3}, {"f@1": 128}, workers)
    assert plan["a"] == {"f@1": 2}
    assert sum(p.get("f@1", 0) for p in plan.values()) == 3


def test_surplus_is_dropped_and_absent_targets_want_none() -> None:
    workers = [w("a", used=512, f_1=4, g_2=1), w("b")]
    plan = plan_provisioning({"f@1": 1}, {"f@1": 128}, workers)
    assert plan == {"a": {"f@1": 1}, "b": {}}


def test_memory_bounds_placement() -> None:
    workers = [w("a", used=3900, cap=4096), w("b", used=0, cap=300)]
    plan = plan_provisioning({"f@1": 3}, {"f@1": 128}, workers)
    # a has room for one, b for two.
    assert plan == {"a": {"f@1": 1}, "b": {"f@1": 2}}


def test_what_fits_nowhere_is_left_for_later() -> None:
    plan = plan_provisioning({"f@1": 5}, {"f@1": 1024}, [w("a", cap=2048)])
    assert plan == {"a": {"f@1": 2}}


def test_a_dead_workers_share_moves_to_the_living() -> None:
    # "b" held two but is gone from the inventories: its share is placed on "a" and "c".
    plan = plan_provisioning({"f@1": 3}, {"f@1": 128}, [w("a", f_1=1), w("c")])
    assert sum(p.get("f@1", 0) for p in plan.values()) == 3
    assert plan["a"]["f@1"] >= 1 and plan["c"]["f@1"] >= 1
