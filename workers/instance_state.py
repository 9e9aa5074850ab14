"""The states of a function instance, their legal transitions, and its snapshot.

    CREATING ─▶ STARTING ─▶ INITIALIZING ─▶ READY ⇄ BUSY      (INITIALIZING ─▶ BUSY too:
                                              │      ▲        the start was for a call)
                                              ▼      │
                                           PAUSING ─▶ PAUSED ─▶ RESUMING ─▶ BUSY, or READY
                                                                          if the caller left
    every live state ─▶ STOPPING ─▶ GONE

Transitions not in ``ALLOWED`` raise: a bug shows up at once instead of as a leak. Only
``workers.instance.Instance`` moves an instance between these states; the pool and the
pure decisions read them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


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

# Retire reasons after which the container is killed at once, even with requests on it
# (their state is unknown, or the worker is going away). Any other reason lets the
# requests on it finish first, then stops the container gracefully.
KILL_REASONS = frozenset({"timeout", "crashed", "start-failed", "shutdown"})


class InvalidTransition(RuntimeError):
    pass


@dataclass(frozen=True)
class InstanceView:
    """An immutable snapshot of an instance, the input of the pure decisions."""

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
