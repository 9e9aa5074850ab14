#!/usr/bin/env python3
"""Log shipping benchmark (issue 5): how fast container output reaches Kafka, how late,
and what shipping costs the function.

Two ``imagefn up`` platforms run side by side on one machine, one with log shipping on
and one with it off (``IMAGEFN_LOGS=off``), both with a registry of this run (token
auth, as in foundation.py) and the machine's Kafka-protocol broker. Each platform has a
bootstrap admin key of its own (``Platform.admin_key``), sent with every call to it. The function is
``bench/images/chatty`` (built here): each event asks it for N lines of B bytes at R lines
per second; every line carries the time it was written (``t=``), so the delay from write
to arrival is read off the line itself. "Arrival" is when this script's consumer,
following the logs topic, receives the record: an upper bound on arrival in Kafka (it adds
the fetch, ~1-2 ms here).

1. **Throughput**: one invocation writes ``--lines`` lines as fast as it can; lines/s
   shipped = lines / (last arrival - first write). Every line must arrive (checked by seq)
   or be accounted for by a GAP record.
2. **Delay**: the function writes at a steady ``--rates`` lines/s for ``--seconds``;
   p50/p99/max of arrival - write. Target: p99 <= 1 s at 50,000 lines/s.
3. **Cost**: invocations that each write ``--cost-lines`` lines, sequential, in
   alternating blocks on the two platforms; p50/p99 of the invocation latency through the
   gateway with shipping on vs off. Target: p99(on) <= 1.05 x p99(off).

Usage: ``.venv/bin/python bench/logship.py [--json FILE]`` (after deploy/setup.sh).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import aiodocker
import aiohttp
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

sys.path.insert(0, str(Path(__file__).resolve().parent))
from foundation import (  # the sibling script, found through sys.path
    WORKER_LABEL,
    BenchRegistry,
    Control,
    Platform,
    fn_spec,
    log,
    machine_info,
    summary,
)
from peers.common import local_redis_url

REPO = Path(__file__).resolve().parent.parent
CHATTY_DIR = REPO / "bench/images/chatty"
CHATTY = "imagefn-bench/chatty:latest"
LINE_RE = re.compile(rb"seq=(\d+) t=(\d+\.\d+)")


class LogFollower:
    """Reads the logs topic of one platform from its end at start, keeping for each
    chatty line its seq, write time and arrival time, and every GAP record."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.consumer: AIOKafkaConsumer | None = None
        self.task: asyncio.Task[None] | None = None
        # tag -> list of (seq, written_at, arrived_at)
        self.lines: dict[str, list[tuple[int, float, float]]] = {}
        self.gaps: list[dict[str, Any]] = []
        self.platform_records: dict[str, int] = {}

    async def start(self) -> None:
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            enable_auto_commit=False,
            # Tansu answers a fetch only when its wait ends: keep it short so arrival
            # times are not inflated by the wait (~5 ms error at most).
            fetch_max_wait_ms=5,
            max_partition_fetch_bytes=8 << 20,
        )
        await self.consumer.start()
        # The consumer's metadata cache only learns topics it is asked about; the admin
        # client reports the partitions of the topic the worker created.
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        await admin.start()
        try:
            parts: list[int] = []
            deadline = time.monotonic() + 20
            while not parts:
                for t in await admin.describe_topics([self.topic]):
                    if t.get("topic") == self.topic and not t.get("error_code"):
                        parts = [int(p["partition"]) for p in t.get("partitions") or []]
                if not parts:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"topic {self.topic} did not appear")
                    await asyncio.sleep(0.2)
        finally:
            await admin.close()
        tps = [TopicPartition(self.topic, p) for p in sorted(parts)]
        self.consumer.assign(tps)
        await self.consumer.seek_to_end(*tps)
        for tp in tps:
            await self.consumer.position(tp)  # resolve "end" now, before any traffic
        self.task = asyncio.create_task(self._run(), name="bench-log-follower")

    async def _run(self) -> None:
        assert self.consumer is not None
        while True:
            batches = await self.consumer.getmany(timeout_ms=200, max_records=10_000)
            now = time.time()
            for records in batches.values():
                for rec in records:
                    value: bytes = rec.value
                    m = LINE_RE.search(value)
                    if m is not None and b'"type":"line"' in value:
                        tag = value[value.find(b'"line":"') + 8 :].split(b" ", 1)[0].decode()
                        self.lines.setdefault(tag, []).append(
                            (int(m.group(1)), float(m.group(2)), now)
                        )
                        continue
                    try:
                        doc = json.loads(value)
                    except ValueError:
                        continue
                    kind = str(doc.get("type"))
                    self.platform_records[kind] = self.platform_records.get(kind, 0) + 1
                    if kind == "GAP":
                        self.gaps.append(doc)

    async def wait_lines(self, tag: str, n: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            got = len({seq for seq, _w, _a in self.lines.get(tag, [])})
            dropped = sum(int(g.get("dropped_lines", 0)) for g in self.gaps)
            if got + dropped >= n:
                return True
            await asyncio.sleep(0.2)
        return False

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        if self.consumer is not None:
            await self.consumer.stop()


async def invoke(
    session: aiohttp.ClientSession, plat: Platform, name: str, event: dict[str, Any]
) -> tuple[float, dict[str, Any]]:
    t0 = time.perf_counter()
    # One session serves both platforms, each with its own admin key: sent per request.
    async with session.post(
        f"{plat.url}/v1/functions/{name}/invoke", json=event, headers=plat.auth_headers
    ) as r:
        body = await r.read()
        if r.status != 200:
            raise RuntimeError(f"invoke {name}: HTTP {r.status}: {body[:300]!r}")
    return (time.perf_counter() - t0) * 1000, json.loads(body)


def delays_ms(rows: list[tuple[int, float, float]]) -> dict[str, float]:
    return summary([(arrived - written) * 1000 for _seq, written, arrived in rows])


async def part_throughput(
    session: aiohttp.ClientSession, plat: Platform, fol: LogFollower, name: str, lines: int
) -> dict[str, Any]:
    tag = f"tp{int(time.time())}"
    gaps_before = len(fol.gaps)
    ms, body = await invoke(session, plat, name, {"lines": lines, "size": 100, "tag": tag})
    complete = await fol.wait_lines(tag, lines, timeout_s=120)
    rows = fol.lines.get(tag, [])
    seqs = {seq for seq, _w, _a in rows}
    first_write = min(w for _s, w, _a in rows) if rows else float("nan")
    last_arrival = max(a for _s, _w, a in rows) if rows else float("nan")
    gaps = fol.gaps[gaps_before:]
    return {
        "lines": lines,
        "arrived": len(seqs),
        "duplicates": len(rows) - len(seqs),
        "dropped_by_gap_records": sum(int(g.get("dropped_lines", 0)) for g in gaps),
        "complete": complete,
        "in_order": [s for s, _w, _a in rows] == sorted(s for s, _w, _a in rows),
        "invocation_ms": ms,
        "function_write_s": body.get("emit_s"),
        "write_rate": lines / float(body.get("emit_s") or 1),
        "shipped_per_s": len(seqs) / (last_arrival - first_write) if rows else 0.0,
        "delay_ms": delays_ms(rows),
    }


async def part_delay(
    session: aiohttp.ClientSession,
    plat: Platform,
    fol: LogFollower,
    name: str,
    rate: int,
    seconds: float,
) -> dict[str, Any]:
    tag = f"rate{rate}t{int(time.time())}"
    lines = int(rate * seconds)
    _ms, body = await invoke(
        session, plat, name, {"lines": lines, "size": 100, "rate": rate, "tag": tag}
    )
    complete = await fol.wait_lines(tag, lines, timeout_s=60)
    rows = fol.lines.get(tag, [])
    return {
        "rate": rate,
        "lines": lines,
        "arrived": len({s for s, _w, _a in rows}),
        "complete": complete,
        "achieved_write_rate": lines / float(body.get("emit_s") or 1),
        "delay_ms": delays_ms(rows),
    }


async def part_cost(
    session: aiohttp.ClientSession,
    on: Platform,
    off: Platform,
    name: str,
    lines: int,
    blocks: int,
    block_size: int,
) -> dict[str, Any]:
    samples: dict[str, list[float]] = {"on": [], "off": []}
    event = {"lines": lines, "size": 100, "tag": "cost"}
    for plat in (on, off):  # warm both before timing
        for _ in range(20):
            await invoke(session, plat, name, event)
    for b in range(blocks):
        # ABBA: neither platform always runs first, so drifts in machine load cancel.
        order = [("on", on), ("off", off)] if b % 2 == 0 else [("off", off), ("on", on)]
        for label, plat in order:
            for _ in range(block_size):
                ms, _ = await invoke(session, plat, name, event)
                samples[label].append(ms)
    on_s, off_s = summary(samples["on"]), summary(samples["off"])
    return {
        "lines_per_invocation": lines,
        "on_ms": on_s,
        "off_ms": off_s,
        "p99_ratio": on_s["p99"] / off_s["p99"],
        "p50_ratio": on_s["p50"] / off_s["p50"],
    }


def render(res: dict[str, Any]) -> str:
    m = res["machine"]
    out = [
        "# imagefn log shipping benchmark",
        "",
        f"Machine: {m.get('nproc')} CPUs, {m.get('cpu_model')}, kernel {m.get('kernel')},"
        f" Docker {m.get('docker')}; broker {res['bootstrap']}. Command: `{res['command']}`",
        "",
    ]
    if "throughput" in res:
        t = res["throughput"]
        out += [
            "## 1. Throughput (one invocation, as fast as the function can write)",
            "",
            "| lines | arrived | gap-accounted | dups | in order | function wrote at |"
            " shipped lines/s | delay p50 / p99 |",
            "|---|---|---|---|---|---|---|---|",
            f"| {t['lines']} | {t['arrived']} | {t['dropped_by_gap_records']} |"
            f" {t['duplicates']} | {t['in_order']} | {t['write_rate']:,.0f}/s |"
            f" **{t['shipped_per_s']:,.0f}** | {t['delay_ms']['p50']:.0f} /"
            f" {t['delay_ms']['p99']:.0f} ms |",
            "",
            f"Target ≥ 50,000 lines/s: **{'met' if t['shipped_per_s'] >= 50_000 else 'MISSED'}**.",
            "",
        ]
    if "delay" in res:
        out += [
            "## 2. Delay from write to arrival at a steady rate",
            "",
            "| rate asked | achieved | lines | arrived | p50 | p99 | max |",
            "|---|---|---|---|---|---|---|",
        ]
        for d in res["delay"]:
            dm = d["delay_ms"]
            out.append(
                f"| {d['rate']:,}/s | {d['achieved_write_rate']:,.0f}/s | {d['lines']} |"
                f" {d['arrived']} | {dm['p50']:.1f} ms | **{dm['p99']:.1f} ms** |"
                f" {dm['max']:.1f} ms |"
            )
        worst = max(d["delay_ms"]["p99"] for d in res["delay"])
        out += ["", f"Target p99 ≤ 1 s: **{'met' if worst <= 1000 else 'MISSED'}**.", ""]
    if "cost" in res:
        c = res["cost"]
        out += [
            f"## 3. Function latency with shipping on vs off ({c['lines_per_invocation']}"
            " lines per invocation)",
            "",
            "| shipping | n | p50 | p90 | p99 |",
            "|---|---|---|---|---|",
        ]
        for label in ("on", "off"):
            s = c[f"{label}_ms"]
            out.append(
                f"| {label} | {s['n']} | {s['p50']:.2f} ms | {s['p90']:.2f} ms |"
                f" {s['p99']:.2f} ms |"
            )
        out += [
            "",
            f"p99 on/off = **x{c['p99_ratio']:.3f}** (p50 x{c['p50_ratio']:.3f}); target"
            f" ≤ x1.05: **{'met' if c['p99_ratio'] <= 1.05 else 'MISSED'}**.",
            "",
        ]
    return "\n".join(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--redis-url", default=local_redis_url(0))
    p.add_argument("--kafka", default="127.0.0.1:9092", help="Kafka bootstrap host:port")
    p.add_argument("--lines", type=int, default=300_000, help="part 1: lines in one burst")
    p.add_argument("--rates", default="10000,50000", help="part 2: lines/s, comma-separated")
    p.add_argument("--seconds", type=float, default=8.0, help="part 2: seconds per rate")
    p.add_argument("--cost-lines", type=int, default=100, help="part 3: lines per invocation")
    p.add_argument("--blocks", type=int, default=10)
    p.add_argument("--block-size", type=int, default=100)
    p.add_argument("--only", default="throughput,delay,cost")
    p.add_argument("--json", help="also write the raw figures to this file")
    return p.parse_args(argv)


async def amain(a: argparse.Namespace) -> int:
    parts = set(a.only.split(","))
    # Before anything is measured: a blocking build is harmless here.
    subprocess.run(  # noqa: ASYNC221
        ["docker", "build", "-q", "-t", CHATTY, str(CHATTY_DIR)], check=True
    )
    workdir = Path(tempfile.mkdtemp(prefix="imagefn-bench-logs-"))
    on = Platform(a.redis_url, "warning", workdir / "on")
    off = Platform(a.redis_url, "warning", workdir / "off")
    (workdir / "on").mkdir()
    (workdir / "off").mkdir()
    reg = BenchRegistry(on.port)
    docker = aiodocker.Docker()
    res: dict[str, Any] = {
        "machine": machine_info(),
        "bootstrap": a.kafka,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    fol: LogFollower | None = None
    controls: list[Control] = []
    rc = 0
    try:
        reg.start()
        common = {**reg.env(), "IMAGEFN_KAFKA_BOOTSTRAP": a.kafka}
        await on.start({**common, "IMAGEFN_LOGS": "on"})
        await off.start({**common, "IMAGEFN_LOGS": "off"})
        repository = f"bench-{on.tag}/chatty"
        await reg.push(docker, CHATTY, repository, "latest")
        name = f"chatty-{on.tag}"
        spec = fn_spec(name, f"{reg.address}/{repository}:latest", timeout_s=120)
        spec["memory_mb"] = 256
        for plat in (on, off):
            ctl = Control(plat)
            controls.append(ctl)
            await ctl.deploy(spec)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as s:
            await invoke(s, on, name, {"lines": 1, "tag": "warmup"})  # instance + topic
            fol = LogFollower(a.kafka, f"{on.prefix}.logs")
            await fol.start()
            if "throughput" in parts:
                log(f"1. throughput: {a.lines} lines in one invocation")
                res["throughput"] = await part_throughput(s, on, fol, name, a.lines)
                log(f"   {res['throughput']['shipped_per_s']:,.0f} lines/s shipped")
            if "delay" in parts:
                res["delay"] = []
                for rate in (int(r) for r in a.rates.split(",")):
                    log(f"2. delay at {rate} lines/s for {a.seconds:g} s")
                    d = await part_delay(s, on, fol, name, rate, a.seconds)
                    res["delay"].append(d)
                    log(f"   p99 {d['delay_ms']['p99']:.1f} ms")
            res["platform_records"] = dict(fol.platform_records)
            # This process must not compete with the platforms for the CPU while their
            # latency is compared: stop reading the topic first.
            await fol.stop()
            fol = None
            if "cost" in parts:
                log(f"3. cost: {a.blocks} blocks of {a.block_size} per platform")
                res["cost"] = await part_cost(
                    s, on, off, name, a.cost_lines, a.blocks, a.block_size
                )
                log(f"   p99 on/off x{res['cost']['p99_ratio']:.3f}")
    except Exception:
        log("benchmark failed:\n" + traceback.format_exc())
        rc = 1
    finally:
        if fol is not None:
            await fol.stop()
        for ctl in controls:
            await ctl.close()
        for plat in (on, off):
            await plat.stop()
            for c in await docker.containers.list(
                all=True, filters=json.dumps({"label": [f"{WORKER_LABEL}={plat.worker_id}"]})
            ):
                with contextlib.suppress(aiodocker.exceptions.DockerError):
                    await c.delete(force=True)
        await reg.remove_images(docker)
        reg.cleanup()
        await docker.close()
    print(render(res), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1, default=str))  # noqa: ASYNC240
    return rc


def main() -> int:
    return asyncio.run(amain(parse_args()))


if __name__ == "__main__":
    raise SystemExit(main())
