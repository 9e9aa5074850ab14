"""What only the Kafka queue backend has to prove on top of the suite every backend runs
(test_invoke, test_failures, test_workers): warm affinity by partition, a clean hand-over
when a worker stops, invocations published before any worker existed, no head-of-line
blocking between functions that share a partition, and a broker that goes away."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis

from shared.errors import ServiceUnavailable
from shared.keys import Keys
from shared.liveness import heartbeats
from shared.messages import Heartbeat
from shared.queue.kafka import KafkaQueue
from shared.settings import KafkaSettings
from tests.integration.conftest import (
    Platform,
    RegistryInfo,
    WorkerProcess,
    backend_env,
    free_port,
    running_platform,
    start_broker,
    unique,
)
from tests.unit.helpers import make_invocation, make_record


async def queue_reports(redis_url: str, prefix: str) -> dict[str, list[int]]:
    """worker id → the invocation partitions its last heartbeat reports."""
    r = aioredis.Redis.from_url(redis_url)
    try:
        beats = await heartbeats(r, Keys(prefix))
    finally:
        await r.aclose()
    out: dict[str, list[int]] = {}
    for worker, raw in beats.items():
        if raw is not None:
            out[worker] = list((Heartbeat.decode(raw).queue or {}).get("partitions", []))
    return out


async def until_partitions(
    redis_url: str, p: Platform, expected: dict[str, int | None], timeout_s: float = 30
) -> dict[str, list[int]]:
    """Wait until every worker named in ``expected`` reports partitions (exactly that many
    when a number is given; some when None), together covering all of them."""
    deadline = time.monotonic() + timeout_s
    reports: dict[str, list[int]] = {}
    while time.monotonic() < deadline:
        reports = await queue_reports(redis_url, p.prefix)
        counts_ok = all(
            reports.get(w) and (n is None or len(reports[w]) == n) for w, n in expected.items()
        )
        if counts_ok:
            return reports
        await asyncio.sleep(0.2)
    raise AssertionError(f"partitions never settled as {expected}: {reports}")


def ran(worker: WorkerProcess, request_id: str) -> bool:
    return any(
        '"invocation_done"' in line and request_id in line
        for line in worker.log_text().splitlines()
    )


async def invoke_as(
    client: aiohttp.ClientSession, p: Platform, name: str, request_id: str, event: object
) -> tuple[int, str]:
    async with client.post(
        f"{p.url}/v1/functions/{name}/invoke", json=event, headers={"X-Request-Id": request_id}
    ) as resp:
        await resp.read()
        return resp.status, resp.headers.get("X-Imagefn-Instance", "")


async def test_warm_calls_follow_the_instance_and_a_stopping_worker_hands_over_cleanly(
    redis_url: str,
    log_dir: Path,
    registry: RegistryInfo,
    pushed_images: None,
    client: aiohttp.ClientSession,
) -> None:
    # A session timeout longer than the hand-over is allowed to take: only leaving the
    # group, not the timeout, can move the partitions in time. (Tansu takes about half the
    # session timeout to complete a rebalance.)
    env = {**backend_env("kafka"), "IMAGEFN_KAFKA_SESSION_TIMEOUT_MS": "10000"}
    async with running_platform(redis_url, log_dir, registry, workers=2, extra_env=env) as p:
        a, b = p.workers
        reports = await until_partitions(redis_url, p, {a.worker_id: None, b.worker_id: None})
        assert sorted(reports[a.worker_id] + reports[b.worker_id]) == [0, 1, 2, 3], reports

        name = unique("affine")
        await p.deploy(client, name, timeout_s=10)
        status, instance = await invoke_as(client, p, name, unique("first-call"), {})
        assert status == 200
        holder, other = (a, b) if instance in a.log_text() else (b, a)

        # Unrouted, each call would land on the other worker's partitions half the time.
        for i in range(10):
            # The router counts an instance it routed to as taken until its next refresh
            # (heartbeats every 0.5 s, refresh every 0.5 s): space the calls beyond that.
            await asyncio.sleep(1.1)
            rid = unique(f"warm-{i}")
            status, got = await invoke_as(client, p, name, rid, {})
            assert status == 200
            assert got == instance, f"call {i} ran on {got}, not on the warm {instance}"
            assert not ran(other, rid)
        assert name not in other.log_text()

        # A call in flight when its worker is told to stop: that worker finishes it,
        # commits it and leaves the group, so the other neither runs it again nor waits
        # for the session timeout to take the partitions over.
        rid = unique("draining")
        await asyncio.sleep(1.1)  # routed to the warm instance again, as above
        call = asyncio.create_task(invoke_as(client, p, name, rid, {"sleep": 2}))
        await asyncio.sleep(0.7)
        stopping = time.monotonic()
        assert await holder.stop() == 0
        status, got = await asyncio.wait_for(call, 30)
        assert (status, got) == (200, instance)
        await until_partitions(redis_url, p, {other.worker_id: 4}, timeout_s=15)
        # Stopping took the drain (~1.3 s); by a session timeout, the rebalance could not
        # even have started before 10 s.
        assert time.monotonic() - stopping < 9.5
        status, _ = await invoke_as(client, p, name, unique("after"), {})
        assert status == 200
        await asyncio.sleep(1)  # anything redelivered would have run by now
        assert not ran(other, rid)
        assert "invocation_redelivered" not in other.log_text()


async def test_one_partition_a_slow_function_does_not_hold_up_another(
    redis_url: str,
    log_dir: Path,
    registry: RegistryInfo,
    pushed_images: None,
    client: aiohttp.ClientSession,
) -> None:
    env = {**backend_env("kafka"), "IMAGEFN_KAFKA_INVOCATION_PARTITIONS": "1"}
    async with running_platform(redis_url, log_dir, registry, workers=0, extra_env=env) as p:
        slow, fast = unique("slow1p"), unique("fast1p")
        await p.deploy(client, slow, timeout_s=20)
        await p.deploy(client, fast)
        # Published before any worker exists: the first worker reads it from the start of
        # the partition.
        early = asyncio.create_task(p.invoke(client, fast, {"n": 0}))
        await asyncio.sleep(1)
        worker = await p.add_worker()
        status, _, body = await asyncio.wait_for(early, 60)
        assert status == 200 and body["event"] == {"n": 0}
        reports = await until_partitions(redis_url, p, {worker.worker_id: 1})
        assert reports[worker.worker_id] == [0]
        await p.invoke(client, slow, {})  # both warm: only queueing is timed below

        loop = asyncio.get_running_loop()
        slow_call = asyncio.create_task(p.invoke(client, slow, {"sleep": 6}))
        await asyncio.sleep(0.5)
        for i in range(5):
            started = loop.time()
            status, headers, _ = await p.invoke(client, fast, {"n": i + 1})
            assert status == 200 and headers["X-Imagefn-Cold-Start"] == "false"
            assert loop.time() - started < 1.0
        assert not slow_call.done()  # still running behind them on the same partition
        status, _, _ = await asyncio.wait_for(slow_call, 30)
        assert status == 200


async def test_a_broker_gone_away_makes_publish_service_unavailable(tmp_path: Path) -> None:
    port = free_port()
    broker = start_broker(port, tmp_path / "broker.log")
    settings = KafkaSettings(
        bootstrap=f"127.0.0.1:{port}",
        topic_prefix=unique("gone"),
        invocation_partitions=2,
        reply_partitions=1,
    )
    q = KafkaQueue(settings)
    try:
        await q.open()
        await q.publish(make_invocation(make_record()))  # accepted while it is there
        broker.kill()
        broker.wait(10)
        started = time.monotonic()
        with pytest.raises(ServiceUnavailable, match="queue unavailable"):
            await q.publish(make_invocation(make_record()))
        # The producer's request timeout (10 s), not forever.
        assert time.monotonic() - started < 15
    finally:
        if broker.poll() is None:
            broker.kill()
            broker.wait(10)
        await q.close()
