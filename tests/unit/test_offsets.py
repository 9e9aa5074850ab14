"""shared.queue.offsets.OffsetTracker: the commit point of out-of-order work per partition,
and what survives a rebalance."""

from __future__ import annotations

from shared.queue.offsets import OffsetTracker


def tracking(partition: int = 0, *, committed: int | None = None, end: int = 0) -> OffsetTracker:
    t = OffsetTracker()
    assert t.assign(partition, committed=committed, end=end) is None
    return t


def deliver(t: OffsetTracker, partition: int, *offsets: int) -> list[int | None]:
    return [t.delivered(partition, o) for o in offsets]


def test_the_commit_point_is_the_lowest_unfinished_offset() -> None:
    t = tracking()
    deliver(t, 0, 0, 1, 2)
    assert t.due() == {0: 0}  # nothing finished yet: the start itself
    t.committed({0: 0})
    t.done(0, 0)
    assert t.due() == {0: 1}
    t.committed({0: 1})
    t.done(0, 2)  # out of order: 1 still runs, so 2 cannot be committed past
    assert t.due() == {}
    t.done(0, 1)
    assert t.due() == {0: 3}  # none in flight: one past the last delivered


def test_a_slow_invocation_holds_the_point_not_the_reading() -> None:
    t = tracking()
    deliver(t, 0, 10)  # slow
    for o in range(11, 60):
        assert t.delivered(0, o) == 1
        t.done(0, o)
    assert t.due() == {0: 10}
    t.done(0, 10)
    assert t.due() == {0: 60}


def test_due_reports_only_points_that_moved_and_never_goes_back() -> None:
    t = tracking()
    deliver(t, 0, 0)
    t.done(0, 0)
    assert t.due() == {0: 1}
    t.committed({0: 1})
    assert t.due() == {}
    t.committed({0: 0})  # a late, older confirmation changes nothing
    assert t.due() == {}
    deliver(t, 0, 1)
    assert t.due() == {}  # 1 is in flight: the point is still 1


def test_partitions_are_independent() -> None:
    t = tracking(0)
    assert t.assign(1, committed=None, end=0) is None
    deliver(t, 0, 0, 1)
    deliver(t, 1, 5)
    t.done(0, 1)
    t.done(1, 5)
    assert t.due() == {0: 0, 1: 6}
    assert t.owned() == [0, 1]


def test_records_below_the_end_at_assignment_may_have_been_delivered_before() -> None:
    t = tracking(committed=1, end=3)
    assert deliver(t, 0, 1, 2, 3, 4) == [2, 2, 1, 1]


def test_a_partition_never_committed_on_counts_as_never_read() -> None:
    # Published before any worker joined: first deliveries, not redeliveries.
    t = tracking(committed=None, end=3)
    assert deliver(t, 0, 0, 1, 2, 3) == [1, 1, 1, 1]


def test_a_record_is_delivered_once() -> None:
    t = tracking()
    assert deliver(t, 0, 4, 4, 3) == [1, None, None]


def test_revoked_partitions_are_not_committed() -> None:
    t = tracking(0)
    t.assign(1, committed=None, end=0)
    deliver(t, 0, 0)
    deliver(t, 1, 0)
    t.done(0, 0)
    t.done(1, 0)
    t.revoke([1])
    assert t.owned() == [0]
    assert t.due() == {0: 1}
    assert t.due([1]) == {}


def test_a_partition_that_comes_back_continues_where_it_was() -> None:
    """Eager rebalancing revokes every partition and hands most back to the same member:
    what still runs here is neither delivered again nor committed past."""
    t = tracking(committed=0, end=0)
    deliver(t, 0, 0, 1, 2, 3)
    t.done(0, 0)
    t.done(0, 2)
    assert t.due() == {0: 1}
    t.committed({0: 1})
    t.revoke([0])
    t.done(0, 3)  # finishes while the group rebalances
    assert t.assign(0, committed=1, end=6) == 4  # read on from 4, not from 1
    assert t.in_flight(0) == {1}
    assert t.due() == {}  # 1 still runs
    assert deliver(t, 0, 4, 5, 6) == [2, 2, 1]
    t.done(0, 1)
    assert t.due() == {0: 4}


def test_a_partition_another_member_advanced_starts_from_the_committed_offset() -> None:
    t = tracking()
    deliver(t, 0, 0, 1)
    t.done(0, 0)
    t.revoke([0])
    # Another owner ran up to 9 meanwhile.
    assert t.assign(0, committed=10, end=12) is None
    assert t.in_flight(0) == set()  # 1 lies below what the group committed
    assert deliver(t, 0, 10, 11, 12) == [2, 2, 1]
    t.done(0, 1)  # the old run of 1 ends: nothing changes
    assert t.due() == {}  # 10 is where the group already is
    t.done(0, 10)
    assert t.due() == {0: 11}


def test_without_a_committed_offset_running_work_is_still_not_repeated() -> None:
    t = tracking()
    deliver(t, 0, 0, 1)
    t.revoke([0])
    # The committed offset could not be read: start afresh, but 0 and 1 still run here.
    assert t.assign(0, committed=None, end=3) is None
    assert t.due() == {}  # nothing read yet: nothing known to commit
    assert deliver(t, 0, 0, 1, 2) == [None, None, 1]
    assert t.due() == {0: 0}
    t.done(0, 0)
    t.done(0, 1)
    t.done(0, 2)
    assert t.due() == {0: 3}


def test_state_is_kept_only_for_known_partitions() -> None:
    t = OffsetTracker()
    assert not t.knows(3)
    t.assign(3, committed=None, end=0)
    assert t.knows(3)
    t.revoke([3])
    assert t.knows(3) and t.owned() == []
