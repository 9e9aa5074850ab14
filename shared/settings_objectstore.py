"""Typed settings of the object store the cos triggers watch (``ObjectStoreSettings``):
its S3 endpoint and credentials (to check that a trigger's bucket exists), and the Kafka
topic its change feed arrives on. Loaded with the rest by
``shared.settings.load_settings``; the secret is never logged (``repr`` hides it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from shared.envparse import _float


@dataclass(frozen=True)
class ObjectStoreSettings:
    # The S3 API of the store (SeaweedFS's `weed mini` serves it on :8333); '' = no store
    # configured: cos triggers are then accepted without a bucket check.
    endpoint: str = ""
    access_key: str = ""
    secret_key: str = field(default="", repr=False)
    region: str = "us-east-1"
    # The topic SeaweedFS's filer publishes its changes to (notification.kafka), on the
    # platform's Kafka cluster (IMAGEFN_KAFKA_BOOTSTRAP).
    events_topic: str = "imagefn-objectstore-events"
    # The consumer group every trigger runner reads that topic in (one delivery per
    # group; each runner takes some partitions); '' = "{kafka topic prefix}.cos-triggers".
    consumer_group: str = ""
    # How long a bucket check may take before the PUT answers 503.
    check_timeout_s: float = 5.0


def load_objectstore(env: Mapping[str, str]) -> ObjectStoreSettings:
    o = ObjectStoreSettings()
    return ObjectStoreSettings(
        endpoint=(env.get("IMAGEFN_S3_ENDPOINT") or o.endpoint).rstrip("/"),
        access_key=env.get("IMAGEFN_S3_ACCESS_KEY") or o.access_key,
        secret_key=env.get("IMAGEFN_S3_SECRET_KEY") or o.secret_key,
        region=env.get("IMAGEFN_S3_REGION") or o.region,
        events_topic=env.get("IMAGEFN_OBJECTSTORE_EVENTS_TOPIC") or o.events_topic,
        consumer_group=env.get("IMAGEFN_OBJECTSTORE_GROUP") or o.consumer_group,
        check_timeout_s=_float(env, "IMAGEFN_S3_CHECK_TIMEOUT_S", o.check_timeout_s),
    )
