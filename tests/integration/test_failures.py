"""Every way an instance can fail gets the contract's error type, with the logs to see why."""

from __future__ import annotations

import time

import aiohttp
import pytest

from tests.integration.conftest import Platform, unique


@pytest.fixture
def platform(queue_platform: Platform) -> Platform:
    """Every test here runs on each queue backend (redis, kafka)."""
    return queue_platform


async def test_timeout_gives_function_timeout_and_replaces_the_instance(
    platform: Platform, client: aiohttp.ClientSession
) -> None:
    name = unique("slow")
    await platform.deploy(client, name, timeout_s=1)
    _, first, _ = await platform.invoke(client, name, {})
    started = time.monotonic()
    status, headers, body = await platform.invoke(client, name, {"sleep": 5})
    assert time.monotonic() - started < 4
    assert status == 504
    assert headers["X-Scf-Error-Type"] == "FunctionTimeout"
    assert body["error"]["code"] == 433
    status, headers, _ = await platform.invoke(client, name, {})
    assert status == 200
    assert headers["X-Imagefn-Instance"] != first["X-Imagefn-Instance"]
    assert headers["X-Imagefn-Cold-Start"] == "true"


async def test_process_exit_mid_request_gives_user_process_exited(
    platform: Platform, client: aiohttp.ClientSession
) -> None:
    name = unique("crash")
    await platform.deploy(client, name)
    status, headers, body = await platform.invoke(client, name, {"exit": 3})
    assert status == 502
    assert headers["X-Scf-Error-Type"] == "UserProcessExited"
    assert body["error"]["exit_code"] == 3
    assert any("exiting" in line or "exit" in line for line in body["error"]["logs"])
    status, _, body = await platform.invoke(client, name, {})
    assert status == 200, body


async def test_bad_command_gives_container_init_error(
    platform: Platform, client: aiohttp.ClientSession
) -> None:
    name = unique("badcmd")
    await platform.deploy(client, name, command=["/no/such/binary"])
    status, headers, body = await platform.invoke(client, name, {})
    assert status == 502
    assert headers["X-Scf-Error-Type"] == "ContainerInitError"
    assert "/no/such/binary" in body["error"]["message"]


async def test_exit_at_start_gives_user_process_exited_with_logs(
    platform: Platform, client: aiohttp.ClientSession
) -> None:
    name = unique("boom")
    await platform.deploy(client, name, args=["exit-at-start", "7"])
    status, headers, body = await platform.invoke(client, name, {})
    assert status == 502
    assert headers["X-Scf-Error-Type"] == "UserProcessExited"
    assert body["error"]["exit_code"] == 7
    assert "boom" in "\n".join(body["error"]["logs"])


async def test_server_that_never_listens_fails_within_init_timeout(
    platform: Platform, client: aiohttp.ClientSession
) -> None:
    name = unique("mute")
    await platform.deploy(client, name, args=["never-listen"], init_timeout_s=2)
    started = time.monotonic()
    status, headers, body = await platform.invoke(client, name, {})
    elapsed = time.monotonic() - started
    assert status == 504
    assert headers["X-Scf-Error-Type"] == "InitContainerTimeout"
    assert "port 9000" in body["error"]["message"]
    assert 2 <= elapsed < 6


async def test_server_on_localhost_gives_port_binding_failed(
    platform: Platform, client: aiohttp.ClientSession
) -> None:
    name = unique("lo")
    await platform.deploy(client, name, args=["listen-localhost"], init_timeout_s=2)
    status, headers, body = await platform.invoke(client, name, {})
    assert status == 502
    assert headers["X-Scf-Error-Type"] == "PortBindingFailed"
    assert "127.0.0.1:9000" in body["error"]["listening"]


async def test_oversized_result_gives_result_too_large(
    platform: Platform, client: aiohttp.ClientSession
) -> None:
    name = unique("big")
    await platform.deploy(client, name, timeout_s=10)
    status, headers, _ = await platform.invoke(client, name, {"size": 7 * 1024 * 1024})
    assert status == 502
    assert headers["X-Scf-Error-Type"] == "ResultTooLarge"
