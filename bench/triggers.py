#!/usr/bin/env python3
"""Event-trigger benchmark (issue 11): Kafka trigger throughput, object-storage (COS)
upload-to-invocation delay and timer tick jitter, next to the synchronous path.

In one run on one machine, against one platform the script starts itself
(``bench/foundation.py``'s Platform: ``imagefn up`` with its own admin key, registry
and Redis prefix; its trigger runner is the one ``imagefn up`` runs), with the no-op
event function (imagefn-examples/hello-event):

1. **COS**: a bucket of the machine's SeaweedFS (``IMAGEFN_S3_*`` from
   /var/lib/imagefn/credentials.env, given to the platform) with a cos trigger;
   ``--uploads`` objects put one at a time (boto3, in a thread), each waited for before
   the next: delay = the invocation record's ``created_at`` (accepted) minus the moment
   ``put_object`` returned. Invocations are found by their record's ``owner``
   (``trigger/{function}/{trigger}``) under ``{prefix}:invocation:cos-*``.
2. **Timer**: a ``* * * * * *`` timer for ``--timer-s`` s; jitter = the record's
   ``created_at`` minus the tick time in the request id ``timer-{fn}-{name}-{tick_ms}``.
3. **Kafka**: per batch size (1, 10, 100) a new 4-partition topic with ``--records``
   records produced before the trigger exists; time from the trigger's creation
   (``start: earliest``) until the trigger's consumer group has committed the end offset
   of every partition (every record delivered and committed): records/s.
4. **Synchronous**: the same number of ``POST /v1/functions/NAME/invoke`` calls from
   ``--clients`` concurrent clients: invocations/s.

Usage: ``.venv/bin/python bench/triggers.py [--quick] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import aiodocker
import aiohttp
import boto3
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

sys.path.insert(0, str(Path(__file__).resolve().parent))
from foundation import (  # the sibling script, found through sys.path
    WORKER_LABEL,
    BenchRegistry,
    Control,
    Platform,
    fn_spec,
    keepalive_session,
    log,
    machine_info,
    post_gateway,
    summary,
)
from peers.common import local_redis_url

CREDENTIALS = Path("/var/lib/imagefn/credentials.env")
BOOTSTRAP = "127.0.0.1:9092"


def s3_env() -> dict[str, str]:
    """IMAGEFN_S3_* as deploy/seaweedfs.sh wrote them (the environment wins)."""
    env: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in CREDENTIALS.read_text().splitlines():
            if line.startswith("IMAGEFN_S3_") and "=" in line:
                k, v = line.split("=", 1)
                env[k] = v.strip().strip("'\"")
    env.update({k: v for k, v in os.environ.items() if k.startswith("IMAGEFN_S3_")})
    return env


async def put_trigger(
    s: aiohttp.ClientSession, url: str, fn: str, name: str, body: dict[str, Any]
) -> None:
    async with s.put(f"{url}/v1/functions/{fn}/triggers/{name}", json=body) as r:
        text = await r.text()
        if r.status not in (200, 201):
            raise RuntimeError(f"trigger {fn}/{name}: HTTP {r.status}: {text}")


async def delete_trigger(s: aiohttp.ClientSession, url: str, fn: str, name: str) -> None:
    with contextlib.suppress(Exception):
        async with s.delete(f"{url}/v1/functions/{fn}/triggers/{name}") as r:
            await r.read()


async def owned_records(
    r: aioredis.Redis, prefix: str, pattern: str, owner: str
) -> dict[str, float]:
    """request id -> created_at of the invocation records ``owner`` made."""
    out: dict[str, float] = {}
    keys = [k async for k in r.scan_iter(match=f"{prefix}:invocation:{pattern}", count=1000)]
    if not keys:
        return out
    pipe = r.pipeline(transaction=False)
    for k in keys:
        pipe.hmget(k, "owner", "created_at")
    for k, (own, created) in zip(keys, await pipe.execute(), strict=True):
        if own is not None and own.decode() == owner and created is not None:
            out[k.decode().rsplit(":", 1)[-1]] = float(created)
    return out


async def bench_cos(
    plat: Platform, s: aiohttp.ClientSession, r: aioredis.Redis, fn: str, uploads: int
) -> dict[str, Any]:
    env = s3_env()
    s3 = boto3.client(
        "s3",
        endpoint_url=env["IMAGEFN_S3_ENDPOINT"],
        aws_access_key_id=env["IMAGEFN_S3_ACCESS_KEY"],
        aws_secret_access_key=env["IMAGEFN_S3_SECRET_KEY"],
        region_name=env.get("IMAGEFN_S3_REGION") or "us-east-1",
    )
    bucket = f"bench-{plat.tag}"
    await asyncio.to_thread(s3.create_bucket, Bucket=bucket)
    owner = f"trigger/{fn}/uploads"
    delays: list[float] = []
    try:
        await put_trigger(s, plat.url, fn, "uploads", {"type": "cos", "bucket": bucket})
        seen: dict[str, float] = {}

        async def upload_and_wait(key: str, timeout_s: float) -> float | None:
            await asyncio.to_thread(s3.put_object, Bucket=bucket, Key=key, Body=b"x")
            done = time.time()
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                now = await owned_records(r, plat.prefix, "cos-*", owner)
                new = {k: v for k, v in now.items() if k not in seen}
                if new:
                    seen.update(new)
                    return min(new.values()) - done
                await asyncio.sleep(0.02)
            return None

        # The runner's group starts at the topic's end once it has joined: warm up until an
        # upload comes through (and the function has an instance).
        deadline = time.monotonic() + 60
        i = 0
        while await upload_and_wait(f"warm/{i}", 3.0) is None:
            i += 1
            if time.monotonic() > deadline:
                raise RuntimeError("no cos invocation within 60 s of the trigger's creation")
        await asyncio.sleep(1.0)  # late warm-up invocations, if any, are seen now
        seen.update(await owned_records(r, plat.prefix, "cos-*", owner))
        missing = 0
        for n in range(uploads):
            d = await upload_and_wait(f"obj/{n}", 15.0)
            if d is None:
                missing += 1
            else:
                delays.append(d * 1000)
    finally:
        await delete_trigger(s, plat.url, fn, "uploads")
        with contextlib.suppress(Exception):
            objs = await asyncio.to_thread(s3.list_objects_v2, Bucket=bucket)
            for o in objs.get("Contents", []):
                await asyncio.to_thread(s3.delete_object, Bucket=bucket, Key=o["Key"])
            await asyncio.to_thread(s3.delete_bucket, Bucket=bucket)
    return {"uploads": uploads, "missing": missing, "delay_ms": summary(delays)}


async def bench_timer(
    plat: Platform, s: aiohttp.ClientSession, r: aioredis.Redis, fn: str, seconds: float
) -> dict[str, Any]:
    await put_trigger(s, plat.url, fn, "tick", {"type": "timer", "cron": "* * * * * *"})
    t0 = time.time()
    await asyncio.sleep(seconds)
    await delete_trigger(s, plat.url, fn, "tick")
    t1 = time.time()
    await asyncio.sleep(1.0)
    recs = await owned_records(r, plat.prefix, f"timer-{fn}-tick-*", f"trigger/{fn}/tick")
    jitter = [(created - int(rid.rsplit("-", 1)[1]) / 1000) * 1000 for rid, created in recs.items()]
    ticks = sorted(int(rid.rsplit("-", 1)[1]) for rid in recs)
    gaps = sum(1 for a, b in itertools.pairwise(ticks) if b - a > 1000)
    return {
        "seconds": seconds,
        "window_s": t1 - t0,
        "ticks": len(recs),
        "gaps": gaps,
        "jitter_ms": summary(jitter),
    }


async def bench_kafka(
    plat: Platform, s: aiohttp.ClientSession, fn: str, records: int, batch: int
) -> dict[str, Any]:
    topic = f"bench-{plat.tag}-b{batch}"
    name = f"k{batch}"
    admin = AIOKafkaAdminClient(bootstrap_servers=BOOTSTRAP, client_id="bench-triggers")
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, 4, 1)])
        await asyncio.sleep(0.5)
        prod = AIOKafkaProducer(bootstrap_servers=BOOTSTRAP, acks="all", linger_ms=5)
        await prod.start()
        try:
            futs = [
                await prod.send(topic, value=f'{{"i":{i}}}'.encode(), key=str(i).encode())
                for i in range(records)
            ]
            await asyncio.gather(*futs)
        finally:
            await prod.stop()
        group = f"imagefn-trigger.{plat.prefix}.{fn}.{name}"
        t0 = time.time()
        await put_trigger(
            s,
            plat.url,
            fn,
            name,
            {
                "type": "kafka",
                "topic": topic,
                "start": "earliest",
                "batch_size": batch,
                "batch_window_ms": 50,
            },
        )
        done_at = None
        committed = 0
        first: tuple[float, int] | None = None  # when the first commit was seen, and its sum
        deadline = time.monotonic() + 900
        # The trigger's group's committed offsets, read as a member that never joins
        # (Tansu does not answer the admin client's OffsetFetch).
        watcher = AIOKafkaConsumer(
            bootstrap_servers=BOOTSTRAP, group_id=group, enable_auto_commit=False
        )
        await watcher.start()
        try:
            tps = [TopicPartition(topic, p) for p in range(4)]
            while time.monotonic() < deadline:
                offsets = [await watcher.committed(tp) for tp in tps]
                committed = sum(o for o in offsets if o)
                if committed and first is None:
                    first = (time.time(), committed)
                if committed >= records:
                    done_at = time.time()
                    break
                await asyncio.sleep(0.05)
        finally:
            await watcher.stop()
        await delete_trigger(s, plat.url, fn, name)
        if done_at is None:
            raise RuntimeError(f"batch {batch}: {committed}/{records} committed within 900 s")
        elapsed = done_at - t0
        return {
            "batch_size": batch,
            "records": records,
            "elapsed_s": elapsed,
            "records_per_s": records / elapsed,
            "committed": committed,
            # After the first commit: the rate without the trigger's start (group join).
            "first_commit_s": first[0] - t0 if first else None,
            "after_first_records_per_s": (records - first[1]) / (done_at - first[0])
            if first and done_at > first[0]
            else None,
        }
    finally:
        with contextlib.suppress(Exception):
            await admin.delete_topics([topic])
        await admin.close()


async def bench_sync(plat: Platform, fn: str, total: int, clients: int) -> dict[str, Any]:
    url = f"{plat.url}/v1/functions/{fn}/invoke"
    left = total
    ok = 0
    errors: dict[str, int] = {}
    async with keepalive_session(limit=clients + 4, headers=plat.auth_headers) as session:
        # Warm-up (instances scaled out, connections open), not counted.
        await asyncio.gather(*(post_gateway(session, url) for _ in range(clients * 4)))
        t0 = time.monotonic()

        async def client() -> None:
            nonlocal left, ok
            while left > 0:
                left -= 1
                sample = await post_gateway(session, url)
                if sample.ok:
                    ok += 1
                else:
                    errors[sample.error] = errors.get(sample.error, 0) + 1

        await asyncio.gather(*(client() for _ in range(clients)))
        elapsed = time.monotonic() - t0
    return {
        "calls": total,
        "ok": ok,
        "errors": errors,
        "clients": clients,
        "elapsed_s": elapsed,
        "rps": ok / elapsed,
    }


def render(res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = [
        "# imagefn event-trigger benchmark",
        "",
        f"Machine: {m['nproc']} CPUs, {m['cpu_model']}, {m.get('memory_gib', '?')} GiB,"
        f" kernel {m['kernel']}, Docker {m['docker']}, Python {m['python']},"
        f" load average {' '.join(m.get('loadavg_at_start', []))}; {m.get('code', '')};"
        f" command `{res['command']}`",
        "",
        "| what | n | figure |",
        "|---|---|---|",
    ]
    for k in res.get("kafka", []):
        after = k.get("after_first_records_per_s")
        lines.append(
            f"| Kafka trigger, batch_size {k['batch_size']} (4 partitions) | {k['records']}"
            f" records | {k['records_per_s']:,.0f} records/s ({k['elapsed_s']:.2f} s from"
            f" the trigger's creation; first commit at {k['first_commit_s'] or 0:.2f} s,"
            f" {after or 0:,.0f} records/s after it) |"
        )
    sy = res.get("sync")
    if sy:
        lines.append(
            f"| synchronous invoke, {sy['clients']} clients | {sy['calls']} calls"
            f" ({sy['ok']} ok) | {sy['rps']:,.0f} invocations/s |"
        )
    c = res.get("cos")
    if c:
        d = c["delay_ms"]
        lines.append(
            f"| COS upload -> invocation accepted | {d['n']} uploads ({c['missing']} missing)"
            f" | p50 {d['p50']:.0f} ms, p99 {d['p99']:.0f} ms, max {d['max']:.0f} ms |"
        )
    t = res.get("timer")
    if t:
        j = t["jitter_ms"]
        lines.append(
            f"| timer `* * * * * *` tick -> accepted | {t['ticks']} ticks in"
            f" {t['window_s']:.0f} s ({t['gaps']} gaps) | p50 {j['p50']:.0f} ms,"
            f" p99 {j['p99']:.0f} ms, max {j['max']:.0f} ms |"
        )
    return "\n".join(lines)


async def amain(a: argparse.Namespace) -> int:
    if a.quick:
        a.records, a.uploads, a.timer_s = min(a.records, 1000), min(a.uploads, 30), 10.0
    machine = machine_info()
    workdir = Path(tempfile.mkdtemp(prefix="imagefn-triggerbench-"))
    plat = Platform(a.redis_url, "warning", workdir)
    docker = aiodocker.Docker()
    reg = BenchRegistry(plat.port)
    fn_image = f"bench-{plat.tag}/noop:latest"
    res: dict[str, Any] = {
        "machine": machine,
        "quick": a.quick,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    ctl: Control | None = None
    r = aioredis.Redis.from_url(a.redis_url)
    rc = 0
    try:
        await plat.guard_other_installations(docker)
        reg.start()
        await plat.start({**reg.env(), **s3_env(), "IMAGEFN_KAFKA_BOOTSTRAP": BOOTSTRAP})
        ctl = Control(plat)
        repository, _, tag = fn_image.partition(":")
        await reg.push(docker, a.image, repository, tag)
        fn = f"b{plat.tag}-noop"
        await ctl.deploy(fn_spec(fn, fn_image, max_instances=a.instances, idle_ttl_s=3600))
        status, _, body = await ctl.invoke(fn)
        if status != 200:
            raise RuntimeError(f"warm-up invoke: HTTP {status}: {body[:300]!r}")
        s = ctl.session
        log(f"1. COS: {a.uploads} uploads")
        res["cos"] = await bench_cos(plat, s, r, fn, a.uploads)
        log(f"   {res['cos']['delay_ms']}")
        log(f"2. timer: {a.timer_s:g} s")
        res["timer"] = await bench_timer(plat, s, r, fn, a.timer_s)
        log(f"   {res['timer']['ticks']} ticks, jitter {res['timer']['jitter_ms']}")
        res["kafka"] = []
        for batch in (1, 10, 100):
            log(f"3. Kafka: {a.records} records, batch_size {batch}")
            k = await bench_kafka(plat, s, fn, a.records, batch)
            res["kafka"].append(k)
            log(f"   {k['records_per_s']:.0f} records/s")
        log(f"4. synchronous: {a.records} calls, {a.clients} clients")
        res["sync"] = await bench_sync(plat, fn, a.records, a.clients)
        log(f"   {res['sync']['rps']:.0f} inv/s")
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
        with contextlib.suppress(Exception):  # the platform's own topics ({prefix}.logs)
            admin = AIOKafkaAdminClient(bootstrap_servers=BOOTSTRAP, client_id="bench-triggers")
            await admin.start()
            try:
                mine = [t for t in await admin.list_topics() if t.startswith(f"{plat.prefix}.")]
                if mine:
                    await admin.delete_topics(mine)
            finally:
                await admin.close()
        await reg.remove_images(docker)
        reg.cleanup()
        await docker.close()
        with contextlib.suppress(Exception):
            keys = [k async for k in r.scan_iter(match=f"{plat.prefix}:*", count=1000)]
            for i in range(0, len(keys), 1000):
                await r.delete(*keys[i : i + 1000])
        await r.aclose()
    print(render(res), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1, default=str))  # noqa: ASYNC240
    return rc


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small counts (under ~2 minutes)")
    p.add_argument("--records", type=int, default=20_000, help="Kafka records per batch size")
    p.add_argument("--uploads", type=int, default=200)
    p.add_argument("--timer-s", type=float, default=20.0)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--instances", type=int, default=4, help="max_instances of the function")
    p.add_argument("--image", default="imagefn-examples/hello-event:latest")
    p.add_argument("--redis-url", default=local_redis_url(0))
    p.add_argument("--json", metavar="FILE")
    return p.parse_args()


def main() -> int:
    try:
        return asyncio.run(amain(parse_args()))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
