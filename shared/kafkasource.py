"""Where a Kafka trigger reads from: the platform's cluster, or the one its ``bootstrap``
names (reached in PLAINTEXT, without the platform's credentials), and the check the
gateway makes before it stores such a trigger."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import replace

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from shared.errors import InvalidRequest, ServiceUnavailable
from shared.kafka import connection_options
from shared.settings import KafkaSettings
from shared.triggers import Trigger

# The longest a PUT waits for the trigger's brokers to answer.
CHECK_TIMEOUT_S = 5.0


def source_settings(platform: KafkaSettings, trigger: Trigger) -> KafkaSettings:
    """The platform's cluster settings, or for a trigger that names other brokers, those
    brokers in PLAINTEXT: the platform's SASL principal is never sent to an address a
    trigger's author chose (per-trigger credentials are not built yet)."""
    bootstrap = str(trigger.config.get("bootstrap") or "")
    if not bootstrap or bootstrap == platform.bootstrap:
        return platform
    return replace(
        platform,
        bootstrap=bootstrap,
        security_protocol="PLAINTEXT",
        sasl_username="",
        sasl_password="",
    )


def error_topic(trigger: Trigger) -> str:
    return str(trigger.config.get("error_topic") or f"{trigger.config['topic']}.imagefn-errors")


def group_id(prefix: str, trigger: Trigger) -> str:
    """The trigger's own consumer group: every runner joins it, so they share the
    partitions and a runner that dies is replaced by the group's rebalance."""
    return f"imagefn-trigger.{prefix}.{trigger.function}.{trigger.name}"


async def check_source(platform: KafkaSettings, trigger: Trigger) -> None:
    """The brokers answer and the topic exists; else ServiceUnavailable (503) naming
    ``bootstrap`` or InvalidRequest (400) naming ``topic``."""
    settings = source_settings(platform, trigger)
    where = settings.bootstrap or "(none: the platform has no Kafka)"
    if not settings.bootstrap:
        raise InvalidRequest(
            "bootstrap: the platform has no Kafka cluster; name the trigger's brokers",
            details={"fields": {"bootstrap": "required when the platform has no Kafka"}},
        )
    admin = AIOKafkaAdminClient(
        client_id="imagefn-trigger-check", request_timeout_ms=4000, **connection_options(settings)
    )
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_S):
            await admin.start()
            topics = set(await admin.list_topics())
    except (KafkaError, OSError, TimeoutError) as e:
        problem = f"the brokers at {where} do not answer ({type(e).__name__}: {e})"
        raise ServiceUnavailable(
            f"bootstrap: {problem}", details={"fields": {"bootstrap": problem}}
        ) from e
    finally:
        with contextlib.suppress(KafkaError, OSError):
            await admin.close()
    topic = str(trigger.config["topic"])
    if topic not in topics:
        problem = f"no topic {topic!r} at {where}; create it first"
        raise InvalidRequest(f"topic: {problem}", details={"fields": {"topic": problem}})
