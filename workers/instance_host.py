"""What the instances of one worker share, and the interfaces they talk through.

``InstanceHost`` carries the engine, the forwarder, the worker's settings, the image
store, and the two parties an instance reports to: its pool (``PoolHooks``: came up,
idle with nobody waiting, gone) and its observers (``InstanceObserver``: the log
shipper, ``workers/instance_logs.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from shared.settings import WorkerSettings
from shared.settings_security import NetworkSettings
from workers.failures import Diagnosis
from workers.forwarder import Forwarder
from workers.runtime import ContainerRuntime

if TYPE_CHECKING:
    from workers.instance import Instance


class ImageProvider(Protocol):
    def check(self, image_ref: str, digest: str = "") -> None: ...
    async def ensure(self, image_ref: str) -> float: ...


class PoolHooks(Protocol):
    """What an instance tells its pool, which keeps the waiters and the provisioning."""

    def instance_up(self, inst: Instance) -> None: ...
    async def instance_idle(self, inst: Instance) -> None: ...
    async def instance_gone(self, inst: Instance) -> None: ...


class InstanceObserver(Protocol):
    """Watches instances (the log shipper). The synchronous calls must be cheap: they sit
    on the request path."""

    def container_started(self, inst: Instance) -> None: ...
    def request_started(
        self, inst: Instance, request_id: str, *, cold: bool, init_ms: float | None
    ) -> None: ...
    def request_ended(
        self, inst: Instance, request_id: str, *, status: int | None, error: str | None
    ) -> None: ...
    async def before_removal(self, inst: Instance) -> None: ...


class InstanceHost:
    """What all instances of one worker share."""

    def __init__(
        self,
        *,
        runtime: ContainerRuntime,
        forwarder: Forwarder,
        settings: WorkerSettings,
        images: ImageProvider,
        networks: NetworkSettings,
        installation: str,
        worker_id: str,
        pool: PoolHooks,
        observers: tuple[InstanceObserver, ...] = (),
    ) -> None:
        self.runtime = runtime
        self.forwarder = forwarder
        self.settings = settings
        self.images = images
        self.networks = networks
        self.installation = installation
        self.worker_id = worker_id
        self.pool = pool
        self.observers = observers
        self.diagnosis = Diagnosis(runtime, settings.log_tail_lines)
