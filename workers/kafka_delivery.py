"""How one Kafka trigger's batches are delivered: per partition, a task that forms
batches from the records its consumer buffered and calls the function, one batch at a
time (the partition's order), taking one of ``max_parallel`` slots per call; then retries
(``workers/kafkabatch.py`` says what an answer means), the error topic, and the commit
after each batch handled (``commit`` is the consumer's; see ``workers/kafka_trigger.py``).

A partition that is told to stop (revoked, or the trigger stops) gives up its batch at
the next step: not committed, it is delivered again by the partition's next reader.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import structlog
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from shared.backoff import Backoff
from shared.kafka import ensure_topic, producer
from shared.kafkasource import error_topic
from shared.settings import KafkaSettings
from shared.triggers import Trigger
from workers.kafkabatch import (
    KafkaRecord,
    batch_length,
    error_headers,
    event_body,
    judge,
    retry_delay_s,
)
from workers.triggerinvoke import TriggerInvoker

log = structlog.get_logger("imagefn.triggers.kafka")

# The first pause after a platform failure (doubling up to the cap at each one more).
PLATFORM_BACKOFF_S = (0.5, 30.0)


@dataclass
class Partition:
    tp: TopicPartition
    # Records fetched and not yet in a batch, with when each arrived (monotonic).
    buffer: deque[tuple[KafkaRecord, float]] = field(default_factory=deque)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    last_seen: int = -1  # highest offset buffered
    committed: int = -1  # next offset committed (-1: not known yet)
    task: asyncio.Task[None] | None = None


class Delivery:
    """The delivery of one trigger's batches, shared by its partitions' tasks."""

    def __init__(
        self,
        trigger: Trigger,
        kafka: KafkaSettings,
        invoker: TriggerInvoker,
        max_body_bytes: int,
        commit: Callable[[Partition, int], Awaitable[None]],
        on_error: Callable[[str], None],
        on_delivered: Callable[[], None],
    ) -> None:
        self.trigger = trigger
        self._cfg = trigger.config
        self._kafka = kafka
        self._invoker = invoker
        self._max_body_bytes = max_body_bytes
        self._commit_to = commit
        self._on_error = on_error
        self._on_delivered = on_delivered
        self._slots = asyncio.Semaphore(int(self._cfg["max_parallel"]))
        self._producer: AIOKafkaProducer | None = None
        self._log = log.bind(trigger=trigger.id, topic=self._cfg["topic"])

    async def close(self) -> None:
        if self._producer is not None:
            with contextlib.suppress(KafkaError, OSError, TimeoutError):
                await asyncio.wait_for(self._producer.stop(), 5.0)
            self._producer = None

    async def run_partition(self, part: Partition) -> None:
        """Batch and deliver the partition's records until it stops."""
        size = int(self._cfg["batch_size"])
        window_s = int(self._cfg["batch_window_ms"]) / 1000
        while not part.stopping.is_set():
            if not part.buffer:
                await part.arrived.wait()
                part.arrived.clear()
                continue
            # Wait for a full batch, or for the oldest record's window to pass.
            while len(part.buffer) < size and not part.stopping.is_set():
                left = part.buffer[0][1] + window_s - time.monotonic()
                if left <= 0:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(part.arrived.wait(), left)
                part.arrived.clear()
            async with self._slots:
                if part.stopping.is_set():
                    return
                records = [r for r, _ in part.buffer]
                n = batch_length(records, size, self._max_body_bytes)
                batch = [part.buffer.popleft()[0] for _ in range(n)]
                if not await self.deliver(part, batch, 0):
                    return

    async def deliver(self, part: Partition, batch: list[KafkaRecord], retries: int) -> bool:
        """Deliver ``batch`` until it is handled (True) or the partition stops (False)."""
        cfg = self._cfg
        backoff = Backoff(*PLATFORM_BACKOFF_S)
        pending = batch
        while True:
            if part.stopping.is_set():
                return False
            where = f"{part.tp.partition}-{pending[0].offset}"
            rid = f"kafka-{self.trigger.name}-{where}-{uuid.uuid4().hex[:8]}"
            result = await self._invoker.call(self.trigger, event_body(pending), rid)
            j = judge(result, [r.offset for r in pending])
            if j.verdict == "ok":
                await self._commit_to(part, pending[-1].offset + 1)
                self._on_delivered()
                return True
            self._on_error(
                f"{j.verdict} failure at offsets {pending[0].offset}..{pending[-1].offset} "
                f"of partition {part.tp.partition}: {j.reason}"
            )
            if j.verdict == "platform":
                if not await self._pause(part, backoff.delay_s):
                    return False
                backoff.delay_s = min(backoff.delay_s * 2, backoff.cap_s)
                continue
            backoff.reset()
            if j.verdict == "partial":
                first = j.failed[0]
                await self._commit_to(part, first)
                pending = [r for r in pending if r.offset >= first]
                failed = [r for r in pending if r.offset in set(j.failed)]
            elif cfg["bisect"] and len(pending) > 1:
                half = len(pending) // 2
                self._log.info(
                    "kafka_batch_bisected", offset=pending[0].offset, records=len(pending)
                )
                return await self.deliver(part, pending[:half], retries) and await self.deliver(
                    part, pending[half:], retries
                )
            else:
                failed = pending
            if retries < int(cfg["max_retries"]):
                retries += 1
                if not await self._pause(part, retry_delay_s(retries)):
                    return False
                continue
            if not await self._give_up(part, failed, j.reason, retries + 1):
                return False
            await self._commit_to(part, pending[-1].offset + 1)
            return True

    async def _give_up(
        self, part: Partition, failed: list[KafkaRecord], reason: str, attempts: int
    ) -> bool:
        offsets = [r.offset for r in failed]
        if self._cfg["on_failure"] == "skip":
            self._log.warning("kafka_records_skipped", partition=part.tp.partition, offsets=offsets)
            return True
        topic = error_topic(self.trigger)
        backoff = Backoff(*PLATFORM_BACKOFF_S)
        while True:
            try:
                if self._producer is None:
                    await ensure_topic(self._kafka, topic)
                    p = producer(self._kafka, client_id="imagefn-trigger")
                    await p.start()
                    self._producer = p
                for r in failed:
                    await self._producer.send_and_wait(
                        topic,
                        value=r.value,
                        key=r.key,
                        headers=error_headers(self.trigger.id, r, reason, attempts),
                    )
                self._log.warning(
                    "kafka_records_to_error_topic",
                    error_topic=topic,
                    partition=part.tp.partition,
                    offsets=offsets,
                )
                return True
            except (KafkaError, OSError) as e:
                self._on_error(f"error topic {topic}: {type(e).__name__}: {e}")
                if not await self._pause(part, backoff.delay_s):
                    return False
                backoff.delay_s = min(backoff.delay_s * 2, backoff.cap_s)

    async def _pause(self, part: Partition, seconds: float) -> bool:
        """Sleep, unless the partition stops first (False)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(part.stopping.wait(), seconds)
        return not part.stopping.is_set()
