"""Which offset of each partition a Kafka consumer may commit, when it runs the records it
reads concurrently and finishes them out of order.

Kafka remembers one number per partition and group: the committed offset, from which the
partition's next owner reads. A worker runs many invocations of one partition at once, so
it may commit only the lowest offset it has not finished (everything below it is done);
when none is unfinished, one past the last offset it delivered. That point only moves
forward. A slow invocation holds the point back, not the reading: the worker keeps
reading and running what follows, and the cost of the lagging point is that a crash
redelivers what was finished above it (at least once).

``OffsetTracker`` is that bookkeeping, pure (no I/O, no clock), for one topic; the Kafka
backend (``shared/queue/kafka.py``) calls it from its consume, finish, commit and
rebalance paths, all on one event loop.

It also keeps a partition's state after the partition is revoked, while its invocations
still run here. Kafka's eager rebalance revokes every partition from every member and then
hands them out again, often to the same member: the state then continues (the worker reads
on from where it was, and its running invocations are not delivered again), as long as
the committed offset still lies within what this state knows. Otherwise it starts afresh
from the committed offset.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field


@dataclass
class PartitionState:
    # First offset this state knows about, and one past the last offset delivered from the
    # partition; None until the first delivery when it was assigned with no known position.
    start: int | None
    next: int | None
    # Offsets delivered and not finished yet.
    in_flight: set[int] = field(default_factory=set)
    # The last offset this process committed (or found committed) for the partition.
    committed: int | None = None
    # Offsets below this may have been delivered to an earlier owner: the partition's end
    # offset when it was assigned here (0 when nothing had ever been committed on it).
    redelivery_below: int = 0
    owned: bool = True

    def commit_point(self) -> int | None:
        """The lowest offset not known to be finished: everything below it is done."""
        if self.next is None:
            return None  # nothing read yet: no knowledge of any offset
        return min(min(self.in_flight, default=self.next), self.next)


class OffsetTracker:
    def __init__(self) -> None:
        self._parts: dict[int, PartitionState] = {}

    # -- rebalances ------------------------------------------------------------------------

    def knows(self, partition: int) -> bool:
        """Whether a state is kept for ``partition`` (so its committed offset matters)."""
        return partition in self._parts

    def assign(self, partition: int, *, committed: int | None, end: int) -> int | None:
        """The partition is (again) this consumer's. ``committed``: the group's committed
        offset (None when there is none, or it could not be read), ``end``: the
        partition's end offset now. Returns the offset to read from when this process's
        own state continues, None to read from the committed offset.

        Records between the committed offset and ``end`` may have been delivered to an
        earlier owner (attempt 2). Where nothing was ever committed, the partition counts
        as never read: a worker commits within ``commit_interval_s`` of its first read."""
        old = self._parts.get(partition)
        redelivery_below = end if committed is not None else 0
        # Invocations of the partition that still run here: not delivered a second time
        # while they run, and not committed past until they finish.
        running = (
            {o for o in old.in_flight if committed is None or o >= committed} if old else set()
        )
        if (
            old is not None
            and committed is not None
            and old.start is not None
            and old.next is not None
            and old.start <= committed <= old.next
        ):
            # Everything in [committed, next) was delivered here: finished, or still
            # running. Reading on from `next` neither loses nor repeats any of it.
            self._parts[partition] = PartitionState(
                start=committed,
                next=old.next,
                in_flight=running,
                committed=committed,
                redelivery_below=redelivery_below,
            )
            return old.next
        self._parts[partition] = PartitionState(
            start=committed,
            next=committed,
            in_flight=running,
            committed=committed,
            redelivery_below=redelivery_below,
        )
        return None

    def revoke(self, partitions: Iterable[int]) -> None:
        """The partitions are no longer this consumer's; their states are kept (their
        invocations may still run here, and the partition may come back)."""
        for p in partitions:
            st = self._parts.get(p)
            if st is not None:
                st.owned = False

    def owned(self) -> list[int]:
        return sorted(p for p, st in self._parts.items() if st.owned)

    # -- deliveries ------------------------------------------------------------------------

    def delivered(self, partition: int, offset: int) -> int | None:
        """A record was read. Returns its attempt (1, or 2 when an earlier owner may have
        had it), or None when it was delivered here already (skip it)."""
        st = self._parts.get(partition)
        if st is None:
            # Read without an assignment callback first (not expected): track it anyway.
            st = self._parts[partition] = PartitionState(start=offset, next=offset)
        repeated = offset in st.in_flight or (st.next is not None and offset < st.next)
        if st.start is None:
            st.start = offset
        if st.next is None or offset >= st.next:
            st.next = offset + 1
        if repeated:
            return None
        st.in_flight.add(offset)
        return 2 if offset < st.redelivery_below else 1

    def done(self, partition: int, offset: int) -> None:
        """The record's invocation is finished (its result delivered, or none is due)."""
        st = self._parts.get(partition)
        if st is not None:
            st.in_flight.discard(offset)

    def in_flight(self, partition: int) -> set[int]:
        st = self._parts.get(partition)
        return set(st.in_flight) if st is not None else set()

    # -- commits ---------------------------------------------------------------------------

    def due(self, partitions: Iterable[int] | None = None) -> dict[int, int]:
        """Commit points of the owned partitions (or of those named) that moved past what
        was last committed."""
        chosen = self.owned() if partitions is None else partitions
        out: dict[int, int] = {}
        for p in chosen:
            st = self._parts.get(p)
            if st is None or not st.owned:
                continue
            point = st.commit_point()
            if point is not None and (st.committed is None or point > st.committed):
                out[p] = point
        return out

    def committed(self, points: Mapping[int, int]) -> None:
        """These points were committed."""
        for p, offset in points.items():
            st = self._parts.get(p)
            if st is not None and (st.committed is None or offset > st.committed):
                st.committed = offset
