"""Redis with an ACL: nothing gets in without credentials, a platform role cannot run
what it does not need, and deploy/redis.sh sets all of this up, again and again, on a
fresh machine and over a Redis an earlier set-up started without an ACL."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis
from redis.exceptions import AuthenticationError, NoPermissionError

from shared.roles import ROLES, redis_user, role_variable
from shared.settings import read_env_file
from tests.credentials import ADMIN_HEADERS, TEST_ADMIN_KEY
from tests.integration.conftest import (
    REDIS_ROLES,
    REPO,
    RegistryInfo,
    free_port,
    running_platform,
    unique,
)

SCRIPT = REPO / "deploy/redis.sh"


def without_credentials(url: str) -> str:
    return "redis://" + url.split("@", 1)[1]


async def test_a_connection_without_credentials_is_refused(redis_url: str) -> None:
    anonymous = aioredis.Redis.from_url(without_credentials(redis_url))
    try:
        with pytest.raises(AuthenticationError):
            await anonymous.ping()
    finally:
        await anonymous.aclose()


@pytest.mark.parametrize("role", ["gateway", "worker", "scheduler", "coldstart", "platform"])
async def test_a_role_does_its_work_but_nothing_dangerous(redis_url: str, role: str) -> None:
    r = aioredis.Redis.from_url(REDIS_ROLES[role])
    key = f"acl-{unique(role)}"
    try:
        assert await r.acl_whoami() == redis_user(role)
        await r.set(key, "1", ex=60)
        assert await r.get(key) == b"1"
        for command in (
            ("FLUSHALL",),
            ("CONFIG", "GET", "maxmemory"),
            ("KEYS", "*"),
            ("CLIENT", "LIST"),
            ("ACL", "LIST"),
            ("SHUTDOWN",),
            ("FUNCTION", "FLUSH"),
            ("PUBLISH", "x", "y"),
        ):
            with pytest.raises(NoPermissionError):
                await r.execute_command(*command)  # type: ignore[no-untyped-call]
    finally:
        await r.delete(key)
        await r.aclose()


# -- deploy/redis.sh ----------------------------------------------------------------------


def run_script(port: int, state: Path, data: Path, prefix: str) -> str:
    env = {
        **os.environ,
        "IMAGEFN_REDIS_PORT": str(port),
        "IMAGEFN_STATE_DIR": str(state),
        "IMAGEFN_REDIS_DIR": str(data),
        "IMAGEFN_PREFIX": prefix,
        "IMAGEFN_REDIS_MAXMEMORY_MB": "256",
    }
    done = subprocess.run(
        ["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def wait_listening(port: int) -> None:
    deadline = time.monotonic() + 10
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        assert time.monotonic() < deadline, f"nothing listens on {port}"
        time.sleep(0.02)


def start_without_acl(port: int, data: Path) -> None:
    """What an earlier set-up started: no ACL, no maxmemory."""
    subprocess.run(
        [
            "redis-server",
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--daemonize",
            "yes",
            "--save",
            "",
            "--appendonly",
            "yes",
            "--dir",
            str(data),
        ],
        check=True,
        capture_output=True,
    )
    wait_listening(port)


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[tuple[int, Path, Path, str]]:
    """A port and directories for the script; whatever Redis ends up there is stopped."""
    port = free_port()
    yield port, tmp_path / "state", tmp_path / "data", f"acl-{unique('p')}"
    creds = read_env_file(str(tmp_path / "state/credentials.env"))
    for url in (creds.get("IMAGEFN_REDIS_URL_ADMIN"), f"redis://127.0.0.1:{port}/0"):
        with contextlib.suppress(Exception):
            subprocess.run(
                ["redis-cli", "-u", url or "", "shutdown", "nosave"],
                capture_output=True,
                timeout=10,
                check=False,
            )


async def check_installed(state: Path, prefix: str) -> dict[str, str]:
    """The credentials the script wrote work, and only as they should."""
    creds = read_env_file(str(state / "credentials.env"))
    assert oct((state / "credentials.env").stat().st_mode & 0o777) == "0o600"
    assert oct((state / "redis-users.acl").stat().st_mode & 0o777) == "0o600"
    admin_url = creds["IMAGEFN_REDIS_URL_ADMIN"]
    anonymous = aioredis.Redis.from_url(without_credentials(admin_url))
    worker = aioredis.Redis.from_url(creds["IMAGEFN_REDIS_URL_WORKER"])
    admin = aioredis.Redis.from_url(admin_url)
    try:
        with pytest.raises(AuthenticationError):
            await anonymous.ping()
        await worker.set(f"{prefix}:probe", "1")
        with pytest.raises(NoPermissionError):
            await worker.set("elsewhere:probe", "1")  # keys outside the prefix
        with pytest.raises(NoPermissionError):
            await worker.execute_command("FLUSHALL")  # type: ignore[no-untyped-call]
        assert await admin.config_get("maxmemory") == {"maxmemory": str(256 * 1024 * 1024)}
        assert await admin.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
    finally:
        for c in (anonymous, worker, admin):
            await c.aclose()
    for role in ROLES:
        assert creds[role_variable("IMAGEFN_REDIS_URL", role)].startswith(
            f"redis://{redis_user(role)}:"
        )
    return creds


async def test_the_set_up_starts_redis_with_its_acl_and_a_rerun_changes_nothing(
    scratch: tuple[int, Path, Path, str],
) -> None:
    port, state, data, prefix = scratch
    assert "starting Redis" in run_script(port, state, data, prefix)
    first = await check_installed(state, prefix)
    assert run_script(port, state, data, prefix) == ""  # nothing to do
    assert await check_installed(state, prefix) == first  # same passwords


async def test_the_set_up_converges_a_redis_started_without_acl(
    scratch: tuple[int, Path, Path, str],
) -> None:
    port, state, data, prefix = scratch
    data.mkdir()
    start_without_acl(port, data)
    old = aioredis.Redis.from_url(f"redis://127.0.0.1:{port}/0")
    await old.set(f"{prefix}:functions", "kept")
    await old.aclose()
    assert "applying its users in place" in run_script(port, state, data, prefix)
    creds = await check_installed(state, prefix)
    run_script(port, state, data, prefix)  # again: same result
    assert await check_installed(state, prefix) == creds
    admin = aioredis.Redis.from_url(creds["IMAGEFN_REDIS_URL_ADMIN"])
    try:
        assert await admin.get(f"{prefix}:functions") == b"kept"
    finally:
        await admin.aclose()


@pytest.fixture
async def admin_client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(
        headers=ADMIN_HEADERS, timeout=aiohttp.ClientTimeout(total=120)
    ) as s:
        yield s


async def test_a_platform_runs_on_the_roles_the_set_up_made(
    scratch: tuple[int, Path, Path, str],
    pushed_images: None,
    log_dir: Path,
    registry: RegistryInfo,
    admin_client: aiohttp.ClientSession,
) -> None:
    """Gateway, worker, scheduler and cold-start manager each as their own user, with
    the production rules (keys under the installation's prefix only): a function deploys
    and answers."""
    port, state, data, prefix = scratch
    run_script(port, state, data, prefix)
    creds = read_env_file(str(state / "credentials.env"))
    roles = {k: v for k, v in creds.items() if k.startswith("IMAGEFN_REDIS_URL_")}
    env = {
        **roles,
        "IMAGEFN_REDIS_URL": creds["IMAGEFN_REDIS_URL_GATEWAY"],
        "IMAGEFN_ADMIN_KEY": TEST_ADMIN_KEY,
    }
    async with running_platform(
        creds["IMAGEFN_REDIS_URL_ADMIN"], log_dir, registry, prefix=prefix, extra_env=env
    ) as p:
        await p.add_scheduler()
        await p.add_coldstart()
        name = unique("acl")
        await p.deploy(admin_client, name)
        status, _, body = await p.invoke(admin_client, name, {"n": 1})
        assert status == 200, body
        admin = aioredis.Redis.from_url(creds["IMAGEFN_REDIS_URL_ADMIN"])
        try:
            users = {c["user"] for c in await admin.client_list()}
        finally:
            await admin.aclose()
        assert {f"imagefn-{r}" for r in ("gateway", "worker", "scheduler", "coldstart")} <= users
        for proc in p.workers + p.managers:
            assert "NOPERM" not in proc.log_text()
