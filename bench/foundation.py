#!/usr/bin/env python3
"""Foundation benchmark of imagefn: the platform side by side with the bare container.

One run, one machine, three measurements (see bench/README.md):

1. warm latency of a no-op event: gateway ``POST /v1/functions/NAME/invoke`` vs the same
   POST straight to the instance container's published port (``/event-invoke``),
   interleaved in alternating blocks;
2. cold start: first response of a function with no instance, through the gateway, vs a
   bare container started by ``docker run`` (CLI) and by the Engine API (aiodocker
   create+start, with a minimal config and with the platform's own sandbox config),
   each polled with ``POST /event-invoke`` until the first 200; rounds alternate;
3. saturation throughput with C concurrent clients: gateway vs direct, for a function
   with several instances and like-for-like with one instance;
4. cold start including the image pull (issue 3): each round a new image (the bench
   image + a unique ENV and a small random layer), pushed to the registry and removed
   locally, then the first invoke through the gateway (the worker pulls by digest) vs
   ``docker pull REPO@DIGEST`` + ``docker run`` (CLI) and vs an Engine API pull + create
   + start, each polled with ``POST /event-invoke`` until the first 200;
5. wake from idle (issue 4, ``--only wake``): through the gateway, in alternating rounds,
   warm (an instance just used), wake (the function's only instance frozen by
   ``docker pause``, then one invoke), provisioned first call (a fresh function with
   ``provisioned_concurrency: 1``, its first invoke once the cold-start manager's
   instance is up), true cold (a fresh function, image present) and a bare
   ``docker run`` to the first 200. This part needs the platform to freeze idle
   instances (``IMAGEFN_PAUSE_AFTER_S=1``); every other part needs it not to (``0``), so
   the platform is restarted with that setting before this part when others ran first.

Function images live in the platform registry. The script starts its own: signing keys
in a temporary directory, a token-auth ``docker-registry`` on a free port whose realm is
the bench platform's own gateway token route, then ``imagefn up`` on a free port under a
unique Redis prefix and worker id, with the registry settings and a bootstrap admin key
of its own (``IMAGEFN_ADMIN_KEY``, random per run, never printed) in its environment;
every request to the gateway carries that key (``Authorization: Bearer``), requests
straight to a container do not. It pushes the bench image as the deployer and deploys
functions by repository name. At the end it removes everything it created: functions,
containers, the images it tagged or pulled, the registry process and its directory (keys,
storage, the throwaway Docker CLI config), and the Redis keys under its prefix. All
traffic goes to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import resource
import secrets
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiodocker
import aiohttp
import redis.asyncio as aioredis

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from peers.common import local_redis_url  # noqa: E402  (bench/peers, beside this script)

from tests.integration.registry_support import (  # noqa: E402
    make_token_keys,
    start_registry,
    stop_registry,
    write_registry_config,
)

DEFAULT_IMAGE = "imagefn-examples/hello-event:latest"
BODY = b'{"name":"bench"}'
BENCH_LABEL = "imagefn.bench"  # on the bare containers this script starts itself
WORKER_LABEL = "imagefn.worker"
FUNCTION_LABEL = "imagefn.function"
INSTANCE_LABEL = "imagefn.instance"
MANAGED_LABEL = "imagefn.managed"


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- statistics ------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    """Percentile with linear interpolation between closest ranks (q in 0..100)."""
    if not values:
        return float("nan")
    s = sorted(values)
    if len(s) == 1:
        return s[0]
    k = (len(s) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summary(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50": pct(values, 50),
        "p90": pct(values, 90),
        "p99": pct(values, 99),
        "mean": sum(values) / len(values) if values else float("nan"),
        "min": min(values) if values else float("nan"),
        "max": max(values) if values else float("nan"),
    }


def parse_server_timing(value: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for part in value.split(","):
        name, _, rest = part.strip().partition(";")
        if rest.startswith("dur="):
            with contextlib.suppress(ValueError):
                out[name] = float(rest[4:])
    return out


# -- machine and CPU accounting --------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {}
    try:
        info["nproc"] = len(os.sched_getaffinity(0))
    except AttributeError:
        info["nproc"] = os.cpu_count()
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    info["cpu_model"] = model or platform.processor() or "unknown"
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["memory_gib"] = round(int(line.split()[1]) / 1024 / 1024, 1)
    info["kernel"] = platform.release()
    try:
        out = subprocess.run(
            ["docker", "version", "--format", "{{.Server.Version}} (API {{.Server.APIVersion}})"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        info["docker"] = out.stdout.strip() or out.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        info["docker"] = f"unknown ({e})"
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.splitlines()
        info["code"] = (
            f"commit {head}" + (f" + {len(dirty)} uncommitted modified file(s)" if dirty else "")
            if head
            else f"unknown: {REPO} is not a git checkout (see --code)"
        )
    except (OSError, subprocess.TimeoutExpired):
        info["code"] = "unknown"
    info["python"] = platform.python_version()
    info["aiohttp"] = aiohttp.__version__
    with contextlib.suppress(OSError):
        info["loadavg_at_start"] = Path("/proc/loadavg").read_text().split()[:3]
    return info


def _proc_cpu_s(pid: int) -> float:
    """utime+stime of a process and its live descendants, in seconds: ``imagefn up`` runs
    its gateway (cli/up.py) and the log shipper as child processes (0 when unreadable)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        ticks = os.sysconf("SC_CLK_TCK")
        own = (int(fields[11]) + int(fields[12])) / ticks
    except (OSError, ValueError, IndexError):
        return 0.0
    children: list[int] = []
    with contextlib.suppress(OSError, ValueError):
        for task in os.listdir(f"/proc/{pid}/task"):
            children += [
                int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()
            ]
    return own + sum(_proc_cpu_s(c) for c in children)


def _machine_cpu() -> tuple[float, float]:
    """(busy, total) jiffies from /proc/stat."""
    try:
        parts = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return 0.0, 0.0
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0)
    total = sum(parts[:8])
    return float(total - idle), float(total)


def _self_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


@dataclass
class CpuWindow:
    """CPU used during one phase: the machine, this client, the platform process."""

    platform_pid: int
    t0: float = 0.0
    m0: tuple[float, float] = (0.0, 0.0)
    c0: float = 0.0
    p0: float = 0.0
    result: dict[str, float] = field(default_factory=dict)

    def __enter__(self) -> CpuWindow:
        self.t0 = time.monotonic()
        self.m0 = _machine_cpu()
        self.c0 = _self_cpu_s()
        self.p0 = _proc_cpu_s(self.platform_pid)
        return self

    def __exit__(self, *exc: object) -> None:
        wall = max(1e-9, time.monotonic() - self.t0)
        busy1, total1 = _machine_cpu()
        dbusy, dtotal = busy1 - self.m0[0], total1 - self.m0[1]
        ncpu = os.cpu_count() or 1
        self.result = {
            "wall_s": wall,
            # Cores busy on the whole machine (all processes, ours and others').
            "machine_busy_cores": (dbusy / dtotal * ncpu) if dtotal else float("nan"),
            "client_cores": (_self_cpu_s() - self.c0) / wall,
            "platform_cores": (_proc_cpu_s(self.platform_pid) - self.p0) / wall,
            "platform_cpu_s": _proc_cpu_s(self.platform_pid) - self.p0,
        }


async def sample_load(machine: dict[str, Any]) -> None:
    """Record the highest 1-minute load average seen (every 2 s) in ``machine``."""
    while True:
        with contextlib.suppress(OSError, ValueError, IndexError):
            one = float(Path("/proc/loadavg").read_text().split()[0])  # noqa: ASYNC240
            machine["loadavg_1m_peak"] = max(machine.get("loadavg_1m_peak", 0.0), one)
        await asyncio.sleep(2)


# -- the platform under test -----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def new_admin_key() -> str:
    """A bootstrap admin key for one bench platform, in the platform's key format
    (``ifn_<12 hex>_<secret>``): random per run, never printed or written to a report."""
    return "ifn_" + secrets.token_hex(6) + "_" + secrets.token_urlsafe(32)


class Platform:
    """``imagefn up`` as a subprocess with its own port, Redis prefix and worker id."""

    def __init__(
        self, redis_url: str, log_level: str, workdir: Path, profile: str | None = None
    ) -> None:
        self.profile = profile
        tag = "".join(random.choices(string.ascii_lowercase + string.digits, k=8))
        self.tag = tag
        self.prefix = f"bench-{tag}"
        self.worker_id = f"bench-{tag}"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.redis_url = redis_url
        self.log_level = log_level
        self.log_path = workdir / "imagefn-up.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._logf: Any = None
        self.pause_after_s: float = 0
        # The gateway requires an API key on every /v1/ route: the platform gets this one
        # as its bootstrap admin key (IMAGEFN_ADMIN_KEY) and the bench sends it.
        self.admin_key = new_admin_key()

    @property
    def auth_headers(self) -> dict[str, str]:
        """The header every request to this platform's gateway carries (not the requests
        straight to a container: those never pass the gateway)."""
        return {"Authorization": f"Bearer {self.admin_key}"}

    def command(self) -> list[str]:
        if self.profile:
            # Diagnostic only: cProfile slows the platform down; do not compare figures.
            return [sys.executable, "-m", "cProfile", "-o", self.profile, "-m", "cli.main", "up"]
        exe = Path(sys.executable).parent / "imagefn"
        if exe.exists():
            return [str(exe), "up"]
        found = shutil.which("imagefn")
        if found:
            return [found, "up"]
        return [sys.executable, "-m", "cli.main", "up"]

    async def guard_other_installations(self, docker: aiodocker.Docker) -> int:
        """Protect other installations' containers from this worker's startup janitor.

        In the foundation commit (63d05be) the janitor (workers/worker.py,
        _remove_orphans) lists every imagefn-managed container on the engine and removes
        those whose worker has no heartbeat *under this installation's prefix*: every
        other installation's containers, e.g. a test suite's running on the same engine.
        Later versions only judge containers labelled with their own installation. To be
        safe with either, write a heartbeat key under our own prefix for each owner seen
        now, and push the periodic janitor out to 1 h (IMAGEFN_JANITOR_INTERVAL_S).
        """
        items = await docker.containers.list(
            all=True, filters=json.dumps({"label": [f"{MANAGED_LABEL}=1"]})
        )
        owners = {(c._container.get("Labels") or {}).get(WORKER_LABEL, "") for c in items} - {""}
        if owners:
            r = aioredis.Redis.from_url(self.redis_url)
            try:
                for owner in owners:
                    await r.set(f"{self.prefix}:worker:{owner}", "bench-guard", px=3_600_000)
            finally:
                await r.aclose()
        return len(owners)

    async def start(
        self, extra_env: dict[str, str] | None = None, pause_after_s: float = 0
    ) -> None:
        self.pause_after_s = pause_after_s
        env = dict(os.environ)
        env.update(extra_env or {})
        env.update(
            {
                "IMAGEFN_GATEWAY_PORT": str(self.port),
                "IMAGEFN_GATEWAY_HOST": "127.0.0.1",
                "IMAGEFN_PREFIX": self.prefix,
                "IMAGEFN_REDIS_URL": self.redis_url,
                "IMAGEFN_WORKER_ID": self.worker_id,
                "IMAGEFN_JANITOR_INTERVAL_S": "3600",
                # 0 (the default here): keep idle instances running (no docker pause,
                # from ad5c9d2 on): the direct rows send requests straight to the
                # containers while the platform sees no traffic, and a frozen container
                # would not answer. Only the wake part (5) sets it (to 1 s).
                "IMAGEFN_PAUSE_AFTER_S": f"{pause_after_s:g}",
                "IMAGEFN_LOG_LEVEL": self.log_level,
                # Wins over the credentials file `imagefn up` reads (the environment
                # does), so the bench knows the key without reading that file.
                "IMAGEFN_ADMIN_KEY": self.admin_key,
            }
        )
        # Started before any measurement: blocking calls are harmless here.
        self._logf = open(self.log_path, "ab")  # noqa: ASYNC230
        self.proc = subprocess.Popen(  # noqa: ASYNC220
            self.command(), cwd=REPO, env=env, stdout=self._logf, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 30
        async with aiohttp.ClientSession() as s:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"imagefn up exited with {self.proc.returncode}; see {self.log_path}:\n"
                        + self.log_path.read_text()[-2000:]
                    )
                with contextlib.suppress(aiohttp.ClientError, OSError, asyncio.TimeoutError):
                    async with s.get(
                        self.url + "/healthz", timeout=aiohttp.ClientTimeout(total=2)
                    ) as r:
                        if r.status == 200:
                            return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"gateway not healthy within 30 s; see {self.log_path}")
                await asyncio.sleep(0.1)

    async def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            deadline = time.monotonic() + 45
            while self.proc.poll() is None and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.1)
            if self.proc.poll() is None:
                log("imagefn up did not stop within 45 s of SIGINT; killing it")
                self.proc.kill()
                self.proc.wait(10)
        if self._logf is not None:
            self._logf.close()
        return self.proc.returncode

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0


class BenchRegistry:
    """A token-auth ``docker-registry`` of this run, whose realm is the bench platform's
    own gateway token route (as in tests/integration/conftest.py, but with the whole
    platform as the token service). Keys, storage, the registry log, image build
    contexts and a throwaway Docker CLI config all live in one temporary directory,
    removed by ``cleanup``."""

    SERVICE = "imagefn-bench-registry"
    ISSUER = "imagefn-bench"
    DEPLOY_USER = "imagefn-deployer"

    def __init__(self, gateway_port: int) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="imagefn-bench-registry-"))
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.token_url = f"http://127.0.0.1:{gateway_port}/v1/registry/token"
        # Random per run, never printed; the platform gets them through its environment.
        self._deploy_password = uuid.uuid4().hex
        self._worker_secret = uuid.uuid4().hex
        self.proc: subprocess.Popen[bytes] | None = None
        self.docker_config: Path | None = None  # DOCKER_CONFIG for `docker pull` (CLI)

    def start(self) -> None:
        # Once, before any measurement: the blocking waits are harmless here.
        key, cert = make_token_keys(self.dir / "auth")
        config = write_registry_config(
            self.dir, self.port, self.token_url, self.SERVICE, self.ISSUER, cert,
            self.dir / "data",
        )  # fmt: skip
        self._key, self._cert = key, cert
        self.proc = start_registry(config, self.port)

    def env(self) -> dict[str, str]:
        """The platform's registry settings (see platform_env in the integration conftest)."""
        return {
            "IMAGEFN_REGISTRY": self.address,
            "IMAGEFN_REGISTRY_SERVICE": self.SERVICE,
            "IMAGEFN_TOKEN_ISSUER": self.ISSUER,
            "IMAGEFN_TOKEN_KEY": str(self._key),
            "IMAGEFN_TOKEN_CERT": str(self._cert),
            "IMAGEFN_DEPLOY_USER": self.DEPLOY_USER,
            "IMAGEFN_DEPLOY_PASSWORD": self._deploy_password,
            "IMAGEFN_WORKER_SECRET": self._worker_secret,
            "IMAGEFN_TOKEN_URL": self.token_url,
        }

    def deployer_auth(self) -> dict[str, str]:
        """X-Registry-Auth for the engine: it does the token dance with the gateway."""
        return {
            "username": self.DEPLOY_USER,
            "password": self._deploy_password,
            "serveraddress": self.address,
        }

    async def docker_login(self) -> None:
        """``docker login`` as the deployer into a throwaway DOCKER_CONFIG inside our
        temporary directory (never ~/.docker), for the CLI ``docker pull`` variant."""
        cfg = self.dir / "docker-config"
        cfg.mkdir(mode=0o700)
        proc = await asyncio.create_subprocess_exec(
            "docker", "login", "--username", self.DEPLOY_USER, "--password-stdin", self.address,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env={**os.environ, "DOCKER_CONFIG": str(cfg)},
        )  # fmt: skip
        _, err = await proc.communicate(self._deploy_password.encode())
        if proc.returncode != 0:
            raise RuntimeError(f"docker login failed: {err.decode(errors='replace')[-500:]}")
        self.docker_config = cfg

    async def push(self, docker: aiodocker.Docker, local: str, repository: str, tag: str) -> str:
        """Tag ``local`` as REGISTRY/repository:tag and push it as the deployer; returns the
        manifest digest the engine reports."""
        target = f"{self.address}/{repository}"
        await docker.images.tag(local, target, tag=tag)
        digest = ""
        async for event in docker.images.push(
            target, tag=tag, auth=self.deployer_auth(), stream=True
        ):
            if "error" in event:
                raise RuntimeError(f"push {target}:{tag}: {event['error']}")
            aux = event.get("aux") or {}
            if isinstance(aux, dict) and aux.get("Digest"):
                digest = str(aux["Digest"])
        if not digest.startswith("sha256:"):
            raise RuntimeError(f"push {target}:{tag}: the engine reported no digest")
        return digest

    async def remove_images(self, docker: aiodocker.Docker) -> int:
        """Remove every local reference to this registry (tags we made, images pulled by
        digest). The port is this run's own, so no one else's image is touched; an image
        that also has another name (the bench image itself) is only untagged."""
        removed = 0
        prefix = self.address + "/"
        with contextlib.suppress(aiodocker.exceptions.DockerError):
            for img in await docker.images.list(all=True):
                refs = [
                    r
                    for r in (img.get("RepoTags") or []) + (img.get("RepoDigests") or [])
                    if r.startswith(prefix)
                ]
                for ref in refs:
                    with contextlib.suppress(aiodocker.exceptions.DockerError):
                        await docker.images.delete(ref)
                        removed += 1
        return removed

    def cleanup(self) -> None:
        if self.proc is not None:
            stop_registry(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)


def fn_spec(name: str, image: str, **kw: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": name,
        "image": image,
        "type": "event",
        "memory_mb": 128,
        "cpus": 1.0,
        "timeout_s": 10,
        "init_timeout_s": 30,
        "idle_ttl_s": 600,
        "max_instances": 1,
    }
    spec.update(kw)
    return spec


class Control:
    """The gateway's control API, plus bookkeeping of what we deployed."""

    def __init__(self, plat: Platform) -> None:
        self.plat = plat
        self.session = aiohttp.ClientSession(
            headers=plat.auth_headers, timeout=aiohttp.ClientTimeout(total=60)
        )
        self.deployed: set[str] = set()

    async def deploy(self, spec: dict[str, Any]) -> dict[str, Any]:
        """PUT the function; returns its record (version, image_ref pinned by digest)."""
        name = spec["name"]
        async with self.session.put(f"{self.plat.url}/v1/functions/{name}", json=spec) as r:
            text = await r.text()
            if r.status not in (200, 201):
                raise RuntimeError(f"deploy {name}: HTTP {r.status}: {text}")
        self.deployed.add(name)
        record: dict[str, Any] = json.loads(text)
        return record

    async def delete(self, name: str) -> None:
        async with self.session.delete(f"{self.plat.url}/v1/functions/{name}") as r:
            await r.read()
            if r.status not in (204, 404):
                raise RuntimeError(f"delete {name}: HTTP {r.status}")
        self.deployed.discard(name)

    async def invoke(self, name: str) -> tuple[int, Any, bytes]:
        async with self.session.post(
            f"{self.plat.url}/v1/functions/{name}/invoke",
            data=BODY,
            headers={"Content-Type": "application/json"},
        ) as r:
            return r.status, r.headers, await r.read()

    async def close(self) -> None:
        for name in list(self.deployed):
            with contextlib.suppress(Exception):
                await self.delete(name)
        await self.session.close()


async def container_port(docker: aiodocker.Docker, container_id: str) -> int:
    data = await docker.containers.container(container_id).show()
    for b in ((data.get("NetworkSettings") or {}).get("Ports") or {}).get("9000/tcp") or []:
        if b.get("HostPort"):
            return int(b["HostPort"])
    raise RuntimeError(f"container {container_id[:12]} publishes no port for 9000/tcp")


async def instance_ports(docker: aiodocker.Docker, worker_id: str, function: str) -> dict[str, int]:
    """instance id -> published host port, for the running containers of a function."""
    items = await docker.containers.list(
        filters=json.dumps(
            {"label": [f"{WORKER_LABEL}={worker_id}", f"{FUNCTION_LABEL}={function}"]}
        )
    )
    out: dict[str, int] = {}
    for c in items:
        labels = c._container.get("Labels") or {}
        with contextlib.suppress(RuntimeError, aiodocker.exceptions.DockerError):
            out[labels.get(INSTANCE_LABEL, c.id)] = await container_port(docker, c.id)
    return out


# -- request helpers -------------------------------------------------------------------------


def keepalive_session(
    limit: int = 8, headers: dict[str, str] | None = None
) -> aiohttp.ClientSession:
    """``headers``: ``Platform.auth_headers`` for a session to the gateway, None for one
    straight to containers."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit, keepalive_timeout=120),
        timeout=aiohttp.ClientTimeout(total=30),
        headers=headers,
    )


@dataclass
class Sample:
    ms: float
    ok: bool
    headers: Any = None  # the response headers (case-insensitive), gateway only
    error: str = ""


async def post_gateway(session: aiohttp.ClientSession, url: str) -> Sample:
    # The client makes a request id in both paths, so that both do the same work.
    headers = {"Content-Type": "application/json", "X-Request-Id": uuid.uuid4().hex}
    t0 = time.perf_counter_ns()
    try:
        async with session.post(url, data=BODY, headers=headers) as r:
            await r.read()
            ms = (time.perf_counter_ns() - t0) / 1e6
            ok = r.status == 200
            return Sample(ms, ok, r.headers, "" if ok else str(r.status))
    except (TimeoutError, aiohttp.ClientError, OSError) as e:
        return Sample((time.perf_counter_ns() - t0) / 1e6, False, None, type(e).__name__)


async def post_direct(session: aiohttp.ClientSession, url: str) -> Sample:
    headers = {"Content-Type": "application/json", "X-Scf-Request-Id": uuid.uuid4().hex}
    t0 = time.perf_counter_ns()
    try:
        async with session.post(url, data=BODY, headers=headers) as r:
            await r.read()
            ms = (time.perf_counter_ns() - t0) / 1e6
            return Sample(ms, r.status == 200, None, "" if r.status == 200 else str(r.status))
    except (TimeoutError, aiohttp.ClientError, OSError) as e:
        return Sample((time.perf_counter_ns() - t0) / 1e6, False, None, type(e).__name__)


# -- 1. warm latency -------------------------------------------------------------------------


async def bench_warm(
    ctl: Control, docker: aiodocker.Docker, image: str, blocks: int, block_size: int, warmup: int
) -> dict[str, Any]:
    plat = ctl.plat
    name = f"b{plat.tag}-warm"
    await ctl.deploy(fn_spec(name, image, max_instances=1))
    status, headers, body = await ctl.invoke(name)  # the cold start, not measured
    if status != 200:
        raise RuntimeError(f"first invoke of {name}: HTTP {status}: {body[:300]!r}")
    instance = headers.get("X-Imagefn-Instance", "")
    ports = await instance_ports(docker, plat.worker_id, name)
    if instance not in ports:
        raise RuntimeError(f"cannot find the container of instance {instance}: {ports}")
    gw_url = f"{plat.url}/v1/functions/{name}/invoke"
    direct_url = f"http://127.0.0.1:{ports[instance]}/event-invoke"
    log(f"warm: function {name}, instance {instance}, container port {ports[instance]}")

    gw: list[float] = []
    direct: list[float] = []
    timings: dict[str, list[float]] = {}
    errors = {"gateway": 0, "direct": 0}
    unexpected_cold = 0
    instances_seen = {instance}
    async with keepalive_session(headers=plat.auth_headers) as gs, keepalive_session() as ds:
        for _ in range(warmup):
            await post_gateway(gs, gw_url)
            await post_direct(ds, direct_url)
        with CpuWindow(plat.pid) as cpu:
            for b in range(blocks):
                order = ("gateway", "direct") if b % 2 == 0 else ("direct", "gateway")
                for path in order:
                    for _ in range(block_size):
                        if path == "gateway":
                            s = await post_gateway(gs, gw_url)
                            if s.ok:
                                gw.append(s.ms)
                                h = s.headers or {}
                                if h.get("X-Imagefn-Cold-Start") == "true":
                                    unexpected_cold += 1
                                instances_seen.add(h.get("X-Imagefn-Instance", ""))
                                for k, v in parse_server_timing(h.get("Server-Timing", "")).items():
                                    timings.setdefault(k, []).append(v)
                            else:
                                errors["gateway"] += 1
                        else:
                            s = await post_direct(ds, direct_url)
                            if s.ok:
                                direct.append(s.ms)
                            else:
                                errors["direct"] += 1
                                if errors["direct"] > 20:
                                    raise RuntimeError(
                                        "the instance container stopped answering directly "
                                        f"({s.error}); was it removed from outside?"
                                    )
                                await asyncio.sleep(0.01)
    gs_ = summary(gw)
    ds_ = summary(direct)
    return {
        "function": name,
        "instance": instance,
        "container_port": ports[instance],
        "blocks": blocks,
        "block_size": block_size,
        "gateway_ms": gs_,
        "direct_ms": ds_,
        "overhead_p50_ms": gs_["p50"] - ds_["p50"],
        "overhead_p99_ms": gs_["p99"] - ds_["p99"],
        "overhead_mean_ms": gs_["mean"] - ds_["mean"],
        "server_timing_p50_ms": {k: pct(v, 50) for k, v in timings.items()},
        # Phases appear only when they happened (the pool reports "wait" only above 1 ms).
        "server_timing_count": {k: len(v) for k, v in timings.items()},
        "errors": errors,
        "unexpected_cold_starts": unexpected_cold,
        "instances_seen": sorted(instances_seen - {""}),
        "cpu": cpu.result,
        "raw": {"gateway_ms": gw, "direct_ms": direct},
    }


# -- 2. cold start ---------------------------------------------------------------------------


async def poll_until_200(port: int, deadline: float) -> int:
    """POST /event-invoke on a fresh connection every 5 ms until the first 200."""
    url = f"http://127.0.0.1:{port}/event-invoke"
    attempts = 0
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(force_close=True),
        timeout=aiohttp.ClientTimeout(total=5),
    ) as s:
        while True:
            attempts += 1
            with contextlib.suppress(aiohttp.ClientError, OSError, asyncio.TimeoutError):
                async with s.post(
                    url,
                    data=BODY,
                    headers={
                        "Content-Type": "application/json",
                        "X-Scf-Request-Id": uuid.uuid4().hex,
                    },
                ) as r:
                    await r.read()
                    if r.status == 200:
                        return attempts
            if loop.time() > deadline:
                raise RuntimeError(f"no 200 from 127.0.0.1:{port} in time")
            await asyncio.sleep(0.005)


async def wait_instances_gone(ctl: Control, docker: aiodocker.Docker, name: str) -> None:
    """Wait (bounded) until the function's containers are gone, after it was deleted."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        left = await docker.containers.list(
            all=True,
            filters=json.dumps(
                {"label": [f"{WORKER_LABEL}={ctl.plat.worker_id}", f"{FUNCTION_LABEL}={name}"]}
            ),
        )
        if not left:
            return
        await asyncio.sleep(0.1)


async def timed_cold_invoke(ctl: Control, docker: aiodocker.Docker, name: str) -> dict[str, Any]:
    """The first invoke of a just-deployed function, timed to its 200; then (untimed)
    delete the function and wait for its instance to be removed."""
    t0 = time.perf_counter_ns()
    status, headers, body = await ctl.invoke(name)
    ms = (time.perf_counter_ns() - t0) / 1e6
    cold = headers.get("X-Imagefn-Cold-Start") == "true"
    phases = parse_server_timing(headers.get("Server-Timing", ""))
    error = ""
    if status != 200:
        # A failed cold start is a finding, not a reason to stop: count it, report it.
        error = f"HTTP {status}: {body[:400].decode(errors='replace')}"
        log(f"cold invoke {name} failed after {ms:.0f} ms: {error}")
    # Clean up outside the timing: delete the function and wait for its instance to
    # reach its 1 s idle TTL and be removed, so it does not run into the next round.
    await ctl.delete(name)
    await wait_instances_gone(ctl, docker, name)
    out = {"ms": ms, "ok": not error, "cold_start_header": cold, "phases_ms": phases}
    if error:
        out["error"] = error
    return out


class ColdBench:
    def __init__(self, ctl: Control, docker: aiodocker.Docker, image: str, fn_image: str) -> None:
        self.ctl = ctl
        self.docker = docker
        self.image = image  # the local name, for the bare containers
        self.fn_image = fn_image  # the same image in the platform registry, for deploys
        self.run_label = ctl.plat.tag
        self.bare_ids: set[str] = set()
        self.sandbox_config: Callable[[str], dict[str, Any]] | None = None
        try:
            from workers.runtime import ContainerConfig

            def sandbox(name: str) -> dict[str, Any]:
                # The platform's own create body (the same limits as fn_spec), minus its
                # imagefn.managed labels, so that no janitor mistakes it for an instance.
                body = ContainerConfig(
                    name=name,
                    image=image,
                    command=None,
                    args=None,
                    env={},
                    labels={BENCH_LABEL: self.run_label},
                    memory_mb=128,
                    cpus=1.0,
                    pids_limit=1024,
                    nofile_limit=1024,
                    tmp_mb=512,
                    network="imagefn-fn",  # the platform's (deploy/network.sh)
                ).to_docker()
                return body

            self.sandbox_config = sandbox
        except Exception as e:  # the platform's module changed shape: skip the variant
            log(f"cold: no 'bare API + platform sandbox' variant ({e})")

    def variants(self) -> list[str]:
        v = ["gateway", "docker_cli", "engine_api"]
        if self.sandbox_config is not None:
            v.append("engine_api_sandbox")
        return v

    async def run(self, variant: str, rnd: int) -> dict[str, Any]:
        out: dict[str, Any] = await getattr(self, f"_{variant}")(rnd)
        return out

    async def _gateway(self, rnd: int) -> dict[str, Any]:
        name = f"b{self.ctl.plat.tag}-cold{rnd}"
        await self.ctl.deploy(fn_spec(name, self.fn_image, idle_ttl_s=1, max_instances=1))
        return await timed_cold_invoke(self.ctl, self.docker, name)

    async def _remove(self, cid: str) -> None:
        with contextlib.suppress(aiodocker.exceptions.DockerError):
            await self.docker.containers.container(cid).delete(force=True)
        self.bare_ids.discard(cid)

    async def _docker_cli(self, rnd: int) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter_ns()
        proc = await asyncio.create_subprocess_exec(
            "docker", "run", "-d", "--label", f"{BENCH_LABEL}={self.run_label}",
            "-p", "127.0.0.1::9000", self.image,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"docker run failed: {err.decode(errors='replace')}")
        cid = out.decode().strip()
        self.bare_ids.add(cid)
        t_run = time.perf_counter_ns()
        try:
            port = await container_port(self.docker, cid)  # one Engine API inspect
            attempts = await poll_until_200(port, loop.time() + 30)
            ms = (time.perf_counter_ns() - t0) / 1e6
        finally:
            await self._remove(cid)
        return {"ms": ms, "phases_ms": {"docker_run_cli": (t_run - t0) / 1e6}, "attempts": attempts}

    async def _api(self, config: dict[str, Any], name: str | None) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter_ns()
        c = await self.docker.containers.create(config, name=name)
        self.bare_ids.add(c.id)
        t1 = time.perf_counter_ns()
        try:
            await c.start()
            t2 = time.perf_counter_ns()
            port = await container_port(self.docker, c.id)
            t3 = time.perf_counter_ns()
            attempts = await poll_until_200(port, loop.time() + 30)
            t4 = time.perf_counter_ns()
        finally:
            await self._remove(c.id)
        return {
            "ms": (t4 - t0) / 1e6,
            "phases_ms": {
                "create": (t1 - t0) / 1e6,
                "start": (t2 - t1) / 1e6,
                "inspect": (t3 - t2) / 1e6,
                "poll": (t4 - t3) / 1e6,
            },
            "attempts": attempts,
        }

    async def _engine_api(self, rnd: int) -> dict[str, Any]:
        config = {
            "Image": self.image,
            "Labels": {BENCH_LABEL: self.run_label},
            "ExposedPorts": {"9000/tcp": {}},
            "HostConfig": {"PortBindings": {"9000/tcp": [{"HostIp": "127.0.0.1", "HostPort": ""}]}},
        }
        return await self._api(config, None)

    async def _engine_api_sandbox(self, rnd: int) -> dict[str, Any]:
        assert self.sandbox_config is not None
        name = f"imagefn-bench-{self.run_label}-{rnd}"
        return await self._api(self.sandbox_config(name), name)

    async def cleanup(self) -> None:
        for cid in list(self.bare_ids):
            await self._remove(cid)
        with contextlib.suppress(aiodocker.exceptions.DockerError):
            for c in await self.docker.containers.list(
                all=True, filters=json.dumps({"label": [f"{BENCH_LABEL}={self.run_label}"]})
            ):
                await self._remove(c.id)


async def bench_cold(
    ctl: Control,
    docker: aiodocker.Docker,
    image: str,
    fn_image: str,
    rounds: int,
    warmup_rounds: int,
) -> dict[str, Any]:
    cb = ColdBench(ctl, docker, image, fn_image)
    variants = cb.variants()
    samples: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    try:
        with CpuWindow(ctl.plat.pid) as cpu:
            for rnd in range(warmup_rounds + rounds):
                # Rotate the order every round so that no variant always goes first.
                k = rnd % len(variants)
                order = variants[k:] + variants[:k]
                this_round: dict[str, dict[str, Any]] = {}
                for v in order:
                    try:
                        res = await cb.run(v, rnd)
                    except Exception as e:
                        log(f"cold {v} round {rnd} failed: {e}")
                        res = {"ms": float("nan"), "ok": False, "error": str(e)[:400]}
                    res.setdefault("ok", True)
                    this_round[v] = res
                    await asyncio.sleep(0.2)  # let the removal settle before the next one
                    if rnd >= warmup_rounds:
                        samples[v].append(res)
                log(
                    f"cold round {rnd + 1}/{warmup_rounds + rounds}"
                    + (" (warm-up, not counted)" if rnd < warmup_rounds else "")
                    + ": "
                    + ", ".join(
                        f"{v} {r['ms']:.0f} ms" + ("" if r["ok"] else " FAILED")
                        for v, r in this_round.items()
                    )
                )
    finally:
        await cb.cleanup()
    out: dict[str, Any] = {"rounds": rounds, "variants": {}, "cpu": cpu.result}
    for v, ss in samples.items():
        good = [s for s in ss if s["ok"]]
        ms = [s["ms"] for s in good]
        phases: dict[str, list[float]] = {}
        for s in good:
            for k, x in s.get("phases_ms", {}).items():
                phases.setdefault(k, []).append(x)
        out["variants"][v] = {
            "ms": summary(ms),
            "failures": len(ss) - len(good),
            "failure_messages": [s.get("error", "") for s in ss if not s["ok"]],
            "phases_p50_ms": {k: pct(x, 50) for k, x in phases.items()},
            "raw": ss,
        }
        if v == "gateway":
            out["variants"][v]["not_cold"] = sum(
                1 for s in ss if s["ok"] and not s.get("cold_start_header")
            )
            # The image is present on the worker: no round should report a pull.
            out["variants"][v]["rounds_with_pull"] = sum(
                1 for s in good if "pull" in s.get("phases_ms", {})
            )
    gw = out["variants"]["gateway"]["ms"]
    for v in variants[1:]:
        b = out["variants"][v]["ms"]
        out["variants"][v]["ratio_gateway_over_this_p50"] = gw["p50"] / b["p50"]
        out["variants"][v]["ratio_gateway_over_this_p90"] = gw["p90"] / b["p90"]
    return out


# -- 3. saturation throughput ----------------------------------------------------------------


async def saturate(
    request: Callable[[aiohttp.ClientSession, int], Awaitable[Sample]],
    clients: int,
    duration_s: float,
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    """``headers``: ``Platform.auth_headers`` when ``request`` goes to the gateway, None
    when it goes straight to containers."""
    loop = asyncio.get_running_loop()
    lat: list[float] = []
    errors: dict[str, int] = {}
    instances: dict[str, int] = {}
    cold = 0
    async with keepalive_session(limit=clients + 4, headers=headers) as session:
        t0 = loop.time()
        stop_at = t0 + duration_s

        async def client(i: int) -> None:
            nonlocal cold
            while loop.time() < stop_at:
                s = await request(session, i)
                if s.ok:
                    lat.append(s.ms)
                    if s.headers:
                        iid = s.headers.get("X-Imagefn-Instance", "")
                        instances[iid] = instances.get(iid, 0) + 1
                        if s.headers.get("X-Imagefn-Cold-Start") == "true":
                            cold += 1
                else:
                    errors[s.error] = errors.get(s.error, 0) + 1
                    await asyncio.sleep(0.01)  # no hot error loop

        await asyncio.gather(*(client(i) for i in range(clients)))
        elapsed = loop.time() - t0
    return {
        "completed": len(lat),
        "elapsed_s": elapsed,
        "rps": len(lat) / elapsed,
        "latency_ms": summary(lat),
        "errors": errors,
        "instances": instances,
        "cold_starts": cold,
    }


async def bench_throughput(
    ctl: Control,
    docker: aiodocker.Docker,
    image: str,
    warm_fn: str,
    clients: int,
    duration_s: float,
    instances: int,
) -> dict[str, Any]:
    plat = ctl.plat
    multi = f"b{plat.tag}-sat{instances}"
    await ctl.deploy(fn_spec(multi, image, max_instances=instances))
    # Warm up until the function has all its instances (bounded).
    gw_multi = f"{plat.url}/v1/functions/{multi}/invoke"
    async with keepalive_session(limit=clients + 4, headers=plat.auth_headers) as s:
        for _ in range(20):
            await asyncio.gather(*(post_gateway(s, gw_multi) for _ in range(clients)))
            if len(await instance_ports(docker, plat.worker_id, multi)) >= instances:
                break
    multi_ports = sorted((await instance_ports(docker, plat.worker_id, multi)).values())
    single_ports = list((await instance_ports(docker, plat.worker_id, warm_fn)).values())
    if len(single_ports) != 1:
        raise RuntimeError(f"{warm_fn} should have exactly one instance: {single_ports}")
    gw_single = f"{plat.url}/v1/functions/{warm_fn}/invoke"
    log(f"throughput: {multi} has {len(multi_ports)} instances on ports {multi_ports}")

    def gw(url: str) -> Callable[[aiohttp.ClientSession, int], Awaitable[Sample]]:
        return lambda s, i: post_gateway(s, url)

    def direct(ports: list[int]) -> Callable[[aiohttp.ClientSession, int], Awaitable[Sample]]:
        urls = [f"http://127.0.0.1:{p}/event-invoke" for p in ports]
        return lambda s, i: post_direct(s, urls[i % len(urls)])

    # (key, description, request, clients)
    configs: list[
        tuple[str, str, Callable[[aiohttp.ClientSession, int], Awaitable[Sample]], int]
    ] = [
        ("gw_multi", f"gateway, max_instances={instances}", gw(gw_multi), clients),
        (
            "direct_multi",
            f"direct to the same {len(multi_ports)} containers (clients spread round-robin)",
            direct(multi_ports),
            clients,
        ),
        ("gw_single", "gateway, max_instances=1", gw(gw_single), clients),
        ("direct_single", "direct to that ONE container", direct(single_ports), clients),
        (
            "direct_single_c1",
            "direct to that ONE container, 1 client (one request at a time, as the "
            "platform sends events to an instance)",
            direct(single_ports),
            1,
        ),
    ]

    def headers_of(key: str) -> dict[str, str] | None:
        # The gateway rows send the run's key; the direct rows go to the containers,
        # which never see a platform credential, so they send none (as before).
        return plat.auth_headers if key.startswith("gw") else None

    # A short warm-up of every path, then each configuration in two halves in ABBA order
    # within its pair, so that drift and background load hit both sides alike.
    for key, _d, req, c in configs:
        await saturate(req, c, min(1.0, duration_s / 4), headers_of(key))
    parts: dict[str, list[tuple[dict[str, Any], dict[str, float]]]] = {k: [] for k, *_ in configs}
    half = duration_s / 2
    schedule = [
        "gw_multi", "direct_multi", "direct_multi", "gw_multi",
        "gw_single", "direct_single", "direct_single", "gw_single",
        "direct_single_c1", "direct_single_c1",
    ]  # fmt: skip
    by_key = {k: (d, req, c) for k, d, req, c in configs}
    for key in schedule:
        _d, req, c = by_key[key]
        with CpuWindow(plat.pid) as cpu:
            r = await saturate(req, c, half, headers_of(key))
        parts[key].append((r, cpu.result))
        log(f"throughput {key}: {r['rps']:.0f}/s over {r['elapsed_s']:.1f} s")
    out: dict[str, Any] = {"clients": clients, "duration_s": duration_s, "rows": {}}
    for key, desc, _req, c in configs:
        rs = parts[key]
        completed = sum(r["completed"] for r, _ in rs)
        elapsed = sum(r["elapsed_s"] for r, _ in rs)
        lat = []  # the halves' latency summaries are combined by their medians' mean
        errors: dict[str, int] = {}
        insts: dict[str, int] = {}
        for r, _ in rs:
            lat.append(r["latency_ms"])
            for k, v in r["errors"].items():
                errors[k] = errors.get(k, 0) + v
            for k, v in r["instances"].items():
                insts[k] = insts.get(k, 0) + v
        plat_cpu = sum(cpu["platform_cpu_s"] for _, cpu in rs)
        out["rows"][key] = {
            "what": desc,
            "clients": c,
            "completed": completed,
            "elapsed_s": elapsed,
            "rps": completed / elapsed if elapsed else 0.0,
            "latency_p50_ms": sum(x["p50"] for x in lat) / len(lat),
            "latency_p99_ms": max(x["p99"] for x in lat),
            "errors": errors,
            "instances_used": len(insts),
            "cold_starts": sum(r["cold_starts"] for r, _ in rs),
            "platform_cpu_ms_per_invocation": (plat_cpu * 1000 / completed)
            if completed and key.startswith("gw")
            else None,
            "machine_busy_cores": sum(cpu["machine_busy_cores"] for _, cpu in rs) / len(rs),
            "client_cores": sum(cpu["client_cores"] for _, cpu in rs) / len(rs),
            "platform_cores": sum(cpu["platform_cores"] for _, cpu in rs) / len(rs),
        }
    rows = out["rows"]
    out["ratio_multi"] = rows["gw_multi"]["rps"] / rows["direct_multi"]["rps"]
    out["ratio_single"] = rows["gw_single"]["rps"] / rows["direct_single"]["rps"]
    out["ratio_single_vs_c1"] = rows["gw_single"]["rps"] / rows["direct_single_c1"]["rps"]
    await ctl.delete(multi)
    return out


# -- 4. cold start including the image pull (issue 3) ---------------------------------------

PULL_VARIANTS = ("gateway_pull", "cli_pull_run", "api_pull_run")
MiB = 1024 * 1024


async def run_cmd(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env
    )
    out, err = await proc.communicate()
    return int(proc.returncode or 0), out.decode(errors="replace"), err.decode(errors="replace")


async def forget_image(docker: aiodocker.Docker, *refs: str, strict: bool = True) -> None:
    """``docker rmi`` each reference, then check that none is left on the engine (so the
    next start must pull). With ``strict=False`` (clean-up after a round) only log."""
    for ref in refs:
        with contextlib.suppress(aiodocker.exceptions.DockerError):
            await docker.images.delete(ref)
    for ref in refs:
        try:
            await docker.images.inspect(ref)
        except aiodocker.exceptions.DockerError as e:
            if e.status == 404:
                continue
            raise
        msg = f"{ref} is still present on the engine after rmi"
        if strict:
            raise RuntimeError(msg)
        log(msg)


class PullBench:
    """Cold start when the image is not on the machine. Every round and variant gets an
    image of its own: FROM the bench image + ENV BENCH_ROUND + a file of random bytes (a
    real, incompressible layer), built, pushed, and removed locally before the timing.
    The bench image's own layers stay present, as they would on a worker that runs other
    functions built on the same base."""

    def __init__(
        self,
        ctl: Control,
        docker: aiodocker.Docker,
        reg: BenchRegistry,
        base_image: str,
        layer_mb: float,
    ) -> None:
        self.ctl = ctl
        self.docker = docker
        self.reg = reg
        self.base_image = base_image
        self.layer_bytes = int(layer_mb * MiB)
        self.run_label = ctl.plat.tag
        self.repos = {v: f"bench-{self.run_label}/{v.replace('_', '-')}" for v in PULL_VARIANTS}
        self.bare_ids: set[str] = set()

    async def prepare(self, variant: str, rnd: int) -> dict[str, Any]:
        """Build, push (and for the gateway variant deploy), then rmi: all untimed."""
        repo, tag = self.repos[variant], f"r{rnd}"
        local = f"{self.reg.address}/{repo}:{tag}"
        ctx = self.reg.dir / "build"
        ctx.mkdir(exist_ok=True)
        # Small files, written once per round before any timing.
        (ctx / "Dockerfile").write_text(
            f"FROM {self.base_image}\n"
            f"ENV BENCH_ROUND={self.run_label}-{variant}-{rnd}\n"
            "COPY blob /bench-blob\n"
        )
        (ctx / "blob").write_bytes(os.urandom(self.layer_bytes))
        rc, _, err = await run_cmd("docker", "build", "-q", "-t", local, str(ctx))
        if rc != 0:
            raise RuntimeError(f"docker build {local}: {err[-500:]}")
        digest = await self.reg.push(self.docker, local, repo, tag)
        pinned = f"{self.reg.address}/{repo}@{digest}"
        prep: dict[str, Any] = {"local": local, "pinned": pinned}
        if variant == "gateway_pull":
            name = f"b{self.run_label}-pull{rnd}"
            t0 = time.perf_counter_ns()
            record = await self.ctl.deploy(
                fn_spec(name, f"{repo}:{tag}", idle_ttl_s=1, max_instances=1)
            )
            if record.get("image_ref") != pinned:
                raise RuntimeError(f"deploy pinned {record.get('image_ref')}, pushed {pinned}")
            prep["function"] = name
            # The deploy resolves the tag to its digest in the registry (not in the timing).
            prep["deploy_ms"] = (time.perf_counter_ns() - t0) / 1e6
        await forget_image(self.docker, local, pinned)
        return prep

    async def run(self, variant: str, prep: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = await getattr(self, f"_{variant}")(prep)
        return out

    async def _gateway_pull(self, prep: dict[str, Any]) -> dict[str, Any]:
        out = await timed_cold_invoke(self.ctl, self.docker, prep["function"])
        out["pulled"] = "pull" in out["phases_ms"]
        out["deploy_ms"] = prep["deploy_ms"]
        await forget_image(self.docker, prep["pinned"], strict=False)
        return out

    async def _remove(self, cid: str) -> None:
        with contextlib.suppress(aiodocker.exceptions.DockerError):
            await self.docker.containers.container(cid).delete(force=True)
        self.bare_ids.discard(cid)

    async def _cli_pull_run(self, prep: dict[str, Any]) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        ref = prep["pinned"]
        assert self.reg.docker_config is not None
        pull_env = {**os.environ, "DOCKER_CONFIG": str(self.reg.docker_config)}
        t0 = time.perf_counter_ns()
        rc, _, err = await run_cmd("docker", "pull", ref, env=pull_env)
        if rc != 0:
            raise RuntimeError(f"docker pull failed: {err[-400:]}")
        t1 = time.perf_counter_ns()
        rc, out, err = await run_cmd(
            "docker", "run", "-d", "--label", f"{BENCH_LABEL}={self.run_label}",
            "-p", "127.0.0.1::9000", ref,
        )  # fmt: skip
        if rc != 0:
            raise RuntimeError(f"docker run failed: {err[-400:]}")
        cid = out.strip()
        self.bare_ids.add(cid)
        t2 = time.perf_counter_ns()
        try:
            port = await container_port(self.docker, cid)
            attempts = await poll_until_200(port, loop.time() + 30)
            t3 = time.perf_counter_ns()
        finally:
            await self._remove(cid)
            await forget_image(self.docker, ref, strict=False)
        return {
            "ms": (t3 - t0) / 1e6,
            "phases_ms": {
                "docker_pull": (t1 - t0) / 1e6,
                "docker_run": (t2 - t1) / 1e6,
                "ready": (t3 - t2) / 1e6,
            },
            "attempts": attempts,
        }

    async def _api_pull_run(self, prep: dict[str, Any]) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        ref = prep["pinned"]
        t0 = time.perf_counter_ns()
        async for event in self.docker.images.pull(ref, auth=self.reg.deployer_auth(), stream=True):
            if "error" in event:
                raise RuntimeError(f"pull {ref}: {event['error']}")
        t1 = time.perf_counter_ns()
        config = {
            "Image": ref,
            "Labels": {BENCH_LABEL: self.run_label},
            "ExposedPorts": {"9000/tcp": {}},
            "HostConfig": {"PortBindings": {"9000/tcp": [{"HostIp": "127.0.0.1", "HostPort": ""}]}},
        }
        c = await self.docker.containers.create(config)
        self.bare_ids.add(c.id)
        t2 = time.perf_counter_ns()
        try:
            await c.start()
            t3 = time.perf_counter_ns()
            port = await container_port(self.docker, c.id)
            attempts = await poll_until_200(port, loop.time() + 30)
            t4 = time.perf_counter_ns()
        finally:
            await self._remove(c.id)
            await forget_image(self.docker, ref, strict=False)
        return {
            "ms": (t4 - t0) / 1e6,
            "phases_ms": {
                "pull": (t1 - t0) / 1e6,
                "create": (t2 - t1) / 1e6,
                "start": (t3 - t2) / 1e6,
                "ready": (t4 - t3) / 1e6,
            },
            "attempts": attempts,
        }

    async def cleanup(self) -> None:
        for cid in list(self.bare_ids):
            await self._remove(cid)
        with contextlib.suppress(aiodocker.exceptions.DockerError):
            for c in await self.docker.containers.list(
                all=True, filters=json.dumps({"label": [f"{BENCH_LABEL}={self.run_label}"]})
            ):
                await self._remove(c.id)
        shutil.rmtree(self.reg.dir / "build", ignore_errors=True)


async def bench_pull(
    ctl: Control,
    docker: aiodocker.Docker,
    reg: BenchRegistry,
    base_image: str,
    rounds: int,
    warmup_rounds: int,
    layer_mb: float,
) -> dict[str, Any]:
    pb = PullBench(ctl, docker, reg, base_image, layer_mb)
    variants = list(PULL_VARIANTS)
    samples: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    prep_s: list[float] = []
    try:
        with CpuWindow(ctl.plat.pid) as cpu:
            for rnd in range(warmup_rounds + rounds):
                # Prepare the round's three images first (untimed), then measure them in
                # an order rotated every round.
                t_prep = time.monotonic()
                preps: dict[str, dict[str, Any] | Exception] = {}
                for v in variants:
                    try:
                        preps[v] = await pb.prepare(v, rnd)
                    except Exception as e:
                        log(f"pull {v} round {rnd}: preparation failed: {e}")
                        preps[v] = e
                prep_s.append(time.monotonic() - t_prep)
                await asyncio.sleep(0.5)  # let dockerd finish the removals
                k = rnd % len(variants)
                order = variants[k:] + variants[:k]
                this_round: dict[str, dict[str, Any]] = {}
                for v in order:
                    prep = preps[v]
                    try:
                        if isinstance(prep, Exception):
                            raise prep
                        res = await pb.run(v, prep)
                    except Exception as e:
                        log(f"pull {v} round {rnd} failed: {e}")
                        res = {"ms": float("nan"), "ok": False, "error": str(e)[:400]}
                    res.setdefault("ok", True)
                    res["round"] = rnd
                    this_round[v] = res
                    await asyncio.sleep(0.2)
                    if rnd >= warmup_rounds:
                        samples[v].append(res)
                log(
                    f"pull round {rnd + 1}/{warmup_rounds + rounds}"
                    + (" (warm-up, not counted)" if rnd < warmup_rounds else "")
                    + f" (prepared in {prep_s[-1]:.1f} s): "
                    + ", ".join(
                        f"{v} {r['ms']:.0f} ms"
                        + ("" if r["ok"] else " FAILED")
                        + (
                            f" (pull {r['phases_ms'].get('pull', float('nan')):.0f})"
                            if v == "gateway_pull" and r["ok"]
                            else ""
                        )
                        for v, r in this_round.items()
                    )
                )
    finally:
        await pb.cleanup()
    out: dict[str, Any] = {
        "rounds": rounds,
        "layer_mb": layer_mb,
        "variants": {},
        "cpu": cpu.result,
        "prepare_s_p50": pct(prep_s, 50),
    }
    for v, ss in samples.items():
        good = [x for x in ss if x["ok"]]
        phases: dict[str, list[float]] = {}
        for x in good:
            for k2, val in x.get("phases_ms", {}).items():
                phases.setdefault(k2, []).append(val)
        out["variants"][v] = {
            "ms": summary([x["ms"] for x in good]),
            "failures": len(ss) - len(good),
            "failure_messages": [x.get("error", "") for x in ss if not x["ok"]],
            "phases_p50_ms": {k2: pct(val, 50) for k2, val in phases.items()},
            "phases_p90_ms": {k2: pct(val, 90) for k2, val in phases.items()},
            "raw": ss,
        }
    gw = out["variants"]["gateway_pull"]
    gw["rounds_without_pull"] = sum(
        1 for x in samples["gateway_pull"] if x["ok"] and not x["pulled"]
    )
    gw["deploy_ms"] = summary([x["deploy_ms"] for x in samples["gateway_pull"] if "deploy_ms" in x])
    gw["not_cold"] = sum(
        1 for x in samples["gateway_pull"] if x["ok"] and not x.get("cold_start_header")
    )
    by_round = {x["round"]: x for x in samples["gateway_pull"] if x["ok"]}
    for v in variants[1:]:
        b = out["variants"][v]
        b["ratio_gateway_over_this_p50"] = gw["ms"]["p50"] / b["ms"]["p50"]
        b["ratio_gateway_over_this_p90"] = gw["ms"]["p90"] / b["ms"]["p90"]
        # Each round's pair was measured seconds apart: the median of the per-round ratios
        # is less exposed to load that drifts over the run.
        paired = [by_round[x["round"]]["ms"] / x["ms"] for x in samples[v]
                  if x["ok"] and x["round"] in by_round]  # fmt: skip
        b["ratio_paired_median"] = pct(paired, 50)
    return out


# -- 5. wake from idle (issue 4) -------------------------------------------------------------

WAKE_VARIANTS = ("warm", "wake", "provisioned", "cold", "docker_cli")
PROVISIONED_SETTLE_S = 1.5  # how long a provisioned container must have run before the call


async def function_containers(docker: aiodocker.Docker, worker_id: str, function: str) -> list[str]:
    items = await docker.containers.list(
        all=True,
        filters=json.dumps(
            {"label": [f"{WORKER_LABEL}={worker_id}", f"{FUNCTION_LABEL}={function}"]}
        ),
    )
    return [c.id for c in items]


async def wait_paused(docker: aiodocker.Docker, cid: str, timeout_s: float = 20) -> float:
    """Poll the engine's inspect (``docker inspect -f {{.State.Paused}}``) every 50 ms
    until the container is frozen; returns the seconds waited."""
    t0 = time.monotonic()
    while True:
        data = await docker.containers.container(cid).show()
        if (data.get("State") or {}).get("Paused"):
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout_s:
            raise RuntimeError(f"container {cid[:12]} not paused within {timeout_s:g} s")
        await asyncio.sleep(0.05)


async def timed_invoke(ctl: Control, name: str) -> dict[str, Any]:
    """One invoke through the gateway, timed to its 200 (the same client for every
    gateway row: the Control session, keep-alive)."""
    t0 = time.perf_counter_ns()
    status, headers, body = await ctl.invoke(name)
    ms = (time.perf_counter_ns() - t0) / 1e6
    out: dict[str, Any] = {
        "ms": ms,
        "ok": status == 200,
        "cold_start_header": headers.get("X-Imagefn-Cold-Start") == "true",
        "instance": headers.get("X-Imagefn-Instance", ""),
        "phases_ms": parse_server_timing(headers.get("Server-Timing", "")),
    }
    if status != 200:
        out["error"] = f"HTTP {status}: {body[:400].decode(errors='replace')}"
    return out


class WakeBench:
    """Warm, wake from idle, true cold and bare ``docker run`` side by side (issue 4).

    - warm: one untimed invoke of the wake function (it may wake the instance), then
      the timed one right after it;
    - wake: wait until the function's only container is frozen (the engine reports
      State.Paused), then one timed invoke; checked to report a ``wake`` phase, no cold
      start, and the same instance;
    - provisioned: a freshly deployed function each round with ``provisioned_concurrency:
      1`` and no traffic; wait (untimed) until the cold-start manager's instance container
      is running and has been up >= PROVISIONED_SETTLE_S (so the worker's heartbeat has
      reported it ready), then one timed invoke, checked to say
      ``X-Imagefn-Cold-Start: false`` and to be served by that container's instance
      (then, untimed, deleted: the instance is demoted and idles out, waited for);
    - cold: a freshly deployed function each round (image present), its first invoke
      (then, untimed, deleted and its container waited for);
    - docker_cli: ``docker run -d -p 127.0.0.1::9000`` + POST /event-invoke every 5 ms
      until the first 200 (the part-2 code)."""

    def __init__(self, ctl: Control, docker: aiodocker.Docker, image: str, fn_image: str) -> None:
        self.ctl = ctl
        self.docker = docker
        self.fn_image = fn_image
        self.name = f"b{ctl.plat.tag}-wake"
        self.instance = ""
        self.container = ""
        self.cold = ColdBench(ctl, docker, image, fn_image)

    async def setup(self) -> None:
        await self.ctl.deploy(fn_spec(self.name, self.fn_image, idle_ttl_s=600, max_instances=1))
        status, headers, body = await self.ctl.invoke(self.name)  # its cold start, untimed
        if status != 200:
            raise RuntimeError(f"first invoke of {self.name}: HTTP {status}: {body[:300]!r}")
        self.instance = headers.get("X-Imagefn-Instance", "")
        ids = await function_containers(self.docker, self.ctl.plat.worker_id, self.name)
        if len(ids) != 1:
            raise RuntimeError(f"{self.name} should have exactly one container: {ids}")
        self.container = ids[0]

    async def run(self, variant: str, rnd: int) -> dict[str, Any]:
        out: dict[str, Any] = await getattr(self, f"_{variant}")(rnd)
        return out

    def _check_same_instance(self, out: dict[str, Any]) -> None:
        if out["ok"] and out["instance"] != self.instance:
            out["ok"] = False
            out["error"] = f"served by instance {out['instance']}, not {self.instance}"

    async def _warm(self, rnd: int) -> dict[str, Any]:
        status, _, body = await self.ctl.invoke(self.name)  # untimed: wake it if frozen
        if status != 200:
            raise RuntimeError(f"warm pre-invoke: HTTP {status}: {body[:300]!r}")
        out = await timed_invoke(self.ctl, self.name)
        self._check_same_instance(out)
        return out

    async def _wake(self, rnd: int) -> dict[str, Any]:
        waited = await wait_paused(self.docker, self.container)
        out = await timed_invoke(self.ctl, self.name)
        out["waited_for_pause_s"] = waited
        self._check_same_instance(out)
        if out["ok"] and "wake" not in out["phases_ms"]:
            out["ok"] = False
            out["error"] = "no wake phase in Server-Timing"
        return out

    async def _cold(self, rnd: int) -> dict[str, Any]:
        name = f"b{self.ctl.plat.tag}-wcold{rnd}"
        await self.ctl.deploy(fn_spec(name, self.fn_image, idle_ttl_s=1, max_instances=1))
        out = await timed_cold_invoke(self.ctl, self.docker, name)
        if out["ok"] and not out["cold_start_header"]:
            out["ok"] = False
            out["error"] = "not reported as a cold start"
        return out

    async def _wait_provisioned(self, name: str, timeout_s: float = 30) -> tuple[str, float]:
        """Poll (every 50 ms) ``docker ps --filter label=imagefn.function=NAME`` and the
        container's State.Running until one instance container runs, then until it has
        been running for PROVISIONED_SETTLE_S. Returns its instance id and the seconds
        from the call to the first sight of it running."""
        t0 = time.monotonic()
        seen_at = 0.0
        instance = ""
        while True:
            now = time.monotonic()
            if now - t0 > timeout_s:
                raise RuntimeError(f"no provisioned instance of {name} within {timeout_s:g} s")
            running = []
            for cid in await function_containers(self.docker, self.ctl.plat.worker_id, name):
                with contextlib.suppress(aiodocker.exceptions.DockerError):
                    data = await self.docker.containers.container(cid).show()
                    if (data.get("State") or {}).get("Running"):
                        labels = (data.get("Config") or {}).get("Labels") or {}
                        running.append(labels.get(INSTANCE_LABEL, ""))
            if running and not seen_at:
                seen_at, instance = now, running[0]
            elif not running:
                seen_at = 0.0
            if seen_at and now - seen_at >= PROVISIONED_SETTLE_S:
                return instance, seen_at - t0
            await asyncio.sleep(0.05)

    async def _provisioned(self, rnd: int) -> dict[str, Any]:
        name = f"b{self.ctl.plat.tag}-wprov{rnd}"
        await self.ctl.deploy(
            fn_spec(name, self.fn_image, idle_ttl_s=1, max_instances=1, provisioned_concurrency=1)
        )
        try:
            instance, ready_s = await self._wait_provisioned(name)
            out = await timed_invoke(self.ctl, name)
        finally:
            # Untimed: delete; its instance is no longer wanted, idles out (1 s TTL).
            await self.ctl.delete(name)
            await wait_instances_gone(self.ctl, self.docker, name)
        out["provisioned_running_after_s"] = ready_s
        out["provisioned_instance"] = instance
        if out["ok"] and out["cold_start_header"]:
            out["ok"] = False
            out["error"] = "reported as a cold start (X-Imagefn-Cold-Start: true)"
        elif out["ok"] and instance and out["instance"] != instance:
            out["ok"] = False
            out["error"] = f"served by instance {out['instance']}, not the provisioned {instance}"
        return out

    async def _docker_cli(self, rnd: int) -> dict[str, Any]:
        return await self.cold._docker_cli(rnd)

    async def cleanup(self) -> None:
        await self.cold.cleanup()
        with contextlib.suppress(Exception):
            await self.ctl.delete(self.name)


async def bench_wake(
    ctl: Control,
    docker: aiodocker.Docker,
    image: str,
    fn_image: str,
    rounds: int,
    warmup_rounds: int,
) -> dict[str, Any]:
    wb = WakeBench(ctl, docker, image, fn_image)
    variants = list(WAKE_VARIANTS)
    samples: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    try:
        await wb.setup()
        log(f"wake: function {wb.name}, instance {wb.instance}, container {wb.container[:12]}")
        with CpuWindow(ctl.plat.pid) as cpu:
            for rnd in range(warmup_rounds + rounds):
                k = rnd % len(variants)
                order = variants[k:] + variants[:k]
                this_round: dict[str, dict[str, Any]] = {}
                for v in order:
                    try:
                        res = await wb.run(v, rnd)
                    except Exception as e:
                        res = {"ms": float("nan"), "ok": False, "error": str(e)[:400]}
                    res.setdefault("ok", True)
                    res["round"] = rnd
                    if not res["ok"]:
                        log(f"wake {v} round {rnd} failed: {res.get('error', '')}")
                    this_round[v] = res
                    await asyncio.sleep(0.2)
                    if rnd >= warmup_rounds:
                        samples[v].append(res)
                log(
                    f"wake round {rnd + 1}/{warmup_rounds + rounds}"
                    + (" (warm-up, not counted)" if rnd < warmup_rounds else "")
                    + ": "
                    + ", ".join(
                        f"{v} {r['ms']:.1f} ms"
                        + ("" if r["ok"] else " FAILED")
                        + (
                            f" (wake phase {r['phases_ms']['wake']:.1f})"
                            if v == "wake" and r["ok"]
                            else ""
                        )
                        for v, r in this_round.items()
                    )
                )
    finally:
        await wb.cleanup()
    out: dict[str, Any] = {
        "rounds": rounds,
        "pause_after_s": ctl.plat.pause_after_s,
        "variants": {},
        "cpu": cpu.result,
    }
    for v, ss in samples.items():
        good = [x for x in ss if x["ok"]]
        phases: dict[str, list[float]] = {}
        for x in good:
            for k2, val in x.get("phases_ms", {}).items():
                phases.setdefault(k2, []).append(val)
        out["variants"][v] = {
            "ms": summary([x["ms"] for x in good]),
            "failures": len(ss) - len(good),
            "failure_messages": [x.get("error", "") for x in ss if not x["ok"]],
            "phases_p50_ms": {k2: pct(val, 50) for k2, val in phases.items()},
            "phases_p90_ms": {k2: pct(val, 90) for k2, val in phases.items()},
            "raw": ss,
        }
    bare = out["variants"]["docker_cli"]
    by_round = {x["round"]: x for x in samples["docker_cli"] if x["ok"]}
    for v in ("warm", "wake", "provisioned", "cold"):
        d = out["variants"][v]
        d["ratio_over_bare_p50"] = d["ms"]["p50"] / bare["ms"]["p50"]
        d["ratio_over_bare_p90"] = d["ms"]["p90"] / bare["ms"]["p90"]
        paired = [x["ms"] / by_round[x["round"]]["ms"] for x in samples[v]
                  if x["ok"] and x["round"] in by_round]  # fmt: skip
        d["ratio_paired_median"] = pct(paired, 50)
    prov = out["variants"]["provisioned"]
    prov["cold_starts"] = sum(1 for x in samples["provisioned"] if x.get("cold_start_header"))
    prov["calls"] = sum(1 for x in samples["provisioned"] if "cold_start_header" in x)
    prov["running_after_s_p50"] = pct(
        [x["provisioned_running_after_s"] for x in samples["provisioned"]
         if "provisioned_running_after_s" in x], 50
    )  # fmt: skip
    out["variants"]["wake"]["waited_for_pause_s_p50"] = pct(
        [x["waited_for_pause_s"] for x in samples["wake"] if "waited_for_pause_s" in x], 50
    )
    return out


# -- report ----------------------------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def render(machine: dict[str, Any], cmd: str, res: dict[str, Any]) -> str:
    L: list[str] = []
    L.append("## Machine\n")
    L.append(
        f"- {machine['nproc']} CPUs ({machine['cpu_model']}), {machine.get('memory_gib', '?')} GiB,"
        f" kernel {machine['kernel']}, Docker {machine['docker']}, Python {machine['python']},"
        f" aiohttp {machine['aiohttp']}"
    )
    L.append(
        f"- load average (1, 5, 15 min) at start: {' '.join(machine.get('loadavg_at_start', []))};"
        f" at end: {' '.join(machine.get('loadavg_at_end', []))};"
        f" highest 1-min value sampled every 2 s during the run:"
        f" {machine.get('loadavg_1m_peak', '?')}"
    )
    L.append(f"- code under test: {machine.get('code', 'unknown')}")
    L.append(f"- command: `{cmd}`")
    L.append(
        f"- image: `{res['image']}`, pushed to the run's own token-auth registry as"
        f" `{res.get('fn_image', '?')}` and deployed by that name (pinned to its digest);"
        f" platform log level: {res['log_level']}\n"
    )

    w = res.get("warm")
    c = res.get("cold")
    t = res.get("throughput")
    pl = res.get("pull")
    wk = res.get("wake")
    L.append("## Summary\n")
    L.append(
        "| # | Measurement (what exactly) | imagefn gateway | bare / direct"
        " | gateway - direct or gateway / bare | Target | Verdict |"
    )
    L.append("|---|---|---|---|---|---|---|")
    if w:
        g, d = w["gateway_ms"], w["direct_ms"]
        L.append(
            f"| 1a | warm no-op event, p50 latency, {w['blocks']}x{w['block_size']} sequential"
            f" requests per path, keep-alive, alternating blocks | {g['p50']:.3f} ms"
            f" | {d['p50']:.3f} ms | +{w['overhead_p50_ms']:.3f} ms | p50 overhead <= 2 ms"
            f" | {verdict(w['overhead_p50_ms'] <= 2.0)} |"
        )
        L.append(
            f"| 1b | same, p99 latency | {g['p99']:.3f} ms | {d['p99']:.3f} ms"
            f" | +{w['overhead_p99_ms']:.3f} ms | - | - |"
        )
    if c:
        gv = c["variants"]["gateway"]["ms"]
        names = {
            "docker_cli": "`docker run -d -p 127.0.0.1::9000` (CLI)",
            "engine_api": "Engine API create+start (aiodocker), minimal config",
            "engine_api_sandbox": "Engine API create+start, the platform's sandbox config",
        }
        for i, (v, label) in enumerate(names.items()):
            if v not in c["variants"]:
                continue
            b = c["variants"][v]
            r50 = b["ratio_gateway_over_this_p50"]
            target = "<= 1.15 x bare" if v != "engine_api_sandbox" else "(diagnostic)"
            vd = verdict(r50 <= 1.15) if v != "engine_api_sandbox" else "-"
            L.append(
                f"| 2{'abc'[i]} | cold start to first 200, image present, median (p90),"
                f" {c['rounds']} rounds;"
                f" bare = {label}, polled with POST /event-invoke every 5 ms;"
                f" failed rounds: gateway {c['variants']['gateway']['failures']},"
                f" bare {b['failures']}"
                f" | {gv['p50']:.0f} ({gv['p90']:.0f}) ms | {b['ms']['p50']:.0f}"
                f" ({b['ms']['p90']:.0f}) ms | x{r50:.3f}"
                f" (p90 x{b['ratio_gateway_over_this_p90']:.2f})"
                f" | {target} | {vd} |"
            )
    if t:
        rows = t["rows"]
        L.append(
            f"| 3a | saturation, {t['clients']} clients, {t['duration_s']:g} s:"
            f" {rows['gw_multi']['what']} vs {rows['direct_multi']['what']}"
            f" | {rows['gw_multi']['rps']:.0f} inv/s | {rows['direct_multi']['rps']:.0f} req/s"
            f" | x{t['ratio_multi']:.2f} | (none) | - |"
        )
        L.append(
            f"| 3b | like-for-like, {t['clients']} clients: gateway max_instances=1 vs direct to"
            f" that ONE container | {rows['gw_single']['rps']:.0f} inv/s"
            f" | {rows['direct_single']['rps']:.0f} req/s | x{t['ratio_single']:.2f} | (none) | - |"
        )
        L.append(
            f"| 3c | same gateway row vs direct to that container with 1 client (the"
            f" concurrency an instance sees behind the gateway) | {rows['gw_single']['rps']:.0f}"
            f" inv/s | {rows['direct_single_c1']['rps']:.0f} req/s"
            f" | x{t['ratio_single_vs_c1']:.2f} | (none) | - |"
        )
    if pl:
        gv = pl["variants"]["gateway_pull"]
        names = {
            "cli_pull_run": "`docker pull REPO@DIGEST` + `docker run -d -p 127.0.0.1::9000` (CLI)",
            "api_pull_run": "Engine API pull (X-Registry-Auth) + create + start",
        }
        for i, (v, label) in enumerate(names.items()):
            b = pl["variants"][v]
            r50 = b["ratio_gateway_over_this_p50"]
            L.append(
                f"| 4{'ab'[i]} | cold start INCLUDING the pull of a new {pl['layer_mb']:g} MB"
                f" layer, to first 200, median (p90), {pl['rounds']} rounds; bare = {label};"
                f" failed rounds: gateway {gv['failures']}, bare {b['failures']}"
                f" | {gv['ms']['p50']:.0f} ({gv['ms']['p90']:.0f}) ms"
                f" | {b['ms']['p50']:.0f} ({b['ms']['p90']:.0f}) ms"
                f" | x{r50:.3f} (p90 x{b['ratio_gateway_over_this_p90']:.2f};"
                f" paired x{b['ratio_paired_median']:.2f})"
                f" | <= 1.15 x bare (the cold-start target) | {verdict(r50 <= 1.15)} |"
            )
    if wk:
        bare = wk["variants"]["docker_cli"]
        for v, label, target, limit in (
            ("warm", "warm (an instance just used)", "-", None),
            ("wake", "wake from idle (the only instance frozen by `docker pause`)",
             "<= 0.2 x bare", 0.2),
            ("cold", "true cold (a fresh function, image present)", "<= 1.05 x bare", 1.05),
        ):  # fmt: skip
            d = wk["variants"][v]
            r50 = d["ratio_over_bare_p50"]
            L.append(
                f"| 5{'abc'[('warm', 'wake', 'cold').index(v)]} | {label}, to its 200,"
                f" median (p90), {wk['rounds']} rounds; bare = `docker run -d -p"
                f" 127.0.0.1::9000` (CLI) to the first 200; failed rounds: {v}"
                f" {d['failures']}, bare {bare['failures']}"
                f" | {d['ms']['p50']:.1f} ({d['ms']['p90']:.1f}) ms"
                f" | {bare['ms']['p50']:.0f} ({bare['ms']['p90']:.0f}) ms"
                f" | x{r50:.3f} (p90 x{d['ratio_over_bare_p90']:.3f};"
                f" paired x{d['ratio_paired_median']:.3f})"
                f" | {target} | {'-' if limit is None else verdict(r50 <= limit)} |"
            )
        d = wk["variants"]["provisioned"]
        cs, calls = d["cold_starts"], d["calls"]
        L.append(
            f"| 5d | provisioned first call (a fresh function with `provisioned_concurrency: 1`,"
            f" its instance up >= {PROVISIONED_SETTLE_S:g} s, no other traffic: load 1 <="
            f" provisioned 1), to its 200, median (p90), {wk['rounds']} rounds; cold starts"
            f" among the first calls: {cs} of {calls}; failed rounds: provisioned"
            f" {d['failures']}, bare {bare['failures']}"
            f" | {d['ms']['p50']:.1f} ({d['ms']['p90']:.1f}) ms"
            f" | {bare['ms']['p50']:.0f} ({bare['ms']['p90']:.0f}) ms"
            f" | x{d['ratio_over_bare_p50']:.3f} (p90 x{d['ratio_over_bare_p90']:.3f};"
            f" paired x{d['ratio_paired_median']:.3f})"
            f" | 0 cold starts with load <= provisioned"
            f" | {verdict(cs == 0 and d['failures'] == 0 and calls == wk['rounds'])} |"
        )
    L.append("")

    if w:
        L.append("## 1. Warm latency detail (ms)\n")
        L.append("| path | n | p50 | p90 | p99 | mean | min | max | errors |")
        L.append("|---|---|---|---|---|---|---|---|---|")
        for key, label in (("gateway_ms", "gateway"), ("direct_ms", "direct")):
            s = w[key]
            L.append(
                f"| {label} | {s['n']} | {s['p50']:.3f} | {s['p90']:.3f} | {s['p99']:.3f}"
                f" | {s['mean']:.3f} | {s['min']:.3f} | {s['max']:.3f}"
                f" | {w['errors'][label]} |"
            )
        st = ", ".join(
            f"{k} {v:.3f} (in {w['server_timing_count'][k]} responses)"
            for k, v in w["server_timing_p50_ms"].items()
        )
        L.append(
            f"\nGateway Server-Timing p50 (ms): {st}. Unexpected cold starts in the warm phase:"
            f" {w['unexpected_cold_starts']}; instances seen: {len(w['instances_seen'])}."
            f" CPU during the phase: machine {w['cpu']['machine_busy_cores']:.2f} cores busy,"
            f" client {w['cpu']['client_cores']:.2f}, platform {w['cpu']['platform_cores']:.2f}.\n"
        )
    if c:
        L.append("## 2. Cold start detail (ms)\n")
        L.append("| variant | n ok | failed | p50 | p90 | min | max | phases (p50) |")
        L.append("|---|---|---|---|---|---|---|---|")
        for v, d in c["variants"].items():
            s = d["ms"]
            ph = ", ".join(f"{k} {x:.1f}" for k, x in d["phases_p50_ms"].items())
            L.append(
                f"| {v} | {s['n']} | {d['failures']} | {s['p50']:.1f} | {s['p90']:.1f}"
                f" | {s['min']:.1f}"
                f" | {s['max']:.1f} | {ph} |"
            )
        nc = c["variants"]["gateway"].get("not_cold", 0)
        wp = c["variants"]["gateway"].get("rounds_with_pull", 0)
        for v, d in c["variants"].items():
            for msg in d["failure_messages"]:
                L.append(f"- {v} failure: `{msg[:300]}`")
        L.append(
            f"\nGateway rounds not reported as cold (X-Imagefn-Cold-Start != true): {nc};"
            f" rounds whose Server-Timing shows a pull (there should be none): {wp}."
            " Gateway phases come from its Server-Timing header; the bare phases are measured"
            " by this script.\n"
        )
    if t:
        L.append("## 3. Throughput detail\n")
        L.append(
            "| row | what | clients | completed | inv/s | p50 ms | p99 ms | errors | instances"
            " | platform CPU ms/inv | machine busy cores | client cores | platform cores |"
        )
        L.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for key, r in t["rows"].items():
            cpu_inv = r["platform_cpu_ms_per_invocation"]
            L.append(
                f"| {key} | {r['what']} | {r['clients']} | {r['completed']} | {r['rps']:.0f}"
                f" | {r['latency_p50_ms']:.2f} | {r['latency_p99_ms']:.2f}"
                f" | {sum(r['errors'].values())} | {r['instances_used'] or '-'}"
                f" | {'-' if cpu_inv is None else f'{cpu_inv:.2f}'}"
                f" | {r['machine_busy_cores']:.2f} | {r['client_cores']:.2f}"
                f" | {r['platform_cores']:.2f} |"
            )
        L.append("")
    if pl:
        L.append("## 4. Cold start including the pull, detail (ms)\n")
        L.append("| variant | n ok | failed | p50 | p90 | min | max | phases p50 (p90) |")
        L.append("|---|---|---|---|---|---|---|---|")
        for v, d in pl["variants"].items():
            s_ = d["ms"]
            ph = ", ".join(
                f"{k} {x:.1f} ({d['phases_p90_ms'][k]:.1f})" for k, x in d["phases_p50_ms"].items()
            )
            L.append(
                f"| {v} | {s_['n']} | {d['failures']} | {s_['p50']:.1f} | {s_['p90']:.1f}"
                f" | {s_['min']:.1f} | {s_['max']:.1f} | {ph} |"
            )
        for v, d in pl["variants"].items():
            for msg in d["failure_messages"]:
                L.append(f"- {v} failure: `{msg[:300]}`")
        g = pl["variants"]["gateway_pull"]
        L.append(
            f"\nGateway rounds without a `pull` phase (there should be none):"
            f" {g['rounds_without_pull']}; not reported as cold: {g['not_cold']}."
            f" Deploy (PUT, the gateway resolving tag -> digest in the registry; untimed"
            f" above) took {g['deploy_ms']['p50']:.1f} ms p50, {g['deploy_ms']['p90']:.1f} ms p90."
            f" Preparing a round (3 builds, pushes, 1 deploy, rmi; untimed) took"
            f" {pl['prepare_s_p50']:.1f} s (p50). CPU during the part: machine"
            f" {pl['cpu']['machine_busy_cores']:.2f} cores busy, platform"
            f" {pl['cpu']['platform_cores']:.2f}.\n"
        )
    if wk:
        L.append("## 5. Wake from idle detail (ms)\n")
        L.append("| variant | n ok | failed | p50 | p90 | min | max | phases p50 (p90) |")
        L.append("|---|---|---|---|---|---|---|---|")
        for v, d in wk["variants"].items():
            s_ = d["ms"]
            ph = ", ".join(
                f"{k} {x:.2f} ({d['phases_p90_ms'][k]:.2f})" for k, x in d["phases_p50_ms"].items()
            )
            L.append(
                f"| {v} | {s_['n']} | {d['failures']} | {s_['p50']:.1f} | {s_['p90']:.1f}"
                f" | {s_['min']:.1f} | {s_['max']:.1f} | {ph} |"
            )
        for v, d in wk["variants"].items():
            for msg in d["failure_messages"]:
                L.append(f"- {v} failure: `{msg[:300]}`")
        L.append(
            f"\nPlatform run with IMAGEFN_PAUSE_AFTER_S={wk['pause_after_s']:g}; the wake row"
            f" waited {wk['variants']['wake']['waited_for_pause_s_p50']:.2f} s (p50) for the"
            " engine to report the container paused. Gateway phases come from its"
            " Server-Timing header (`wake`: the invocation waiting for `docker unpause`)."
            " The provisioned row's instance was seen running"
            f" {wk['variants']['provisioned']['running_after_s_p50']:.2f} s (p50) after the"
            f" deploy returned; the call was sent once it had been up {PROVISIONED_SETTLE_S:g} s."
            f" CPU during the part: machine {wk['cpu']['machine_busy_cores']:.2f} cores busy,"
            f" platform {wk['cpu']['platform_cores']:.2f}.\n"
        )
    return "\n".join(L)


# -- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--redis-url", default=local_redis_url(0))
    p.add_argument("--image", default=DEFAULT_IMAGE, help="event-function image (no-op-ish)")
    p.add_argument("--quick", action="store_true", help="small counts: a smoke run <= 60 s")
    p.add_argument("--json", metavar="FILE", help="save every raw figure to FILE")
    p.add_argument("--clients", type=int, default=32, help="concurrent clients for part 3")
    p.add_argument("--instances", type=int, default=4, help="max_instances for part 3")
    p.add_argument("--platform-log-level", default="info", help="IMAGEFN_LOG_LEVEL of the platform")
    p.add_argument(
        "--only",
        default="warm,cold,throughput,pull",
        help="parts to run (comma separated; also: wake, not in the default)",
    )
    p.add_argument(
        "--code",
        metavar="TEXT",
        help="describe the code under test in the report (e.g. when running from an export)",
    )
    p.add_argument(
        "--pull-layer-mb",
        type=float,
        default=2.0,
        help="size of the random layer each pull-round image adds to the bench image",
    )
    p.add_argument(
        "--profile-platform",
        metavar="FILE",
        help="diagnostic: run the platform under cProfile and save its stats to FILE "
        "(the figures are then not comparable)",
    )
    a = p.parse_args(argv)
    if a.quick:
        a.blocks, a.block_size, a.warmup = 4, 100, 50
        a.cold_rounds, a.cold_warmup = 3, 1
        a.pull_rounds, a.pull_warmup = 2, 1
        a.wake_rounds, a.wake_warmup = 3, 1
        a.duration = 2.0
    else:
        a.blocks, a.block_size, a.warmup = 10, 200, 200
        a.cold_rounds, a.cold_warmup = 12, 1
        a.pull_rounds, a.pull_warmup = 10, 1
        a.wake_rounds, a.wake_warmup = 12, 1
        a.duration = 10.0
    a.parts = {x.strip() for x in a.only.split(",") if x.strip()}
    return a


async def amain(a: argparse.Namespace) -> int:
    machine = machine_info()
    if a.code:
        machine["code"] = a.code
    cmd = " ".join([Path(sys.executable).name, *sys.argv])
    print("# imagefn foundation benchmark\n", flush=True)
    print(
        f"Machine: {machine['nproc']} CPUs, {machine['cpu_model']},"
        f" {machine.get('memory_gib', '?')} GiB RAM, kernel {machine['kernel']},"
        f" Docker {machine['docker']},"
        f" load average {' '.join(machine.get('loadavg_at_start', []))}\n",
        flush=True,
    )
    workdir = Path(tempfile.mkdtemp(prefix="imagefn-bench-"))
    plat = Platform(a.redis_url, a.platform_log_level, workdir, a.profile_platform)
    docker = aiodocker.Docker()
    reg = BenchRegistry(plat.port)
    # The bench image, in the registry under a repository of this run.
    fn_image = f"bench-{plat.tag}/{a.image.rsplit('/', 1)[-1].split(':')[0]}:latest"
    res: dict[str, Any] = {
        "image": a.image,
        "fn_image": fn_image,
        "log_level": a.platform_log_level,
        "quick": a.quick,
    }
    ctl: Control | None = None
    rc = 0
    budget_s = 75 if a.quick else 270
    if "pull" in a.parts:
        budget_s += (a.pull_rounds + a.pull_warmup) * 30
    if "wake" in a.parts:
        budget_s += (a.wake_rounds + a.wake_warmup) * 30
    # Part 5 needs idle instances frozen; the others need them running (direct rows).
    wake_only = a.parts == {"wake"}
    load_task = asyncio.create_task(sample_load(machine))
    try:
        await docker.images.inspect(a.image)  # fail early, before starting anything
        guarded = await plat.guard_other_installations(docker)
        reg.start()
        log(
            f"registry on {reg.address} (token realm {reg.token_url}, directory {reg.dir});"
            f" starting imagefn up on {plat.url} (prefix {plat.prefix}, worker {plat.worker_id});"
            f" guarded {guarded} other worker(s)' containers from our janitor; log {plat.log_path}"
        )
        await plat.start(reg.env(), pause_after_s=1 if wake_only else 0)
        ctl = Control(plat)
        repository, _, tag = fn_image.partition(":")
        digest = await reg.push(docker, a.image, repository, tag)
        log(f"pushed {a.image} as {reg.address}/{fn_image} ({digest})")
        async with asyncio.timeout(budget_s):
            warm_fn = f"b{plat.tag}-warm"
            if "warm" in a.parts or "throughput" in a.parts:
                log(f"1. warm latency: {a.blocks} blocks of {a.block_size} per path")
                res["warm"] = await bench_warm(
                    ctl, docker, fn_image, a.blocks, a.block_size, a.warmup
                )
                w = res["warm"]
                log(
                    f"warm p50 gateway {w['gateway_ms']['p50']:.3f} ms, direct"
                    f" {w['direct_ms']['p50']:.3f} ms"
                )
                if "warm" not in a.parts:
                    del res["warm"]
            if "cold" in a.parts:
                log(f"2. cold start: {a.cold_rounds} rounds (+{a.cold_warmup} warm-up)")
                res["cold"] = await bench_cold(
                    ctl, docker, a.image, fn_image, a.cold_rounds, a.cold_warmup
                )
            if "throughput" in a.parts:
                log(f"3. throughput: {a.clients} clients, {a.duration:g} s per row")
                res["throughput"] = await bench_throughput(
                    ctl, docker, fn_image, warm_fn, a.clients, a.duration, a.instances
                )
            if "pull" in a.parts:
                log(
                    f"4. cold start with pull: {a.pull_rounds} rounds (+{a.pull_warmup} warm-up),"
                    f" {a.pull_layer_mb:g} MB layer"
                )
                await reg.docker_login()
                res["pull"] = await bench_pull(
                    ctl, docker, reg, a.image, a.pull_rounds, a.pull_warmup, a.pull_layer_mb
                )
            if "wake" in a.parts:
                if plat.pause_after_s != 1:
                    log("5. restarting imagefn up with IMAGEFN_PAUSE_AFTER_S=1 (same port)")
                    await plat.stop()
                    await plat.start(reg.env(), pause_after_s=1)
                log(f"5. wake from idle: {a.wake_rounds} rounds (+{a.wake_warmup} warm-up)")
                res["wake"] = await bench_wake(
                    ctl, docker, a.image, fn_image, a.wake_rounds, a.wake_warmup
                )
    except TimeoutError:
        log(f"time budget of {budget_s} s exceeded; reporting what was measured")
        rc = 2
    except Exception:
        log("benchmark failed:\n" + traceback.format_exc())
        rc = 1
    finally:
        if ctl is not None:
            await ctl.close()
        code = await plat.stop()
        log(f"imagefn up stopped (exit code {code})")
        # Anything left of ours: the platform's instances, then our bare containers.
        leftovers = 0
        with contextlib.suppress(aiodocker.exceptions.DockerError):
            for lbl in (f"{WORKER_LABEL}={plat.worker_id}", f"{BENCH_LABEL}={plat.tag}"):
                for c in await docker.containers.list(
                    all=True, filters=json.dumps({"label": [lbl]})
                ):
                    leftovers += 1
                    with contextlib.suppress(aiodocker.exceptions.DockerError):
                        await c.delete(force=True)
        if leftovers:
            log(f"removed {leftovers} leftover container(s)")
        images = await reg.remove_images(docker)
        reg.cleanup()
        log(f"registry stopped; removed {images} image reference(s) to it and {reg.dir}")
        await docker.close()
        load_task.cancel()
        with contextlib.suppress(Exception):
            r = aioredis.Redis.from_url(a.redis_url)
            keys = [k async for k in r.scan_iter(match=f"{plat.prefix}:*", count=1000)]
            if keys:
                await r.delete(*keys)
            await r.aclose()
    res["machine"] = machine
    res["command"] = cmd
    res["platform"] = {
        "prefix": plat.prefix,
        "worker_id": plat.worker_id,
        "port": plat.port,
        "log": str(plat.log_path),
    }
    with contextlib.suppress(OSError):
        machine["loadavg_at_end"] = Path("/proc/loadavg").read_text().split()[:3]  # noqa: ASYNC240
    report = render(machine, cmd, res)
    print(report, flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1, default=str))  # noqa: ASYNC240
        log(f"raw figures saved to {a.json}")
    log(f"platform log: {plat.log_path}")
    return rc


def main() -> int:
    a = parse_args()
    try:
        return asyncio.run(amain(a))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
