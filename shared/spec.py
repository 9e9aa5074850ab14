"""Function specs: what a user deploys, and the strict validation every spec passes.

Validation collects every problem before failing so that a user fixes a spec in one round.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

from shared.errors import InvalidSpec

FunctionType = Literal["event", "web"]

NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,59}\Z")
ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")
# The contract: environment at most 4 KB inside the instance.
MAX_ENV_BYTES = 4096
# Names reserved for the platform (SCF sets SCF_* variables; ours are IMAGEFN_*).
RESERVED_ENV_PREFIXES = ("SCF_", "IMAGEFN_")

# (minimum, maximum) of every numeric field.
RANGES: dict[str, tuple[float, float]] = {
    "memory_mb": (64, 16384),
    "cpus": (0.05, 16),
    "timeout_s": (1, 900),
    "init_timeout_s": (1, 300),
    "idle_ttl_s": (1, 86400),
    "max_instances": (1, 1000),
    # Requests one instance serves at once; event functions take one at a time.
    "instance_concurrency": (1, 100),
    # Reserved cap on the function's invocations in flight across the platform; 0: none.
    "max_concurrency": (0, 100_000),
    # Instances of $LATEST kept ready before any traffic, across the workers; never
    # reclaimed for idleness.
    "provisioned_concurrency": (0, 1000),
    # The instance's /tmp (a tmpfs of its own budget, on top of memory_mb; SCF gives 512).
    "tmp_mb": (16, 2048),
}
INTEGER_FIELDS = frozenset(
    {
        "memory_mb",
        "max_instances",
        "instance_concurrency",
        "max_concurrency",
        "provisioned_concurrency",
        "tmp_mb",
    }
)
# Who may call a web function: "key" (a key with invoke on it) or "public" (anyone).
WEB_AUTH = ("key", "public")


# Asynchronous invocation: retries that count against ``max_retries`` (user-code failures;
# SCF allows 0..2, we allow up to 10) and the age after which an event is given up.
ASYNC_RANGES: dict[str, tuple[int, int]] = {
    "max_retries": (0, 10),
    "max_event_age_s": (60, 21600),
}
KAFKA_TOPIC_RE = re.compile(r"^[A-Za-z0-9._-]{1,249}\Z")
DESTINATION_EVENTS = ("on_success", "on_failure")


@dataclass(frozen=True)
class AsyncPolicy:
    """What happens to an asynchronous invocation that fails (spec key ``async``)."""

    max_retries: int = 2
    max_event_age_s: int = 21600


@dataclass(frozen=True)
class Destination:
    """Where the outcome record of an asynchronous invocation goes: a Kafka topic or an
    HTTP(S) URL (POSTed as JSON). Exactly one of the two is set."""

    kafka: str | None = None
    url: str | None = None

    def to_dict(self) -> dict[str, str]:
        return {"kafka": self.kafka} if self.kafka is not None else {"url": str(self.url)}


@dataclass(frozen=True)
class Destinations:
    on_success: Destination | None = None
    on_failure: Destination | None = None

    def to_dict(self) -> dict[str, dict[str, str]]:
        out: dict[str, dict[str, str]] = {}
        if self.on_success is not None:
            out["on_success"] = self.on_success.to_dict()
        if self.on_failure is not None:
            out["on_failure"] = self.on_failure.to_dict()
        return out


@dataclass(frozen=True)
class FunctionSpec:
    name: str
    image: str
    type: FunctionType = "event"
    command: tuple[str, ...] | None = None
    args: tuple[str, ...] | None = None
    env: dict[str, str] = field(default_factory=dict)
    memory_mb: int = 512
    cpus: float = 1.0
    timeout_s: float = 3.0
    init_timeout_s: float = 30.0
    idle_ttl_s: float = 300.0
    max_instances: int = 10
    instance_concurrency: int = 1
    max_concurrency: int = 0
    provisioned_concurrency: int = 0
    tmp_mb: int = 512
    # "public": a web function anyone may call; "key": only callers with invoke on it.
    auth: str = "key"
    # Whether the instance may reach the internet (never the platform or other functions).
    egress: bool = True
    # Whether idle instances are frozen (docker pause) after the worker's pause_after_s.
    # A frozen instance's background threads stop too (heartbeats, keep-alives,
    # schedulers): false keeps idle instances running until idle_ttl_s retires them.
    freeze_idle: bool = True
    # Spec key "async" (a Python keyword, hence the attribute name).
    async_policy: AsyncPolicy = field(default_factory=AsyncPolicy)
    destinations: Destinations = field(default_factory=Destinations)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["command"] = list(self.command) if self.command is not None else None
        d["args"] = list(self.args) if self.args is not None else None
        d.pop("async_policy")
        d["async"] = asdict(self.async_policy)
        d["destinations"] = self.destinations.to_dict()
        return d


@dataclass(frozen=True)
class FunctionRecord:
    """One published version of a function: the user's spec plus what the platform
    resolved at deploy. Immutable once published."""

    spec: FunctionSpec
    # What instances run: the image pinned by digest (repository@sha256:...), so pushing
    # new content under the same tag changes nothing until the next deploy.
    image_ref: str
    image_digest: str
    version: int
    created_at: float
    updated_at: float

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.spec.to_dict(),
            "image_ref": self.image_ref,
            "image_digest": self.image_digest,
            "version": self.version,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FunctionRecord:
        fields_ = {k: v for k, v in d.items() if k in SPEC_FIELDS}
        return cls(
            spec=parse_spec(fields_),
            image_ref=str(d["image_ref"]),
            image_digest=str(d.get("image_digest", "")),
            version=int(d["version"]),
            created_at=float(d["created_at"]),
            updated_at=float(d["updated_at"]),
        )

    @classmethod
    def from_json(cls, raw: str | bytes) -> FunctionRecord:
        return _record_from_json(raw.encode() if isinstance(raw, str) else raw)

    @functools.cached_property
    def json_bytes(self) -> bytes:
        """The record as JSON, encoded once per record object (every invocation of a
        function carries it)."""
        return self.to_json().encode()


# The keys a spec document may have (the dataclass's, with "async" for async_policy).
SPEC_FIELDS = frozenset(FunctionSpec.__dataclass_fields__) - {"async_policy"} | {"async"}


@functools.lru_cache(maxsize=4096)
def _record_from_json(raw: bytes) -> FunctionRecord:
    # Every invocation carries its function's record; parsing and validating the same
    # bytes again on each one would cost more than the rest of the hop. Records are
    # immutable, so one parsed object can serve every invocation with the same bytes.
    return FunctionRecord.from_dict(json.loads(raw))


def _str_list(value: Any, key: str, errors: dict[str, str]) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        # A lone string is the common mistake; say how to write it instead of guessing.
        errors[key] = 'must be a list of strings, e.g. ["python3", "app.py"]'
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        errors[key] = "must be a list of strings"
        return None
    if key == "command" and (not value or not value[0]):
        errors[key] = "must not be empty when given"
        return None
    return tuple(value)


def _number(value: Any, key: str, integer: bool, errors: dict[str, str]) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        errors[key] = "must be an integer" if integer else "must be a number"
        return None
    if integer and isinstance(value, float) and not value.is_integer():
        errors[key] = "must be an integer"
        return None
    low, high = RANGES[key]
    if not low <= value <= high:
        errors[key] = f"must be between {low:g} and {high:g}"
        return None
    return value


def _env(value: Any, errors: dict[str, str]) -> dict[str, str]:
    if not isinstance(value, dict):
        errors["env"] = "must be a mapping of names to string values"
        return {}
    bad = [k for k in value if not isinstance(k, str) or not ENV_KEY_RE.match(k)]
    if bad:
        errors["env"] = f"invalid variable names: {', '.join(map(str, bad))}"
        return {}
    non_str = [k for k, v in value.items() if not isinstance(v, str)]
    if non_str:
        errors["env"] = f"values must be strings: {', '.join(non_str)}"
        return {}
    reserved = [k for k in value if k.startswith(RESERVED_ENV_PREFIXES)]
    if reserved:
        errors["env"] = f"reserved names (SCF_*, IMAGEFN_*): {', '.join(reserved)}"
        return {}
    size = sum(len(k.encode()) + len(v.encode()) + 2 for k, v in value.items())
    if size > MAX_ENV_BYTES:
        errors["env"] = f"is {size} bytes; at most {MAX_ENV_BYTES} bytes in total"
        return {}
    return dict(value)


def _async_policy(value: Any, errors: dict[str, str]) -> AsyncPolicy:
    if value is None:
        return AsyncPolicy()
    if not isinstance(value, dict):
        errors["async"] = "must be a mapping (max_retries, max_event_age_s)"
        return AsyncPolicy()
    got: dict[str, int] = {}
    for key, raw in value.items():
        name = f"async.{key}"
        if key not in ASYNC_RANGES:
            errors[name] = "unknown field"
            continue
        low, high = ASYNC_RANGES[key]
        if isinstance(raw, bool) or not isinstance(raw, int | float) or raw != int(raw):
            errors[name] = "must be an integer"
        elif not low <= raw <= high:
            errors[name] = f"must be between {low} and {high}"
        else:
            got[key] = int(raw)
    return AsyncPolicy(**got)


def _destination(value: Any, name: str, errors: dict[str, str]) -> Destination | None:
    if value is None:
        return None
    if (
        not isinstance(value, dict)
        or len(value) != 1
        or next(iter(value))
        not in (
            "kafka",
            "url",
        )
    ):
        errors[name] = 'must be {kafka: TOPIC} or {url: "http://..."}'
        return None
    kind, target = next(iter(value.items()))
    if kind == "kafka":
        if not isinstance(target, str) or not KAFKA_TOPIC_RE.match(target):
            errors[name] = "kafka: a topic name of 1-249 characters A-Za-z0-9._-"
            return None
        return Destination(kafka=target)
    parts = urlsplit(target) if isinstance(target, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        errors[name] = "url: an http:// or https:// URL with a host"
        return None
    return Destination(url=str(target))


def _destinations(value: Any, errors: dict[str, str]) -> Destinations:
    if value is None:
        return Destinations()
    if not isinstance(value, dict):
        errors["destinations"] = "must be a mapping (on_success, on_failure)"
        return Destinations()
    for key in value:
        if key not in DESTINATION_EVENTS:
            errors[f"destinations.{key}"] = "unknown field (on_success, on_failure)"
    return Destinations(
        on_success=_destination(value.get("on_success"), "destinations.on_success", errors),
        on_failure=_destination(value.get("on_failure"), "destinations.on_failure", errors),
    )


def parse_spec(data: Any) -> FunctionSpec:
    """Validate a decoded spec document; raise InvalidSpec naming every bad field."""
    if not isinstance(data, dict):
        raise InvalidSpec({"<document>": "must be a mapping of spec fields"})
    errors: dict[str, str] = {}
    for key in data:
        if key not in SPEC_FIELDS:
            errors[str(key)] = "unknown field"

    name = data.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        errors["name"] = (
            "required; 1-60 characters, letters, digits, '-' and '_', starting with a letter"
        )
    image = data.get("image")
    if not isinstance(image, str) or not image.strip() or any(c.isspace() for c in image):
        errors["image"] = "required; an image reference such as repo/name:tag"
    ftype = data.get("type", "event")
    if ftype not in ("event", "web"):
        errors["type"] = "must be 'event' or 'web'"

    command = _str_list(data.get("command"), "command", errors)
    args = _str_list(data.get("args"), "args", errors)
    env = _env(data.get("env", {}), errors)
    async_policy = _async_policy(data.get("async"), errors)
    destinations = _destinations(data.get("destinations"), errors)

    defaults = FunctionSpec(name="x", image="x")
    numbers: dict[str, float] = {}
    for key in RANGES:
        if key in data:
            integer = key in INTEGER_FIELDS
            got = _number(data[key], key, integer, errors)
            if got is not None:
                numbers[key] = got
        else:
            numbers[key] = getattr(defaults, key)

    auth = data.get("auth", "key")
    if auth not in WEB_AUTH:
        errors["auth"] = "must be 'key' or 'public'"
    elif auth == "public" and ftype != "web":
        errors["auth"] = "only web functions may be public; events always need a key"
    egress = data.get("egress", True)
    if not isinstance(egress, bool):
        errors["egress"] = "must be true or false"
    freeze_idle = data.get("freeze_idle", True)
    if not isinstance(freeze_idle, bool):
        errors["freeze_idle"] = "must be true or false"

    if ftype == "event" and numbers.get("instance_concurrency", 1) != 1:
        # The contract: one instance handles one event at a time.
        errors["instance_concurrency"] = "must be 1 for event functions"
    if errors:
        raise InvalidSpec(errors)
    return FunctionSpec(
        name=str(name),
        image=str(image),
        type=ftype,
        command=command,
        args=args,
        env=env,
        memory_mb=int(numbers["memory_mb"]),
        cpus=float(numbers["cpus"]),
        timeout_s=float(numbers["timeout_s"]),
        init_timeout_s=float(numbers["init_timeout_s"]),
        idle_ttl_s=float(numbers["idle_ttl_s"]),
        max_instances=int(numbers["max_instances"]),
        instance_concurrency=int(numbers["instance_concurrency"]),
        max_concurrency=int(numbers["max_concurrency"]),
        provisioned_concurrency=int(numbers["provisioned_concurrency"]),
        tmp_mb=int(numbers["tmp_mb"]),
        auth=str(auth),
        egress=bool(egress),
        freeze_idle=bool(freeze_idle),
        async_policy=async_policy,
        destinations=destinations,
    )
