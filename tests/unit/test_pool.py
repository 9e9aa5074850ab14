"""workers.pool.ContainerPool over an in-memory runtime and a scripted forwarder.

"Ready" fake containers are real TCP listeners on 127.0.0.1, so the pool's own readiness
probe (workers.probe.probe_port) runs unchanged.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable

import pytest
from structlog.testing import capture_logs

from shared.errors import ContainerInitError, FunctionTimeout
from shared.messages import Invocation, InvocationResult
from workers.forwarder import ConnectionLost, Response
from workers.instance import State
from workers.runtime import (
    LABEL_FUNCTION,
    LABEL_INSTALLATION,
    LABEL_INSTANCE,
    LABEL_MANAGED,
    LABEL_WORKER,
)

from .conftest import INSTALLATION, TEST_REGISTRY, PoolKit
from .fakes import Behaviour, PullBehaviour, Step, pull_failure
from .helpers import eventually, image_ref_of, make_invocation, make_record

COLD_TIMINGS = {"queue", "create", "start", "ready", "run"}


def error_type(result: InvocationResult) -> str | None:
    return None if result.error is None else result.error["type"]


def gate_step(gate: asyncio.Event, reached: list[int] | None = None) -> Step:
    """A forwarder step that holds the request until ``gate`` is set."""

    async def step(port: int, inv: Invocation, timeout_s: float) -> Response:
        if reached is not None:
            reached.append(port)
        await asyncio.wait_for(gate.wait(), 3)
        return Response(200, [], inv.request_id.encode())

    return step


# -- cold and warm -------------------------------------------------------------------------


async def test_first_invoke_is_cold_then_warm_on_the_same_instance(kit: PoolKit) -> None:
    record = make_record("hello", command=("srv",), args=("-p", "9000"), env={"A": "1"})
    r1 = await kit.pool.invoke(make_invocation(record, request_id="r1"))
    assert r1.error is None, r1.error
    assert (r1.request_id, r1.status, r1.body) == ("r1", 200, b'{"ok":true}')
    assert r1.headers == [("Content-Type", "application/json")]
    assert r1.cold_start is True
    assert r1.worker == "w-test"
    assert COLD_TIMINGS <= set(r1.timings)
    assert all(v >= 0 for v in r1.timings.values())

    [inst] = kit.pool.instances()
    assert r1.instance == inst.id
    assert inst.state is State.READY and inst.inflight == 0
    [container] = kit.runtime.containers.values()
    # The request went to the port the engine published for this container.
    assert kit.forwarder.calls[0][0] == container.port == inst.host_port
    assert kit.pool.owns_container(container.id)

    r2 = await kit.pool.invoke(make_invocation(record, request_id="r2"))
    assert r2.error is None
    assert r2.cold_start is False
    assert r2.instance == inst.id
    assert "create" not in r2.timings and "ready" not in r2.timings
    assert {"queue", "run"} <= set(r2.timings)
    assert len(kit.runtime.containers) == 1
    assert inst.invocations == 2


async def test_container_config_comes_from_the_record(kit: PoolKit) -> None:
    record = make_record(
        "cfg",
        version=3,
        command=("python3",),
        args=("app.py",),
        env={"K": "v"},
        memory_mb=256,
        cpus=0.5,
    )
    result = await kit.pool.invoke(make_invocation(record))
    [c] = kit.runtime.containers.values()
    cfg = c.config
    # The version's image pinned by digest, not the tag.
    assert cfg.image == record.image_ref == image_ref_of("cfg", 3)
    assert (cfg.command, cfg.args, cfg.env) == (("python3",), ("app.py",), {"K": "v"})
    assert (cfg.memory_mb, cfg.cpus) == (256, 0.5)
    assert cfg.labels == {
        LABEL_MANAGED: "1",
        LABEL_INSTALLATION: INSTALLATION,
        LABEL_WORKER: "w-test",
        LABEL_FUNCTION: "cfg",
        LABEL_INSTANCE: result.instance,
    }
    assert result.instance in cfg.name and "cfg" in cfg.name


async def test_forwarder_timeout_is_the_function_timeout_capped_by_the_deadline(
    kit: PoolKit,
) -> None:
    record = make_record(timeout_s=2.0)
    await kit.pool.invoke(make_invocation(record, deadline_in_s=30))
    await kit.pool.invoke(make_invocation(record, deadline_in_s=0.5))
    first, second = (t for _, _, t in kit.forwarder.calls)
    assert first == 2.0
    assert 0.3 < second <= 0.5


async def test_two_concurrent_invokes_start_two_instances(kit: PoolKit) -> None:
    gate, reached = asyncio.Event(), list[int]()
    kit.forwarder.then(gate_step(gate, reached), gate_step(gate, reached))
    record = make_record()
    tasks = [asyncio.create_task(kit.pool.invoke(make_invocation(record))) for _ in range(2)]
    await eventually(lambda: len(reached) == 2)
    gate.set()
    r1, r2 = await asyncio.gather(*tasks)
    assert r1.error is None and r2.error is None
    assert r1.cold_start and r2.cold_start
    assert r1.instance != r2.instance
    assert len(set(reached)) == 2
    assert len(kit.runtime.containers) == 2


async def test_max_instances_one_queues_the_second_invoke_on_the_same_instance(
    kit: PoolKit,
) -> None:
    gate, reached = asyncio.Event(), list[int]()
    kit.forwarder.then(gate_step(gate, reached))
    record = make_record(max_instances=1)
    t1 = asyncio.create_task(kit.pool.invoke(make_invocation(record, request_id="first")))
    await eventually(lambda: len(reached) == 1)
    t2 = asyncio.create_task(kit.pool.invoke(make_invocation(record, request_id="second")))
    await asyncio.sleep(0.05)
    # The second is waiting for the only instance, not starting another.
    assert len(kit.forwarder.calls) == 1
    assert len(kit.runtime.containers) == 1
    gate.set()
    r1, r2 = await asyncio.gather(t1, t2)
    assert r1.error is None and r2.error is None, (r1.error, r2.error)
    assert r1.cold_start and not r2.cold_start
    assert r2.instance == r1.instance
    assert r2.timings["wait"] >= 0.04
    assert len(kit.runtime.containers) == 1


async def test_max_instances_wait_gives_up_at_the_deadline(kit: PoolKit) -> None:
    gate = asyncio.Event()
    kit.forwarder.then(gate_step(gate))
    record = make_record(max_instances=1)
    t1 = asyncio.create_task(kit.pool.invoke(make_invocation(record)))
    await eventually(lambda: len(kit.forwarder.calls) == 1)
    started = time.monotonic()
    # The slot wait ends SLOT_WAIT_MARGIN_S (0.5 s) before the deadline, so that the
    # caller hears why rather than its own timeout.
    r2 = await kit.pool.invoke(make_invocation(record, deadline_in_s=0.7))
    assert 0.15 < time.monotonic() - started < 0.6
    assert error_type(r2) == "ConcurrencyLimitExceeded"
    assert r2.status == 429
    gate.set()
    assert (await t1).error is None


async def test_invocation_without_deadline_waits_for_a_busy_instance(kit: PoolKit) -> None:
    gate = asyncio.Event()
    kit.forwarder.then(gate_step(gate))
    record = make_record(max_instances=1)
    t1 = asyncio.create_task(kit.pool.invoke(make_invocation(record, deadline_in_s=None)))
    await eventually(lambda: len(kit.forwarder.calls) == 1)
    t2 = asyncio.create_task(kit.pool.invoke(make_invocation(record, deadline_in_s=None)))
    await asyncio.sleep(0.05)
    gate.set()
    r1, r2 = await asyncio.gather(t1, t2)
    assert r1.error is None
    assert r2.error is None, r2.error


# -- start failures --------------------------------------------------------------------------


async def test_start_failure_is_container_init_error_and_instance_is_removed(
    kit: PoolKit,
) -> None:
    kit.runtime.queue(Behaviour(start_error=lambda: ContainerInitError('exec: "srv": not found')))
    record = make_record()
    result = await kit.pool.invoke(make_invocation(record))
    assert error_type(result) == "ContainerInitError"
    assert result.status == 502
    assert "not found" in result.error["message"]  # type: ignore[index]
    assert kit.forwarder.calls == []
    await eventually(lambda: kit.pool.instances() == [])
    [cid] = kit.runtime.containers
    # Killed at once: a failed start gets no grace period.
    assert kit.runtime.removed == [(cid, 0.0)]
    assert not kit.pool.owns_container(cid)
    # The next invocation starts a fresh instance.
    again = await kit.pool.invoke(make_invocation(record))
    assert again.error is None and again.cold_start


async def test_engine_crash_during_start_is_internal_error(kit: PoolKit) -> None:
    kit.runtime.queue(Behaviour(start_error=lambda: RuntimeError("engine exploded")))
    result = await kit.pool.invoke(make_invocation(make_record()))
    assert error_type(result) == "InternalError"
    assert "engine exploded" in result.error["message"]  # type: ignore[index]
    await eventually(lambda: kit.pool.instances() == [])


async def test_exit_127_during_init_is_container_init_error(kit: PoolKit) -> None:
    logs = ["exec /srv: no such file or directory"]
    kit.runtime.queue(Behaviour(exit_code=127, logs=logs))
    result = await kit.pool.invoke(make_invocation(make_record()))
    assert error_type(result) == "ContainerInitError"
    assert result.error is not None
    assert result.error["code"] == 445
    assert result.error["exit_code"] == 127
    assert result.error["logs"] == logs
    assert "Command and Args" in result.error["message"]
    await eventually(lambda: kit.pool.instances() == [])


async def test_exit_3_during_init_is_user_process_exited_with_logs(kit: PoolKit) -> None:
    logs = [f"line {i}" for i in range(10)]
    kit.runtime.queue(Behaviour(exit_code=3, logs=logs))
    result = await kit.pool.invoke(make_invocation(make_record()))
    assert error_type(result) == "UserProcessExited"
    assert result.error is not None
    assert result.error["exit_code"] == 3
    # The last log_tail_lines (5) lines.
    assert result.error["logs"] == logs[-5:]
    assert "code 3" in result.error["message"]
    await eventually(lambda: kit.pool.instances() == [])


async def test_oom_during_init_is_out_of_memory(kit: PoolKit) -> None:
    kit.runtime.queue(Behaviour(exit_code=137, oom_killed=True))
    result = await kit.pool.invoke(make_invocation(make_record(memory_mb=128)))
    assert error_type(result) == "OutOfMemory"
    assert "128 MB" in result.error["message"]  # type: ignore[index]


async def test_never_ready_is_init_container_timeout(kit: PoolKit) -> None:
    kit.runtime.queue(Behaviour(ready=False, logs=["starting on 127.0.0.1:9000"]))
    record = make_record(init_timeout_s=0.3)
    started = time.monotonic()
    result = await kit.pool.invoke(make_invocation(record))
    elapsed = time.monotonic() - started
    assert error_type(result) == "InitContainerTimeout"
    assert result.status == 504
    assert result.error is not None
    assert result.error["code"] == 450
    assert "port 9000" in result.error["message"]
    assert result.error["logs"] == ["starting on 127.0.0.1:9000"]
    assert 0.3 <= elapsed < 2.0
    await eventually(lambda: kit.pool.instances() == [])
    assert len(kit.runtime.removed) == 1


async def test_listening_on_the_wrong_address_is_port_binding_failed(
    kit: PoolKit, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def listeners(pid: int) -> list[str]:
        return ["127.0.0.1:9000"]

    monkeypatch.setattr("workers.failures.diagnose_listeners", listeners)
    kit.runtime.queue(Behaviour(ready=False))
    result = await kit.pool.invoke(make_invocation(make_record(init_timeout_s=0.1)))
    assert error_type(result) == "PortBindingFailed"
    assert result.error is not None
    assert result.error["listening"] == ["127.0.0.1:9000"]
    assert "127.0.0.1:9000" in result.error["message"]


# -- failures while running ----------------------------------------------------------------


async def test_function_timeout_kills_the_instance_and_the_next_invoke_starts_anew(
    make_pool: Callable[..., PoolKit],
) -> None:
    kit = make_pool(stop_timeout_s=5.0)
    kit.forwarder.then(FunctionTimeout("function did not answer within 3 s"))
    record = make_record()
    r1 = await kit.pool.invoke(make_invocation(record))
    assert error_type(r1) == "FunctionTimeout"
    assert r1.status == 504
    assert r1.error is not None and r1.error["code"] == 433
    await eventually(lambda: kit.pool.instances() == [])
    [cid] = kit.runtime.containers
    # Killed without the stop grace period (its state is unknown).
    assert kit.runtime.removed == [(cid, 0.0)]

    r2 = await kit.pool.invoke(make_invocation(record))
    assert r2.error is None
    assert r2.cold_start
    assert r2.instance != r1.instance
    assert len(kit.runtime.containers) == 2


async def test_connection_lost_after_exit_is_user_process_exited(kit: PoolKit) -> None:
    async def crash(port: int, inv: Invocation, timeout_s: float) -> Response:
        await kit.runtime.exit(kit.runtime.by_port(port).id, 1)
        raise ConnectionLost("Server disconnected")

    kit.forwarder.then(crash)
    kit.runtime.default = Behaviour(logs=["Traceback", "ZeroDivisionError"])
    result = await kit.pool.invoke(make_invocation(make_record()))
    assert error_type(result) == "UserProcessExited"
    assert result.error is not None
    assert result.error["exit_code"] == 1
    assert result.error["code"] == 439
    assert result.error["logs"] == ["Traceback", "ZeroDivisionError"]
    await eventually(lambda: kit.pool.instances() == [])
    assert kit.runtime.removed[0][1] == 0.0


async def test_connection_lost_after_oom_kill_is_out_of_memory(kit: PoolKit) -> None:
    async def oom(port: int, inv: Invocation, timeout_s: float) -> Response:
        await kit.runtime.exit(kit.runtime.by_port(port).id, 137, oom=True)
        raise ConnectionLost("Server disconnected")

    kit.forwarder.then(oom)
    result = await kit.pool.invoke(make_invocation(make_record()))
    assert error_type(result) == "OutOfMemory"
    await eventually(lambda: kit.pool.instances() == [])


async def test_connection_lost_while_still_running_is_user_code_error(kit: PoolKit) -> None:
    kit.forwarder.then(ConnectionLost("Server disconnected"))
    result = await kit.pool.invoke(make_invocation(make_record()))
    assert error_type(result) == "UserCodeError"
    assert "Server disconnected" in result.error["message"]  # type: ignore[index]
    # Its state is unknown: the instance is not reused.
    await eventually(lambda: kit.pool.instances() == [])


async def test_event_function_answering_500_is_user_code_error_and_instance_kept(
    kit: PoolKit,
) -> None:
    kit.forwarder.then(Response(500, [("Content-Type", "text/plain")], b"boom \xff"))
    record = make_record()
    r1 = await kit.pool.invoke(make_invocation(record))
    assert error_type(r1) == "UserCodeError"
    assert r1.status == 502
    assert r1.error is not None
    assert r1.error["function_status"] == 500
    assert r1.error["function_body"] == "boom \ufffd"
    [inst] = kit.pool.instances()
    assert inst.state is State.READY and not inst.retire_reason
    r2 = await kit.pool.invoke(make_invocation(record))
    assert r2.error is None
    assert r2.instance == r1.instance and not r2.cold_start
    assert kit.runtime.removed == []


async def test_web_function_status_passes_through(kit: PoolKit) -> None:
    kit.forwarder.then(Response(404, [("X-A", "1"), ("X-A", "2")], b"nope"))
    result = await kit.pool.invoke(make_invocation(make_record(type="web")))
    assert result.error is None
    assert (result.status, result.headers, result.body) == (
        404,
        [("X-A", "1"), ("X-A", "2")],
        b"nope",
    )


# -- instance lifecycle ----------------------------------------------------------------------


async def test_idle_instance_is_removed_after_its_ttl(make_pool: Callable[..., PoolKit]) -> None:
    kit = make_pool(stop_timeout_s=1.5)
    result = await kit.pool.invoke(make_invocation(make_record(idle_ttl_s=0.3)))
    assert result.error is None
    await asyncio.sleep(0.05)
    assert [i.id for i in kit.pool.instances()] == [result.instance]
    await eventually(lambda: kit.pool.instances() == [])
    [cid] = kit.runtime.containers
    # Idle instances get the graceful stop.
    assert kit.runtime.removed == [(cid, 1.5)]


async def test_use_pushes_the_idle_deadline_back(kit: PoolKit) -> None:
    record = make_record(idle_ttl_s=0.6)
    first = await kit.pool.invoke(make_invocation(record))
    for _ in range(3):
        await asyncio.sleep(0.15)
        again = await kit.pool.invoke(make_invocation(record))
        assert again.instance == first.instance and not again.cold_start
    await eventually(lambda: kit.pool.instances() == [])


async def test_new_version_does_not_retire_the_old_versions_idle_instance(
    kit: PoolKit,
) -> None:
    # An alias may still send work to the old version: its warm instance stays.
    old = await kit.pool.invoke(make_invocation(make_record("f", version=1)))
    new = await kit.pool.invoke(make_invocation(make_record("f", version=2)))
    assert old.error is None and new.error is None
    assert new.instance != old.instance
    assert new.cold_start
    await asyncio.sleep(0.05)
    assert {i.id for i in kit.pool.instances()} == {old.instance, new.instance}
    old_c, new_c = kit.runtime.containers.values()
    assert not old_c.removed and not new_c.removed
    assert (old_c.config.image, new_c.config.image) == (image_ref_of("f", 1), image_ref_of("f", 2))
    # Each version keeps running on its own warm instance.
    again_old = await kit.pool.invoke(make_invocation(make_record("f", version=1)))
    again_new = await kit.pool.invoke(make_invocation(make_record("f", version=2)))
    assert (again_old.instance, again_old.cold_start) == (old.instance, False)
    assert (again_new.instance, again_new.cold_start) == (new.instance, False)
    assert kit.pool.images_in_use() == {image_ref_of("f", 1), image_ref_of("f", 2)}


async def test_at_max_instances_the_idle_old_version_is_evicted_for_the_new(
    make_pool: Callable[..., PoolKit],
) -> None:
    kit = make_pool(stop_timeout_s=1.0)
    old = await kit.pool.invoke(make_invocation(make_record("f", version=1, max_instances=1)))
    new = await kit.pool.invoke(make_invocation(make_record("f", version=2, max_instances=1)))
    assert old.error is None and new.error is None, (old.error, new.error)
    assert new.cold_start and new.instance != old.instance
    await eventually(lambda: [i.id for i in kit.pool.instances()] == [new.instance])
    old_c, new_c = kit.runtime.containers.values()
    assert old_c.removed and not new_c.removed
    # An eviction is a graceful stop, not a kill.
    assert kit.runtime.removed == [(old_c.id, 1.0)]


async def test_at_max_instances_a_busy_old_version_makes_the_new_one_wait(
    kit: PoolKit,
) -> None:
    gate = asyncio.Event()
    kit.forwarder.then(gate_step(gate))
    busy = asyncio.create_task(
        kit.pool.invoke(make_invocation(make_record("f", version=1, max_instances=1)))
    )
    await eventually(lambda: len(kit.forwarder.calls) == 1)
    waiting = asyncio.create_task(
        kit.pool.invoke(make_invocation(make_record("f", version=2, max_instances=1)))
    )
    await asyncio.sleep(0.05)
    assert not waiting.done() and len(kit.runtime.containers) == 1
    gate.set()
    first, second = await asyncio.gather(busy, waiting)
    assert first.error is None and second.error is None, (first.error, second.error)
    # Once the old version's instance went idle it gave its place up.
    assert second.cold_start and second.instance != first.instance
    await eventually(lambda: [i.id for i in kit.pool.instances()] == [second.instance])


async def test_memory_pressure_evicts_the_functions_idle_old_version(
    make_pool: Callable[..., PoolKit],
) -> None:
    kit = make_pool(memory_capacity_mb=2048)  # each reserves memory_mb + tmp_mb (512)
    old = await kit.pool.invoke(make_invocation(make_record("f", version=1, memory_mb=768)))
    new = await kit.pool.invoke(make_invocation(make_record("f", version=2, memory_mb=512)))
    assert old.error is None and new.error is None
    await eventually(lambda: [i.id for i in kit.pool.instances()] == [new.instance])


async def test_memory_pressure_evicts_another_functions_idle_instance(
    make_pool: Callable[..., PoolKit],
) -> None:
    kit = make_pool(memory_capacity_mb=2048)  # each reserves memory_mb + tmp_mb (512)
    g = await kit.pool.invoke(make_invocation(make_record("g", memory_mb=768)))
    f = await kit.pool.invoke(make_invocation(make_record("f", memory_mb=512)))
    assert g.error is None and f.error is None
    await eventually(lambda: [i.id for i in kit.pool.instances()] == [f.instance])
    g_c, f_c = kit.runtime.containers.values()
    assert g_c.removed and not f_c.removed


async def test_container_died_on_an_idle_instance_removes_it(kit: PoolKit) -> None:
    record = make_record()
    first = await kit.pool.invoke(make_invocation(record))
    [cid] = kit.runtime.containers
    kit.pool.container_died("not-ours")  # ignored
    await asyncio.sleep(0.02)
    assert len(kit.pool.instances()) == 1
    await kit.runtime.exit(cid, 0)
    kit.pool.container_died(cid)
    await eventually(lambda: kit.pool.instances() == [])
    assert kit.runtime.removed[0][0] == cid
    again = await kit.pool.invoke(make_invocation(record))
    assert again.error is None and again.instance != first.instance


async def test_shutdown_removes_every_container_and_refuses_new_work(kit: PoolKit) -> None:
    for name in ("a", "b", "c"):
        assert (await kit.pool.invoke(make_invocation(make_record(name)))).error is None
    assert len(kit.runtime.live()) == 3
    await kit.pool.shutdown(timeout_s=2)
    assert kit.pool.instances() == []
    assert kit.runtime.live() == []
    assert sorted(cid for cid, _ in kit.runtime.removed) == sorted(kit.runtime.containers)
    result = await kit.pool.invoke(make_invocation(make_record("a")))
    assert error_type(result) == "ServiceUnavailable"
    assert result.status == 503


async def test_shutdown_of_an_empty_pool_is_quick(kit: PoolKit) -> None:
    started = time.monotonic()
    await kit.pool.shutdown(timeout_s=2)
    await kit.pool.shutdown(timeout_s=2)
    assert time.monotonic() - started < 0.5


async def test_waiter_gets_a_fresh_instance_when_the_only_start_fails(kit: PoolKit) -> None:
    kit.runtime.queue(
        Behaviour(start_delay_s=0.1, start_error=lambda: ContainerInitError("no such command"))
    )
    record = make_record(max_instances=1)
    t1 = asyncio.create_task(kit.pool.invoke(make_invocation(record)))
    await eventually(lambda: len(kit.runtime.containers) == 1)
    t2 = asyncio.create_task(kit.pool.invoke(make_invocation(record)))
    r1, r2 = await asyncio.gather(t1, t2)
    assert error_type(r1) == "ContainerInitError"
    assert r2.error is None, r2.error
    assert r2.cold_start
    assert len(kit.runtime.containers) == 2


async def test_busy_instance_whose_container_died_is_removed_after_its_request(
    kit: PoolKit,
) -> None:
    gate = asyncio.Event()
    kit.forwarder.then(gate_step(gate))
    task = asyncio.create_task(kit.pool.invoke(make_invocation(make_record())))
    await eventually(lambda: len(kit.forwarder.calls) == 1)
    [cid] = kit.runtime.containers
    kit.pool.container_died(cid)
    await asyncio.sleep(0.02)
    # Not pulled from under the running request...
    assert kit.runtime.removed == []
    gate.set()
    assert (await task).error is None
    # ...but not reused afterwards either.
    await eventually(lambda: kit.pool.instances() == [])
    assert kit.runtime.removed[0][0] == cid


async def test_instance_started_for_a_cancelled_invocation_still_idles_out(
    kit: PoolKit,
) -> None:
    kit.runtime.queue(Behaviour(start_delay_s=0.1))
    task = asyncio.create_task(kit.pool.invoke(make_invocation(make_record(idle_ttl_s=0.2))))
    await eventually(lambda: len(kit.runtime.containers) == 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The start goes on; with nobody using the instance it must reach its idle TTL.
    await eventually(lambda: kit.pool.instances() == [], timeout_s=1.5)


async def test_waiter_gets_the_instance_whose_starter_gave_up(kit: PoolKit) -> None:
    kit.runtime.queue(Behaviour(start_delay_s=0.1))
    record = make_record(max_instances=1)
    starter = asyncio.create_task(kit.pool.invoke(make_invocation(record)))
    await eventually(lambda: len(kit.runtime.containers) == 1)
    waiter = asyncio.create_task(kit.pool.invoke(make_invocation(record, deadline_in_s=1.0)))
    await asyncio.sleep(0.02)
    starter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await starter
    cancelled_at = time.monotonic()
    result = await waiter
    assert result.error is None, result.error
    assert len(kit.runtime.containers) == 1
    # The instance is ready about 0.1 s later; the waiter must not sit out its deadline.
    assert time.monotonic() - cancelled_at < 0.6


async def test_memory_waiter_is_woken_when_another_functions_instance_goes_idle(
    make_pool: Callable[..., PoolKit],
) -> None:
    kit = make_pool(memory_capacity_mb=2048)  # each reserves memory_mb + tmp_mb (512)
    gate = asyncio.Event()
    kit.forwarder.then(gate_step(gate))
    busy = asyncio.create_task(
        kit.pool.invoke(make_invocation(make_record("g", memory_mb=768), deadline_in_s=5))
    )
    await eventually(lambda: len(kit.forwarder.calls) == 1)
    started = time.monotonic()
    waiting = asyncio.create_task(
        kit.pool.invoke(make_invocation(make_record("f", memory_mb=512), deadline_in_s=5))
    )
    await asyncio.sleep(0.1)
    assert not waiting.done()  # g's busy instance holds the memory
    gate.set()
    assert (await busy).error is None
    result = await waiting
    # Woken when g's instance went idle (then evicted), not at the end of its wait.
    assert result.error is None, result.error
    assert time.monotonic() - started < 2


# -- images --------------------------------------------------------------------------------


async def test_cold_start_pulls_the_pinned_image_and_reports_the_pull_time(
    kit: PoolKit,
) -> None:
    kit.runtime.queue_pulls(PullBehaviour(delay_s=0.1))
    record = make_record("pulled", version=2)
    first = await kit.pool.invoke(make_invocation(record))
    assert first.error is None, first.error
    assert first.cold_start
    assert {"pull", *COLD_TIMINGS} <= set(first.timings)
    assert first.timings["pull"] >= 0.1
    # By digest, with a token for that one repository.
    [(pulled, auth)] = kit.runtime.pulls
    assert pulled == record.image_ref
    [(repository, token)] = kit.tokens.issued
    assert repository == "pulled"
    assert auth == {"registrytoken": token}
    [c] = kit.runtime.containers.values()
    assert c.config.image == record.image_ref

    warm = await kit.pool.invoke(make_invocation(record))
    assert not warm.cold_start and "pull" not in warm.timings
    assert len(kit.runtime.pulls) == 1


async def test_image_already_on_the_worker_is_not_pulled(kit: PoolKit) -> None:
    record = make_record()
    kit.runtime.add_image(record.image_ref)
    result = await kit.pool.invoke(make_invocation(record))
    assert result.error is None and result.cold_start
    assert "pull" not in result.timings
    assert kit.runtime.pulls == [] and kit.tokens.issued == []


async def test_concurrent_cold_starts_of_one_version_pull_once(kit: PoolKit) -> None:
    kit.runtime.queue_pulls(PullBehaviour(delay_s=0.1))
    gate, reached = asyncio.Event(), list[int]()
    kit.forwarder.then(*(gate_step(gate, reached) for _ in range(3)))
    record = make_record()
    tasks = [asyncio.create_task(kit.pool.invoke(make_invocation(record))) for _ in range(3)]
    await eventually(lambda: len(reached) == 3)
    gate.set()
    results = await asyncio.gather(*tasks)
    assert all(r.error is None and r.cold_start for r in results), [r.error for r in results]
    assert len({r.instance for r in results}) == 3
    assert len(kit.runtime.pulls) == 1
    # Every one of them waited for the one pull.
    assert all(r.timings["pull"] >= 0.09 for r in results)


async def test_pull_failure_is_the_invocations_error_and_the_instance_is_removed(
    kit: PoolKit,
) -> None:
    kit.runtime.queue_pulls(pull_failure("manifest unknown"))
    record = make_record()
    result = await kit.pool.invoke(make_invocation(record))
    assert error_type(result) == "PullImageFailed"
    assert result.status == 502
    assert result.error is not None and result.error["code"] == 444
    assert "manifest unknown" in result.error["message"]
    assert not result.cold_start
    await eventually(lambda: kit.pool.instances() == [])
    # No container was ever created for it.
    assert kit.runtime.containers == {} and kit.forwarder.calls == []
    # The next invocation tries again.
    again = await kit.pool.invoke(make_invocation(record))
    assert again.error is None, again.error
    assert again.cold_start and len(kit.runtime.pulls) == 2


async def test_wrong_digest_after_the_pull_is_pull_image_failed(kit: PoolKit) -> None:
    kit.runtime.queue_pulls(PullBehaviour(wrong_digest=True))
    record = make_record()
    result = await kit.pool.invoke(make_invocation(record))
    assert error_type(result) == "PullImageFailed"
    assert record.image_ref in result.error["message"]  # type: ignore[index]
    await eventually(lambda: kit.pool.instances() == [])
    assert kit.runtime.containers == {}


async def test_slow_pull_is_pull_image_timeout(make_pool: Callable[..., PoolKit]) -> None:
    kit = make_pool(registry=dataclasses.replace(TEST_REGISTRY, pull_timeout_s=0.1))
    kit.runtime.queue_pulls(PullBehaviour(delay_s=5.0))
    started = time.monotonic()
    result = await kit.pool.invoke(make_invocation(make_record()))
    assert time.monotonic() - started < 1.0
    assert error_type(result) == "PullImageTimeout"
    assert result.status == 504
    assert result.error is not None and result.error["code"] == 447
    await eventually(lambda: kit.pool.instances() == [])
    assert kit.runtime.containers == {}
    assert kit.runtime.pulls_cancelled == [make_record().image_ref]


async def test_pull_token_is_never_logged_nor_given_to_the_function(kit: PoolKit) -> None:
    failing = make_record("bad")
    kit.runtime.queue_pulls(PullBehaviour(delay_s=0.01), pull_failure("denied"))
    with capture_logs() as logs:
        ok = await kit.pool.invoke(make_invocation(make_record("good")))
        bad = await kit.pool.invoke(make_invocation(failing))
    assert ok.error is None and error_type(bad) == "PullImageFailed"
    tokens = [token for _, token in kit.tokens.issued]
    assert len(tokens) == 2
    events = [e["event"] for e in logs]
    assert {"image_pull_started", "image_pulled", "instance_start_failed"} <= set(events)
    everything = repr(logs) + repr(bad) + repr(ok)
    everything += repr([c.config for c in kit.runtime.containers.values()])
    for token in tokens:
        assert token not in everything
        assert "s3cr3t" not in everything


async def test_images_in_use_are_those_of_live_instances(kit: PoolKit) -> None:
    assert kit.pool.images_in_use() == set()
    a = make_record("a", idle_ttl_s=0.2)
    assert (await kit.pool.invoke(make_invocation(a))).error is None
    assert kit.pool.images_in_use() == {a.image_ref}
    await eventually(lambda: kit.pool.instances() == [])
    assert kit.pool.images_in_use() == set()


async def test_unused_images_are_collected_but_not_those_of_live_instances(
    make_pool: Callable[..., PoolKit],
) -> None:
    kit = make_pool(registry=dataclasses.replace(TEST_REGISTRY, image_cache_mb=250))
    a = make_record("a", idle_ttl_s=0.2)
    b = make_record("b")
    c = make_record("c")
    for record in (a, b):
        assert (await kit.pool.invoke(make_invocation(record))).error is None
    await eventually(lambda: [i.function for i in kit.pool.instances()] == ["b"])
    assert kit.runtime.removed_images == []  # 200 MB: within the bound
    assert (await kit.pool.invoke(make_invocation(c))).error is None
    # 300 MB: a's image goes (least recently used, no instance); b's is in use.
    assert kit.runtime.removed_images == [a.image_ref]
    assert set(kit.runtime.images) == {b.image_ref, c.image_ref}


async def test_cold_start_finishing_after_the_deadline_keeps_the_instance_warm(
    kit: PoolKit,
) -> None:
    kit.runtime.queue(Behaviour(start_delay_s=0.3))
    record = make_record()
    late = await kit.pool.invoke(make_invocation(record, deadline_in_s=0.1))
    assert error_type(late) == "FunctionTimeout"
    assert kit.forwarder.calls == []  # never sent to the function
    [inst] = kit.pool.instances()
    assert inst.state is State.READY
    again = await kit.pool.invoke(make_invocation(record))
    assert again.error is None and again.instance == inst.id and not again.cold_start


# -- freezing idle instances ---------------------------------------------------------------


async def test_idle_instance_is_frozen_and_woken_by_the_next_invocation(
    make_pool: Callable[..., PoolKit],
) -> None:
    kit = make_pool(pause_after_s=0.1)
    record = make_record()
    first = await kit.pool.invoke(make_invocation(record))
    [inst] = kit.pool.instances()
    await eventually(lambda: inst.state is State.PAUSED)
    [cid] = kit.runtime.containers
    assert kit.runtime.pauses == [cid] and kit.runtime.containers[cid].paused
    woken = await kit.pool.invoke(make_invocation(record))
    assert woken.error is None
    assert woken.instance == first.instance and not woken.cold_start
    assert "wake" in woken.timings
    assert kit.runtime.unpauses == [cid] and not kit.runtime.containers[cid].paused
    assert inst.state is State.READY


async def test_frozen_instance_still_goes_after_idle_ttl(
    make_pool: Callable[..., PoolKit],
) -> None:
    kit = make_pool(pause_after_s=0.05)
    await kit.pool.invoke(make_invocation(make_record(idle_ttl_s=0.4)))
    [inst] = kit.pool.instances()
    await eventually(lambda: inst.state is State.PAUSED)
    await eventually(lambda: kit.pool.instances() == [], timeout_s=3)
    assert kit.runtime.removed


async def test_invocations_racing_a_pause_all_get_the_instance(
    make_pool: Callable[..., PoolKit],
) -> None:
    kit = make_pool(pause_after_s=0.05)
    kit.runtime.unpause_delay_s = 0.05
    record = make_record(max_instances=1)
    await kit.pool.invoke(make_invocation(record))
    [inst] = kit.pool.instances()
    await eventually(lambda: inst.state is State.PAUSED)
    results = await asyncio.gather(*(kit.pool.invoke(make_invocation(record)) for _ in range(3)))
    assert [r.error for r in results] == [None, None, None]
    assert {r.instance for r in results} == {inst.id}


async def test_a_failed_pause_retires_the_instance(make_pool: Callable[..., PoolKit]) -> None:
    kit = make_pool(pause_after_s=0.05)
    kit.runtime.pause_error = RuntimeError("freezer unavailable")
    first = await kit.pool.invoke(make_invocation(make_record()))
    await eventually(lambda: kit.pool.instances() == [])
    again = await kit.pool.invoke(make_invocation(make_record()))
    assert again.error is None and again.instance != first.instance


async def test_frozen_instances_are_evicted_under_memory_pressure(
    make_pool: Callable[..., PoolKit],
) -> None:
    kit = make_pool(memory_capacity_mb=2048, pause_after_s=0.05)
    g = await kit.pool.invoke(make_invocation(make_record("g", memory_mb=768)))
    [g_inst] = kit.pool.instances()
    await eventually(lambda: g_inst.state is State.PAUSED)
    f = await kit.pool.invoke(make_invocation(make_record("f", memory_mb=512)))
    assert g.error is None and f.error is None
    await eventually(lambda: [i.id for i in kit.pool.instances()] == [f.instance])


# -- instance concurrency (web functions) --------------------------------------------------


async def test_web_instance_takes_instance_concurrency_requests_at_once(kit: PoolKit) -> None:
    gate = asyncio.Event()
    reached: list[int] = []
    for _ in range(4):
        kit.forwarder.then(gate_step(gate, reached))
    record = make_record("site", type="web", instance_concurrency=4)
    tasks = [asyncio.create_task(kit.pool.invoke(make_invocation(record))) for _ in range(4)]
    await eventually(lambda: len(reached) == 4)
    # All four reached the function at once, on one instance that started once.
    assert len(kit.runtime.containers) == 1
    gate.set()
    results = await asyncio.gather(*tasks)
    assert all(r.error is None for r in results)
    assert len({r.instance for r in results}) == 1
    assert sum(r.cold_start for r in results) == 4  # all waited for the one start


async def test_fifth_concurrent_web_request_starts_a_second_instance(kit: PoolKit) -> None:
    gate = asyncio.Event()
    for _ in range(5):
        kit.forwarder.then(gate_step(gate))
    record = make_record("site", type="web", instance_concurrency=4)
    tasks = [asyncio.create_task(kit.pool.invoke(make_invocation(record))) for _ in range(5)]
    await eventually(lambda: len(kit.forwarder.calls) == 5)
    assert len(kit.runtime.containers) == 2
    gate.set()
    results = await asyncio.gather(*tasks)
    assert all(r.error is None for r in results)


async def test_caller_leaving_during_a_wake_leaves_the_instance_ready(
    make_pool: Callable[..., PoolKit],
) -> None:
    kit = make_pool(pause_after_s=0.05)
    record = make_record()
    await kit.pool.invoke(make_invocation(record))
    [inst] = kit.pool.instances()
    await eventually(lambda: inst.state is State.PAUSED)
    kit.runtime.unpause_delay_s = 0.2
    caller = asyncio.create_task(kit.pool.invoke(make_invocation(record)))
    await eventually(lambda: inst.state is State.RESUMING)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    # Not stuck BUSY with nothing in flight: idle again, so it can freeze or be evicted.
    await eventually(lambda: inst.state in (State.READY, State.PAUSING, State.PAUSED))
    assert inst.inflight == 0


# -- provisioned instances -----------------------------------------------------------------


async def test_provisioned_instances_start_before_traffic_and_are_kept(
    make_pool: Callable[..., PoolKit],
) -> None:
    kit = make_pool(pause_after_s=0.05)
    record = make_record(idle_ttl_s=0.2)
    kit.pool.set_provisioned({(record.spec.name, record.version): (record, 3)})
    await eventually(lambda: [i.state for i in kit.pool.instances()] == [State.READY] * 3)
    await asyncio.sleep(0.4)  # past the idle TTL and the pause delay
    assert [i.state for i in kit.pool.instances()] == [State.READY] * 3
    assert kit.runtime.pauses == []
    results = await asyncio.gather(*(kit.pool.invoke(make_invocation(record)) for _ in range(3)))
    assert [r.cold_start for r in results] == [False, False, False]
    assert kit.pool.inventory()[f"{record.spec.name}@{record.version}"]["provisioned"] == 3


async def test_a_dead_provisioned_instance_is_replaced(kit: PoolKit) -> None:
    record = make_record()
    kit.pool.set_provisioned({(record.spec.name, record.version): (record, 1)})
    await eventually(lambda: [i.state for i in kit.pool.instances()] == [State.READY])
    [cid] = kit.runtime.containers
    await kit.runtime.exit(cid, 137)
    kit.pool.container_died(cid)
    await eventually(lambda: len(kit.runtime.containers) == 2)
    await eventually(lambda: [i.state for i in kit.pool.instances()] == [State.READY])


async def test_unwanted_provisioned_instances_become_ordinary_and_idle_out(
    kit: PoolKit,
) -> None:
    record = make_record(idle_ttl_s=0.2)
    kit.pool.set_provisioned({(record.spec.name, record.version): (record, 2)})
    await eventually(lambda: len(kit.pool.instances()) == 2)
    kit.pool.set_provisioned({})
    await eventually(lambda: kit.pool.instances() == [], timeout_s=3)


async def test_a_provisioned_instance_that_cannot_start_is_retried_with_backoff(
    kit: PoolKit,
) -> None:
    kit.runtime.default = Behaviour(start_error=lambda: ContainerInitError("bad command"))
    record = make_record()
    kit.pool.set_provisioned({(record.spec.name, record.version): (record, 1)})
    await asyncio.sleep(0.5)
    # Not a tight loop: the first failure waits 1 s before the next attempt.
    assert len(kit.runtime.containers) <= 2


async def test_a_hot_function_cannot_hold_every_slot_of_the_worker(
    make_pool: Callable[..., PoolKit],
) -> None:
    kit = make_pool(max_waiting_per_function=2)
    gate = asyncio.Event()
    # The first hot call holds its instance; the next forward is the other function's.
    kit.forwarder.then(gate_step(gate), Response(200, [], b"other-fn"))
    hot = make_record("hot", max_instances=1)
    running = asyncio.create_task(kit.pool.invoke(make_invocation(hot)))
    await eventually(lambda: len(kit.forwarder.calls) == 1)
    waiting = [asyncio.create_task(kit.pool.invoke(make_invocation(hot))) for _ in range(2)]
    await asyncio.sleep(0.05)
    # A third waiter is refused at once instead of holding a worker permit.
    refused = await kit.pool.invoke(make_invocation(hot))
    assert error_type(refused) == "ConcurrencyLimitExceeded"
    # Another function is served meanwhile.
    other = await kit.pool.invoke(make_invocation(make_record("other")))
    assert other.error is None and other.body == b"other-fn"
    gate.set()
    assert all(r.error is None for r in await asyncio.gather(running, *waiting))


async def test_provisioning_starts_in_bounded_bursts(make_pool: Callable[..., PoolKit]) -> None:
    kit = make_pool(provision_burst=2)
    kit.runtime.default = Behaviour(start_delay_s=0.2)
    record = make_record(max_instances=10)
    kit.pool.set_provisioned({(record.spec.name, record.version): (record, 5)})
    await asyncio.sleep(0.05)
    assert len(kit.runtime.containers) == 2  # the first burst only
    await eventually(
        lambda: [i.state for i in kit.pool.instances()] == [State.READY] * 5, timeout_s=5
    )


async def test_prepull_pulls_images_ahead_of_need_once(kit: PoolKit) -> None:
    record = make_record()
    kit.pool.prepull([record.image_ref, record.image_ref])
    await eventually(lambda: [r for r, _ in kit.runtime.pulls] == [record.image_ref])
    result = await kit.pool.invoke(make_invocation(record))
    assert result.error is None and "pull" not in result.timings
