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
from workers.logship_proxy import ShipperProcess
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
        logs: ShipperProcess | None = None
        if settings.logs.enabled:
            # The shipper runs in a child process: on this event loop its CPU work delayed
            # every invocation (workers/logship_proxy.py). It starts without waiting for
            # Kafka, and the worker serves meanwhile.
            logs = ShipperProcess(settings)
            await logs.start()
            # Runs after the worker stopped (the pool drained every container's log):
            # the child flushes within drain_timeout_s, then exits or is killed.
            stack.push_async_callback(logs.close)
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
            logs=logs,
            networks=settings.network,
        )
        worker = Worker(settings, queue, pool, runtime, redis)
        run = asyncio.create_task(worker.run(), name="worker")
        stopper = asyncio.create_task(stop.wait(), name="worker-stop-signal")
        await asyncio.wait({run, stopper}, return_when=asyncio.FIRST_COMPLETED)
        worker.shutdown()
        stopper.cancel()
        await run
