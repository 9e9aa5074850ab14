"""Asynchronous invocation under faults, and destinations: a worker or the scheduler
SIGKILLed in the middle of async work loses nothing and ends every accepted event in
exactly one terminal state (duplicates are allowed, but counted); destination records
reach Kafka topics and HTTP endpoints, and a destination that is down slows no
invocation. Real Docker, Redis and broker (docs/architecture.md, section 15, is the
contract).

The kill tests start their own platforms (``running_platform``) so the session's shared
ones keep all their processes; the destination tests use the shared Redis platform.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from shared.keys import Keys
from shared.retry import USER_ERRORS  # failures of the function itself: each uses a retry
from tests.integration.conftest import (
    BACKENDS,
    Platform,
    RegistryInfo,
    WorkerProcess,
    backend_env,
    free_port,
    managed_containers,
    running_platform,
    unique,
    wait_for,
)
from tests.integration.test_async import TERMINAL, invoke_async, until_state

# Enough events that both workers hold some when one dies, few enough for 2 cores.
KILL_EVENTS = 30
# A few slow ones sent first: on Kafka a worker commits a partition only up to its oldest
# record still running, so the short ones it finishes behind a slow one are delivered
# again after it dies, and the fence has duplicates to drop and count.
SLOW_EVENTS = 2
RETRY_EVENTS = 8
DEST_EVENTS = 20


@pytest.fixture
async def platform(shared_platform: Platform) -> Platform:
    """The destination tests: the shared Redis platform, with a scheduler (its
    dispatcher sends the records). Destinations leave the queue out of it: one backend."""
    if not any(m.command == "scheduler" for m in shared_platform.managers):
        await shared_platform.add_scheduler()
    return shared_platform


# -- helpers --------------------------------------------------------------------------------


async def submit(
    client: aiohttp.ClientSession, p: Platform, name: str, event: Any, n: int
) -> list[str]:
    """``n`` async events at once; every one must be accepted (202)."""
    answers = await asyncio.gather(*(invoke_async(client, p, name, event) for _ in range(n)))
    assert [s for s, _ in answers] == [202] * n, answers
    return [a["request_id"] for _, a in answers]


async def records(
    client: aiohttp.ClientSession, p: Platform, rids: list[str]
) -> list[dict[str, Any]]:
    """The records of ``rids`` as ``GET /v1/invocations`` shows them ({} while absent)."""

    async def one(rid: str) -> dict[str, Any]:
        async with client.get(f"{p.url}/v1/invocations/{rid}") as resp:
            if resp.status == 404:
                return {}
            assert resp.status == 200, await resp.text()
            doc: dict[str, Any] = await resp.json()
            return doc

    return list(await asyncio.gather(*(one(rid) for rid in rids)))


async def until_all_terminal(
    client: aiohttp.ClientSession, p: Platform, rids: list[str], timeout_s: float
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    docs: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        docs = await records(client, p, rids)
        if all(d.get("state") in TERMINAL for d in docs):
            return docs
        await asyncio.sleep(0.2)
    states = Counter(d.get("state") for d in docs)
    raise AssertionError(f"not every event reached a terminal state in {timeout_s} s: {states}")


def log_events(processes: list[WorkerProcess]) -> list[dict[str, Any]]:
    """Every JSON log line of these processes (a SIGKILLed one's file included: the
    platform's logger flushes each line, so what the dead process did is all there)."""
    out: list[dict[str, Any]] = []
    for proc in processes:
        for line in proc.log_text().splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
    return out


def terminal_writes(events: list[dict[str, Any]]) -> Counter[str]:
    """Per request id: attempts whose ``finish`` wrote a terminal state (not fenced off)."""
    return Counter(
        e["request_id"]
        for e in events
        if e.get("event") == "async_attempt_done"
        and e.get("duplicate") is False
        and e.get("state") in TERMINAL
    )


def dropped_duplicates(events: list[dict[str, Any]]) -> Counter[str]:
    """Per request id: deliveries the attempt fence dropped (at ``begin`` or ``finish``);
    each one is also counted in the record's ``duplicates``."""
    return Counter(
        e["request_id"]
        for e in events
        if (e.get("event") == "async_not_run" and e.get("verdict") == "duplicate")
        or (e.get("event") == "async_attempt_done" and e.get("duplicate") is True)
    )


def check_attempts_numbered(doc: dict[str, Any]) -> None:
    """One entry per finished attempt, numbered 1..n: a rerun of an attempt that a dead
    worker never finished replaces nothing and adds nothing."""
    numbers = [a["attempt"] for a in doc["attempts"]]
    assert numbers == list(range(1, len(numbers) + 1)), doc


# -- 1. a worker SIGKILLed during async work ------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_worker_killed_during_async_work_ends_every_event_once(
    backend: str,
    redis_url: str,
    log_dir: Path,
    registry: RegistryInfo,
    pushed_images: None,
    client: aiohttp.ClientSession,
) -> None:
    """What the dead worker held is taken over (Redis: reclaimed after 3 s idle; Kafka:
    its partitions move after the 3 s session timeout and are read on from the last
    commit) and run again. What it had finished but not acknowledged comes again too and
    is dropped by the attempt fence: counted in ``duplicates``, never a second outcome."""
    async with running_platform(
        redis_url, log_dir, registry, workers=2, extra_env=backend_env(backend)
    ) as p:
        await p.add_scheduler()
        name = unique("async-kill-w")
        # Room for all of them to run soon (max_instances), and a timeout far above the
        # 0.5 s sleep so that no attempt fails only because the machine is slow.
        await p.deploy(client, name, max_instances=8, timeout_s=20)
        by_id = {w.worker_id: w for w in p.workers}
        started = time.monotonic()
        rids = await submit(client, p, name, {"sleep": 3}, SLOW_EVENTS)
        rids += await submit(client, p, name, {"sleep": 0.5}, KILL_EVENTS - SLOW_EVENTS)

        # Kill a worker that runs some now and has finished some already: the kill must
        # hit work in flight, and finished work it may not have acknowledged yet (Kafka
        # commits lag behind an older record still running) is what comes back as a
        # duplicate.
        victim: WorkerProcess | None = None
        deadline = time.monotonic() + 60
        while victim is None:
            assert time.monotonic() < deadline, "no worker ran some while it had finished some"
            docs = await records(client, p, rids)
            running = Counter(
                d["running"]["worker"]
                for d in docs
                if d.get("state") == "running" and "running" in d
            )
            finished = Counter(
                d["attempts"][-1]["worker"] for d in docs if d.get("state") == "succeeded"
            )
            busy = [w for w in running if finished[w]]
            if busy:
                victim = by_id[max(busy, key=lambda w: running[w])]
            else:
                await asyncio.sleep(0.05)
        victim.kill()
        killed_s = time.monotonic() - started
        survivor = next(w for w in p.workers if w is not victim)
        # Read after the kill: the dead worker changes nothing any more, and the
        # takeover needs seconds, so these are exactly the runs it died holding.
        interrupted = {
            d["request_id"]
            for d in await records(client, p, rids)
            if d.get("state") == "running" and d["running"]["worker"] == victim.worker_id
        }
        assert interrupted, "the kill hit no run in flight"

        docs = await until_all_terminal(client, p, rids, timeout_s=120)
        all_done_s = time.monotonic() - started

        states = Counter(d["state"] for d in docs)
        assert states == {"succeeded": KILL_EVENTS}, states
        for d in docs:
            check_attempts_numbered(d)
            assert d["attempts"][-1]["error"] is None, d
        for d in docs:
            if d["request_id"] in interrupted:
                # Finished by the survivor: the dead worker's run left no attempt behind.
                assert d["attempts"][-1]["worker"] == survivor.worker_id, d

        events = log_events([victim, survivor])
        writes = terminal_writes(events)
        # Exactly one terminal outcome per request id, whoever ran it how often.
        assert {rid: writes[rid] for rid in rids} == dict.fromkeys(rids, 1)
        # Duplicates are allowed but counted: every delivery the fence dropped is in the
        # record's count, and the record counts nothing else.
        dup_logged = dropped_duplicates(events)
        dup_recorded = {d["request_id"]: d["duplicates"] for d in docs}
        assert dup_recorded == {rid: dup_logged[rid] for rid in rids}
        attempts_hist = Counter(len(d["attempts"]) for d in docs)
        # Attempts before the last: throttling or platform errors, retried without using
        # a retry (the function itself never fails here).
        earlier = Counter(a["error"]["type"] for d in docs for a in d["attempts"][:-1])
        assert not earlier.keys() & USER_ERRORS, earlier
        by_survivor = sum(d["attempts"][-1]["worker"] == survivor.worker_id for d in docs)
        print(
            f"\n[{backend}] worker kill: {KILL_EVENTS} events accepted ({SLOW_EVENTS} of 3 s); "
            f"victim {victim.worker_id} killed at {killed_s:.1f} s holding {len(interrupted)} "
            f"running, {finished[victim.worker_id]} finished; all succeeded at "
            f"{all_done_s:.1f} s, {by_survivor} of them by the survivor; terminal state "
            f"written once per request id; duplicates dropped by the fence: "
            f"{sum(dup_recorded.values())} (on {sum(1 for v in dup_recorded.values() if v)} "
            f"records); attempts per record: {dict(sorted(attempts_hist.items()))}; errors "
            f"of the earlier attempts: {dict(earlier)}"
        )
        # The dead worker's containers are removed by the survivor's janitor (the session
        # checks that no started worker left any).
        await wait_for(
            lambda: not managed_containers([victim.worker_id]), 60, "orphaned containers to go"
        )


# -- 2. the scheduler SIGKILLed while retries wait ------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_scheduler_killed_while_retries_wait_loses_none(
    backend: str,
    redis_url: str,
    log_dir: Path,
    registry: RegistryInfo,
    pushed_images: None,
    client: aiohttp.ClientSession,
) -> None:
    """Retries wait in Redis until a scheduler moves them into the queue: with the only
    scheduler dead they stay there (overdue, not lost), and a new scheduler (once the
    dead one's 5 s lease lapses) releases them; every event still gets its 3 attempts
    and is dead-lettered exactly once."""
    async with running_platform(
        redis_url, log_dir, registry, workers=1, extra_env=backend_env(backend)
    ) as p:
        first = await p.add_scheduler()
        name = unique("async-kill-s")
        await p.deploy(
            client,
            name,
            env={"TESTFN_FAIL_STATUS": "500"},
            timeout_s=20,
            **{"async": {"max_retries": 2}},
        )
        started = time.monotonic()
        rids = await submit(client, p, name, {}, RETRY_EVENTS)

        # Kill it while retries wait: once half of the events have failed once.
        deadline = time.monotonic() + 60
        while True:
            docs = await records(client, p, rids)
            if sum(d.get("state") == "retrying" for d in docs) >= RETRY_EVENTS // 2:
                break
            assert time.monotonic() < deadline, Counter(d.get("state") for d in docs)
            await asyncio.sleep(0.05)
        first.kill()
        killed_s = time.monotonic() - started

        # With no scheduler, every event ends up waiting in "retrying" and nothing moves
        # on: wait until each retry is overdue by over a second (the 1st delay is 1 s).
        deadline = time.monotonic() + 30
        while True:
            docs = await records(client, p, rids)
            now = time.time()
            if all(d.get("state") == "retrying" and d["next_attempt_at"] < now - 1.0 for d in docs):
                break
            assert time.monotonic() < deadline, [
                (d.get("state"), d.get("next_attempt_at"), now) for d in docs
            ]
            await asyncio.sleep(0.2)
        # Still held where they wait, one per event: not lost, not released.
        r = aioredis.Redis.from_url(redis_url, decode_responses=True)
        try:
            members = [str(m) for m in await r.zrange(Keys(p.prefix).delayed, 0, -1)]
        finally:
            await r.aclose()
        assert {m.rsplit(":", 1)[0] for m in members} == set(rids), members
        held_done = {d["request_id"]: len(d["attempts"]) for d in docs}

        restarted = time.time()
        second = await p.add_scheduler()
        docs = await until_all_terminal(client, p, rids, timeout_s=90)
        all_done_s = time.monotonic() - started

        states = Counter(d["state"] for d in docs)
        assert states == {"dead-lettered": RETRY_EVENTS}, states
        for d in docs:
            check_attempts_numbered(d)
            assert len(d["attempts"]) == 3, d
            assert all(a["error"]["type"] == "UserCodeError" for a in d["attempts"]), d
        events = log_events([*p.workers, first, second])
        writes = terminal_writes(events)
        assert {rid: writes[rid] for rid in rids} == dict.fromkeys(rids, 1)
        dup_logged = dropped_duplicates(events)
        dup_recorded = {d["request_id"]: d["duplicates"] for d in docs}
        assert dup_recorded == {rid: dup_logged[rid] for rid in rids}
        async with client.get(f"{p.url}/v1/functions/{name}/dlq?limit=100") as resp:
            listing = await resp.json()
        assert listing["count"] == RETRY_EVENTS
        assert sorted(i["request_id"] for i in listing["items"]) == sorted(rids)
        released_by_second = [
            e for e in log_events([second]) if e.get("event") == "retries_released"
        ]
        assert released_by_second, "the new scheduler released nothing"
        print(
            f"\n[{backend}] scheduler kill: {RETRY_EVENTS} events accepted; scheduler killed "
            f"at {killed_s:.1f} s; attempts held at the restart: "
            f"{dict(Counter(held_done.values()))}; the new scheduler's first release "
            f"{_seconds_after(released_by_second[0], restarted):.1f} s after its start "
            f"(lease lapse); all dead-lettered with 3 attempts at {all_done_s:.1f} s; "
            f"terminal state written once per request id; duplicates dropped by the "
            f"fence: {sum(dup_recorded.values())}"
        )


def _seconds_after(event: dict[str, Any], then: float) -> float:
    """How long after ``then`` (epoch seconds) a log line was written."""
    return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp() - then


# -- 3. destinations ------------------------------------------------------------------------


class TopicReader:
    """A topic read from its beginning once it exists (the dispatcher creates it when it
    sends the first record: a consumer started earlier would not see it)."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.topic = topic
        self.records: list[tuple[bytes | None, dict[str, Any]]] = []
        self._bootstrap = bootstrap
        self._consumer: AIOKafkaConsumer | None = None

    async def close(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()

    async def _start(self) -> bool:
        admin = AIOKafkaAdminClient(bootstrap_servers=self._bootstrap, client_id="it-dest")
        try:
            await admin.start()
            if self.topic not in await admin.list_topics():
                return False
        except KafkaError:
            return False
        finally:
            await admin.close()
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self._bootstrap,
            enable_auto_commit=False,
            client_id="it-dest",
            fetch_max_wait_ms=100,
        )
        await consumer.start()
        tps = [
            TopicPartition(self.topic, n) for n in consumer.partitions_for_topic(self.topic) or []
        ]
        if not tps:
            await consumer.stop()
            return False
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        self._consumer = consumer
        return True

    async def until(self, rids: set[str], timeout_s: float) -> list[dict[str, Any]]:
        """The records of ``rids``, once all have arrived."""
        deadline = time.monotonic() + timeout_s
        while not rids <= {v.get("request_id") for _, v in self.records}:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.topic}: waited {timeout_s} s for {sorted(rids)}, got "
                    f"{[v.get('request_id') for _, v in self.records]}"
                )
            if self._consumer is None:
                if not await self._start():
                    await asyncio.sleep(0.2)
                continue
            batches = await self._consumer.getmany(timeout_ms=200)
            for msgs in batches.values():
                self.records.extend((m.key, json.loads(m.value)) for m in msgs)
        return [v for _, v in self.records if v.get("request_id") in rids]


async def test_destination_records_reach_kafka_topics(
    platform: Platform, client: aiohttp.ClientSession
) -> None:
    name = unique("async-dest-k")
    ok_topic, fail_topic = f"it-ok-{uuid.uuid4().hex[:8]}", f"it-fail-{uuid.uuid4().hex[:8]}"
    # No retries: the failing event is dead-lettered after its one attempt.
    await platform.deploy(
        client,
        name,
        destinations={"on_success": {"kafka": ok_topic}, "on_failure": {"kafka": fail_topic}},
        **{"async": {"max_retries": 0}},
    )
    [ok_rid] = await submit(client, platform, name, {"body": {"answer": 42}}, 1)
    [fail_rid] = await submit(client, platform, name, {"status": 500}, 1)
    assert (await until_state(client, platform, ok_rid, TERMINAL))["state"] == "succeeded"
    assert (await until_state(client, platform, fail_rid, TERMINAL))["state"] == "dead-lettered"

    bootstrap = platform.env["IMAGEFN_KAFKA_BOOTSTRAP"]
    ok_reader, fail_reader = TopicReader(bootstrap, ok_topic), TopicReader(bootstrap, fail_topic)
    try:
        [ok] = await ok_reader.until({ok_rid}, timeout_s=60)
        [failed] = await fail_reader.until({fail_rid}, timeout_s=60)
    finally:
        await ok_reader.close()
        await fail_reader.close()
    # Each topic has only its own kind of outcome.
    assert [v["request_id"] for _, v in ok_reader.records] == [ok_rid]
    assert [v["request_id"] for _, v in fail_reader.records] == [fail_rid]
    assert ok_reader.records[0][0] == ok_rid.encode()  # keyed by request id

    assert ok["function"] == name and ok["status"] == "succeeded"
    assert ok["result"] == {"answer": 42}
    assert [a["attempt"] for a in ok["attempts"]] == [1]
    assert ok["attempts"][0]["error"] is None and ok["attempt_count"] == 1
    assert "error" not in ok

    assert failed["function"] == name and failed["status"] == "dead-lettered"
    assert failed["error"]["type"] == "UserCodeError"
    assert "result" not in failed
    assert [a["attempt"] for a in failed["attempts"]] == [1]
    assert failed["attempts"][0]["error"]["type"] == "UserCodeError"

    async with client.get(f"{platform.url}/v1/functions/{name}/destinations") as resp:
        stats = await resp.json()
    assert (stats["delivered"], stats["failed"]) == (2, 0), stats


@contextlib.asynccontextmanager
async def hook_server() -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    """An HTTP destination on 127.0.0.1: its URL, and the bodies POSTed to it."""
    bodies: list[dict[str, Any]] = []

    async def receive(request: web.Request) -> web.Response:
        bodies.append(await request.json())
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", receive)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}/hook", bodies
    finally:
        await runner.cleanup()


async def test_destination_records_are_posted_to_an_http_url(
    platform: Platform, client: aiohttp.ClientSession
) -> None:
    async with hook_server() as (url, bodies):
        name = unique("async-dest-h")
        await platform.deploy(client, name, destinations={"on_success": {"url": url}})
        [rid] = await submit(client, platform, name, {"body": "plain text"}, 1)
        assert (await until_state(client, platform, rid, TERMINAL))["state"] == "succeeded"
        await wait_for(lambda: bool(bodies), 30, "the destination record")
        # Nothing failed, so nothing is sent again (delivery is at least once only
        # across dispatcher crashes): give a second POST the time to show up.
        await asyncio.sleep(1)
    assert len(bodies) == 1, bodies
    [body] = bodies
    assert body["request_id"] == rid and body["function"] == name
    assert body["status"] == "succeeded" and body["result"] == "plain text"
    assert [a["attempt"] for a in body["attempts"]] == [1]
    assert body["attempts"][0]["error"] is None
    assert body["timestamps"]["finished_at"] >= body["timestamps"]["accepted_at"] > 0
    async with client.get(f"{platform.url}/v1/functions/{name}/destinations") as resp:
        stats = await resp.json()
    assert (stats["delivered"], stats["failed"]) == (1, 0) and "last_error" not in stats


async def time_to_all_succeeded(client: aiohttp.ClientSession, p: Platform, name: str) -> float:
    started = time.monotonic()
    rids = await submit(client, p, name, {}, DEST_EVENTS)
    docs = await until_all_terminal(client, p, rids, timeout_s=120)
    assert Counter(d["state"] for d in docs) == {"succeeded": DEST_EVENTS}
    return time.monotonic() - started


async def test_a_destination_that_is_down_slows_no_invocation(
    platform: Platform, client: aiohttp.ClientSession
) -> None:
    """Workers only add the record to the outbox; the scheduler's dispatcher sends it.
    A refused connection costs the dispatcher its tries (5, 7.5 s of waits between),
    never the invocation."""
    down = f"http://127.0.0.1:{free_port()}/hook"  # nothing listens there
    plain, dead = unique("async-nodest"), unique("async-deaddest")
    # The same shape for both, and one warm instance each (a synchronous call sends no
    # destination record), so the two runs differ only in the destination.
    for name, extra in ((plain, {}), (dead, {"destinations": {"on_success": {"url": down}}})):
        await platform.deploy(client, name, max_instances=4, **extra)
        status, _, body = await platform.invoke(client, name, {})
        assert status == 200, body

    without = await time_to_all_succeeded(client, platform, plain)
    with_down = await time_to_all_succeeded(client, platform, dead)
    print(
        f"\n{DEST_EVENTS} async events to all succeeded: {without:.2f} s without a "
        f"destination, {with_down:.2f} s with one that is down"
    )
    assert with_down < 2 * without + 2, (without, with_down)

    # Every record is given up on once, counted as failed with the reason.
    stats: dict[str, Any] = {}
    deadline = time.monotonic() + 90
    while stats.get("failed", 0) < DEST_EVENTS:
        assert time.monotonic() < deadline, stats
        await asyncio.sleep(0.5)
        async with client.get(f"{platform.url}/v1/functions/{dead}/destinations") as resp:
            stats = await resp.json()
    assert stats["failed"] == DEST_EVENTS and stats["delivered"] == 0, stats
    assert stats["last_error"] and stats["last_error_at"] > 0, stats
    print(f"down destination: {stats}")
    async with client.get(f"{platform.url}/v1/functions/{plain}/destinations") as resp:
        assert await resp.json() == {"function": plain, "delivered": 0, "failed": 0}
