"""Builds the invocation queue the settings name (``IMAGEFN_QUEUE_BACKEND``), so gateways
and workers never construct a backend themselves."""

from __future__ import annotations

import redis.asyncio as aioredis

from shared.keys import Keys
from shared.queue.base import InvocationQueue
from shared.queue.delayed import DelayedSet
from shared.queue.kafka import KafkaQueue
from shared.queue.redis_streams import RedisStreamsQueue
from shared.settings import Settings


def make_queue(settings: Settings, redis: aioredis.Redis) -> InvocationQueue:
    """The queue backend of ``settings.queue.backend``: "redis" (the default, on the
    process's Redis client) or "kafka" (on ``settings.kafka``)."""
    if settings.queue.backend == "kafka":
        return KafkaQueue(settings.kafka, DelayedSet(redis, Keys(settings.queue.prefix)))
    return RedisStreamsQueue(redis, settings.queue)
