"""The log shipper as an observer of instances.

The shipper (``workers/logship.py``) knows containers, not instances: this adapter
tells it which container to follow once started, where each request begins and ends
(its START, END and REPORT records), and waits before a container is removed until all
it wrote has been read.
"""

from __future__ import annotations

from workers.instance import Instance
from workers.logship import InstanceLogs, LogSource


class LogObserver:
    def __init__(self, logs: InstanceLogs) -> None:
        self._logs = logs

    def container_started(self, inst: Instance) -> None:
        spec = inst.record.spec
        self._logs.follow(
            inst.container_id,
            LogSource(
                function=spec.name,
                version=inst.record.version,
                instance=inst.name,
                concurrency=spec.instance_concurrency,
                memory_limit_mb=spec.memory_mb,
            ),
        )

    def request_started(
        self, inst: Instance, request_id: str, *, cold: bool, init_ms: float | None
    ) -> None:
        if inst.container_id:
            self._logs.request_started(inst.container_id, request_id, cold=cold, init_ms=init_ms)

    def request_ended(
        self, inst: Instance, request_id: str, *, status: int | None, error: str | None
    ) -> None:
        if inst.container_id:
            self._logs.request_ended(inst.container_id, request_id, status=status, error=error)

    async def before_removal(self, inst: Instance) -> None:
        # Bounded by the shipper (drain_timeout_s): removal is never held up for long.
        await self._logs.drained(inst.container_id)
