"""gateway.routing.pick_worker: warm affinity across workers."""

from __future__ import annotations

import pytest

from gateway.routing import pick_worker


def test_no_warm_instance_anywhere_means_the_shared_stream() -> None:
    assert pick_worker({}, "f@1") is None
    assert pick_worker({"a": {"f@1": {"ready": 0, "busy": 2}}}, "f@1") is None
    assert pick_worker({"a": {"g@1": {"ready": 3}}}, "f@1") is None


def test_the_worker_with_most_idle_instances_wins() -> None:
    inv = {"a": {"f@1": {"ready": 1}}, "b": {"f@1": {"ready": 3}}, "c": {"f@2": {"ready": 9}}}
    assert pick_worker(inv, "f@1") == "b"


def test_idle_beats_frozen_and_frozen_beats_nothing() -> None:
    inv = {"a": {"f@1": {"paused": 5}}, "b": {"f@1": {"ready": 1}}}
    assert pick_worker(inv, "f@1") == "b"
    assert pick_worker({"a": {"f@1": {"paused": 1}}, "b": {}}, "f@1") == "a"


def test_ties_spread() -> None:
    inv = {"a": {"f@1": {"ready": 1}}, "b": {"f@1": {"ready": 1}}}
    assert {pick_worker(inv, "f@1") for _ in range(200)} == {"a", "b"}


async def test_close_ends_the_refresh_loop_even_when_a_cancel_is_swallowed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import asyncio

    from gateway import routing

    monkeypatch.setattr(routing, "REFRESH_S", 0.01)
    router = routing.WarmRouter(None, None)  # type: ignore[arg-type]
    inside = asyncio.Event()

    async def refresh() -> None:
        # As a Redis client may do: the cancel is caught and the call just returns.
        inside.set()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            return

    router._refresh = refresh  # type: ignore[method-assign]
    router._task = asyncio.create_task(router._loop())
    await asyncio.wait_for(inside.wait(), 2)
    await asyncio.wait_for(router.close(), 2)
    assert router._task.done()
