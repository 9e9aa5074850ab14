"""Composition root of a worker process: builds the worker's resources, runs it, and
tears everything down in reverse order."""

from __future__ import annotations

import asyncio
import contextlib

import aiohttp
import redis.asyncio as aioredis

from shared.queue.factory import make_queue
from shared.settings import Settings
from workers.forwarder import Forwarder
from workers.images import ImageStore, TokenSource
from workers.logship import LogShipper, MiB
from workers.pool import ContainerPool
from workers.runtime import DockerRuntime
from workers.worker import Worker


async def serve_worker(settings: Settings, stop: asyncio.Event) -> None:
    async with contextlib.AsyncExitStack() as stack:
        redis = aioredis.Redis.from_url(settings.redis.url)
        stack.push_async_callback(redis.aclose)
        queue = make_queue(settings, redis)
        stack.push_async_callback(queue.close)
        runtime = DockerRuntime.connect(settings.worker.docker_url)
        stack.push_async_callback(runtime.close)
        shipper: LogShipper | None = None
        if settings.logs.enabled:
            # Starts without waiting for Kafka: it connects (and creates the logs topic)
            # in the background, and the worker serves meanwhile.
            shipper = LogShipper.for_kafka(
                settings.logs,
                settings.kafka,
                runtime,
                worker=settings.worker.worker_id,
                rotate_bytes=settings.worker.container_log_max_mb * MiB,
            )
            shipper.start()
            # Runs after the worker stopped (the pool drained every container's log) and
            # before the engine client closes: flushes within drain_timeout_s.
            stack.push_async_callback(shipper.close)
        # One keep-alive connection pool to all instances; aiohttp sets TCP_NODELAY, and
        # bodies pass through untouched (no decompression).
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60),
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None),
        )
        stack.push_async_callback(session.close)
        pool: ContainerPool | None = None
        images = ImageStore(
            runtime,
            TokenSource(settings.registry, session).pull_token,
            settings.registry,
            in_use=lambda: pool.images_in_use() if pool is not None else set(),
        )
        # Runs before the engine client closes (exit callbacks run in reverse).
        stack.push_async_callback(images.collections_done)
        pool = ContainerPool(
            runtime,
            Forwarder(session, settings.worker),
            settings.worker,
            settings.worker.worker_id,
            settings.queue.prefix,
            images,
            logs=shipper,
        )
        worker = Worker(settings, queue, pool, runtime, redis)
        run = asyncio.create_task(worker.run(), name="worker")
        stopper = asyncio.create_task(stop.wait(), name="worker-stop-signal")
        await asyncio.wait({run, stopper}, return_when=asyncio.FIRST_COMPLETED)
        worker.shutdown()
        stopper.cancel()
        await run
