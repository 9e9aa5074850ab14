"""Sends destination records (``destinations.on_success`` / ``on_failure`` of a spec):
the outcome of an asynchronous invocation, to a Kafka topic or POSTed to an HTTP URL.

Workers never send them: their ``finish`` script adds the record to the outbox stream
``{p}:destinations`` atomically with the outcome, so a destination that is slow or down
never holds an invocation, and a record is queued exactly once per outcome. This
dispatcher (in every scheduler process; the stream's consumer group gives each record to
one of them) sends each record with up to ``destination_attempts`` tries and growing
waits, then acknowledges it either way; ``{p}:destination-stats:{function}`` counts what
was delivered and what failed, with the last error (``GET /v1/functions/{name}/
destinations``). Records run concurrently, in one lane per destination: a lane sends at
most ``PER_DESTINATION`` at once and keeps the rest waiting in order (unacknowledged), so
a dead URL, whose records each take every try and timeout, holds only its own lane while
the others go on. Reading pauses only when ``MAX_WAITING`` records wait in all lanes.
A dispatcher that dies leaves its records pending; another takes them over after
``RECLAIM_IDLE_MS``. Delivery is therefore at least once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import json
import time
from typing import Any

import aiohttp
import redis.asyncio as aioredis
import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from redis.exceptions import RedisError, ResponseError

from shared import kafka
from shared.backoff import Backoff
from shared.invocations import InvocationLog
from shared.keys import Keys
from shared.settings import Settings

log = structlog.get_logger("imagefn.destinations")

READ_COUNT = 64
READ_BLOCK_MS = 1000
# Records sent at once to one destination, and in all.
PER_DESTINATION = 16
MAX_SENDING = 64
# Records read and waiting for their lane; past this, reading pauses.
MAX_WAITING = 10_000
# A record a dead dispatcher held this long is taken over.
RECLAIM_IDLE_MS = 60_000


class DeliveryFailed(Exception):
    pass


class DestinationDispatcher:
    def __init__(
        self,
        redis: aioredis.Redis,
        settings: Settings,
        consumer: str,
        invocations: InvocationLog,
    ) -> None:
        self._r = redis
        self._s = settings
        self._keys = Keys(settings.queue.prefix)
        self._consumer = consumer
        self._invocations = invocations
        self._sending: set[asyncio.Task[None]] = set()
        # Destination (its JSON) → records sending now / waiting, in order.
        self._running: dict[bytes, int] = {}
        self._waiting: dict[bytes, collections.deque[tuple[Any, dict[bytes, bytes]]]] = {}
        self._waiting_count = 0
        self._room = asyncio.Event()
        self._room.set()
        self._closing = False
        self._session: aiohttp.ClientSession | None = None
        self._producer: AIOKafkaProducer | None = None
        self._topics_made: set[str] = set()

    async def run(self, stop: asyncio.Event) -> None:
        backoff = Backoff(0.2, 5.0)
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self._s.asyncinv.destination_timeout_s)
        )
        try:
            await self._ensure_group()
            last_reclaim = 0.0
            while not stop.is_set():
                try:
                    if time.monotonic() - last_reclaim > RECLAIM_IDLE_MS / 1000 / 2:
                        last_reclaim = time.monotonic()
                        await self._take(await self._reclaim())
                    await self._take(await self._read())
                    backoff.reset()
                except RedisError as e:
                    if isinstance(e, ResponseError) and "NOGROUP" in str(e):
                        await self._ensure_group()
                        continue
                    log.warning("destination_read_failed", error=str(e))
                    await backoff.sleep()
        finally:
            await self._close()

    async def _close(self) -> None:
        # Records still being sent (or waiting) are not acknowledged: another dispatcher
        # (or this one restarted) sends them again.
        self._closing = True
        for task in list(self._sending):
            task.cancel()
        await asyncio.gather(*self._sending, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
        if self._producer is not None:
            with contextlib.suppress(KafkaError, OSError):
                await asyncio.wait_for(self._producer.stop(), 10)

    async def _ensure_group(self) -> None:
        try:
            await self._r.xgroup_create(
                self._keys.destinations, self._keys.destinations_group, id="0", mkstream=True
            )
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    async def _read(self) -> list[tuple[Any, dict[bytes, bytes]]]:
        resp: Any = await self._r.xreadgroup(
            self._keys.destinations_group,
            self._consumer,
            {self._keys.destinations: ">"},
            count=READ_COUNT,
            block=READ_BLOCK_MS,
        )
        return [entry for _stream, entries in resp or [] for entry in entries]

    async def _reclaim(self) -> list[tuple[Any, dict[bytes, bytes]]]:
        resp: Any = await self._r.xautoclaim(
            self._keys.destinations,
            self._keys.destinations_group,
            self._consumer,
            min_idle_time=RECLAIM_IDLE_MS,
            count=READ_COUNT,
        )
        return [e for e in resp[1] if e and e[1]]

    async def _take(self, entries: list[tuple[Any, dict[bytes, bytes]]]) -> None:
        for entry in entries:
            await self._room.wait()
            lane = entry[1].get(b"d", b"")
            self._waiting.setdefault(lane, collections.deque()).append(entry)
            self._waiting_count += 1
            if self._waiting_count >= MAX_WAITING:
                self._room.clear()
            self._start_waiting()

    def _start_waiting(self) -> None:
        """Start waiting records while their lane and the total have room, lanes in
        turn so that no lane waits behind another's backlog."""
        progress = not self._closing
        while progress and len(self._sending) < MAX_SENDING:
            progress = False
            for lane in list(self._waiting):
                queue = self._waiting[lane]
                if self._running.get(lane, 0) >= PER_DESTINATION:
                    continue
                entry_id, fields = queue.popleft()
                if not queue:
                    del self._waiting[lane]
                self._waiting_count -= 1
                self._running[lane] = self._running.get(lane, 0) + 1
                task = asyncio.create_task(self._handle(entry_id, fields), name="destination-send")
                self._sending.add(task)
                task.add_done_callback(functools.partial(self._sent, lane))
                progress = True
                if len(self._sending) >= MAX_SENDING:
                    break
        if self._waiting_count < MAX_WAITING:
            self._room.set()

    def _sent(self, lane: bytes, task: asyncio.Task[None]) -> None:
        self._sending.discard(task)
        self._running[lane] -= 1
        if not self._running[lane]:
            del self._running[lane]
        self._start_waiting()

    async def _handle(self, entry_id: Any, fields: dict[bytes, bytes]) -> None:
        try:
            destination = json.loads(fields[b"d"])
            record = json.loads(fields[b"v"])
        except (KeyError, ValueError) as e:
            log.error("destination_record_undecodable", entry=str(entry_id), error=str(e))
            await self._ack(entry_id)
            return
        function = str(record.get("function", ""))
        with contextlib.suppress(RedisError):
            record["attempts"] = await self._invocations.attempts(str(record["request_id"]))
        error = await self._send_with_retries(destination, record)
        stats = self._keys.destination_stats(function)
        async with self._r.pipeline(transaction=False) as pipe:
            if error is None:
                pipe.hincrby(stats, "delivered", 1)
            else:
                pipe.hincrby(stats, "failed", 1)
                pipe.hset(stats, mapping={"last_error": error, "last_error_at": time.time()})
            await pipe.execute()
        if error is not None:
            log.warning(
                "destination_failed",
                request_id=record.get("request_id"),
                function=function,
                destination=destination,
                error=error,
            )
        await self._ack(entry_id)

    async def _ack(self, entry_id: Any) -> None:
        async with self._r.pipeline(transaction=False) as pipe:
            pipe.xack(self._keys.destinations, self._keys.destinations_group, entry_id)
            pipe.xdel(self._keys.destinations, entry_id)
            await pipe.execute()

    async def _send_with_retries(
        self, destination: dict[str, Any], record: dict[str, Any]
    ) -> str | None:
        """None once delivered; else the last error, after every try."""
        body = json.dumps(record, separators=(",", ":")).encode()
        backoff = Backoff(0.5, 8.0)
        error = "not tried"
        for attempt in range(self._s.asyncinv.destination_attempts):
            if attempt:
                await backoff.sleep()
            try:
                if "kafka" in destination:
                    await self._send_kafka(str(destination["kafka"]), record, body)
                else:
                    await self._send_http(str(destination["url"]), body)
                return None
            except (DeliveryFailed, aiohttp.ClientError, TimeoutError, KafkaError, OSError) as e:
                error = f"{type(e).__name__}: {e}"[:500]
        return error

    async def _send_http(self, url: str, body: bytes) -> None:
        assert self._session is not None
        async with self._session.post(
            url, data=body, headers={"Content-Type": "application/json"}
        ) as resp:
            await resp.read()
            if resp.status >= 300:
                raise DeliveryFailed(f"{url} answered HTTP {resp.status}")

    async def _send_kafka(self, topic: str, record: dict[str, Any], body: bytes) -> None:
        if not self._s.kafka.bootstrap:
            raise DeliveryFailed("no Kafka configured (IMAGEFN_KAFKA_BOOTSTRAP)")
        if self._producer is None:
            producer = kafka.producer(self._s.kafka)
            await producer.start()
            self._producer = producer
        if topic not in self._topics_made:
            await kafka.ensure_topic(self._s.kafka, topic)
            self._topics_made.add(topic)
        key = str(record.get("request_id", "")).encode()
        await self._producer.send_and_wait(topic, value=body, key=key)
