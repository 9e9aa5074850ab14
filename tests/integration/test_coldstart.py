"""Provisioned concurrency through the cold-start manager: instances ready before traffic,
replaced when killed, and one acting manager at a time."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import aiohttp

from tests.integration.conftest import RegistryInfo, docker, running_platform, unique, wait_for


def running(function: str) -> list[str]:
    out = docker("ps", "-q", "--filter", f"label=imagefn.function={function}").stdout
    return out.split()


def ready_by_http(function: str) -> int:
    """Containers of the function that answer on their published port."""
    count = 0
    for cid in running(function):
        info = json.loads(docker("inspect", cid).stdout)[0]
        if info["State"]["Running"] and not info["State"]["Paused"]:
            count += 1
    return count


async def test_provisioned_instances_are_ready_before_traffic_and_come_back(
    redis_url: str,
    log_dir: Path,
    registry: RegistryInfo,
    pushed_images: None,
    client: aiohttp.ClientSession,
) -> None:
    async with running_platform(redis_url, log_dir, registry, workers=1) as p:
        manager = await p.add_coldstart()
        name = unique("prov")
        await p.deploy(client, name, provisioned_concurrency=3, max_instances=5, timeout_s=10)
        await wait_for(lambda: ready_by_http(name) == 3, 60, "3 provisioned instances")
        await asyncio.sleep(1.0)  # let them finish starting
        results = await asyncio.gather(*(p.invoke(client, name, {"sleep": 0.3}) for _ in range(3)))
        assert [s for s, _, _ in results] == [200, 200, 200]
        assert [h["X-Imagefn-Cold-Start"] for _, h, _ in results] == ["false"] * 3
        assert len({h["X-Imagefn-Instance"] for _, h, _ in results}) == 3

        victim = running(name)[0]
        docker("kill", victim)
        await wait_for(
            lambda: victim not in running(name) and ready_by_http(name) == 3,
            60,
            "the killed provisioned instance to be replaced",
        )
        assert "coldstart_sent" in manager.log_text()


async def test_only_one_manager_acts_and_another_takes_over(
    redis_url: str,
    log_dir: Path,
    registry: RegistryInfo,
    pushed_images: None,
    client: aiohttp.ClientSession,
) -> None:
    async with running_platform(redis_url, log_dir, registry, workers=1) as p:
        first = await p.add_coldstart()
        second = await p.add_coldstart()

        def leader(m: object) -> bool:
            text = m.log_text()  # type: ignore[attr-defined]
            # Whatever the JSON renderer's spacing.
            return re.search(r'"leader":\s*true', text) is not None

        await wait_for(lambda: leader(first) or leader(second), 15, "a leader")
        await asyncio.sleep(2)
        assert leader(first) != leader(second), "exactly one manager holds the lease"
        acting, standby = (first, second) if leader(first) else (second, first)
        acting.kill()
        await wait_for(lambda: leader(standby), 15, "the standby to take over")
        # It acts: a new function's provisioned instance appears.
        name = unique("takeover")
        await p.deploy(client, name, provisioned_concurrency=1)
        await wait_for(lambda: ready_by_http(name) == 1, 60, "the provisioned instance")


async def test_three_workers_provisioned_calls_find_warm_instances_and_survive_a_sigkill(
    redis_url: str,
    log_dir: Path,
    registry: RegistryInfo,
    pushed_images: None,
    client: aiohttp.ClientSession,
) -> None:
    async with running_platform(redis_url, log_dir, registry, workers=3) as p:
        await p.add_coldstart()
        name = unique("spread")
        await p.deploy(client, name, provisioned_concurrency=3, max_instances=4, timeout_s=20)
        await wait_for(lambda: ready_by_http(name) == 3, 60, "3 provisioned instances")
        await asyncio.sleep(1.5)  # heartbeats carry the ready instances to the gateway
        # Spread over the workers, and the first calls are routed to them: no cold start.
        workers = {
            json.loads(docker("inspect", c).stdout)[0]["Config"]["Labels"]["imagefn.worker"]
            for c in running(name)
        }
        assert len(workers) == 3
        results = await asyncio.gather(*(p.invoke(client, name, {"sleep": 0.3}) for _ in range(3)))
        assert [s for s, _, _ in results] == [200, 200, 200]
        assert [h["X-Imagefn-Cold-Start"] for _, h, _ in results] == ["false"] * 3

        # SIGKILL one worker under load: every call ends in a result or a clear error.
        victim = p.workers[0]
        calls = [asyncio.create_task(p.invoke(client, name, {"sleep": 1})) for _ in range(6)]
        await asyncio.sleep(0.5)
        victim.kill()
        outcomes = await asyncio.wait_for(asyncio.gather(*calls), 90)
        for status, headers, body in outcomes:
            assert status == 200 or "X-Scf-Error-Type" in headers, (status, body)
        # The provisioned count is restored on the survivors, and nothing of the dead
        # worker survives.
        await wait_for(
            lambda: (
                ready_by_http(name) >= 3
                and not [
                    c
                    for c in running(name)
                    if victim.worker_id
                    in docker("inspect", "-f", "{{json .Config.Labels}}", c).stdout
                ]
            ),
            60,
            "provisioned instances back on the live workers",
        )


async def test_manager_has_workers_prepull_deployed_images(
    redis_url: str,
    log_dir: Path,
    registry: RegistryInfo,
    pushed_images: None,
    client: aiohttp.ClientSession,
) -> None:
    from tests.integration.test_images import push_variant

    async with running_platform(redis_url, log_dir, registry, workers=1) as p:
        await p.add_coldstart()
        name = unique("prepull")
        repo = f"it/{name}"
        await push_variant(registry, repo, "prepull")
        record = await p.deploy(client, name, image=f"{repo}:latest")

        def present() -> bool:
            return docker("image", "inspect", record["image_ref"], check=False).returncode == 0

        await wait_for(present, 60, "the worker to pre-pull the new image")
        status, headers, _ = await p.invoke(client, name, {})
        assert status == 200
        assert "pull;dur=" not in headers["Server-Timing"]
