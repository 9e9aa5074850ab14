"""The container pool of one worker: where each request runs.

The pool holds this worker's instances and places invocations on them: ``decisions.
choose`` picks a warm, frozen or starting instance, or a new one, from snapshots; the
pool reserves it, has the instance serve the request, and releases it. Invocations that
find no room wait on their function's condition until an instance goes idle or away.
Each instance lives its own life (``workers/instance.py``: start, readiness, freeze,
stop); the pool only spawns, retires and demotes them, and keeps the cold-start
manager's provisioned instances (``workers/rules.py`` holds the arithmetic).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
import uuid
from collections.abc import Awaitable, Callable, Collection, Mapping

import structlog

from shared.errors import ConcurrencyLimitExceeded, ImagefnError, ServiceUnavailable
from shared.messages import Invocation, InvocationResult
from shared.settings import WorkerSettings
from shared.settings_security import NetworkSettings
from shared.spec import FunctionRecord
from workers import decisions, rules, sandbox
from workers.forwarder import Forwarder
from workers.instance import Instance, Reservation
from workers.instance_host import ImageProvider, InstanceHost, InstanceObserver
from workers.instance_logs import LogObserver
from workers.instance_state import ASLEEP_STATES, State
from workers.logship import InstanceLogs
from workers.runtime import ContainerRuntime

__all__ = ["ContainerPool", "ImageProvider"]

log = structlog.get_logger("imagefn.pool")

# A slot wait ends this long before the caller's deadline, so the caller gets the reason.
SLOT_WAIT_MARGIN_S = 0.5

# Which versions of the named functions are still reachable ($LATEST and aliases); a
# deleted function maps to an empty set.
ReachableVersions = Callable[[Collection[str]], Awaitable[Mapping[str, frozenset[int]]]]


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
        self._images = images
        self._settings = settings
        self._worker_id = worker_id
        # Ships every instance's output (workers/logship.py); None: output stays in the
        # engine's log files only.
        observers: tuple[InstanceObserver, ...] = (LogObserver(logs),) if logs else ()
        self._host = InstanceHost(
            runtime=runtime,
            forwarder=forwarder,
            settings=settings,
            images=images,
            # The Docker networks instances join (workers/sandbox.py chooses by egress).
            networks=networks or NetworkSettings(),
            installation=installation,
            worker_id=worker_id,
            pool=self,
            observers=observers,
        )
        self._instances: dict[str, Instance] = {}
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

    def _by_container(self, container_id: str) -> Instance | None:
        for inst in self._instances.values():
            if inst.container_id == container_id:
                return inst
        return None

    def owns_container(self, container_id: str) -> bool:
        return self._by_container(container_id) is not None

    def images_in_use(self) -> set[str]:
        return {i.record.image_ref for i in self._instances.values()}

    # -- invocation path -------------------------------------------------------------------

    async def invoke(self, inv: Invocation) -> InvocationResult:
        """Run one invocation on an instance; never raises for the function's failures."""
        started = time.time()
        timings: dict[str, float] = {"queue": max(0.0, started - inv.enqueued_at)}
        inst: Instance | None = None
        cold = False
        try:
            # Before any instance exists: an image this worker will not run never gets a
            # container (the image store checks again before every pull and start).
            self._images.check(inv.record.image_ref, inv.record.image_digest)
            inst, cold = await self._acquire(inv, timings)
            structlog.contextvars.bind_contextvars(instance=inst.id)
            run_started = time.monotonic()
            try:
                resp = await inst.serve(inv, cold=cold)
            finally:
                timings["run"] = time.monotonic() - run_started
            result = InvocationResult(
                request_id=inv.request_id, status=resp.status, headers=resp.headers, body=resp.body
            )
        except ImagefnError as e:
            result = InvocationResult.failure(inv.request_id, e)
        finally:
            if inst is not None:
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

    def _cond(self, function: str) -> asyncio.Condition:
        cond = self._conds.get(function)
        if cond is None:
            cond = self._conds[function] = asyncio.Condition()
        return cond

    async def _acquire(self, inv: Invocation, timings: dict[str, float]) -> tuple[Instance, bool]:
        """Reserve a slot on an instance for ``inv``; True with it when it is a cold start."""
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
                    how = inst.reserve()
                    if time.monotonic() - waited_from > 0.001:
                        timings["wait"] = time.monotonic() - waited_from
                    break
                if isinstance(decision, decisions.StartInstance):
                    for victim in decision.evict:
                        self._instances[victim].retire("evicted")
                    inst, how = self._spawn(record), Reservation.START
                    break
                remaining = wait_until - loop.time()
                if remaining <= 0:
                    raise ConcurrencyLimitExceeded(
                        f"no free instance of {spec.name} on this worker in time: {decision.reason}"
                    )
                await self._wait_for_room(cond, spec.name, decision, remaining)
        if how is Reservation.WARM:
            return inst, False
        # Outside the lock: waking takes milliseconds, a start much longer.
        try:
            if how is Reservation.WAKE:
                await inst.wake(timings)
                return inst, False
            await inst.wait_started(timings)
            return inst, True
        except BaseException:
            # The caller never got the instance.
            await self._release(inst)
            raise

    async def _wait_for_room(
        self, cond: asyncio.Condition, function: str, decision: decisions.Wait, within_s: float
    ) -> None:
        if self._waiting.get(function, 0) >= self._settings.max_waiting_per_function:
            # One hot function must not hold every slot of this worker while it waits:
            # other functions' invocations would stall behind it.
            raise ConcurrencyLimitExceeded(
                f"{function} already has {self._waiting[function]} invocations "
                f"waiting on this worker: {decision.reason}"
            )
        self._waiting[function] = self._waiting.get(function, 0) + 1
        if decision.for_memory:
            self._memory_waiters[function] = self._memory_waiters.get(function, 0) + 1
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(cond.wait(), within_s)
        finally:
            self._waiting[function] -= 1
            if not self._waiting[function]:
                del self._waiting[function]
            if decision.for_memory:
                self._memory_waiters[function] -= 1
                if not self._memory_waiters[function]:
                    del self._memory_waiters[function]

    async def _release(self, inst: Instance) -> None:
        inst.release()
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

    def _spawn(
        self, record: FunctionRecord, *, reserved: bool = True, provisioned: bool = False
    ) -> Instance:
        inst = Instance(
            uuid.uuid4().hex[:12],
            record,
            self._host,
            inflight=1 if reserved else 0,
            provisioned=provisioned,
        )
        self._instances[inst.id] = inst
        task = inst.launch()
        self._owners.add(task)
        task.add_done_callback(self._owners.discard)
        return inst

    # -- what instances tell the pool (workers.instance.PoolHooks) --------------------------

    def instance_up(self, inst: Instance) -> None:
        if inst.provisioned:
            self._provision_failures.pop((inst.function, inst.record.version), None)
            # The next of a burst may start now.
            asyncio.get_running_loop().call_soon(self.reconcile_provisioned)

    async def instance_idle(self, inst: Instance) -> None:
        await self._wake_waiters(inst.function)

    async def instance_gone(self, inst: Instance) -> None:
        self._instances.pop(inst.id, None)
        await self._wake_waiters(inst.function, everyone=True)
        if inst.provisioned and not self._closing:
            if inst.start_error is not None:
                # A provisioned instance that cannot start must not restart in a tight loop.
                key = (inst.function, inst.record.version)
                fails = self._provision_failures.get(key, 0) + 1
                self._provision_failures[key] = fails
                self._provision_retry_at[key] = time.monotonic() + rules.provision_backoff_s(fails)
            self.reconcile_provisioned()

    # -- provisioned instances ---------------------------------------------------------------

    def set_provisioned(self, targets: dict[tuple[str, int], tuple[FunctionRecord, int]]) -> None:
        """The cold-start manager's desired state for this worker: (function, version) →
        (record, instances to keep ready). Absent keys want none."""
        self._provision_targets = dict(targets)
        for inst in self._instances.values():
            key = (inst.function, inst.record.version)
            if inst.provisioned and key not in self._provision_targets:
                inst.demote()
        self.reconcile_provisioned()

    def reconcile_provisioned(self) -> None:
        """Start missing provisioned instances, demote surplus ones (idempotent)."""
        if self._closing:
            return
        now = time.monotonic()
        plan = rules.plan_provisioned(
            [i.view() for i in self._instances.values()],
            {
                key: rules.ProvisionTarget(
                    want, record.spec.max_instances, sandbox.reserved_mb(record.spec)
                )
                for key, (record, want) in self._provision_targets.items()
            },
            backing_off={k for k, at in self._provision_retry_at.items() if at > now},
            memory_capacity_mb=self._settings.memory_capacity_mb,
            burst=self._settings.provision_burst,
        )
        for surplus in plan.demote:
            self._instances[surplus].demote()
        for (function, version), count in plan.start.items():
            record = self._provision_targets[(function, version)][0]
            for _ in range(count):
                self._spawn(record, reserved=False, provisioned=True)
            log.info("provisioning", function=function, version=version, starting=count)

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
        inst = self._by_container(container_id)
        if inst is not None:
            inst.died()

    async def retire_unreachable(self, reachable_versions: ReachableVersions) -> None:
        """Retire idle and frozen instances of deleted functions, and of versions neither
        $LATEST nor an alias names any more, instead of keeping them until their idle
        TTL. Called with every heartbeat; a registry that cannot answer now is asked
        again at the next one."""
        names = {i.function for i in self._instances.values()}
        if not names:
            return
        try:
            reachable = await reachable_versions(sorted(names))
        except Exception as e:
            log.warning("reachability_check_failed", error=str(e))
            return
        views = [i.view() for i in self._instances.values()]
        for iid in rules.unreachable(views, reachable, now=time.monotonic()):
            inst = self._instances.get(iid)
            if inst is not None:
                log.info("instance_unreachable", instance=iid, function=inst.function)
                inst.retire("unreachable")

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
