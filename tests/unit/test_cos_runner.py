"""The cos runner's handling of one filer record, with a fake store and invoker: each
matching trigger gets one submit whose request id is the same when the record is read
again; throttled accepts are retried; a function gone is noted and skipped."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from aiokafka import TopicPartition

from shared.errors import FunctionNotFound, ServiceUnavailable
from shared.settings import Settings
from shared.triggers import Trigger
from workers import cos_trigger
from workers.cos_trigger import CosRunner

PUT = next(
    r
    for r in json.loads((Path(__file__).parent / "filer_records.json").read_text())["records"]
    if r["case"] == "put"
)


class FakeStore:
    def __init__(self, triggers: list[Trigger]) -> None:
        self.triggers = triggers
        self.notes: list[tuple[str, dict[str, Any]]] = []

    async def list(self) -> list[Trigger]:
        return self.triggers

    async def note(self, trigger_id: str, **state: Any) -> None:
        self.notes.append((trigger_id, state))


class FakeInvoker:
    def __init__(self, failures: list[Exception] | None = None) -> None:
        self.calls: list[tuple[str, bytes, str]] = []
        self.failures = failures or []

    async def submit(self, trigger: Trigger, body: bytes, request_id: str) -> str:
        if self.failures:
            raise self.failures.pop(0)
        seen = any(rid == request_id for _, _, rid in self.calls)
        self.calls.append((trigger.id, body, request_id))
        return "duplicate" if seen else "queued"


def trig(name: str, **config: Any) -> Trigger:
    cfg = {"bucket": "probe", "events": ["created"], "prefix": "", "suffix": "", **config}
    return Trigger(function="fn", name=name, type="cos", config=cfg)


def record(offset: int = 7) -> Any:
    return SimpleNamespace(
        key=PUT["key"].encode(), value=bytes.fromhex(PUT["value_hex"]), offset=offset
    )


async def handle(runner: CosRunner, rec: Any) -> bool:
    assert await runner._reload(asyncio.Event())
    return await runner._handle(TopicPartition("feed", 2), rec, asyncio.Event())


async def test_each_matching_trigger_is_submitted_once_per_record() -> None:
    store = FakeStore([trig("all"), trig("txt", suffix=".txt"), trig("jpg", suffix=".jpg")])
    invoker = FakeInvoker()
    runner = CosRunner(Settings(), store, invoker)  # type: ignore[arg-type]
    assert await handle(runner, record())
    assert sorted(t for t, _, _ in invoker.calls) == ["fn/all", "fn/txt"]
    event = json.loads(invoker.calls[0][1])
    assert event["Records"][0]["cos"]["cosObject"]["key"] == "/imagefn/probe/a/b.txt"
    # The same record delivered again: the same request ids.
    first = {rid for _, _, rid in invoker.calls}
    assert await handle(runner, record())
    assert {rid for _, _, rid in invoker.calls[2:]} == first
    # Another record (another offset): other ids.
    assert await handle(runner, record(offset=8))
    assert not {rid for _, _, rid in invoker.calls[4:]} & first


async def test_an_unavailable_queue_is_retried_and_a_missing_function_skipped(
    monkeypatch: Any,
) -> None:
    monkeypatch.setattr(cos_trigger, "RETRY_FIRST_S", 0.01)
    store = FakeStore([trig("all")])
    invoker = FakeInvoker([ServiceUnavailable("redis down"), ServiceUnavailable("still")])
    runner = CosRunner(Settings(), store, invoker)  # type: ignore[arg-type]
    assert await handle(runner, record())
    assert len(invoker.calls) == 1
    invoker.failures = [FunctionNotFound("gone")]
    assert await handle(runner, record(offset=9))
    assert any(state.get("errors") == 1 for _, state in store.notes)


async def test_a_record_that_is_not_an_event_notification_is_skipped() -> None:
    store, invoker = FakeStore([trig("all")]), FakeInvoker()
    runner = CosRunner(Settings(), store, invoker)  # type: ignore[arg-type]
    junk = SimpleNamespace(key=b"/buckets/probe/x", value=b"\x12\xff\xff\xff", offset=1)
    assert await handle(runner, junk)
    assert invoker.calls == []
