"""The container pool's decisions, as pure functions of snapshots.

Nothing here awaits, touches Docker or reads a clock: the pool passes the state in
(``InstanceView``s, the current time) and acts on the answer. That keeps every rule
testable in microseconds, the way OpenWhisk's container pool scheduling is tested.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from workers.instance_state import ASLEEP_STATES, STARTING_STATES, InstanceView, State


@dataclass(frozen=True)
class UseInstance:
    instance_id: str


@dataclass(frozen=True)
class StartInstance:
    # Idle instances of other functions to remove first, to free memory.
    evict: tuple[str, ...] = ()


@dataclass(frozen=True)
class Wait:
    reason: str
    # Waiting for memory (any function's instance going idle or away can help), rather
    # than for one of this function's own instances.
    for_memory: bool = False


Decision = UseInstance | StartInstance | Wait


def choose(
    instances: Sequence[InstanceView],
    *,
    function: str,
    version: int,
    memory_mb: int,
    max_instances: int,
    per_instance: int,
    memory_capacity_mb: int,
) -> Decision:
    """Where the next invocation of ``function`` should run on this worker.

    1. A warm instance of the same version with a free slot; the most recently used one,
       so that load concentrates and surplus instances reach their idle TTL.
    2. Otherwise a new instance, if the function is under ``max_instances`` (an idle
       instance of another version of it gives up its place) and memory allows
       (evicting idle instances of other functions or versions, least recently used
       first).
    3. Otherwise wait for a slot.
    """
    mine = [v for v in instances if v.function == function and not v.retiring]
    candidates = [
        v
        for v in mine
        if v.version == version
        and v.state in (State.READY, State.BUSY)
        and v.inflight < per_instance
    ]
    if candidates:
        # Pack onto instances already serving (web concurrency), then the most recently
        # used, so that surplus instances go idle and reach their TTL.
        best = max(candidates, key=lambda v: (v.inflight, v.last_used))
        return UseInstance(best.id)
    asleep = [
        v for v in mine if v.version == version and v.state in ASLEEP_STATES and v.inflight == 0
    ]
    if asleep:
        # Waking a frozen instance takes milliseconds; starting one, hundreds.
        return UseInstance(max(asleep, key=lambda v: v.last_used).id)
    starting = [
        v
        for v in mine
        if v.version == version and v.state in STARTING_STATES and v.inflight < per_instance
    ]
    if starting:
        # A multi-request instance on its way up has room: share its start.
        return UseInstance(max(starting, key=lambda v: v.inflight).id)

    live_mine = [v for v in mine if v.state not in (State.STOPPING, State.GONE)]
    replace: tuple[str, ...] = ()
    if len(live_mine) >= max_instances:
        # An idle instance of another version gives its place up to this one.
        other = [
            v
            for v in live_mine
            if v.version != version
            and v.state in (State.READY, State.PAUSED)
            and v.inflight == 0
            and not v.provisioned
        ]
        if not other:
            return Wait(f"function has {len(live_mine)} of {max_instances} instances busy")
        victim = min(other, key=lambda v: v.last_used)
        replace = (victim.id,)
        instances = [v for v in instances if v.id != victim.id]

    used = sum(v.memory_mb for v in instances if v.state is not State.GONE)
    free = memory_capacity_mb - used
    if free >= memory_mb:
        return StartInstance(evict=replace)
    evict: list[str] = list(replace)
    for v in sorted(evictable(instances, function, version), key=lambda v: v.last_used):
        evict.append(v.id)
        free += v.memory_mb
        if free >= memory_mb:
            return StartInstance(evict=tuple(evict))
    return Wait(f"worker memory full ({used} of {memory_capacity_mb} MiB in use)", for_memory=True)


def evictable(
    instances: Iterable[InstanceView], for_function: str, for_version: int
) -> list[InstanceView]:
    """Idle instances that may be removed to make room for ``for_function`` at
    ``for_version``: any other function's, and this function's of other versions (an
    alias may still send work to those, so they are not retired on sight)."""
    return [
        v
        for v in instances
        if v.state in (State.READY, State.PAUSED)
        and v.inflight == 0
        and not v.retiring
        and not v.provisioned  # kept ready on purpose; the manager decides about those
        and (v.function != for_function or v.version != for_version)
    ]


def idle_deadline(last_used: float, idle_ttl_s: float) -> float:
    return last_used + idle_ttl_s
