"""workers.worker.Worker over a MemoryQueue, a fake Redis and the pool's fakes."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from shared.errors import QueueUnavailable
from shared.messages import Heartbeat, InvocationResult
from shared.queue.base import MAX_ATTEMPTS, Delivery
from shared.queue.memory import MemoryQueue
from shared.settings import QueueSettings, Settings
from workers.runtime import LABEL_INSTALLATION, LABEL_MANAGED, LABEL_WORKER, ContainerConfig
from workers.worker import Worker

from .conftest import FAST_WORKER, INSTALLATION, PoolKit
from .fakes import FakeRedis
from .helpers import eventually, make_invocation, make_record

SETTINGS = Settings(
    queue=QueueSettings(prefix=INSTALLATION, reclaim_idle_ms=60_000, claim_refresh_s=5.0),
    worker=FAST_WORKER,
)
HEARTBEAT = f"{INSTALLATION}:worker:{FAST_WORKER.worker_id}"


@dataclass
class Running:
    worker: Worker
    kit: PoolKit
    queue: MemoryQueue
    redis: FakeRedis
    task: asyncio.Task[None]


@pytest.fixture
async def running(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Running]:
    # Short blocking reads, so that draining does not wait a whole second.
    monkeypatch.setattr("workers.worker.CONSUME_BLOCK_S", 0.05)
    kit = PoolKit(FAST_WORKER)
    queue = MemoryQueue()
    redis = FakeRedis()
    worker = Worker(SETTINGS, queue, kit.pool, kit.runtime, redis)  # type: ignore[arg-type]
    task = asyncio.create_task(worker.run())
    await eventually(lambda: HEARTBEAT in redis.strings)
    yield Running(worker, kit, queue, redis, task)
    worker.shutdown()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)
    await kit.runtime.close()


async def test_invocations_are_run_and_answered(running: Running) -> None:
    record = make_record()
    first = await running.queue.call(make_invocation(record, request_id="r1"), 3)
    second = await running.queue.call(make_invocation(record, request_id="r2"), 3)
    assert first is not None and second is not None
    assert (first.request_id, first.status, first.cold_start) == ("r1", 200, True)
    assert (second.request_id, second.cold_start) == ("r2", False)
    assert first.worker == second.worker == FAST_WORKER.worker_id
    assert running.queue.pending_count == 0
    assert running.redis.ttls_ms[HEARTBEAT] == int(FAST_WORKER.heartbeat_ttl_s * 1000)


async def test_expired_invocation_is_acknowledged_without_running(running: Running) -> None:
    inv = make_invocation(make_record(), deadline_in_s=-1)
    await running.queue.publish(inv)
    await eventually(lambda: running.queue.pending_count == 0)
    await asyncio.sleep(0.02)
    assert running.kit.forwarder.calls == []
    assert running.kit.runtime.containers == {}
    assert running.queue.results == []


async def test_poison_invocation_is_answered_with_internal_error(running: Running) -> None:
    inv = make_invocation(make_record(), request_id="poison")
    await running.worker._handle(Delivery(inv, "receipt-x", attempt=MAX_ATTEMPTS + 1))
    [result] = running.queue.results
    assert result.request_id == "poison"
    assert result.error is not None and result.error["type"] == "InternalError"
    assert running.kit.forwarder.calls == []


async def test_container_death_reaches_the_pool(running: Running) -> None:
    result = await running.queue.call(make_invocation(make_record()), 3)
    assert result is not None and result.error is None
    [cid] = running.kit.runtime.containers
    running.kit.runtime.deaths.put_nowait(cid)
    await eventually(lambda: running.kit.pool.instances() == [])


async def test_shutdown_stops_containers_and_the_heartbeat(running: Running) -> None:
    result = await running.queue.call(make_invocation(make_record()), 3)
    assert result is not None and result.error is None
    running.worker.shutdown()
    running.worker.shutdown()  # idempotent
    started = time.monotonic()
    await asyncio.wait_for(running.task, 5)
    assert time.monotonic() - started < 2
    assert running.kit.runtime.live() == []
    assert HEARTBEAT not in running.redis.strings


async def test_janitor_removes_only_dead_workers_containers_of_this_installation() -> None:
    kit = PoolKit(FAST_WORKER)
    redis = FakeRedis()
    redis.strings[f"{INSTALLATION}:worker:alive-worker"] = b"1"
    worker = Worker(SETTINGS, MemoryQueue(), kit.pool, kit.runtime, redis)  # type: ignore[arg-type]

    async def container(installation: str, owner: str) -> str:
        labels = {LABEL_MANAGED: "1", LABEL_INSTALLATION: installation, LABEL_WORKER: owner}
        config = ContainerConfig("c", "img", None, None, {}, labels, 128, 1.0, 1, 1, 16, "net")
        return await kit.runtime.create(config)

    dead = await container(INSTALLATION, "dead-worker")
    alive = await container(INSTALLATION, "alive-worker")
    mine = await container(INSTALLATION, FAST_WORKER.worker_id)
    unlabelled = await container(INSTALLATION, "")
    foreign = await container("other-installation", "dead-worker")
    await worker._remove_orphans()
    assert sorted(cid for cid, _ in kit.runtime.removed) == sorted([dead, unlabelled])
    assert {c.id for c in kit.runtime.live()} == {alive, mine, foreign}


async def test_the_heartbeat_carries_the_queues_report_for_routing() -> None:
    class ReportingQueue(MemoryQueue):
        def consumer_info(self) -> dict[str, Any]:
            return {"partitions": [2, 5]}

    kit = PoolKit(FAST_WORKER)
    redis = FakeRedis()
    worker = Worker(SETTINGS, ReportingQueue(), kit.pool, kit.runtime, redis)  # type: ignore[arg-type]
    await worker._heartbeat_once()
    assert Heartbeat.decode(redis.strings[HEARTBEAT]).queue == {"partitions": [2, 5]}
    await kit.runtime.close()


async def test_a_result_the_queue_could_not_take_is_retried_not_dropped() -> None:
    """Broker trouble in finish (here Kafka's) is retried until the result is delivered."""

    class FlakyQueue(MemoryQueue):
        def __init__(self) -> None:
            super().__init__()
            self.failures = 2

        async def finish(self, delivery: Delivery, result: InvocationResult | None) -> None:
            if self.failures:
                self.failures -= 1
                raise QueueUnavailable("queue unavailable: broker away")
            await super().finish(delivery, result)

    kit = PoolKit(FAST_WORKER)
    queue = FlakyQueue()
    worker = Worker(SETTINGS, queue, kit.pool, kit.runtime, FakeRedis())  # type: ignore[arg-type]
    inv = make_invocation(make_record(), request_id="flaky")
    await worker._handle(Delivery(inv, "receipt-1"))
    assert queue.failures == 0
    [result] = queue.results
    assert (result.request_id, result.status) == ("flaky", 200)
    # Then its record, after the result.
    assert f"{INSTALLATION}:invocation:flaky" in worker._redis.hashes  # type: ignore[attr-defined]
    await kit.pool.shutdown(timeout_s=5)
    await kit.runtime.close()
