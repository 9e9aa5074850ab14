"""workers.instance.Instance: a container's whole life against the fake runtime.

Every transition the instance makes, every time limit it enforces, and what it tells its
pool and its observers. The fake runtime's "ready" containers are real TCP listeners, so
the instance's own readiness probe runs unchanged.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, cast

import pytest

from shared.errors import (
    ContainerInitError,
    FunctionTimeout,
    InitContainerTimeout,
    InternalError,
    OutOfMemory,
    ServiceUnavailable,
    UserCodeError,
    UserProcessExited,
)
from shared.settings import WorkerSettings
from shared.settings_security import NetworkSettings
from shared.spec import FunctionRecord
from workers import instance as instance_module
from workers.forwarder import ConnectionLost, Forwarder, Response
from workers.instance import Instance, Reservation, State
from workers.instance_host import InstanceHost

from .conftest import FAST_WORKER
from .fakes import Behaviour, FakeForwarder, FakeRuntime
from .helpers import eventually, make_invocation, make_record

S = State


class Traced(Instance):
    """Records every transition, in order."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.trace: list[State] = []

    def transition(self, new: State) -> None:
        super().transition(new)
        self.trace.append(new)


class Hooks:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def instance_up(self, inst: Instance) -> None:
        self.calls.append(("up", inst.id))

    async def instance_idle(self, inst: Instance) -> None:
        self.calls.append(("idle", inst.id))

    async def instance_gone(self, inst: Instance) -> None:
        self.calls.append(("gone", inst.id))


class Images:
    def check(self, image_ref: str, digest: str = "") -> None:
        pass

    async def ensure(self, image_ref: str) -> float:
        return 0.0


class Observer:
    def __init__(self, runtime: FakeRuntime) -> None:
        self.runtime = runtime
        self.seen: list[tuple[Any, ...]] = []

    def container_started(self, inst: Instance) -> None:
        self.seen.append(("started", inst.container_id))

    def request_started(
        self, inst: Instance, request_id: str, *, cold: bool, init_ms: float | None
    ) -> None:
        self.seen.append(("request", request_id, cold, init_ms is not None))

    def request_ended(
        self, inst: Instance, request_id: str, *, status: int | None, error: str | None
    ) -> None:
        self.seen.append(("end", request_id, status, error))

    async def before_removal(self, inst: Instance) -> None:
        # The container is stopped, not yet removed: its output is complete.
        self.runtime.events.append(("before_removal", inst.container_id))


class Life:
    def __init__(self, settings: WorkerSettings, observed: bool) -> None:
        self.runtime = FakeRuntime()
        self.forwarder = FakeForwarder()
        self.hooks = Hooks()
        self.observer = Observer(self.runtime)
        self.host = InstanceHost(
            runtime=self.runtime,
            forwarder=cast(Forwarder, self.forwarder),
            settings=settings,
            images=Images(),
            networks=NetworkSettings(),
            installation="imagefn-test",
            worker_id="w-test",
            pool=self.hooks,
            observers=(self.observer,) if observed else (),
        )
        self.tasks: list[asyncio.Task[None]] = []

    def start(
        self, record: FunctionRecord | None = None, *, inflight: int = 1, provisioned: bool = False
    ) -> Traced:
        inst = Traced(
            "i1", record or make_record("f"), self.host, inflight=inflight, provisioned=provisioned
        )
        self.tasks.append(inst.launch())
        return inst


@pytest.fixture
async def make_life() -> AsyncIterator[Callable[..., Life]]:
    lives: list[Life] = []

    def make(observed: bool = False, **settings: Any) -> Life:
        life = Life(WorkerSettings(**{**FAST_WORKER.__dict__, **settings}), observed)
        lives.append(life)
        return life

    yield make
    for life in lives:
        for task in life.tasks:
            task.cancel()
        await asyncio.gather(*life.tasks, return_exceptions=True)
        await life.runtime.close()


async def started(inst: Instance) -> None:
    await asyncio.wait_for(inst.started.wait(), 3)


async def gone(inst: Instance, timeout_s: float = 3.0) -> None:
    await eventually(lambda: inst.state is S.GONE, timeout_s)


# -- start ----------------------------------------------------------------------------------


async def test_a_start_for_a_call_goes_up_into_busy(make_life: Callable[..., Life]) -> None:
    life = make_life()
    inst = life.start()
    await started(inst)
    assert inst.start_error is None
    assert inst.trace == [S.STARTING, S.INITIALIZING, S.BUSY]
    assert inst.awake.is_set() and inst.host_port > 0
    assert {"create", "start", "ready"} <= set(inst.start_timings)
    assert life.hooks.calls == [("up", "i1")]
    [c] = life.runtime.containers.values()
    assert c.config.name == "imagefn-f-i1" and c.config.labels["imagefn.instance"] == "i1"


async def test_a_start_nobody_waits_for_comes_up_ready_and_says_so(
    make_life: Callable[..., Life],
) -> None:
    life = make_life()
    inst = life.start(inflight=0, provisioned=True)
    await started(inst)
    await eventually(lambda: ("idle", "i1") in life.hooks.calls)
    assert inst.trace == [S.STARTING, S.INITIALIZING, S.READY]


@pytest.mark.parametrize(
    ("behaviour", "error"),
    [
        (Behaviour(exit_code=3), UserProcessExited),
        (Behaviour(exit_code=127), ContainerInitError),
        (Behaviour(exit_code=137, oom_killed=True), OutOfMemory),
        (Behaviour(start_error=lambda: RuntimeError("engine broke")), InternalError),
    ],
)
async def test_a_failed_start_is_classified_and_the_instance_removed(
    make_life: Callable[..., Life], behaviour: Behaviour, error: type[Exception]
) -> None:
    life = make_life()
    life.runtime.queue(behaviour)
    inst = life.start()
    await started(inst)
    assert isinstance(inst.start_error, error), inst.start_error
    await gone(inst)
    assert inst.retire_reason == "start-failed"
    assert inst.trace[-2:] == [S.STOPPING, S.GONE]
    assert life.hooks.calls[-1] == ("gone", "i1")
    # start-failed is a kill reason: no grace period.
    assert life.runtime.removed[-1][1] == 0.0


async def test_init_timeout_limits_initializing(make_life: Callable[..., Life]) -> None:
    life = make_life()
    life.runtime.queue(Behaviour(ready=False))
    inst = life.start(make_record("f", init_timeout_s=0.2))
    await started(inst)
    assert isinstance(inst.start_error, InitContainerTimeout)
    assert inst.trace == [S.STARTING, S.INITIALIZING, S.STOPPING, S.GONE][: len(inst.trace)]


async def test_the_engine_call_bound_limits_starting(
    make_life: Callable[..., Life], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(instance_module, "ENGINE_CALL_TIMEOUT_S", 0.1)
    life = make_life()
    life.runtime.queue(Behaviour(start_delay_s=2.0))
    inst = life.start()
    await started(inst)
    assert isinstance(inst.start_error, InternalError)
    assert "start took too long" in inst.start_error.message


async def test_retired_while_starting_stops_the_start(make_life: Callable[..., Life]) -> None:
    life = make_life()
    life.runtime.queue(Behaviour(ready=False))
    inst = life.start(make_record("f", init_timeout_s=10))
    await eventually(lambda: inst.state is S.INITIALIZING)
    inst.retire("evicted")
    await started(inst)
    assert isinstance(inst.start_error, ContainerInitError)
    await gone(inst)


# -- serve ----------------------------------------------------------------------------------


async def test_serve_then_release_goes_back_to_ready(make_life: Callable[..., Life]) -> None:
    life = make_life(observed=True)
    inst = life.start()
    await started(inst)
    resp = await inst.serve(make_invocation(inst.record, request_id="r1"), cold=True)
    assert resp.status == 200 and inst.invocations == 1
    inst.release()
    assert inst.state is S.READY and inst.inflight == 0
    assert life.observer.seen == [
        ("started", inst.container_id),
        ("request", "r1", True, True),
        ("end", "r1", 200, None),
    ]
    # A warm reservation takes it at once.
    assert inst.reserve() is Reservation.WARM and inst.state is S.BUSY


async def test_an_events_non_2xx_answer_is_user_code_error_and_keeps_the_instance(
    make_life: Callable[..., Life],
) -> None:
    life = make_life(observed=True)
    life.forwarder.then(Response(502, [], b"nope"))
    inst = life.start()
    await started(inst)
    with pytest.raises(UserCodeError):
        await inst.serve(make_invocation(inst.record, request_id="r1"), cold=False)
    assert life.observer.seen[-1] == ("end", "r1", 502, "UserCodeError")
    assert not inst.retire_reason


async def test_timeout_s_limits_busy_and_kills_the_instance(make_life: Callable[..., Life]) -> None:
    life = make_life(stop_timeout_s=5.0)
    life.forwarder.then(FunctionTimeout("too slow"))
    inst = life.start(make_record("f", timeout_s=2))
    await started(inst)
    with pytest.raises(FunctionTimeout):
        await inst.serve(make_invocation(inst.record), cold=True)
    # Killed with its request still counted: the state of the process is unknown.
    assert inst.inflight == 1
    await gone(inst)
    assert inst.retire_reason == "timeout" and life.runtime.removed[-1][1] == 0.0
    # The forwarder was given the function's timeout (the deadline is further away).
    assert life.forwarder.calls[0][2] == 2


async def test_a_lost_connection_is_classified_and_retires_the_instance(
    make_life: Callable[..., Life],
) -> None:
    life = make_life()
    inst = life.start()
    await started(inst)

    async def crash(port: int, inv: Any, timeout_s: float) -> Response:
        await life.runtime.exit(inst.container_id, 1)
        raise ConnectionLost("reset")

    life.forwarder.then(crash)
    with pytest.raises(UserProcessExited):
        await inst.serve(make_invocation(inst.record), cold=False)
    assert inst.retire_reason == "crashed"
    await gone(inst)


async def test_a_passed_deadline_sends_nothing_and_keeps_the_instance(
    make_life: Callable[..., Life],
) -> None:
    life = make_life()
    inst = life.start()
    await started(inst)
    with pytest.raises(FunctionTimeout):
        await inst.serve(make_invocation(inst.record, deadline_in_s=-1), cold=True)
    assert life.forwarder.calls == [] and not inst.retire_reason


# -- freeze and wake ------------------------------------------------------------------------


async def test_pause_after_s_limits_ready_then_a_reservation_wakes_it(
    make_life: Callable[..., Life],
) -> None:
    life = make_life(pause_after_s=0.05)
    inst = life.start()
    await started(inst)
    inst.release()
    await eventually(lambda: inst.state is S.PAUSED)
    assert not inst.awake.is_set() and life.runtime.pauses == [inst.container_id]
    assert inst.reserve() is Reservation.WAKE
    timings: dict[str, float] = {}
    await inst.wake(timings)
    assert inst.state is S.BUSY and "wake" in timings
    assert life.runtime.unpauses == [inst.container_id]
    assert inst.trace[-5:] == [S.READY, S.PAUSING, S.PAUSED, S.RESUMING, S.BUSY]


async def test_freeze_idle_false_keeps_an_idle_instance_running(
    make_life: Callable[..., Life],
) -> None:
    life = make_life(pause_after_s=0.05)
    inst = life.start(make_record("f", freeze_idle=False))
    await started(inst)
    inst.release()
    await asyncio.sleep(0.3)
    assert inst.state is S.READY and life.runtime.pauses == []


async def test_a_failed_pause_kills_the_instance_and_a_waiter_hears_it(
    make_life: Callable[..., Life],
) -> None:
    life = make_life(pause_after_s=0.05)
    life.runtime.pause_error = RuntimeError("freezer broke")
    inst = life.start()
    await started(inst)
    inst.release()
    await gone(inst)
    assert inst.retire_reason == "crashed" and inst.awake.is_set()
    with pytest.raises(ServiceUnavailable):
        await inst.wake({})


async def test_a_resume_that_outlasts_the_engine_bound_kills_the_instance(
    make_life: Callable[..., Life], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(instance_module, "ENGINE_CALL_TIMEOUT_S", 0.1)
    life = make_life(pause_after_s=0.05)
    life.runtime.unpause_delay_s = 2.0
    inst = life.start()
    await started(inst)
    inst.release()
    await eventually(lambda: inst.state is S.PAUSED)
    inst.reserve()
    with pytest.raises(ServiceUnavailable):
        await inst.wake({})
    assert inst.retire_reason == "crashed"


# -- idle TTL, retire, demote, death --------------------------------------------------------


async def test_idle_ttl_s_limits_ready_and_paused_together(make_life: Callable[..., Life]) -> None:
    life = make_life(pause_after_s=0.05, stop_timeout_s=1.5)
    inst = life.start(make_record("f", idle_ttl_s=0.3))
    await started(inst)
    inst.release()
    await gone(inst)
    assert inst.retire_reason == "idle"
    assert S.PAUSED in inst.trace
    # Not a kill reason: the process gets its grace period.
    assert life.runtime.removed[-1][1] == 1.5


async def test_a_provisioned_instance_never_idles_out_until_demoted(
    make_life: Callable[..., Life],
) -> None:
    life = make_life(pause_after_s=0.05)
    inst = life.start(make_record("f", idle_ttl_s=0.2), inflight=0, provisioned=True)
    await started(inst)
    await asyncio.sleep(0.4)
    assert inst.state is S.READY and not inst.retire_reason
    inst.demote()
    await gone(inst)
    assert inst.retire_reason == "idle"


async def test_a_busy_instance_retired_gently_finishes_its_request_first(
    make_life: Callable[..., Life],
) -> None:
    life = make_life()
    inst = life.start()
    await started(inst)
    inst.retire("unreachable")
    await asyncio.sleep(0.1)
    assert inst.state is S.BUSY
    inst.release()
    await gone(inst)


async def test_a_death_retires_an_idle_instance(make_life: Callable[..., Life]) -> None:
    life = make_life()
    inst = life.start()
    await started(inst)
    inst.release()
    await life.runtime.exit(inst.container_id, 0)
    inst.died()
    await gone(inst)
    assert inst.retire_reason == "exited"


async def test_observers_see_the_container_stopped_before_it_is_removed(
    make_life: Callable[..., Life],
) -> None:
    life = make_life(observed=True)
    inst = life.start()
    await started(inst)
    inst.release()
    inst.retire("evicted")
    await gone(inst)
    cid = inst.container_id
    assert [e for e in life.runtime.events if e[1] == cid and e[0] != "log_end"] == [
        ("stop", cid),
        ("before_removal", cid),
        ("remove", cid),
    ]


def test_only_the_instance_moves_its_state() -> None:
    # The pool and the rest of the worker read states; they never change them.
    workers = Path(__file__).parents[2] / "workers"
    for path in workers.glob("*.py"):
        if path.name == "instance.py":
            continue
        assert not re.search(r"\.transition\(", path.read_text()), path.name
