"""Each server command runs as its own Redis user (and Kafka principal): which variable
it takes, in which order, and that deploy/redis.sh grants what shared/roles.py says."""

from __future__ import annotations

import re
from pathlib import Path

from cli.main import build_parser
from shared.roles import (
    ADMIN_ROLE,
    COMMAND_ROLES,
    REDIS_ROLE_RULES,
    ROLES,
    redis_user,
    role_env,
)
from shared.settings import load_settings

REPO = Path(__file__).resolve().parents[2]
FILE = {
    "IMAGEFN_REDIS_URL_WORKER": "redis://imagefn-worker:w@127.0.0.1:6379/0",
    "IMAGEFN_REDIS_URL_GATEWAY": "redis://imagefn-gateway:g@127.0.0.1:6379/0",
    "IMAGEFN_REDIS_URL_PLATFORM": "redis://imagefn-platform:p@127.0.0.1:6379/0",
    "IMAGEFN_DEPLOY_PASSWORD": "d",
}


def url_of(role: str | None, environ: dict[str, str], file_env: dict[str, str]) -> str:
    return load_settings(role_env(role, environ, file_env)).redis.url


def test_a_server_command_takes_its_roles_url_from_the_credentials_file() -> None:
    assert url_of("worker", {}, FILE) == FILE["IMAGEFN_REDIS_URL_WORKER"]
    assert url_of("gateway", {}, FILE) == FILE["IMAGEFN_REDIS_URL_GATEWAY"]
    assert url_of(COMMAND_ROLES["up"], {}, FILE) == FILE["IMAGEFN_REDIS_URL_PLATFORM"]
    # The rest of the file still applies.
    assert load_settings(role_env("worker", {}, FILE)).registry.deploy_password == "d"


def test_the_environment_wins_over_the_file_and_a_role_variable_over_the_shared_one() -> None:
    shared = {"IMAGEFN_REDIS_URL": "redis://elsewhere:6380/1"}
    # An operator's IMAGEFN_REDIS_URL beats the file's role URL...
    assert url_of("worker", shared, FILE) == "redis://elsewhere:6380/1"
    # ...and within one source the role's own variable beats the shared one.
    both = {**shared, "IMAGEFN_REDIS_URL_WORKER": "redis://imagefn-worker:x@h:1/0"}
    assert url_of("worker", both, {}) == "redis://imagefn-worker:x@h:1/0"
    assert url_of("gateway", both, {}) == "redis://elsewhere:6380/1"
    assert url_of("worker", {}, {**FILE, **shared}) == FILE["IMAGEFN_REDIS_URL_WORKER"]


def test_a_role_without_a_url_falls_back_to_the_default_and_clients_have_no_role() -> None:
    assert url_of("scheduler", {}, FILE) == "redis://127.0.0.1:6379/0"
    assert url_of(None, {}, FILE) == "redis://127.0.0.1:6379/0"


def test_the_kafka_principal_is_chosen_per_role_too() -> None:
    env = {
        "IMAGEFN_KAFKA_SASL_USERNAME_WORKER": "imagefn-worker",
        "IMAGEFN_KAFKA_SASL_PASSWORD_WORKER": "pw",
        "IMAGEFN_KAFKA_SASL_USERNAME": "imagefn-shared",
        "IMAGEFN_KAFKA_SASL_PASSWORD": "shared-pw",
    }
    worker = load_settings(role_env("worker", env, {})).kafka
    assert (worker.sasl_username, worker.sasl_password) == ("imagefn-worker", "pw")
    gateway = load_settings(role_env("gateway", env, {})).kafka
    assert (gateway.sasl_username, gateway.sasl_password) == ("imagefn-shared", "shared-pw")


def test_every_server_command_has_a_role() -> None:
    parser = build_parser()
    choices = next(
        a.choices for a in parser._actions if a.dest == "command" and a.choices is not None
    )
    servers = {"up", "gateway", "worker", "scheduler", "coldstart", "triggers"}
    assert servers <= set(choices)
    assert set(COMMAND_ROLES) == servers
    assert set(ROLES) == {*COMMAND_ROLES.values(), ADMIN_ROLE}


def test_deploy_redis_sh_grants_the_roles_and_rules_of_shared_roles() -> None:
    script = (REPO / "deploy/redis.sh").read_text()
    roles = re.search(r"^ROLES=\((.*)\)$", script, re.M)
    assert roles is not None
    assert set(roles.group(1).split()) == set(ROLES) - {ADMIN_ROLE}
    assert f'ROLE_RULES="{REDIS_ROLE_RULES}"' in script
    assert "imagefn-$role" in script and redis_user("worker") == "imagefn-worker"
    assert "user default off" in script
