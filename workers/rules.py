"""The rules of an instance's idle life and of provisioning, as pure functions.

Beside ``workers/decisions.py`` (where an invocation runs), these say when an idle
instance is frozen or retired, how many provisioned instances a worker may start now,
which of them are surplus, how long a failing version backs off, and which instances
serve nothing reachable any more. No awaits, no Docker, no clock: the instance and the
pool pass the state and the time in, and act on the answer
(``tests/unit/test_rules.py``).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from shared.spec import FunctionSpec
from workers.instance_state import LIVE_STATES, STARTING_STATES, InstanceView, State

# Longest wait between two attempts at a provisioned version whose instances fail to start.
PROVISION_BACKOFF_MAX_S = 60.0
# An instance of a version nothing points at any more is retired only once it has been
# idle this long: a caller naming an old version by number runs its calls back to back
# on one warm instance, instead of a cold start each time a sweep passes in between.
UNREACHABLE_GRACE_S = 1.0


# -- idle and freeze ------------------------------------------------------------------------


@dataclass(frozen=True)
class IdleLimits:
    # Retired this long after its last use (frozen or not); inf: never.
    idle_ttl_s: float
    # Frozen this long after its last use; 0: never.
    pause_after_s: float


def idle_limits(spec: FunctionSpec, *, provisioned: bool, pause_after_s: float) -> IdleLimits:
    """The limits of an idle instance, taken anew whenever it may have changed (a
    provisioned instance demoted becomes ordinary at once)."""
    if provisioned:
        # Ready before traffic means ready: no freezing, no idle reclaim.
        return IdleLimits(idle_ttl_s=math.inf, pause_after_s=0.0)
    # freeze_idle false: the app's background threads must keep running while idle.
    return IdleLimits(
        idle_ttl_s=spec.idle_ttl_s, pause_after_s=pause_after_s if spec.freeze_idle else 0.0
    )


@dataclass(frozen=True)
class Freeze:
    pass


@dataclass(frozen=True)
class RetireIdle:
    pass


@dataclass(frozen=True)
class Sleep:
    # Until something changes, or at most this long (None: until something changes).
    within_s: float | None


IdleStep = Freeze | RetireIdle | Sleep


def idle_step(
    state: State, *, last_used: float, now: float, limits: IdleLimits, retiring: bool
) -> IdleStep:
    """What the owner of an idle (READY or PAUSED) instance does next. Any other state,
    or a retiring instance, has no idle limit: it sleeps until something changes."""
    if retiring or state not in (State.READY, State.PAUSED):
        return Sleep(None)
    idle_for = now - last_used
    if idle_for >= limits.idle_ttl_s:
        return RetireIdle()
    until_ttl = limits.idle_ttl_s - idle_for
    if state is State.READY and limits.pause_after_s > 0:
        if idle_for >= limits.pause_after_s:
            return Freeze()
        return Sleep(min(until_ttl, limits.pause_after_s - idle_for))
    return Sleep(None if math.isinf(until_ttl) else until_ttl)


# -- provisioning -------------------------------------------------------------------------


def provision_starts(
    *,
    missing: int,
    max_instances: int,
    live_of_function: int,
    free_mb: int,
    reserved_mb: int,
    burst: int,
    provisioned_starting: int,
) -> int:
    """How many of ``missing`` provisioned instances to start now: within the function's
    ``max_instances`` on this worker (all versions), the worker's free memory, and the
    start burst (provisioned instances of any function already on their way up count
    against it), so a worker told to keep many starts a few at a time and keeps serving.
    Nothing is evicted for them: the cold-start manager places what does not fit."""
    return max(
        0,
        min(
            missing,
            max_instances - live_of_function,
            free_mb // max(1, reserved_mb),
            burst - provisioned_starting,
        ),
    )


def provision_surplus(have: Sequence[InstanceView], want: int) -> list[str]:
    """Provisioned instances of one version beyond ``want``, to demote: the busiest ones,
    so that the least busy stay provisioned (they are the ones ready right now)."""
    return [v.id for v in sorted(have, key=lambda v: v.inflight)[max(0, want) :]]


@dataclass(frozen=True)
class ProvisionTarget:
    # Instances of this version to keep ready on this worker.
    want: int
    max_instances: int
    # What one instance reserves (memory_mb + tmp_mb).
    reserved_mb: int


@dataclass(frozen=True)
class ProvisionPlan:
    demote: tuple[str, ...] = ()
    # (function, version) → instances to start now.
    start: Mapping[tuple[str, int], int] = field(default_factory=dict)


def plan_provisioned(
    instances: Sequence[InstanceView],
    targets: Mapping[tuple[str, int], ProvisionTarget],
    *,
    backing_off: Collection[tuple[str, int]],
    memory_capacity_mb: int,
    burst: int,
) -> ProvisionPlan:
    """What the pool does to hold its provisioned targets: demote the surplus of each
    target, and start what is missing within the limits of ``provision_starts``, except
    for versions whose starts are backing off. Targets are taken in order, each seeing
    the instances the previous ones start (their memory, their place in the burst)."""
    demote: list[str] = []
    start: dict[tuple[str, int], int] = {}
    live = [v for v in instances if v.state in LIVE_STATES]
    used_mb = sum(v.memory_mb for v in live)
    live_per_function: dict[str, int] = {}
    for v in live:
        live_per_function[v.function] = live_per_function.get(v.function, 0) + 1
    starting = {v.id for v in live if v.provisioned and v.state in STARTING_STATES}
    for key, target in targets.items():
        have = [
            v for v in live if v.provisioned and (v.function, v.version) == key and not v.retiring
        ]
        surplus = provision_surplus(have, target.want)
        demote.extend(surplus)
        starting.difference_update(surplus)
        missing = target.want - len(have)
        if missing <= 0 or key in backing_off:
            continue
        n = provision_starts(
            missing=missing,
            max_instances=target.max_instances,
            live_of_function=live_per_function.get(key[0], 0),
            free_mb=memory_capacity_mb - used_mb,
            reserved_mb=target.reserved_mb,
            burst=burst,
            provisioned_starting=len(starting) + sum(start.values()),
        )
        if n > 0:
            start[key] = n
            used_mb += n * target.reserved_mb
            live_per_function[key[0]] = live_per_function.get(key[0], 0) + n
    return ProvisionPlan(demote=tuple(demote), start=start)


def provision_backoff_s(failures: int) -> float:
    """The wait before the next start of a version whose instances failed ``failures``
    times in a row: 1, 2, 4 ... 60 s, so a broken image never restarts in a tight loop."""
    return min(PROVISION_BACKOFF_MAX_S, 2.0 ** max(0, failures - 1))


# -- reachability -------------------------------------------------------------------------


def unreachable(
    instances: Sequence[InstanceView],
    reachable: Mapping[str, frozenset[int]],
    *,
    now: float,
    grace_s: float = UNREACHABLE_GRACE_S,
) -> list[str]:
    """Idle or frozen instances whose version nothing reaches any more: the function was
    deleted (its entry is empty) or neither $LATEST nor an alias names the version.

    Only functions present in ``reachable`` are judged (the registry was asked about
    them). Busy instances finish their requests first and are judged once idle.
    Provisioned ones are left to the cold-start manager's next command, which demotes
    them; retiring them here would only start their replacement until it arrives."""
    return [
        v.id
        for v in instances
        if v.function in reachable
        and v.version not in reachable[v.function]
        and v.state in (State.READY, State.PAUSED)
        and v.inflight == 0
        and not v.retiring
        and not v.provisioned
        and now - v.last_used >= grace_s
    ]
