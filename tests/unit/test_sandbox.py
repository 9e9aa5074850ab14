"""workers.sandbox: the image a worker runs, the network and the memory of an instance;
and how the pool, the image store and the worker apply them."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
from structlog.testing import capture_logs

from shared.errors import PullImageFailed, ServiceUnavailable
from shared.queue.memory import MemoryQueue
from shared.settings_security import NetworkSettings
from shared.spec import FunctionRecord
from workers.runtime import ContainerConfig, MiB
from workers.sandbox import check_image, network_for, require_networks, reserved_mb
from workers.worker import Worker

from .conftest import FAST_WORKER, PoolKit
from .fakes import FakeRedis, FakeRuntime, fake_digest
from .helpers import REGISTRY, eventually, make_invocation, make_record, make_spec
from .test_worker import SETTINGS

DIGEST = fake_digest("content")
PINNED = f"{REGISTRY}/team/app@{DIGEST}"


# -- the image check ---------------------------------------------------------------------


def test_a_platform_image_pinned_by_digest_is_accepted() -> None:
    check_image(PINNED, REGISTRY)
    check_image(PINNED, REGISTRY, DIGEST)


@pytest.mark.parametrize(
    ("image_ref", "why"),
    [
        (f"docker.io/team/app@{DIGEST}", "not in the platform registry"),
        (f"evil.example:5000/team/app@{DIGEST}", "not in the platform registry"),
        # No host: the engine would look it up on Docker Hub, not in the platform registry.
        (f"team/app@{DIGEST}", "not in the platform registry"),
        (f"{REGISTRY}/team/app:1", "not pinned by digest"),
        (f"{REGISTRY}/team/app", "not pinned by digest"),
        (f"{REGISTRY}/team/app:1@{DIGEST}", "tag besides its digest"),
        (f"{REGISTRY}/team/app@sha256:{'a' * 63}", "not a valid image reference"),
        (f"{REGISTRY}/Team/App@{DIGEST}", "not a valid image reference"),
        ("", "not a valid image reference"),
    ],
)
def test_anything_else_is_refused_with_the_reason_and_a_log_line(image_ref: str, why: str) -> None:
    with capture_logs() as logs, pytest.raises(PullImageFailed) as err:
        check_image(image_ref, REGISTRY)
    assert why in err.value.message
    assert f"platform registry {REGISTRY}" in err.value.message
    assert [e["event"] for e in logs] == ["image_refused"]
    assert logs[0]["image"] == image_ref and why in logs[0]["reason"]


def test_a_digest_other_than_the_versions_is_refused() -> None:
    with pytest.raises(PullImageFailed, match="not the version's"):
        check_image(PINNED, REGISTRY, fake_digest("other"))


# -- network and memory ------------------------------------------------------------------


def test_egress_chooses_the_network() -> None:
    nets = NetworkSettings(network="with-egress", network_no_egress="without")
    assert network_for(make_spec(), nets) == "with-egress"
    assert network_for(make_spec(egress=True), nets) == "with-egress"
    assert network_for(make_spec(egress=False), nets) == "without"


def test_the_worker_reserves_memory_and_tmp() -> None:
    assert reserved_mb(make_spec(memory_mb=256, tmp_mb=64)) == 320
    assert reserved_mb(make_spec()) == 512 + 512


def test_the_container_gets_tmp_on_top_of_its_memory_and_the_network() -> None:
    config = ContainerConfig(
        name="c",
        image=PINNED,
        command=None,
        args=None,
        env={},
        labels={},
        memory_mb=256,
        cpus=1.0,
        pids_limit=10,
        nofile_limit=10,
        tmp_mb=100,
        network="imagefn-fn-noegress",
    )
    host = config.to_docker()["HostConfig"]
    assert host["Tmpfs"] == {"/tmp": "rw,nosuid,nodev,size=100m"}
    # The heap keeps its 256 MiB whatever /tmp holds; no swap beyond the sum.
    assert host["Memory"] == host["MemorySwap"] == 356 * MiB
    assert host["NetworkMode"] == "imagefn-fn-noegress"
    # Still published on loopback only: the gateway's one way in.
    assert host["PortBindings"] == {"9000/tcp": [{"HostIp": "127.0.0.1", "HostPort": ""}]}


async def test_a_missing_network_is_named_with_the_script_to_run() -> None:
    runtime = FakeRuntime()
    nets = NetworkSettings()
    await require_networks(runtime, nets)
    runtime.networks.discard(nets.network_no_egress)
    with capture_logs() as logs, pytest.raises(ServiceUnavailable) as err:
        await require_networks(runtime, nets)
    assert nets.network_no_egress in err.value.message
    assert nets.network not in err.value.message.replace(nets.network_no_egress, "")
    assert "deploy/network.sh" in err.value.message
    assert logs[0]["event"] == "function_network_missing"
    await runtime.close()


# -- applied by the pool, the image store and the worker ---------------------------------


def with_image(record: FunctionRecord, image_ref: str) -> FunctionRecord:
    return dataclasses.replace(record, image_ref=image_ref)


@pytest.mark.parametrize(
    "image_ref",
    [
        f"docker.io/library/app@{DIGEST}",
        f"{REGISTRY}/fn:1",
        f"{REGISTRY}/fn@{fake_digest('not the version')}",
    ],
)
async def test_a_refused_image_is_the_callers_error_and_no_container_is_created(
    kit: PoolKit, image_ref: str
) -> None:
    record = with_image(make_record("fn"), image_ref)
    result = await kit.pool.invoke(make_invocation(record))
    assert result.error is not None
    assert result.error["type"] == "PullImageFailed"
    assert "the worker refused image" in result.error["message"]
    assert result.status == 502
    assert kit.runtime.containers == {} and kit.runtime.pulls == []
    assert kit.pool.instances() == []


async def test_the_image_store_refuses_before_looking_or_pulling(kit: PoolKit) -> None:
    # Pre-pulls and provisioned starts go through the store without an invocation.
    kit.runtime.add_image(f"docker.io/library/app@{DIGEST}")
    with pytest.raises(PullImageFailed):
        await kit.images.ensure(f"docker.io/library/app@{DIGEST}")
    good = make_record("fn").image_ref
    with capture_logs() as logs:
        kit.pool.prepull([f"{REGISTRY}/fn:latest", good])
        await eventually(lambda: not kit.pool._prepulls)
    assert [ref for ref, _ in kit.runtime.pulls] == [good]
    assert "image_refused" in [e["event"] for e in logs]


async def test_instances_get_the_specs_network_and_tmp(
    make_pool: Callable[..., PoolKit],
) -> None:
    kit = make_pool()
    kit.pool._host.networks = NetworkSettings(network="out", network_no_egress="closed")
    open_ = await kit.pool.invoke(make_invocation(make_record("open", tmp_mb=64)))
    closed = await kit.pool.invoke(make_invocation(make_record("closed", egress=False)))
    assert open_.error is None and closed.error is None
    configs = {
        c.config.labels["imagefn.function"]: c.config for c in kit.runtime.containers.values()
    }
    assert (configs["open"].network, configs["open"].tmp_mb) == ("out", 64)
    assert (configs["closed"].network, configs["closed"].tmp_mb) == ("closed", 512)
    # Placement counts both: what the containers may take, not only their heap.
    assert kit.pool.memory_used_mb() == (512 + 64) + (512 + 512)


async def test_the_worker_does_not_start_without_its_networks() -> None:
    kit = PoolKit(FAST_WORKER)
    kit.runtime.networks.clear()
    redis = FakeRedis()
    worker = Worker(SETTINGS, MemoryQueue(), kit.pool, kit.runtime, redis)  # type: ignore[arg-type]
    with pytest.raises(ServiceUnavailable, match=r"deploy/network\.sh"):
        await worker.run()
    # It never announced itself: no gateway routes work to it.
    assert redis.strings == {}
    await kit.runtime.close()
