"""The model-inference example (examples/inference) deployed from its own function.yaml
on a platform with a cold-start manager: its provisioned instance is up before the first
call, that one instance answers concurrent predictions correctly (instance_concurrency),
and bad input gets the app's 400 naming the problem."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis
import yaml

from shared.keys import Keys
from tests.integration.conftest import (
    REPO,
    RegistryInfo,
    docker,
    running_platform,
    unique,
    wait_for,
)
from tests.integration.test_coldstart import running

EXAMPLE = REPO / "examples/inference"
# Iris samples 0, 50 and 100 (sepal length, sepal width, petal length, petal width in cm),
# one of each species, and far from the boundaries between them.
KNOWN = {
    "setosa": [5.1, 3.5, 1.4, 0.2],
    "versicolor": [7.0, 3.2, 4.7, 1.4],
    "virginica": [6.3, 3.3, 6.0, 2.5],
}
ROWS = list(KNOWN.values()) * 333  # 999 rows: each call keeps the instance busy a while
EXPECTED = list(KNOWN) * 333
CALLS = 8


def example_spec() -> dict[str, Any]:
    """The example's function.yaml as the API takes it (`build` is for the CLI only)."""
    spec: dict[str, Any] = yaml.safe_load((EXAMPLE / "function.yaml").read_text())
    spec.pop("build")
    spec.pop("name")  # deployed under a name of the test's own
    return spec


async def warm_instances(redis_url: str, prefix: str, function: str) -> int:
    """Instances of ``function`` that the workers' heartbeats show ready or frozen."""
    r = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        count = 0
        async for key in r.scan_iter(f"{Keys(prefix).worker_heartbeat('')}*"):
            raw = await r.get(key)
            try:
                beat = json.loads(raw or "{}")
            except ValueError:
                continue
            for fn, inv in (beat.get("functions") or {}).items():
                if fn.startswith(f"{function}@"):
                    count += int(inv.get("ready", 0)) + int(inv.get("paused", 0))
        return count
    finally:
        await r.aclose()


def instance_label(container: str) -> str:
    out = docker("inspect", "-f", '{{index .Config.Labels "imagefn.instance"}}', container)
    return out.stdout.strip()


async def test_inference_example_provisioned_concurrent_and_bad_input(
    redis_url: str,
    log_dir: Path,
    registry: RegistryInfo,
    pushed_images: None,
    client: aiohttp.ClientSession,
) -> None:
    spec = example_spec()
    assert spec["instance_concurrency"] > 1 and spec["provisioned_concurrency"] == 1
    async with running_platform(redis_url, log_dir, registry, workers=1) as p:
        await p.add_coldstart()
        name = unique("inference")
        await p.deploy(client, name, **spec)
        base = f"{p.url}/web/{name}"

        # Provisioned: the instance starts without any call.
        await wait_for(lambda: len(running(name)) == 1, 90, "the provisioned instance")
        [container] = running(name)
        # Running is not ready: loading scikit-learn takes a while on a busy machine. Wait
        # until the worker's heartbeat, which the gateway routes by, shows it ready.
        deadline = asyncio.get_running_loop().time() + 90
        while await warm_instances(redis_url, p.prefix, name) < 1:
            assert asyncio.get_running_loop().time() < deadline, "never ready"
            await asyncio.sleep(0.2)
        await asyncio.sleep(1)  # the gateway reads heartbeats every 0.5 s
        async with client.get(f"{base}/") as resp:
            assert resp.status == 200, await resp.text()
            info = await resp.json()
            assert resp.headers["X-Imagefn-Cold-Start"] == "false"
            instance = resp.headers["X-Imagefn-Instance"]
        assert instance == instance_label(container)
        assert info["classes"] == ["setosa", "versicolor", "virginica"]
        assert info["accuracy"]["test"] >= 0.9

        async def predict() -> tuple[str, str]:
            async with client.post(f"{base}/predict", json={"instances": ROWS}) as resp:
                assert resp.status == 200, await resp.text()
                body = await resp.json()
            assert body["predictions"] == EXPECTED
            assert body["request_id"] == resp.headers["X-Request-Id"]
            assert resp.headers["X-Imagefn-Cold-Start"] == "false"
            return resp.headers["X-Imagefn-Instance"], resp.headers["X-Request-Id"]

        # Concurrent calls all go to the one instance (max_instances would allow more),
        # which served several of them at the same moment. A burst whose calls happened
        # not to overlap there proves nothing either way: try another.
        request_ids: list[str] = []
        for _ in range(3):
            results = await asyncio.gather(*(predict() for _ in range(CALLS)))
            assert {inst for inst, _ in results} == {instance}
            request_ids += [rid for _, rid in results]
            async with client.get(f"{base}/") as resp:
                served = (await resp.json())["requests"]
            if served["peak_in_flight"] > 1:
                break
        assert served["peak_in_flight"] > 1, served
        assert running(name) == [container]

        # Bad input: the app's own 400 (not a platform error) says what is wrong.
        bad: list[tuple[bytes, str]] = [
            (b"{not json", "not valid JSON"),
            (json.dumps({"instances": [[5.1, 3.5, 1.4]]}).encode(), "instances[0] has 3 features"),
            (json.dumps({"instances": [[5.1, "x", 1.4, 0.2]]}).encode(), "instances[0][1]"),
            (json.dumps({"instances": [KNOWN["setosa"]] * 1001}).encode(), "too many instances"),
        ]
        for payload, problem in bad:
            async with client.post(
                f"{base}/predict", data=payload, headers={"Content-Type": "application/json"}
            ) as resp:
                assert resp.status == 400, (payload[:60], await resp.text())
                assert "X-Scf-Error-Type" not in resp.headers
                assert problem in (await resp.json())["error"]

        # One log line per request, with the platform's request id.
        logs = docker("logs", container).stdout
        assert all(f'{rid} "POST /predict' in logs for rid in request_ids)
