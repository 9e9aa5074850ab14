"""The trigger runner (``imagefn triggers``; ``imagefn up`` runs one): the component that
turns events — timer ticks, Kafka records, object-storage uploads — into invocations.

Any number may run against one Redis; each kind of trigger shares its work out in its
own way (timers: every runner fires, a tick's request id makes it run once; see each
runner's module). A runner owns its tasks: when one fails the others are stopped rather
than run half a runner, and ``stop`` ends them all within a tick.
"""

from __future__ import annotations

import asyncio
import contextlib

import redis.asyncio as aioredis
import structlog

from shared.invocations import InvocationLog
from shared.keys import Keys
from shared.queue.factory import make_queue
from shared.registry import FunctionRegistry
from shared.settings import Settings
from shared.triggers import TriggerStore
from workers.cos_trigger import CosRunner
from workers.kafka_trigger import KafkaTriggerRunner
from workers.timers import TimerRunner
from workers.triggerinvoke import TriggerInvoker

log = structlog.get_logger("imagefn.triggers")


async def serve_triggers(settings: Settings, stop: asyncio.Event) -> None:
    async with contextlib.AsyncExitStack() as stack:
        redis = aioredis.Redis.from_url(settings.redis.url)
        stack.push_async_callback(redis.aclose)
        queue = make_queue(settings, redis)
        await queue.open()
        stack.push_async_callback(queue.close)
        keys = Keys(settings.queue.prefix)
        store = TriggerStore(redis, keys)
        invoker = TriggerInvoker(
            queue,
            FunctionRegistry(redis, keys, settings.gateway.function_cache_s),
            InvocationLog(
                redis, keys, settings.queue.invocation_ttl_s, settings.asyncinv.result_ttl_s
            ),
            settings,
        )
        tasks = [asyncio.create_task(TimerRunner(store, invoker).run(stop), name="timers")]
        tasks.append(
            asyncio.create_task(
                KafkaTriggerRunner(settings, store, invoker).run(stop), name="kafka-triggers"
            )
        )
        if settings.kafka.bootstrap:
            # Object-storage changes arrive on the platform's Kafka (the filer's feed).
            tasks.append(
                asyncio.create_task(
                    CosRunner(settings, store, invoker).run(stop), name="cos-triggers"
                )
            )
        log.info("trigger_runner_ready")
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        stop.set()
        for result in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                raise result
        log.info("trigger_runner_stopped")
