"""Kafka clients reach a cluster that asks for SASL (and TLS) with the role's principal:
every producer, consumer and admin client gets the same connection options; the logs
topic is created bounded by time and by bytes."""

from __future__ import annotations

import ssl
from typing import Any

import pytest
from aiokafka.admin import NewTopic

from shared import kafka
from shared.errors import InvalidRequest
from shared.settings import KafkaSettings, LogSettings, load_settings

SASL = {
    "IMAGEFN_KAFKA_SASL_USERNAME": "imagefn-worker",
    "IMAGEFN_KAFKA_SASL_PASSWORD": "s3cret",
}


def test_plaintext_by_default_with_no_sasl_options() -> None:
    k = load_settings({}).kafka
    assert k.security_protocol == "PLAINTEXT"
    assert kafka.connection_options(k) == {
        "bootstrap_servers": "127.0.0.1:9092",
        "security_protocol": "PLAINTEXT",
    }


def test_a_principal_means_sasl_plaintext_with_scram_sha_512() -> None:
    k = load_settings(SASL).kafka
    assert "s3cret" not in repr(k)
    assert kafka.connection_options(k) == {
        "bootstrap_servers": "127.0.0.1:9092",
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "imagefn-worker",
        "sasl_plain_password": "s3cret",
    }


def test_sasl_ssl_gets_a_verifying_tls_context() -> None:
    env = {
        **SASL,
        "IMAGEFN_KAFKA_SECURITY_PROTOCOL": "sasl_ssl",
        "IMAGEFN_KAFKA_SASL_MECHANISM": "SCRAM-SHA-256",
    }
    options = kafka.connection_options(load_settings(env).kafka)
    assert options["security_protocol"] == "SASL_SSL"
    assert options["sasl_mechanism"] == "SCRAM-SHA-256"
    context = options["ssl_context"]
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"IMAGEFN_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT"}, "IMAGEFN_KAFKA_SASL_USERNAME"),
        ({"IMAGEFN_KAFKA_SECURITY_PROTOCOL": "TLS"}, "IMAGEFN_KAFKA_SECURITY_PROTOCOL"),
        ({**SASL, "IMAGEFN_KAFKA_SASL_MECHANISM": "GSSAPI"}, "IMAGEFN_KAFKA_SASL_MECHANISM"),
    ],
)
def test_bad_security_settings_are_refused_by_name(env: dict[str, str], named: str) -> None:
    with pytest.raises(InvalidRequest, match=named):
        load_settings(env)


def test_every_client_gets_the_connection_options(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[tuple[str, dict[str, Any]]] = []

    def recorder(name: str) -> Any:
        def make(*args: Any, **kwargs: Any) -> str:
            made.append((name, kwargs))
            return name

        return make

    monkeypatch.setattr(kafka, "AIOKafkaProducer", recorder("producer"))
    monkeypatch.setattr(kafka, "AIOKafkaConsumer", recorder("consumer"))
    k = load_settings(SASL).kafka
    kafka.producer(k, client_id="x")
    kafka.consumer(k, "topic", group_id="g")
    for name, kwargs in made:
        assert kwargs["security_protocol"] == "SASL_PLAINTEXT", name
        assert kwargs["sasl_plain_username"] == "imagefn-worker", name
        assert kwargs["sasl_plain_password"] == "s3cret", name
    assert [n for n, _ in made] == ["producer", "consumer"]


async def test_the_admin_client_gets_them_too(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    class Admin:
        def __init__(self, **kwargs: Any) -> None:
            seen.update(kwargs)

        async def start(self) -> None: ...

        async def list_topics(self) -> list[str]:
            return ["imagefn.logs"]

        async def close(self) -> None: ...

    monkeypatch.setattr(kafka, "AIOKafkaAdminClient", Admin)
    await kafka.ensure_topic(load_settings(SASL).kafka, "imagefn.logs")
    assert seen["security_protocol"] == "SASL_PLAINTEXT"
    assert seen["sasl_mechanism"] == "SCRAM-SHA-512"
    assert seen["sasl_plain_password"] == "s3cret"


async def test_the_logs_topic_is_bounded_by_time_and_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    created: list[NewTopic] = []

    async def capture(settings: KafkaSettings, chosen: list[NewTopic]) -> None:
        created.extend(chosen)

    monkeypatch.setattr(kafka, "_create_missing", capture)
    s = load_settings({"IMAGEFN_LOG_RETENTION_MB": "512", "IMAGEFN_LOG_RETENTION_HOURS": "24"})
    await kafka.ensure_topics(s.kafka, s.logs, which=("logs",))
    (logs,) = created
    assert logs.topic_configs == {
        "retention.ms": str(24 * 3_600_000),
        "retention.bytes": str(512 * 1024 * 1024),
        "segment.bytes": str(128 * 1024 * 1024),
    }
    assert LogSettings().retention_mb == 1024
