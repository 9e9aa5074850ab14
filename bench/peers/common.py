"""What the peer benchmarks (celery_peer.py, arq_peer.py) share: the no-op target container,
the command-line options, worker process handling and the result record.

Standard library only (plus redis-py, imported lazily): arq and Celery cannot live in one
environment (arq pins redis-py < 6, kombu 5.7 needs >= 6.4), so this module is imported from
two different venvs.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

DEFAULT_IMAGE = "imagefn-examples/hello-event:latest"
# A label on every container we start, so a run killed before its `finally` leaves
# something a person can find (`docker ps -a --filter label=imagefn-bench-peer`).
CONTAINER_LABEL = "imagefn-bench-peer"
# One item's event: small, like the events of the platform's own benchmarks.
EVENT: dict[str, Any] = {"name": "bench"}


@dataclass
class RunResult:
    system: str
    items: int
    submit_items_per_s: float
    complete_items_per_s: float
    errors: int
    config: str
    submit_s: float
    complete_s: float
    # Idle CPU share of the host just before the run (1.0 = nothing else running).
    host_idle_before: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def timed(
        cls,
        system: str,
        items: int,
        config: str,
        times: tuple[float, float, float],
        errors: int,
        idle: float,
    ) -> RunResult:
        """From the run's (start, submitted, done) perf_counter times."""
        t0, t_sub, t_done = times
        return cls(
            system=system,
            items=items,
            submit_items_per_s=items / (t_sub - t0),
            complete_items_per_s=items / (t_done - t0),
            errors=errors,
            config=config,
            submit_s=t_sub - t0,
            complete_s=t_done - t0,
            host_idle_before=idle,
        )


def make_parser(system: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=f"{system}: N no-op HTTP items through a Redis queue")
    p.add_argument("--items", type=int, default=5000, help="items to submit (default 5000)")
    p.add_argument("--json", metavar="OUT", help="write the (best) result to this JSON file")
    p.add_argument("--image", default=DEFAULT_IMAGE, help="the no-op function image")
    p.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        help="seconds one run may take, submission to last result (default 300)",
    )
    p.add_argument(
        "--sweep",
        action="store_true",
        help="run every worker configuration in the built-in list and report the fastest",
    )
    return p


def _docker(*args: str, timeout: float = 60.0) -> str:
    out = subprocess.run(
        ["docker", *args], check=True, capture_output=True, text=True, timeout=timeout
    )
    return out.stdout.strip()


def post_event(port: int, timeout: float = 2.0) -> int:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/event-invoke",
        data=json.dumps(EVENT).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        resp.read()
        return int(resp.status)


@contextmanager
def noop_container(image: str = DEFAULT_IMAGE, ready_timeout: float = 30.0) -> Iterator[int]:
    """Run the no-op function container, yield its host port once it answers, remove it.

    Published on 127.0.0.1 only, with a port Docker picks, so parallel runs never collide
    and no traffic leaves loopback.
    """
    cid = _docker("run", "-d", "--label", CONTAINER_LABEL, "-p", "127.0.0.1::9000", image)
    try:
        # `docker port` prints e.g. "127.0.0.1:49153"; take the part after the last colon.
        port = int(_docker("port", cid, "9000/tcp").splitlines()[0].rsplit(":", 1)[1])
        deadline = time.monotonic() + ready_timeout
        while True:
            try:
                if post_event(port, timeout=1.0) == 200:
                    break
            except (OSError, urllib.error.URLError):
                pass  # not listening yet: the server starts a few hundred ms after `run`
            if time.monotonic() > deadline:
                raise TimeoutError(f"container {cid[:12]} did not answer in {ready_timeout} s")
            time.sleep(0.05)
        yield port
    finally:
        try:
            _docker("rm", "-f", cid)
        except (subprocess.SubprocessError, OSError) as exc:
            print(f"warning: could not remove container {cid[:12]}: {exc}", file=sys.stderr)


def flush_redis_db(url: str) -> None:
    """Empty the benchmark's own Redis database (only that one: others share the server)."""
    import redis  # lazily: each venv brings its own redis-py

    db = urllib.parse.urlsplit(url).path.strip("/") or "0"
    if db == "0":
        # Never FLUSHDB the default database, which the platform and its tests use.
        raise ValueError(f"refusing to flush {url}: give a database number other than 0")
    r = redis.Redis.from_url(url)
    try:
        r.flushdb()
    finally:
        r.close()


def start_worker(
    cmd: list[str], cwd: str, env: dict[str, str], log_path: str
) -> subprocess.Popen[bytes]:
    """Start a worker in a session of its own, so stop_worker() can end it with its
    children (prefork pool processes) by its process-group id, and nothing else."""
    log = open(log_path, "wb")  # closed below: the child has its own descriptor
    try:
        return subprocess.Popen(
            cmd,
            cwd=cwd,
            env={**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    finally:
        log.close()  # the child has its own copy of the descriptor


def clean_up(procs: list[subprocess.Popen[bytes]], logs: list[str], redis_url: str) -> None:
    """After a run, whatever happened: workers stopped, the peer's Redis DB flushed,
    worker logs removed."""
    for proc in procs:
        stop_worker(proc)
    flush_redis_db(redis_url)
    for log in logs:
        try:
            os.unlink(log)
        except OSError:
            pass


def stop_worker(proc: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    pgid = proc.pid  # start_new_session=True: the worker leads its own process group
    try:
        os.killpg(pgid, signal.SIGTERM)
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(pgid, signal.SIGKILL)
        proc.wait(timeout=grace_s)
    except ProcessLookupError:
        pass
    # Pool children that outlived their parent are still in the group.
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@contextmanager
def hard_deadline(seconds: float) -> Iterator[None]:
    """Backstop against a hang anywhere (a broker call that never returns, a stuck join):
    SIGALRM raises TimeoutError in the main thread, so the callers' `finally` blocks still
    remove the container and stop the workers."""

    def _expired(_sig: int, _frame: object) -> None:
        raise TimeoutError(f"run exceeded its {seconds:.0f} s limit")

    old = signal.signal(signal.SIGALRM, _expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def host_idle(sample_s: float = 1.0) -> float:
    """Fraction of CPU time idle over sample_s (from /proc/stat). Printed with each run:
    on a shared 2-core machine another process's load halves these rates, and a reader
    must be able to tell such a run from a clean one."""

    def snap() -> tuple[int, int]:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
        return vals[3] + vals[4], sum(vals)  # idle + iowait, total

    i0, t0 = snap()
    time.sleep(sample_s)
    i1, t1 = snap()
    return (i1 - i0) / max(1, t1 - t0)


def tail(path: str, n: int = 20) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


def report(results: list[RunResult], out: str | None) -> RunResult:
    """Print every run, pick the fastest by completion rate, write it as JSON."""
    for r in results:
        print(
            f"{r.system:7s} {r.config:45s} items={r.items} errors={r.errors} "
            f"submit={r.submit_items_per_s:8.1f}/s complete={r.complete_items_per_s:7.1f}/s "
            f"(host idle before: {r.host_idle_before:.0%})"
        )
    best = max(results, key=lambda r: (r.errors == 0, r.complete_items_per_s))
    print(f"fastest {best.system} config: {best.config}")
    if out:
        doc = {
            "system": best.system,
            "items": best.items,
            "submit_items_per_s": round(best.submit_items_per_s, 1),
            "complete_items_per_s": round(best.complete_items_per_s, 1),
            "errors": best.errors,
            "config": best.config,
            "submit_s": round(best.submit_s, 3),
            "complete_s": round(best.complete_s, 3),
            "host_idle_before": round(best.host_idle_before, 3),
            **best.extra,
            "runs": [asdict(r) for r in results],
        }
        with open(out, "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
    return best


CREDENTIALS_FILE = "/var/lib/imagefn/credentials.env"


def local_redis_url(db: int = 0) -> str:
    """The machine's Redis (deploy/redis.sh: an ACL, no anonymous access) as its admin
    user, database ``db``: IMAGEFN_REDIS_URL_ADMIN from the environment or the credentials
    file; plain 127.0.0.1:6379 when neither has it (a Redis without an ACL)."""
    url = os.environ.get("IMAGEFN_REDIS_URL_ADMIN", "")
    if not url:
        try:
            with open(CREDENTIALS_FILE, encoding="utf-8") as f:
                for line in f:
                    if line.startswith("IMAGEFN_REDIS_URL_ADMIN="):
                        url = line.split("=", 1)[1].strip().strip("'\"")
        except OSError:
            pass
    if not url:
        return f"redis://127.0.0.1:6379/{db}"
    base, _, _ = url.rpartition("/") if url.count("/") > 2 else (url, "", "")
    return f"{base}/{db}"
