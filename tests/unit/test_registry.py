"""shared.registry.FunctionRegistry over a fake Redis: immutable versions, $LATEST,
aliases, qualifier resolution, the per-process cache, and deletes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, cast

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from shared.errors import FunctionNotFound, InvalidRequest, ServiceUnavailable, VersionNotFound
from shared.keys import Keys
from shared.registry import LATEST, FunctionRegistry
from shared.spec import FunctionRecord

from .fakes import FakeRedis, fake_digest
from .helpers import REGISTRY, make_spec

KEYS = Keys("t")


def registry(redis: FakeRedis, cache_ttl_s: float = 0.0) -> FunctionRegistry:
    return FunctionRegistry(cast(aioredis.Redis, redis), KEYS, cache_ttl_s)


@pytest.fixture
def redis() -> FakeRedis:
    return FakeRedis()


@pytest.fixture
def reg(redis: FakeRedis) -> FunctionRegistry:
    return registry(redis)


async def publish(
    reg: FunctionRegistry, name: str = "fn", content: str = "", **spec_kw: Any
) -> FunctionRecord:
    digest = fake_digest(content or f"{name}-{spec_kw}")
    record, _ = await reg.put(make_spec(name, **spec_kw), f"{REGISTRY}/{name}@{digest}", digest)
    return record


# -- publishing -----------------------------------------------------------------------------


async def test_put_publishes_numbered_immutable_versions(
    reg: FunctionRegistry, redis: FakeRedis
) -> None:
    spec = make_spec("fn")
    first, created = await reg.put(spec, f"{REGISTRY}/fn@{fake_digest('a')}", fake_digest("a"))
    assert created and first.version == 1
    assert (first.image_ref, first.image_digest) == (
        f"{REGISTRY}/fn@{fake_digest('a')}",
        fake_digest("a"),
    )
    stored_v1 = redis.hashes["t:versions:fn"]["1"]

    second, created = await reg.put(
        make_spec("fn", memory_mb=256), f"{REGISTRY}/fn@{fake_digest('b')}", fake_digest("b")
    )
    assert not created and second.version == 2
    assert second.created_at == first.created_at
    assert second.updated_at >= first.updated_at
    # The keys: $LATEST, every version, the counter.
    assert FunctionRecord.from_json(redis.hashes["t:functions"]["fn"]) == second
    assert set(redis.hashes["t:versions:fn"]) == {"1", "2"}
    assert redis.hashes["t:version-counter"]["fn"] == b"2"
    # Version 1 was not touched by publishing version 2.
    assert redis.hashes["t:versions:fn"]["1"] == stored_v1
    assert FunctionRecord.from_json(stored_v1) == first


async def test_each_publish_is_one_transaction(reg: FunctionRegistry, redis: FakeRedis) -> None:
    await publish(reg)
    assert redis.transactions == [[("hset", "t:versions:fn"), ("hset", "t:functions")]]


async def test_version_numbers_are_per_function(reg: FunctionRegistry) -> None:
    assert (await publish(reg, "a")).version == 1
    assert (await publish(reg, "b")).version == 1
    assert (await publish(reg, "a", "again")).version == 2


async def test_failed_publish_writes_no_version(reg: FunctionRegistry, redis: FakeRedis) -> None:
    await publish(reg)
    redis.fail["evalsha"] = RedisConnectionError("Connection reset by peer")
    with pytest.raises(ServiceUnavailable, match="Connection reset"):
        await publish(reg, content="lost")
    del redis.fail["evalsha"]
    assert set(redis.hashes["t:versions:fn"]) == {"1"}
    assert (await reg.resolve("fn")).version == 1
    # Its number is not reused.
    assert (await publish(reg, content="next")).version == 3


# -- resolving a qualifier --------------------------------------------------------------------


async def test_resolve_latest_number_and_alias(reg: FunctionRegistry) -> None:
    v1 = await publish(reg, content="one")
    v2 = await publish(reg, content="two")
    await reg.set_alias("fn", "stable", 1)
    assert await reg.resolve("fn") == v2
    assert await reg.resolve("fn", LATEST) == v2
    assert await reg.resolve("fn", "") == v2
    assert await reg.resolve("fn", "1") == v1
    assert await reg.resolve("fn", "2") == v2
    assert await reg.resolve("fn", "stable") == v1
    assert await reg.get("fn") == v2


@pytest.mark.parametrize("qualifier", [LATEST, "1", "prod"])
async def test_unknown_function_is_function_not_found_whatever_the_qualifier(
    reg: FunctionRegistry, qualifier: str
) -> None:
    await publish(reg, "other")
    with pytest.raises(FunctionNotFound, match="'ghost'"):
        await reg.resolve("ghost", qualifier)


@pytest.mark.parametrize(("qualifier", "named"), [("3", "version 3"), ("prod", "alias 'prod'")])
async def test_unknown_version_or_alias_is_version_not_found(
    reg: FunctionRegistry, qualifier: str, named: str
) -> None:
    await publish(reg)
    with pytest.raises(VersionNotFound) as info:
        await reg.resolve("fn", qualifier)
    assert named in info.value.message
    assert info.value.http_status == 404


async def test_alias_pointing_at_a_version_that_is_gone_is_version_not_found(
    reg: FunctionRegistry, redis: FakeRedis
) -> None:
    await publish(reg)
    redis.hashes.setdefault("t:aliases:fn", {})["old"] = b"7"
    with pytest.raises(VersionNotFound, match="version 7"):
        await reg.resolve("fn", "old")


# -- listing versions -------------------------------------------------------------------------


async def test_versions_are_sorted_by_number_with_latest_and_aliases(
    reg: FunctionRegistry,
) -> None:
    published = [await publish(reg, content=str(i)) for i in range(11)]
    await reg.set_alias("fn", "prod", 10)
    await reg.set_alias("fn", "canary", 11)
    found = await reg.versions("fn")
    assert found.latest == 11
    # 1, 2, ..., 10, 11: by number, not as text.
    assert [r.version for r in found.versions] == list(range(1, 12))
    assert found.versions == published
    assert found.aliases == {"prod": 10, "canary": 11}


async def test_versions_of_an_unknown_function(reg: FunctionRegistry) -> None:
    with pytest.raises(FunctionNotFound):
        await reg.versions("ghost")


async def test_list_shows_each_functions_latest(reg: FunctionRegistry) -> None:
    await publish(reg, "b")
    await publish(reg, "a", "one")
    a2 = await publish(reg, "a", "two")
    listed = await reg.list()
    assert [(r.spec.name, r.version) for r in listed] == [("a", 2), ("b", 1)]
    assert listed[0] == a2


# -- aliases --------------------------------------------------------------------------------


async def test_alias_rollback_and_roll_forward(reg: FunctionRegistry) -> None:
    v1 = await publish(reg, content="one")
    v2 = await publish(reg, content="two")
    await reg.set_alias("fn", "prod", 2)
    assert await reg.resolve("fn", "prod") == v2
    await reg.set_alias("fn", "prod", 1)
    assert await reg.resolve("fn", "prod") == v1
    # $LATEST does not move with the alias, and a new deploy does not move the alias.
    assert await reg.resolve("fn") == v2
    v3 = await publish(reg, content="three")
    assert await reg.resolve("fn", "prod") == v1
    await reg.set_alias("fn", "prod", 3)
    assert await reg.resolve("fn", "prod") == v3


@pytest.mark.parametrize("alias", ["a", "A", "prod", "Blue-green_2", "a" * 40])
async def test_good_alias_names(reg: FunctionRegistry, alias: str) -> None:
    await publish(reg)
    await reg.set_alias("fn", alias, 1)
    assert (await reg.resolve("fn", alias)).version == 1


@pytest.mark.parametrize(
    "alias", ["", "1", "1a", "-a", "_a", LATEST, "LATEST$", "a" * 41, "a b", "a.b", "é", "a\n"]
)
async def test_bad_alias_names_are_invalid_requests(reg: FunctionRegistry, alias: str) -> None:
    await publish(reg)
    with pytest.raises(InvalidRequest, match="alias"):
        await reg.set_alias("fn", alias, 1)
    assert (await reg.versions("fn")).aliases == {}


async def test_alias_needs_the_function_and_the_version(reg: FunctionRegistry) -> None:
    await publish(reg)
    with pytest.raises(FunctionNotFound):
        await reg.set_alias("ghost", "prod", 1)
    with pytest.raises(VersionNotFound, match="version 2"):
        await reg.set_alias("fn", "prod", 2)
    assert (await reg.versions("fn")).aliases == {}


async def test_delete_alias(reg: FunctionRegistry) -> None:
    await publish(reg)
    await reg.set_alias("fn", "prod", 1)
    await reg.set_alias("fn", "canary", 1)
    await reg.delete_alias("fn", "prod")
    assert (await reg.versions("fn")).aliases == {"canary": 1}
    with pytest.raises(VersionNotFound, match="alias 'prod'"):
        await reg.resolve("fn", "prod")
    with pytest.raises(VersionNotFound, match="alias 'prod'"):
        await reg.delete_alias("fn", "prod")
    # The version itself stays.
    assert (await reg.resolve("fn", "1")).version == 1


async def test_delete_alias_of_an_unknown_function_is_function_not_found(
    reg: FunctionRegistry,
) -> None:
    with pytest.raises(FunctionNotFound):
        await reg.delete_alias("ghost", "prod")


# -- delete -----------------------------------------------------------------------------------


async def test_delete_removes_latest_every_version_and_every_alias(
    reg: FunctionRegistry, redis: FakeRedis
) -> None:
    await publish(reg, content="one")
    await publish(reg, content="two")
    await publish(reg, "other")
    await reg.set_alias("fn", "prod", 1)
    await reg.delete("fn")
    assert "fn" not in redis.hashes["t:functions"]
    assert "t:versions:fn" not in redis.hashes and "t:aliases:fn" not in redis.hashes
    assert redis.transactions[-1] == [
        ("hdel", "t:functions"),
        ("delete", "t:versions:fn"),
    ]
    for qualifier in (LATEST, "1", "2", "prod"):
        with pytest.raises(FunctionNotFound):
            await reg.resolve("fn", qualifier)
    with pytest.raises(FunctionNotFound):
        await reg.versions("fn")
    with pytest.raises(FunctionNotFound):
        await reg.delete("fn")
    # Other functions are untouched; numbers go on after a delete, from a clean slate.
    assert (await reg.resolve("other")).version == 1
    again = await publish(reg, content="three")
    assert again.version == 3
    found = await reg.versions("fn")
    assert ([r.version for r in found.versions], found.aliases) == ([3], {})


# -- the cache ------------------------------------------------------------------------------


def hgets(redis: FakeRedis) -> int:
    return redis.commands.count("hget")


async def test_resolve_is_cached_per_qualifier(redis: FakeRedis) -> None:
    reg = registry(redis, cache_ttl_s=60)
    await publish(reg, content="one")
    await reg.set_alias("fn", "prod", 1)
    for qualifier in (LATEST, "1", "prod"):
        await reg.resolve("fn", qualifier)
    before = hgets(redis)
    for _ in range(3):
        assert (await reg.resolve("fn")).version == 1
        assert (await reg.resolve("fn", "1")).version == 1
        assert (await reg.resolve("fn", "prod")).version == 1
    assert hgets(redis) == before


async def test_no_cache_without_a_ttl(redis: FakeRedis) -> None:
    reg = registry(redis, cache_ttl_s=0)
    await publish(reg)
    before = hgets(redis)
    await reg.resolve("fn")
    await reg.resolve("fn")
    assert hgets(redis) == before + 2


async def test_get_is_never_cached(redis: FakeRedis) -> None:
    reg = registry(redis, cache_ttl_s=60)
    other = registry(redis, cache_ttl_s=60)
    await publish(reg, content="one")
    await reg.resolve("fn")
    await publish(other, content="two")
    assert (await reg.get("fn")).version == 2


LocalWrite = Callable[[FunctionRegistry], Any]


@pytest.mark.parametrize(
    ("write", "then"),
    [
        (lambda r: publish(r, content="three"), {LATEST: 3, "1": 1, "prod": 1}),
        (lambda r: r.set_alias("fn", "prod", 2), {LATEST: 2, "1": 1, "prod": 2}),
        (lambda r: r.delete_alias("fn", "prod"), {LATEST: 2, "1": 1, "prod": None}),
        (lambda r: r.delete("fn"), {LATEST: None, "1": None, "prod": None}),
    ],
    ids=["put", "set_alias", "delete_alias", "delete"],
)
async def test_local_writes_drop_the_functions_cached_records(
    redis: FakeRedis, write: LocalWrite, then: dict[str, int | None]
) -> None:
    reg = registry(redis, cache_ttl_s=60)
    await publish(reg, content="one")
    await publish(reg, content="two")
    await publish(reg, "other")
    await reg.set_alias("fn", "prod", 1)
    for qualifier in then:
        await reg.resolve("fn", qualifier)
    await reg.resolve("other")
    await write(reg)
    for qualifier, version in then.items():
        if version is None:
            with pytest.raises((FunctionNotFound, VersionNotFound)):
                await reg.resolve("fn", qualifier)
        else:
            assert (await reg.resolve("fn", qualifier)).version == version
    # Another function's cached record is kept.
    before = hgets(redis)
    await reg.resolve("other")
    assert hgets(redis) == before


async def test_another_gateways_writes_show_once_the_cache_expires(redis: FakeRedis) -> None:
    mine = registry(redis, cache_ttl_s=0.1)
    theirs = registry(redis, cache_ttl_s=0.1)
    await publish(mine, content="one")
    await publish(mine, content="two")
    await mine.set_alias("fn", "prod", 2)
    assert (await mine.resolve("fn", "prod")).version == 2
    assert (await mine.resolve("fn")).version == 2
    await theirs.set_alias("fn", "prod", 1)
    await publish(theirs, content="three")
    # Within the TTL this gateway may still answer from its cache...
    assert (await mine.resolve("fn", "prod")).version == 2
    assert (await mine.resolve("fn")).version == 2
    await asyncio.sleep(0.15)
    # ...after it, never.
    assert (await mine.resolve("fn", "prod")).version == 1
    assert (await mine.resolve("fn")).version == 3


async def test_errors_are_not_cached(redis: FakeRedis) -> None:
    reg = registry(redis, cache_ttl_s=60)
    with pytest.raises(FunctionNotFound):
        await reg.resolve("fn")
    await publish(registry(redis), content="one")
    assert (await reg.resolve("fn")).version == 1


# -- Redis failures ---------------------------------------------------------------------------

Call = Callable[[FunctionRegistry], Any]


@pytest.mark.parametrize(
    ("command", "call"),
    [
        ("hget", lambda r: r.resolve("fn")),
        ("hget", lambda r: r.resolve("fn", "prod")),
        ("hexists", lambda r: r.versions("fn")),
        ("hgetall", lambda r: r.list()),
        ("hincrby", lambda r: publish(r)),
        ("hexists", lambda r: r.set_alias("fn", "prod", 1)),
        ("hset", lambda r: r.set_alias("fn", "prod", 1)),
        ("hdel", lambda r: r.delete_alias("fn", "prod")),
        ("execute", lambda r: r.delete("fn")),
    ],
)
async def test_redis_errors_are_service_unavailable(
    reg: FunctionRegistry, redis: FakeRedis, command: str, call: Call
) -> None:
    await publish(reg)
    await reg.set_alias("fn", "prod", 1)
    redis.fail[command] = RedisConnectionError("Connection refused")
    with pytest.raises(ServiceUnavailable, match="function registry unavailable"):
        await call(reg)


async def test_redis_error_while_checking_a_missing_version_is_service_unavailable(
    reg: FunctionRegistry, redis: FakeRedis
) -> None:
    await publish(reg)
    redis.fail["hexists"] = RedisConnectionError("Connection refused")
    with pytest.raises(ServiceUnavailable):
        await reg.resolve("fn", "9")


async def test_concurrent_deploys_leave_latest_on_the_newest_version(
    reg: FunctionRegistry, redis: FakeRedis
) -> None:
    # The first deploy's MULTI/EXEC reaches Redis after the second's (another connection,
    # another gateway): nothing orders them.
    gate, held = asyncio.Event(), asyncio.Event()

    async def hold_the_first(commands: list[str]) -> None:
        if not held.is_set():
            held.set()
            await gate.wait()

    redis.before_execute = hold_the_first
    first = asyncio.create_task(publish(reg, content="one"))
    await asyncio.wait_for(held.wait(), 2)
    second = await publish(reg, content="two")
    gate.set()
    assert (await first).version == 1 and second.version == 2
    assert (await reg.resolve("fn")).version == 2
    assert (await reg.versions("fn")).latest == 2
