"""Automatic pipelining: Redis commands issued by concurrent tasks in one pass of the
event loop go to Redis in one pipeline, one round trip.

A worker runs up to ``max_inflight`` invocations at once, and each asynchronous one makes
three short Redis calls (begin, finish, acknowledge). Sent one by one, every call is a
system call out and one back, which on these machines cost more CPU than the calls' own
work. Collected over one pass of the loop and sent together, they cost one each.

Each caller still gets its own answer or its own exception: the pipeline runs with
``raise_on_error=False`` and every result goes to the future of the call that made it.
Scripts go as EVALSHA; a Redis that does not know the script (restarted, flushed) answers
NOSCRIPT, and that one call is sent again through the script object, which loads it.
"""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, RedisError


class AutoPipeline:
    def __init__(self, client: aioredis.Redis) -> None:
        self._r = client
        # (script or None, command args, future) in the order they were issued.
        self._pending: list[tuple[AsyncScript | None, tuple[Any, ...], asyncio.Future[Any]]] = []
        self._scheduled = False

    async def script(self, script: AsyncScript, keys: list[Any], args: list[Any]) -> Any:
        if not getattr(script, "sha", None):
            # Never loaded: let the script object load it (once). (The unit tests' fake
            # Redis hands out plain callables, which have no sha at all.)
            return await script(keys=keys, args=args)
        return await self._issue(script, ("EVALSHA", script.sha, len(keys), *keys, *args))

    async def execute(self, *command: Any) -> Any:
        return await self._issue(None, command)

    async def _issue(self, script: AsyncScript | None, command: tuple[Any, ...]) -> Any:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((script, command, fut))
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._start_flush)
        return await fut

    def _start_flush(self) -> None:
        self._scheduled = False
        batch, self._pending = self._pending, []
        if batch:
            task = asyncio.ensure_future(self._flush(batch))
            # The callers hold the outcome; the task itself must not log a lost exception.
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _flush(
        self, batch: list[tuple[AsyncScript | None, tuple[Any, ...], asyncio.Future[Any]]]
    ) -> None:
        try:
            async with self._r.pipeline(transaction=False) as pipe:
                for _, command, _ in batch:
                    pipe.execute_command(*command)
                results = await pipe.execute(raise_on_error=False)
        except (RedisError, OSError) as e:
            for _, _, fut in batch:
                if not fut.done():
                    fut.set_exception(e)
            return
        for (script, command, fut), result in zip(batch, results, strict=True):
            if fut.done():
                continue
            if isinstance(result, NoScriptError) and script is not None:
                nkeys = int(command[2])
                keys, args = list(command[3 : 3 + nkeys]), list(command[3 + nkeys :])
                try:
                    fut.set_result(await script(keys=keys, args=args))
                except (RedisError, OSError) as e:
                    fut.set_exception(e)
            elif isinstance(result, Exception):
                fut.set_exception(result)
            else:
                fut.set_result(result)
