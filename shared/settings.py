"""Typed settings, loaded once by the process entry point and passed down explicitly.

Nothing here reads the environment at import time: ``load_settings`` takes the mapping to
read, so tests build settings from a plain dict.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field

from shared.errors import InvalidRequest

MiB = 1024 * 1024


@dataclass(frozen=True)
class RedisSettings:
    url: str = "redis://127.0.0.1:6379/0"


@dataclass(frozen=True)
class QueueSettings:
    backend: str = "redis"
    # Prefix of every Redis key imagefn owns; lets two installations share one Redis.
    prefix: str = "imagefn"
    # An invocation claimed by a worker whose claim has not been refreshed for this long
    # is taken over by another worker. Live workers refresh their claims far more often.
    reclaim_idle_ms: int = 15_000
    claim_refresh_s: float = 3.0
    # How long a gateway's reply stream lives after the gateway stops refreshing it.
    reply_ttl_s: int = 120


@dataclass(frozen=True)
class GatewaySettings:
    host: str = "127.0.0.1"
    port: int = 8080
    max_body_bytes: int = 6 * MiB
    # Added to a function's timeout (plus its init timeout) while the gateway waits for a
    # result, to cover queueing and transport.
    result_grace_s: float = 5.0
    # How long a gateway may serve a function record from memory; a deploy or delete made
    # through another gateway takes effect here within this time. 0 disables the cache.
    function_cache_s: float = 1.0
    # Whether deploy checks that the image exists in the local Docker engine.
    check_images: bool = True


@dataclass(frozen=True)
class WorkerSettings:
    worker_id: str = ""
    docker_url: str | None = None
    # Invocations one worker handles at once (across all its functions).
    max_inflight: int = 64
    # How long an invocation may wait for a free instance (max_instances or memory
    # reached) before it fails with ConcurrencyLimitExceeded.
    max_slot_wait_s: float = 10.0
    # Memory this worker may give to containers, in MiB.
    memory_capacity_mb: int = 16384
    heartbeat_s: float = 2.0
    heartbeat_ttl_s: float = 8.0
    janitor_interval_s: float = 10.0
    drain_timeout_s: float = 30.0
    ready_poll_interval_s: float = 0.005
    stop_timeout_s: float = 2.0
    pids_limit: int = 1024
    nofile_limit: int = 1024
    tmpfs_size_mb: int = 512
    max_result_bytes: int = 6 * MiB
    max_response_header_bytes: int = 4096
    log_tail_lines: int = 20
    # Deployment identifiers sent as X-Scf-Namespace/-Region/-Appid/-Uin.
    scf_namespace: str = "default"
    scf_region: str = "local"
    scf_appid: str = "0"
    scf_uin: str = "0"


@dataclass(frozen=True)
class Settings:
    redis: RedisSettings = field(default_factory=RedisSettings)
    queue: QueueSettings = field(default_factory=QueueSettings)
    gateway: GatewaySettings = field(default_factory=GatewaySettings)
    worker: WorkerSettings = field(default_factory=WorkerSettings)
    log_level: str = "info"
    # Run servers on uvloop when it is installed (it roughly halves event-loop overhead).
    uvloop: bool = True


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise InvalidRequest(f"setting {name}={raw!r} is not an integer") from None


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise InvalidRequest(f"setting {name}={raw!r} is not a number") from None


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise InvalidRequest(f"setting {name}={raw!r} is not a boolean")


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def load_settings(env: Mapping[str, str]) -> Settings:
    """Build settings from IMAGEFN_* variables of ``env``; unset ones take defaults."""
    q = QueueSettings()
    g = GatewaySettings()
    w = WorkerSettings()
    backend = env.get("IMAGEFN_QUEUE_BACKEND") or q.backend
    if backend not in ("redis",):
        raise InvalidRequest(f"setting IMAGEFN_QUEUE_BACKEND={backend!r}: supported: redis")
    return Settings(
        redis=RedisSettings(url=env.get("IMAGEFN_REDIS_URL") or RedisSettings.url),
        queue=QueueSettings(
            backend=backend,
            prefix=env.get("IMAGEFN_PREFIX") or q.prefix,
            reclaim_idle_ms=_int(env, "IMAGEFN_RECLAIM_IDLE_MS", q.reclaim_idle_ms),
            claim_refresh_s=_float(env, "IMAGEFN_CLAIM_REFRESH_S", q.claim_refresh_s),
            reply_ttl_s=_int(env, "IMAGEFN_REPLY_TTL_S", q.reply_ttl_s),
        ),
        gateway=GatewaySettings(
            host=env.get("IMAGEFN_GATEWAY_HOST") or g.host,
            port=_int(env, "IMAGEFN_GATEWAY_PORT", g.port),
            max_body_bytes=_int(env, "IMAGEFN_MAX_BODY_BYTES", g.max_body_bytes),
            result_grace_s=_float(env, "IMAGEFN_RESULT_GRACE_S", g.result_grace_s),
            check_images=_bool(env, "IMAGEFN_CHECK_IMAGES", g.check_images),
            function_cache_s=_float(env, "IMAGEFN_FUNCTION_CACHE_S", g.function_cache_s),
        ),
        worker=WorkerSettings(
            worker_id=env.get("IMAGEFN_WORKER_ID") or default_worker_id(),
            docker_url=env.get("IMAGEFN_DOCKER_URL") or None,
            max_inflight=_int(env, "IMAGEFN_WORKER_MAX_INFLIGHT", w.max_inflight),
            memory_capacity_mb=_int(env, "IMAGEFN_WORKER_MEMORY_MB", w.memory_capacity_mb),
            max_slot_wait_s=_float(env, "IMAGEFN_MAX_SLOT_WAIT_S", w.max_slot_wait_s),
            heartbeat_s=_float(env, "IMAGEFN_HEARTBEAT_S", w.heartbeat_s),
            heartbeat_ttl_s=_float(env, "IMAGEFN_HEARTBEAT_TTL_S", w.heartbeat_ttl_s),
            janitor_interval_s=_float(env, "IMAGEFN_JANITOR_INTERVAL_S", w.janitor_interval_s),
            drain_timeout_s=_float(env, "IMAGEFN_DRAIN_TIMEOUT_S", w.drain_timeout_s),
        ),
        log_level=env.get("IMAGEFN_LOG_LEVEL") or "info",
        uvloop=_bool(env, "IMAGEFN_UVLOOP", True),
    )
