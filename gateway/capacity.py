"""Spec bounds against the workers' capacity, checked at deploy: a function asking for more
CPUs or memory than any worker has could never start (it would wait for room that never
comes), and one asking for a whole worker would starve every other function on it.

The capacity comes from the live workers' heartbeats (``cpus_capacity``,
``memory_capacity_mb``); the decision is the pure ``spec_bound_errors``. With no live
worker reporting a capacity (workers not started yet, or older ones that do not report
it), the spec is accepted: the platform cannot know the machines it will run on, and
refusing would make "deploy first, then start workers" impossible. An instance's memory
budget is ``memory_mb`` plus ``tmp_mb`` (its /tmp is a tmpfs, held in memory).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from aiohttp import web
from redis.exceptions import RedisError

from gateway.context import REDIS, SETTINGS
from shared.errors import InvalidSpec, ServiceUnavailable
from shared.keys import Keys
from shared.liveness import heartbeats
from shared.messages import Heartbeat, MalformedMessage
from shared.spec import FunctionSpec


@dataclass(frozen=True)
class Capacity:
    """The largest worker's (None: no live worker reported it)."""

    cpus: int | None = None
    memory_mb: int | None = None


def largest(beats: Iterable[Heartbeat]) -> Capacity:
    """A spec must fit one worker: the largest is the one it could run on."""
    cpus = [b.cpus_capacity for b in beats if b.cpus_capacity is not None]
    memory = [b.memory_capacity_mb for b in beats if b.memory_capacity_mb is not None]
    return Capacity(max(cpus, default=None), max(memory, default=None))


def spec_bound_errors(spec: FunctionSpec, capacity: Capacity) -> dict[str, str]:
    """The fields of ``spec`` no worker could give it, each naming the limit."""
    errors: dict[str, str] = {}
    if capacity.cpus is not None and spec.cpus > capacity.cpus:
        errors["cpus"] = (
            f"{spec.cpus:g} is more than the largest worker's {capacity.cpus} CPU cores"
        )
    if capacity.memory_mb is not None:
        need = spec.memory_mb + spec.tmp_mb
        if need > capacity.memory_mb:
            field = "memory_mb" if spec.memory_mb > capacity.memory_mb else "tmp_mb"
            errors[field] = (
                f"memory_mb + tmp_mb = {spec.memory_mb} + {spec.tmp_mb} = {need} MiB is more "
                f"than the largest worker's {capacity.memory_mb} MiB "
                "(IMAGEFN_WORKER_MEMORY_MB)"
            )
    return errors


async def live_capacity(request: web.Request) -> Capacity:
    keys = Keys(request.app[SETTINGS].queue.prefix)
    try:
        raw = await heartbeats(request.app[REDIS], keys)
    except RedisError as e:
        raise ServiceUnavailable(f"cannot read the workers' heartbeats: {e}") from e
    beats: list[Heartbeat] = []
    for value in raw.values():
        if value is None:
            continue  # that worker's heartbeat has expired: not live
        try:
            beats.append(Heartbeat.decode(value))
        except MalformedMessage:
            continue
    return largest(beats)


async def check_spec_fits(request: web.Request, spec: FunctionSpec) -> None:
    """InvalidSpec (400) naming each field too large for every live worker."""
    errors = spec_bound_errors(spec, await live_capacity(request))
    if errors:
        raise InvalidSpec(errors)
