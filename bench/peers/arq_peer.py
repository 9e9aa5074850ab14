"""arq peer for the batch benchmark (issue 9): N items, each one HTTP POST of a small event
to a no-op function container, through arq (asyncio job queue on Redis).

arq pins redis-py < 6, which the project's venv (redis-py 8 through kombu / celery) cannot
have, so this runs from a venv of its own (bench/peers/README.md):

    ~/.cache/imagefn/bench-arq-venv/bin/python bench/peers/arq_peer.py [--items 5000]
        [--json OUT] [--sweep] [--workers 1] [--max-jobs 10] [--poll-delay 0.05]

Reports items/s accepted at submission (the enqueue_job loop) and items/s completed
(submission start -> last result). Workers are `python -m arq arq_peer.WorkerSettings`
subprocesses, stopped at the end; the container is removed at the end; Redis DB 6
(ARQ_PEER_REDIS) is flushed before and after, nothing else.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
import uuid
from typing import Any

import aiohttp
from arq import create_pool
from arq.connections import ArqRedis, RedisSettings
from arq.constants import default_queue_name, health_check_key_suffix, result_key_prefix
from arq.jobs import deserialize_result
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

REDIS_URL = os.environ.get("ARQ_PEER_REDIS") or local_redis_url(6)
HERE = os.path.dirname(os.path.abspath(__file__))


async def invoke(ctx: dict[str, Any], port: int, i: int) -> int:
    http: aiohttp.ClientSession = ctx["http"]
    async with http.post(f"http://127.0.0.1:{port}/event-invoke", json={**EVENT, "i": i}) as resp:
        await resp.read()
        return resp.status


async def _startup(ctx: dict[str, Any]) -> None:
    # One keep-alive session per worker process, with as many pooled connections as the
    # worker runs jobs at once, so no job waits for a socket and none is reopened.
    max_jobs = int(os.environ.get("ARQ_PEER_MAX_JOBS", "10"))
    ctx["http"] = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=max_jobs),
        timeout=aiohttp.ClientTimeout(total=10),
    )


async def _shutdown(ctx: dict[str, Any]) -> None:
    await ctx["http"].close()


class WorkerSettings:
    """Read by `arq arq_peer.WorkerSettings`; the driver passes its tuning through the env."""

    functions = [invoke]
    on_startup = _startup
    on_shutdown = _shutdown
    redis_settings = RedisSettings.from_dsn(REDIS_URL)
    max_jobs = int(os.environ.get("ARQ_PEER_MAX_JOBS", "10"))
    # arq sleeps poll_delay (0.5 s by default) between reads of the queue; with short jobs
    # that idles the worker, so the sweep tries shorter delays.
    poll_delay = float(os.environ.get("ARQ_PEER_POLL_DELAY", "0.05"))
    # The driver reads results from Redis; keep them for the length of a run.
    keep_result = 3600
    # No retry hides an error: a failed item counts as an error.
    max_tries = 1


# Worker configurations --sweep tries: (worker processes, max_jobs, poll_delay).
# arq's default is max_jobs=10, poll_delay=0.5; one asyncio process uses one core, so two
# processes are tried too.
SWEEP: list[tuple[int, int, float]] = [
    (1, 10, 0.5),
    (1, 10, 0.05),
    (1, 10, 0.01),
    (1, 4, 0.05),
    (1, 32, 0.05),
    (1, 100, 0.05),
    (2, 16, 0.05),
    (2, 32, 0.05),
]


async def _wait_ready(pool: ArqRedis, procs: list[Any], logs: list[str], limit_s: float) -> None:
    # A worker writes its health-check key on its first poll of the queue, i.e. once
    # on_startup has run and it takes jobs. With several workers, each rewrites the same key,
    # so give the others a moment after the first one is there.
    key = default_queue_name + health_check_key_suffix
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        for proc, log in zip(procs, logs, strict=True):
            if proc.poll() is not None:
                raise RuntimeError(f"arq worker exited:\n{tail(log)}")
        if await pool.exists(key):
            await asyncio.sleep(0.5 if len(procs) > 1 else 0)
            return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"arq worker not ready in {limit_s} s:\n{tail(logs[0])}")


async def _wait_results(pool: ArqRedis, job_ids: list[str], deadline: float) -> tuple[int, float]:
    """Wait until every job has a result; return (errors, time the last one was seen).

    arq has no push for results (Job.result() polls each job on its own), so this polls in
    bulk: one MGET of the oldest pending result keys every 5 ms. Jobs finish roughly in
    queue order, so a window of the oldest ones is enough and keeps each MGET small.
    """
    pending = list(job_ids)
    errors = 0
    window = 500
    while pending:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(pending)} results still missing at the deadline")
        head = pending[:window]
        raw = await pool.mget([result_key_prefix + j for j in head])
        done = 0
        still: list[str] = []
        for job_id, data in zip(head, raw, strict=True):
            if data is None:
                still.append(job_id)
                continue
            done += 1
            res = deserialize_result(data)
            if not res.success or res.result != 200:
                errors += 1
        pending = still + pending[window:]
        if not done:
            await asyncio.sleep(0.005)
    return errors, time.perf_counter()


async def _drive(
    port: int, items: int, limit_s: float, procs: list[Any], logs: list[str]
) -> tuple[float, float, float, int, float]:
    pool = await create_pool(RedisSettings.from_dsn(REDIS_URL))
    try:
        await _wait_ready(pool, procs, logs, 60.0)
        idle = await asyncio.to_thread(host_idle)
        deadline = time.monotonic() + limit_s
        t0 = time.perf_counter()
        job_ids: list[str] = []
        for i in range(items):
            # One at a time, awaited, as a client that submits a batch in a loop would do
            # (the Celery peer's apply_async loop is the same).
            job = await pool.enqueue_job("invoke", port, i)
            if job is None:
                raise RuntimeError("enqueue_job returned None (duplicate job id)")
            job_ids.append(job.job_id)
            if i % 500 == 0 and time.monotonic() > deadline:
                raise TimeoutError("submission did not finish in time")
        t_sub = time.perf_counter()
        errors, t_done = await _wait_results(pool, job_ids, deadline)
        return t0, t_sub, t_done, errors, idle
    finally:
        await pool.aclose()


def run_once(
    port: int, items: int, workers: int, max_jobs: int, poll_delay: float, timeout: float
) -> RunResult:
    config = f"{workers} worker(s) max_jobs={max_jobs} poll_delay={poll_delay}"
    flush_redis_db(REDIS_URL)
    env = {
        "ARQ_PEER_REDIS": REDIS_URL,
        "ARQ_PEER_MAX_JOBS": str(max_jobs),
        "ARQ_PEER_POLL_DELAY": str(poll_delay),
    }
    procs = []
    logs = []
    try:
        for _ in range(workers):
            log = os.path.join(tempfile.gettempdir(), f"arq-peer-{uuid.uuid4().hex[:8]}.log")
            logs.append(log)
            cmd = [sys.executable, "-m", "arq", "arq_peer.WorkerSettings"]
            procs.append(start_worker(cmd, HERE, env, log))
        t0, t_sub, t_done, errors, idle = asyncio.run(
            asyncio.wait_for(_drive(port, items, timeout, procs, logs), timeout + 90)
        )
        return RunResult.timed("arq", items, config, (t0, t_sub, t_done), errors, idle)
    finally:
        clean_up(procs, logs, REDIS_URL)


def main() -> None:
    p = make_parser("arq")
    p.add_argument("--workers", type=int, default=1, help="arq worker processes")
    p.add_argument("--max-jobs", type=int, default=10)
    p.add_argument("--poll-delay", type=float, default=0.05)
    args = p.parse_args()
    configs = SWEEP if args.sweep else [(args.workers, args.max_jobs, args.poll_delay)]
    with hard_deadline(len(configs) * (args.timeout + 120) + 60):
        with noop_container(args.image) as port:
            results = [
                run_once(port, args.items, w, jobs, delay, args.timeout)
                for w, jobs, delay in configs
            ]
    report(results, args.json)


if __name__ == "__main__":
    main()
