"""The Kafka trigger without a broker: the CKafka event, batch sizes, what an answer
means (workers/kafkabatch.py), and a partition's delivery loop (retries from the lowest
failed offset, bisect, platform failures, the error topic) over fakes."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, cast

import pytest
from aiokafka import TopicPartition

from shared.errors import (
    ConcurrencyLimitExceeded,
    FunctionTimeout,
    QueueUnavailable,
    RequestTooLarge,
    ServiceUnavailable,
    UserCodeError,
)
from shared.messages import InvocationResult
from shared.settings import KafkaSettings, Settings
from shared.triggers import Trigger, TriggerStore, parse_trigger
from workers import kafka_delivery
from workers.kafka_delivery import Delivery, Partition
from workers.kafka_trigger import TriggerConsumer
from workers.kafkabatch import (
    EVENT_OVERHEAD_BYTES,
    KafkaRecord,
    batch_length,
    error_headers,
    event_body,
    judge,
    record_size,
    retry_delay_s,
)
from workers.triggerinvoke import TriggerInvoker


def rec(offset: int, value: bytes | None = b"v", partition: int = 0) -> KafkaRecord:
    return KafkaRecord("t", partition, offset, b"k", value)


def test_event_is_scf_ckafka_shape() -> None:
    body = event_body([rec(36, b"Hello"), KafkaRecord("t", 1, 37, None, b"\xff\xfe")])
    doc = json.loads(body)
    assert doc == {
        "Records": [
            {
                "Ckafka": {
                    "topic": "t",
                    "partition": 0,
                    "offset": 36,
                    "msgKey": "k",
                    "msgBody": "Hello",
                }
            },
            {
                "Ckafka": {
                    "topic": "t",
                    "partition": 1,
                    "offset": 37,
                    "msgKey": "",
                    "msgBody": "\ufffd\ufffd",
                }
            },
        ]
    }


def test_record_sizes_add_up_to_the_body() -> None:
    records = [rec(i, b"x" * i) for i in range(1, 30)]
    # Each record counts a comma; the body has one fewer comma than records.
    assert len(event_body(records)) == EVENT_OVERHEAD_BYTES + sum(map(record_size, records)) - 1


def test_batch_length_caps_count_and_bytes() -> None:
    records = [rec(i, b"x" * 1000) for i in range(50)]
    assert batch_length(records, 10, 6 * 1024 * 1024) == 10
    assert batch_length(records[:3], 10, 6 * 1024 * 1024) == 3
    one = record_size(records[0])
    n = batch_length(records, 50, EVENT_OVERHEAD_BYTES + 5 * one)
    assert n == 5
    assert len(event_body(records[:n])) <= EVENT_OVERHEAD_BYTES + 5 * one
    # A record larger than the limit on its own still goes, alone.
    assert batch_length([rec(0, b"x" * 5000), rec(1)], 10, 100) == 1
    assert batch_length([], 10, 100) == 0


def ok(body: Any = None) -> InvocationResult:
    raw = json.dumps(body).encode() if body is not None else b'{"ok": true}'
    return InvocationResult(request_id="r", status=200, body=raw)


def failed(err: Exception) -> InvocationResult:
    return InvocationResult.failure("r", err)  # type: ignore[arg-type]


def test_judge_success_and_failures() -> None:
    offsets = [10, 11, 12]
    assert judge(ok(), offsets).verdict == "ok"
    assert judge(InvocationResult("r", 200, body=b"not json"), offsets).verdict == "ok"
    assert judge(ok({"batchItemFailures": []}), offsets).verdict == "ok"
    assert judge(InvocationResult("r", 500, body=b"boom"), offsets).verdict == "user"
    assert judge(InvocationResult("r", 404, body=b""), offsets).verdict == "user"
    for user in (UserCodeError("x"), FunctionTimeout("x"), RequestTooLarge("x")):
        assert judge(failed(user), offsets).verdict == "user"
    for platform in (ServiceUnavailable("x"), ConcurrencyLimitExceeded("x"), QueueUnavailable("x")):
        j = judge(failed(platform), offsets)
        assert j.verdict == "platform" and type(platform).__name__ in j.reason


def test_judge_batch_item_failures() -> None:
    offsets = [10, 11, 12, 13]
    j = judge(
        ok({"batchItemFailures": [{"itemIdentifier": "12"}, {"itemIdentifier": 11}]}), offsets
    )
    assert j.verdict == "partial" and j.failed == (11, 12)
    # Offsets that are not in the batch, or no identifier at all: the whole batch failed.
    assert judge(ok({"batchItemFailures": [{"itemIdentifier": "99"}]}), offsets).verdict == "user"
    assert judge(ok({"batchItemFailures": [{"id": "10"}]}), offsets).verdict == "user"
    assert judge(ok({"batchItemFailures": ["10"]}), offsets).verdict == "user"


def test_retry_delay_grows_to_a_cap() -> None:
    assert [retry_delay_s(n) for n in (1, 2, 3)] == [0.2, 0.4, 0.8]
    assert retry_delay_s(20) == 5.0


def test_error_headers_say_where_and_why() -> None:
    r = KafkaRecord("orders", 3, 42, b"k", b"v", (("trace", b"abc"),))
    h = dict(error_headers("f/t", r, "UserCodeError: boom", 3))
    assert h["imagefn-source-topic"] == b"orders"
    assert h["imagefn-source-partition"] == b"3"
    assert h["imagefn-source-offset"] == b"42"
    assert h["imagefn-attempts"] == b"3"
    assert h["imagefn-error"] == b"UserCodeError: boom"
    assert h["trace"] == b"abc"


# --- a partition's delivery loop, over fakes --------------------------------------------


class FakeInvoker:
    """Answers each call with ``answer(offsets)``; remembers the offsets of every call."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.calls: list[list[int]] = []

    async def call(self, trigger: Trigger, body: bytes, request_id: str) -> InvocationResult:
        offsets = [r["Ckafka"]["offset"] for r in json.loads(body)["Records"]]
        self.calls.append(offsets)
        result: InvocationResult = self.answer(offsets)
        return result


class FakeProducer:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None, dict[str, bytes]]] = []

    async def send_and_wait(
        self, topic: str, value: bytes | None, key: bytes | None, headers: Any
    ) -> None:
        self.sent.append((topic, value, dict(headers)))


class Recorder:
    """A Delivery's surroundings: the consumer's commits, the errors it reports."""

    def __init__(self) -> None:
        self.commits: list[int] = []
        self.errors: list[str] = []
        self.delivered = 0

    async def commit(self, part: Partition, offset: int) -> None:
        # As the consumer's: an offset at or below the committed one is not sent again.
        if not self.commits or offset > self.commits[-1]:
            self.commits.append(offset)


def make_delivery(
    answer: Any, **config: Any
) -> tuple[Delivery, FakeInvoker, Recorder, FakeProducer]:
    trigger = parse_trigger("fn", {"name": "t", "type": "kafka", "topic": "orders", **config})
    invoker = FakeInvoker(answer)
    rec_ = Recorder()

    def delivered() -> None:
        rec_.delivered += 1

    d = Delivery(
        trigger,
        KafkaSettings(),
        cast(TriggerInvoker, invoker),
        6 * 1024 * 1024,
        rec_.commit,
        rec_.errors.append,
        delivered,
    )
    fp = FakeProducer()
    d._producer = fp  # type: ignore[assignment]
    return d, invoker, rec_, fp


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kafka_delivery, "PLATFORM_BACKOFF_S", (0.01, 0.02))
    monkeypatch.setattr(kafka_delivery, "retry_delay_s", lambda n: 0.01)


async def test_partial_failure_retries_from_the_lowest_failed_offset() -> None:
    def answer(offsets: list[int]) -> InvocationResult:
        return ok({"batchItemFailures": [{"itemIdentifier": str(o)} for o in offsets if o == 5]})

    d, invoker, fc, fp = make_delivery(answer, max_retries=2)
    part = Partition(TopicPartition("orders", 0))
    assert await d.deliver(part, [rec(i) for i in range(10)], 0)
    assert invoker.calls == [list(range(10)), list(range(5, 10)), list(range(5, 10))]
    assert fc.commits == [5, 10]  # what was handled first, then the whole batch
    assert [(t, v, h["imagefn-source-offset"]) for t, v, h in fp.sent] == [
        ("orders.imagefn-errors", b"v", b"5")
    ]
    assert fp.sent[0][2]["imagefn-attempts"] == b"3"


async def test_bisect_isolates_a_poison_record() -> None:
    def answer(offsets: list[int]) -> InvocationResult:
        return InvocationResult("r", 500, body=b"boom") if 3 in offsets else ok()

    d, invoker, fc, fp = make_delivery(answer, max_retries=1, bisect=True, error_topic="dead")
    part = Partition(TopicPartition("orders", 0))
    assert await d.deliver(part, [rec(i) for i in range(8)], 0)
    assert [h["imagefn-source-offset"] for _, _, h in fp.sent] == [b"3"]
    assert fp.sent[0][0] == "dead"
    delivered = sorted({o for call in invoker.calls if 3 not in call for o in call})
    assert delivered == [0, 1, 2, 4, 5, 6, 7]
    assert invoker.calls.count([3]) == 2  # the poison record alone: once, then one retry
    assert fc.commits == sorted(fc.commits) and fc.commits[-1] == 8


async def test_without_bisect_the_whole_batch_fails_then_is_skipped() -> None:
    d, invoker, fc, fp = make_delivery(
        lambda offsets: failed(UserCodeError("boom")), max_retries=1, on_failure="skip"
    )
    part = Partition(TopicPartition("orders", 0))
    assert await d.deliver(part, [rec(i) for i in range(4)], 0)
    assert invoker.calls == [[0, 1, 2, 3]] * 2
    assert fc.commits == [4] and fp.sent == []


async def test_platform_failures_are_retried_without_using_retries() -> None:
    answers = iter([failed(ServiceUnavailable("away"))] * 5 + [ok()])
    d, invoker, fc, fp = make_delivery(lambda offsets: next(answers), max_retries=0)
    part = Partition(TopicPartition("orders", 0))
    assert await d.deliver(part, [rec(0), rec(1)], 0)
    assert len(invoker.calls) == 6 and fc.commits == [2] and fp.sent == []
    assert len(fc.errors) == 5 and fc.delivered == 1


async def test_a_stopping_partition_abandons_its_batch_uncommitted() -> None:
    d, invoker, fc, _ = make_delivery(lambda offsets: failed(ServiceUnavailable("away")))
    part = Partition(TopicPartition("orders", 0))

    invoker.answer = lambda offsets: (part.stopping.set(), failed(ServiceUnavailable("x")))[1]
    assert not await d.deliver(part, [rec(0)], 0)
    assert fc.commits == []


# --- the CLI's flags, a cluster that is away ----------------------------------------------


def test_cli_kafka_flags_become_the_trigger_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    import cli.triggers
    from cli.main import build_parser

    sent: list[dict[str, Any]] = []

    def put(args: Any, function: str, doc: dict[str, Any]) -> dict[str, Any]:
        sent.append(doc)
        return {
            "name": doc["name"],
            "function": function,
            "type": doc["type"],
            "qualifier": "$LATEST",
        }

    monkeypatch.setattr(cli.triggers, "put_trigger", put)
    argv = ["trigger", "add", "fn", "orders", "--type", "kafka", "--topic", "orders"]
    argv += ["--batch-size", "100", "--batch-window-ms", "250", "--start", "1700000000000"]
    argv += ["--max-retries", "3", "--max-parallel", "8", "--on-failure", "skip", "--bisect"]
    args = build_parser().parse_args(argv)
    args.fn(args, Settings())
    assert sent == [
        {
            "name": "orders",
            "type": "kafka",
            "topic": "orders",
            "batch_size": 100,
            "batch_window_ms": 250,
            "start": 1700000000000,
            "max_retries": 3,
            "max_parallel": 8,
            "on_failure": "skip",
            "bisect": True,
        }
    ]
    parse_trigger("fn", sent[0])  # a valid trigger
    args = build_parser().parse_args(
        ["trigger", "add", "fn", "o", "--type", "kafka", "--start", "earliest", "--topic", "t"]
    )
    args.fn(args, Settings())
    assert sent[-1] == {"name": "o", "type": "kafka", "topic": "t", "start": "earliest"}


class NotingStore:
    def __init__(self) -> None:
        self.notes: list[dict[str, Any]] = []

    async def note(self, trigger_id: str, **state: Any) -> None:
        self.notes.append(state)


async def test_a_cluster_that_is_away_is_noted_and_retried_and_stop_is_prompt() -> None:
    trigger = parse_trigger(
        "fn", {"name": "t", "type": "kafka", "topic": "orders", "bootstrap": "127.0.0.1:1"}
    )
    store = NotingStore()
    tc = TriggerConsumer(
        trigger, Settings(), cast(TriggerStore, store), cast(TriggerInvoker, FakeInvoker(ok))
    )
    task = asyncio.create_task(tc.run())
    deadline = time.monotonic() + 10
    while sum(n.get("errors", 0) for n in store.notes) < 2 and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    errors = [n for n in store.notes if n.get("last_error")]
    assert len(errors) >= 2, store.notes  # tried again, after a backoff
    assert "127.0.0.1:1" in errors[0]["last_error"]
    assert not task.done()
    started = time.monotonic()
    tc.stop()
    await asyncio.wait_for(task, 5)
    assert time.monotonic() - started < 2
