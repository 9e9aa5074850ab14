"""Kafka triggers: each enabled trigger's topic consumed in the trigger's own consumer
group, its records delivered to the function as SCF's CKafka events, synchronously.

Every runner joins every enabled trigger's group (``shared/kafkasource.py: group_id``), so
the group's partitions are shared out among the runners, and a runner that dies (SIGKILL
included) loses its partitions to the others at the group's next rebalance (within
``session_timeout_ms``).

Per partition, one task (``workers/kafka_delivery.py``): records are buffered as the
consumer fetches them; a batch goes when ``batch_size`` records are waiting or the oldest
has waited ``batch_window_ms``, and holds no more than keeps the event under the request
limit (``max_body_bytes``). The partition's next batch waits for the previous call's
answer, so records reach the function in partition order; up to ``max_parallel``
partitions are in calls at once. Offsets are
committed after a batch is handled (delivered, or given up), never before: delivery is at
least once. A runner killed between a call and its commit leaves the batch to be
delivered again by the partition's next owner.

What an answer means is decided in ``workers/kafkabatch.py``: platform failures are
retried with backoff for as long as they last (the partition waits); the function's own
failures up to ``max_retries`` times (with ``bisect``, a failing batch of several records
is split in halves first, isolating a poison record), then the records that failed are
produced to the error topic (value and key unchanged, the reason in ``imagefn-*``
headers) or skipped, and committed. ``batchItemFailures`` retries from the lowest offset
named.

On revoke (a rebalance), each partition's task stops after its call in flight (waiting
up to ``PARTITION_GRACE_S``) and commits what it handled; buffered records are dropped
and fetched again by the next owner from the committed offset.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Iterable
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError
from redis.exceptions import RedisError

from shared.backoff import Backoff
from shared.errors import ImagefnError
from shared.kafka import consumer
from shared.kafkasource import group_id, source_settings
from shared.settings import Settings
from shared.triggers import Trigger, TriggerStore
from workers.kafka_delivery import Delivery, Partition
from workers.kafkabatch import KafkaRecord
from workers.triggerinvoke import TriggerInvoker

log = structlog.get_logger("imagefn.triggers.kafka")

# How often the list of triggers is read again (new, changed, disabled, deleted ones).
RELOAD_S = 1.0
# How often a consumer writes its observed state (lag, last record, errors) to Redis.
REPORT_S = 1.0
# How long a stopping partition waits for its call in flight before abandoning it (its
# records are then delivered again by the next owner).
PARTITION_GRACE_S = 5.0
# How long a stopping trigger consumer takes at most (partitions, then leaving the group).
STOP_GRACE_S = PARTITION_GRACE_S + 5.0
COMMIT_TIMEOUT_S = 10.0


class GroupStuck(Exception):
    """No assignment for much longer than a rebalance takes: the member starts over."""


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, owner: TriggerConsumer) -> None:
        self._owner = owner

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self._owner.revoke(list(revoked))

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        await self._owner.assign(list(assigned))


class TriggerConsumer:
    """One trigger's membership of its consumer group, on this runner."""

    def __init__(
        self, trigger: Trigger, settings: Settings, store: TriggerStore, invoker: TriggerInvoker
    ) -> None:
        self.trigger = trigger
        self._cfg = trigger.config
        self._settings = settings
        self._kafka = source_settings(settings.kafka, trigger)
        self._store = store
        self._invoker = invoker
        self._stop = asyncio.Event()
        self._parts: dict[TopicPartition, Partition] = {}
        self._commit_lock = asyncio.Lock()
        self._consumer: AIOKafkaConsumer | None = None
        self._delivery = Delivery(
            trigger,
            self._kafka,
            invoker,
            settings.gateway.max_body_bytes,
            self._commit,
            self._failed,
            lambda: self._notes.update(last_record_at=time.time()),
        )
        self._notes: dict[str, Any] = {}
        self._errors = 0
        self._reported_at = 0.0
        self._forget = False
        # Since when this member waits for an assignment (None: it has one, maybe empty).
        self._waiting_since: float | None = None
        self._log = log.bind(trigger=trigger.id, topic=self._cfg["topic"])

    def stop(self, forget: bool = False) -> None:
        """Stop; ``forget``: the trigger is deleted, write no more state for it."""
        self._forget = self._forget or forget
        self._stop.set()

    async def run(self) -> None:
        """Consume until stopped; a cluster that is away (or any failure) is noted in the
        trigger's state and retried with backoff, never raised."""
        backoff = Backoff(0.5, 15.0)
        while not self._stop.is_set():
            try:
                await self._consume(backoff)
            except (KafkaError, OSError, ImagefnError, GroupStuck) as e:
                self._failed(f"Kafka at {self._kafka.bootstrap}: {type(e).__name__}: {e}")
            except Exception as e:  # a bug must not end the other triggers' consumers
                self._log.exception("kafka_trigger_crashed")
                self._failed(f"{type(e).__name__}: {e}")
            finally:
                await self._close()
                await self._report(force=True)
            if not self._stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), backoff.delay_s)
                backoff.delay_s = min(backoff.delay_s * 2, backoff.cap_s)
        self._log.info("kafka_trigger_stopped")

    def _failed(self, message: str) -> None:
        self._log.warning("kafka_trigger_error", error=message)
        self._notes.update(last_error=message, last_error_at=time.time())
        self._errors += 1

    async def _consume(self, backoff: Backoff) -> None:
        start = self._cfg["start"]
        session_ms = self._settings.kafka.session_timeout_ms
        # The group waits this long for its members to rejoin; a member's revoke waits up
        # to PARTITION_GRACE_S for its calls in flight, so this must be longer.
        rebalance_ms = max(session_ms, int(PARTITION_GRACE_S * 1000) + 5000)
        c = consumer(
            self._kafka,
            group_id=group_id(self._settings.queue.prefix, self.trigger),
            client_id="imagefn-trigger",
            auto_offset_reset="earliest" if start == "earliest" else "latest",
            session_timeout_ms=self._settings.kafka.session_timeout_ms,
            heartbeat_interval_ms=self._settings.kafka.heartbeat_interval_ms,
            max_poll_interval_ms=self._settings.kafka.max_poll_interval_ms,
            rebalance_timeout_ms=rebalance_ms,
            fetch_max_wait_ms=100,
        )
        self._consumer = c
        await c.start()
        c.subscribe([self._cfg["topic"]], listener=_Listener(self))
        self._log.info(
            "kafka_trigger_consuming", group=group_id(self._settings.queue.prefix, self.trigger)
        )
        self._notes.update(consuming_since=time.time())
        backoff.reset()
        # A member that gets no assignment at all (not even an empty one) for much longer
        # than a rebalance can take starts over as a new member. (Seen with the Tansu
        # test broker, now and then: after members left, the rejoining ones all waited
        # for a leader that never came.)
        # Jittered, so that the members of one stuck group do not all start over at once.
        stuck_s = round((2 * rebalance_ms + session_ms) / 1000 * random.uniform(1.0, 1.5), 1)
        self._waiting_since = time.monotonic()
        while not self._stop.is_set():
            try:
                # Bounded: during a rebalance getmany waits for the new assignment, and
                # stop and the watchdog below must not wait with it.
                fetched = await asyncio.wait_for(c.getmany(timeout_ms=200, max_records=5000), 1.0)
            except TimeoutError:
                fetched = {}
            now = time.monotonic()
            if self._waiting_since is not None and now - self._waiting_since > stuck_s:
                raise GroupStuck(f"no partitions assigned within {stuck_s:g} s; rejoining")
            for tp, msgs in fetched.items():
                part = self._parts.get(tp)
                if part is None:
                    continue  # revoked meanwhile
                for m in msgs:
                    if m.offset <= part.last_seen:
                        continue
                    headers = tuple((k, bytes(v)) for k, v in (m.headers or ()))
                    rec = KafkaRecord(m.topic, m.partition, m.offset, m.key, m.value, headers)
                    part.buffer.append((rec, now))
                    part.last_seen = m.offset
                part.arrived.set()
            self._flow_control(c)
            for part in self._parts.values():
                if part.task is not None and part.task.done() and not part.stopping.is_set():
                    part.task.result()  # a partition task that died: raise its error
            await self._report()

    def _flow_control(self, c: AIOKafkaConsumer) -> None:
        """Stop fetching a partition whose buffer holds a few batches already."""
        high = max(2 * int(self._cfg["batch_size"]), 200)
        paused = c.paused()
        for tp, part in self._parts.items():
            if len(part.buffer) >= high and tp not in paused:
                c.pause(tp)
            elif len(part.buffer) < high // 2 and tp in paused:
                c.resume(tp)

    async def assign(self, assigned: list[TopicPartition]) -> None:
        c = self._consumer
        assert c is not None
        start = self._cfg["start"]
        for tp in assigned:
            if tp in self._parts:
                continue
            part = Partition(tp)
            committed = await c.committed(tp)
            if committed is not None and committed >= 0:
                part.committed = committed
            elif isinstance(start, int) and not isinstance(start, bool):
                # No committed offset: the first record at or after the timestamp.
                found = (await c.offsets_for_times({tp: start})).get(tp)
                if found is not None:
                    c.seek(tp, found.offset)
                else:
                    await c.seek_to_end(tp)
            self._parts[tp] = part
            part.task = asyncio.create_task(self._delivery.run_partition(part), name=f"kafka-{tp}")
        self._waiting_since = None
        self._log.info(
            "kafka_partitions_assigned", partitions=sorted(p.partition for p in assigned)
        )

    async def revoke(self, revoked: list[TopicPartition]) -> None:
        self._waiting_since = time.monotonic()  # a rebalance: an assignment follows
        parts = [self._parts.pop(tp) for tp in revoked if tp in self._parts]
        await self._stop_partitions(parts)
        if revoked:
            self._log.info(
                "kafka_partitions_revoked", partitions=sorted(p.partition for p in revoked)
            )

    async def _stop_partitions(self, parts: list[Partition]) -> None:
        for part in parts:
            part.stopping.set()
            part.arrived.set()
        tasks = [p.task for p in parts if p.task is not None]
        if not tasks:
            return
        _, late = await asyncio.wait(tasks, timeout=PARTITION_GRACE_S)
        for task in late:
            task.cancel()
        for result in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(result, Exception):
                self._log.warning("kafka_partition_failed", error=repr(result))

    async def _close(self) -> None:
        await self._stop_partitions(list(self._parts.values()))
        self._parts.clear()
        if self._consumer is not None:
            with contextlib.suppress(KafkaError, OSError):
                await asyncio.wait_for(self._consumer.stop(), STOP_GRACE_S)
            self._consumer = None
        await self._delivery.close()

    async def _commit(self, part: Partition, offset: int) -> None:
        if offset <= part.committed or self._consumer is None:
            return
        try:
            async with self._commit_lock:
                await asyncio.wait_for(self._consumer.commit({part.tp: offset}), COMMIT_TIMEOUT_S)
            part.committed = offset
        except (KafkaError, TimeoutError) as e:
            # Handled but not committed: delivered again by whoever reads it next.
            self._log.warning("kafka_commit_failed", partition=part.tp.partition, error=repr(e))

    # --- observed state -----------------------------------------------------------------

    def _lag(self) -> int | None:
        c = self._consumer
        if c is None:
            return None
        total, known = 0, False
        for tp, part in self._parts.items():
            high = c.highwater(tp)
            if high is None:
                continue
            done = part.committed if part.committed >= 0 else part.last_seen + 1
            if done <= 0 and part.last_seen < 0:
                continue
            total += max(0, high - done)
            known = True
        return total if known else None

    async def _report(self, force: bool = False) -> None:
        now = time.monotonic()
        if self._forget or (not force and now - self._reported_at < REPORT_S):
            return
        self._reported_at = now
        lag = self._lag()
        notes = dict(self._notes)
        if lag is not None:
            notes["lag"] = lag
            notes["partitions"] = sorted(tp.partition for tp in self._parts)
        if not notes and not self._errors:
            return
        try:
            await self._store.note(self.trigger.id, errors=self._errors, **notes)
        except (RedisError, ImagefnError) as e:
            self._log.warning("kafka_trigger_state_not_saved", error=str(e))
            return
        self._notes.clear()
        self._errors = 0


class KafkaTriggerRunner:
    """Every enabled Kafka trigger's consumer, started, restarted on a change and stopped
    as the triggers are added, changed, disabled and deleted."""

    def __init__(self, settings: Settings, store: TriggerStore, invoker: TriggerInvoker) -> None:
        self._settings = settings
        self._store = store
        self._invoker = invoker
        self._running: dict[str, tuple[TriggerConsumer, asyncio.Task[None]]] = {}

    async def run(self, stop: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                try:
                    await self._reload()
                except ImagefnError as e:
                    log.warning("kafka_trigger_reload_failed", error=e.message)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), RELOAD_S)
        finally:
            await asyncio.gather(*(self._halt(tid) for tid in list(self._running)))

    async def _reload(self) -> None:
        triggers = await self._store.list()
        wanted = {t.id: t for t in triggers if t.type == "kafka" and t.enabled}
        existing = {t.id for t in triggers}
        changed = [
            tid
            for tid, (tc, task) in self._running.items()
            if wanted.get(tid) != tc.trigger or task.done()
        ]
        await asyncio.gather(*(self._halt(tid, tid not in existing) for tid in changed))
        for tid, trigger in wanted.items():
            if tid not in self._running:
                tc = TriggerConsumer(trigger, self._settings, self._store, self._invoker)
                task = asyncio.create_task(tc.run(), name=f"kafka-trigger-{tid}")
                self._running[tid] = (tc, task)
                log.info("kafka_trigger_started", trigger=tid, topic=trigger.config["topic"])

    async def _halt(self, tid: str, forget: bool = False) -> None:
        tc, task = self._running.pop(tid)
        tc.stop(forget)
        _, late = await asyncio.wait([task], timeout=STOP_GRACE_S + 5.0)
        if late:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
