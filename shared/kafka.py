"""Kafka clients and topics, made one way for every component.

The platform owns three topics, all named after ``KafkaSettings.topic_prefix``:

* ``{prefix}.invocations`` — the invocation queue's Kafka backend (shared/queue/kafka.py);
* ``{prefix}.replies``     — results travelling back to the waiting gateways;
* ``{prefix}.logs``        — container output and the platform's per-invocation records
  (shared/logrecords.py), keyed by function name.

Topics are created when missing, with the partition counts of the settings; an existing
topic is used as it is (an operator may have made it bigger). Only the Kafka protocol is
used, so Apache Kafka, Redpanda and the Tansu test broker all work.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from shared.settings import KafkaSettings, LogSettings

log = structlog.get_logger("imagefn.kafka")

# The largest record the invocation queue produces: a body of up to 6 MiB (the gateway's
# and the worker's default limits) plus the function record and metadata headers. Brokers
# refuse records above ~1 MB unless the topic allows more, so the queue's topics do.
MAX_RECORD_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class Topics:
    invocations: str
    replies: str
    logs: str

    @classmethod
    def of(cls, settings: KafkaSettings) -> Topics:
        p = settings.topic_prefix
        return cls(invocations=f"{p}.invocations", replies=f"{p}.replies", logs=f"{p}.logs")


def connection_options(settings: KafkaSettings) -> dict[str, object]:
    """How every client (producer, consumer, admin) reaches the cluster: its address and,
    when the cluster asks for it, TLS and the role's SASL principal."""
    options: dict[str, object] = {
        "bootstrap_servers": settings.bootstrap,
        "security_protocol": settings.security_protocol,
    }
    if settings.security_protocol.startswith("SASL_"):
        options["sasl_mechanism"] = settings.sasl_mechanism
        options["sasl_plain_username"] = settings.sasl_username
        options["sasl_plain_password"] = settings.sasl_password
    if settings.security_protocol.endswith("SSL"):
        options["ssl_context"] = ssl.create_default_context(cafile=settings.ssl_cafile or None)
    return options


def producer(settings: KafkaSettings, **overrides: object) -> AIOKafkaProducer:
    """A producer that waits for every in-sync replica (acks=all): a record counts as
    accepted only once the cluster would keep it through a broker failure."""
    options: dict[str, object] = {
        **connection_options(settings),
        "acks": "all",
        "enable_idempotence": settings.idempotent_producer,
        "linger_ms": 0,
        "request_timeout_ms": 10_000,
        "client_id": "imagefn",
    }
    options.update(overrides)
    return AIOKafkaProducer(**options)


def consumer(settings: KafkaSettings, *topics: str, **overrides: object) -> AIOKafkaConsumer:
    """A consumer with manual commits (the platform decides when work is done)."""
    options: dict[str, object] = {
        **connection_options(settings),
        "enable_auto_commit": False,
        "client_id": "imagefn",
        # Brokers answer a fetch as soon as a record arrives; this bounds the wait only
        # when nothing does.
        "fetch_max_wait_ms": 500,
    }
    options.update(overrides)
    return AIOKafkaConsumer(*topics, **options)


async def ensure_topics(
    settings: KafkaSettings, logs: LogSettings | None = None, *, which: tuple[str, ...] = ()
) -> Topics:
    """Create the platform's topics that do not exist yet (all, or those named in
    ``which``: "invocations", "replies", "logs"); return their names."""
    topics = Topics.of(settings)
    wanted = {
        "invocations": NewTopic(
            topics.invocations,
            settings.invocation_partitions,
            settings.replication_factor,
            topic_configs={
                # Slack above the producer's limit for the record batch's own framing.
                "max.message.bytes": str(MAX_RECORD_BYTES + 1024 * 1024),
                # An invocation is dropped unrun once its deadline (minutes) has passed;
                # a day keeps what a stopped installation left for a while, no longer.
                "retention.ms": str(86_400_000),
            },
        ),
        "replies": NewTopic(
            topics.replies,
            settings.reply_partitions,
            settings.replication_factor,
            topic_configs={
                "max.message.bytes": str(MAX_RECORD_BYTES + 1024 * 1024),
                # Results are read within milliseconds; an hour is plenty for a slow reader.
                "retention.ms": str(3_600_000),
            },
        ),
        "logs": NewTopic(
            topics.logs,
            settings.log_partitions,
            settings.replication_factor,
            topic_configs=_log_retention(logs or LogSettings()),
        ),
    }
    await _create_missing(settings, [wanted[w] for w in (which or tuple(wanted))])
    return topics


def _log_retention(logs: LogSettings) -> dict[str, str]:
    """The logs topic's bounds: time and bytes per partition, whichever comes first.
    Brokers delete whole closed segments only, so a partition holds up to retention
    plus one segment: segments of a quarter of it (at most 1 GiB) keep that near."""
    retention_bytes = logs.retention_mb * 1024 * 1024
    return {
        "retention.ms": str(logs.retention_hours * 3_600_000),
        "retention.bytes": str(retention_bytes),
        "segment.bytes": str(max(1024 * 1024, min(retention_bytes // 4, 1024 * 1024 * 1024))),
    }


async def ensure_topic(settings: KafkaSettings, name: str, partitions: int = 1) -> None:
    """Create a user-named topic (a destination) if it does not exist."""
    await _create_missing(settings, [NewTopic(name, partitions, settings.replication_factor)])


async def _create_missing(settings: KafkaSettings, chosen: list[NewTopic]) -> None:
    admin = AIOKafkaAdminClient(client_id="imagefn", **connection_options(settings))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [t for t in chosen if t.name not in existing]
        if missing:
            try:
                await admin.create_topics(missing)
                log.info("kafka_topics_created", topics=[t.name for t in missing])
            except TopicAlreadyExistsError:
                pass  # another process created them first
            except KafkaError as e:
                # Some brokers answer per topic; "already exists" is success here.
                if "already exists" not in str(e).lower():
                    raise
    finally:
        await admin.close()
