"""shared.settings.load_settings: from a plain mapping, never from os.environ."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from shared.errors import InvalidRequest
from shared.settings import (
    MAX_TOKEN_TTL_S,
    WORKER_USER,
    GatewaySettings,
    QueueSettings,
    RedisSettings,
    RegistrySettings,
    WorkerSettings,
    load_settings,
    read_env_file,
)


def test_empty_env_gives_the_defaults() -> None:
    s = load_settings({})
    assert s.redis == RedisSettings()
    assert s.redis.url == "redis://127.0.0.1:6379/0"
    assert s.queue == QueueSettings()
    assert s.gateway == GatewaySettings()
    assert s.registry == RegistrySettings()
    assert s.log_level == "info"
    # Only the worker id is generated; every other worker setting is the default.
    assert s.worker.worker_id
    assert dataclasses.replace(s.worker, worker_id="") == WorkerSettings()


def test_generated_worker_ids_differ() -> None:
    assert load_settings({}).worker.worker_id != load_settings({}).worker.worker_id


def test_empty_strings_mean_unset() -> None:
    env = {
        "IMAGEFN_GATEWAY_PORT": "",
        "IMAGEFN_RESULT_GRACE_S": "",
        "IMAGEFN_CHECK_IMAGES": "",
        "IMAGEFN_WORKER_ID": "",
        "IMAGEFN_DOCKER_URL": "",
    }
    s = load_settings(env)
    assert s.gateway == GatewaySettings()
    assert s.worker.worker_id != ""
    assert s.worker.docker_url is None


def test_overrides() -> None:
    env = {
        "IMAGEFN_REDIS_URL": "redis://redis:6380/2",
        "IMAGEFN_QUEUE_BACKEND": "redis",
        "IMAGEFN_PREFIX": "staging",
        "IMAGEFN_RECLAIM_IDLE_MS": "30000",
        "IMAGEFN_CLAIM_REFRESH_S": "1.5",
        "IMAGEFN_REPLY_TTL_S": "60",
        "IMAGEFN_GATEWAY_HOST": "0.0.0.0",
        "IMAGEFN_GATEWAY_PORT": "9090",
        "IMAGEFN_MAX_BODY_BYTES": "1024",
        "IMAGEFN_RESULT_GRACE_S": "0.5",
        "IMAGEFN_CHECK_IMAGES": "false",
        "IMAGEFN_WORKER_ID": "w-7",
        "IMAGEFN_DOCKER_URL": "unix:///tmp/docker.sock",
        "IMAGEFN_WORKER_MAX_INFLIGHT": "8",
        "IMAGEFN_WORKER_MEMORY_MB": "2048",
        "IMAGEFN_HEARTBEAT_S": "0.25",
        "IMAGEFN_HEARTBEAT_TTL_S": "1",
        "IMAGEFN_JANITOR_INTERVAL_S": "3",
        "IMAGEFN_DRAIN_TIMEOUT_S": "4.5",
        "IMAGEFN_LOG_LEVEL": "debug",
    }
    s = load_settings(env)
    assert s.redis.url == "redis://redis:6380/2"
    assert s.queue == QueueSettings(
        backend="redis",
        prefix="staging",
        reclaim_idle_ms=30000,
        claim_refresh_s=1.5,
        reply_ttl_s=60,
    )
    assert s.gateway == GatewaySettings(
        host="0.0.0.0", port=9090, max_body_bytes=1024, result_grace_s=0.5, check_images=False
    )
    w = s.worker
    assert (w.worker_id, w.docker_url) == ("w-7", "unix:///tmp/docker.sock")
    assert (w.max_inflight, w.memory_capacity_mb) == (8, 2048)
    assert (w.heartbeat_s, w.heartbeat_ttl_s) == (0.25, 1.0)
    assert (w.janitor_interval_s, w.drain_timeout_s) == (3.0, 4.5)
    assert s.log_level == "debug"


def test_other_variables_are_ignored() -> None:
    s = load_settings({"PATH": "/bin", "IMAGEFN_UNKNOWN": "x", "imagefn_gateway_port": "1"})
    assert s.gateway.port == 8080


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("1", True),
        ("true", True),
        ("YES", True),
        ("On", True),
        ("0", False),
        ("false", False),
        ("No", False),
        ("OFF", False),
    ],
)
def test_bool_spellings(raw: str, expected: bool) -> None:
    assert load_settings({"IMAGEFN_CHECK_IMAGES": raw}).gateway.check_images is expected


@pytest.mark.parametrize(
    ("name", "raw", "kind"),
    [
        ("IMAGEFN_GATEWAY_PORT", "80a", "integer"),
        ("IMAGEFN_GATEWAY_PORT", "1.5", "integer"),
        ("IMAGEFN_RECLAIM_IDLE_MS", "lots", "integer"),
        ("IMAGEFN_WORKER_MEMORY_MB", "2G", "integer"),
        ("IMAGEFN_RESULT_GRACE_S", "5s", "number"),
        ("IMAGEFN_HEARTBEAT_S", "fast", "number"),
        ("IMAGEFN_CHECK_IMAGES", "maybe", "boolean"),
        ("IMAGEFN_CHECK_IMAGES", "2", "boolean"),
    ],
)
def test_bad_values_name_the_variable(name: str, raw: str, kind: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        load_settings({name: raw})
    assert name in info.value.message
    assert repr(raw) in info.value.message
    assert kind in info.value.message


@pytest.mark.parametrize("backend", ["memory", "Redis", "KAFKA"])
def test_unknown_queue_backend_is_rejected(backend: str) -> None:
    with pytest.raises(InvalidRequest, match="IMAGEFN_QUEUE_BACKEND"):
        load_settings({"IMAGEFN_QUEUE_BACKEND": backend})


def test_kafka_backend_needs_a_bootstrap() -> None:
    s = load_settings({"IMAGEFN_QUEUE_BACKEND": "kafka"})
    assert s.queue.backend == "kafka" and s.kafka.bootstrap == "127.0.0.1:9092"
    with pytest.raises(InvalidRequest, match="IMAGEFN_KAFKA_BOOTSTRAP"):
        load_settings({"IMAGEFN_QUEUE_BACKEND": "kafka", "IMAGEFN_KAFKA_BOOTSTRAP": ""})


def test_kafka_topic_prefix_follows_the_installation_prefix_in_kafka_characters() -> None:
    s = load_settings({"IMAGEFN_PREFIX": "team:a/b"})
    assert s.kafka.topic_prefix == "team-a-b"
    s = load_settings({"IMAGEFN_PREFIX": "x", "IMAGEFN_KAFKA_TOPIC_PREFIX": "prod.fn"})
    assert s.kafka.topic_prefix == "prod.fn"


def test_the_queues_fetch_wait_is_short_by_default_and_positive() -> None:
    assert load_settings({}).kafka.queue_fetch_wait_ms == 20
    env = {"IMAGEFN_KAFKA_QUEUE_FETCH_WAIT_MS": "500"}
    assert load_settings(env).kafka.queue_fetch_wait_ms == 500
    with pytest.raises(InvalidRequest, match="IMAGEFN_KAFKA_QUEUE_FETCH_WAIT_MS"):
        load_settings({"IMAGEFN_KAFKA_QUEUE_FETCH_WAIT_MS": "0"})


def test_no_bootstrap_turns_log_shipping_off() -> None:
    assert load_settings({}).logs.enabled
    assert not load_settings({"IMAGEFN_KAFKA_BOOTSTRAP": ""}).logs.enabled
    assert not load_settings({"IMAGEFN_LOGS": "off"}).logs.enabled
    with pytest.raises(InvalidRequest, match="IMAGEFN_LOG_BUFFER_MB"):
        load_settings({"IMAGEFN_LOG_BUFFER_MB": "0"})


def test_container_log_files_are_bounded_by_settings() -> None:
    w = load_settings({}).worker
    assert (w.container_log_max_mb, w.container_log_files) == (64, 2)
    env = {"IMAGEFN_CONTAINER_LOG_MAX_MB": "16", "IMAGEFN_CONTAINER_LOG_FILES": "3"}
    w = load_settings(env).worker
    assert (w.container_log_max_mb, w.container_log_files) == (16, 3)
    with pytest.raises(InvalidRequest, match="IMAGEFN_CONTAINER_LOG_FILES"):
        load_settings({"IMAGEFN_CONTAINER_LOG_FILES": "0"})
    assert load_settings({}).worker.container_log_driver == "local"
    env = {"IMAGEFN_CONTAINER_LOG_DRIVER": "json-file"}
    assert load_settings(env).worker.container_log_driver == "json-file"
    with pytest.raises(InvalidRequest, match="IMAGEFN_CONTAINER_LOG_DRIVER"):
        load_settings({"IMAGEFN_CONTAINER_LOG_DRIVER": "syslog"})


def test_empty_strings_mean_defaults() -> None:
    s = load_settings({"IMAGEFN_QUEUE_BACKEND": "", "IMAGEFN_PREFIX": "", "IMAGEFN_REDIS_URL": ""})
    assert (s.queue.backend, s.queue.prefix) == ("redis", "imagefn")
    assert s.redis.url == "redis://127.0.0.1:6379/0"


def test_settings_are_frozen() -> None:
    s = load_settings({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.gateway.port = 1  # type: ignore[misc]


# -- the registry ------------------------------------------------------------------------------


def test_registry_defaults() -> None:
    r = load_settings({}).registry
    assert r.address == "127.0.0.1:5000"
    assert (r.service, r.issuer) == ("imagefn-registry", "imagefn")
    assert 1 <= r.token_ttl_s <= MAX_TOKEN_TTL_S == 900
    # No credential is configured unless given: those principals cannot log in.
    assert (r.deploy_password, r.worker_secret) == ("", "")
    assert r.deploy_user == "imagefn-deployer" != WORKER_USER
    assert r.token_url.endswith("/v1/registry/token")
    assert r.pull_timeout_s > 0 and r.image_cache_mb > 0


def test_registry_overrides() -> None:
    env = {
        "IMAGEFN_REGISTRY": "registry.test:5000",
        "IMAGEFN_REGISTRY_SERVICE": "svc",
        "IMAGEFN_TOKEN_ISSUER": "iss",
        "IMAGEFN_TOKEN_TTL_S": "900",
        "IMAGEFN_TOKEN_KEY": "/k/token.key",
        "IMAGEFN_TOKEN_CERT": "/k/token.crt",
        "IMAGEFN_DEPLOY_USER": "ci",
        "IMAGEFN_DEPLOY_PASSWORD": "dep1oy-pass",
        "IMAGEFN_WORKER_SECRET": "w0rker-secret",
        "IMAGEFN_TOKEN_URL": "http://gw:8080/v1/registry/token",
        "IMAGEFN_PULL_TIMEOUT_S": "7.5",
        "IMAGEFN_IMAGE_CACHE_MB": "512",
    }
    assert load_settings(env).registry == RegistrySettings(
        address="registry.test:5000",
        service="svc",
        issuer="iss",
        token_ttl_s=900,
        signing_key="/k/token.key",
        signing_cert="/k/token.crt",
        deploy_user="ci",
        deploy_password="dep1oy-pass",
        worker_secret="w0rker-secret",
        token_url="http://gw:8080/v1/registry/token",
        pull_timeout_s=7.5,
        image_cache_mb=512,
    )


def test_registry_empty_strings_mean_defaults() -> None:
    names = [
        "IMAGEFN_REGISTRY",
        "IMAGEFN_TOKEN_TTL_S",
        "IMAGEFN_DEPLOY_USER",
        "IMAGEFN_DEPLOY_PASSWORD",
        "IMAGEFN_WORKER_SECRET",
        "IMAGEFN_PULL_TIMEOUT_S",
        "IMAGEFN_IMAGE_CACHE_MB",
    ]
    assert load_settings(dict.fromkeys(names, "")).registry == RegistrySettings()


@pytest.mark.parametrize("ttl", ["0", "-5", "901", "3600"])
def test_token_ttl_is_bounded_to_15_minutes(ttl: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        load_settings({"IMAGEFN_TOKEN_TTL_S": ttl})
    assert "IMAGEFN_TOKEN_TTL_S" in info.value.message and "900" in info.value.message


@pytest.mark.parametrize(
    ("name", "raw", "kind"),
    [
        ("IMAGEFN_TOKEN_TTL_S", "5m", "integer"),
        ("IMAGEFN_PULL_TIMEOUT_S", "slow", "number"),
        ("IMAGEFN_IMAGE_CACHE_MB", "20G", "integer"),
    ],
)
def test_bad_registry_values_name_the_variable(name: str, raw: str, kind: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        load_settings({name: raw})
    assert name in info.value.message and kind in info.value.message


def test_the_deployer_cannot_take_the_workers_name() -> None:
    with pytest.raises(InvalidRequest, match="IMAGEFN_DEPLOY_USER"):
        load_settings({"IMAGEFN_DEPLOY_USER": WORKER_USER})


def test_credentials_are_kept_out_of_reprs() -> None:
    s = load_settings(
        {"IMAGEFN_DEPLOY_PASSWORD": "dep1oy-pass", "IMAGEFN_WORKER_SECRET": "w0rker-secret"}
    )
    for text in (repr(s), str(s), repr(s.registry)):
        assert "dep1oy-pass" not in text and "w0rker-secret" not in text
    assert s.registry.deploy_password == "dep1oy-pass"


# -- the credentials file ----------------------------------------------------------------------


def test_read_env_file(tmp_path: Path) -> None:
    path = tmp_path / "credentials.env"
    path.write_text(
        "# written by deploy/registry.sh\n"
        "\n"
        "IMAGEFN_DEPLOY_PASSWORD='pa=ss'\n"
        '  IMAGEFN_WORKER_SECRET = "s3cret"  \n'
        "IMAGEFN_REGISTRY=127.0.0.1:5000\n"
        "not an assignment\n"
        "IMAGEFN_EMPTY=\n"
    )
    assert read_env_file(str(path)) == {
        "IMAGEFN_DEPLOY_PASSWORD": "pa=ss",
        "IMAGEFN_WORKER_SECRET": "s3cret",
        "IMAGEFN_REGISTRY": "127.0.0.1:5000",
        "IMAGEFN_EMPTY": "",
    }


def test_missing_or_unreadable_env_file_is_empty(tmp_path: Path) -> None:
    assert read_env_file(str(tmp_path / "absent.env")) == {}
    assert read_env_file(str(tmp_path)) == {}  # a directory: cannot be read as a file


def test_env_file_values_load_as_settings(tmp_path: Path) -> None:
    path = tmp_path / "credentials.env"
    path.write_text("IMAGEFN_WORKER_SECRET=w0rker-secret\nIMAGEFN_TOKEN_TTL_S=600\n")
    s = load_settings({**read_env_file(str(path)), "IMAGEFN_TOKEN_TTL_S": "60"})
    assert (s.registry.worker_secret, s.registry.token_ttl_s) == ("w0rker-secret", 60)


@pytest.mark.parametrize("bad", ["a:b", "has space", "glob*"])
def test_worker_ids_that_would_break_key_names_are_refused(bad: str) -> None:
    with pytest.raises(InvalidRequest, match="IMAGEFN_WORKER_ID"):
        load_settings({"IMAGEFN_WORKER_ID": bad})


def test_async_settings_load_and_refuse_a_zero_tick() -> None:
    s = load_settings(
        {
            "IMAGEFN_RESULT_TTL_S": "60",
            "IMAGEFN_RETRY_BASE_DELAY_S": "0.2",
            "IMAGEFN_BATCH_TICK_S": "0.005",
            "IMAGEFN_ASYNC_MAX_EVENT_BYTES": "1000",
        }
    ).asyncinv
    assert (s.result_ttl_s, s.retry_base_delay_s, s.batch_tick_s, s.max_event_bytes) == (
        60,
        0.2,
        0.005,
        1000,
    )
    for name in (
        "IMAGEFN_SCHEDULER_TICK_S",
        "IMAGEFN_BATCH_TICK_S",
        "IMAGEFN_DESTINATION_TIMEOUT_S",
    ):
        with pytest.raises(InvalidRequest, match=name):
            load_settings({name: "0"})
