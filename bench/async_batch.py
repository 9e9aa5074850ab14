#!/usr/bin/env python3
"""Batch benchmark (issue 9): how fast a batch is accepted and completed, next to the
synchronous path's saturation throughput and to Celery and arq doing the same work.

In one run on one machine:

1. **Synchronous saturation**: ``--clients`` concurrent callers for ``--duration`` s
   against the no-op event function through the gateway (``bench/foundation.py``'s
   ``saturate``): invocations/s.
2. **Batch**: ``--items`` (100,000) items of NDJSON, generated and streamed to
   ``POST /v1/functions/NAME/batches`` (never held whole): items/s accepted (request sent
   → 202, every item durably stored); then ``GET /v1/batches/ID`` every 0.5 s until the
   batch is over: items/s completed (batch created → last item finished, from the
   batch's own timestamps), and every item accounted for (succeeded + failed == total).
3. **Peers**: ``bench/peers/celery_peer.py`` and ``bench/peers/arq_peer.py`` with
   ``--peer-items`` (5,000) items, each item one HTTP POST to a container of the same
   image (their own, started by them), both Redis-backed.

The platform is ``imagefn up`` (gateway, worker, cold-start manager, scheduler) with a
registry of this run, on its own Redis prefix (``bench/foundation.py``'s Platform and
BenchRegistry), with a bootstrap admin key of its own that every request to the gateway
carries (``Authorization: Bearer``; the peers never talk to the gateway). Targets (issue
9): submission >= 20,000 items/s; completion >= 1,000 items/s and >= the synchronous
saturation throughput of the same run.

Usage: ``.venv/bin/python bench/async_batch.py [--backend redis|kafka] [--json FILE]``
(after deploy/setup.sh; the peers need ``pip install -e '.[bench]'``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiodocker
import aiohttp
import redis.asyncio as aioredis

sys.path.insert(0, str(Path(__file__).resolve().parent))
from foundation import (  # the sibling script, found through sys.path
    WORKER_LABEL,
    BenchRegistry,
    Control,
    Platform,
    fn_spec,
    log,
    machine_info,
    post_gateway,
    saturate,
)
from peers.common import local_redis_url

REPO = Path(__file__).resolve().parent.parent
PEERS = REPO / "bench/peers"


async def ndjson(items: int, chunk_items: int = 2000) -> AsyncIterator[bytes]:
    """The batch body, made as it is sent: ``{"i": N}`` per line."""
    for start in range(0, items, chunk_items):
        end = min(items, start + chunk_items)
        yield "".join(f'{{"i":{i}}}\n' for i in range(start, end)).encode()


async def run_batch(
    session: aiohttp.ClientSession, url: str, name: str, items: int, concurrency: int
) -> dict[str, Any]:
    t0 = time.time()
    async with session.post(
        f"{url}/v1/functions/{name}/batches",
        params={"max_concurrency": str(concurrency)},
        data=ndjson(items),
        headers={"Content-Type": "application/x-ndjson"},
        timeout=aiohttp.ClientTimeout(total=600),
    ) as resp:
        answer = await resp.json()
        if resp.status != 202:
            raise RuntimeError(f"batch refused: HTTP {resp.status}: {answer}")
    accepted_s = time.time() - t0
    batch_id = answer["batch_id"]
    log(f"batch {batch_id}: {items} items accepted in {accepted_s:.2f} s")
    status: dict[str, Any] = {}
    deadline = time.monotonic() + 1800
    last_log = 0.0
    while time.monotonic() < deadline:
        async with session.get(f"{url}/v1/batches/{batch_id}") as resp:
            status = await resp.json()
        if status.get("state") != "running":
            break
        if time.monotonic() - last_log > 10:
            last_log = time.monotonic()
            done = status["succeeded"] + status["failed"]
            log(f"  {done}/{items} done, {status.get('items_per_s', 0):.0f} items/s")
        await asyncio.sleep(0.5)
    done = status.get("succeeded", 0) + status.get("failed", 0)
    elapsed = float(status.get("finished_at") or time.time()) - float(status["created_at"])
    return {
        "items": items,
        "max_concurrency": concurrency,
        "accepted_s": accepted_s,
        "submit_items_per_s": items / accepted_s,
        "state": status.get("state"),
        "succeeded": status.get("succeeded"),
        "failed": status.get("failed"),
        "complete_s": elapsed,
        "complete_items_per_s": done / elapsed if elapsed > 0 else 0.0,
        "all_accounted": done == items,
    }


def peer_python(script: str) -> str:
    """arq cannot share the platform's venv (it pins redis-py < 6): its own venv, made
    by bench/peers/arq-venv.sh."""
    if script.startswith("arq"):
        made = subprocess.run(
            ["bash", str(PEERS / "arq-venv.sh")], capture_output=True, text=True, timeout=600
        )
        if made.returncode == 0 and made.stdout.strip():
            return made.stdout.strip().splitlines()[-1]
    return sys.executable


def run_peer(script: str, items: int, workdir: Path) -> dict[str, Any]:
    out = workdir / f"{script}.json"
    cmd = [peer_python(script), str(PEERS / script), "--items", str(items), "--json", str(out)]
    log(f"peer: {' '.join(cmd[1:])}")
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        return {"error": "timed out after 900 s"}
    if proc.returncode != 0 or not out.exists():
        return {"error": f"exit {proc.returncode}: {(proc.stderr or proc.stdout)[-1500:]}"}
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def render(res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = [
        "# imagefn batch benchmark",
        "",
        f"Machine: {m['nproc']} CPUs, {m['cpu_model']}, {m.get('memory_gib', '?')} GiB,"
        f" kernel {m['kernel']}; queue backend {res['backend']}; platform settings"
        f" {res.get('platform_env') or 'default'}; command `{res['command']}`",
        "",
        "| what | items | items/s | target | met |",
        "|---|---|---|---|---|",
    ]
    sync = res.get("sync", {})
    b = res.get("batch", {})
    if b:
        sub = b["submit_items_per_s"]
        comp = b["complete_items_per_s"]
        sync_rps = sync.get("rps", 0.0)
        lines += [
            f"| batch submission (accepted) | {b['items']} | {sub:,.0f} | >= 20,000 |"
            f" {'yes' if sub >= 20000 else 'NO'} |",
            f"| batch completion | {b['items']} | {comp:,.0f} | >= 1,000 and >= sync"
            f" ({sync_rps:,.0f}) | {'yes' if comp >= max(1000, sync_rps) else 'NO'} |",
        ]
    if sync:
        lines.append(
            f"| synchronous saturation ({res['clients']} clients, {res['duration_s']:g} s) |"
            f" {sync['completed']} | {sync['rps']:,.0f} | - | - |"
        )
    for peer in ("celery", "arq"):
        p = res.get(peer, {})
        if "error" in p:
            lines.append(f"| {peer} | - | failed: {p['error'][:80]} | - | - |")
        elif p:
            lines.append(
                f"| {peer} (submit {p.get('submit_items_per_s', 0):,.0f}/s) | {p.get('items')}"
                f" | {p.get('complete_items_per_s', 0):,.0f} | - | - |"
            )
    if b:
        lines += [
            "",
            f"Batch: state {b['state']}, {b['succeeded']} succeeded, {b['failed']} failed,"
            f" all accounted for: {b['all_accounted']}; accepted in {b['accepted_s']:.2f} s,"
            f" completed in {b['complete_s']:.1f} s (max_concurrency {b['max_concurrency']}).",
        ]
    return "\n".join(lines)


async def amain(a: argparse.Namespace) -> int:
    machine = machine_info()
    workdir = Path(tempfile.mkdtemp(prefix="imagefn-batchbench-"))
    plat = Platform(a.redis_url, "warning", workdir)
    docker = aiodocker.Docker()
    reg = BenchRegistry(plat.port)
    fn_image = f"bench-{plat.tag}/noop:latest"
    res: dict[str, Any] = {
        "machine": machine,
        "backend": a.backend,
        "clients": a.clients,
        "duration_s": a.duration,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    ctl: Control | None = None
    rc = 0
    extra: dict[str, str] = dict(kv.split("=", 1) for kv in a.env)
    if a.backend == "kafka":
        extra["IMAGEFN_QUEUE_BACKEND"] = "kafka"
    res["platform_env"] = extra
    try:
        await plat.guard_other_installations(docker)
        reg.start()
        await plat.start({**reg.env(), **extra})
        ctl = Control(plat)
        repository, _, tag = fn_image.partition(":")
        await reg.push(docker, a.image, repository, tag)
        name = f"b{plat.tag}-noop"
        await ctl.deploy(fn_spec(name, fn_image, max_instances=a.instances, idle_ttl_s=3600))
        url = f"{plat.url}/v1/functions/{name}/invoke"
        log(f"1. synchronous saturation: {a.clients} clients, {a.duration:g} s")
        # Every request to the gateway carries the run's admin key (plat.auth_headers).
        auth = plat.auth_headers
        await saturate(lambda s, _i: post_gateway(s, url), a.clients, 2.0, auth)  # warm-up
        res["sync"] = await saturate(
            lambda s, _i: post_gateway(s, url), a.clients, a.duration, auth
        )
        log(f"   {res['sync']['rps']:.0f} inv/s")
        log(f"2. batch of {a.items} items")
        async with aiohttp.ClientSession(headers=auth) as session:
            res["batch"] = await run_batch(session, plat.url, name, a.items, a.concurrency)
        b = res["batch"]
        log(
            f"   accepted {b['submit_items_per_s']:.0f} items/s,"
            f" completed {b['complete_items_per_s']:.0f} items/s ({b['state']})"
        )
    except Exception:
        log("benchmark failed:\n" + traceback.format_exc())
        rc = 1
    finally:
        if ctl is not None:
            await ctl.close()
        await plat.stop()
        with contextlib.suppress(aiodocker.exceptions.DockerError):
            for c in await docker.containers.list(
                all=True, filters=json.dumps({"label": [f"{WORKER_LABEL}={plat.worker_id}"]})
            ):
                with contextlib.suppress(aiodocker.exceptions.DockerError):
                    await c.delete(force=True)
        await reg.remove_images(docker)
        reg.cleanup()
        await docker.close()
        with contextlib.suppress(Exception):
            r = aioredis.Redis.from_url(a.redis_url)
            keys = [k async for k in r.scan_iter(match=f"{plat.prefix}:*", count=1000)]
            for i in range(0, len(keys), 1000):
                await r.delete(*keys[i : i + 1000])
            await r.aclose()
    if not a.no_peers:
        log(f"3. peers: {a.peer_items} items each")
        res["celery"] = await asyncio.to_thread(run_peer, "celery_peer.py", a.peer_items, workdir)
        res["arq"] = await asyncio.to_thread(run_peer, "arq_peer.py", a.peer_items, workdir)
    report = render(res)
    print(report, flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1, default=str))  # noqa: ASYNC240
    return rc


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", choices=("redis", "kafka"), default="redis")
    p.add_argument("--items", type=int, default=100_000)
    p.add_argument("--peer-items", type=int, default=5000)
    p.add_argument("--concurrency", type=int, default=64, help="the batch's max_concurrency")
    p.add_argument("--instances", type=int, default=4, help="max_instances of the function")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--image", default="imagefn-examples/hello-event:latest")
    p.add_argument("--redis-url", default=local_redis_url(0))
    p.add_argument("--no-peers", action="store_true")
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an extra setting for the platform, e.g. IMAGEFN_LOGS=off (diagnostic rows)",
    )
    p.add_argument("--json", metavar="FILE")
    return p.parse_args()


def main() -> int:
    try:
        return asyncio.run(amain(parse_args()))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
