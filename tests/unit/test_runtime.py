"""DockerRuntime's read-only engine queries are bounded: an engine that never answers
about one container gives ServiceUnavailable naming the call, not a caller stuck for good."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from shared.errors import ServiceUnavailable
from workers.runtime import DockerRuntime


class _Hanging:
    """Stands in for aiodocker's container and image handles; every call waits forever
    (or answers at once when ``answer`` is set)."""

    def __init__(self, answer: Any = None) -> None:
        self.answer = answer
        self.calls = 0

    async def _wait(self) -> Any:
        self.calls += 1
        if self.answer is not None:
            return self.answer
        await asyncio.Event().wait()

    async def show(self) -> Any:
        return await self._wait()

    async def log(self, **_kw: Any) -> Any:
        return await self._wait()

    async def inspect(self, _ref: str) -> Any:
        return await self._wait()


class _Containers:
    def __init__(self, handle: _Hanging) -> None:
        self.handle = handle

    def container(self, _cid: str) -> _Hanging:
        return self.handle


class _Engine:
    def __init__(self, handle: _Hanging) -> None:
        self.containers = _Containers(handle)
        self.images = handle


def runtime(handle: _Hanging) -> DockerRuntime:
    return DockerRuntime(_Engine(handle), query_timeout_s=0.05)  # type: ignore[arg-type]


async def test_inspect_that_never_answers_is_service_unavailable_naming_the_container() -> None:
    with pytest.raises(ServiceUnavailable) as e:
        await runtime(_Hanging()).state("0123456789abcdef" * 4)
    assert "docker inspect of 0123456789ab got no answer within 0.05 s" in e.value.message


async def test_image_inspect_that_never_answers_is_service_unavailable() -> None:
    ref = "127.0.0.1:5000/fn@sha256:" + "a" * 64
    with pytest.raises(ServiceUnavailable) as e:
        await runtime(_Hanging()).image_size(ref)
    assert f"docker image inspect of {ref} got no answer" in e.value.message


async def test_log_tail_that_never_answers_is_empty() -> None:
    # Only ever context for an error message: its absence must not hold up the error.
    assert await runtime(_Hanging()).logs_tail("c1", 10) == []


async def test_answers_within_the_bound_pass_through() -> None:
    handle = _Hanging({"State": {"Running": True, "Status": "running", "Pid": 7}})
    state = await runtime(handle).state("c1")
    assert (state.running, state.status, state.pid) == (True, "running", 7)
    assert handle.calls == 1
