"""shared.queue.memory.MemoryQueue keeps the queue interface's promises in one process."""

from __future__ import annotations

import asyncio
import dataclasses

from shared.messages import InvocationResult
from shared.queue.memory import MemoryQueue

from .helpers import make_invocation, make_record


async def test_call_gets_the_result_a_consumer_finishes_with() -> None:
    q = MemoryQueue()
    inv = make_invocation(make_record(), request_id="r1")
    call = asyncio.create_task(q.call(inv, 2.0))
    [d] = await q.consume("w1", 10, 1.0)
    # The queue stamps the call id that matches the result to this call.
    assert d.invocation == dataclasses.replace(inv, call_id=d.invocation.call_id)
    assert d.invocation.call_id and d.attempt == 1
    assert q.pending_count == 1
    result = InvocationResult(request_id="r1", body=b"done")
    await q.finish(d, result)
    assert await call == result
    assert q.pending_count == 0
    assert q.results == [result]


async def test_call_without_a_result_in_time_is_none() -> None:
    q = MemoryQueue()
    assert await q.call(make_invocation(make_record()), 0.05) is None


async def test_consume_takes_at_most_max_count_and_returns_empty_on_timeout() -> None:
    q = MemoryQueue()
    for i in range(3):
        await q.publish(make_invocation(make_record(), request_id=f"r{i}"))
    first = await q.consume("w1", 2, 1.0)
    assert [d.invocation.request_id for d in first] == ["r0", "r1"]
    second = await q.consume("w1", 2, 1.0)
    assert [d.invocation.request_id for d in second] == ["r2"]
    assert await q.consume("w1", 2, 0.02) == []
    assert len({d.receipt for d in first + second}) == 3


async def test_unrefreshed_claims_are_reclaimed_by_another_consumer() -> None:
    q = MemoryQueue(reclaim_idle_s=0.05)
    await q.publish(make_invocation(make_record(), request_id="r1"))
    [d] = await q.consume("w1", 1, 1.0)
    assert await q.reclaim("w2", 10) == []
    await asyncio.sleep(0.06)
    [again] = await q.reclaim("w2", 10)
    assert (again.receipt, again.attempt) == (d.receipt, 2)
    assert again.invocation.request_id == "r1"


async def test_keep_alive_prevents_reclaim() -> None:
    q = MemoryQueue(reclaim_idle_s=0.08)
    await q.publish(make_invocation(make_record()))
    deliveries = await q.consume("w1", 1, 1.0)
    for _ in range(3):
        await asyncio.sleep(0.04)
        await q.keep_alive("w1", deliveries)
        assert await q.reclaim("w2", 10) == []


async def test_finish_without_result_only_acknowledges() -> None:
    q = MemoryQueue()
    await q.publish(make_invocation(make_record()))
    [d] = await q.consume("w1", 1, 1.0)
    await q.finish(d, None)
    assert q.pending_count == 0 and q.results == []


async def test_two_calls_with_the_same_request_id_each_get_their_own_result() -> None:
    q = MemoryQueue()
    a = asyncio.create_task(q.call(make_invocation(make_record(), request_id="same"), 2.0))
    b = asyncio.create_task(q.call(make_invocation(make_record(), request_id="same"), 2.0))
    deliveries = []
    while len(deliveries) < 2:
        deliveries += await q.consume("w1", 10, 1.0)
    for d in deliveries:
        await q.finish(d, InvocationResult(request_id="same", body=d.invocation.call_id.encode()))
    ra, rb = await asyncio.gather(a, b)
    assert ra is not None and rb is not None
    assert {ra.body, rb.body} == {d.invocation.call_id.encode() for d in deliveries}
    assert ra.body != rb.body
