"""The function network, tried from inside running functions (deploy/network.sh): what an
instance can reach and what it cannot, with and without egress; and its /tmp budget.

Every "cannot reach" has a control showing the same target is reachable where it
should be (from the host, or with egress), so that a probe that could never succeed
cannot pass for a firewall. "The outside" is a network namespace made here, routed
through the host like any machine beyond it, with one public and one private address.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest

from shared.settings_security import NetworkSettings
from tests.credentials import ADMIN_HEADERS, TEST_ADMIN_KEY
from tests.integration.conftest import (
    KAFKA,
    Platform,
    RegistryInfo,
    docker,
    managed_containers,
    running_platform,
    unique,
)

NETWORKS = NetworkSettings()
CONNECT_TIMEOUT_S = 1.5


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=check, timeout=30)


def host_addresses() -> list[str]:
    """Every IPv4 address of this machine but loopback: docker0, the function bridges'
    gateways, eth0, ... all of them local, so traffic to them goes to INPUT."""
    out = run("ip", "-4", "-o", "addr", "show").stdout
    addrs = {line.split()[3].split("/")[0] for line in out.splitlines()}
    return sorted(a for a in addrs if not a.startswith("127."))


def can_connect(host: str, port: int, timeout_s: float = CONNECT_TIMEOUT_S) -> bool:
    try:
        socket.create_connection((host, port), timeout_s).close()
    except OSError:
        return False
    return True


@dataclass
class Outside:
    """A machine beyond the host: listeners on a public and a private address."""

    public: str
    private: str
    port: int


LISTENER = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(128)
print("listening", flush=True)
while True:
    s.accept()[0].close()
"""


@pytest.fixture(scope="module")
def outside() -> Iterator[Outside]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.fail("this test needs root and iproute2 (deploy/test.sh runs as root)")
    tag = uuid.uuid4().hex[:6]
    ns, host_if, ns_if = f"imagefn-it-{tag}", f"ifo{tag}h", f"ifo{tag}o"
    # TEST-NET-2 (public as far as the rules know) and a private range, each a /30
    # picked at random so that two sessions on one machine do not collide.
    k = random.randrange(1, 63)
    pub_host, pub_ns = f"198.51.100.{4 * k + 1}", f"198.51.100.{4 * k + 2}"
    priv_ns = f"10.213.{random.randrange(256)}.{4 * k + 2}"
    port = 18000 + random.randrange(1000)
    proc: subprocess.Popen[str] | None = None
    run("ip", "netns", "add", ns)
    try:
        run("ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if, "netns", ns)
        run("ip", "addr", "add", f"{pub_host}/30", "dev", host_if)
        run("ip", "link", "set", host_if, "up")
        run("ip", "route", "add", f"{priv_ns}/32", "dev", host_if)
        for cmd in (
            ("addr", "add", f"{pub_ns}/30", "dev", ns_if),
            ("addr", "add", f"{priv_ns}/32", "dev", ns_if),
            ("link", "set", ns_if, "up"),
            ("link", "set", "lo", "up"),
            ("route", "add", "default", "via", pub_host),
        ):
            run("ip", "-n", ns, *cmd)
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-c", LISTENER, str(port)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None and proc.stdout.readline().strip() == "listening"
        # Controls: the host reaches both (it routes to them; the rules are about
        # what function bridges forward).
        assert can_connect(pub_ns, port) and can_connect(priv_ns, port)
        yield Outside(public=pub_ns, private=priv_ns, port=port)
    finally:
        if proc is not None:
            proc.kill()
            proc.wait(10)
        run("ip", "link", "del", host_if, check=False)
        run("ip", "netns", "del", ns, check=False)


@pytest.fixture(scope="module")
def host_listener() -> Iterator[int]:
    """A port open on every address of the host (0.0.0.0), as a service that binds
    carelessly would be."""
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen(128)
        port = int(s.getsockname()[1])
        for addr in host_addresses():
            assert can_connect(addr, port), f"control: the host cannot reach {addr}:{port}"
        yield port


def containers_of(function: str) -> list[dict[str, Any]]:
    ids = docker(
        "ps", "-q", "--filter", f"label=imagefn.function={function}", "--no-trunc"
    ).stdout.split()
    return [json.loads(docker("inspect", cid).stdout)[0] for cid in ids]


def network_of(function: str) -> tuple[str, str]:
    """(network name, IP address) of the function's one running instance."""
    [c] = containers_of(function)
    [(name, net)] = c["NetworkSettings"]["Networks"].items()
    return name, net["IPAddress"]


def port_of(url: str) -> int:
    return int(urlsplit(url if "://" in url else f"tcp://{url}").port or 0)


def platform_ports(platform: Platform, registry: RegistryInfo) -> list[int]:
    """The platform's services: this test platform's (Redis, registry, broker, gateway)
    and the machine's own (Redis 6379, registry 5000, broker 9092, gateway 8080)."""
    ports = {
        port_of(platform.env["IMAGEFN_REDIS_URL"]),
        port_of(registry.address),
        port_of(KAFKA["bootstrap"]),
        port_of(platform.url),
        6379,
        5000,
        9092,
        8080,
    }
    return sorted(ports)


async def probe(
    platform: Platform, client: aiohttp.ClientSession, function: str, targets: list[tuple[str, int]]
) -> dict[tuple[str, int], dict[str, Any]]:
    event = {
        "connect": [{"host": h, "port": p, "timeout_s": CONNECT_TIMEOUT_S} for h, p in targets]
    }
    status, _, body = await platform.invoke(client, function, event)
    assert status == 200, body
    return {(r["host"], r["port"]): r for r in body["connect"]}


@pytest.fixture(scope="module")
async def platform(
    pushed_images: None, redis_url: str, log_dir: Path, registry: RegistryInfo
) -> AsyncIterator[Platform]:
    """A platform of this module's own (one worker), its gateway with the test admin key."""
    env = {"IMAGEFN_ADMIN_KEY": TEST_ADMIN_KEY}
    async with running_platform(redis_url, log_dir, registry, extra_env=env) as p:
        yield p
    left = managed_containers([w.worker_id for w in p.workers])
    assert not left, f"containers left behind: {left}"


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout, headers=ADMIN_HEADERS) as s:
        yield s


@pytest.fixture(scope="module")
async def functions(platform: Platform) -> dict[str, str]:
    """Three functions: two with egress (one the other's target), one without."""
    names = {"a": unique("net-a"), "b": unique("net-b"), "closed": unique("net-closed")}
    async with aiohttp.ClientSession(headers=ADMIN_HEADERS) as client:
        for key, name in names.items():
            await platform.deploy(client, name, timeout_s=30, memory_mb=128, egress=key != "closed")
            # Started now, so that each has a running instance with an address.
            status, _, body = await platform.invoke(client, name, {})
            assert status == 200, body
    return names


async def test_instances_run_on_the_function_networks(functions: dict[str, str]) -> None:
    assert network_of(functions["a"])[0] == NETWORKS.network
    assert network_of(functions["b"])[0] == NETWORKS.network
    assert network_of(functions["closed"])[0] == NETWORKS.network_no_egress
    # Inter-container traffic is off on both, and they are bridges a rule can name.
    for name in (NETWORKS.network, NETWORKS.network_no_egress):
        options = json.loads(docker("network", "inspect", "-f", "{{json .Options}}", name).stdout)
        assert options["com.docker.network.bridge.enable_icc"] == "false"
        assert options["com.docker.network.bridge.name"]


async def test_an_instance_cannot_reach_another_functions_instance(
    platform: Platform, client: aiohttp.ClientSession, functions: dict[str, str]
) -> None:
    _, b_ip = network_of(functions["b"])
    _, closed_ip = network_of(functions["closed"])
    # Controls: both serve on their address, as the host sees it.
    assert can_connect(b_ip, 9000) and can_connect(closed_ip, 9000)
    for source, target in (("a", b_ip), ("closed", b_ip), ("a", closed_ip)):
        [result] = (await probe(platform, client, functions[source], [(target, 9000)])).values()
        assert not result["ok"], (source, result)


async def test_an_instance_cannot_reach_the_host_nor_the_platforms_services(
    platform: Platform,
    registry: RegistryInfo,
    client: aiohttp.ClientSession,
    functions: dict[str, str],
    host_listener: int,
) -> None:
    addrs = host_addresses()
    _, a_ip = network_of(functions["a"])
    gateway_ip = a_ip.rsplit(".", 1)[0] + ".1"  # the bridge's own address on the host
    assert gateway_ip in addrs
    targets = [
        (addr, port)
        for addr in addrs
        for port in [host_listener, *platform_ports(platform, registry)]
    ]
    for key in ("a", "closed"):
        results = await probe(platform, client, functions[key], targets)
        reached = [t for t, r in results.items() if r["ok"]]
        assert reached == [], f"{key} reached {reached}"
        # Dropped, not refused: the listener on 0.0.0.0 is there (control above), so
        # only the firewall explains the silence.
        for addr in addrs:
            assert results[(addr, host_listener)]["error"] == "timeout", results[
                (addr, host_listener)
            ]


async def test_egress_reaches_the_outside_but_no_private_range(
    platform: Platform,
    client: aiohttp.ClientSession,
    functions: dict[str, str],
    outside: Outside,
) -> None:
    public, private = (outside.public, outside.port), (outside.private, outside.port)
    results = await probe(platform, client, functions["a"], [public, private])
    assert results[public]["ok"], results[public]
    assert not results[private]["ok"] and results[private]["error"] == "timeout"


async def test_without_egress_nothing_outside_is_reachable(
    platform: Platform,
    client: aiohttp.ClientSession,
    functions: dict[str, str],
    outside: Outside,
) -> None:
    public, private = (outside.public, outside.port), (outside.private, outside.port)
    results = await probe(platform, client, functions["closed"], [public, private])
    assert not results[public]["ok"] and not results[private]["ok"], results
    # Its published port still works: the invocation itself went through it.


async def test_names_resolve_with_egress(
    platform: Platform, client: aiohttp.ClientSession, functions: dict[str, str]
) -> None:
    """The engine's embedded DNS (127.0.0.11) forwards to the host's resolvers, which the
    rules let through. Only meaningful where the host itself reaches the internet."""
    name = "deb.debian.org"
    if not can_connect(name, 80, 5.0):
        pytest.skip(f"this machine cannot reach {name}:80 itself")
    results = await probe(platform, client, functions["a"], [(name, 80)])
    assert results[(name, 80)]["ok"], results


async def test_tmp_has_its_own_budget_beyond_memory(
    platform: Platform, client: aiohttp.ClientSession
) -> None:
    name = unique("tmp")
    await platform.deploy(client, name, memory_mb=64, tmp_mb=128, timeout_s=30)
    # More than memory_mb into /tmp: the heap's 64 MB are not what /tmp uses.
    status, _, body = await platform.invoke(client, name, {"write_tmp_mb": 100})
    assert status == 200, body
    assert body["write_tmp"] == {"written_mb": 100, "error": None}
    # And no more than tmp_mb: the file system is full, the instance lives on.
    status, headers, body = await platform.invoke(client, name, {"write_tmp_mb": 200})
    assert status == 200, body
    assert body["write_tmp"]["error"] == "ENOSPC"
    assert 100 <= body["write_tmp"]["written_mb"] <= 128
    status2, headers2, _ = await platform.invoke(client, name, {})
    assert status2 == 200
    assert headers2["X-Imagefn-Instance"] == headers["X-Imagefn-Instance"]
    [c] = containers_of(name)
    assert c["HostConfig"]["Memory"] == (64 + 128) * 1024 * 1024
    assert c["HostConfig"]["Tmpfs"]["/tmp"].endswith("size=128m")
