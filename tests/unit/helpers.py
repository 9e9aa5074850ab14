"""Builders and small utilities shared by the unit tests."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import Any

from shared.messages import Invocation
from shared.spec import FunctionRecord, FunctionSpec

from .fakes import fake_digest


def make_spec(name: str = "fn", **kw: Any) -> FunctionSpec:
    kw.setdefault("image", "repo/fn:1")
    return FunctionSpec(name=name, **kw)


REGISTRY = "registry.test:5000"


def digest_of(name: str, version: int) -> str:
    """The image digest make_record pins ``name`` at ``version`` to."""
    return fake_digest(f"{name}-{version}")


def image_ref_of(name: str, version: int) -> str:
    return f"{REGISTRY}/{name}@{digest_of(name, version)}"


def make_record(name: str = "fn", version: int = 1, **spec_kw: Any) -> FunctionRecord:
    """A published version: the image pinned by digest, one digest per (name, version)."""
    return FunctionRecord(
        spec=make_spec(name, **spec_kw),
        image_ref=image_ref_of(name, version),
        image_digest=digest_of(name, version),
        version=version,
        created_at=1_700_000_000.0,
        updated_at=1_700_000_000.0 + version,
    )


def make_invocation(
    record: FunctionRecord, *, deadline_in_s: float | None = 5.0, **kw: Any
) -> Invocation:
    kw.setdefault("request_id", uuid.uuid4().hex)
    kw.setdefault("kind", record.spec.type)
    kw.setdefault("body", b"{}")
    deadline = 0.0 if deadline_in_s is None else time.time() + deadline_in_s
    return Invocation(record=record, deadline=deadline, **kw)


async def eventually(predicate: Callable[[], bool], timeout_s: float = 2.0) -> None:
    """Poll ``predicate`` until it holds; fail the test if it never does."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while not predicate():
        if loop.time() > end:
            raise AssertionError(f"condition not met within {timeout_s} s")
        await asyncio.sleep(0.005)
