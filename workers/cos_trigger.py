"""Object-storage (cos) triggers: every change SeaweedFS's filer publishes to its Kafka
topic (``ObjectStoreSettings.events_topic``) becomes, for each enabled cos trigger whose
bucket, events, prefix and suffix it matches, one asynchronous invocation of the
trigger's function with SCF's COS event (``shared/cos_events.py``).

All runners read the topic in one consumer group, so each change is handled by one of
them, and a runner that dies hands its partitions to the others. Delivery is at least
once: a partition's offset is committed only after every invocation its records made
was accepted; a record read again (a runner died before committing) maps to the same
request ids (``cos_events.request_id``: trigger + topic, partition, offset and a digest
of the record) and is accepted once. Directories, the store's own entries (``/.system/``,
multipart parts under ``/.uploads/``) and anything outside ``/buckets/`` are dropped, so
a multipart upload gives one event, for the object it completes.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from typing import Any

import structlog
from aiokafka import ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError
from google.protobuf.message import DecodeError

from shared import cos_events, filer_events
from shared.errors import ImagefnError, ServiceUnavailable
from shared.kafka import consumer, ensure_topic
from shared.settings import Settings
from shared.triggers import Trigger, TriggerStore
from workers.triggerinvoke import TriggerInvoker

log = structlog.get_logger("imagefn.triggers.cos")

# How often the list of triggers is read again (new, changed, disabled, deleted ones).
RELOAD_S = 1.0
# Partitions of the events topic when the runner creates it (the filer's broker may have
# created it first, with its own count).
TOPIC_PARTITIONS = 4
# Retries of an accept that failed for want of Redis or the queue: the record waits
# (uncommitted) until it goes through or the runner stops.
RETRY_FIRST_S, RETRY_MAX_S = 0.2, 5.0


def group_id(settings: Settings) -> str:
    return settings.objectstore.consumer_group or f"{settings.kafka.topic_prefix}.cos-triggers"


class _Assignments(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, c: Any) -> None:
        self._c = c

    async def on_partitions_revoked(self, revoked: Any) -> None:
        log.info("cos_partitions_revoked", partitions=sorted(tp.partition for tp in revoked))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        # A partition the group never committed starts at its end ("latest"); commit that
        # position now, so that a rebalance before its first record cannot move the
        # start past changes made meanwhile.
        for tp in assigned:
            if await self._c.committed(tp) is None:
                await self._c.commit({tp: await self._c.position(tp)})
        log.info("cos_partitions_assigned", partitions=sorted(tp.partition for tp in assigned))


class CosRunner:
    def __init__(self, settings: Settings, store: TriggerStore, invoker: TriggerInvoker) -> None:
        self._settings = settings
        self._store = store
        self._invoker = invoker
        self._topic = settings.objectstore.events_topic
        self._triggers: list[Trigger] = []
        self._loaded_at = 0.0

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until ``stop``; a broker that cannot be reached is tried again (the
        runner's other triggers keep running meanwhile)."""
        delay = RETRY_FIRST_S
        while not stop.is_set():
            try:
                await self._consume(stop)
            except KafkaError as e:
                log.warning("cos_consumer_failed", topic=self._topic, error=str(e), retry_s=delay)
                try:
                    await asyncio.wait_for(stop.wait(), delay)
                except TimeoutError:
                    delay = min(RETRY_MAX_S * 2, delay * 2)

    async def _consume(self, stop: asyncio.Event) -> None:
        await ensure_topic(self._settings.kafka, self._topic, TOPIC_PARTITIONS)
        c = consumer(
            self._settings.kafka,
            group_id=group_id(self._settings),
            # A new group starts at the end: changes made before the first runner
            # started are not replayed; from then on the committed offsets hold.
            auto_offset_reset="latest",
            session_timeout_ms=self._settings.kafka.session_timeout_ms,
            heartbeat_interval_ms=self._settings.kafka.heartbeat_interval_ms,
            max_poll_interval_ms=self._settings.kafka.max_poll_interval_ms,
        )
        c.subscribe([self._topic], listener=_Assignments(c))
        await c.start()
        log.info("cos_runner_started", topic=self._topic, group=group_id(self._settings))
        try:
            while not stop.is_set():
                batch = await c.getmany(timeout_ms=500, max_records=500)
                if not batch:
                    continue
                if not await self._reload(stop):
                    return  # stopping before the triggers could be read: nothing committed
                for tp, records in batch.items():
                    for rec in records:
                        if not await self._handle(tp, rec, stop):
                            return  # stopping: leave the rest uncommitted
                    await c.commit({tp: records[-1].offset + 1})
        finally:
            await c.stop()

    async def _reload(self, stop: asyncio.Event) -> bool:
        """Read the cos triggers again if the list is older than RELOAD_S; while Redis
        does not answer, wait (records matched against no list would be committed
        unhandled). False when the runner stopped meanwhile."""
        delay = RETRY_FIRST_S
        while time.monotonic() - self._loaded_at >= RELOAD_S:
            try:
                found = await self._store.list()
            except ImagefnError as e:
                log.warning("cos_reload_failed", error=e.message, retry_s=delay)
                try:
                    await asyncio.wait_for(stop.wait(), delay)
                    return False
                except TimeoutError:
                    delay = min(RETRY_MAX_S, delay * 2)
                    continue
            self._triggers = [t for t in found if t.type == "cos" and t.enabled]
            self._loaded_at = time.monotonic()
        return True

    async def _handle(self, tp: TopicPartition, rec: Any, stop: asyncio.Event) -> bool:
        """Submit what one record asks for; False when the runner stopped first."""
        path = rec.key.decode(errors="replace") if rec.key else ""
        try:
            event = filer_events.decode(rec.value or b"")
        except DecodeError as e:
            log.warning(
                "cos_record_undecodable", partition=tp.partition, offset=rec.offset, error=str(e)
            )
            return True
        source = f"{self._topic}/{tp.partition}/{rec.offset}"
        changes = cos_events.from_filer(path, event, source)
        if not changes:
            return True
        digest = hashlib.sha256(rec.value).hexdigest()[:16]
        for i, change in enumerate(changes):
            for trigger in self._triggers:
                if not cos_events.matches(trigger, change):
                    continue
                rid = cos_events.request_id(trigger, f"kafka:{source}:{digest}:{i}")
                if not await self._submit(trigger, change, rid, stop):
                    return False
        return True

    async def _submit(
        self, trigger: Trigger, change: cos_events.ObjectChange, rid: str, stop: asyncio.Event
    ) -> bool:
        body = cos_events.cos_event(change, rid, self._settings.objectstore.endpoint)
        delay = RETRY_FIRST_S
        while True:
            try:
                verdict = await self._invoker.submit(trigger, body, rid)
            except (ServiceUnavailable, KafkaError) as e:
                # Redis or the queue is down: the record waits, uncommitted.
                log.warning("cos_submit_retry", trigger=trigger.id, error=str(e))
                try:
                    await asyncio.wait_for(stop.wait(), delay)
                    return False
                except TimeoutError:
                    delay = min(RETRY_MAX_S, delay * 2)
                    continue
            except ImagefnError as e:
                # The function or its qualifier is gone: nothing to retry.
                log.warning(
                    "cos_submit_failed", trigger=trigger.id, key=change.key, error=e.message
                )
                await self._store.note(trigger.id, last_error=e.message, errors=1)
                return True
            break
        if verdict == "queued":
            log.info(
                "cos_fired",
                trigger=trigger.id,
                request_id=rid,
                bucket=change.bucket,
                key=change.key,
                event_name=change.event_name,
            )
        await self._store.note(trigger.id, last_fired_at=time.time(), last_key=change.key)
        return True
