"""Engine failures classified into the contract's error types, in one place.

An instance can fail while it starts, while it should be getting ready, and while it
serves a request. The engine (or the socket) only says *that* something went wrong; what
the caller hears must say *why* in the contract's terms (``OutOfMemory``,
``UserProcessExited``, ``PortBindingFailed``, ...), with the instance's last log lines.
``workers/runtime.py`` already translates the engine's refusals of create/start; this
module classifies the rest by looking at the container afterwards.
"""

from __future__ import annotations

from typing import Any

from shared.errors import (
    ContainerInitError,
    ImagefnError,
    InitContainerTimeout,
    InternalError,
    OutOfMemory,
    PortBindingFailed,
    UserCodeError,
    UserProcessExited,
)
from shared.spec import FunctionSpec
from workers.probe import diagnose_listeners
from workers.runtime import ContainerRuntime, ContainerState, wait_for_exit

# How long a lost connection waits for the engine to record the process's exit: a dying
# server closes its sockets a moment before the engine knows it is gone.
EXIT_SETTLE_S = 1.0


def start_failure(e: BaseException, step: str) -> ImagefnError:
    """What a failed start tells the invocations waiting on it."""
    if isinstance(e, ImagefnError):
        return e
    if isinstance(e, TimeoutError):
        # The engine call's own bound: the engine is in trouble, not the function.
        return InternalError(f"instance start failed: the engine's {step} took too long")
    return InternalError(f"instance start failed: {e}")


class Diagnosis:
    """Looks at a container that failed and names the failure."""

    def __init__(self, runtime: ContainerRuntime, log_tail_lines: int) -> None:
        self._runtime = runtime
        self._lines = log_tail_lines

    async def _logs(self, container_id: str) -> list[str]:
        return await self._runtime.logs_tail(container_id, self._lines)

    async def exited_while_starting(
        self, container_id: str, spec: FunctionSpec, state: ContainerState
    ) -> ImagefnError:
        """The process exited before it listened on port 9000."""
        details: dict[str, Any] = {
            "exit_code": state.exit_code,
            "logs": await self._logs(container_id),
        }
        if state.oom_killed:
            return OutOfMemory(
                f"instance ran out of its memory while starting ({spec.memory_mb} MB, plus "
                f"{spec.tmp_mb} MB for what /tmp holds)",
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

    async def never_ready(
        self, container_id: str, spec: FunctionSpec, state: ContainerState
    ) -> ImagefnError:
        """``init_timeout_s`` ran out: exited meanwhile, listening elsewhere, or silent."""
        if not state.running:
            return await self.exited_while_starting(container_id, spec, state)
        logs = await self._logs(container_id)
        listening = await diagnose_listeners(state.pid)
        if listening:
            return PortBindingFailed(
                "the server does not listen on 0.0.0.0:9000 (it listens on "
                f"{', '.join(listening)}); please confirm your http server has enabled "
                "listening on port 9000",
                details={"listening": listening, "logs": logs},
            )
        return InitContainerTimeout(
            f"nothing listened on port 9000 within the init timeout of {spec.init_timeout_s:g} s;"
            " please confirm your http server has enabled listening on port 9000",
            details={"logs": logs},
        )

    async def lost_connection(
        self, container_id: str, spec: FunctionSpec, why: str
    ) -> ImagefnError:
        """The connection of a request broke: the socket cannot say why, the container can."""
        state = await wait_for_exit(self._runtime, container_id, EXIT_SETTLE_S)
        logs = await self._logs(container_id)
        if state.oom_killed:
            return OutOfMemory(
                f"instance was killed for exceeding its memory limit ({spec.memory_mb} MB, "
                f"plus {spec.tmp_mb} MB for what /tmp holds)",
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

    @staticmethod
    def event_answer(status: int, body: bytes) -> ImagefnError | None:
        """The contract: any non-2xx answer to an event is the user code's error."""
        if 200 <= status < 300:
            return None
        return UserCodeError(
            f"function answered HTTP {status}",
            details={
                "function_status": status,
                "function_body": body[:65536].decode("utf-8", "replace"),
            },
        )
