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
from typing import TypedDict

from shared.envparse import _bool, _float, _int, _positive, _positive_float
from shared.errors import InvalidRequest
from shared.settings_objectstore import ObjectStoreSettings, load_objectstore
from shared.settings_security import (
    AuthSettings,
    IntakeSettings,
    NetworkSettings,
    load_auth,
    load_intake,
    load_network,
)

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
    # How long invocation records (status, timings) are kept for GET /v1/invocations/ID.
    invocation_ttl_s: int = 86400
    # How long a gateway's reply stream lives after the gateway stops refreshing it.
    reply_ttl_s: int = 120


@dataclass(frozen=True)
class KafkaSettings:
    """The Kafka cluster: the invocation queue's second backend and where container logs
    go. Only the Kafka protocol is spoken, so Apache Kafka, Redpanda or the Tansu broker
    the set-up starts all work."""

    # Comma-separated host:port list; empty turns everything Kafka off (no log shipping,
    # and the "kafka" queue backend is refused).
    bootstrap: str = "127.0.0.1:9092"
    # Topic names start with this (the installation's prefix by default).
    topic_prefix: str = "imagefn"
    # Partitions of the topics the platform creates when they are missing. More
    # invocation partitions than workers lets every worker own some (warm affinity
    # routes by partition); replies and logs only need enough to spread readers.
    invocation_partitions: int = 16
    reply_partitions: int = 8
    log_partitions: int = 8
    replication_factor: int = 1
    # Idempotent producers need broker support (Apache Kafka and Redpanda have it; the
    # Tansu test broker does not), so it is off unless asked for.
    idempotent_producer: bool = False
    # A worker that stops heartbeating for this long loses its partitions (and with them
    # the invocations it held) to the other workers.
    session_timeout_ms: int = 6000
    heartbeat_interval_ms: int = 1000
    # A worker busy with long invocations may not read for a while; it keeps its
    # partitions (heartbeats run in the background) up to this long without reading.
    max_poll_interval_ms: int = 3_600_000
    # How often a worker commits the offsets of finished invocations.
    commit_interval_s: float = 0.1
    # How long the invocation queue's fetches (workers reading invocations, gateways
    # reading results) wait at the broker when nothing is there. Apache Kafka and
    # Redpanda answer as soon as a record arrives, so there this only sets how often an
    # idle consumer asks (raise it to 500 to ask less). Tansu answers at the end of the
    # wait only, so there it bounds each of the two queue hops: measured p50 7 ms per hop
    # at 20 ms (250 ms at 500), while an idle consumer costs ~4% of a core, the broker ~5%.
    queue_fetch_wait_ms: int = 20
    # How clients reach the cluster: PLAINTEXT (the Tansu broker), SASL_PLAINTEXT,
    # SASL_SSL or SSL; with SASL, a mechanism (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512) and
    # the role's principal (shared/roles.py: IMAGEFN_KAFKA_SASL_USERNAME_WORKER, ...).
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str = "SCRAM-SHA-512"
    sasl_username: str = ""
    sasl_password: str = field(default="", repr=False)
    # CA bundle to verify the brokers' certificates (SSL, SASL_SSL); empty: the system's.
    ssl_cafile: str = ""


@dataclass(frozen=True)
class LogSettings:
    """Container output shipped into Kafka (workers/logship.py)."""

    enabled: bool = True
    # Lines waiting for Kafka are kept up to this many bytes per worker; lines beyond it
    # are counted and reported by a gap record once Kafka takes records again.
    buffer_mb: int = 64
    # A longer line is split into parts of this size, each marked with its part number.
    max_line_bytes: int = 16 * 1024
    # Records produced to Kafka in one batch at most.
    batch_records: int = 2000
    # How long a container's END/REPORT waits for its output to be read, and how long
    # removal waits for the log stream to drain.
    drain_timeout_s: float = 5.0
    # Retention the platform sets on the logs topic it creates: by time, and by size per
    # partition (whichever is reached first; the broker deletes whole segments).
    retention_hours: int = 72
    retention_mb: int = 1024


@dataclass(frozen=True)
class GatewaySettings:
    host: str = "127.0.0.1"
    port: int = 8080
    max_body_bytes: int = 6 * MiB
    # Added to a function's timeout, init timeout and the pull timeout while the gateway
    # waits for a result, to cover queueing and transport.
    result_grace_s: float = 5.0
    # How long a gateway may serve a function record from memory; a deploy or delete made
    # through another gateway takes effect here within this time. 0 disables the cache.
    function_cache_s: float = 1.0
    # Whether deploy resolves images in the platform registry (off only in unit tests:
    # any reference is then accepted as is).
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
    # Provisioned instances one worker starts at once (the rest follow as these are up).
    provision_burst: int = 4
    # Invocations of one function that may wait for a slot on this worker at once; more
    # fail at once with ConcurrencyLimitExceeded, so a hot function cannot take every
    # permit (max_inflight) and stall the others.
    max_waiting_per_function: int = 16
    # Memory this worker may give to containers, in MiB.
    memory_capacity_mb: int = 16384
    # An instance idle this long is frozen (docker pause): no CPU, its memory kept, woken
    # in milliseconds by the next invocation. 0 turns freezing off.
    pause_after_s: float = 2.0
    heartbeat_s: float = 2.0
    heartbeat_ttl_s: float = 8.0
    janitor_interval_s: float = 10.0
    drain_timeout_s: float = 30.0
    ready_poll_interval_s: float = 0.005
    stop_timeout_s: float = 2.0
    pids_limit: int = 1024
    nofile_limit: int = 1024
    max_result_bytes: int = 6 * MiB
    max_response_header_bytes: int = 4096
    log_tail_lines: int = 20
    # Each instance's engine log: at most this many files of this size. Large files on
    # purpose: the engine's follow can lose lines at a rotation (docs). The "local" driver
    # keeps output byte for byte; "json-file" turns bytes that are not UTF-8 into U+FFFD.
    container_log_max_mb: int = 64
    container_log_files: int = 2
    container_log_driver: str = "local"
    # Deployment identifiers sent as X-Scf-Namespace/-Region/-Appid/-Uin.
    scf_namespace: str = "default"
    scf_region: str = "local"
    scf_appid: str = "0"
    scf_uin: str = "0"


@dataclass(frozen=True)
class AsyncSettings:
    """Asynchronous invocation, retries, dead letters, destinations and batches."""

    # Bodies of asynchronous events (and of each batch item) at most this large (SCF: 128 KB).
    max_event_bytes: int = 128 * 1024
    # How long the result of a finished asynchronous invocation is kept.
    result_ttl_s: int = 86400
    # Delay before retry n (n = 1, 2, ...) of a user-code failure: base * 2^(n-1), capped.
    retry_base_delay_s: float = 1.0
    retry_max_delay_s: float = 300.0
    # Throttled and platform-failed attempts: base * 2^(k-1), capped, until max_event_age_s.
    throttle_base_delay_s: float = 0.5
    throttle_max_delay_s: float = 60.0
    # The scheduler's tick: due retries wait at most about this long past their time.
    scheduler_tick_s: float = 0.1
    # Its tick while a batch has items left to feed: a batch's max_concurrency is
    # refilled once per tick, so a batch of fast items runs at most about
    # max_concurrency / tick items per second.
    batch_tick_s: float = 0.01
    # Batches: items in flight per batch unless the batch says otherwise, and the items
    # per second the scheduler feeds into the queue for one function (so a big batch
    # cannot flood the queue ahead of other functions' calls).
    batch_max_concurrency: int = 32
    batch_rate_per_function: int = 5000
    batch_max_items: int = 1_000_000
    # The items of one batch in all (compact JSON), held in Redis until they are fed.
    batch_max_bytes: int = 256 * MiB
    # How long a finished batch (its counters and results) is kept.
    batch_ttl_s: int = 86400
    # Destinations: tries per record and the time one HTTP POST may take.
    destination_attempts: int = 5
    destination_timeout_s: float = 5.0


# Tokens the registry accepts live at most this long (issue 3: TTL <= 15 minutes).
MAX_TOKEN_TTL_S = 900
# The user name workers present to the token service (their password: worker_secret).
WORKER_USER = "imagefn-worker"


@dataclass(frozen=True)
class RegistrySettings:
    # host:port of the private registry (Debian's docker-registry, token auth).
    address: str = "127.0.0.1:5000"
    # Must equal the registry's auth.token.service and issuer: they become the tokens'
    # aud and iss claims, which the registry checks.
    service: str = "imagefn-registry"
    issuer: str = "imagefn"
    token_ttl_s: int = 300
    # The token signing key and its self-signed certificate (the registry's
    # rootcertbundle); generated by deploy/registry.sh, never in the repository.
    signing_key: str = "/var/lib/imagefn/registry-auth/token.key"
    signing_cert: str = "/var/lib/imagefn/registry-auth/token.crt"
    # The deployer may push and pull any repository; workers (user "imagefn-worker",
    # password worker_secret) may only pull. Empty means that principal cannot log in.
    deploy_user: str = "imagefn-deployer"
    deploy_password: str = field(default="", repr=False)
    worker_secret: str = field(default="", repr=False)
    # Where workers ask for their pull tokens (the gateway's token route).
    token_url: str = "http://127.0.0.1:8080/v1/registry/token"
    pull_timeout_s: float = 120.0
    # Worker image cache bound; least recently used images go first past it.
    image_cache_mb: int = 20480


@dataclass(frozen=True)
class Settings:
    redis: RedisSettings = field(default_factory=RedisSettings)
    queue: QueueSettings = field(default_factory=QueueSettings)
    gateway: GatewaySettings = field(default_factory=GatewaySettings)
    worker: WorkerSettings = field(default_factory=WorkerSettings)
    registry: RegistrySettings = field(default_factory=RegistrySettings)
    kafka: KafkaSettings = field(default_factory=KafkaSettings)
    logs: LogSettings = field(default_factory=LogSettings)
    asyncinv: AsyncSettings = field(default_factory=AsyncSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    intake: IntakeSettings = field(default_factory=IntakeSettings)
    network: NetworkSettings = field(default_factory=NetworkSettings)
    objectstore: ObjectStoreSettings = field(default_factory=ObjectStoreSettings)
    log_level: str = "info"
    # Run servers on uvloop when it is installed (it roughly halves event-loop overhead).
    uvloop: bool = True
    # ``imagefn up`` runs its gateway in a child process, so that gateway and worker use
    # two cores (cli/up.py); false: everything in one process.
    # Off by default: on 2 cores the extra process cost more than it gave (docs/benchmarks.md,
    # "The warm path (issue 12)": events x0.76, serial overhead +1.6 ms with it on).
    up_gateway_process: bool = False


# Kafka topic names allow only these characters (and at most 249 of them).
_TOPIC_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def _kafka_settings(env: Mapping[str, str], prefix: str) -> KafkaSettings:
    k = KafkaSettings()
    raw_prefix = env.get("IMAGEFN_KAFKA_TOPIC_PREFIX") or prefix
    topic_prefix = "".join(c if c in _TOPIC_CHARS else "-" for c in raw_prefix)[:200]
    bootstrap = env.get("IMAGEFN_KAFKA_BOOTSTRAP")
    return KafkaSettings(
        bootstrap=(k.bootstrap if bootstrap is None else bootstrap).strip(),
        topic_prefix=topic_prefix,
        invocation_partitions=_positive(
            env, "IMAGEFN_KAFKA_INVOCATION_PARTITIONS", k.invocation_partitions
        ),
        reply_partitions=_positive(env, "IMAGEFN_KAFKA_REPLY_PARTITIONS", k.reply_partitions),
        log_partitions=_positive(env, "IMAGEFN_KAFKA_LOG_PARTITIONS", k.log_partitions),
        replication_factor=_positive(env, "IMAGEFN_KAFKA_REPLICATION_FACTOR", k.replication_factor),
        idempotent_producer=_bool(env, "IMAGEFN_KAFKA_IDEMPOTENT", k.idempotent_producer),
        session_timeout_ms=_positive(env, "IMAGEFN_KAFKA_SESSION_TIMEOUT_MS", k.session_timeout_ms),
        heartbeat_interval_ms=_positive(
            env, "IMAGEFN_KAFKA_HEARTBEAT_INTERVAL_MS", k.heartbeat_interval_ms
        ),
        max_poll_interval_ms=_positive(
            env, "IMAGEFN_KAFKA_MAX_POLL_INTERVAL_MS", k.max_poll_interval_ms
        ),
        commit_interval_s=_float(env, "IMAGEFN_KAFKA_COMMIT_INTERVAL_S", k.commit_interval_s),
        queue_fetch_wait_ms=_positive(
            env, "IMAGEFN_KAFKA_QUEUE_FETCH_WAIT_MS", k.queue_fetch_wait_ms
        ),
        **_kafka_security(env, k),
    )


_KAFKA_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
_SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


class _KafkaSecurity(TypedDict):
    security_protocol: str
    sasl_mechanism: str
    sasl_username: str
    sasl_password: str
    ssl_cafile: str


def _kafka_security(env: Mapping[str, str], k: KafkaSettings) -> _KafkaSecurity:
    username = env.get("IMAGEFN_KAFKA_SASL_USERNAME") or ""
    # A principal given means SASL, unless the protocol is named.
    protocol = (
        env.get("IMAGEFN_KAFKA_SECURITY_PROTOCOL") or ("SASL_PLAINTEXT" if username else "")
    ).upper() or k.security_protocol
    if protocol not in _KAFKA_PROTOCOLS:
        raise InvalidRequest(
            f"setting IMAGEFN_KAFKA_SECURITY_PROTOCOL={protocol!r}: "
            f"supported: {', '.join(_KAFKA_PROTOCOLS)}"
        )
    mechanism = (env.get("IMAGEFN_KAFKA_SASL_MECHANISM") or k.sasl_mechanism).upper()
    if mechanism not in _SASL_MECHANISMS:
        raise InvalidRequest(
            f"setting IMAGEFN_KAFKA_SASL_MECHANISM={mechanism!r}: "
            f"supported: {', '.join(_SASL_MECHANISMS)}"
        )
    if protocol.startswith("SASL_") and not username:
        raise InvalidRequest(
            f"setting IMAGEFN_KAFKA_SECURITY_PROTOCOL={protocol} needs "
            "IMAGEFN_KAFKA_SASL_USERNAME and IMAGEFN_KAFKA_SASL_PASSWORD"
        )
    return {
        "security_protocol": protocol,
        "sasl_mechanism": mechanism,
        "sasl_username": username,
        "sasl_password": env.get("IMAGEFN_KAFKA_SASL_PASSWORD") or "",
        "ssl_cafile": env.get("IMAGEFN_KAFKA_SSL_CAFILE") or "",
    }


def _async_settings(env: Mapping[str, str]) -> AsyncSettings:
    a = AsyncSettings()
    return AsyncSettings(
        max_event_bytes=_positive(env, "IMAGEFN_ASYNC_MAX_EVENT_BYTES", a.max_event_bytes),
        result_ttl_s=_positive(env, "IMAGEFN_RESULT_TTL_S", a.result_ttl_s),
        retry_base_delay_s=_float(env, "IMAGEFN_RETRY_BASE_DELAY_S", a.retry_base_delay_s),
        retry_max_delay_s=_float(env, "IMAGEFN_RETRY_MAX_DELAY_S", a.retry_max_delay_s),
        throttle_base_delay_s=_float(env, "IMAGEFN_THROTTLE_BASE_DELAY_S", a.throttle_base_delay_s),
        throttle_max_delay_s=_float(env, "IMAGEFN_THROTTLE_MAX_DELAY_S", a.throttle_max_delay_s),
        scheduler_tick_s=_positive_float(env, "IMAGEFN_SCHEDULER_TICK_S", a.scheduler_tick_s),
        batch_tick_s=_positive_float(env, "IMAGEFN_BATCH_TICK_S", a.batch_tick_s),
        batch_max_concurrency=_positive(
            env, "IMAGEFN_BATCH_MAX_CONCURRENCY", a.batch_max_concurrency
        ),
        batch_rate_per_function=_positive(
            env, "IMAGEFN_BATCH_RATE_PER_FUNCTION", a.batch_rate_per_function
        ),
        batch_max_items=_positive(env, "IMAGEFN_BATCH_MAX_ITEMS", a.batch_max_items),
        batch_max_bytes=_positive(env, "IMAGEFN_BATCH_MAX_BYTES", a.batch_max_bytes),
        batch_ttl_s=_positive(env, "IMAGEFN_BATCH_TTL_S", a.batch_ttl_s),
        destination_attempts=_positive(env, "IMAGEFN_DESTINATION_ATTEMPTS", a.destination_attempts),
        destination_timeout_s=_positive_float(
            env, "IMAGEFN_DESTINATION_TIMEOUT_S", a.destination_timeout_s
        ),
    )


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def load_settings(env: Mapping[str, str]) -> Settings:
    """Build settings from IMAGEFN_* variables of ``env``; unset ones take defaults."""
    q = QueueSettings()
    g = GatewaySettings()
    w = WorkerSettings()
    r = RegistrySettings()
    token_ttl_s = _int(env, "IMAGEFN_TOKEN_TTL_S", r.token_ttl_s)
    if not 1 <= token_ttl_s <= MAX_TOKEN_TTL_S:
        raise InvalidRequest(
            f"setting IMAGEFN_TOKEN_TTL_S={token_ttl_s}: must be between 1 and {MAX_TOKEN_TTL_S}"
        )
    deploy_user = env.get("IMAGEFN_DEPLOY_USER") or r.deploy_user
    if deploy_user == WORKER_USER:
        raise InvalidRequest(f"setting IMAGEFN_DEPLOY_USER: {WORKER_USER!r} is the workers' name")
    worker_id = env.get("IMAGEFN_WORKER_ID") or default_worker_id()
    if any(c in worker_id for c in ": \t\n*?[]"):
        # It becomes part of Redis key names and patterns.
        raise InvalidRequest(
            f"setting IMAGEFN_WORKER_ID={worker_id!r}: no ':', spaces or glob characters"
        )
    backend = env.get("IMAGEFN_QUEUE_BACKEND") or q.backend
    if backend not in ("redis", "kafka"):
        raise InvalidRequest(f"setting IMAGEFN_QUEUE_BACKEND={backend!r}: supported: redis, kafka")
    prefix = env.get("IMAGEFN_PREFIX") or q.prefix
    kafka = _kafka_settings(env, prefix)
    if backend == "kafka" and not kafka.bootstrap:
        raise InvalidRequest(
            "setting IMAGEFN_QUEUE_BACKEND=kafka needs IMAGEFN_KAFKA_BOOTSTRAP (host:port)"
        )
    lg = LogSettings()
    log_driver = env.get("IMAGEFN_CONTAINER_LOG_DRIVER") or w.container_log_driver
    if log_driver not in ("local", "json-file"):
        raise InvalidRequest(
            f"setting IMAGEFN_CONTAINER_LOG_DRIVER={log_driver!r}: supported: local, json-file"
        )
    return Settings(
        redis=RedisSettings(url=env.get("IMAGEFN_REDIS_URL") or RedisSettings.url),
        queue=QueueSettings(
            backend=backend,
            prefix=prefix,
            reclaim_idle_ms=_int(env, "IMAGEFN_RECLAIM_IDLE_MS", q.reclaim_idle_ms),
            claim_refresh_s=_float(env, "IMAGEFN_CLAIM_REFRESH_S", q.claim_refresh_s),
            reply_ttl_s=_int(env, "IMAGEFN_REPLY_TTL_S", q.reply_ttl_s),
            invocation_ttl_s=_int(env, "IMAGEFN_INVOCATION_TTL_S", q.invocation_ttl_s),
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
            worker_id=worker_id,
            docker_url=env.get("IMAGEFN_DOCKER_URL") or None,
            max_inflight=_int(env, "IMAGEFN_WORKER_MAX_INFLIGHT", w.max_inflight),
            memory_capacity_mb=_int(env, "IMAGEFN_WORKER_MEMORY_MB", w.memory_capacity_mb),
            max_slot_wait_s=_float(env, "IMAGEFN_MAX_SLOT_WAIT_S", w.max_slot_wait_s),
            provision_burst=_int(env, "IMAGEFN_PROVISION_BURST", w.provision_burst),
            max_waiting_per_function=_int(
                env, "IMAGEFN_MAX_WAITING_PER_FUNCTION", w.max_waiting_per_function
            ),
            heartbeat_s=_float(env, "IMAGEFN_HEARTBEAT_S", w.heartbeat_s),
            pause_after_s=_float(env, "IMAGEFN_PAUSE_AFTER_S", w.pause_after_s),
            heartbeat_ttl_s=_float(env, "IMAGEFN_HEARTBEAT_TTL_S", w.heartbeat_ttl_s),
            janitor_interval_s=_float(env, "IMAGEFN_JANITOR_INTERVAL_S", w.janitor_interval_s),
            drain_timeout_s=_float(env, "IMAGEFN_DRAIN_TIMEOUT_S", w.drain_timeout_s),
            container_log_max_mb=_positive(
                env, "IMAGEFN_CONTAINER_LOG_MAX_MB", w.container_log_max_mb
            ),
            container_log_files=_positive(
                env, "IMAGEFN_CONTAINER_LOG_FILES", w.container_log_files
            ),
            container_log_driver=log_driver,
        ),
        registry=RegistrySettings(
            address=env.get("IMAGEFN_REGISTRY") or r.address,
            service=env.get("IMAGEFN_REGISTRY_SERVICE") or r.service,
            issuer=env.get("IMAGEFN_TOKEN_ISSUER") or r.issuer,
            token_ttl_s=token_ttl_s,
            signing_key=env.get("IMAGEFN_TOKEN_KEY") or r.signing_key,
            signing_cert=env.get("IMAGEFN_TOKEN_CERT") or r.signing_cert,
            deploy_user=deploy_user,
            deploy_password=env.get("IMAGEFN_DEPLOY_PASSWORD") or r.deploy_password,
            worker_secret=env.get("IMAGEFN_WORKER_SECRET") or r.worker_secret,
            token_url=env.get("IMAGEFN_TOKEN_URL") or r.token_url,
            pull_timeout_s=_float(env, "IMAGEFN_PULL_TIMEOUT_S", r.pull_timeout_s),
            image_cache_mb=_int(env, "IMAGEFN_IMAGE_CACHE_MB", r.image_cache_mb),
        ),
        kafka=kafka,
        logs=LogSettings(
            enabled=_bool(env, "IMAGEFN_LOGS", lg.enabled) and bool(kafka.bootstrap),
            buffer_mb=_positive(env, "IMAGEFN_LOG_BUFFER_MB", lg.buffer_mb),
            max_line_bytes=_positive(env, "IMAGEFN_LOG_MAX_LINE_BYTES", lg.max_line_bytes),
            batch_records=_positive(env, "IMAGEFN_LOG_BATCH_RECORDS", lg.batch_records),
            drain_timeout_s=_float(env, "IMAGEFN_LOG_DRAIN_TIMEOUT_S", lg.drain_timeout_s),
            retention_hours=_positive(env, "IMAGEFN_LOG_RETENTION_HOURS", lg.retention_hours),
            retention_mb=_positive(env, "IMAGEFN_LOG_RETENTION_MB", lg.retention_mb),
        ),
        asyncinv=_async_settings(env),
        auth=load_auth(env),
        intake=load_intake(env),
        network=load_network(env),
        objectstore=load_objectstore(env),
        log_level=env.get("IMAGEFN_LOG_LEVEL") or "info",
        uvloop=_bool(env, "IMAGEFN_UVLOOP", True),
        up_gateway_process=_bool(env, "IMAGEFN_UP_GATEWAY_PROCESS", False),
    )


# Written by deploy/registry.sh: the registry credentials and token key paths.
DEFAULT_ENV_FILE = "/var/lib/imagefn/credentials.env"


def read_env_file(path: str) -> dict[str, str]:
    """KEY=VALUE lines of an env file (comments and blank lines skipped); empty when the
    file does not exist or cannot be read (a non-root user, say)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError:
        return {}
    out: dict[str, str] = {}
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, value = line.split("=", 1)
        out[key.strip()] = value.strip().strip("'\"")
    return out
