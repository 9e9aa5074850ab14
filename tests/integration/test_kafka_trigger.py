"""The Kafka trigger against the real broker, with ``imagefn triggers`` subprocesses.

The function (the test image running a small inline server) prints one line per call,
``KBATCH {"t": <its clock>, "topic": ..., "r": [[partition, offset, body], ...]}``, and
answers ``batchItemFailures`` naming every record whose body starts with "poison". The
test reads those lines back from the platform's logs topic: every delivery the function
saw, in the order it saw them.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from tests.integration.conftest import KAFKA, Platform, RegistryInfo, running_platform, unique
from tests.integration.test_logship import LogReader

FUNCTION = r"""
import json, signal, sys, time
from http.server import BaseHTTPRequestHandler, HTTPServer
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    wbufsize = -1
    def do_POST(self):
        n = int(self.headers.get("Content-Length") or 0)
        recs = [r["Ckafka"] for r in json.loads(self.rfile.read(n) or b"{}").get("Records", [])]
        line = {"t": time.time(), "topic": recs[0]["topic"] if recs else "",
                "r": [[r["partition"], r["offset"], r["msgBody"]] for r in recs]}
        print("KBATCH " + json.dumps(line, separators=(",", ":")), flush=True)
        bad = [{"itemIdentifier": str(r["offset"])}
               for r in recs if r["msgBody"].startswith("poison")]
        body = json.dumps({"batchItemFailures": bad}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
HTTPServer(("0.0.0.0", 9000), H).serve_forever()
"""

# A killed runner's partitions move to the others within seconds.
FAST_GROUPS = {
    "IMAGEFN_KAFKA_SESSION_TIMEOUT_MS": "3000",
    "IMAGEFN_KAFKA_HEARTBEAT_INTERVAL_MS": "500",
}

Batch = dict[str, Any]


@pytest.fixture(scope="module")
async def kplatform(
    pushed_images: None, redis_url: str, log_dir: Path, registry: RegistryInfo
) -> AsyncIterator[Platform]:
    async with running_platform(
        redis_url, log_dir, registry, workers=1, extra_env=FAST_GROUPS
    ) as p:
        yield p


@pytest.fixture(scope="module")
async def fn(kplatform: Platform) -> str:
    name = unique("kt")
    async with aiohttp.ClientSession(
        headers={"Authorization": f"Bearer {kplatform.env['IMAGEFN_ADMIN_KEY']}"}
    ) as client:
        await kplatform.deploy(
            client, name, command=["python3", "-c", FUNCTION], timeout_s=30, max_instances=8
        )
    return name


@pytest.fixture(scope="module")
async def reader(kplatform: Platform) -> AsyncIterator[LogReader]:
    async with LogReader(KAFKA["bootstrap"], kplatform.prefix) as r:
        yield r


async def create_topic(name: str, partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=KAFKA["bootstrap"], client_id="it-kt")
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, partitions, 1)])
    finally:
        await admin.close()


async def produce(topic: str, records: list[tuple[int, bytes]]) -> None:
    """Each (partition, value), in order."""
    p = AIOKafkaProducer(bootstrap_servers=KAFKA["bootstrap"], acks="all", linger_ms=5)
    await p.start()
    try:
        futures = [await p.send(topic, value=v, key=b"k", partition=n) for n, v in records]
        await asyncio.gather(*futures)
    finally:
        await p.stop()


def batches(reader: LogReader, topic: str) -> list[Batch]:
    """Every call the function saw for ``topic``, in the order it saw them."""
    found = []
    for r in reader.records:
        line = r.get("line", "")
        if r.get("type") == "line" and line.startswith("KBATCH "):
            doc = json.loads(line[len("KBATCH ") :])
            if doc["topic"] == topic:
                found.append(doc)
    return sorted(found, key=lambda d: d["t"])


def delivered(reader: LogReader, topic: str) -> set[tuple[int, int]]:
    return {(p, o) for b in batches(reader, topic) for p, o, _ in b["r"]}


async def until_delivered(reader: LogReader, topic: str, count: int, timeout_s: float) -> None:
    await reader.until(
        lambda _: len(delivered(reader, topic)) >= count, timeout_s, f"{count} records of {topic}"
    )


async def put_trigger(
    client: aiohttp.ClientSession, p: Platform, fn: str, name: str, **doc: Any
) -> tuple[int, Any]:
    async with client.put(
        f"{p.url}/v1/functions/{fn}/triggers/{name}", json={"type": "kafka", **doc}
    ) as resp:
        return resp.status, await resp.json()


async def trigger_state(client: aiohttp.ClientSession, p: Platform, fn: str, name: str) -> Any:
    async with client.get(f"{p.url}/v1/functions/{fn}/triggers/{name}") as resp:
        assert resp.status == 200
        return (await resp.json())["state"]


async def test_every_record_delivered_in_order_while_runners_are_killed(
    kplatform: Platform, fn: str, reader: LogReader, client: aiohttp.ClientSession
) -> None:
    p = kplatform
    topic = unique("kt-orders")
    await create_topic(topic, 4)
    runners = [await p.add_trigger_runner() for _ in range(2)]
    status, body = await put_trigger(
        client,
        p,
        fn,
        "orders",
        topic=topic,
        start="earliest",
        batch_size=100,
        batch_window_ms=300,
        max_parallel=4,
        max_retries=1,
    )
    assert status == 201, body
    values = {i: f"r{i}".encode() for i in range(5000)}
    started = time.monotonic()
    # A backlog first (full batches), then a stream, during which runners are SIGKILLed
    # and replaced.
    await produce(topic, [(i % 4, values[i]) for i in range(2000)])
    await until_delivered(reader, topic, 500, 60)

    async def stream() -> None:
        for start in range(2000, 5000, 250):
            await produce(topic, [(i % 4, values[i]) for i in range(start, start + 250)])
            await asyncio.sleep(0.25)

    streaming = asyncio.create_task(stream())
    runners[0].kill()
    runners.append(await p.add_trigger_runner())
    await until_delivered(reader, topic, 3000, 60)
    runners[1].kill()
    runners.append(await p.add_trigger_runner())
    await streaming
    await until_delivered(reader, topic, 5000, 90)
    elapsed = time.monotonic() - started

    seen = batches(reader, topic)
    by_partition: dict[int, list[Batch]] = defaultdict(list)
    copies: Counter[tuple[int, int]] = Counter()
    for b in seen:
        parts = {p for p, _, _ in b["r"]}
        offsets = [o for _, o, _ in b["r"]]
        assert len(parts) == 1 and 1 <= len(offsets) <= 100, b
        assert offsets == list(range(offsets[0], offsets[0] + len(offsets))), offsets
        by_partition[parts.pop()].append(b)
        copies.update((p, o) for p, o, _ in b["r"])
    assert max(len(b["r"]) for b in seen) == 100  # the backlog went in full batches
    for partition, bs in by_partition.items():
        # In the order the function saw them, no batch starts past the next offset not yet
        # delivered: records come in partition order, nothing skipped (a redelivery after
        # a kill starts again from the committed offset, at or before it).
        highest = -1
        for b in bs:
            first, last = b["r"][0][1], b["r"][-1][1]
            assert first <= highest + 1, f"partition {partition}: gap before offset {first}"
            highest = max(highest, last)
        assert highest == 1249
        bodies = {v for b in bs for _, _, v in b["r"]}
        assert bodies == {f"r{i}" for i in range(partition, 5000, 4)}
    assert len(copies) == 5000
    duplicates = sum(copies.values()) - 5000
    print(
        f"5000 records over 4 partitions, 2 runners SIGKILLed: {len(seen)} calls, "
        f"{duplicates} duplicate deliveries, {elapsed:.1f} s"
    )
    # At least once: only batches in flight or uncommitted when a runner died come again
    # (at most max_parallel batches of 100 per kill).
    assert duplicates <= 2 * 4 * 100

    # A few records more: flushed by the window, not held for a full batch.
    sent_at = time.monotonic()
    await produce(topic, [(0, b"late-1"), (0, b"late-2"), (0, b"late-3")])
    await until_delivered(reader, topic, 5003, 15)
    late = [b for b in batches(reader, topic) if b["r"][-1][2] == "late-3"]
    assert late and len(late[0]["r"]) <= 3
    assert time.monotonic() - sent_at < 10

    # The observed state: records seen, lag back to nothing.
    deadline = time.monotonic() + 15
    state = await trigger_state(client, p, fn, "orders")
    while state.get("lag") != 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        state = await trigger_state(client, p, fn, "orders")
    assert state.get("lag") == 0, state
    assert time.time() - state["last_record_at"] < 30

    # Disabled: its consumers stop, records wait; enabled again: they come.
    async with client.post(f"{p.url}/v1/functions/{fn}/triggers/orders/disable") as resp:
        assert resp.status == 200
    await asyncio.sleep(3)
    await produce(topic, [(1, b"while-disabled")])
    await asyncio.sleep(3)
    assert len(delivered(reader, topic)) == 5003
    async with client.post(f"{p.url}/v1/functions/{fn}/triggers/orders/enable") as resp:
        assert resp.status == 200
    t_enable = time.monotonic()
    # Usually ~3 s. With the Tansu broker, after members were SIGKILLed, the members that
    # join again sometimes all wait for a leader that never answers; the runner's
    # watchdog makes them leave and join again (up to about a minute, seen).
    await until_delivered(reader, topic, 5004, 90)
    print(f"re-enabled: delivered after {time.monotonic() - t_enable:.1f} s")
    async with client.delete(f"{p.url}/v1/functions/{fn}/triggers/orders") as resp:
        assert resp.status == 204
    for r in runners[2:]:
        assert "Traceback" not in r.log_text()


async def test_a_failing_record_is_retried_then_sent_to_the_error_topic(
    kplatform: Platform, fn: str, reader: LogReader, client: aiohttp.ClientSession
) -> None:
    p = kplatform
    # One runner: no rebalance while the poison record is retried (a rebalance would
    # deliver its batch again, as at-least-once allows, and blur the count).
    live = [m for m in p.managers if m.command == "triggers" and m.proc.poll() is None]
    for extra in live[1:]:
        started = time.monotonic()
        assert await extra.stop() == 0  # SIGTERM: a clean, bounded stop
        assert time.monotonic() - started < 15
    if not live:
        await p.add_trigger_runner()
    topic = unique("kt-poison")
    await create_topic(topic, 2)
    records = [(0, f"ok-{i}".encode()) for i in range(40)] + [(1, b"other")] * 10
    records[19] = (0, b"poison-19")
    await produce(topic, records)
    status, body = await put_trigger(
        client,
        p,
        fn,
        "poison",
        topic=topic,
        start="earliest",
        batch_size=10,
        batch_window_ms=200,
        max_retries=2,
    )
    assert status == 201, body
    await until_delivered(reader, topic, 50, 60)

    # The error topic holds the record, unchanged, with why and where in its headers.
    consumer = AIOKafkaConsumer(
        bootstrap_servers=KAFKA["bootstrap"], auto_offset_reset="earliest", client_id="it-kt"
    )
    await consumer.start()
    try:
        errors: list[Any] = []
        deadline = time.monotonic() + 30
        while not errors and time.monotonic() < deadline:
            parts = consumer.partitions_for_topic(f"{topic}.imagefn-errors")
            if not parts:
                await consumer._client.force_metadata_update()
                await asyncio.sleep(0.3)
                continue
            if not consumer.assignment():
                consumer.assign([TopicPartition(f"{topic}.imagefn-errors", n) for n in parts])
            got = await consumer.getmany(timeout_ms=500)
            errors.extend(m for ms in got.values() for m in ms)
        await asyncio.sleep(1)  # nothing else arrives
        got = await consumer.getmany(timeout_ms=500)
        errors.extend(m for ms in got.values() for m in ms)
    finally:
        await consumer.stop()
    assert [m.value for m in errors] == [b"poison-19"]
    headers = {k: v.decode() for k, v in errors[0].headers}
    assert headers["imagefn-source-topic"] == topic
    assert headers["imagefn-source-offset"] == "19"
    assert headers["imagefn-attempts"] == "3"
    assert "reported offsets (19,)" in headers["imagefn-error"]

    copies = Counter((p, o) for b in batches(reader, topic) for p, o, _ in b["r"])
    assert copies[(0, 19)] == 3  # the first call, then max_retries
    poison_batch = next(b for b in batches(reader, topic) if [0, 19, "poison-19"] in b["r"])
    retried = sorted(k for k, n in copies.items() if n > 1)
    # Lambda's semantics: from the lowest failed offset on, within its batch; nothing else.
    assert all(p == 0 and 19 <= o <= poison_batch["r"][-1][1] for p, o in retried), retried
    assert all(n == 1 for (p, o), n in copies.items() if (p, o) not in retried)
    print(f"poison batch {poison_batch['r'][0][1]}..{poison_batch['r'][-1][1]}; retried {retried}")
    state = await trigger_state(client, p, fn, "poison")
    assert state["errors"] >= 3 and "19" in state["last_error"]


async def test_a_new_group_starts_at_a_timestamp(
    kplatform: Platform, fn: str, reader: LogReader, client: aiohttp.ClientSession
) -> None:
    p = kplatform
    if not any(m.command == "triggers" and m.proc.poll() is None for m in p.managers):
        await p.add_trigger_runner()
    topic = unique("kt-since")
    await create_topic(topic, 1)
    await produce(topic, [(0, b"old-0"), (0, b"old-1")])
    await asyncio.sleep(0.5)
    since_ms = int(time.time() * 1000)
    await asyncio.sleep(0.1)
    await produce(topic, [(0, b"new-0"), (0, b"new-1")])
    status, body = await put_trigger(
        client, p, fn, "since", topic=topic, start=since_ms, batch_window_ms=100
    )
    assert status == 201, body
    await until_delivered(reader, topic, 2, 30)
    await asyncio.sleep(1)
    assert sorted(v for b in batches(reader, topic) for _, _, v in b["r"]) == ["new-0", "new-1"]


async def test_bad_kafka_triggers_are_refused_naming_the_field(
    kplatform: Platform, fn: str, client: aiohttp.ClientSession
) -> None:
    p = kplatform
    topic = unique("kt-exists")
    await create_topic(topic, 1)
    cases = [
        ({"topic": topic, "bootstrap": "127.0.0.1:1"}, 503, "bootstrap"),
        ({"topic": unique("kt-missing")}, 400, "topic"),
        ({"topic": topic, "batch_size": 0}, 400, "batch_size"),
        ({"topic": topic, "batch_size": 1001}, 400, "batch_size"),
        ({"topic": topic, "start": "yesterday"}, 400, "start"),
        ({"topic": topic, "on_failure": "retry"}, 400, "on_failure"),
        ({"topic": "bad topic!"}, 400, "topic"),
    ]
    for doc, want, field_name in cases:
        started = time.monotonic()
        status, body = await put_trigger(client, p, fn, "bad", **doc)
        assert status == want, (doc, body)
        assert field_name in body["error"]["fields"], (doc, body)
        assert time.monotonic() - started < 8
        async with client.get(f"{p.url}/v1/functions/{fn}/triggers/bad") as resp:
            assert resp.status == 404  # nothing half-created
