"""gateway.capacity: a spec must fit the largest live worker; and the heartbeat field
that reports a worker's cores."""

from __future__ import annotations

import json

from gateway.capacity import Capacity, largest, spec_bound_errors
from shared.keys import Keys
from shared.messages import Heartbeat
from shared.spec import FunctionSpec, parse_spec

from .conftest import EVENT_SPEC, GATEWAY_SETTINGS, Gateway


def spec(**fields: object) -> FunctionSpec:
    return parse_spec({"name": "f", "image": "repo/f:1", **fields})


def test_a_spec_within_the_largest_worker_passes() -> None:
    cap = Capacity(cpus=4, memory_mb=4096)
    assert spec_bound_errors(spec(cpus=4, memory_mb=3584, tmp_mb=512), cap) == {}


def test_too_many_cpus_names_the_field_and_the_limit() -> None:
    errors = spec_bound_errors(spec(cpus=8), Capacity(cpus=2, memory_mb=None))
    assert list(errors) == ["cpus"]
    assert "2 CPU cores" in errors["cpus"]


def test_memory_counts_tmp_too() -> None:
    cap = Capacity(cpus=None, memory_mb=1024)
    errors = spec_bound_errors(spec(memory_mb=768, tmp_mb=512), cap)
    assert list(errors) == ["tmp_mb"]
    assert "1280 MiB" in errors["tmp_mb"] and "1024 MiB" in errors["tmp_mb"]
    errors = spec_bound_errors(spec(memory_mb=2048), cap)
    assert list(errors) == ["memory_mb"]


def test_with_no_report_anything_goes() -> None:
    assert spec_bound_errors(spec(cpus=16, memory_mb=16384), Capacity()) == {}


def test_largest_takes_each_maximum_and_skips_unreported() -> None:
    beats = [
        Heartbeat(worker="a", cpus_capacity=2, memory_capacity_mb=8192),
        Heartbeat(worker="b", cpus_capacity=8, memory_capacity_mb=4096),
        Heartbeat(worker="old"),
    ]
    assert largest(beats) == Capacity(cpus=8, memory_mb=8192)
    assert largest([Heartbeat(worker="old")]) == Capacity()
    assert largest([]) == Capacity()


def test_heartbeat_carries_cpus_and_stays_readable_both_ways() -> None:
    beat = Heartbeat(worker="w", cpus_capacity=4, memory_capacity_mb=1024)
    assert Heartbeat.decode(beat.encode()).cpus_capacity == 4
    # An older worker's heartbeat (no field) decodes as "not reported"...
    old = json.dumps({"worker": "w", "ts": 1.0, "draining": False, "functions": {}})
    assert Heartbeat.decode(old).cpus_capacity is None
    # ...and one without the value writes nothing new (older readers see what they knew).
    assert "cpus_capacity" not in Heartbeat(worker="w").encode()


async def test_deploy_refuses_a_spec_too_big_for_every_live_worker(gw: Gateway) -> None:
    keys = Keys(GATEWAY_SETTINGS.queue.prefix)
    beat = Heartbeat(worker="w1", cpus_capacity=2, memory_capacity_mb=2048)
    await gw.redis.set(keys.worker_heartbeat("w1"), beat.encode())
    await gw.redis.zadd(keys.workers_index, {"w1": 1.0})
    resp = await gw.client.put(
        "/v1/functions/big", json={**EVENT_SPEC, "name": "big", "cpus": 4, "memory_mb": 4096}
    )
    assert resp.status == 400
    err = (await resp.json())["error"]
    assert err["type"] == "InvalidSpec"
    assert set(err["fields"]) == {"cpus", "memory_mb"}
    # Within bounds: deployed.
    await gw.deploy({**EVENT_SPEC, "name": "fits", "cpus": 2, "memory_mb": 1024})
