"""Redis Streams backend of the invocation queue.

* Invocations: one stream (``{prefix}:invocations``) read by the consumer group
  ``workers``. Each worker is a consumer; Redis remembers which worker holds which entry
  (the pending entries list), which is what makes takeover after a crash possible.
* Claims: a worker refreshes its claims with ``XCLAIM ... JUSTID`` every few seconds; an
  entry idle longer than ``reclaim_idle_ms`` belongs to a dead worker and ``XAUTOCLAIM``
  moves it to a live one.
* Results: each gateway process owns a reply stream (``{prefix}:replies:{id}``) and one
  reader task that blocks on it and completes the waiting requests' futures. A worker
  writes the result and acknowledges (XACK + XDEL) in one pipelined round trip, result
  first.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import uuid
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError, ResponseError

from shared.autopipe import AutoPipeline
from shared.backoff import Backoff
from shared.errors import QueueUnavailable
from shared.keys import Keys
from shared.liveness import forget, heartbeats
from shared.messages import Invocation, InvocationResult
from shared.queue.base import Delivery, InvocationQueue, raising_queue_unavailable
from shared.queue.delayed import DelayedSet
from shared.settings import QueueSettings

log = structlog.get_logger("imagefn.queue")
# The client's errors leave every public method as QueueUnavailable.
_client_errors = raising_queue_unavailable(RedisError, OSError)

# Results kept per reply stream at most. A live gateway trims what it read; this bounds
# what a dead one leaves behind until the key expires (reply_ttl_s after the last write).
REPLY_STREAM_MAXLEN = 10_000
# Reply entries carry the waiting call's id next to the encoded result.
CALL_ID_FIELD = b"c"
# The gateway trims what it has read from its reply stream every this many results.
REPLY_TRIM_EVERY = 100
# Blocking reads must return before the client's socket timeout (redis-py: 5 s).
REPLY_BLOCK_MS = 2000
RECLAIM_PAGES_PER_CALL = 10
# The result, then the acknowledgement, in one script: if Redis refuses the XADD (out of
# memory, the reply key of the wrong type) the script stops there and the invocation
# stays claimed, to be finished again or reclaimed. (A pipeline would acknowledge anyway.)
_REPLY_AND_ACK = """
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[4], '*', unpack(ARGV, 5))
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[2], ARGV[2])
return 1
"""
_DELETE_IF_EMPTY = (
    "if redis.call('XLEN', KEYS[1]) == 0 then return redis.call('DEL', KEYS[1]) end return 0"
)


StreamEntries = list[tuple[Any, dict[bytes, bytes]]]


def _stream_entries(resp: Any) -> list[tuple[Any, StreamEntries]]:
    """XREAD/XREADGROUP answers (RESP2: a list of [stream, entries]) as typed pairs."""
    return list(resp or [])


class RedisStreamsQueue(InvocationQueue):
    def __init__(self, client: aioredis.Redis, settings: QueueSettings) -> None:
        self._r = client
        self._s = settings
        self._keys = Keys(settings.prefix)
        self._gateway_id = uuid.uuid4().hex
        self._reply_key = self._keys.replies(self._gateway_id)
        super().__init__()
        self._reader: asyncio.Task[None] | None = None
        # Streams whose consumer group this process has made sure of.
        self._groups: set[str] = set()
        self._closed = False
        self._reclaim_cursors: dict[str, str] = {}
        self._delayed = DelayedSet(client, self._keys)
        self._reply_and_ack = client.register_script(_REPLY_AND_ACK)
        # Calls issued in one pass of the loop share one round trip: a gateway's XADDs,
        # a worker's results and acknowledgements.
        self._pipe = AutoPipeline(client)

    @_client_errors
    async def open(self) -> None:
        await self._ensure_group(self._keys.invocations)

    async def _ensure_group(self, stream: str) -> None:
        if stream in self._groups:
            return
        try:
            # Start at 0 so invocations published before any worker existed are still run.
            await self._r.xgroup_create(stream, self._keys.workers_group, id="0", mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
        self._groups.add(stream)

    async def close(self) -> None:
        self._closed = True
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, RedisError):
                await self._reader
            self._reader = None
        self._cancel_waiters()

    # -- producer side -------------------------------------------------------------------

    @_client_errors
    async def publish(self, invocation: Invocation, worker: str | None = None) -> None:
        stream = self._keys.worker_invocations(worker) if worker else self._keys.invocations
        fields = invocation.encode()
        try:
            # Through the auto-pipeline: the XADDs of every request a gateway handles in
            # one pass of its loop go to Redis in one round trip (issue 12). Each still
            # returns only once Redis has its own entry.
            await self._pipe.execute(
                "XADD", stream, "*", *[part for pair in fields.items() for part in pair]
            )
        except RedisError as e:
            raise QueueUnavailable(f"queue unavailable: {e}") from e

    @_client_errors
    async def publish_many(self, invocations: Sequence[Invocation]) -> None:
        # One round trip for the lot (batches feed hundreds at a time).
        try:
            async with self._r.pipeline(transaction=False) as pipe:
                for inv in invocations:
                    pipe.xadd(self._keys.invocations, inv.encode())  # type: ignore[arg-type]
                await pipe.execute()
        except RedisError as e:
            raise QueueUnavailable(f"queue unavailable: {e}") from e

    @_client_errors
    async def publish_at(self, invocation: Invocation, due_at: float) -> None:
        await self._delayed.add(invocation, due_at)

    @_client_errors
    async def release_due(self, now: float, max_count: int) -> int:
        await self._ensure_group(self._keys.invocations)
        return await self._delayed.move_to_stream(self._keys.invocations, now, max_count)

    def reply_address(self) -> str:
        return self._reply_key

    async def _before_call(self) -> None:
        if self._reader is None:
            # A fresh context: the reader outlives the request that happened to start it,
            # and its log lines must not carry that request's id.
            self._reader = asyncio.create_task(
                self._read_replies(), name="queue-reply-reader", context=contextvars.Context()
            )

    async def _read_replies(self) -> None:
        last_id: Any = "0"
        backoff = Backoff(0.1, 2.0)
        unread_trimmed = 0
        while not self._closed:
            try:
                resp = await self._r.xread(
                    {self._reply_key: last_id}, count=256, block=REPLY_BLOCK_MS
                )
                backoff.reset()
            except RedisError as e:
                log.warning("reply_reader_error", error=str(e))
                await backoff.sleep()
                continue
            for _stream, entries in _stream_entries(resp):
                for entry_id, fields in entries:
                    last_id = entry_id
                    unread_trimmed += 1
                    call_id = fields.get(CALL_ID_FIELD, b"").decode()
                    if call_id not in self._waiters:
                        continue  # the caller gave up, or a duplicate delivery
                    try:
                        self._resolve(call_id, InvocationResult.decode(fields))
                    except (KeyError, ValueError) as e:
                        log.error("reply_undecodable", entry=str(entry_id), error=str(e))
            if unread_trimmed >= REPLY_TRIM_EVERY:
                # Results are read within milliseconds; drop what was read so a busy
                # gateway's reply stream stays small.
                unread_trimmed = 0
                with contextlib.suppress(RedisError):
                    await self._r.xtrim(self._reply_key, minid=last_id)

    # -- consumer side -------------------------------------------------------------------
    #
    # A receipt is "<stream> <entry id>": entries come from the shared stream, from the
    # consumer's own stream, or from a dead worker's stream it adopted.

    @staticmethod
    def _receipt(stream: str, entry_id: Any) -> str:
        return f"{stream} {entry_id.decode() if isinstance(entry_id, bytes) else entry_id}"

    @staticmethod
    def _split(receipt: str) -> tuple[str, str]:
        stream, _, entry_id = receipt.rpartition(" ")
        return stream, entry_id

    @_client_errors
    async def consume(self, consumer: str, max_count: int, block_s: float) -> list[Delivery]:
        own = self._keys.worker_invocations(consumer)
        # Its own stream first: work routed here because this worker holds warm instances.
        streams = {own: ">", self._keys.invocations: ">"}
        for stream in streams:
            await self._ensure_group(stream)
        try:
            resp = await self._r.xreadgroup(
                self._keys.workers_group,
                consumer,
                streams,  # type: ignore[arg-type]
                # COUNT applies to each stream: halve it so both together stay within
                # max_count (one over at most, when max_count is 1).
                count=max(1, max_count // 2),
                block=max(1, int(block_s * 1000)),
            )
        except ResponseError as e:
            self._forget_group_if_gone(e)
            raise
        return await self._deliveries(resp, attempt=1)

    async def _deliveries(self, resp: Any, attempt: int | None) -> list[Delivery]:
        out: list[Delivery] = []
        for stream, entries in _stream_entries(resp):
            name = stream.decode() if isinstance(stream, bytes) else str(stream)
            for entry_id, fields in entries:
                receipt = self._receipt(name, entry_id)
                n = attempt if attempt is not None else await self._attempts(receipt)
                delivery = await self._decode_or_drop(receipt, fields, n)
                if delivery is not None:
                    out.append(delivery)
        return out

    def _forget_group_if_gone(self, e: ResponseError) -> None:
        # Redis lost a group (restarted without persistence, or the key was deleted):
        # recreate them on the next call instead of failing forever.
        if "NOGROUP" in str(e):
            self._groups.clear()

    async def _decode_or_drop(
        self, receipt: str, fields: dict[bytes, bytes] | None, attempt: int
    ) -> Delivery | None:
        if not fields:
            return None
        try:
            return Delivery(Invocation.decode(fields), receipt=receipt, attempt=attempt)
        except (KeyError, ValueError, TypeError) as e:
            # Nobody can ever run an entry we cannot decode; keeping it would only make
            # every worker trip over it again.
            log.error("invocation_undecodable", entry=receipt, error=str(e))
            await self._ack(receipt)
            return None

    @_client_errors
    async def reclaim(self, consumer: str, max_count: int) -> list[Delivery]:
        """Claims idle past ``reclaim_idle_ms`` on the shared and own streams, and the
        whole stream of any worker whose heartbeat is gone (adopted, then deleted)."""
        out: list[Delivery] = []
        for stream in (self._keys.invocations, self._keys.worker_invocations(consumer)):
            out += await self._autoclaim(stream, consumer, max_count - len(out))
            if len(out) >= max_count:
                return out
        for owner, beat in (await heartbeats(self._r, self._keys)).items():
            if owner == consumer or beat is not None:
                continue
            stream = self._keys.worker_invocations(owner)
            if await self._r.exists(stream):
                out += await self._adopt(stream, consumer, max_count - len(out))
            else:
                await forget(self._r, self._keys, owner)  # dead, and nothing left of it
            if len(out) >= max_count:
                break
        return out

    async def _autoclaim(self, stream: str, consumer: str, max_count: int) -> list[Delivery]:
        if max_count <= 0:
            return []
        await self._ensure_group(stream)
        out: list[Delivery] = []
        # XAUTOCLAIM scans the pending list in pages; keep the cursor across calls so that
        # entries far down a long list of live claims are reached too.
        for _ in range(RECLAIM_PAGES_PER_CALL):
            try:
                resp = await self._r.xautoclaim(
                    stream,
                    self._keys.workers_group,
                    consumer,
                    min_idle_time=self._s.reclaim_idle_ms,
                    start_id=self._reclaim_cursors.get(stream, "0-0"),
                    count=max_count - len(out),
                )
            except ResponseError as e:
                self._forget_group_if_gone(e)
                raise
            raw_cursor, entries = resp[0], resp[1]
            cursor = raw_cursor.decode() if isinstance(raw_cursor, bytes) else str(raw_cursor)
            self._reclaim_cursors[stream] = cursor
            out += await self._deliveries([(stream, entries)], attempt=None)
            if cursor == "0-0" or len(out) >= max_count:
                break
        return out

    async def _adopt(self, stream: str, consumer: str, max_count: int) -> list[Delivery]:
        """Take over a dead worker's stream: what it never read, then what it held."""
        if max_count <= 0:
            return []
        self._groups.discard(stream)  # it may have been recreated without a group
        await self._ensure_group(stream)
        resp = await self._r.xreadgroup(
            self._keys.workers_group, consumer, {stream: ">"}, count=max_count
        )
        out = await self._deliveries(resp, attempt=1)
        out += await self._autoclaim(stream, consumer, max_count - len(out))
        # Empty and owned by nobody alive: remove it, atomically with the emptiness check
        # (a late XADD recreates it, and the next pass adopts that too).
        if not out and await self._r.eval(_DELETE_IF_EMPTY, 1, stream):
            self._groups.discard(stream)
            self._reclaim_cursors.pop(stream, None)
            log.info("worker_stream_adopted", stream=stream)
        return out

    async def _attempts(self, receipt: str) -> int:
        stream, entry_id = self._split(receipt)
        pending = await self._r.xpending_range(
            stream, self._keys.workers_group, entry_id, entry_id, 1
        )
        return int(pending[0]["times_delivered"]) if pending else 1

    @_client_errors
    async def keep_alive(self, consumer: str, deliveries: list[Delivery]) -> None:
        by_stream: dict[str, list[str]] = {}
        for d in deliveries:
            stream, entry_id = self._split(d.receipt)
            by_stream.setdefault(stream, []).append(entry_id)
        for stream, ids in by_stream.items():
            await self._r.xclaim(
                stream,
                self._keys.workers_group,
                consumer,
                min_idle_time=0,
                message_ids=ids,  # type: ignore[arg-type]
                justid=True,
            )

    @_client_errors
    async def finish(self, delivery: Delivery, result: InvocationResult | None) -> None:
        reply_to = delivery.invocation.reply_to
        if result is None or not reply_to:
            await self._ack(delivery.receipt)
            return
        stream, entry_id = self._split(delivery.receipt)
        fields = result.encode()
        fields[CALL_ID_FIELD.decode()] = delivery.invocation.call_id.encode()
        await self._pipe.script(
            self._reply_and_ack,
            [reply_to, stream],
            [
                self._keys.workers_group,
                entry_id,
                self._s.reply_ttl_s,
                REPLY_STREAM_MAXLEN,
                *[part for pair in fields.items() for part in pair],
            ],
        )

    async def _ack(self, receipt: str) -> None:
        stream, entry_id = self._split(receipt)
        # Both in the same pipeline (issued in the same pass of the loop).
        acked = self._pipe.execute("XACK", stream, self._keys.workers_group, entry_id)
        deleted = self._pipe.execute("XDEL", stream, entry_id)
        await asyncio.gather(acked, deleted)
