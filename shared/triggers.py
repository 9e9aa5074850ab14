"""Triggers: what starts a function besides a caller — a timer, a Kafka topic, uploads to
an object store. A trigger belongs to one function, has a name unique within it, names
the qualifier it invokes, and can be disabled without being deleted.

This module holds the model and its strict validation (every bad field named, as specs
are) and the Redis store shared by gateways (the API) and trigger runners
(``workers/triggers.py``), including each trigger's observed state (last fired, next fire
time, errors, lag).
"""

from __future__ import annotations

import datetime
import json
import re
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import redis.asyncio as aioredis
from croniter import croniter
from redis.exceptions import RedisError

from shared.errors import InvalidRequest, ServiceUnavailable, TriggerNotFound
from shared.keys import Keys
from shared.registry import ALIAS_RE, LATEST

TRIGGER_TYPES = ("timer", "kafka", "cos")
# The types a trigger runner runs today; the others are refused at creation rather than
# accepted and never fired (their configuration is already checked in full).
RUNNABLE_TYPES = ("timer", "kafka", "cos")
TRIGGER_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,59}\Z")
CATCH_UP = ("skip", "once")
MAX_PAYLOAD_BYTES = 4096
KAFKA_TOPIC_RE = re.compile(r"^[A-Za-z0-9._-]{1,249}\Z")
KAFKA_RANGES = {
    "batch_size": (1, 1000),
    "batch_window_ms": (0, 300_000),
    "max_retries": (0, 10),
    "max_parallel": (1, 100),
}
COS_EVENTS = ("created", "removed")
BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]\Z")


def _cron_fields(expr: str) -> list[str]:
    return expr.split()


def check_cron(expr: Any) -> str | None:
    """None when ``expr`` is a cron expression with a seconds field (SCF's form:
    ``sec min hour day month weekday [year]``), else what is wrong."""
    if not isinstance(expr, str) or not expr.strip():
        return "required: a cron expression with seconds, e.g. '*/5 * * * * *'"
    fields = _cron_fields(expr)
    if len(fields) not in (6, 7):
        return (
            f"{expr!r} has {len(fields)} fields; a timer takes 6 or 7: "
            "second minute hour day month weekday [year]"
        )
    try:
        next_fire(expr, time.time())
    except (ValueError, KeyError) as e:
        return f"{expr!r} is not a valid cron expression: {e}"
    return None


def next_fire(expr: str, after: float) -> float:
    """The first tick of ``expr`` strictly after ``after`` (Unix time, UTC)."""
    fields = _cron_fields(expr)
    # croniter takes the seconds field last; SCF writes it first.
    reordered = " ".join([*fields[1:6], fields[0], *fields[6:]])
    start = datetime.datetime.fromtimestamp(after, datetime.UTC)
    it = croniter(reordered, start)
    return float(it.get_next(float))


def prev_fire(expr: str, at: float) -> float:
    """The last tick of ``expr`` at or before ``at``."""
    fields = _cron_fields(expr)
    reordered = " ".join([*fields[1:6], fields[0], *fields[6:]])
    start = datetime.datetime.fromtimestamp(at + 0.001, datetime.UTC)
    return float(croniter(reordered, start).get_prev(float))


@dataclass(frozen=True)
class Trigger:
    function: str
    name: str
    type: str
    qualifier: str = LATEST
    enabled: bool = True
    config: dict[str, Any] = field(default_factory=dict)
    created_at: float = 0.0
    updated_at: float = 0.0

    @property
    def id(self) -> str:
        return f"{self.function}/{self.name}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: bytes | str) -> Trigger:
        return cls(**json.loads(raw))


def _int_in(value: Any, low: int, high: int) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        return None
    return value


def _timer_config(doc: dict[str, Any], errors: dict[str, str]) -> dict[str, Any]:
    cron = doc.get("cron")
    problem = check_cron(cron)
    if problem:
        errors["cron"] = problem
    payload = doc.get("payload", "")
    if not isinstance(payload, str) or len(payload.encode()) > MAX_PAYLOAD_BYTES:
        errors["payload"] = f"a string of at most {MAX_PAYLOAD_BYTES} bytes (the event's Message)"
    catch_up = doc.get("catch_up", "skip")
    if catch_up not in CATCH_UP:
        errors["catch_up"] = "'skip' (ticks missed while no runner ran are dropped) or 'once'"
    return {"cron": cron, "payload": payload, "catch_up": catch_up}


def _kafka_config(doc: dict[str, Any], errors: dict[str, str]) -> dict[str, Any]:
    topic = doc.get("topic")
    if not isinstance(topic, str) or not KAFKA_TOPIC_RE.match(topic):
        errors["topic"] = "required: a Kafka topic name (1-249 of A-Za-z0-9._-)"
    bootstrap = doc.get("bootstrap", "")
    if not isinstance(bootstrap, str) or any(c.isspace() for c in bootstrap):
        errors["bootstrap"] = "host:port[,host:port...] of the brokers ('' = the platform's)"
    out: dict[str, Any] = {"topic": topic, "bootstrap": bootstrap}
    defaults = {"batch_size": 10, "batch_window_ms": 500, "max_retries": 2, "max_parallel": 4}
    for key, (low, high) in KAFKA_RANGES.items():
        value = doc.get(key, defaults[key])
        if _int_in(value, low, high) is None:
            errors[key] = f"a whole number from {low} to {high}"
        out[key] = value
    start = doc.get("start", "latest")
    if start not in ("earliest", "latest") and _int_in(start, 0, 2**53) is None:
        errors["start"] = "'earliest', 'latest', or a timestamp in milliseconds"
    out["start"] = start
    on_failure = doc.get("on_failure", "error_topic")
    if on_failure not in ("error_topic", "skip"):
        errors["on_failure"] = "'error_topic' (the failed batch goes there) or 'skip'"
    out["on_failure"] = on_failure
    error_topic = doc.get("error_topic", "")
    if not isinstance(error_topic, str) or (error_topic and not KAFKA_TOPIC_RE.match(error_topic)):
        errors["error_topic"] = "a Kafka topic name ('' = '<topic>.imagefn-errors')"
    out["error_topic"] = error_topic
    bisect = doc.get("bisect", False)
    if not isinstance(bisect, bool):
        errors["bisect"] = "true or false"
    out["bisect"] = bisect
    return out


def _cos_config(doc: dict[str, Any], errors: dict[str, str]) -> dict[str, Any]:
    bucket = doc.get("bucket")
    if not isinstance(bucket, str) or not BUCKET_RE.match(bucket):
        errors["bucket"] = "required: a bucket name (3-63 of a-z, 0-9, '.', '-')"
    events = doc.get("events", ["created"])
    if not isinstance(events, list) or not events or any(e not in COS_EVENTS for e in events):
        errors["events"] = "a non-empty list of 'created' and 'removed'"
    out: dict[str, Any] = {"bucket": bucket, "events": events}
    for key in ("prefix", "suffix"):
        value = doc.get(key, "")
        if not isinstance(value, str) or len(value) > 1024:
            errors[key] = "a string of at most 1024 characters"
        out[key] = value
    return out


CONFIG_FIELDS = {
    "timer": frozenset({"cron", "payload", "catch_up"}),
    "kafka": frozenset(
        {"topic", "bootstrap", "start", "on_failure", "error_topic", "bisect", *KAFKA_RANGES}
    ),
    "cos": frozenset({"bucket", "events", "prefix", "suffix"}),
}
COMMON_FIELDS = frozenset({"name", "type", "qualifier", "enabled"})


def parse_trigger(function: str, doc: Any, now: float | None = None) -> Trigger:
    """Validate a trigger document (``{"name", "type", "qualifier"?, "enabled"?, ...the
    type's fields}``); InvalidRequest naming every bad field."""
    if not isinstance(doc, dict):
        raise InvalidRequest("a trigger is a mapping: {name, type, qualifier?, ...}")
    errors: dict[str, str] = {}
    name = doc.get("name")
    if not isinstance(name, str) or not TRIGGER_NAME_RE.match(name):
        errors["name"] = "required: 1-60 of letters, digits, '-' and '_', starting with a letter"
    ttype = doc.get("type")
    if ttype not in TRIGGER_TYPES:
        errors["type"] = f"required: one of {', '.join(TRIGGER_TYPES)}"
    qualifier = doc.get("qualifier", LATEST)
    if not isinstance(qualifier, str) or not (
        qualifier == LATEST or qualifier.isdigit() or ALIAS_RE.match(qualifier)
    ):
        errors["qualifier"] = "$LATEST, a version number or an alias"
    enabled = doc.get("enabled", True)
    if not isinstance(enabled, bool):
        errors["enabled"] = "true or false"
    config: dict[str, Any] = {}
    if ttype in TRIGGER_TYPES:
        for key in doc:
            if key not in COMMON_FIELDS and key not in CONFIG_FIELDS[ttype]:
                errors[str(key)] = f"unknown field for a {ttype} trigger"
        parse = {"timer": _timer_config, "kafka": _kafka_config, "cos": _cos_config}[ttype]
        config = parse(doc, errors)
    if ttype in TRIGGER_TYPES and ttype not in RUNNABLE_TYPES:
        errors.setdefault(
            "type", f"{ttype} triggers are not built yet; available: {', '.join(RUNNABLE_TYPES)}"
        )
    if errors:
        raise InvalidRequest(
            f"invalid trigger: {', '.join(sorted(errors))}", details={"fields": errors}
        )
    now = time.time() if now is None else now
    return Trigger(
        function=function,
        name=str(name),
        type=str(ttype),
        qualifier=str(qualifier),
        enabled=bool(enabled),
        config=config,
        created_at=now,
        updated_at=now,
    )


class TriggerStore:
    """Triggers in Redis: ``{p}:triggers`` (hash: "function/name" → JSON) and each one's
    observed state in ``{p}:trigger-state:{function}/{name}`` (hash)."""

    def __init__(self, client: aioredis.Redis, keys: Keys) -> None:
        self._r = client
        self._keys = keys

    async def put(self, trigger: Trigger) -> tuple[Trigger, bool]:
        """Create or replace; (the stored trigger, created?). A replaced trigger keeps its
        creation time."""
        try:
            old = await self._r.hget(self._keys.triggers, trigger.id)
            if old is not None:
                trigger = replace(trigger, created_at=Trigger.from_json(old).created_at)
            await self._r.hset(self._keys.triggers, trigger.id, trigger.to_json())
        except RedisError as e:
            raise ServiceUnavailable(f"triggers unavailable (Redis): {e}") from e
        return trigger, old is None

    async def get(self, function: str, name: str) -> Trigger:
        try:
            raw = await self._r.hget(self._keys.triggers, f"{function}/{name}")
        except RedisError as e:
            raise ServiceUnavailable(f"triggers unavailable (Redis): {e}") from e
        if raw is None:
            raise TriggerNotFound(f"function {function} has no trigger {name!r}")
        return Trigger.from_json(raw)

    async def list(self, function: str | None = None) -> list[Trigger]:
        try:
            raw = await self._r.hgetall(self._keys.triggers)
        except RedisError as e:
            raise ServiceUnavailable(f"triggers unavailable (Redis): {e}") from e
        found = [Trigger.from_json(v) for v in raw.values()]
        if function is not None:
            found = [t for t in found if t.function == function]
        return sorted(found, key=lambda t: (t.function, t.name))

    async def set_enabled(self, function: str, name: str, enabled: bool) -> Trigger:
        trigger = await self.get(function, name)
        trigger = replace(trigger, enabled=enabled, updated_at=time.time())
        await self.put(trigger)
        return trigger

    async def delete(self, function: str, name: str) -> None:
        try:
            removed = await self._r.hdel(self._keys.triggers, f"{function}/{name}")
            await self._r.delete(self._keys.trigger_state(f"{function}/{name}"))
        except RedisError as e:
            raise ServiceUnavailable(f"triggers unavailable (Redis): {e}") from e
        if not removed:
            raise TriggerNotFound(f"function {function} has no trigger {name!r}")

    async def delete_all(self, function: str) -> int:
        """Every trigger of ``function`` (when the function is deleted)."""
        doomed = [t.id for t in await self.list(function)]
        if doomed:
            async with self._r.pipeline(transaction=True) as pipe:
                pipe.hdel(self._keys.triggers, *doomed)
                pipe.delete(*[self._keys.trigger_state(i) for i in doomed])
                await pipe.execute()
        return len(doomed)

    async def note(self, trigger_id: str, **state: Any) -> None:
        """Record what a runner observed (last_fired_at, next_fire_at, last_error, ...);
        ``errors=1`` counts up."""
        fields: dict[Any, Any] = {k: json.dumps(v) for k, v in state.items() if k != "errors"}
        key = self._keys.trigger_state(trigger_id)
        async with self._r.pipeline(transaction=False) as pipe:
            if fields:
                pipe.hset(key, mapping=fields)
            if state.get("errors"):
                pipe.hincrby(key, "errors", int(state["errors"]))
            await pipe.execute()

    async def state(self, trigger_id: str) -> dict[str, Any]:
        try:
            raw = await self._r.hgetall(self._keys.trigger_state(trigger_id))
        except RedisError as e:
            raise ServiceUnavailable(f"triggers unavailable (Redis): {e}") from e
        out: dict[str, Any] = {}
        for k, v in raw.items():
            key = k.decode() if isinstance(k, bytes) else str(k)
            out[key] = int(v) if key == "errors" else json.loads(v)
        return out
