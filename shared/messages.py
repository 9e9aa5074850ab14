"""Wire formats that cross processes: an invocation and its result (through the queue), a
worker's heartbeat (through ``shared.liveness``) and the cold-start manager's control
command (through a worker's control stream). Each has exactly one encoder and one decoder,
here; nobody else builds or parses them.

An invocation and its result travel as fields: ``m`` (JSON metadata), ``b`` (the raw body
bytes, so bodies of any content type cross unchanged and are never base64-inflated) and,
for an invocation, ``r`` (the function record's JSON, parsed once per distinct record on
the receiving side). The metadata of invocations and results, which every call encodes
and decodes twice, goes through ``orjson`` (several times faster than ``json`` on these
small documents; issue 12); the rarer messages keep the standard library.

Decoders of the heartbeat and the control command tolerate missing optional fields (an
older process in a rolling upgrade sends fewer) and raise ``MalformedMessage``, a
``ValueError``, on anything else, so readers skip what they cannot decode.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from shared.errors import ImagefnError, error_from_dict
from shared.spec import FunctionRecord

Headers = list[tuple[str, str]]


@dataclass(frozen=True)
class Invocation:
    request_id: str
    record: FunctionRecord
    # "event" → POST /event-invoke; "web" → the caller's own request, forwarded.
    kind: str
    method: str = "POST"
    path: str = "/event-invoke"
    query: str = ""
    headers: Headers = field(default_factory=list)
    body: bytes = b""
    # Wall-clock time after which nobody waits for the result any more.
    deadline: float = 0.0
    enqueued_at: float = field(default_factory=time.time)
    # Where the result goes back to (the waiting gateway's reply channel).
    reply_to: str = ""
    # Set by the queue for a waiting caller: matches the result to exactly this call, even
    # when two callers chose the same request id.
    call_id: str = ""
    version: str = "$LATEST"
    # -- asynchronous invocations (docs/architecture.md, section 15) ----------------------
    # "sync": a caller waits on reply_to; "async": nobody waits, the worker records the
    # outcome, retries or dead-letters it.
    mode: str = "sync"
    # Which asynchronous attempt this is (1 = the first run; retries count up).
    attempt: int = 1
    # When the event was first accepted: max_event_age_s counts from here (0: enqueued_at).
    accepted_at: float = 0.0
    # Platform retries so far (throttled, platform failures): they grow the backoff but
    # do not use up max_retries.
    throttles: int = 0
    # User-code failures retried so far (counted against the retry limit; a redrive
    # starts again from 0).
    retries: int = 0
    # The batch the invocation is an item of, and its index there ("" and -1: none).
    batch: str = ""
    index: int = -1
    # Overrides of the function's async policy (a batch may set them): -1 / 0 = the spec's.
    max_retries: int = -1
    max_event_age_s: int = 0
    # What the caller named ($LATEST, a version or an alias): a redrive resolves it again.
    qualifier: str = "$LATEST"
    # The API key id of the caller: only it (or an admin) reads the invocation's record,
    # and a record never changes owner (another caller's same request id writes nothing).
    owner: str = ""

    @property
    def function(self) -> str:
        return self.record.spec.name

    @property
    def is_async(self) -> bool:
        return self.mode == "async"

    @property
    def first_accepted_at(self) -> float:
        return self.accepted_at or self.enqueued_at

    @property
    def retry_limit(self) -> int:
        if self.max_retries >= 0:
            return self.max_retries
        return self.record.spec.async_policy.max_retries

    @property
    def age_limit_s(self) -> int:
        return self.max_event_age_s or self.record.spec.async_policy.max_event_age_s

    def encode(self) -> dict[str, bytes]:
        meta = {
            "request_id": self.request_id,
            "kind": self.kind,
            "method": self.method,
            "path": self.path,
            "query": self.query,
            "headers": self.headers,
            "deadline": self.deadline,
            "enqueued_at": self.enqueued_at,
            "reply_to": self.reply_to,
            "call_id": self.call_id,
            "version": self.version,
        }
        if self.owner:
            meta["owner"] = self.owner
        if self.mode != "sync":
            # Only asynchronous invocations carry these: the synchronous hot path keeps
            # its metadata as small as before.
            meta.update(
                mode=self.mode,
                attempt=self.attempt,
                accepted_at=self.accepted_at,
                throttles=self.throttles,
                retries=self.retries,
                batch=self.batch,
                index=self.index,
                max_retries=self.max_retries,
                max_event_age_s=self.max_event_age_s,
                qualifier=self.qualifier,
            )
        return {
            "m": orjson.dumps(meta),
            "r": self.record.json_bytes,
            "b": self.body,
        }

    @classmethod
    def decode(cls, fields: dict[bytes, bytes]) -> Invocation:
        meta = orjson.loads(fields[b"m"])
        return cls(
            request_id=meta["request_id"],
            record=FunctionRecord.from_json(fields[b"r"]),
            kind=meta["kind"],
            method=meta["method"],
            path=meta["path"],
            query=meta["query"],
            headers=[(str(k), str(v)) for k, v in meta["headers"]],
            body=fields.get(b"b", b""),
            deadline=float(meta["deadline"]),
            enqueued_at=float(meta["enqueued_at"]),
            reply_to=meta["reply_to"],
            call_id=meta.get("call_id", ""),
            version=meta.get("version", "$LATEST"),
            mode=str(meta.get("mode", "sync")),
            attempt=int(meta.get("attempt", 1)),
            accepted_at=float(meta.get("accepted_at", 0.0)),
            throttles=int(meta.get("throttles", 0)),
            retries=int(meta.get("retries", 0)),
            batch=str(meta.get("batch", "")),
            index=int(meta.get("index", -1)),
            max_retries=int(meta.get("max_retries", -1)),
            max_event_age_s=int(meta.get("max_event_age_s", 0)),
            qualifier=str(meta.get("qualifier", "$LATEST")),
            owner=str(meta.get("owner", "")),
        )


@dataclass(frozen=True)
class InvocationResult:
    request_id: str
    status: int = 200
    headers: Headers = field(default_factory=list)
    body: bytes = b""
    # Set when the platform (not the function's HTTP answer) decides the outcome.
    error: dict[str, Any] | None = None
    instance: str = ""
    worker: str = ""
    cold_start: bool = False
    # Seconds spent in each phase (queue, create, start, ready, run, ...).
    timings: dict[str, float] = field(default_factory=dict)

    @classmethod
    def failure(cls, request_id: str, err: ImagefnError, **kw: Any) -> InvocationResult:
        return cls(request_id=request_id, status=err.http_status, error=err.to_dict(), **kw)

    def raise_for_error(self) -> None:
        if self.error is not None:
            raise error_from_dict(self.error)

    def encode(self) -> dict[str, bytes]:
        meta = {
            "request_id": self.request_id,
            "status": self.status,
            "headers": self.headers,
            "error": self.error,
            "instance": self.instance,
            "worker": self.worker,
            "cold_start": self.cold_start,
            "timings": self.timings,
        }
        return {"m": orjson.dumps(meta), "b": self.body}

    @classmethod
    def decode(cls, fields: dict[bytes, bytes]) -> InvocationResult:
        meta = orjson.loads(fields[b"m"])
        return cls(
            request_id=meta["request_id"],
            status=int(meta["status"]),
            headers=[(str(k), str(v)) for k, v in meta["headers"]],
            body=fields.get(b"b", b""),
            error=meta.get("error"),
            instance=meta.get("instance", ""),
            worker=meta.get("worker", ""),
            cold_start=bool(meta.get("cold_start", False)),
            timings={str(k): float(v) for k, v in meta.get("timings", {}).items()},
        )


class MalformedMessage(ValueError):
    """A heartbeat or control command that cannot be decoded (garbage, or a required
    field missing): its reader skips it rather than act on a guess."""


def _json_object(raw: bytes | str, what: str) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except (ValueError, TypeError) as e:  # ValueError covers bytes that are not UTF-8
        raise MalformedMessage(f"undecodable {what}: {e}") from e
    if not isinstance(value, dict):
        raise MalformedMessage(f"undecodable {what}: not a JSON object")
    return value


def _counts(value: Any) -> dict[str, int]:
    return {str(k): int(n) for k, n in value.items()}


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


@dataclass(frozen=True)
class Heartbeat:
    """A worker's inventory, stored with a TTL every ``heartbeat_s`` (``shared.liveness``):
    the cold-start manager plans provisioning with it, gateways route by it."""

    worker: str
    # "name@version" → instances by state ("ready", "busy", "paused", "starting") and how
    # many of them are provisioned.
    functions: dict[str, dict[str, int]] = field(default_factory=dict)
    # A draining worker reads nothing new: it reports no instances and gets no routing.
    draining: bool = False
    # None: not reported (an older worker's plain heartbeat). The manager cannot place
    # instances on such a worker, so it sends it no commands.
    memory_capacity_mb: int | None = None
    memory_used_mb: int | None = None
    # The worker's CPU cores (None: not reported, an older worker): gateways refuse a
    # spec asking for more than any worker has.
    cpus_capacity: int | None = None
    # The provisioning targets the worker last applied: the manager resends its command
    # while they disagree with its plan.
    desired: dict[str, int] = field(default_factory=dict)
    # How the worker reads the queue (Kafka: its partitions; JSON-able), for routing.
    # None: not reported, which the router tells apart from an empty report.
    queue: dict[str, Any] | None = None
    ts: float = field(default_factory=time.time)

    def encode(self) -> str:
        # Key order and separators as the worker wrote them before this codec existed.
        meta: dict[str, Any] = {"worker": self.worker, "ts": self.ts, "draining": self.draining}
        if self.memory_capacity_mb is not None:
            meta["memory_capacity_mb"] = self.memory_capacity_mb
        if self.memory_used_mb is not None:
            meta["memory_used_mb"] = self.memory_used_mb
        if self.cpus_capacity is not None:
            meta["cpus_capacity"] = self.cpus_capacity
        meta["functions"] = self.functions
        meta["desired"] = self.desired
        if self.queue is not None:
            meta["queue"] = self.queue
        return json.dumps(meta, separators=(",", ":"))

    @classmethod
    def decode(cls, raw: bytes | str) -> Heartbeat:
        meta = _json_object(raw, "heartbeat")
        try:
            queue = meta.get("queue")
            return cls(
                worker=str(meta["worker"]),
                functions={str(k): _counts(v) for k, v in meta["functions"].items()},
                draining=bool(meta.get("draining", False)),
                memory_capacity_mb=_optional_int(meta.get("memory_capacity_mb")),
                memory_used_mb=_optional_int(meta.get("memory_used_mb")),
                cpus_capacity=_optional_int(meta.get("cpus_capacity")),
                desired=_counts(meta.get("desired", {})),
                # Anything but an object counts as no report, as the router always read it.
                queue=queue if isinstance(queue, dict) else None,
                ts=float(meta.get("ts", 0.0)),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise MalformedMessage(f"undecodable heartbeat: {e!r}") from e


@dataclass(frozen=True)
class ControlCommand:
    """The cold-start manager's full desired state for one worker, on the worker's control
    stream. Each command replaces the previous one, so a lost one is healed by the next."""

    # "name@version" → provisioned instances to keep ready on this worker.
    targets: dict[str, int] = field(default_factory=dict)
    # Images to pull ahead of any cold start (the newest deployed functions').
    images: list[str] = field(default_factory=list)

    def encode(self) -> dict[str, bytes]:
        return {
            "targets": json.dumps(self.targets, sort_keys=True).encode(),
            "images": json.dumps(self.images).encode(),
        }

    @classmethod
    def decode(cls, fields: dict[bytes, bytes]) -> ControlCommand:
        try:
            targets = _counts(json.loads(fields[b"targets"]))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise MalformedMessage(f"undecodable control command: {e!r}") from e
        # The images are only a hint (a cold start pulls what is missing anyway): a command
        # without them (an older manager's) or with garbled ones still sets the targets.
        try:
            loaded = json.loads(fields.get(b"images", b"[]"))
        except (ValueError, TypeError):
            loaded = []
        images = [str(ref) for ref in loaded] if isinstance(loaded, list) else []
        return cls(targets=targets, images=images)


def batch_item_id(batch_id: str, index: int) -> str:
    """The request id of a batch's item: the batch's id and the item's index."""
    return f"{batch_id}-{index}"


@dataclass(frozen=True)
class BatchResultLine:
    """One item's outcome in a batch: the value of ``{p}:batch:{id}:results`` at its
    index (written by the worker's scripts) and, unchanged, its line in
    ``GET /v1/batches/{id}/results``."""

    index: int
    request_id: str
    # "succeeded", "failed" or "cancelled".
    status: str
    # A success's answer (JSON when it parses, else text); a failure's error
    # (type, message, reason).
    result: Any = None
    error: dict[str, Any] | None = None

    def encode(self) -> bytes:
        doc: dict[str, Any] = {
            "index": self.index,
            "request_id": self.request_id,
            "status": self.status,
        }
        if self.status == "succeeded":
            doc["result"] = self.result
        if self.error is not None:
            doc["error"] = self.error
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes | str) -> BatchResultLine:
        doc = _json_object(raw, "batch result line")
        try:
            return cls(
                index=int(doc["index"]),
                request_id=str(doc["request_id"]),
                status=str(doc["status"]),
                result=doc.get("result"),
                error=doc.get("error"),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise MalformedMessage(f"batch result line: {e}") from e
