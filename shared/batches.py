"""Batches in Redis (docs/architecture.md, section 15, "Batches"): a batch's items,
counters and result lines.

Keys (``shared.keys``): ``batch`` (hash: meta, total, fed, succeeded, failed, cancelled,
state, finished_at; after a cancel also fed_at_cancel, cancelled_at), ``batch_items``
(list of item bodies), ``batch_results`` (hash index → result line) and ``batches``
(sorted set: the batches the feeder still has to look at).

Who writes what: the gateway creates and cancels (``BatchStore``); the feeder
(``workers/feeder.py``) advances ``fed`` after publishing items and settles finished
batches; the worker's ``finish``/``begin`` scripts (``shared/invocations.py``) write
result lines and count ``succeeded``/``failed``/``cancelled`` exactly once per item.

Lifetime, and why:

* staging — items are pushed in chunks while the body streams in; the list carries a
  ``STAGING_TTL_S`` expiry refreshed with every chunk, so a gateway that dies midway
  leaves nothing behind for long (an error in the body deletes the list at once). The
  commit, one MULTI, writes the hash, PERSISTs the list and adds the id to ``batches``:
  a batch exists whole or not at all.
* running — no expiry: a running batch is live state, like a deployed function. The
  item list is deleted as soon as every item is fed (nothing reads it after that).
* finished (every item counted: completed, or cancelled and its last running items done)
  — ``settle`` sets ``batch_ttl_s`` on the hash and the result lines and takes the id out
  of ``batches``; the feeder settles each finished batch on its next tick, a cancel with
  nothing in flight settles at once.

A cancel counts the items not fed yet as cancelled without writing their lines (a batch
may hold a million): ``results`` shows a ``cancelled`` line for every index from
``fed_at_cancel`` on that has none.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from shared.batch_scripts import ADVANCE, CANCEL, FAIL, SETTLE
from shared.errors import BatchNotFound, InvalidRequest, RequestTooLarge, ServiceUnavailable
from shared.keys import Keys
from shared.messages import BatchResultLine, batch_item_id
from shared.settings import AsyncSettings

# Items are pushed in chunks of at most this many items or bytes (one RPUSH each).
STAGE_ITEMS = 2000
STAGE_BYTES = 1024 * 1024
# A list being staged expires this long after its last chunk (a dead gateway's leftovers).
STAGING_TTL_S = 3600

RUNNING, COMPLETED, CANCELLED = "running", "completed", "cancelled"
_FIELDS = (
    "meta",
    "state",
    "total",
    "fed",
    "succeeded",
    "failed",
    "cancelled",
    "fed_at_cancel",
    "finished_at",
)


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


@dataclass(frozen=True)
class BatchMeta:
    function: str
    qualifier: str
    max_concurrency: int
    max_retries: int  # -1: the function's async policy
    max_event_age_s: int  # 0: the function's async policy
    created_at: float
    # The API key id that submitted it: its items' records are that caller's.
    owner: str = ""

    def to_json(self) -> str:
        return _dumps(self.__dict__)

    @classmethod
    def from_json(cls, raw: Any) -> BatchMeta:
        d = json.loads(raw)
        return cls(
            function=str(d["function"]),
            qualifier=str(d["qualifier"]),
            max_concurrency=int(d["max_concurrency"]),
            max_retries=int(d["max_retries"]),
            max_event_age_s=int(d["max_event_age_s"]),
            created_at=float(d["created_at"]),
            owner=str(d.get("owner", "")),
        )


@dataclass(frozen=True)
class BatchInfo:
    """A batch just accepted (the 202 answer)."""

    batch_id: str
    function: str
    qualifier: str
    items: int
    created_at: float
    state: str = RUNNING

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch_id": self.batch_id,
            "function": self.function,
            "qualifier": self.qualifier,
            "items": self.items,
            "state": self.state,
        }


@dataclass(frozen=True)
class BatchProgress:
    """A batch's hash, parsed."""

    batch_id: str
    meta: BatchMeta
    state: str
    total: int
    fed: int
    succeeded: int
    failed: int
    cancelled: int
    fed_at_cancel: int | None = None
    finished_at: float | None = None

    @property
    def counted(self) -> int:
        return self.succeeded + self.failed + self.cancelled

    @property
    def in_flight(self) -> int:
        return max(0, self.fed - self.counted)

    @property
    def over(self) -> bool:
        """Nothing about it changes any more: every item is counted."""
        return self.state != RUNNING and self.counted >= self.total

    @classmethod
    def parse(cls, batch_id: str, values: Sequence[Any]) -> BatchProgress | None:
        """From the values of ``_FIELDS``, in order; None when the hash is gone (or is
        not a batch's: one bad hash must not stop the feeder for every batch)."""
        raw = dict(zip(_FIELDS, values, strict=True))
        if raw["meta"] is None or raw["state"] is None:
            return None
        fac, fin = raw["fed_at_cancel"], raw["finished_at"]
        try:
            return cls(
                batch_id=batch_id,
                meta=BatchMeta.from_json(raw["meta"]),
                state=_text(raw["state"]),
                total=int(raw["total"] or 0),
                fed=int(raw["fed"] or 0),
                succeeded=int(raw["succeeded"] or 0),
                failed=int(raw["failed"] or 0),
                cancelled=int(raw["cancelled"] or 0),
                fed_at_cancel=None if fac is None else int(fac),
                finished_at=None if fin is None else float(fin),
            )
        except (ValueError, KeyError, TypeError):
            return None


def status_doc(p: BatchProgress, now: float) -> dict[str, Any]:
    """``GET /v1/batches/{id}``. The rate is items finished (succeeded or failed) per
    second since the batch was accepted; the ETA is what is left at that rate (null
    while nothing has finished yet, 0 once the batch is over)."""
    elapsed = max((p.finished_at or now) - p.meta.created_at, 1e-6)
    rate = (p.succeeded + p.failed) / elapsed
    left = max(0, p.total - p.counted)
    eta: float | None = round(left / rate, 3) if rate > 0 else None
    if p.over:
        eta = 0.0
    return {
        "batch_id": p.batch_id,
        "function": p.meta.function,
        "qualifier": p.meta.qualifier,
        "state": p.state,
        "total": p.total,
        "queued": max(0, p.total - p.fed),
        "in_flight": p.in_flight,
        "succeeded": p.succeeded,
        "failed": p.failed,
        "cancelled": p.cancelled,
        "items_per_s": round(rate, 3),
        "eta_s": eta,
        "created_at": p.meta.created_at,
        "finished_at": p.finished_at,
        "max_concurrency": p.meta.max_concurrency,
    }


def cancelled_line(batch_id: str, index: int) -> bytes:
    return BatchResultLine(index, batch_item_id(batch_id, index), CANCELLED).encode()


@dataclass(frozen=True)
class ResultsPage:
    # Lines of items start, start+1, ... (None: not finished yet), in item order.
    lines: list[bytes | None]
    total: int
    over: bool


def _unavailable(e: RedisError) -> ServiceUnavailable:
    return ServiceUnavailable(f"batch store unavailable: {e}")


class BatchStore:
    def __init__(self, client: aioredis.Redis, keys: Keys, settings: AsyncSettings) -> None:
        self._r = client
        self._keys = keys
        self._settings = settings
        self._settle = client.register_script(SETTLE)
        self._cancel = client.register_script(CANCEL)
        self._advance = client.register_script(ADVANCE)
        self._fail = client.register_script(FAIL)

    def _script_keys(self, batch_id: str) -> list[str]:
        k = self._keys
        return [k.batch(batch_id), k.batch_items(batch_id), k.batch_results(batch_id), k.batches]

    def _args(self, batch_id: str, *more: Any) -> list[Any]:
        return [batch_id, time.time(), self._settings.batch_ttl_s, *more]

    # -- the gateway's side ----------------------------------------------------------------

    async def create(
        self,
        function: str,
        qualifier: str,
        items: AsyncIterator[bytes],
        max_concurrency: int,
        max_retries: int,
        max_event_age_s: int,
        owner: str = "",
    ) -> BatchInfo:
        """Store every item, then the batch; all or nothing: on any error (a bad item,
        the client gone, Redis) what was staged is deleted and the error raised."""
        batch_id = "b-" + uuid.uuid4().hex
        items_key = self._keys.batch_items(batch_id)
        total = 0
        chunk: list[bytes] = []
        size = 0
        stored = 0
        # One chunk is written while the next is parsed: Redis works on its own core.
        writing: asyncio.Task[None] | None = None
        try:
            async for item in items:
                chunk.append(item)
                size += len(item)
                stored += len(item)
                if stored > self._settings.batch_max_bytes:
                    # Redis holds every item until it is fed: a bound keeps one batch
                    # from filling its memory.
                    raise RequestTooLarge(
                        f"the batch's items exceed {self._settings.batch_max_bytes} bytes in all "
                        f"(IMAGEFN_BATCH_MAX_BYTES) at item {total + len(chunk) - 1}; "
                        "split it into several batches"
                    )
                if len(chunk) >= STAGE_ITEMS or size >= STAGE_BYTES:
                    if writing is not None:
                        await writing
                    writing = asyncio.create_task(self._stage(items_key, chunk))
                    total += len(chunk)
                    chunk, size = [], 0
            if writing is not None:
                await writing
                writing = None
            if chunk:
                await self._stage(items_key, chunk)
                total += len(chunk)
            if total == 0:
                raise InvalidRequest("the batch has no items", details={"item": 0, "line": 1})
            meta = BatchMeta(
                function,
                qualifier,
                max_concurrency,
                max_retries,
                max_event_age_s,
                time.time(),
                owner,
            )
            await self._commit(batch_id, meta, total)
        except BaseException:
            if writing is not None:
                # Let the last push land first, so the delete comes after it.
                with contextlib.suppress(BaseException):
                    await writing
            with contextlib.suppress(RedisError):
                await self._r.delete(items_key)
            raise
        return BatchInfo(batch_id, function, qualifier, total, meta.created_at)

    async def _stage(self, key: str, chunk: list[bytes]) -> None:
        try:
            async with self._r.pipeline(transaction=False) as pipe:
                pipe.rpush(key, *chunk)
                pipe.expire(key, STAGING_TTL_S)
                await pipe.execute()
        except RedisError as e:
            raise _unavailable(e) from e

    async def _commit(self, batch_id: str, meta: BatchMeta, total: int) -> None:
        k = self._keys
        try:
            async with self._r.pipeline(transaction=True) as pipe:
                pipe.hset(
                    k.batch(batch_id),
                    mapping={
                        "meta": meta.to_json(),
                        "total": total,
                        "fed": 0,
                        "succeeded": 0,
                        "failed": 0,
                        "cancelled": 0,
                        "state": RUNNING,
                    },
                )
                pipe.persist(k.batch_items(batch_id))
                pipe.zadd(k.batches, {batch_id: meta.created_at})
                await pipe.execute()
        except RedisError as e:
            raise _unavailable(e) from e

    async def progress(self, batch_id: str) -> BatchProgress:
        found = (await self.progress_many([batch_id]))[0]
        if found is None:
            raise BatchNotFound(
                f"no batch {batch_id!r} (unknown, or finished longer than "
                f"{self._settings.batch_ttl_s} s ago)"
            )
        return found

    async def status(self, batch_id: str) -> dict[str, Any]:
        return status_doc(await self.progress(batch_id), time.time())

    async def results(self, batch_id: str, start: int, count: int) -> ResultsPage:
        """The lines of items [start, start+count) that exist, in item order."""
        p = await self.progress(batch_id)
        stop = min(p.total, start + count)
        if stop <= start:
            return ResultsPage([], p.total, p.over)
        try:
            raw = await self._r.hmget(
                self._keys.batch_results(batch_id), [str(i) for i in range(start, stop)]
            )
        except RedisError as e:
            raise _unavailable(e) from e
        lines: list[bytes | None] = [None if v is None else _bytes(v) for v in raw]
        if p.state == CANCELLED and p.fed_at_cancel is not None:
            for i in range(max(start, p.fed_at_cancel), stop):
                if lines[i - start] is None:
                    lines[i - start] = cancelled_line(batch_id, i)
        return ResultsPage(lines, p.total, p.over)

    async def cancel(self, batch_id: str) -> dict[str, Any]:
        """Cancel a running batch (a finished one stays as it is); its status after."""
        try:
            got = await self._cancel(keys=self._script_keys(batch_id), args=self._args(batch_id))
        except RedisError as e:
            raise _unavailable(e) from e
        if _text(got) == "gone":
            await self.progress(batch_id)  # raises BatchNotFound
        return await self.status(batch_id)

    # -- the feeder's side ----------------------------------------------------------------

    async def live_ids(self, limit: int) -> list[str]:
        """Batches still to look at, oldest first."""
        try:
            ids = await self._r.zrange(self._keys.batches, 0, limit - 1)
        except RedisError as e:
            raise _unavailable(e) from e
        return [_text(i) for i in ids]

    async def progress_many(self, ids: Sequence[str]) -> list[BatchProgress | None]:
        try:
            async with self._r.pipeline(transaction=False) as pipe:
                for batch_id in ids:
                    pipe.hmget(self._keys.batch(batch_id), list(_FIELDS))
                rows = await pipe.execute()
        except RedisError as e:
            raise _unavailable(e) from e
        return [BatchProgress.parse(i, row) for i, row in zip(ids, rows, strict=True)]

    async def items(self, batch_id: str, start: int, count: int) -> list[bytes]:
        try:
            got = await self._r.lrange(self._keys.batch_items(batch_id), start, start + count - 1)
        except RedisError as e:
            raise _unavailable(e) from e
        return [_bytes(v) for v in got]

    async def advance(self, p: BatchProgress, start: int, count: int) -> bool:
        """Items [start, start+count) are published: move ``fed``. False when the batch
        is not running any more or someone else moved it (stop feeding it)."""
        args = self._args(p.batch_id, start, count, p.meta.created_at)
        try:
            moved = await self._advance(keys=self._script_keys(p.batch_id), args=args)
        except RedisError as e:
            raise _unavailable(e) from e
        return bool(moved)

    async def fail(self, batch_id: str, start: int, stop: int, error: dict[str, Any]) -> int:
        """Items [start, stop) fail without running (their function is gone); how many
        lines were written, -1 when the batch moved meanwhile."""
        args = self._args(batch_id, start, stop, _dumps(error))
        try:
            return int(await self._fail(keys=self._script_keys(batch_id), args=args))
        except RedisError as e:
            raise _unavailable(e) from e

    async def settle(self, batch_id: str) -> str:
        """``finished`` (now expiring), ``gone``, or the state of a batch not finished."""
        try:
            got = await self._settle(keys=self._script_keys(batch_id), args=self._args(batch_id))
        except RedisError as e:
            raise _unavailable(e) from e
        return _text(got)
