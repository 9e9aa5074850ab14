"""The worker's side of the shipper process (workers/logship_proxy.py) against a tiny
fake child that records what it receives, and the child's message handling
(workers/logship_main.py) against a recording shipper."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from shared.settings import KafkaSettings, LogSettings, Settings, WorkerSettings
from workers import logship_proxy
from workers.logship import LogSource
from workers.logship_main import ChildConfig, handle
from workers.logship_proxy import ShipperProcess, child_config

# Records every message (with its pid) in the file named by argv[1]; answers a drain
# with true, with false for container "unclean", not at all for "hang"; exits at close
# unless argv[2] is "stubborn".
FAKE_CHILD = """
import json, os, sys
out = open(sys.argv[1], "a", buffering=1)
stubborn = len(sys.argv) > 2 and sys.argv[2] == "stubborn"
cfg = json.loads(sys.stdin.readline())
out.write(json.dumps([os.getpid(), ["cfg", cfg["worker_id"]]]) + "\\n")
for line in sys.stdin:
    msg = json.loads(line)
    out.write(json.dumps([os.getpid(), msg]) + "\\n")
    if msg[0] == "d" and msg[2] != "hang":
        sys.stdout.write(json.dumps(["d", msg[1], msg[2] != "unclean"]) + "\\n")
        sys.stdout.flush()
    if msg[0] == "c" and not stubborn:
        break
if stubborn:
    import time
    time.sleep(60)
"""

SRC = LogSource(function="fn", version=3, instance="fn-abc", concurrency=1, memory_limit_mb=128)


def settings(drain_s: float = 0.2) -> Settings:
    return Settings(
        worker=WorkerSettings(worker_id="w-proxy"),
        logs=LogSettings(drain_timeout_s=drain_s),
    )


@pytest.fixture
def fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logship_proxy, "DRAIN_MARGIN_S", 0.3)
    monkeypatch.setattr(logship_proxy, "CLOSE_MARGIN_S", 0.3)
    monkeypatch.setattr(logship_proxy, "RESTART_MIN_S", 0.05)


def fake(tmp_path: Path, *extra: str) -> tuple[list[str], Path]:
    script = tmp_path / "child.py"
    script.write_text(FAKE_CHILD)
    record = tmp_path / "received.jsonl"
    return [sys.executable, str(script), str(record), *extra], record


def received(record: Path) -> list[tuple[int, list[Any]]]:
    if not record.exists():
        return []
    return [tuple(json.loads(line)) for line in record.read_text().splitlines()]  # type: ignore[misc]


async def until(pred: Any, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_messages_are_framed_and_timed_by_the_worker(tmp_path: Path, fast: None) -> None:
    cmd, record = fake(tmp_path)
    proxy = ShipperProcess(settings(), command=cmd)
    await proxy.start()
    try:
        before = time.time_ns()
        proxy.follow("c1", SRC)
        proxy.request_started("c1", "r1", cold=True, init_ms=12.5)
        proxy.request_ended("c1", "r1", status=200, error=None)
        # Not followed: nothing is sent.
        proxy.request_started("other", "r2", cold=False, init_ms=None)
        after = time.time_ns()
        assert await proxy.drained("c1") is True
        assert proxy.following() == []
        # Not followed (any more): answered at once.
        assert await proxy.drained("c1") is True
    finally:
        await proxy.close()
    msgs = [m for _, m in received(record)]
    assert msgs[0] == ["cfg", "w-proxy"]
    assert msgs[1] == ["f", "c1", "fn", 3, "fn-abc", 1, 128, None, 0]
    assert msgs[2][:5] == ["s", "c1", "r1", True, 12.5]
    assert msgs[3][:5] == ["e", "c1", "r1", 200, None]
    assert before <= msgs[2][5] <= msgs[3][5] <= after
    assert msgs[4][0] == "d" and msgs[4][2] == "c1"
    assert msgs[5] == ["c"]
    assert len(msgs) == 6


async def test_drained_answers_false_when_unclean_or_silent(tmp_path: Path, fast: None) -> None:
    cmd, _ = fake(tmp_path)
    proxy = ShipperProcess(settings(drain_s=0.1), command=cmd)
    await proxy.start()
    try:
        proxy.follow("unclean", SRC)
        proxy.follow("hang", SRC)
        assert await proxy.drained("unclean") is False
        t0 = time.monotonic()
        assert await proxy.drained("hang") is False
        # Bounded by drain_timeout_s + the margin.
        assert 0.3 <= time.monotonic() - t0 < 2.0
    finally:
        await proxy.close()


async def test_a_dead_child_is_restarted_and_told_to_follow_again(
    tmp_path: Path, fast: None
) -> None:
    cmd, record = fake(tmp_path)
    proxy = ShipperProcess(settings(), command=cmd)
    await proxy.start()
    try:
        proxy.follow("c1", SRC)
        proxy.follow("c2", SRC)
        proxy.request_started("c1", "open", cold=False, init_ms=None)
        proxy.request_started("c2", "done", cold=False, init_ms=None)
        proxy.request_ended("c2", "done", status=200, error=None)
        await until(lambda: len(received(record)) == 6)
        first = proxy.pid
        assert first is not None
        started_ns = received(record)[3][1][5]
        died_ns = time.time_ns()
        os.kill(first, signal.SIGKILL)
        await until(lambda: proxy.restarts == 1 and proxy.pid != first)
        await until(lambda: any(pid != first and m[0] == "s" for pid, m in received(record)))
        again = [m for pid, m in received(record) if pid != first]
        assert again[0] == ["cfg", "w-proxy"]
        follows = {m[1]: m for m in again if m[0] == "f"}
        assert set(follows) == {"c1", "c2"}
        for m in follows.values():
            assert m[7] >= died_ns  # since: output from the death on
            assert m[8] >= died_ns // 1000  # seqs above the old child's
        # The open request is started again with its original time; the ended one not.
        starts = [m for m in again if m[0] == "s"]
        assert [(m[2], m[5]) for m in starts] == [("open", started_ns)]
        # A container followed before the restart still drains.
        assert await proxy.drained("c1") is True
    finally:
        await proxy.close()


async def test_a_drain_in_flight_is_asked_again_after_a_restart(
    tmp_path: Path, fast: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logship_proxy, "DRAIN_MARGIN_S", 5.0)
    cmd, record = fake(tmp_path)
    proxy = ShipperProcess(settings(), command=cmd)
    await proxy.start()
    try:
        proxy.follow("hang", SRC)
        waiting = asyncio.create_task(proxy.drained("hang"))
        await until(lambda: any(m[0] == "d" for _, m in received(record)))
        first = proxy.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        await until(lambda: proxy.restarts == 1)
        await until(lambda: any(pid != first and m[0] == "d" for pid, m in received(record)))
        assert not waiting.done()
    finally:
        await proxy.close()
    # Close answers what is still waiting.
    assert await waiting is False


async def test_close_kills_a_child_that_does_not_exit(tmp_path: Path, fast: None) -> None:
    cmd, _ = fake(tmp_path, "stubborn")
    proxy = ShipperProcess(settings(drain_s=0.1), command=cmd)
    await proxy.start()
    proc = proxy._proc
    assert proc is not None
    t0 = time.monotonic()
    await proxy.close()
    assert proc.returncode is not None and proc.returncode < 0
    assert time.monotonic() - t0 < 3.0


def test_child_config_carries_the_workers_settings() -> None:
    s = Settings(
        worker=WorkerSettings(worker_id="w-7", docker_url="unix:///x.sock", container_log_max_mb=3),
        kafka=KafkaSettings(bootstrap="127.0.0.1:9999", topic_prefix="p"),
        logs=LogSettings(buffer_mb=5, drain_timeout_s=1.5),
        log_level="debug",
        uvloop=False,
    )
    cfg = ChildConfig.decode(child_config(s))
    assert cfg == ChildConfig(
        logs=s.logs,
        kafka=s.kafka,
        worker_id="w-7",
        docker_url="unix:///x.sock",
        rotate_bytes=3 * 1024 * 1024,
        log_level="debug",
        uvloop=False,
    )
    assert ChildConfig.decode(child_config(replace(s, logs=LogSettings()))).logs == LogSettings()


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def __getattr__(self, name: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> None:
            self.calls.append((name, args, kwargs))

        return call


def test_the_child_applies_messages_with_the_workers_times() -> None:
    rec = Recorder()
    answers: list[tuple[int, str]] = []

    def answer(rid: int, cid: str) -> None:
        answers.append((rid, cid))

    def apply(msg: list[Any]) -> bool:
        return handle(rec, msg, answer)  # type: ignore[arg-type]

    assert apply(["f", "c1", "fn", 3, "fn-abc", 1, 128, 17, 99])
    assert apply(["s", "c1", "r1", True, 1.5, 1000])
    assert apply(["e", "c1", "r1", 500, "Boom", 2000])
    assert apply(["d", 7, "c1"])
    assert not apply(["c"])
    assert rec.calls == [
        ("follow", ("c1", SRC), {"since_ns": 17, "seq_from": 99}),
        ("request_started", ("c1", "r1"), {"cold": True, "init_ms": 1.5, "at_ns": 1000}),
        ("request_ended", ("c1", "r1"), {"status": 500, "error": "Boom", "at_ns": 2000}),
    ]
    assert answers == [(7, "c1")]
