"""Celery peer for the batch benchmark (issue 9): N items, each one HTTP POST of a small
event to a no-op function container, through Celery with a Redis broker and result backend.

    .venv/bin/python bench/peers/celery_peer.py [--items 5000] [--json OUT] [--sweep]
        [--workers 2] [--pool solo] [--concurrency 1] [--prefetch 16]

Reports items/s accepted at submission (the apply_async loop) and items/s completed
(submission start -> last result). Workers are `celery worker` subprocesses (two single-process
ones by default), stopped at the end; the container is removed at the end; Redis DB 5
(CELERY_PEER_REDIS) is flushed before and after, nothing else. This module is also the Celery
app the workers load (-A celery_peer).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import uuid

import requests
from celery import Celery
from celery.result import AsyncResult, ResultSet
from common import (
    EVENT,
    RunResult,
    clean_up,
    flush_redis_db,
    hard_deadline,
    host_idle,
    local_redis_url,
    make_parser,
    noop_container,
    report,
    start_worker,
    tail,
)

REDIS_URL = os.environ.get("CELERY_PEER_REDIS") or local_redis_url(5)
HERE = os.path.dirname(os.path.abspath(__file__))

app = Celery("celery_peer", broker=REDIS_URL, backend=REDIS_URL)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    # Results only need to outlive the run; the DB is flushed at the end anyway.
    result_expires=3600,
    broker_connection_retry_on_startup=True,
    # Fail fast instead of retrying forever when Redis is not there.
    broker_connection_max_retries=3,
    worker_hijack_root_logger=False,
)

# One keep-alive session per worker process. Prefork children are forked from the parent
# after import, so the session is made lazily and keyed by pid: a session (and its pooled
# sockets) created in the parent must not be shared across processes.
_session: requests.Session | None = None
_session_pid = 0


def _http() -> requests.Session:
    global _session, _session_pid
    if _session is None or _session_pid != os.getpid():
        _session = requests.Session()
        _session_pid = os.getpid()
    return _session


# An explicit name: run as a script this module is __main__, in the worker it is celery_peer.
@app.task(name="peer.invoke")
def invoke(port: int, i: int) -> int:
    resp = _http().post(f"http://127.0.0.1:{port}/event-invoke", json={**EVENT, "i": i}, timeout=10)
    return resp.status_code


# Worker configurations --sweep tries: (worker processes, pool, concurrency, prefetch
# multiplier). Prefork with a few processes per core is Celery's usual choice for blocking
# I/O; solo runs the task in the consuming process itself (no pipe to a pool child), one
# such worker per core; threads show whether the GIL or the process hop costs more; the
# prefetch multiplier sets how many messages a worker reserves per fetch.
SWEEP: list[tuple[int, str, int, int]] = [
    (1, "prefork", 2, 4),
    (1, "prefork", 4, 4),
    (1, "prefork", 4, 16),
    (1, "prefork", 8, 4),
    (1, "threads", 8, 4),
    (2, "solo", 1, 16),
    (2, "prefork", 2, 16),
]


def _wait_ready(procs: list[subprocess.Popen[bytes]], logs: list[str], limit_s: float) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        for proc, log in zip(procs, logs, strict=True):
            if proc.poll() is not None:
                raise RuntimeError(f"celery worker exited:\n{tail(log)}")
        # A worker that answers a ping consumes from the broker and its pool is up.
        if len(app.control.ping(timeout=0.5)) >= len(procs):
            return
    raise TimeoutError(f"celery workers not ready in {limit_s} s:\n{tail(logs[0])}")


def run_once(
    port: int,
    items: int,
    workers: int,
    pool: str,
    concurrency: int,
    prefetch: int,
    timeout: float,
) -> RunResult:
    config = f"{workers} x worker -P {pool} -c {concurrency} --prefetch-multiplier {prefetch}"
    flush_redis_db(REDIS_URL)
    procs: list[subprocess.Popen[bytes]] = []
    logs: list[str] = []
    try:
        for _ in range(workers):
            log = os.path.join(tempfile.gettempdir(), f"celery-peer-{uuid.uuid4().hex[:8]}.log")
            logs.append(log)
            cmd = [
                sys.executable, "-m", "celery", "-A", "celery_peer", "worker",
                "-P", pool, "-c", str(concurrency), "--prefetch-multiplier", str(prefetch),
                # No cluster chatter: nothing to gossip or sync with between peers.
                "--without-gossip", "--without-mingle", "--without-heartbeat",
                "-l", "WARNING", "-n", f"peer-{uuid.uuid4().hex[:6]}@%h",
            ]  # fmt: skip
            procs.append(start_worker(cmd, HERE, {"CELERY_PEER_REDIS": REDIS_URL}, log))
        _wait_ready(procs, logs, 60.0)
        idle = host_idle()
        t0 = time.perf_counter()
        deadline = time.monotonic() + timeout
        results: list[AsyncResult] = []
        for i in range(items):
            results.append(invoke.apply_async((port, i)))
            if i % 500 == 0 and time.monotonic() > deadline:
                raise TimeoutError("submission did not finish in time")
        t_sub = time.perf_counter()
        # join_native waits on the Redis backend's pub/sub channels, not by polling each
        # result, so the wait itself costs Celery's normal path and nothing more.
        values = ResultSet(results).join_native(
            timeout=max(1.0, deadline - time.monotonic()), propagate=False
        )
        t_done = time.perf_counter()
        errors = sum(1 for v in values if v != 200)
        return RunResult.timed("celery", items, config, (t0, t_sub, t_done), errors, idle)
    finally:
        clean_up(procs, logs, REDIS_URL)


def main() -> None:
    p = make_parser("celery")
    # Defaults: the fastest configuration --sweep found on a 2-core machine (README.md).
    p.add_argument("--workers", type=int, default=2, help="celery worker processes")
    p.add_argument("--pool", default="solo", choices=["prefork", "threads", "solo"])
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--prefetch", type=int, default=16, help="worker prefetch multiplier")
    args = p.parse_args()
    configs = SWEEP if args.sweep else [(args.workers, args.pool, args.concurrency, args.prefetch)]
    # Every run's own timeout, plus worker start-up and clean-up per run.
    with hard_deadline(len(configs) * (args.timeout + 90) + 60):
        with noop_container(args.image) as port:
            results = [
                run_once(port, args.items, w, pool, conc, pf, args.timeout)
                for w, pool, conc, pf in configs
            ]
    report(results, args.json)


if __name__ == "__main__":
    main()
