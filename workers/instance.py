"""A function instance: one container's whole life, as an explicit state machine.

An ``Instance`` starts its container, waits until port 9000 is ready, serves requests,
freezes when idle and wakes when needed, and stops and removes the container when it
is retired. It is the only caller of its own state transitions (``workers/
instance_state.py`` lists them); its owner task (``launch``) drives the life, and the
pool talks to it through a small interface:

* ``reserve()``: take a slot for one request (under the pool's lock, after
  ``decisions.choose`` picked this instance); then ``wake()`` if it was frozen, or
  ``wait_started()`` if it was on its way up;
* ``serve(inv)``: run the request; ``release()`` when done;
* ``retire(reason)``, ``demote()``, ``died()``: ask the owner to stop it, make a
  provisioned instance ordinary, tell it its container died.

Every state has a time limit, enforced here: CREATING/STARTING/INITIALIZING by the
engine call bound (``ENGINE_CALL_TIMEOUT_S``) and the function's ``init_timeout_s``;
READY by ``pause_after_s`` (then frozen, unless the spec says ``freeze_idle: false``);
READY and PAUSED together by ``idle_ttl_s`` (then retired); BUSY by the function's
``timeout_s`` per request (then killed); PAUSING/RESUMING by the engine call bound
(then killed); STOPPING by the stop timeout inside the engine call bound. The idle
rules are pure functions in ``workers/rules.py``; engine failures are classified in
``workers/failures.py``. Observers (the log shipper, ``workers/instance_logs.py``) hear
when the container started, before and after every request, and before it is removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import enum
import time

import structlog

from shared.errors import ContainerInitError, FunctionTimeout, ImagefnError, ServiceUnavailable
from shared.messages import Invocation
from shared.spec import FunctionRecord
from workers import rules, sandbox
from workers.failures import Diagnosis, start_failure
from workers.forwarder import ConnectionLost, Response
from workers.instance_host import InstanceHost
from workers.instance_state import (
    ALLOWED,
    ASLEEP_STATES,
    KILL_REASONS,
    LIVE_STATES,
    STARTING_STATES,
    InstanceView,
    InvalidTransition,
    State,
)
from workers.probe import listens_on_9000, probe_port
from workers.runtime import (
    LABEL_FUNCTION,
    LABEL_INSTALLATION,
    LABEL_INSTANCE,
    LABEL_MANAGED,
    LABEL_WORKER,
)

# The states are defined beside (workers/instance_state.py, which the pure rules import
# without the instance's machinery) and re-exported: an instance's states belong to it.
__all__ = [
    "ALLOWED",
    "ASLEEP_STATES",
    "KILL_REASONS",
    "LIVE_STATES",
    "STARTING_STATES",
    "Instance",
    "InstanceView",
    "InvalidTransition",
    "Reservation",
    "State",
]

log = structlog.get_logger("imagefn.instance")

# Engine calls (create, start, inspect, pause, unpause, remove) that take longer than
# this mean the engine is in trouble, not the function.
ENGINE_CALL_TIMEOUT_S = 60.0
# How often the readiness loop also asks the engine whether the process already exited.
STATE_CHECK_EVERY_S = 0.1


class Reservation(enum.Enum):
    WARM = "warm"  # ready now
    WAKE = "wake"  # frozen: wake() first
    START = "start"  # on its way up: wait_started() first


class Instance:
    def __init__(
        self,
        id: str,
        record: FunctionRecord,
        host: InstanceHost | None = None,
        *,
        inflight: int = 0,
        provisioned: bool = False,
    ) -> None:
        self.id = id
        self.record = record
        # None only for the state table's own tests: such an instance has no life to run.
        self._host = host
        self.state = State.CREATING
        self.container_id = ""
        self.host_port = 0
        now = time.monotonic()
        self.created_at = now
        self.state_since = now
        self.last_used = now
        # Requests running on this instance now (or reserved for it).
        self.inflight = inflight
        self.invocations = 0
        # Kept ready ahead of traffic for the cold-start manager: never frozen or reclaimed
        # for idleness; replaced when it dies.
        self.provisioned = provisioned
        # Why the instance is being retired (idle, crashed, timeout, shutdown, ...).
        self.retire_reason = ""
        self.start_error: ImagefnError | None = None
        # Seconds spent in pull/create/start/ready, reported with the first invocation.
        self.start_timings: dict[str, float] = {}
        # Set once start finished, successfully or not.
        self.started = asyncio.Event()
        # Poked whenever something the owner task waits on changes.
        self.wakeup = asyncio.Event()
        # Set while the instance can take requests (not frozen); invocations that reserved
        # a frozen instance wait for it.
        self.awake = asyncio.Event()
        # The engine call under way while starting, for the message if it hangs.
        self._step = "image pull"

    # -- what it is ------------------------------------------------------------------------

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

    @property
    def name(self) -> str:
        """The container's name (also what log records call the instance)."""
        return f"imagefn-{self.function}-{self.id}"

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

    def transition(self, new: State) -> None:
        """Move to ``new``. Called only by this class's own steps (and the state table's
        tests); an illegal move raises and changes nothing."""
        if new not in ALLOWED[self.state]:
            raise InvalidTransition(f"instance {self.id}: {self.state.value} -> {new.value}")
        self.state = new
        self.state_since = time.monotonic()
        self.wakeup.set()

    @property
    def host(self) -> InstanceHost:
        if self._host is None:
            raise RuntimeError(f"instance {self.id} has no host to run on")
        return self._host

    # -- the pool's interface --------------------------------------------------------------

    def launch(self) -> asyncio.Task[None]:
        """Start the owner task that lives the instance's life, in a fresh context: it
        outlives the invocation that caused it, and its log lines must not carry that
        invocation's request id."""
        return asyncio.create_task(
            self._own(), name=f"instance-{self.id}", context=contextvars.Context()
        )

    def reserve(self) -> Reservation:
        """Take a slot for one request (the caller holds the pool's lock)."""
        self.inflight += 1
        if self.state in ASLEEP_STATES:
            self.wakeup.set()  # the owner unfreezes it
            return Reservation.WAKE
        if self.state in STARTING_STATES:
            return Reservation.START  # shares the start in progress
        self.transition(State.BUSY)
        return Reservation.WARM

    async def wake(self, timings: dict[str, float]) -> None:
        """Wait for the owner to unfreeze this reserved instance."""
        began = time.monotonic()
        await self.awake.wait()
        timings["wake"] = time.monotonic() - began
        if self.state is not State.BUSY:
            raise ServiceUnavailable(f"instance {self.id} could not be woken up")

    async def wait_started(self, timings: dict[str, float]) -> None:
        """Wait for the start this reservation shares; its failure is the caller's."""
        await self.started.wait()
        timings.update(self.start_timings)
        if self.start_error is not None:
            raise self.start_error

    def release(self) -> None:
        self.inflight -= 1
        self.last_used = time.monotonic()
        if self.inflight == 0 and self.state is State.BUSY:
            self.transition(State.READY)
        self.wakeup.set()

    def retire(self, reason: str) -> None:
        """Ask the owner task to stop and remove this instance (idempotent: the first
        reason wins). Requests on it finish first, unless the reason is a kill reason."""
        if not self.retire_reason:
            self.retire_reason = reason
        self.wakeup.set()

    def demote(self) -> None:
        """No longer wanted ahead of traffic: an ordinary instance from now on, which
        freezes and idles out by the ordinary limits."""
        self.provisioned = False
        self.wakeup.set()

    def died(self) -> None:
        """The engine reports the container's process exited."""
        if self.state in (State.READY, State.BUSY) or self.state in ASLEEP_STATES:
            # An idle instance that died is retired now so that the next invocation does
            # not land on it; a busy one fails its request, which retires it too.
            self.retire("exited")

    async def serve(self, inv: Invocation, *, cold: bool) -> Response:
        """Run one request on this (reserved, BUSY) instance. Raises the contract's error
        when it fails; an event answered with a non-2xx status is ``UserCodeError``."""
        observers = self.host.observers
        init_ms = None
        if cold:
            t = self.start_timings
            init_ms = 1000 * (t.get("create", 0.0) + t.get("start", 0.0) + t.get("ready", 0.0))
        for o in observers:
            o.request_started(self, inv.request_id, cold=cold, init_ms=init_ms)
        # For the END record: the function's own status when it answered, the platform's
        # otherwise; unknown (None) if the call was abandoned (cancelled).
        status: int | None = None
        error: str | None = "Cancelled"
        try:
            resp = await self._send(inv)
            status, error = resp.status, None
            if inv.kind == "event":
                refused = Diagnosis.event_answer(resp.status, resp.body)
                if refused is not None:
                    raise refused
            return resp
        except ImagefnError as e:
            status, error = status or e.http_status, e.type_name
            raise
        finally:
            for o in observers:
                o.request_ended(self, inv.request_id, status=status, error=error)

    async def _send(self, inv: Invocation) -> Response:
        spec = self.record.spec
        remaining = inv.deadline - time.time() if inv.deadline else spec.timeout_s
        if remaining <= 0:
            # The caller gave up while the instance started (a long pull, say). The
            # instance is healthy: keep it warm for the next call instead of killing it.
            raise FunctionTimeout("the caller's deadline passed before the function could run")
        self.invocations += 1
        try:
            return await self.host.forwarder.send(
                self.host_port, inv, min(spec.timeout_s, remaining)
            )
        except FunctionTimeout:
            # The contract: a timed-out instance is reclaimed; its state is unknown.
            self.retire("timeout")
            raise
        except ConnectionLost as e:
            # Look before retiring (retiring kills the container), but retire whatever
            # the look finds or however it fails: this instance is not reused.
            try:
                err = await self.host.diagnosis.lost_connection(self.container_id, spec, str(e))
            finally:
                self.retire("crashed")
            raise err from None

    # -- the owner task: start, hold, stop ---------------------------------------------------

    async def _own(self) -> None:
        structlog.contextvars.bind_contextvars(function=self.function, instance=self.id)
        try:
            try:
                await self._start()
            except Exception as e:
                self.start_error = start_failure(e, self._step)
                if isinstance(e, ImagefnError):
                    log.warning("instance_start_failed", error=e.type_name, reason=e.message)
                else:  # engine trouble: report it rather than hang the caller
                    log.exception("instance_start_crashed", step=self._step)
                self.retire("start-failed")
                return
            finally:
                self.started.set()
            if self.inflight == 0:
                # Its starter gave up, or none (provisioned): a waiter may take it now.
                await self.host.pool.instance_idle(self)
            await self._hold()
        finally:
            await self._stop()

    async def _start(self) -> None:
        host = self.host
        pull_s = await host.images.ensure(self.record.image_ref)
        if pull_s:
            self.start_timings["pull"] = pull_s
        t = time.monotonic()
        self._step = "create"
        config = sandbox.container_config(
            self.record,
            name=self.name,
            labels={
                LABEL_MANAGED: "1",
                LABEL_INSTALLATION: host.installation,
                LABEL_WORKER: host.worker_id,
                LABEL_FUNCTION: self.function,
                LABEL_INSTANCE: self.id,
            },
            settings=host.settings,
            networks=host.networks,
        )
        self.container_id = await asyncio.wait_for(
            host.runtime.create(config), ENGINE_CALL_TIMEOUT_S
        )
        self.start_timings["create"] = (t2 := time.monotonic()) - t
        self.transition(State.STARTING)
        self._step = "start"
        await asyncio.wait_for(host.runtime.start(self.container_id), ENGINE_CALL_TIMEOUT_S)
        self.start_timings["start"] = (t3 := time.monotonic()) - t2
        for o in host.observers:
            o.container_started(self)
        self.transition(State.INITIALIZING)
        self._step = "port lookup"
        self.host_port = await asyncio.wait_for(
            host.runtime.host_port(self.container_id), ENGINE_CALL_TIMEOUT_S
        )
        self._step = "readiness check"
        await self._wait_ready()
        self.start_timings["ready"] = time.monotonic() - t3
        host.pool.instance_up(self)
        # Reserved for the invocation that caused the start, unless it gave up meanwhile.
        self.transition(State.BUSY if self.inflight > 0 else State.READY)
        self.awake.set()
        log.info("instance_ready", port=self.host_port, timings=self.start_timings)

    async def _wait_ready(self) -> None:
        host = self.host
        spec = self.record.spec
        loop = asyncio.get_running_loop()
        deadline = loop.time() + spec.init_timeout_s
        next_state_check = loop.time() + STATE_CHECK_EVERY_S
        pid = (await host.runtime.state(self.container_id)).pid
        while loop.time() < deadline:
            # The probe through the published port, confirmed from the host's /proc where
            # it can be read (the proxy alone can look ready a moment too early).
            if await probe_port(self.host_port) and await listens_on_9000(pid) is not False:
                return
            if self.retire_reason:
                raise ContainerInitError(f"instance retired while starting: {self.retire_reason}")
            if loop.time() >= next_state_check:
                state = await host.runtime.state(self.container_id)
                if not state.running:
                    raise await host.diagnosis.exited_while_starting(self.container_id, spec, state)
                next_state_check = loop.time() + STATE_CHECK_EVERY_S
            await asyncio.sleep(host.settings.ready_poll_interval_s)
        state = await host.runtime.state(self.container_id)
        raise await host.diagnosis.never_ready(self.container_id, spec, state)

    async def _hold(self) -> None:
        """Keep the instance until it is retired: freeze it when idle long enough, wake
        it when a request reserved it, retire it when idle past its TTL."""
        pause_after_s = self.host.settings.pause_after_s
        while True:
            self.wakeup.clear()
            if self.retire_reason and (self.inflight == 0 or self.retire_reason in KILL_REASONS):
                return
            if self.state is State.PAUSED and self.inflight > 0:
                await self._resume()
                continue
            # Taken anew each pass: a provisioned instance may have been demoted.
            limits = rules.idle_limits(
                self.record.spec, provisioned=self.provisioned, pause_after_s=pause_after_s
            )
            step = rules.idle_step(
                self.state,
                last_used=self.last_used,
                now=time.monotonic(),
                limits=limits,
                retiring=bool(self.retire_reason),
            )
            if isinstance(step, rules.RetireIdle):
                self.retire("idle")
                continue
            if isinstance(step, rules.Freeze):
                await self._pause()
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wakeup.wait(), step.within_s)

    async def _pause(self) -> None:
        self.awake.clear()
        self.transition(State.PAUSING)
        try:
            await asyncio.wait_for(
                self.host.runtime.pause(self.container_id), ENGINE_CALL_TIMEOUT_S
            )
        except Exception as e:
            log.warning("instance_pause_failed", error=str(e))
            self.retire("crashed")
            self.awake.set()  # anyone who reserved it meanwhile sees it is not BUSY
            return
        self.transition(State.PAUSED)
        log.info("instance_paused")

    async def _resume(self) -> None:
        self.transition(State.RESUMING)
        began = time.monotonic()
        try:
            await asyncio.wait_for(
                self.host.runtime.unpause(self.container_id), ENGINE_CALL_TIMEOUT_S
            )
        except Exception as e:
            log.warning("instance_resume_failed", error=str(e))
            self.retire("crashed")
            self.awake.set()
            return
        # Whoever reserved it may have given up meanwhile.
        self.transition(State.BUSY if self.inflight > 0 else State.READY)
        self.awake.set()
        log.info("instance_resumed", seconds=round(time.monotonic() - began, 4))

    async def _stop(self) -> None:
        if self.state is State.GONE:
            return
        if self.state is not State.STOPPING:
            self.transition(State.STOPPING)
        host = self.host
        reason = self.retire_reason or "unknown"
        if self.container_id:
            stop_s = 0.0 if reason in KILL_REASONS else host.settings.stop_timeout_s
            if host.observers:
                # Stopped first, removed after the observers are done with it: the log
                # shipper must read all the container wrote before its stream is gone.
                await self._stop_container(stop_s)
                for o in host.observers:
                    await o.before_removal(self)
                stop_s = 0.0
            try:
                await asyncio.wait_for(
                    asyncio.shield(host.runtime.remove(self.container_id, stop_s)),
                    ENGINE_CALL_TIMEOUT_S,
                )
            except Exception:
                # The worker must go on; the container stays until this worker's next
                # start or, if the worker dies, another worker's janitor (by label).
                log.exception("instance_remove_failed", container=self.container_id)
        self.transition(State.GONE)
        log.info("instance_removed", reason=reason, invocations=self.invocations)
        await host.pool.instance_gone(self)

    async def _stop_container(self, stop_s: float) -> None:
        try:
            await asyncio.wait_for(
                asyncio.shield(self.host.runtime.stop(self.container_id, stop_s)),
                ENGINE_CALL_TIMEOUT_S,
            )
        except Exception as e:
            log.warning("instance_stop_failed", container=self.container_id, error=str(e))
