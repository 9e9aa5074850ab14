"""Worker lifecycle: takeover after SIGKILL, orphan clean-up, idle removal, the sandbox."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import pytest

from tests.integration.conftest import (
    BACKENDS,
    TESTFN,
    Platform,
    RegistryInfo,
    backend_env,
    docker,
    managed_containers,
    running_platform,
    unique,
    wait_for,
)


@pytest.fixture
def platform(queue_platform: Platform) -> Platform:
    """Every test here runs on each queue backend (redis, kafka)."""
    return queue_platform


@pytest.mark.parametrize("backend", BACKENDS)
async def test_invocation_held_by_a_killed_worker_is_completed_by_another(
    backend: str,
    redis_url: str,
    log_dir: Path,
    registry: RegistryInfo,
    pushed_images: None,
    client: aiohttp.ClientSession,
) -> None:
    """Redis: the survivor reclaims the dead worker's claim once idle; Kafka: the group
    gives the dead worker's partitions to the survivor after the session timeout, which
    reads on from the committed offset (the invocation in flight) and runs it again."""
    async with running_platform(
        redis_url, log_dir, registry, workers=1, extra_env=backend_env(backend)
    ) as p:
        name = unique("takeover")
        await p.deploy(client, name, timeout_s=20)
        first = p.workers[0]
        call = asyncio.create_task(p.invoke(client, name, {"sleep": 3}))
        # Wait until the first worker holds it (its container is running the request).
        await wait_for(
            lambda: "instance_ready" in first.log_text(),
            20,
            "the first worker to start an instance",
        )
        await asyncio.sleep(0.3)
        first.kill()
        assert not call.done()
        second = await p.add_worker()
        status, _headers, body = await asyncio.wait_for(call, 60)
        assert status == 200, body
        taken_over = "invocation_reclaimed" if backend == "redis" else "invocation_redelivered"
        assert taken_over in second.log_text()
        # The dead worker's container is removed by the survivor's janitor.
        await wait_for(
            lambda: not managed_containers([first.worker_id]), 30, "orphaned containers to go"
        )


async def test_containers_of_dead_workers_are_removed(
    platform: Platform, client: aiohttp.ClientSession
) -> None:
    dead = f"dead-{unique('w')}"
    cid = docker(
        "run",
        "-d",
        "--label",
        "imagefn.managed=1",
        "--label",
        f"imagefn.worker={dead}",
        "--label",
        "imagefn.function=ghost",
        "--label",
        f"imagefn.installation={platform.prefix}",
        TESTFN,
    ).stdout.strip()
    try:
        await wait_for(lambda: not managed_containers([dead]), 20, "the janitor")
    finally:
        docker("rm", "-f", cid, check=False)


async def test_idle_instances_are_removed_after_idle_ttl(
    platform: Platform, client: aiohttp.ClientSession
) -> None:
    name = unique("idle")
    await platform.deploy(client, name, idle_ttl_s=1)
    status, headers, _ = await platform.invoke(client, name, {})
    assert status == 200
    instance = headers["X-Imagefn-Instance"]

    def gone() -> bool:
        out = docker("ps", "-a", "--filter", f"label=imagefn.instance={instance}", "-q").stdout
        return not out.strip()

    assert not gone()
    await wait_for(gone, 15, "the idle instance to be removed")
    status, headers, _ = await platform.invoke(client, name, {})
    assert status == 200 and headers["X-Imagefn-Cold-Start"] == "true"


async def test_instance_killed_while_idle_is_replaced(
    platform: Platform, client: aiohttp.ClientSession
) -> None:
    name = unique("killed")
    await platform.deploy(client, name)
    _, headers, _ = await platform.invoke(client, name, {})
    instance = headers["X-Imagefn-Instance"]
    cid = docker("ps", "-q", "--filter", f"label=imagefn.instance={instance}").stdout.strip()
    docker("kill", cid)
    await asyncio.sleep(0.5)
    status, headers, body = await platform.invoke(client, name, {})
    assert status == 200, body
    assert headers["X-Imagefn-Instance"] != instance


async def test_every_instance_runs_in_the_sandbox(
    platform: Platform, client: aiohttp.ClientSession
) -> None:
    name = unique("sandbox")
    await platform.deploy(client, name, memory_mb=192, tmp_mb=64, cpus=0.5, env={"TEST_A": "1"})
    status, headers, body = await platform.invoke(client, name, {})
    assert status == 200
    assert body["tmp_writable"] is True
    assert body["root_writable"] is False
    instance = headers["X-Imagefn-Instance"]
    cid = docker("ps", "-q", "--filter", f"label=imagefn.instance={instance}").stdout.strip()
    info = json.loads(docker("inspect", cid).stdout)[0]
    host = info["HostConfig"]
    assert host["ReadonlyRootfs"] is True
    assert host["CapDrop"] == ["ALL"]
    assert "no-new-privileges" in host["SecurityOpt"]
    # The heap's 192 MiB plus /tmp's own 64 MiB (a tmpfs is memory), no swap.
    assert host["Memory"] == host["MemorySwap"] == (192 + 64) * 1024 * 1024
    assert host["NanoCpus"] == 500_000_000
    assert host["PidsLimit"] == 1024
    assert host["Tmpfs"] == {"/tmp": "rw,nosuid,nodev,size=64m"}
    assert host["NetworkMode"] == "imagefn-fn"
    assert not host.get("Binds")
    assert not info["Mounts"]
    assert host["Privileged"] is False
    bindings = info["NetworkSettings"]["Ports"]["9000/tcp"]
    assert bindings and all(b["HostIp"] == "127.0.0.1" for b in bindings)
    labels = info["Config"]["Labels"]
    assert labels["imagefn.function"] == name
    assert labels["imagefn.instance"] == instance
    assert labels["imagefn.worker"] == platform.workers[0].worker_id
    env = dict(e.split("=", 1) for e in info["Config"]["Env"])
    assert env["TEST_A"] == "1"
    # The image was pinned at deploy: instances run the resolved id, not the tag.
    async with client.get(f"{platform.url}/v1/functions/{name}") as resp:
        record = await resp.json()
    assert info["Config"]["Image"] == record["image_ref"]
    assert record["image_ref"].endswith("@" + record["image_digest"])


async def test_worker_logs_carry_request_id_function_and_instance(
    platform: Platform, client: aiohttp.ClientSession
) -> None:
    name = unique("logs")
    await platform.deploy(client, name)
    _, headers, _ = await platform.invoke(client, name, {})
    rid = headers["X-Request-Id"]
    await asyncio.sleep(0.2)
    lines = [
        json.loads(line)
        for line in platform.workers[0].log_text().splitlines()
        if line.startswith("{") and rid in line
    ]
    done = [entry for entry in lines if entry["event"] == "invocation_done"]
    assert done, lines
    assert done[0]["function"] == name
    assert done[0]["instance"] == headers["X-Imagefn-Instance"]


async def test_idle_instance_is_frozen_then_woken_in_place(
    platform: Platform, client: aiohttp.ClientSession
) -> None:
    name = unique("freeze")
    await platform.deploy(client, name)
    _, headers, body = await platform.invoke(client, name, {})
    instance = headers["X-Imagefn-Instance"]
    cid = docker("ps", "-q", "--filter", f"label=imagefn.instance={instance}").stdout.strip()

    def paused() -> bool:
        return docker("inspect", "-f", "{{.State.Paused}}", cid).stdout.strip() == "true"

    # The platform's default pause_after_s is 2 s.
    await wait_for(paused, 10, "the idle instance to be frozen")
    status, headers, body2 = await platform.invoke(client, name, {})
    assert status == 200
    assert headers["X-Imagefn-Instance"] == instance
    assert headers["X-Imagefn-Cold-Start"] == "false"
    assert "wake;dur=" in headers["Server-Timing"]
    assert body2["pid"] == body["pid"] and body2["count"] == body["count"] + 1
    assert not paused()
