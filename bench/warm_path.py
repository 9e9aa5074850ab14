#!/usr/bin/env python3
"""Warm-path benchmark (issue 12): one warm instance straight, behind nginx, and behind
imagefn's gateway, side by side in one run on one machine.

What one run measures (``bench/README.md`` has the details; results go into
``docs/benchmarks.md``, "The warm path (issue 12)"):

1. **Web saturation on one warm instance** (a web function, ``max_instances: 1``,
   ``instance_concurrency`` 16) with ``wrk`` (16 connections): (a) straight to the
   container's published port, (b) through nginx (``nginx-light``, 1 worker, upstream
   keepalive, a config of this run in a temporary directory, run in the foreground as
   our child) proxying to that same container, (c) through the gateway on the Redis
   backend, (d) on the Kafka backend; ratios gateway/nginx and nginx/direct.
2. **Event saturation**: ``POST /v1/functions/NAME/invoke`` with ``wrk`` (16
   connections) and a Lua script (C, so the load generator takes little of the 2 cores),
   the function allowed ``--instances`` instances.
3. **Serial warm overhead**: sequential requests, gateway and direct interleaved pair
   by pair (the order alternating), for the event and the web function: p50/p99 of each
   path and of gateway - direct.
4. **Platform CPU per warm invocation**: utime+stime (``/proc/PID/stat``) of every
   process of the platform (its processes and their children, e.g. the log shipper)
   before and after each load phase, divided by the invocations it served.
5. **Today's figure in the same run**: ``--baseline REV`` (a ``git archive`` export of
   REV, run with this venv) or ``--baseline-src DIR [--baseline-venv VENV]`` (another
   checkout and its venv, e.g. made by ``bench/baseline_venv.sh``) runs the same rows
   against that code, side by side.

Each platform is ``imagefn up`` (``--modes up``) or ``imagefn gateway`` + ``imagefn
worker`` as separate processes (``--modes split``), or both, with its own port, Redis
prefix, worker id and bootstrap admin key (``bench/foundation.py``'s Platform), all
started before the first measurement and running side by side; the idle ones' CPU is
reported per row. The function images are in a registry of this run
(``foundation.BenchRegistry``). All traffic goes to 127.0.0.1.

Usage: ``.venv/bin/python bench/warm_path.py [--quick] [--baseline REV] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiodocker
import aiohttp
import redis.asyncio as aioredis

sys.path.insert(0, str(Path(__file__).resolve().parent))
from foundation import (  # the sibling script, found through sys.path
    REPO,
    WORKER_LABEL,
    BenchRegistry,
    Control,
    Platform,
    Sample,
    _machine_cpu,
    fn_spec,
    free_port,
    instance_ports,
    keepalive_session,
    log,
    machine_info,
    parse_server_timing,
    pct,
    post_direct,
    post_gateway,
    summary,
)
from peers.common import local_redis_url

NOOP_DIR = REPO / "bench/images/noop"
NOOP_IMAGE = "imagefn-bench/noop:latest"
KAFKA_BOOTSTRAP = "127.0.0.1:9092"
EVENT_BODY = '{"name":"bench"}'

# Issue 12's targets, checked in the report.
TARGET_GW_OVER_NGINX = 0.35
STRETCH_GW_OVER_NGINX = 0.5
TARGET_EVENT_OVER_BASELINE = 3.0
TARGET_SERIAL_P50_MS = 1.5
TARGET_SERIAL_P99_MS = 4.0
TARGET_CPU_MS = 1.0


# -- the code under test and its platforms ---------------------------------------------------


@dataclass(frozen=True)
class Code:
    """One version of imagefn: a source tree and the venv that runs it."""

    label: str  # "current" or "baseline"
    src: Path
    venv: Path
    describe: str

    def imagefn(self) -> list[str]:
        exe = self.venv / "bin/imagefn"
        if exe.exists():
            return [str(exe)]
        # -P: not the working directory (this tree) but PYTHONPATH (``src``) first.
        return [str(self.venv / "bin/python"), "-P", "-m", "cli.main"]


def describe_tree(src: Path) -> str:
    """``commit abc1234`` (+ modified files) for a git checkout, else the path."""
    try:
        head = subprocess.run(
            ["git", "-C", str(src), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=10,
        ).stdout.strip()  # fmt: skip
        top = subprocess.run(
            ["git", "-C", str(src), "rev-parse", "--show-toplevel"],
            capture_output=True, text=True, timeout=10,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return f"tree {src}"
    # An export inside another checkout (e.g. under /tmp of a repo) is not that checkout.
    if not head or Path(top).resolve() != src.resolve():
        return f"tree {src}"
    dirty = subprocess.run(
        ["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True, text=True, timeout=10,
    ).stdout.splitlines()  # fmt: skip
    return f"commit {head}" + (f" + {len(dirty)} modified file(s)" if dirty else "")


class BenchPlatform(Platform):
    """``foundation.Platform`` for one code, mode and backend.

    ``up`` is one process; ``split`` is ``imagefn gateway`` + ``imagefn worker`` (and,
    with ``coldstart``, a cold-start manager) as separate processes sharing the
    settings. Platform.start is reused per process: it builds the environment, starts
    ``command()`` and waits for the gateway's /healthz, which is why the gateway starts
    first (the others then pass that wait at once)."""

    def __init__(
        self,
        code: Code,
        mode: str,
        backend: str,
        redis_url: str,
        log_level: str,
        workdir: Path,
        env: dict[str, str],
        coldstart: bool,
    ) -> None:
        super().__init__(redis_url, log_level, workdir)
        self.code = code
        self.mode = mode
        self.backend = backend
        self.key = f"{code.label} {backend} {mode}"
        self.workdir = workdir
        self.env = dict(env)
        # Both trees import as the same packages: PYTHONPATH picks this one (the console
        # script's directory comes first on sys.path, then PYTHONPATH, then the venv's
        # editable install).
        self.env["PYTHONPATH"] = str(code.src)
        if backend == "kafka":
            self.env["IMAGEFN_QUEUE_BACKEND"] = "kafka"
            self.env.setdefault("IMAGEFN_KAFKA_BOOTSTRAP", KAFKA_BOOTSTRAP)
        self.subcommands = ["up"] if mode == "up" else ["gateway", "worker"]
        if mode == "split" and coldstart:
            self.subcommands.append("coldstart")
        self._cmd: list[str] = []
        self.procs: list[tuple[subprocess.Popen[bytes], Any, Path]] = []

    def command(self) -> list[str]:
        return self._cmd

    async def start(
        self, extra_env: dict[str, str] | None = None, pause_after_s: float = 0
    ) -> None:
        for sub in self.subcommands:
            self._cmd = [*self.code.imagefn(), sub]
            self.log_path = self.workdir / f"{self.prefix}-{sub}.log"
            await super().start({**self.env, **(extra_env or {})}, pause_after_s)
            assert self.proc is not None
            self.procs.append((self.proc, self._logf, self.log_path))

    def check_alive(self) -> None:
        for proc, _, path in self.procs:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{self.key}: {path.name} exited ({proc.returncode}); see {path}"
                )

    async def stop(self) -> int | None:
        # Workers first: they remove their instances while the gateway still answers.
        code: int | None = 0
        for proc, logf, _ in reversed(self.procs):
            self.proc, self._logf = proc, logf
            rc = await super().stop()
            code = code or rc
        self.procs.clear()
        return code

    @property
    def pids(self) -> list[int]:
        return [p.pid for p, _, _ in self.procs]

    @property
    def logs(self) -> list[str]:
        return [str(path) for _, _, path in self.procs]


# -- CPU accounting --------------------------------------------------------------------------


def process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, comm) of every process."""
    out: dict[int, tuple[int, str]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = Path(f"/proc/{d}/stat").read_text()
            comm = stat[stat.index("(") + 1 : stat.rindex(")")]
            out[int(d)] = (int(stat[stat.rindex(")") + 2 :].split()[1]), comm)
    return out


def own_cpu_s(pid: int) -> float:
    """utime+stime of this one process, in seconds (0 when unreadable). Not
    foundation._proc_cpu_s, which may count a process's descendants too: the Meter walks
    the process tree itself and must count each process once."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def tree(roots: list[int], table: dict[int, tuple[int, str]]) -> set[int]:
    """``roots`` and all their descendants (the worker's log shipper child, nginx's worker)."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    seen: set[int] = set()
    todo = [r for r in roots if r]
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.add(pid)
            todo.extend(children.get(pid, []))
    return seen


def children_cpu_s() -> float:
    """CPU of reaped children (wrk, once it has exited)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def self_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


@dataclass
class Meter:
    """CPU seconds of named groups of processes over one window.

    A group is its root pids plus their descendants, found at both ends of the window
    (a process that appears meanwhile counts from 0; one that ends meanwhile is lost,
    which no platform process does during a load phase). ``services`` matches by
    command name: Redis, the Kafka-protocol broker, Docker's userland port proxies;
    they also serve other users of the machine, so those figures are upper bounds."""

    groups: dict[str, list[int]]
    services: tuple[str, ...] = ("redis-server", "tansu", "docker-proxy", "dockerd")
    t0: float = 0.0
    start: dict[str, dict[int, float]] = field(default_factory=dict)
    m0: tuple[float, float] = (0.0, 0.0)
    c0: float = 0.0
    result: dict[str, float] = field(default_factory=dict)

    def _sample(self) -> dict[str, dict[int, float]]:
        table = process_table()
        out = {
            name: {p: own_cpu_s(p) for p in tree(roots, table)}
            for name, roots in self.groups.items()
        }
        for svc in self.services:
            out[svc] = {p: own_cpu_s(p) for p, (_, comm) in table.items() if comm.startswith(svc)}
        return out

    def __enter__(self) -> Meter:
        self.start = self._sample()
        self.m0 = _machine_cpu()
        self.c0 = children_cpu_s() + self_cpu_s()
        self.t0 = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        wall = max(1e-9, time.monotonic() - self.t0)
        end = self._sample()
        busy, total = _machine_cpu()
        ncpu = os.cpu_count() or 1
        res: dict[str, float] = {"wall_s": wall}
        for name, cpus in end.items():
            before = self.start.get(name, {})
            res[f"cpu_s:{name}"] = sum(max(0.0, c - before.get(p, 0.0)) for p, c in cpus.items())
        dbusy, dtotal = busy - self.m0[0], total - self.m0[1]
        res["machine_busy_cores"] = dbusy / dtotal * ncpu if dtotal else float("nan")
        # wrk is our child: its CPU shows in RUSAGE_CHILDREN once it has been reaped.
        res["cpu_s:client"] = children_cpu_s() + self_cpu_s() - self.c0
        self.result = res


# -- wrk -------------------------------------------------------------------------------------

_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    return float(m.group(1)) * _UNITS[m.group(2)] if m else float("nan")


def parse_wrk(out: str) -> dict[str, Any]:
    """The figures of ``wrk --latency``'s report."""
    res: dict[str, Any] = {"latency_ms": {}, "socket_errors": {}, "non_2xx": 0}
    if m := re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m),", out):
        res["requests"] = int(m.group(1))
        res["duration_s"] = _ms(m.group(2) + m.group(3)) / 1000
    if m := re.search(r"Requests/sec:\s+([\d.]+)", out):
        res["rps_wrk"] = float(m.group(1))
    for q, v in re.findall(r"^\s+(50|75|90|99)%\s+(\S+)\s*$", out, re.M):
        res["latency_ms"][f"p{q}"] = _ms(v)
    if m := re.search(r"Latency\s+(\S+)\s+(\S+)\s+(\S+)", out):
        res["latency_ms"]["mean"] = _ms(m.group(1))
        res["latency_ms"]["max"] = _ms(m.group(3))
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        res["socket_errors"] = dict(
            zip(("connect", "read", "write", "timeout"), map(int, m.groups()), strict=True)
        )
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        res["non_2xx"] = int(m.group(1))
    # Printed by the gateway rows' scripts (write_lua): statuses other than 2xx/3xx.
    res["statuses"] = {code: int(n) for code, n in re.findall(r"^STATUS (\d+) (\d+)$", out, re.M)}
    if "requests" not in res:
        raise RuntimeError(f"could not parse wrk's output:\n{out}")
    # Answers that were not errors (wrk counts non-2xx among its requests; read errors
    # and timeouts are not counted as requests).
    res["ok"] = res["requests"] - res["non_2xx"]
    return res


async def run_wrk(
    url: str, connections: int, seconds: float, threads: int, script: Path | None
) -> dict[str, Any]:
    args = [
        "wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s",
        "--latency", "--timeout", "10s",
    ]  # fmt: skip
    if script is not None:
        args += ["-s", str(script)]
    proc = await asyncio.create_subprocess_exec(
        *args, url, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"wrk exited {proc.returncode}: {err.decode(errors='replace')[-500:]}")
    return parse_wrk(out.decode(errors="replace"))


# Counts the statuses of failed answers per thread and prints them at the end. A script
# with response() makes wrk hand every response to Lua: a cost the gateway rows (a few
# thousand per second at most) can afford, the direct and nginx rows get no script.
LUA_STATUSES = """
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) statuses = {} end
function response(status, headers, body)
  if status >= 400 then statuses[status] = (statuses[status] or 0) + 1 end
end
function done(summary, latency, requests)
  for _, t in ipairs(threads) do
    for code, n in pairs(t:get("statuses")) do
      io.write(string.format("STATUS %d %d\\n", code, n))
    end
  end
end
"""


def write_lua(path: Path, method: str, body: str, headers: dict[str, str]) -> Path:
    """A wrk script that sends one fixed request and counts failed statuses. It may carry
    an API key: mode 0600 in this run's temporary directory, never printed, deleted at
    the end."""
    lines = [f"wrk.method = {json.dumps(method)}"]
    if body:
        lines.append(f"wrk.body = {json.dumps(body)}")
    lines += [f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}" for k, v in headers.items()]
    lines.append(LUA_STATUSES)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


# -- nginx -----------------------------------------------------------------------------------

NGINX_CONF = """\
# Written by bench/warm_path.py for one run: the peer the gateway is held against.
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    upstream fn {{
        server 127.0.0.1:{upstream};
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://fn;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""


class Nginx:
    """nginx in the foreground as our child, on a free loopback port, its config and logs
    in a directory of this run."""

    def __init__(self, workdir: Path, upstream_port: int) -> None:
        self.dir = workdir / "nginx"
        self.port = free_port()
        self.upstream_port = upstream_port
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    async def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        conf = self.dir / "nginx.conf"
        conf.write_text(
            NGINX_CONF.format(dir=self.dir, port=self.port, upstream=self.upstream_port)
        )
        self.proc = await asyncio.create_subprocess_exec(
            "nginx", "-p", str(self.dir), "-c", str(conf), "-e", str(self.dir / "error.log"),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        async with aiohttp.ClientSession() as s:
            while True:
                if self.proc.returncode is not None:
                    raise RuntimeError(f"nginx exited; see {self.dir / 'error.log'}")
                with contextlib.suppress(aiohttp.ClientError, OSError, asyncio.TimeoutError):
                    async with s.get(self.url, timeout=aiohttp.ClientTimeout(total=2)) as r:
                        if r.status == 200:
                            return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"nginx not answering within 10 s; see {self.dir}")
                await asyncio.sleep(0.1)

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.terminate()  # SIGTERM: nginx's fast shutdown
        try:
            await asyncio.wait_for(self.proc.wait(), 10)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0


def ensure_tools(install: bool) -> None:
    """wrk and nginx (Debian's ``wrk`` and ``nginx-light``), installed when missing."""
    missing = [
        pkg for tool, pkg in (("wrk", "wrk"), ("nginx", "nginx-light")) if not shutil.which(tool)
    ]
    if not missing:
        return
    if not install or os.geteuid() != 0:
        raise RuntimeError(f"missing {', '.join(missing)}: apt-get install -y {' '.join(missing)}")
    log(f"installing {' '.join(missing)} with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-q", *missing]
    if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=True)
        subprocess.run(cmd, env=env, capture_output=True, check=True)


# -- load rows -------------------------------------------------------------------------------


@dataclass
class Row:
    key: str
    kind: str  # "web" or "event"
    what: str
    url: str
    connections: int
    script: Path | None = None
    platform: BenchPlatform | None = None
    halves: list[tuple[dict[str, Any], dict[str, float]]] = field(default_factory=list)


def combine(row: Row, platforms: list[BenchPlatform]) -> dict[str, Any]:
    """One row's figures over its halves."""
    ok = sum(w["ok"] for w, _ in row.halves)
    requests = sum(w["requests"] for w, _ in row.halves)
    secs = sum(w["duration_s"] for w, _ in row.halves)
    wall = sum(m["wall_s"] for _, m in row.halves)

    def cores(name: str) -> float:
        return sum(m.get(f"cpu_s:{name}", 0.0) for _, m in row.halves) / wall if wall else 0.0

    out: dict[str, Any] = {
        "what": row.what,
        "kind": row.kind,
        "url": row.url,
        "connections": row.connections,
        "requests": requests,
        "ok": ok,
        "duration_s": secs,
        "rps": ok / secs if secs else 0.0,
        # The halves' medians averaged, their p99s' maximum (as bench/foundation.py does).
        "latency_p50_ms": sum(w["latency_ms"].get("p50", 0.0) for w, _ in row.halves)
        / max(1, len(row.halves)),
        "latency_p99_ms": max((w["latency_ms"].get("p99", 0.0) for w, _ in row.halves), default=0),
        "non_2xx": sum(w["non_2xx"] for w, _ in row.halves),
        "statuses": {
            code: sum(w.get("statuses", {}).get(code, 0) for w, _ in row.halves)
            for code in sorted({c for w, _ in row.halves for c in w.get("statuses", {})})
        },
        "socket_errors": {
            k: sum(w["socket_errors"].get(k, 0) for w, _ in row.halves)
            for k in ("connect", "read", "write", "timeout")
        },
        "machine_busy_cores": sum(m["machine_busy_cores"] for _, m in row.halves)
        / max(1, len(row.halves)),
        "client_cores": cores("client"),
        "services_cores": {s: cores(s) for s in Meter.services},
        "halves": [w for w, _ in row.halves],
    }
    if row.platform is not None:
        cpu = sum(m.get(f"cpu_s:{row.platform.key}", 0.0) for _, m in row.halves)
        out["platform"] = row.platform.key
        out["platform_cores"] = cores(row.platform.key)
        out["platform_cpu_ms_per_invocation"] = cpu * 1000 / ok if ok else None
    others = [p.key for p in platforms if p is not row.platform]
    out["idle_platforms_cores"] = sum(cores(k) for k in others)
    out["nginx_cores"] = cores("nginx")
    return out


async def run_rows(
    rows: list[Row], groups: dict[str, list[int]], seconds: float, warmup_s: float, threads: int
) -> None:
    """Each row warmed up once, then measured in two halves: all rows forward, then all in
    reverse, so that drift over the run hits every row alike."""
    for row in rows:
        log(f"  warm-up {row.key} ({warmup_s:g} s)")
        await run_wrk(row.url, row.connections, warmup_s, threads, row.script)
    half = seconds / 2
    for row in [*rows, *reversed(rows)]:
        with Meter(groups) as meter:
            w = await run_wrk(row.url, row.connections, half, threads, row.script)
        row.halves.append((w, meter.result))
        errs = w["non_2xx"] + sum(w["socket_errors"].values())
        codes = ", ".join(f"{n}x {c}" for c, n in w["statuses"].items())
        p = row.platform.key if row.platform else ""
        cpu = meter.result.get(f"cpu_s:{p}", 0.0) if p else 0.0
        log(
            f"  {row.key}: {w['ok'] / w['duration_s']:,.0f}/s, p50"
            f" {w['latency_ms'].get('p50', 0):.2f} ms, p99 {w['latency_ms'].get('p99', 0):.2f} ms"
            + (f", {errs} errors {codes}" if errs else "")
            + (f", platform {cpu * 1000 / max(1, w['ok']):.2f} ms CPU/inv" if p else "")
        )


# -- serial overhead -------------------------------------------------------------------------


async def get_sample(session: aiohttp.ClientSession, url: str) -> Sample:
    t0 = time.perf_counter_ns()
    try:
        async with session.get(url) as r:
            await r.read()
            ms = (time.perf_counter_ns() - t0) / 1e6
            return Sample(ms, r.status == 200, r.headers, "" if r.status == 200 else str(r.status))
    except (TimeoutError, aiohttp.ClientError, OSError) as e:
        return Sample((time.perf_counter_ns() - t0) / 1e6, False, None, type(e).__name__)


Request = Callable[[aiohttp.ClientSession], Awaitable[Sample]]


def bind(fn: Callable[[aiohttp.ClientSession, str], Awaitable[Sample]], url: str) -> Request:
    return lambda session: fn(session, url)


async def serial(
    plat: BenchPlatform,
    kind: str,
    gw: Request,
    direct: Request,
    gw_headers: dict[str, str] | None,
    n: int,
    warmup: int,
    groups: dict[str, list[int]],
) -> dict[str, Any]:
    """``n`` pairs (gateway, direct), one request at a time, the order alternating."""
    g_ms: list[float] = []
    d_ms: list[float] = []
    diffs: list[float] = []
    phases: dict[str, list[float]] = {}  # the gateway's Server-Timing, per phase
    errors: dict[str, int] = {}
    async with (
        keepalive_session(limit=1, headers=gw_headers) as gs,
        keepalive_session(limit=1) as ds,
    ):
        for _ in range(warmup):
            await gw(gs)
            await direct(ds)
        with Meter(groups) as meter:
            for i in range(n):
                if i % 2:
                    d, g = await direct(ds), await gw(gs)
                else:
                    g, d = await gw(gs), await direct(ds)
                for s in (g, d):
                    if not s.ok:
                        errors[s.error] = errors.get(s.error, 0) + 1
                if g.ok and d.ok:
                    if g.headers is not None and "Server-Timing" in g.headers:
                        for phase, ms in parse_server_timing(g.headers["Server-Timing"]).items():
                            phases.setdefault(phase, []).append(ms)
                    g_ms.append(g.ms)
                    d_ms.append(d.ms)
                    diffs.append(g.ms - d.ms)
    gsum, dsum = summary(g_ms), summary(d_ms)
    cpu = meter.result.get(f"cpu_s:{plat.key}", 0.0)
    return {
        "kind": kind,
        "platform": plat.key,
        "pairs": len(diffs),
        "errors": errors,
        "gateway_ms": gsum,
        "direct_ms": dsum,
        "overhead_p50_ms": gsum["p50"] - dsum["p50"],
        "overhead_p99_ms": gsum["p99"] - dsum["p99"],
        "paired_diff_ms": summary(diffs),
        "server_timing_p50_ms": {k: pct(v, 50) for k, v in phases.items()},
        # A phase shows only on the calls that had it (e.g. ``wait``: a slot wait > 1 ms).
        "server_timing_calls": {k: len(v) for k, v in phases.items()},
        # At one call at a time nothing is amortised over a batch: the upper end.
        "platform_cpu_ms_per_invocation": cpu * 1000 / len(diffs) if diffs else None,
        "machine_busy_cores": meter.result["machine_busy_cores"],
    }


# -- setting up ------------------------------------------------------------------------------


async def build_image(image: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        "docker", "build", "-q", "-t", image, str(NOOP_DIR),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"docker build {NOOP_DIR}: {err.decode(errors='replace')[-800:]}")


def export_commit(rev: str, dest: Path) -> str:
    """``git archive REV`` of this repository into ``dest``; returns the short commit."""
    short = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", f"{rev}^{{commit}}"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    dest.mkdir(parents=True)
    archive = subprocess.Popen(["git", "-C", str(REPO), "archive", short], stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", str(dest)], stdin=archive.stdout, check=True)
    if archive.wait() != 0:
        raise RuntimeError(f"git archive {rev} failed")
    return short


@dataclass
class Functions:
    web: str
    event: str
    web_port: int
    event_port: int


async def deploy(
    plat: BenchPlatform, ctl: Control, docker: aiodocker.Docker, image: str, a: argparse.Namespace
) -> Functions:
    """The web and the event function of one platform, each invoked once (its cold start)
    and then checked to have a running instance."""
    web, event = f"b{plat.tag}-web", f"b{plat.tag}-ev"
    env = {"NOOP_SERVER": a.server}
    await ctl.deploy(
        fn_spec(
            web, image, type="web", auth=a.web_auth, max_instances=1,
            instance_concurrency=a.instance_concurrency, idle_ttl_s=3600, env=env,
        )
    )  # fmt: skip
    await ctl.deploy(fn_spec(event, image, max_instances=a.instances, idle_ttl_s=3600, env=env))
    headers = plat.auth_headers if a.web_auth == "key" else {}
    async with ctl.session.get(f"{plat.url}/web/{web}/", headers=headers) as r:
        body = await r.read()
        if r.status != 200:
            raise RuntimeError(f"{plat.key}: first web call: HTTP {r.status}: {body[:300]!r}")
    status, _, body = await ctl.invoke(event)
    if status != 200:
        raise RuntimeError(f"{plat.key}: first event call: HTTP {status}: {body[:300]!r}")
    ports = {}
    for name in (web, event):
        found = await instance_ports(docker, plat.worker_id, name)
        if not found:
            raise RuntimeError(f"{plat.key}: no running instance of {name}")
        ports[name] = sorted(found.values())[0]
    return Functions(web, event, ports[web], ports[event])


# -- report ----------------------------------------------------------------------------------


def _f(x: Any, fmt: str = ".2f") -> str:
    return "-" if x is None else format(x, fmt)


def render(res: dict[str, Any]) -> str:
    m = res["machine"]
    settings = ", ".join(f"{k}={v}" for k, v in res["config"]["platform_env"].items())
    L = [
        "# imagefn warm-path benchmark (issue 12)",
        "",
        f"- Machine: {m['nproc']} CPUs ({m['cpu_model']}), {m.get('memory_gib', '?')} GiB,"
        f" kernel {m['kernel']}, Docker {m['docker']}, Python {m['python']}",
        f"- Load average: {' '.join(m.get('loadavg_at_start', []))} at start,"
        f" {' '.join(m.get('loadavg_at_end', []))} at end",
        f"- Code: current = {res['codes'].get('current', '?')}"
        + (f"; baseline = {res['codes']['baseline']}" if "baseline" in res["codes"] else ""),
        f"- Command: `{res['command']}`",
        f"- Function: bench/images/noop ({res['config']['server']} server), web function"
        f" max_instances 1, instance_concurrency {res['config']['instance_concurrency']},"
        f" auth {res['config']['web_auth']}; event function max_instances"
        f" {res['config']['instances']}. wrk {res['config']['wrk_threads']} thread(s),"
        f" {res['config']['seconds']:g} s per row in two halves (forward, then reverse order)"
        f" after a {res['config']['warmup_s']:g} s warm-up. Platform settings:"
        f" {settings or 'defaults'}.",
        "",
        "## Saturation",
        "",
        "| row | conns | ok/s | halves ok/s | p50 ms | p99 ms | errors | platform CPU ms/inv |"
        " platform cores | idle platforms cores | wrk cores | nginx cores | docker-proxy cores |"
        " machine busy cores |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, r in res.get("rows", {}).items():
        errs = str(r["non_2xx"] + sum(r["socket_errors"].values()))
        # The two halves' rates side by side: how much the machine moved during the row.
        halves = " / ".join(f"{h['ok'] / h['duration_s']:,.0f}" for h in r["halves"])
        if r["statuses"]:
            errs += " (" + ", ".join(f"{n}x {c}" for c, n in r["statuses"].items()) + ")"
        L.append(
            f"| {key} | {r['connections']} | {r['rps']:,.0f} | {halves} |"
            f" {r['latency_p50_ms']:.2f} | {r['latency_p99_ms']:.2f} | {errs} |"
            f" {_f(r.get('platform_cpu_ms_per_invocation'))} |"
            f" {_f(r.get('platform_cores'))} | {r['idle_platforms_cores']:.2f} |"
            f" {r['client_cores']:.2f} | {r['nginx_cores']:.2f} |"
            f" {r['services_cores'].get('docker-proxy', 0):.2f} | {r['machine_busy_cores']:.2f} |"
        )
    if res.get("ratios"):
        L += ["", "## Ratios", ""]
        L += [f"- {k}: **x{v:.3f}**" for k, v in res["ratios"].items()]
    if res.get("serial"):
        L += [
            "",
            "## Serial warm overhead (one request at a time, gateway and direct interleaved)",
            "",
            "| platform | kind | pairs | direct p50 / p99 ms | gateway p50 / p99 ms |"
            " overhead p50 / p99 ms | paired diff p50 / p99 ms | platform CPU ms/inv | errors |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for s in res["serial"]:
            d, g, p = s["direct_ms"], s["gateway_ms"], s["paired_diff_ms"]
            L.append(
                f"| {s['platform']} | {s['kind']} | {s['pairs']} | {d['p50']:.3f} / {d['p99']:.3f}"
                f" | {g['p50']:.3f} / {g['p99']:.3f} | **+{s['overhead_p50_ms']:.3f}** /"
                f" +{s['overhead_p99_ms']:.3f} | {p['p50']:.3f} / {p['p99']:.3f} |"
                f" {_f(s['platform_cpu_ms_per_invocation'])} | {sum(s['errors'].values())} |"
            )
        L += ["", "Gateway `Server-Timing` phases, p50 ms over the calls that had them:", ""]
        for s in res["serial"]:
            st = ", ".join(
                f"{k} {v:.2f} ({s['server_timing_calls'][k]} calls)"
                for k, v in s["server_timing_p50_ms"].items()
            )
            L.append(f"- {s['platform']}, {s['kind']}: {st or 'none'}")
    if res.get("targets"):
        L += ["", "## Issue 12's targets", "", "| target | figure | verdict |", "|---|---|---|"]
        L += [f"| {t['target']} | {t['figure']} | {t['verdict']} |" for t in res["targets"]]
    if res.get("logs"):
        L += ["", "Platform logs: " + ", ".join(res["logs"])]
    return "\n".join(L)


def targets(res: dict[str, Any], platforms: list[BenchPlatform]) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    rows = res.get("rows", {})
    nginx = rows.get("web nginx")

    def add(target: str, figure: str, ok: bool) -> None:
        out.append({"target": target, "figure": figure, "verdict": "met" if ok else "**missed**"})

    for p in platforms:
        if p.code.label != "current":
            continue
        web = rows.get(f"web gateway {p.key}")
        if web and nginx and nginx["rps"]:
            ratio = web["rps"] / nginx["rps"]
            add(
                f"web saturation gateway ({p.key}) / nginx ≥ x{TARGET_GW_OVER_NGINX}"
                f" (stretch x{STRETCH_GW_OVER_NGINX})"
                + (" [Kafka: stated, no target]" if p.backend == "kafka" else ""),
                f"x{ratio:.3f}",
                ratio >= TARGET_GW_OVER_NGINX,
            )
        ev = rows.get(f"event gateway {p.key}")
        base = rows.get(f"event gateway baseline {p.backend} {p.mode}")
        if ev and base and base["rps"]:
            ratio = ev["rps"] / base["rps"]
            add(
                f"event saturation ({p.key}) / baseline ≥ x{TARGET_EVENT_OVER_BASELINE}",
                f"x{ratio:.2f} ({ev['rps']:,.0f} vs {base['rps']:,.0f}/s)",
                ratio >= TARGET_EVENT_OVER_BASELINE,
            )
        for r in (web, ev):
            if r and r.get("platform_cpu_ms_per_invocation") is not None:
                cpu = r["platform_cpu_ms_per_invocation"]
                add(
                    f"platform CPU per warm invocation ≤ {TARGET_CPU_MS} ms"
                    f" ({r['kind']} saturation, {p.key})",
                    f"{cpu:.2f} ms",
                    cpu <= TARGET_CPU_MS,
                )
        for s in res.get("serial", []):
            if s["platform"] == p.key:
                add(
                    f"serial overhead ({s['kind']}, {p.key}) p50 ≤ {TARGET_SERIAL_P50_MS} ms,"
                    f" p99 ≤ {TARGET_SERIAL_P99_MS} ms",
                    f"+{s['overhead_p50_ms']:.2f} / +{s['overhead_p99_ms']:.2f} ms",
                    s["overhead_p50_ms"] <= TARGET_SERIAL_P50_MS
                    and s["overhead_p99_ms"] <= TARGET_SERIAL_P99_MS,
                )
    return out


# -- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a smoke run, about 90 s")
    p.add_argument("--json", metavar="FILE", help="write every figure to FILE")
    p.add_argument("--modes", default="up", help="up, split or up,split (platform processes)")
    p.add_argument("--backends", default="redis,kafka", help="queue backends of the current code")
    p.add_argument(
        "--split-coldstart", action="store_true", help="split mode: also run `imagefn coldstart`"
    )
    p.add_argument(
        "--baseline", metavar="REV", help="also measure commit REV (git archive, this venv)"
    )
    p.add_argument("--baseline-src", metavar="DIR", help="also measure the source tree DIR")
    p.add_argument(
        "--baseline-venv",
        metavar="VENV",
        help="the venv that runs the baseline (default: this one)",
    )
    p.add_argument("--baseline-backends", default="redis", help="queue backends of the baseline")
    p.add_argument("--seconds", type=float, help="measured seconds per load row (10; quick 4)")
    p.add_argument("--warmup", type=float, help="warm-up seconds per load row (2; quick 1)")
    p.add_argument(
        "--serial", type=int, help="serial pairs per function and platform (400; quick 100)"
    )
    p.add_argument("--connections", type=int, default=16, help="wrk connections, web rows")
    # 16, not more: a worker lets at most 16 calls of one function wait for a slot
    # (IMAGEFN_MAX_WAITING_PER_FUNCTION) and answers more at once with 429; with 32
    # connections and 4 instances some calls are refused instead of measured.
    p.add_argument("--event-connections", type=int, default=16, help="wrk connections, event rows")
    p.add_argument("--wrk-threads", type=int, default=1)
    p.add_argument("--instances", type=int, default=4, help="max_instances of the event function")
    p.add_argument("--instance-concurrency", type=int, default=16)
    p.add_argument("--web-auth", choices=("public", "key"), default="public")
    p.add_argument("--server", choices=("asyncio", "threading"), default="asyncio",
                   help="the noop image's server (NOOP_SERVER)")  # fmt: skip
    p.add_argument(
        "--env", action="append", default=[], metavar="KEY=VALUE",
        help="a setting for every platform (repeatable; wins over the defaults here)",
    )  # fmt: skip
    p.add_argument("--platform-log-level", default="info")
    p.add_argument("--redis-url", default=local_redis_url(0))
    p.add_argument(
        "--code",
        metavar="TEXT",
        help="describe the current code in the report (e.g. when run from a git archive export)",
    )
    p.add_argument("--no-install", action="store_true", help="do not apt-get install wrk/nginx")
    a = p.parse_args(argv)
    a.seconds = a.seconds or (4.0 if a.quick else 10.0)
    a.warmup = a.warmup or (1.0 if a.quick else 2.0)
    a.serial = a.serial or (100 if a.quick else 400)
    a.mode_list = [m.strip() for m in a.modes.split(",") if m.strip()]
    a.backend_list = [b.strip() for b in a.backends.split(",") if b.strip()]
    a.baseline_backend_list = [b.strip() for b in a.baseline_backends.split(",") if b.strip()]
    for m in a.mode_list:
        if m not in ("up", "split"):
            p.error(f"--modes: {m!r} is neither up nor split")
    for b in {*a.backend_list, *a.baseline_backend_list}:
        if b not in ("redis", "kafka"):
            p.error(f"backend {b!r} is neither redis nor kafka")
    if a.baseline and a.baseline_src:
        p.error("--baseline and --baseline-src exclude each other")
    return a


def make_codes(a: argparse.Namespace, workdir: Path, current: str) -> list[Code]:
    """This tree, and the baseline when asked for (exported into ``workdir``)."""
    codes = [Code("current", REPO, Path(sys.executable).parent.parent, current)]
    venv = Path(a.baseline_venv) if a.baseline_venv else codes[0].venv
    if a.baseline:
        src = workdir / "baseline-src"
        short = export_commit(a.baseline, src)
        codes.append(Code("baseline", src, venv, f"commit {short} (git archive, venv {venv})"))
    elif a.baseline_src:
        src = Path(a.baseline_src).resolve()
        codes.append(Code("baseline", src, venv, f"{describe_tree(src)} (venv {venv})"))
    return codes


def tidy(workdir: Path) -> None:
    """Keep the platforms' logs and nginx's directory; drop the baseline export and the
    wrk scripts (they hold API keys)."""
    for path in workdir.iterdir():
        with contextlib.suppress(OSError):
            if path.suffix == ".lua":
                path.unlink()
            elif path.name == "baseline-src":
                shutil.rmtree(path)


def platform_env(a: argparse.Namespace) -> dict[str, str]:
    env = {
        # The per-key token bucket (1,000/s by default) would cap the event rows, which
        # all use the run's one admin key, below what the targets ask for. Its Redis
        # call stays on the path; only its limit is out of reach.
        "IMAGEFN_RATE_PER_KEY": "1000000",
        "IMAGEFN_BURST_PER_KEY": "1000000",
    }
    for kv in a.env:
        k, _, v = kv.partition("=")
        env[k.strip()] = v
    return env


async def amain(a: argparse.Namespace) -> int:
    ensure_tools(not a.no_install)
    machine = machine_info()
    if a.code:
        machine["code"] = a.code
    workdir = Path(tempfile.mkdtemp(prefix="imagefn-warmpath-"))
    env = platform_env(a)
    codes = make_codes(a, workdir, machine["code"])
    platforms: list[BenchPlatform] = []
    for code in codes:
        backends = a.backend_list if code.label == "current" else a.baseline_backend_list
        for mode in a.mode_list:
            for backend in backends:
                platforms.append(
                    BenchPlatform(
                        code, mode, backend, a.redis_url, a.platform_log_level, workdir, env,
                        a.split_coldstart,
                    )
                )  # fmt: skip
    res: dict[str, Any] = {
        "machine": machine,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "codes": {c.label: c.describe for c in codes},
        "config": {
            "server": a.server,
            "instance_concurrency": a.instance_concurrency,
            "instances": a.instances,
            "web_auth": a.web_auth,
            "wrk_threads": a.wrk_threads,
            "seconds": a.seconds,
            "warmup_s": a.warmup,
            "serial_pairs": a.serial,
            "modes": a.mode_list,
            "platform_env": env,
            "quick": a.quick,
        },
        "platforms": {},
    }
    print(
        f"warm_path: {machine['nproc']} CPUs, load {' '.join(machine.get('loadavg_at_start', []))};"
        f" platforms: {', '.join(p.key for p in platforms)}",
        file=sys.stderr,
        flush=True,
    )
    docker = aiodocker.Docker()
    reg = BenchRegistry(platforms[0].port)
    nginx: Nginx | None = None
    ctls: dict[str, Control] = {}
    started: list[BenchPlatform] = []
    rc = 0
    # Setup and clean-up, plus per platform: its start, serial pairs and two load rows.
    budget_s = (60 if a.quick else 120) + len(platforms) * (30 if a.quick else 75)
    try:
        async with asyncio.timeout(budget_s):
            log(f"building {NOOP_IMAGE} from {NOOP_DIR}")
            await build_image(NOOP_IMAGE)
            for p in platforms:
                await p.guard_other_installations(docker)
            reg.start()
            # The first platform's gateway is the registry's token service (the realm);
            # every platform shares the registry settings, so any of them may deploy
            # and pull.
            log(f"registry {reg.address}; starting {platforms[0].key} on {platforms[0].url}")
            started.append(platforms[0])
            await platforms[0].start(reg.env())
            repository = f"bench-{platforms[0].tag}/noop"
            await reg.push(docker, NOOP_IMAGE, repository, "latest")
            fn_image = f"{repository}:latest"
            rest = platforms[1:]
            started += rest
            log(f"starting {', '.join(p.key for p in rest) or 'no other platform'}")
            await asyncio.gather(*(p.start(reg.env()) for p in rest))
            ctls.update({p.key: Control(p) for p in platforms})
            # Deployed and cold-started at once: set-up time, not measured.
            deployed = await asyncio.gather(
                *(deploy(p, ctls[p.key], docker, fn_image, a) for p in platforms)
            )
            fns: dict[str, Functions] = {p.key: f for p, f in zip(platforms, deployed, strict=True)}
            for p in platforms:
                res["platforms"][p.key] = {
                    "code": p.code.describe, "mode": p.mode, "backend": p.backend,
                    "processes": p.subcommands, "prefix": p.prefix, "port": p.port,
                    "logs": p.logs,
                }  # fmt: skip
                log(f"{p.key}: deployed, instances on ports {fns[p.key]}")
            for p in platforms:
                p.check_alive()
            primary = platforms[0]
            nginx = Nginx(workdir, fns[primary.key].web_port)
            await nginx.start()
            log(
                f"nginx on {nginx.url} -> 127.0.0.1:{nginx.upstream_port}"
                f" ({primary.key}'s instance)"
            )
            groups = {p.key: p.pids for p in platforms}
            groups["nginx"] = [nginx.pid]

            # 3. Serial overhead first, while every event function has its one instance.
            res["serial"] = []
            for p in platforms:
                f = fns[p.key]
                ev_gw, ev_direct = (
                    f"{p.url}/v1/functions/{f.event}/invoke",
                    f"http://127.0.0.1:{f.event_port}/event-invoke",
                )
                web_gw, web_direct = f"{p.url}/web/{f.web}/", f"http://127.0.0.1:{f.web_port}/"
                log(f"serial: {p.key}, {a.serial} pairs per function")
                res["serial"].append(
                    await serial(
                        p, "event",
                        bind(post_gateway, ev_gw), bind(post_direct, ev_direct),
                        p.auth_headers, a.serial, max(20, a.serial // 10), groups,
                    )
                )  # fmt: skip
                res["serial"].append(
                    await serial(
                        p, "web",
                        bind(get_sample, web_gw), bind(get_sample, web_direct),
                        p.auth_headers if a.web_auth == "key" else None,
                        a.serial, max(20, a.serial // 10), groups,
                    )
                )  # fmt: skip
                last = res["serial"][-2:]
                log(
                    "  overhead p50 "
                    + ", ".join(f"{s['kind']} +{s['overhead_p50_ms']:.2f} ms" for s in last)
                )

            # 1. Web saturation on one warm instance; 2. event saturation.
            web_rows = [
                Row("web direct", "web", f"straight to {primary.key}'s instance",
                    f"http://127.0.0.1:{fns[primary.key].web_port}/", a.connections),
                Row("web nginx", "web", "nginx -> the same instance", nginx.url, a.connections),
            ]  # fmt: skip
            event_rows: list[Row] = []
            for p in platforms:
                f = fns[p.key]
                web_script = write_lua(
                    workdir / f"{p.prefix}-web.lua", "GET", "",
                    p.auth_headers if a.web_auth == "key" else {},
                )  # fmt: skip
                web_rows.append(
                    Row(f"web gateway {p.key}", "web", f"{p.key}: GET /web/NAME/",
                        f"{p.url}/web/{f.web}/", a.connections, web_script, p)
                )  # fmt: skip
                script = write_lua(
                    workdir / f"{p.prefix}-event.lua", "POST", EVENT_BODY,
                    {"Content-Type": "application/json", **p.auth_headers},
                )  # fmt: skip
                event_rows.append(
                    Row(f"event gateway {p.key}", "event",
                        f"{p.key}: POST /v1/functions/NAME/invoke, max_instances {a.instances}",
                        f"{p.url}/v1/functions/{f.event}/invoke", a.event_connections, script, p)
                )  # fmt: skip
            log(f"web saturation: {len(web_rows)} rows, {a.seconds:g} s each")
            await run_rows(web_rows, groups, a.seconds, a.warmup, a.wrk_threads)
            log(f"event saturation: {len(event_rows)} rows, {a.seconds:g} s each")
            await run_rows(event_rows, groups, a.seconds, a.warmup, a.wrk_threads)
            for p in platforms:
                insts = await instance_ports(docker, p.worker_id, fns[p.key].event)
                res["platforms"][p.key]["event_instances_after"] = len(insts)
                p.check_alive()
            res["rows"] = {r.key: combine(r, platforms) for r in [*web_rows, *event_rows]}
            rows = res["rows"]
            ratios: dict[str, float] = {}
            if rows["web direct"]["rps"]:
                ratios["web nginx / direct"] = rows["web nginx"]["rps"] / rows["web direct"]["rps"]
            for p in platforms:
                gw = rows[f"web gateway {p.key}"]["rps"]
                if rows["web nginx"]["rps"]:
                    ratios[f"web gateway {p.key} / nginx"] = gw / rows["web nginx"]["rps"]
                if rows["web direct"]["rps"]:
                    ratios[f"web gateway {p.key} / direct"] = gw / rows["web direct"]["rps"]
                base = rows.get(f"event gateway baseline {p.backend} {p.mode}")
                if p.code.label == "current" and base and base["rps"]:
                    ratios[f"event {p.key} / baseline"] = (
                        rows[f"event gateway {p.key}"]["rps"] / base["rps"]
                    )
            res["ratios"] = ratios
    except TimeoutError:
        log(f"time budget of {budget_s} s exceeded; reporting what was measured")
        rc = 2
    except Exception:
        log("benchmark failed:\n" + traceback.format_exc())
        rc = 1
    finally:
        if nginx is not None:
            await nginx.stop()
        for ctl in ctls.values():
            await ctl.close()
        await asyncio.gather(*(p.stop() for p in started))
        with contextlib.suppress(aiodocker.exceptions.DockerError):
            for p in started:
                for c in await docker.containers.list(
                    all=True, filters=json.dumps({"label": [f"{WORKER_LABEL}={p.worker_id}"]})
                ):
                    with contextlib.suppress(aiodocker.exceptions.DockerError):
                        await c.delete(force=True)
        await cleanup_kafka([p.prefix for p in started])
        await reg.remove_images(docker)
        reg.cleanup()
        await docker.close()
        with contextlib.suppress(Exception):
            r = aioredis.Redis.from_url(a.redis_url)
            for p in started:
                keys = [k async for k in r.scan_iter(match=f"{p.prefix}:*", count=1000)]
                for i in range(0, len(keys), 1000):
                    await r.delete(*keys[i : i + 1000])
            await r.aclose()
        tidy(workdir)
    with contextlib.suppress(OSError):
        machine["loadavg_at_end"] = Path("/proc/loadavg").read_text().split()[:3]  # noqa: ASYNC240
    res["targets"] = targets(res, platforms)
    res["logs"] = [str(workdir)]
    print(render(res), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1, default=str))  # noqa: ASYNC240
        log(f"figures saved to {a.json}")
    return rc


async def cleanup_kafka(prefixes: list[str]) -> None:
    """Delete the topics of our platforms (``{prefix}.…``: logs, the Kafka queue's)."""
    with contextlib.suppress(Exception):
        from aiokafka.admin import AIOKafkaAdminClient

        admin = AIOKafkaAdminClient(bootstrap_servers=KAFKA_BOOTSTRAP, client_id="bench-warm-path")
        await admin.start()
        try:
            mine = [
                t for t in await admin.list_topics() if any(t.startswith(f"{p}.") for p in prefixes)
            ]
            if mine:
                await admin.delete_topics(mine)
        finally:
            await admin.close()


def main() -> int:
    try:
        return asyncio.run(amain(parse_args()))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
