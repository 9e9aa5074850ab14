"""Fixtures of the unit tests: a container pool over an in-memory runtime."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import pytest

from shared.settings import WorkerSettings
from workers.forwarder import Forwarder
from workers.pool import ContainerPool

from .fakes import FakeForwarder, FakeRuntime

INSTALLATION = "imagefn-test"
FAST_WORKER = WorkerSettings(
    worker_id="w-test",
    ready_poll_interval_s=0.002,
    stop_timeout_s=0.0,
    memory_capacity_mb=16384,
    log_tail_lines=5,
)


class PoolKit:
    """A pool plus the fakes behind it, for one test."""

    def __init__(self, settings: WorkerSettings) -> None:
        self.runtime = FakeRuntime()
        self.forwarder = FakeForwarder()
        self.pool = ContainerPool(
            self.runtime,
            cast(Forwarder, self.forwarder),
            settings,
            settings.worker_id,
            INSTALLATION,
        )


@pytest.fixture
async def make_pool() -> AsyncIterator[Callable[..., PoolKit]]:
    kits: list[PoolKit] = []

    def make(**settings: Any) -> PoolKit:
        kit = PoolKit(WorkerSettings(**{**FAST_WORKER.__dict__, **settings}))
        kits.append(kit)
        return kit

    yield make
    for kit in kits:
        await kit.pool.shutdown(timeout_s=2)
        await kit.runtime.close()


@pytest.fixture
async def kit(make_pool: Callable[..., PoolKit]) -> PoolKit:
    return make_pool()
