"""Builders and small utilities shared by the unit tests."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import Any

from shared.messages import Invocation
from shared.spec import FunctionRecord, FunctionSpec


def make_spec(name: str = "fn", **kw: Any) -> FunctionSpec:
    kw.setdefault("image", "repo/fn:1")
    return FunctionSpec(name=name, **kw)


def make_record(name: str = "fn", revision: int = 1, **spec_kw: Any) -> FunctionRecord:
    return FunctionRecord(
        spec=make_spec(name, **spec_kw),
        image_id=f"sha256:{name}-{revision}",
        revision=revision,
        created_at=1_700_000_000.0,
        updated_at=1_700_000_000.0 + revision,
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
