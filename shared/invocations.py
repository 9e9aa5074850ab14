"""Invocation records: what happened to each invocation, kept in Redis for ``ttl_s`` so a
user can look it up: ``GET /v1/invocations/{request_id}``.

A record is a hash (``Keys.invocation``): ``meta`` (JSON: function, version, qualifier,
mode, kind, batch, index, created_at), ``state``, ``done`` (attempts finished), one field
``a:{n}`` per attempt (JSON: times, status, error, timings, worker, instance, cold),
``next_at`` while a retry waits, ``reason`` once given up, ``duplicates`` (deliveries
dropped by the fence), ``updated_at``.

Synchronous calls: the worker writes the whole record in one round trip after the result
is delivered, so the caller never waits for it.

Asynchronous calls go through three scripts, each one round trip and atomic:

* ``accept`` (gateway) creates the record ``accepting`` unless one exists (the same
  request id sent again is not enqueued twice), and ``queued`` marks it once published;
  a record left ``accepting`` by a gateway that died before publishing is taken over by
  the caller's next try after ``ACCEPT_STALE_S``;
* ``begin`` (worker) is the attempt fence: a delivery of an attempt that is already
  finished (a redelivery, a retry released twice) is a duplicate and does not run; a
  batch item whose batch was cancelled ends ``cancelled`` instead of running;
* ``finish`` (worker) writes the attempt, the new state, the result, the batch's counters
  and result line, and the destination outbox entry, fenced on ``done < attempt``: so
  each of those happens exactly once per attempt, however often a delivery is repeated.
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
import structlog

from shared.autopipe import AutoPipeline
from shared.errors import InvocationNotFound
from shared.keys import Keys
from shared.messages import BatchResultLine, Invocation, InvocationResult
from shared.retry import CANCELLED, failure_summary

log = structlog.get_logger("imagefn.invocations")

# KEYS: record. ARGV: meta, now, ttl, stale after (s), owner. "conflict": the request id
# is another caller's; "new": created ("accepting");
# "duplicate": accepted before; "busy": another call is accepting it right now.
# A record left "accepting" longer than the stale time belongs to a gateway that died
# before it could publish: the event was never accepted, so it is taken over.
_ACCEPT = """
local state = redis.call('HGET', KEYS[1], 'state')
if state then
  local owner = redis.call('HGET', KEYS[1], 'owner') or ''
  if owner ~= ARGV[5] then return 'conflict' end
  if state ~= 'accepting' then return 'duplicate' end
  local since = tonumber(redis.call('HGET', KEYS[1], 'updated_at') or '0')
  if tonumber(ARGV[2]) - since < tonumber(ARGV[4]) then return 'busy' end
end
redis.call('HSET', KEYS[1], 'meta', ARGV[1], 'state', 'accepting', 'done', 0,
  'created_at', ARGV[2], 'updated_at', ARGV[2], 'owner', ARGV[5])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 'new'
"""

# KEYS: record. ARGV: owner, ttl, then field/value pairs. A finished synchronous call;
# nothing is written over another caller's record of the same request id.
_RECORD = """
local owner = redis.call('HGET', KEYS[1], 'owner')
if owner and owner ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'owner', ARGV[1], unpack(ARGV, 3))
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"""

# KEYS: record. ARGV: now. Published: "queued", unless a worker has begun it already.
_QUEUED = """
if redis.call('HGET', KEYS[1], 'state') == 'accepting' then
  redis.call('HSET', KEYS[1], 'state', 'queued', 'updated_at', ARGV[1])
end
return 1
"""

# KEYS: record, batch, batch results. ARGV: attempt, meta, now, ttl, worker, in batch
# ("1"/"0"), item index, cancelled line, owner (set once, when the record has none).
# Returns "run", "duplicate" or "cancelled".
_BEGIN = """
local n = tonumber(ARGV[1])
local done = tonumber(redis.call('HGET', KEYS[1], 'done') or '0')
local state = redis.call('HGET', KEYS[1], 'state')
if done >= n or state == 'succeeded' or state == 'dead-lettered' or state == 'expired'
   or state == 'cancelled' then
  redis.call('HINCRBY', KEYS[1], 'duplicates', 1)
  return 'duplicate'
end
redis.call('HSETNX', KEYS[1], 'meta', ARGV[2])
redis.call('HSETNX', KEYS[1], 'created_at', ARGV[3])
if ARGV[9] and ARGV[9] ~= '' then redis.call('HSETNX', KEYS[1], 'owner', ARGV[9]) end
-- An item of a cancelled batch that never finished ends cancelled; one that has its
-- line already (dead-lettered, now redriven) runs: the user asked for it by name.
if ARGV[6] == '1' and redis.call('HGET', KEYS[2], 'state') == 'cancelled'
   and redis.call('HEXISTS', KEYS[3], ARGV[7]) == 0 then
  redis.call('HSET', KEYS[1], 'state', 'cancelled', 'reason', 'the batch was cancelled',
    'updated_at', ARGV[3])
  redis.call('EXPIRE', KEYS[1], ARGV[4])
  if redis.call('HSETNX', KEYS[3], ARGV[7], ARGV[8]) == 1 then
    redis.call('HINCRBY', KEYS[2], 'cancelled', 1)
    local b = redis.call('HMGET', KEYS[2], 'total', 'succeeded', 'failed', 'cancelled')
    if tonumber(b[2] or '0') + tonumber(b[3] or '0') + tonumber(b[4] or '0')
       >= tonumber(b[1] or '0') then
      redis.call('HSETNX', KEYS[2], 'finished_at', ARGV[3])
    end
  end
  return 'cancelled'
end
redis.call('HSET', KEYS[1], 'state', 'running', 'updated_at', ARGV[3],
  'running', cjson.encode({attempt = n, started_at = tonumber(ARGV[3]), worker = ARGV[5]}))
redis.call('HDEL', KEYS[1], 'next_at')
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 'run'
"""

# KEYS: record, result, batch, batch results, destinations outbox, dlq, dlq index.
# ARGV: 1 attempt, 2 attempt JSON, 3 state, 4 next_at, 5 reason, 6 now, 7 record ttl,
# 8 result JSON, 9 result ttl, 10 in batch, 11 index, 12 result line, 13 batch counter
# ("succeeded"/"failed"; "" while not terminal), 14 destination JSON, 15 outbox record.
# Returns 1, or 0 when this attempt was already finished (a duplicate).
_FINISH = """
local n = tonumber(ARGV[1])
local done = tonumber(redis.call('HGET', KEYS[1], 'done') or '0')
if done >= n then
  redis.call('HINCRBY', KEYS[1], 'duplicates', 1)
  return 0
end
redis.call('HSET', KEYS[1], 'a:' .. n, ARGV[2], 'done', n, 'state', ARGV[3],
  'updated_at', ARGV[6])
redis.call('HDEL', KEYS[1], 'running')
if ARGV[4] ~= '' then
  redis.call('HSET', KEYS[1], 'next_at', ARGV[4])
else
  redis.call('HDEL', KEYS[1], 'next_at')
end
if ARGV[5] ~= '' then
  redis.call('HSET', KEYS[1], 'reason', ARGV[5])
else
  redis.call('HDEL', KEYS[1], 'reason')
end
redis.call('EXPIRE', KEYS[1], ARGV[7])
if ARGV[8] ~= '' then
  redis.call('SET', KEYS[2], ARGV[8], 'EX', ARGV[9])
end
-- Only while the batch is kept: a redriven item of an expired batch must not create
-- batch keys that would never expire.
if ARGV[10] == '1' and ARGV[13] ~= '' and redis.call('EXISTS', KEYS[3]) == 1 then
  if redis.call('HSETNX', KEYS[4], ARGV[11], ARGV[12]) == 1 then
    redis.call('HINCRBY', KEYS[3], ARGV[13], 1)
    local b = redis.call('HMGET', KEYS[3], 'total', 'succeeded', 'failed', 'cancelled', 'state')
    if tonumber(b[2] or '0') + tonumber(b[3] or '0') + tonumber(b[4] or '0')
       >= tonumber(b[1] or '0') then
      if b[5] == 'running' then redis.call('HSET', KEYS[3], 'state', 'completed') end
      redis.call('HSETNX', KEYS[3], 'finished_at', ARGV[6])
    end
  end
end
if ARGV[14] ~= '' then
  redis.call('XADD', KEYS[5], 'MAXLEN', '~', 100000, '*', 'd', ARGV[14], 'v', ARGV[15])
end
if ARGV[3] == 'succeeded' then
  -- A dead letter parked by a run that crashed before this point is not left behind.
  redis.call('HDEL', KEYS[6], ARGV[16])
  redis.call('ZREM', KEYS[7], ARGV[16])
end
return 1
"""

# KEYS: record. ARGV: now, ttl. A dead-lettered invocation sent through again.
_REQUEUE = """
redis.call('HSET', KEYS[1], 'state', 'queued', 'updated_at', ARGV[1])
redis.call('HDEL', KEYS[1], 'reason', 'next_at', 'running')
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"""


# How long a record may stay "accepting" before a new call with its request id takes it
# over (the gateway that created it died before publishing).
ACCEPT_STALE_S = 30.0


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def meta_of(inv: Invocation) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "request_id": inv.request_id,
        "function": inv.function,
        "version": inv.record.version,
        "qualifier": inv.qualifier if inv.is_async else inv.version,
        "mode": inv.mode,
        "kind": inv.kind,
    }
    if inv.batch:
        meta.update(batch=inv.batch, index=inv.index)
    return meta


def attempt_doc(
    inv: Invocation, result: InvocationResult, started_at: float, finished_at: float
) -> dict[str, Any]:
    # Asynchronous calls count an HTTP answer of 400 or more as a failed attempt (it is
    # retried); a synchronous caller got that answer as it was, so only a platform error
    # makes its attempt a failure.
    if inv.is_async:
        error = failure_summary(result)
    elif result.error is not None:
        error = {"type": str(result.error.get("type")), "message": str(result.error.get("message"))}
    else:
        error = None
    return {
        "attempt": inv.attempt,
        "started_at": started_at,
        "finished_at": finished_at,
        "status": result.status,
        "error": error,
        "timings_ms": {k: round(v * 1000, 3) for k, v in result.timings.items()},
        "worker": result.worker,
        "instance": result.instance,
        "cold_start": result.cold_start,
    }


def result_doc(result: InvocationResult) -> dict[str, Any]:
    """A result as records and batch lines keep it: the body as text when it is UTF-8."""
    ctype = next((v for k, v in result.headers if k.lower() == "content-type"), "")
    doc: dict[str, Any] = {"status": result.status, "content_type": ctype}
    try:
        doc["body"] = result.body.decode()
    except UnicodeDecodeError:
        doc["body_base64"] = base64.b64encode(result.body).decode()
    return doc


def result_value(result: InvocationResult) -> Any:
    """The result as a batch line carries it: parsed JSON when it is JSON, else text."""
    try:
        return json.loads(result.body)
    except ValueError:
        return result.body.decode("utf-8", "replace")


@dataclass(frozen=True)
class Outcome:
    """What ``finish`` writes for one attempt (see the module text)."""

    attempt: dict[str, Any]
    state: str
    next_at: float | None = None
    reason: str = ""
    result: dict[str, Any] | None = None
    # Terminal outcomes of batch items: "succeeded" or "failed", and the item's line.
    batch_counter: str = ""
    batch_line: BatchResultLine | None = None
    # Terminal outcomes with a destination: where to, and the record to send.
    destination: dict[str, Any] | None = None
    destination_record: dict[str, Any] | None = None


class InvocationLog:
    def __init__(
        self, client: aioredis.Redis, keys: Keys, ttl_s: int, result_ttl_s: int = 86400
    ) -> None:
        self._r = client
        self._keys = keys
        self._ttl_s = ttl_s
        self._result_ttl_s = result_ttl_s
        # begin and finish come from every invocation a worker runs at once: pipelined.
        self._pipe = AutoPipeline(client)
        self._accept = client.register_script(_ACCEPT)
        self._record = client.register_script(_RECORD)
        self._queued = client.register_script(_QUEUED)
        self._begin = client.register_script(_BEGIN)
        self._finish = client.register_script(_FINISH)
        self._requeue = client.register_script(_REQUEUE)

    async def record(self, inv: Invocation, result: InvocationResult) -> None:
        """A finished synchronous invocation, in one round trip."""
        now = time.time()
        doc = attempt_doc(inv, result, inv.enqueued_at, now)
        state = "succeeded" if doc["error"] is None else "failed"
        fields = {
            "meta": _dumps(meta_of(inv)),
            "state": state,
            "done": 1,
            "a:1": _dumps(doc),
            "created_at": inv.enqueued_at,
            "updated_at": now,
        }
        pairs: list[Any] = [x for kv in fields.items() for x in kv]
        # Auto-pipelined (issue 12): the records of invocations a worker finishes in the
        # same pass of its loop share one round trip instead of one each.
        written = await self._pipe.script(
            self._record, [self._keys.invocation(inv.request_id)], [inv.owner, self._ttl_s, *pairs]
        )
        if not written:
            log.warning("record_owned_by_another_caller", request_id=inv.request_id)

    async def accept(self, inv: Invocation) -> str:
        """Start accepting an async invocation: "new", "duplicate", "busy", or "conflict"
        (the request id is another caller's)."""
        got = await self._accept(
            keys=[self._keys.invocation(inv.request_id)],
            args=[_dumps(meta_of(inv)), time.time(), self._ttl_s, ACCEPT_STALE_S, inv.owner],
        )
        return got.decode() if isinstance(got, bytes) else str(got)

    async def queued(self, request_id: str) -> None:
        """The accepted invocation is in the queue."""
        await self._queued(keys=[self._keys.invocation(request_id)], args=[time.time()])

    async def begin(self, inv: Invocation, worker: str) -> str:
        """The attempt fence: "run", "duplicate" or "cancelled" (see the module text)."""
        line = BatchResultLine(inv.index, inv.request_id, CANCELLED)
        got = await self._pipe.script(
            self._begin,
            [
                self._keys.invocation(inv.request_id),
                self._keys.batch(inv.batch),
                self._keys.batch_results(inv.batch),
            ],
            args=[
                inv.attempt,
                _dumps(meta_of(inv)),
                time.time(),
                self._ttl_s,
                worker,
                "1" if inv.batch else "0",
                inv.index,
                line.encode(),
                inv.owner,
            ],
        )
        return got.decode() if isinstance(got, bytes) else str(got)

    async def finish(self, inv: Invocation, outcome: Outcome) -> bool:
        """Write one attempt's outcome; False when that attempt was already finished."""
        done = await self._pipe.script(
            self._finish,
            [
                self._keys.invocation(inv.request_id),
                self._keys.result(inv.request_id),
                self._keys.batch(inv.batch),
                self._keys.batch_results(inv.batch),
                self._keys.destinations,
                self._keys.dlq(inv.function),
                self._keys.dlq_index(inv.function),
            ],
            args=[
                inv.attempt,
                _dumps(outcome.attempt),
                outcome.state,
                "" if outcome.next_at is None else outcome.next_at,
                outcome.reason,
                time.time(),
                self._ttl_s,
                "" if outcome.result is None else _dumps(outcome.result),
                self._result_ttl_s,
                "1" if inv.batch else "0",
                inv.index,
                b"" if outcome.batch_line is None else outcome.batch_line.encode(),
                outcome.batch_counter,
                "" if outcome.destination is None else _dumps(outcome.destination),
                "" if outcome.destination_record is None else _dumps(outcome.destination_record),
                inv.request_id,
            ],
        )
        return bool(done)

    async def forget(self, request_id: str) -> None:
        """Drop the record of an invocation that was not accepted after all."""
        await self._r.delete(self._keys.invocation(request_id))

    async def requeue(self, request_id: str) -> None:
        """A redriven invocation is ``queued`` again; its earlier attempts stay."""
        await self._requeue(
            keys=[self._keys.invocation(request_id)], args=[time.time(), self._ttl_s]
        )

    async def done_count(self, request_id: str) -> int:
        raw = await self._r.hget(self._keys.invocation(request_id), "done")
        return int(raw or 0)

    async def attempts(self, request_id: str) -> list[dict[str, Any]]:
        fields = await self._r.hgetall(self._keys.invocation(request_id))
        return _attempts(_text_fields(fields))

    async def get(self, request_id: str) -> dict[str, Any]:
        async with self._r.pipeline(transaction=False) as pipe:
            pipe.hgetall(self._keys.invocation(request_id))
            pipe.get(self._keys.result(request_id))
            raw, result = await pipe.execute()
        if not raw:
            raise record_not_found(request_id)
        return document(request_id, _text_fields(raw), result)


def record_not_found(request_id: str) -> InvocationNotFound:
    return InvocationNotFound(
        f"no record of invocation {request_id!r} (unknown, or older than the "
        "retention of invocation records)"
    )


def _text_fields(raw: dict[Any, Any]) -> dict[str, str]:
    return {
        (k.decode() if isinstance(k, bytes) else str(k)): (
            v.decode() if isinstance(v, bytes) else str(v)
        )
        for k, v in raw.items()
    }


def _attempts(fields: dict[str, str]) -> list[dict[str, Any]]:
    found = [
        (int(k[2:]), json.loads(v))
        for k, v in fields.items()
        if k.startswith("a:") and k[2:].isdigit()
    ]
    return [doc for _, doc in sorted(found, key=lambda item: item[0])]


def document(request_id: str, fields: dict[str, str], result: bytes | None) -> dict[str, Any]:
    """The record as ``GET /v1/invocations/{id}`` shows it. The last attempt's status,
    error type, instance, worker, cold start and timings also stand at the top level."""
    meta: dict[str, Any] = json.loads(fields.get("meta", "{}"))
    attempts = _attempts(fields)
    last = attempts[-1] if attempts else {}
    doc: dict[str, Any] = {
        "request_id": request_id,
        "function": meta.get("function"),
        "version": meta.get("version"),
        "qualifier": meta.get("qualifier"),
        "mode": meta.get("mode", "sync"),
        "state": fields.get("state"),
        "status": last.get("status"),
        "error": (last.get("error") or {}).get("type"),
        "cold_start": last.get("cold_start"),
        "instance": last.get("instance"),
        "worker": last.get("worker"),
        "timings_ms": last.get("timings_ms", {}),
        "attempts": attempts,
        "duplicates": int(fields.get("duplicates", 0)),
        "created_at": float(fields.get("created_at", 0) or 0),
        "updated_at": float(fields.get("updated_at", 0) or 0),
        "owner": fields.get("owner", ""),
    }
    if "batch" in meta:
        doc.update(batch=meta["batch"], index=meta.get("index"))
    if "next_at" in fields:
        doc["next_attempt_at"] = float(fields["next_at"])
    if "reason" in fields:
        doc["reason"] = fields["reason"]
    if "running" in fields:
        doc["running"] = json.loads(fields["running"])
    if result is not None:
        doc["result"] = json.loads(result)
    return doc
