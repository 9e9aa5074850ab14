"""An instance's life against the real engine: a deleted function's (or an old
version's) idle and frozen instances go within seconds, and ``freeze_idle`` decides
whether an idle instance's background threads keep running."""

from __future__ import annotations

import asyncio
import time

import aiohttp

from tests.integration.conftest import Platform, docker, unique, wait_for

# The bound the platform promises for retiring what a delete (or a $LATEST move) left
# unreachable: a heartbeat (0.5 s here, 2 s by default), the 1 s grace after last use,
# then the container's stop.
RETIRED_WITHIN_S = 5.0


def containers(label: str) -> list[str]:
    out = docker("ps", "-a", "-q", "--filter", f"label={label}").stdout
    return out.split()


def paused(cid: str) -> bool:
    return docker("inspect", "-f", "{{.State.Paused}}", cid).stdout.strip() == "true"


def ticks(cid: str) -> int:
    """How many "tick N" lines the instance's background thread has written."""
    out = docker("logs", cid).stdout
    return sum(1 for line in out.splitlines() if line.startswith("tick "))


async def instance_of(platform: Platform, client: aiohttp.ClientSession, name: str) -> str:
    status, headers, body = await platform.invoke(client, name, {})
    assert status == 200, body
    [cid] = containers(f"imagefn.instance={headers['X-Imagefn-Instance']}")
    return cid


async def test_a_deleted_functions_idle_and_frozen_instances_go_within_seconds(
    platform: Platform, client: aiohttp.ClientSession
) -> None:
    idle, frozen = unique("del-idle"), unique("del-frozen")
    # A long idle TTL: only the delete can explain their going.
    await platform.deploy(client, idle, idle_ttl_s=600, freeze_idle=False)
    await platform.deploy(client, frozen, idle_ttl_s=600)
    await instance_of(platform, client, idle)
    frozen_cid = await instance_of(platform, client, frozen)
    await wait_for(lambda: paused(frozen_cid), 10, "the idle instance to be frozen")
    for name in (idle, frozen):
        async with client.delete(f"{platform.url}/v1/functions/{name}") as resp:
            assert resp.status in (200, 204), await resp.text()
    deleted_at = time.monotonic()
    await wait_for(
        lambda: (
            not containers(f"imagefn.function={idle}")
            and not containers(f"imagefn.function={frozen}")
        ),
        RETIRED_WITHIN_S,
        f"the deleted functions' instances to go within {RETIRED_WITHIN_S} s",
    )
    assert time.monotonic() - deleted_at < RETIRED_WITHIN_S


async def test_moving_latest_retires_the_old_versions_idle_instance(
    platform: Platform, client: aiohttp.ClientSession
) -> None:
    name = unique("moved")
    await platform.deploy(client, name, idle_ttl_s=600, env={"TEST_V": "1"})
    old = await instance_of(platform, client, name)
    await platform.deploy(client, name, idle_ttl_s=600, env={"TEST_V": "2"})
    await wait_for(
        lambda: old not in containers(f"imagefn.function={name}"),
        RETIRED_WITHIN_S,
        "the old version's instance to go",
    )
    status, _headers, body = await platform.invoke(client, name, {})
    assert status == 200 and body["env"]["TEST_V"] == "2"


async def test_with_freeze_idle_false_a_background_thread_keeps_running_while_idle(
    platform: Platform, client: aiohttp.ClientSession
) -> None:
    name = unique("nofreeze")
    await platform.deploy(client, name, freeze_idle=False, env={"TESTFN_TICK_S": "0.1"})
    cid = await instance_of(platform, client, name)
    # Past the platform's pause_after_s (2 s): an ordinary instance would be frozen now.
    await asyncio.sleep(3.0)
    assert not paused(cid)
    before = ticks(cid)
    await asyncio.sleep(1.0)
    after = ticks(cid)
    assert not paused(cid)
    assert after - before >= 5, (before, after)


async def test_with_freeze_idle_a_background_thread_stops_while_frozen(
    platform: Platform, client: aiohttp.ClientSession
) -> None:
    name = unique("freezes")
    await platform.deploy(client, name, env={"TESTFN_TICK_S": "0.1"})
    cid = await instance_of(platform, client, name)
    await wait_for(lambda: paused(cid), 10, "the idle instance to be frozen")
    before = ticks(cid)
    await asyncio.sleep(1.0)
    assert paused(cid) and ticks(cid) == before
    # Woken by the next call, the thread goes on where it stopped.
    status, headers, _ = await platform.invoke(client, name, {})
    assert status == 200 and headers["X-Imagefn-Cold-Start"] == "false"
    await wait_for(lambda: ticks(cid) > before, 5, "the thread to run again")
