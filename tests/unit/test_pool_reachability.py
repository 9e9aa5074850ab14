"""Deleted functions and versions nothing names any more: their idle instances are
retired with the next heartbeat (ContainerPool.retire_unreachable), and the registry's
answer to which versions are reachable (FunctionRegistry.reachable_versions)."""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Mapping
from typing import cast

import redis.asyncio as aioredis

from shared.errors import ServiceUnavailable
from shared.keys import Keys
from shared.messages import Invocation
from shared.registry import FunctionRegistry
from workers import rules
from workers.forwarder import Response
from workers.pool import ReachableVersions

from .conftest import PoolKit
from .fakes import FakeRedis, fake_digest
from .helpers import REGISTRY, eventually, make_invocation, make_record, make_spec


def answering(
    reachable: Mapping[str, frozenset[int]], asked: list[list[str]] | None = None
) -> ReachableVersions:
    async def lookup(names: Collection[str]) -> Mapping[str, frozenset[int]]:
        if asked is not None:
            asked.append(sorted(names))
        return {n: reachable.get(n, frozenset({1})) for n in names}

    return lookup


async def test_a_deleted_functions_idle_instances_are_retired(kit: PoolKit) -> None:
    gone = await kit.pool.invoke(make_invocation(make_record("gone")))
    kept = await kit.pool.invoke(make_invocation(make_record("kept")))
    assert gone.error is None and kept.error is None
    asked: list[list[str]] = []
    await asyncio.sleep(rules.UNREACHABLE_GRACE_S)
    await kit.pool.retire_unreachable(answering({"gone": frozenset()}, asked))
    assert asked == [["gone", "kept"]]
    await eventually(lambda: [i.function for i in kit.pool.instances()] == ["kept"])


async def test_an_old_versions_instance_goes_once_latest_moved_and_no_alias_names_it(
    kit: PoolKit,
) -> None:
    v1 = await kit.pool.invoke(make_invocation(make_record("f", version=1)))
    v2 = await kit.pool.invoke(make_invocation(make_record("f", version=2)))
    v3 = await kit.pool.invoke(make_invocation(make_record("f", version=3)))
    await asyncio.sleep(rules.UNREACHABLE_GRACE_S)
    # $LATEST is 3; an alias still names 1.
    await kit.pool.retire_unreachable(answering({"f": frozenset({1, 3})}))
    await eventually(lambda: {i.id for i in kit.pool.instances()} == {v1.instance, v3.instance})
    assert v2.instance not in {i.id for i in kit.pool.instances()}


async def test_a_busy_instance_finishes_first_and_a_recent_one_waits_for_the_grace(
    kit: PoolKit,
) -> None:
    gate = asyncio.Event()

    async def held(port: int, inv: Invocation, timeout_s: float) -> Response:
        await gate.wait()
        return Response(200, [], b"ok")

    kit.forwarder.then(held)
    busy = asyncio.create_task(kit.pool.invoke(make_invocation(make_record("gone"))))
    await eventually(lambda: len(kit.forwarder.calls) == 1)
    await kit.pool.retire_unreachable(answering({"gone": frozenset()}))
    await asyncio.sleep(0.05)
    [inst] = kit.pool.instances()
    assert not inst.retire_reason
    gate.set()
    assert (await busy).error is None
    # Just used: within the grace it stays (a caller naming the version by number
    # keeps its warm instance between back-to-back calls).
    await kit.pool.retire_unreachable(answering({"gone": frozenset()}))
    assert not inst.retire_reason
    await asyncio.sleep(rules.UNREACHABLE_GRACE_S)
    await kit.pool.retire_unreachable(answering({"gone": frozenset()}))
    await eventually(lambda: kit.pool.instances() == [])


async def test_a_registry_that_cannot_answer_retires_nothing(kit: PoolKit) -> None:
    await kit.pool.invoke(make_invocation(make_record("f")))

    async def broken(names: Collection[str]) -> Mapping[str, frozenset[int]]:
        raise ServiceUnavailable("redis down")

    await asyncio.sleep(rules.UNREACHABLE_GRACE_S)
    await kit.pool.retire_unreachable(broken)
    assert [i.retire_reason for i in kit.pool.instances()] == [""]


async def test_an_empty_pool_asks_nothing(kit: PoolKit) -> None:
    asked: list[list[str]] = []
    await kit.pool.retire_unreachable(answering({}, asked))
    assert asked == []


async def test_registry_reachable_versions_are_latest_and_aliases() -> None:
    redis = FakeRedis()
    reg = FunctionRegistry(cast(aioredis.Redis, redis), Keys("t"))
    for content in ("a", "b", "c"):
        await reg.put(make_spec("f"), f"{REGISTRY}/f@{fake_digest(content)}", fake_digest(content))
    await reg.put(make_spec("g"), f"{REGISTRY}/g@{fake_digest('g')}", fake_digest("g"))
    await reg.set_alias("f", "prod", 1)
    got = await reg.reachable_versions(["f", "g", "missing"])
    assert got == {"f": frozenset({1, 3}), "g": frozenset({1}), "missing": frozenset()}
    await reg.delete("f")
    assert await reg.reachable_versions(["f"]) == {"f": frozenset()}
