"""The container pool of one worker: owns every instance, places invocations on them.

Each instance has one owner task (``_own``) that drives it through its states: start,
then wait — for the idle TTL, a retire request or a death — then stop and remove. The
invocation path (``invoke``) only acquires an instance, forwards, and releases; where to
run is decided by ``workers.decisions.choose`` from snapshots.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import time
import uuid
from typing import Any, Protocol

import structlog

from shared.errors import (
    ConcurrencyLimitExceeded,
    ContainerInitError,
    FunctionTimeout,
    ImagefnError,
    InitContainerTimeout,
    InternalError,
    OutOfMemory,
    PortBindingFailed,
    ServiceUnavailable,
    UserCodeError,
    UserProcessExited,
)
from shared.messages import Invocation, InvocationResult
from shared.settings import WorkerSettings
from shared.settings_security import NetworkSettings
from shared.spec import FunctionRecord
from workers import decisions, sandbox
from workers.forwarder import ConnectionLost, Forwarder, Response
from workers.instance import ASLEEP_STATES, STARTING_STATES, Instance, State
from workers.logship import InstanceLogs, LogSource
from workers.probe import diagnose_listeners, listens_on_9000, probe_port
from workers.runtime import (
    LABEL_FUNCTION,
    LABEL_INSTALLATION,
    LABEL_INSTANCE,
    LABEL_MANAGED,
    LABEL_WORKER,
    ContainerConfig,
    ContainerRuntime,
    ContainerState,
    wait_for_exit,
)

log = structlog.get_logger("imagefn.pool")

# Retire reasons after which the container is killed at once, even with requests on it.
KILL_REASONS = frozenset({"timeout", "crashed", "start-failed", "shutdown"})
# Engine calls (create, start, inspect) that take longer than this mean the engine is
# in trouble, not the function.
ENGINE_CALL_TIMEOUT_S = 60.0
# How often the readiness loop also asks the engine whether the process already exited.
STATE_CHECK_EVERY_S = 0.1
# A slot wait ends this long before the caller's deadline, so the caller gets the reason.
SLOT_WAIT_MARGIN_S = 0.5


class ImageProvider(Protocol):
    def check(self, image_ref: str, digest: str = "") -> None: ...
    async def ensure(self, image_ref: str) -> float: ...


class ContainerPool:
    def __init__(
        self,
        runtime: ContainerRuntime,
        forwarder: Forwarder,
        settings: WorkerSettings,
        worker_id: str,
        installation: str,
        images: ImageProvider,
        logs: InstanceLogs | None = None,
        networks: NetworkSettings | None = None,
    ) -> None:
        self._installation = installation
        # The Docker networks instances join (workers/sandbox.py chooses by egress).
        self._networks = networks or NetworkSettings()
        # Ships every instance's output (workers/logship.py); None: output stays in the
        # engine's log files only.
        self._logs = logs
        self._images = images
        self._runtime = runtime
        self._forwarder = forwarder
        self._settings = settings
        self._worker_id = worker_id
        self._instances: dict[str, Instance] = {}
        self._by_container: dict[str, Instance] = {}
        self._conds: dict[str, asyncio.Condition] = {}
        self._owners: set[asyncio.Task[None]] = set()
        self._prepulls: dict[str, asyncio.Task[None]] = {}
        # Invocations waiting for a slot, per function.
        self._waiting: dict[str, int] = {}
        # Functions with invocations waiting for memory, and how many.
        self._memory_waiters: dict[str, int] = {}
        # The cold-start manager's desired provisioned instances, and start-failure backoff.
        self._provision_targets: dict[tuple[str, int], tuple[FunctionRecord, int]] = {}
        self._provision_failures: dict[tuple[str, int], int] = {}
        self._provision_retry_at: dict[tuple[str, int], float] = {}
        self._closing = False

    # -- queries ---------------------------------------------------------------------------

    def instances(self) -> list[Instance]:
        return list(self._instances.values())

    def owns_container(self, container_id: str) -> bool:
        return container_id in self._by_container

    def images_in_use(self) -> set[str]:
        return {i.record.image_ref for i in self._instances.values()}

    # -- invocation path -------------------------------------------------------------------

    async def invoke(self, inv: Invocation) -> InvocationResult:
        """Run one invocation on an instance; never raises for the function's failures."""
        started = time.time()
        timings: dict[str, float] = {"queue": max(0.0, started - inv.enqueued_at)}
        inst: Instance | None = None
        cold = False
        logged = False
        # For the log shipper's END: the function's own HTTP status when it answered, the
        # platform's otherwise; unknown (None) if the call was abandoned (cancelled).
        status: int | None = None
        error: str | None = "Cancelled"
        try:
            # Before any instance exists: an image this worker will not run never gets a
            # container (the image store checks again before every pull and start).
            self._images.check(inv.record.image_ref, inv.record.image_digest)
            inst, cold = await self._acquire(inv, timings)
            structlog.contextvars.bind_contextvars(instance=inst.id)
            logged = self._log_started(inst, inv, cold)
            run_started = time.monotonic()
            try:
                resp = await self._run(inst, inv)
            finally:
                timings["run"] = time.monotonic() - run_started
            status, error = resp.status, None
            result = self._result(inv, resp)
        except ImagefnError as e:
            result = InvocationResult.failure(inv.request_id, e)
            status, error = status or e.http_status, e.type_name
        finally:
            if inst is not None:
                if logged and self._logs is not None:
                    self._logs.request_ended(
                        inst.container_id, inv.request_id, status=status, error=error
                    )
                await self._release(inst)
        return InvocationResult(
            request_id=result.request_id,
            status=result.status,
            headers=result.headers,
            body=result.body,
            error=result.error,
            instance=inst.id if inst is not None else "",
            worker=self._worker_id,
            cold_start=cold,
            timings={k: round(v, 6) for k, v in timings.items()},
        )

    def _log_started(self, inst: Instance, inv: Invocation, cold: bool) -> bool:
        if self._logs is None or not inst.container_id:
            return False
        init_ms = None
        if cold:
            t = inst.start_timings
            init_ms = 1000 * (t.get("create", 0.0) + t.get("start", 0.0) + t.get("ready", 0.0))
        self._logs.request_started(inst.container_id, inv.request_id, cold=cold, init_ms=init_ms)
        return True

    def _result(self, inv: Invocation, resp: Response) -> InvocationResult:
        if inv.kind == "event" and not 200 <= resp.status < 300:
            # The contract: any non-2xx answer to an event is the user code's error.
            raise UserCodeError(
                f"function answered HTTP {resp.status}",
                details={
                    "function_status": resp.status,
                    "function_body": resp.body[:65536].decode("utf-8", "replace"),
                },
            )
        return InvocationResult(
            request_id=inv.request_id, status=resp.status, headers=resp.headers, body=resp.body
        )

    async def _run(self, inst: Instance, inv: Invocation) -> Response:
        remaining = inv.deadline - time.time() if inv.deadline else inst.record.spec.timeout_s
        if remaining <= 0:
            # The caller gave up while the instance started (a long pull, say). The
            # instance is healthy: keep it warm for the next call instead of killing it.
            raise FunctionTimeout("the caller's deadline passed before the function could run")
        timeout_s = min(inst.record.spec.timeout_s, remaining)
        inst.invocations += 1
        try:
            return await self._forwarder.send(inst.host_port, inv, timeout_s)
        except FunctionTimeout:
            # The contract: a timed-out instance is reclaimed; its state is unknown.
            inst.retire("timeout")
            raise
        except ConnectionLost as e:
            # Look before retiring (retiring kills the container), but retire whatever
            # the look finds or however it fails: this instance is not reused.
            try:
                err = await self._explain_lost_connection(inst, str(e))
            finally:
                inst.retire("crashed")
            raise err from None

    async def _explain_lost_connection(self, inst: Instance, why: str) -> ImagefnError:
        state = await wait_for_exit(self._runtime, inst.container_id, 1.0)
        logs = await self._runtime.logs_tail(inst.container_id, self._settings.log_tail_lines)
        if state.oom_killed:
            return OutOfMemory(
                f"instance was killed for exceeding its memory limit ({inst.memory_mb} MB, "
                f"plus {inst.record.spec.tmp_mb} MB for what /tmp holds)",
                details={"logs": logs},
            )
        if not state.running:
            return UserProcessExited(
                f"the function's process exited with code {state.exit_code} during the request",
                details={"exit_code": state.exit_code, "logs": logs},
            )
        return UserCodeError(
            f"the function's server closed the connection without answering ({why})",
            details={"logs": logs},
        )

    def _cond(self, function: str) -> asyncio.Condition:
        cond = self._conds.get(function)
        if cond is None:
            cond = self._conds[function] = asyncio.Condition()
        return cond

    async def _acquire(self, inv: Invocation, timings: dict[str, float]) -> tuple[Instance, bool]:
        record = inv.record
        spec = record.spec
        cond = self._cond(spec.name)
        loop = asyncio.get_running_loop()
        # time.monotonic for measuring: uvloop's loop clock ticks in whole milliseconds.
        waited_from = time.monotonic()
        # Give up waiting for a slot early enough that the caller hears
        # ConcurrencyLimitExceeded rather than the gateway's own timeout.
        wait_s = self._settings.max_slot_wait_s
        if inv.deadline:  # 0 means no deadline
            wait_s = min(wait_s, inv.deadline - time.time() - SLOT_WAIT_MARGIN_S)
        wait_until = loop.time() + max(0.0, wait_s)
        async with cond:
            while True:
                if self._closing:
                    raise ServiceUnavailable("worker is shutting down")
                decision = decisions.choose(
                    [i.view() for i in self._instances.values()],
                    function=spec.name,
                    version=record.version,
                    memory_mb=sandbox.reserved_mb(spec),
                    max_instances=spec.max_instances,
                    per_instance=spec.instance_concurrency,
                    memory_capacity_mb=self._settings.memory_capacity_mb,
                )
                if isinstance(decision, decisions.UseInstance):
                    inst = self._instances[decision.instance_id]
                    inst.inflight += 1
                    if time.monotonic() - waited_from > 0.001:
                        timings["wait"] = time.monotonic() - waited_from
                    if inst.state in ASLEEP_STATES:
                        # Reserved; its owner wakes it (outside this lock, below).
                        inst.wakeup.set()
                        break
                    if inst.state in STARTING_STATES:
                        break  # shares a start in progress (below)
                    inst.transition(State.BUSY)
                    return inst, False
                if isinstance(decision, decisions.StartInstance):
                    for victim in decision.evict:
                        self._instances[victim].retire("evicted")
                    inst = self._spawn(record)
                    break
                remaining = wait_until - loop.time()
                if remaining <= 0:
                    raise ConcurrencyLimitExceeded(
                        f"no free instance of {spec.name} on this worker in time: {decision.reason}"
                    )
                if self._waiting.get(spec.name, 0) >= self._settings.max_waiting_per_function:
                    # One hot function must not hold every slot of this worker while it
                    # waits: other functions' invocations would stall behind it.
                    raise ConcurrencyLimitExceeded(
                        f"{spec.name} already has {self._waiting[spec.name]} invocations "
                        f"waiting on this worker: {decision.reason}"
                    )
                self._waiting[spec.name] = self._waiting.get(spec.name, 0) + 1
                if decision.for_memory:
                    self._memory_waiters[spec.name] = self._memory_waiters.get(spec.name, 0) + 1
                try:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(cond.wait(), remaining)
                finally:
                    self._waiting[spec.name] -= 1
                    if not self._waiting[spec.name]:
                        del self._waiting[spec.name]
                    if decision.for_memory:
                        self._memory_waiters[spec.name] -= 1
                        if not self._memory_waiters[spec.name]:
                            del self._memory_waiters[spec.name]
        if inst.state in ASLEEP_STATES:
            return await self._await_wake(inst, timings), False
        # Cold path: the new instance is reserved for this invocation (inflight = 1).
        try:
            await inst.started.wait()
        except BaseException:
            await self._release(inst)
            raise
        timings.update(inst.start_timings)
        if inst.start_error is not None:
            # Release here: the caller never got the instance.
            await self._release(inst)
            raise inst.start_error
        return inst, True

    async def _await_wake(self, inst: Instance, timings: dict[str, float]) -> Instance:
        """Wait for the owner to unfreeze an instance this invocation reserved."""
        started = time.monotonic()
        try:
            await inst.awake.wait()
        except BaseException:
            await self._release(inst)
            raise
        timings["wake"] = time.monotonic() - started
        if inst.state is not State.BUSY:
            await self._release(inst)
            raise ServiceUnavailable(f"instance {inst.id} could not be woken up")
        return inst

    async def _release(self, inst: Instance) -> None:
        inst.inflight -= 1
        inst.last_used = time.monotonic()
        if inst.inflight == 0 and inst.state is State.BUSY:
            inst.transition(State.READY)
        inst.wakeup.set()
        await self._wake_waiters(inst.function)

    async def _wake_waiters(self, function: str, *, everyone: bool = False) -> None:
        """Tell waiters a slot may be free: one of ``function``'s (or all of them), and
        every function waiting for memory, since an idle or removed instance frees some."""
        for name in {function, *self._memory_waiters}:
            cond = self._cond(name)
            async with cond:
                if everyone or name != function:
                    cond.notify_all()
                else:
                    cond.notify()

    # -- instance lifecycle ----------------------------------------------------------------

    def _spawn(
        self, record: FunctionRecord, *, reserved: bool = True, provisioned: bool = False
    ) -> Instance:
        inst = Instance(
            id=uuid.uuid4().hex[:12],
            record=record,
            inflight=1 if reserved else 0,
            provisioned=provisioned,
        )
        self._instances[inst.id] = inst
        # A fresh context: the owner outlives the invocation that caused it, and its log
        # lines must not carry that invocation's request id.
        task = asyncio.create_task(
            self._own(inst), name=f"instance-{inst.id}", context=contextvars.Context()
        )
        self._owners.add(task)
        task.add_done_callback(self._owners.discard)
        return inst

    async def _own(self, inst: Instance) -> None:
        structlog.contextvars.bind_contextvars(function=inst.function, instance=inst.id)
        try:
            try:
                await self._start(inst)
            except ImagefnError as e:
                log.warning("instance_start_failed", error=e.type_name, reason=e.message)
                inst.start_error = e
                inst.retire("start-failed")
                return
            except Exception as e:  # engine trouble: report it rather than hang the caller
                log.exception("instance_start_crashed")
                inst.start_error = InternalError(f"instance start failed: {e}")
                inst.retire("start-failed")
                return
            finally:
                inst.started.set()
            if inst.inflight == 0:
                # Its starter gave up: a waiting invocation may take the idle instance now.
                await self._wake_waiters(inst.function)
            await self._serve(inst)
        finally:
            await self._stop(inst)

    async def _serve(self, inst: Instance) -> None:
        """Hold the instance until it is retired or idle past its TTL: freeze it when idle
        for ``pause_after_s``, wake it when an invocation reserved it."""
        idle_ttl_s = inst.record.spec.idle_ttl_s
        pause_after_s = self._settings.pause_after_s
        while True:
            if inst.provisioned:
                # Ready before traffic means ready: no freezing, no idle reclaim.
                idle_ttl_s, pause_after_s = float("inf"), 0.0
            else:
                idle_ttl_s = inst.record.spec.idle_ttl_s
                pause_after_s = self._settings.pause_after_s
            inst.wakeup.clear()
            if self._closing and inst.inflight == 0:
                inst.retire("shutdown")
            if inst.retire_reason and (inst.inflight == 0 or inst.retire_reason in KILL_REASONS):
                return
            if inst.state is State.PAUSED and inst.inflight > 0:
                await self._resume(inst)
                continue
            timeout: float | None = None
            if inst.state in (State.READY, State.PAUSED) and not inst.retire_reason:
                now = time.monotonic()
                timeout = decisions.idle_deadline(inst.last_used, idle_ttl_s) - now
                if timeout <= 0:
                    inst.retire("idle")
                    continue
                if inst.state is State.READY and pause_after_s > 0:
                    pause_in = inst.last_used + pause_after_s - now
                    if pause_in <= 0:
                        await self._pause(inst)
                        continue
                    timeout = min(timeout, pause_in)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(inst.wakeup.wait(), timeout)

    async def _pause(self, inst: Instance) -> None:
        inst.awake.clear()
        inst.transition(State.PAUSING)
        try:
            await asyncio.wait_for(self._runtime.pause(inst.container_id), ENGINE_CALL_TIMEOUT_S)
        except Exception as e:
            log.warning("instance_pause_failed", error=str(e))
            inst.retire("crashed")
            inst.awake.set()  # anyone who reserved it meanwhile sees it is not BUSY
            return
        inst.transition(State.PAUSED)
        log.info("instance_paused")

    async def _resume(self, inst: Instance) -> None:
        inst.transition(State.RESUMING)
        started = time.monotonic()
        try:
            await asyncio.wait_for(self._runtime.unpause(inst.container_id), ENGINE_CALL_TIMEOUT_S)
        except Exception as e:
            log.warning("instance_resume_failed", error=str(e))
            inst.retire("crashed")
            inst.awake.set()
            return
        # Whoever reserved it may have given up meanwhile.
        inst.transition(State.BUSY if inst.inflight > 0 else State.READY)
        inst.awake.set()
        log.info("instance_resumed", seconds=round(time.monotonic() - started, 4))

    def _container_config(self, inst: Instance) -> ContainerConfig:
        spec = inst.record.spec
        s = self._settings
        return ContainerConfig(
            name=self._container_name(inst),
            image=inst.record.image_ref,
            command=spec.command,
            args=spec.args,
            env=spec.env,
            labels={
                LABEL_MANAGED: "1",
                LABEL_INSTALLATION: self._installation,
                LABEL_WORKER: self._worker_id,
                LABEL_FUNCTION: spec.name,
                LABEL_INSTANCE: inst.id,
            },
            memory_mb=spec.memory_mb,
            cpus=spec.cpus,
            pids_limit=s.pids_limit,
            nofile_limit=s.nofile_limit,
            tmp_mb=spec.tmp_mb,
            network=sandbox.network_for(spec, self._networks),
            log_max_mb=s.container_log_max_mb,
            log_files=s.container_log_files,
            log_driver=s.container_log_driver,
        )

    @staticmethod
    def _container_name(inst: Instance) -> str:
        return f"imagefn-{inst.function}-{inst.id}"

    async def _start(self, inst: Instance) -> None:
        pull_s = await self._images.ensure(inst.record.image_ref)
        if pull_s:
            inst.start_timings["pull"] = pull_s
        t = time.monotonic()
        inst.container_id = await asyncio.wait_for(
            self._runtime.create(self._container_config(inst)), ENGINE_CALL_TIMEOUT_S
        )
        self._by_container[inst.container_id] = inst
        inst.start_timings["create"] = (t2 := time.monotonic()) - t
        inst.transition(State.STARTING)
        await asyncio.wait_for(self._runtime.start(inst.container_id), ENGINE_CALL_TIMEOUT_S)
        inst.start_timings["start"] = (t3 := time.monotonic()) - t2
        if self._logs is not None:
            spec = inst.record.spec
            self._logs.follow(
                inst.container_id,
                LogSource(
                    function=spec.name,
                    version=inst.record.version,
                    instance=self._container_name(inst),
                    concurrency=spec.instance_concurrency,
                    memory_limit_mb=spec.memory_mb,
                ),
            )
        inst.transition(State.INITIALIZING)
        inst.host_port = await asyncio.wait_for(
            self._runtime.host_port(inst.container_id), ENGINE_CALL_TIMEOUT_S
        )
        await self._wait_ready(inst)
        inst.start_timings["ready"] = time.monotonic() - t3
        if inst.provisioned:
            self._provision_failures.pop((inst.function, inst.record.version), None)
            # The next of a burst may start now.
            asyncio.get_running_loop().call_soon(self.reconcile_provisioned)
        # Reserved for the invocation that caused the start, unless it gave up meanwhile.
        inst.transition(State.BUSY if inst.inflight > 0 else State.READY)
        inst.awake.set()
        log.info("instance_ready", port=inst.host_port, timings=inst.start_timings)

    async def _wait_ready(self, inst: Instance) -> None:
        spec = inst.record.spec
        loop = asyncio.get_running_loop()
        deadline = loop.time() + spec.init_timeout_s
        next_state_check = loop.time() + STATE_CHECK_EVERY_S
        pid = (await self._runtime.state(inst.container_id)).pid
        while loop.time() < deadline:
            # The probe through the published port, confirmed from the host's /proc where
            # it can be read (the proxy alone can look ready a moment too early).
            if await probe_port(inst.host_port) and await listens_on_9000(pid) is not False:
                return
            if inst.retire_reason:
                raise ContainerInitError(f"instance retired while starting: {inst.retire_reason}")
            if loop.time() >= next_state_check:
                state = await self._runtime.state(inst.container_id)
                if not state.running:
                    raise await self._init_exit_error(inst, state)
                next_state_check = loop.time() + STATE_CHECK_EVERY_S
            await asyncio.sleep(self._settings.ready_poll_interval_s)
        state = await self._runtime.state(inst.container_id)
        if not state.running:
            raise await self._init_exit_error(inst, state)
        logs = await self._runtime.logs_tail(inst.container_id, self._settings.log_tail_lines)
        listening = await diagnose_listeners(state.pid)
        if listening:
            raise PortBindingFailed(
                "the server does not listen on 0.0.0.0:9000 (it listens on "
                f"{', '.join(listening)}); please confirm your http server has enabled "
                "listening on port 9000",
                details={"listening": listening, "logs": logs},
            )
        raise InitContainerTimeout(
            f"nothing listened on port 9000 within the init timeout of {spec.init_timeout_s:g} s;"
            " please confirm your http server has enabled listening on port 9000",
            details={"logs": logs},
        )

    async def _init_exit_error(self, inst: Instance, state: ContainerState) -> ImagefnError:
        logs = await self._runtime.logs_tail(inst.container_id, self._settings.log_tail_lines)
        details: dict[str, Any] = {"exit_code": state.exit_code, "logs": logs}
        if state.oom_killed:
            return OutOfMemory(
                f"instance ran out of its memory while starting ({inst.memory_mb} MB, plus "
                f"{inst.record.spec.tmp_mb} MB for what /tmp holds)",
                details=details,
            )
        if state.exit_code in (126, 127) or state.error:
            return ContainerInitError(
                f"the container's command could not run (exit code {state.exit_code}"
                f"{': ' + state.error if state.error else ''}); check Command and Args",
                details=details,
            )
        return UserProcessExited(
            f"the function's process exited with code {state.exit_code} before listening on "
            "port 9000",
            details=details,
        )

    async def _stop(self, inst: Instance) -> None:
        if inst.state is State.GONE:
            return
        if inst.state is not State.STOPPING:
            inst.transition(State.STOPPING)
        reason = inst.retire_reason or "unknown"
        if inst.container_id:
            stop_s = 0.0 if reason in KILL_REASONS else self._settings.stop_timeout_s
            if self._logs is not None:
                await self._stop_and_drain(inst, stop_s)
                stop_s = 0.0
            try:
                await asyncio.wait_for(
                    asyncio.shield(self._runtime.remove(inst.container_id, stop_s)),
                    ENGINE_CALL_TIMEOUT_S,
                )
            except Exception:
                # The pool must go on; the container stays until this worker's next start
                # or, if the worker dies, another worker's janitor (both find it by label).
                log.exception("instance_remove_failed", container=inst.container_id)
            self._by_container.pop(inst.container_id, None)
        inst.transition(State.GONE)
        self._instances.pop(inst.id, None)
        log.info("instance_removed", reason=reason, invocations=inst.invocations)
        await self._wake_waiters(inst.function, everyone=True)
        if inst.provisioned and not self._closing:
            if inst.start_error is not None:
                self._provision_failed(inst.record)
            self.reconcile_provisioned()

    async def _stop_and_drain(self, inst: Instance, stop_s: float) -> None:
        """Stop the container, then wait for the log shipper to have read all it wrote:
        removing it at once would end its log stream with output still unread."""
        try:
            await asyncio.wait_for(
                asyncio.shield(self._runtime.stop(inst.container_id, stop_s)),
                ENGINE_CALL_TIMEOUT_S,
            )
        except Exception as e:
            log.warning("instance_stop_failed", container=inst.container_id, error=str(e))
        assert self._logs is not None
        # Bounded by the shipper (drain_timeout_s): removal is never held up for long.
        await self._logs.drained(inst.container_id)

    # -- provisioned instances ---------------------------------------------------------------

    def set_provisioned(self, targets: dict[tuple[str, int], tuple[FunctionRecord, int]]) -> None:
        """The cold-start manager's desired state for this worker: (function, version) →
        (record, instances to keep ready). Absent keys want none."""
        self._provision_targets = dict(targets)
        for inst in self._instances.values():
            key = (inst.function, inst.record.version)
            if inst.provisioned and key not in self._provision_targets:
                # No longer wanted ahead of traffic: an ordinary instance from now on,
                # which idles out by its TTL.
                inst.provisioned = False
                inst.wakeup.set()
        self.reconcile_provisioned()

    def reconcile_provisioned(self) -> None:
        """Start missing provisioned instances, demote surplus ones (idempotent)."""
        if self._closing:
            return
        now = time.monotonic()
        for key, (record, want) in self._provision_targets.items():
            have = [
                i
                for i in self._instances.values()
                if i.provisioned
                and (i.function, i.record.version) == key
                and i.live
                and not i.retire_reason
            ]
            for surplus in sorted(have, key=lambda i: i.inflight)[want:]:
                surplus.provisioned = False
                surplus.wakeup.set()
            missing = want - len(have)
            if missing <= 0 or self._provision_retry_at.get(key, 0.0) > now:
                continue
            # Within the function's max_instances and this worker's memory: the manager
            # places what does not fit elsewhere on its next tick.
            live = sum(1 for i in self._instances.values() if i.function == key[0] and i.live)
            room = self._settings.memory_capacity_mb - self.memory_used_mb()
            # Bounded start bursts: a worker told to provision many instances starts a
            # few at a time (the rest follow as these become ready), so it keeps serving.
            starting = sum(
                1 for i in self._instances.values() if i.provisioned and i.state in STARTING_STATES
            )
            missing = min(
                missing,
                record.spec.max_instances - live,
                room // max(1, sandbox.reserved_mb(record.spec)),
                self._settings.provision_burst - starting,
            )
            for _ in range(max(0, missing)):
                self._spawn(record, reserved=False, provisioned=True)
            if missing > 0:
                log.info("provisioning", function=key[0], version=key[1], starting=missing)

    def _provision_failed(self, record: FunctionRecord) -> None:
        # A provisioned instance that cannot start must not be restarted in a tight loop.
        key = (record.spec.name, record.version)
        fails = self._provision_failures.get(key, 0) + 1
        self._provision_failures[key] = fails
        self._provision_retry_at[key] = time.monotonic() + min(60.0, 2.0 ** (fails - 1))

    def prepull(self, image_refs: list[str]) -> None:
        """Pull images ahead of need, in the background (the image store pulls each once)."""
        for ref in image_refs:
            if ref in self._prepulls:
                continue
            task = asyncio.create_task(self._prepull(ref), name=f"prepull-{ref[-12:]}")
            self._prepulls[ref] = task
            task.add_done_callback(functools.partial(self._prepull_done, ref))

    def _prepull_done(self, ref: str, _task: asyncio.Task[None]) -> None:
        self._prepulls.pop(ref, None)

    async def _prepull(self, ref: str) -> None:
        try:
            await self._images.ensure(ref)
        except ImagefnError as e:
            log.warning("prepull_failed", image=ref, error=e.message)

    def inventory(self) -> dict[str, dict[str, int]]:
        """Per function version: instances by state, and how many are provisioned."""
        out: dict[str, dict[str, int]] = {}
        for inst in self._instances.values():
            if not inst.live:
                continue
            entry = out.setdefault(
                f"{inst.function}@{inst.record.version}",
                {"ready": 0, "busy": 0, "paused": 0, "starting": 0, "provisioned": 0},
            )
            if inst.state is State.READY:
                entry["ready"] += 1
            elif inst.state is State.BUSY:
                entry["busy"] += 1
            elif inst.state in ASLEEP_STATES:
                entry["paused"] += 1
            else:
                entry["starting"] += 1
            entry["provisioned"] += int(inst.provisioned)
        return out

    def memory_used_mb(self) -> int:
        return sum(i.reserved_mb for i in self._instances.values() if i.live)

    # -- signals from outside --------------------------------------------------------------

    def container_died(self, container_id: str) -> None:
        inst = self._by_container.get(container_id)
        if inst is not None and (
            inst.state in (State.READY, State.BUSY) or inst.state in ASLEEP_STATES
        ):
            # An idle instance that died is retired now so that the next invocation does
            # not land on it; a busy one fails its request, which retires it too.
            inst.retire("exited")

    async def shutdown(self, timeout_s: float) -> None:
        """Stop every instance (in-flight work must already be drained or abandoned)."""
        self._closing = True
        for task in list(self._prepulls.values()):
            task.cancel()
        for inst in list(self._instances.values()):
            inst.retire("shutdown")
        for cond in list(self._conds.values()):
            async with cond:
                cond.notify_all()
        if self._owners:
            _done, pending = await asyncio.wait(set(self._owners), timeout=timeout_s)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)
