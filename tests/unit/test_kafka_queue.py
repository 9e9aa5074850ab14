"""The pure parts of the Kafka queue backend (records, addresses, partition choice) and how
the gateway's router hands the workers' queue reports to the queue. The backend against a
real broker is covered by the integration suite (tests/integration, backend "kafka")."""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import pytest

from gateway.routing import WarmRouter
from shared.errors import ServiceUnavailable
from shared.keys import Keys
from shared.liveness import announce
from shared.messages import Heartbeat, Invocation, InvocationResult
from shared.queue.base import Delivery, InvocationQueue
from shared.queue.factory import make_queue
from shared.queue.kafka import (
    KafkaQueue,
    choose_partition,
    decode_invocation,
    decode_result,
    header,
    invocation_record,
    live_partitions,
    parse_receipt,
    parse_reply_address,
    partitions_of,
    receipt,
    reply_address,
    result_record,
)
from shared.queue.redis_streams import RedisStreamsQueue
from shared.settings import KafkaSettings, load_settings

from .fakes import FakeRedis, closed_port
from .helpers import make_invocation, make_record


def test_an_invocation_crosses_as_body_value_and_metadata_headers() -> None:
    inv = make_invocation(make_record(), body=b"\x00\xffraw bytes", reply_to="t.replies:3")
    value, headers = invocation_record(inv)
    assert value == b"\x00\xffraw bytes"  # the body itself, never re-encoded
    assert [k for k, _ in headers] == ["m", "r"]
    assert decode_invocation(value, headers) == inv


def test_an_empty_body_survives_a_missing_value() -> None:
    inv = make_invocation(make_record(), body=b"")
    _, headers = invocation_record(inv)
    assert decode_invocation(None, headers).body == b""


def test_a_result_carries_its_call_id() -> None:
    result = InvocationResult(
        request_id="r1", status=201, headers=[("X-A", "1")], body=b"out", timings={"run": 0.5}
    )
    value, headers = result_record(result, "call-123")
    assert header(headers, "c") == b"call-123"
    assert decode_result(value, headers) == result


def test_reply_addresses_name_a_topic_and_a_partition() -> None:
    address = reply_address("imagefn.replies", 5)
    assert address == "imagefn.replies:5"
    assert parse_reply_address(address) == ("imagefn.replies", 5)
    assert parse_reply_address("a.b-c:0") == ("a.b-c", 0)
    # A Redis reply stream key, or garbage, is no Kafka address.
    assert parse_reply_address("imagefn:replies:0f3a") is None
    assert parse_reply_address("imagefn.replies:\u00b2") is None  # isdigit, but not int
    assert parse_reply_address("imagefn.replies") is None
    assert parse_reply_address(":4") is None
    assert parse_reply_address("t:-1") is None


def test_receipts_round_trip() -> None:
    assert parse_receipt(receipt(3, 1234)) == (3, 1234)


def test_a_routed_publish_goes_to_one_of_that_workers_partitions() -> None:
    owners = {"a": [0, 1], "b": [2, 3]}
    rng = random.Random(7)
    assert {choose_partition(owners, "a", rng) for _ in range(100)} == {0, 1}
    assert {choose_partition(owners, "b", rng) for _ in range(100)} == {2, 3}


def test_an_unrouted_publish_goes_to_a_live_workers_partition() -> None:
    # Partition 4 belonged to a worker that is gone (or draining): not reported, avoided.
    owners = {"a": [0, 1], "b": [2, 3]}
    rng = random.Random(7)
    assert {choose_partition(owners, None, rng) for _ in range(200)} == {0, 1, 2, 3}
    # A worker whose partitions are unknown is treated like no worker.
    assert {choose_partition(owners, "c", rng) for _ in range(200)} == {0, 1, 2, 3}
    # The live partitions a caller computed once per refresh give the same choices.
    live = live_partitions(owners)
    assert live == [0, 1, 2, 3]
    assert {choose_partition(owners, None, rng, live=live) for _ in range(200)} == {0, 1, 2, 3}


def test_knowing_no_partitions_leaves_the_choice_to_the_producer() -> None:
    assert choose_partition({}, None) is None
    assert choose_partition({}, "a") is None


def test_consumer_reports_are_read_defensively() -> None:
    infos: dict[str, Any] = {
        "a": {"partitions": [0, 2]},
        "b": {"partitions": []},
        "c": {},
        "d": {"partitions": "0,1"},
        "e": {"partitions": [1, "x", -1, True, 3]},
    }
    assert partitions_of(infos) == {"a": [0, 2], "e": [1, 3]}


def test_the_factory_builds_the_configured_backend() -> None:
    redis: Any = FakeRedis()
    assert isinstance(make_queue(load_settings({}), redis), RedisStreamsQueue)
    kafka = make_queue(load_settings({"IMAGEFN_QUEUE_BACKEND": "kafka"}), redis)
    assert isinstance(kafka, KafkaQueue)
    # Nothing is connected yet, and a gateway cannot hand out an address before open().
    with pytest.raises(ServiceUnavailable):
        kafka.reply_address()


async def test_the_kafka_backend_needs_no_claims() -> None:
    q = KafkaQueue(load_settings({}).kafka)
    assert await q.reclaim("w1", 10) == []
    d = Delivery(make_invocation(make_record()), receipt(0, 1))
    await q.keep_alive("w1", [d])  # nothing to refresh: the group's heartbeats are the claim
    assert q.consumer_info() == {}  # not a group member before its first consume


async def test_no_broker_is_service_unavailable() -> None:
    q = KafkaQueue(KafkaSettings(bootstrap=f"127.0.0.1:{closed_port()}"))
    with pytest.raises(ServiceUnavailable):
        await q.publish(make_invocation(make_record()))  # not open
    with pytest.raises(ServiceUnavailable, match="Kafka unavailable"):
        await q.open()
    await q.close()


class RecordingQueue(InvocationQueue):
    """Only learn_consumers matters here."""

    def __init__(self) -> None:
        super().__init__()
        self.learned: list[dict[str, dict[str, Any]]] = []

    def learn_consumers(self, infos: Mapping[str, Mapping[str, Any]]) -> None:
        self.learned.append({k: dict(v) for k, v in infos.items()})

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def publish(self, invocation: Any, worker: str | None = None) -> None: ...
    def reply_address(self) -> str:
        return ""

    async def consume(self, consumer: str, max_count: int, block_s: float) -> list[Delivery]:
        return []

    async def reclaim(self, consumer: str, max_count: int) -> list[Delivery]:
        return []

    async def keep_alive(self, consumer: str, deliveries: list[Delivery]) -> None: ...
    async def finish(self, delivery: Delivery, result: InvocationResult | None) -> None: ...
    async def publish_at(self, invocation: Invocation, due_at: float) -> None: ...

    async def release_due(self, now: float, max_count: int) -> int:
        return 0


async def test_the_router_tells_the_queue_how_live_workers_read() -> None:
    redis: Any = FakeRedis()
    keys = Keys("p")

    async def beat(worker: str, queue: dict[str, Any] | None, draining: bool = False) -> None:
        beat = Heartbeat(worker=worker, draining=draining, queue=queue)
        await announce(redis, keys, worker, beat.encode(), 10_000)

    await beat("a", {"partitions": [0, 1]})
    await beat("b", {"partitions": [2, 3]}, draining=True)  # reads nothing new
    await beat("c", None)  # an older worker without the entry
    queue = RecordingQueue()
    router = WarmRouter(redis, keys, queue)
    await router.start()
    try:
        assert queue.learned == [{"a": {"partitions": [0, 1]}}]
    finally:
        await router.close()
