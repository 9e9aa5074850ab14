"""A function instance: one container, as an explicit state machine.

    CREATING ─▶ STARTING ─▶ INITIALIZING ─▶ READY ⇄ BUSY      (INITIALIZING ─▶ BUSY too:
                                              │      ▲        the start was for a call)
                                              ▼      │
                                           PAUSING ─▶ PAUSED ─▶ RESUMING ─▶ BUSY, or READY
                                                                          if the caller left
    every live state ─▶ STOPPING ─▶ GONE

An idle instance is frozen (``docker pause``, the cgroup freezer) after
``pause_after_s``: it uses no CPU, keeps its memory, and wakes in milliseconds when an
invocation needs it, instead of a full start. Only the owner task changes the container's
state (pause, unpause, remove); an invocation that wants a frozen instance reserves it and
waits for ``awake``.

Every state has a time limit, enforced by the instance's owner task in the pool:
CREATING/STARTING by the engine call timeouts, INITIALIZING by the function's
``init_timeout_s``, READY by ``pause_after_s`` (then it is frozen), READY and PAUSED
together by ``idle_ttl_s`` (then the instance is retired), BUSY by the
function's ``timeout_s`` (then the instance is killed), STOPPING by the stop timeout.
Transitions not in ``ALLOWED`` raise: a pool bug shows up at once instead of as a leak.
"""

from __future__ import annotations

import asyncio
import enum
import time
from dataclasses import dataclass, field

from shared.errors import ImagefnError
from shared.spec import FunctionRecord
from workers import sandbox


class State(enum.Enum):
    CREATING = "creating"
    STARTING = "starting"
    INITIALIZING = "initializing"
    READY = "ready"
    BUSY = "busy"
    PAUSING = "pausing"
    PAUSED = "paused"
    RESUMING = "resuming"
    STOPPING = "stopping"
    GONE = "gone"


ALLOWED: dict[State, frozenset[State]] = {
    State.CREATING: frozenset({State.STARTING, State.STOPPING}),
    State.STARTING: frozenset({State.INITIALIZING, State.STOPPING}),
    State.INITIALIZING: frozenset({State.READY, State.BUSY, State.STOPPING}),
    State.READY: frozenset({State.BUSY, State.PAUSING, State.STOPPING}),
    State.BUSY: frozenset({State.READY, State.BUSY, State.STOPPING}),
    State.PAUSING: frozenset({State.PAUSED, State.STOPPING}),
    State.PAUSED: frozenset({State.RESUMING, State.STOPPING}),
    State.RESUMING: frozenset({State.BUSY, State.READY, State.STOPPING}),
    State.STOPPING: frozenset({State.GONE}),
    State.GONE: frozenset(),
}

# States in which an instance holds (or is about to hold) a container and its memory.
LIVE_STATES = frozenset(
    {
        State.CREATING,
        State.STARTING,
        State.INITIALIZING,
        State.READY,
        State.BUSY,
        State.PAUSING,
        State.PAUSED,
        State.RESUMING,
    }
)
# On the way up: usable once started.
STARTING_STATES = frozenset({State.CREATING, State.STARTING, State.INITIALIZING})
# Frozen, or on the way in or out: usable after a wake-up.
ASLEEP_STATES = frozenset({State.PAUSING, State.PAUSED, State.RESUMING})


class InvalidTransition(RuntimeError):
    pass


@dataclass(eq=False)
class Instance:
    id: str
    record: FunctionRecord
    state: State = State.CREATING
    container_id: str = ""
    host_port: int = 0
    created_at: float = field(default_factory=time.monotonic)
    state_since: float = field(default_factory=time.monotonic)
    last_used: float = field(default_factory=time.monotonic)
    # Requests running on this instance now.
    inflight: int = 0
    invocations: int = 0
    # Kept ready ahead of traffic for the cold-start manager: never frozen or reclaimed
    # for idleness; replaced when it dies.
    provisioned: bool = False
    # Why the instance is being retired (idle, crashed, timeout, shutdown, ...).
    retire_reason: str = ""
    start_error: ImagefnError | None = None
    # Seconds spent in create/start/ready, reported with the first invocation.
    start_timings: dict[str, float] = field(default_factory=dict)
    # Set once start finished, successfully or not.
    started: asyncio.Event = field(default_factory=asyncio.Event)
    # Poked whenever something the owner task waits on changes.
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    # Set while the instance can take requests (not frozen); invocations that reserved a
    # frozen instance wait for it.
    awake: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def function(self) -> str:
        return self.record.spec.name

    @property
    def memory_mb(self) -> int:
        return self.record.spec.memory_mb

    @property
    def reserved_mb(self) -> int:
        """What the worker sets aside for it: memory_mb plus its /tmp budget."""
        return sandbox.reserved_mb(self.record.spec)

    @property
    def live(self) -> bool:
        return self.state in LIVE_STATES

    def transition(self, new: State) -> None:
        if new not in ALLOWED[self.state]:
            raise InvalidTransition(f"instance {self.id}: {self.state.value} -> {new.value}")
        self.state = new
        self.state_since = time.monotonic()
        self.wakeup.set()

    def retire(self, reason: str) -> None:
        """Ask the owner task to stop and remove this instance (idempotent)."""
        if not self.retire_reason:
            self.retire_reason = reason
        self.wakeup.set()

    def view(self) -> InstanceView:
        return InstanceView(
            id=self.id,
            function=self.function,
            version=self.record.version,
            state=self.state,
            inflight=self.inflight,
            last_used=self.last_used,
            memory_mb=self.reserved_mb,
            retiring=bool(self.retire_reason),
            provisioned=self.provisioned,
        )


@dataclass(frozen=True)
class InstanceView:
    """An immutable snapshot of an instance, the input of the pool's pure decisions."""

    id: str
    function: str
    version: int
    state: State
    inflight: int
    last_used: float
    # What the worker reserves for it (memory_mb + tmp_mb), the unit of its placement.
    memory_mb: int
    retiring: bool = False
    provisioned: bool = False
