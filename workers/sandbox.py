"""What a function instance may run and reach, decided by the worker itself: the image
(only the platform registry's, pinned by digest), the network (by the spec's ``egress``)
and the memory it is given (its ``memory_mb`` plus its /tmp budget ``tmp_mb``).

The worker re-checks the image even though the gateway resolved it at deploy time: a
record in Redis (or an invocation in the queue) is only as trustworthy as everything
that can write there, and the worker is the last step before code runs.
"""

from __future__ import annotations

import structlog

from shared.errors import InvalidSpec, PullImageFailed, ServiceUnavailable
from shared.imageref import parse_image_ref
from shared.settings import WorkerSettings
from shared.settings_security import NetworkSettings
from shared.spec import FunctionRecord, FunctionSpec
from workers.runtime import ContainerConfig, ContainerRuntime

log = structlog.get_logger("imagefn.sandbox")

NETWORK_SCRIPT = "deploy/network.sh"


def check_image(image_ref: str, registry: str, digest: str = "") -> None:
    """Refuse anything but ``{registry}/{repository}@sha256:<64 hex>``, the form the
    gateway pins a version to; ``digest``, when the record has one, must be that one.

    The caller gets a PullImageFailed (the image cannot be had), the reason in its
    message: a type every gateway already knows how to answer."""
    why = _refusal(image_ref, registry, digest)
    if why is None:
        return
    log.error("image_refused", image=image_ref, registry=registry, reason=why)
    raise PullImageFailed(
        f"the worker refused image {image_ref!r}: {why}; only images of the platform "
        f"registry {registry} pinned by digest run (redeploy the function)"
    )


def _refusal(image_ref: str, registry: str, digest: str) -> str | None:
    try:
        ref = parse_image_ref(image_ref, registry)
    except InvalidSpec:
        return "it is not a valid image reference"
    if ref.digest is None:
        return "it is not pinned by digest"
    if ref.registry != registry or not image_ref.startswith(f"{registry}/"):
        # Also refuses a reference that only defaults to the registry (no host in it):
        # the engine would look such a name up on Docker Hub.
        return f"it is not in the platform registry {registry}"
    if image_ref != ref.pinned(ref.digest):
        return "it carries a tag besides its digest"
    if digest and digest != ref.digest:
        return f"its digest is not the version's ({digest})"
    return None


def network_for(spec: FunctionSpec, networks: NetworkSettings) -> str:
    """The Docker network of the function's instances: both keep instances from each
    other, the host and the platform; only the first lets them reach the internet."""
    return networks.network if spec.egress else networks.network_no_egress


def reserved_mb(spec: FunctionSpec) -> int:
    """Memory an instance may take on the worker, and what the worker reserves for it:
    its ``memory_mb`` and its /tmp (a tmpfs lives in memory and counts against the
    container's memory limit). Reserving less would let instances that fill their /tmp
    take more memory than the worker has."""
    return spec.memory_mb + spec.tmp_mb


def container_config(
    record: FunctionRecord,
    *,
    name: str,
    labels: dict[str, str],
    settings: WorkerSettings,
    networks: NetworkSettings,
) -> ContainerConfig:
    """The container of one instance: the function's Command, Args, env and limits, and
    the worker's bounds on processes, files and the engine's log of it."""
    spec = record.spec
    return ContainerConfig(
        name=name,
        image=record.image_ref,
        command=spec.command,
        args=spec.args,
        env=spec.env,
        labels=labels,
        memory_mb=spec.memory_mb,
        cpus=spec.cpus,
        pids_limit=settings.pids_limit,
        nofile_limit=settings.nofile_limit,
        tmp_mb=spec.tmp_mb,
        network=network_for(spec, networks),
        log_max_mb=settings.container_log_max_mb,
        log_files=settings.container_log_files,
        log_driver=settings.container_log_driver,
    )


async def require_networks(runtime: ContainerRuntime, networks: NetworkSettings) -> None:
    """Fail the worker's start, clearly, when a function network is missing: instances
    must never fall back to a network without the platform's firewall rules."""
    missing = [
        name
        for name in (networks.network, networks.network_no_egress)
        if not await runtime.network_exists(name)
    ]
    if missing:
        log.error("function_network_missing", networks=missing, script=NETWORK_SCRIPT)
        raise ServiceUnavailable(
            f"Docker network {', '.join(missing)} does not exist: function instances run "
            f"only on the platform's networks; create them and their firewall rules with "
            f"`sudo {NETWORK_SCRIPT}` (deploy/setup.sh runs it)"
        )
