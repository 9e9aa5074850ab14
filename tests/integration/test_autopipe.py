"""shared.autopipe against a real Redis: calls from one pass of the loop share a
pipeline, each gets its own answer or error, an unknown script is loaded and sent again."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from shared.autopipe import AutoPipeline


@pytest.fixture
async def r(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


async def test_concurrent_calls_share_one_pipeline_and_get_their_own_answers(
    r: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = f"ap-{uuid.uuid4().hex}"
    pipe = AutoPipeline(r)
    executed: list[int] = []
    real = r.pipeline

    def counting(transaction: bool = True) -> object:
        p = real(transaction=transaction)
        execute = p.execute

        async def run(raise_on_error: bool = True) -> list[object]:
            executed.append(len(p.command_stack))
            return await execute(raise_on_error=raise_on_error)

        p.execute = run  # type: ignore[method-assign]
        return p

    monkeypatch.setattr(r, "pipeline", counting)
    answers = await asyncio.gather(*(pipe.execute("INCR", key) for _ in range(20)))
    assert sorted(answers) == list(range(1, 21))
    assert executed == [20]
    # An error belongs to its own call only.
    await r.set(key + "s", "x")
    good, bad = await asyncio.gather(
        pipe.execute("INCR", key), pipe.execute("LPUSH", key + "s", "v"), return_exceptions=True
    )
    assert good == 21 and isinstance(bad, ResponseError)
    await r.delete(key, key + "s")


async def test_an_unknown_script_is_loaded_and_sent_again(r: aioredis.Redis) -> None:
    script = r.register_script("return tonumber(ARGV[1]) + 1")
    pipe = AutoPipeline(r)
    await r.script_flush()
    assert await asyncio.gather(*(pipe.script(script, [], [i]) for i in range(3))) == [1, 2, 3]
    assert await pipe.script(script, [], [41]) == 42
