"""Checked query parameters, shared by the routes that take numbers."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from shared.errors import InvalidRequest


def whole_number(query: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    """The parameter ``name`` as a whole number in [low, high] (``default`` when absent);
    InvalidRequest naming it otherwise."""
    raw = query.get(name)
    if raw is None:
        return default
    # isascii: str.isdigit() also holds for digits int() refuses, such as "²"; the length
    # bound keeps int() from refusing (or spending time on) thousands of digits.
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 18) or not low <= int(raw) <= high:
        raise InvalidRequest(f"{name}: {raw!r} is not a whole number from {low} to {high}")
    return int(raw)


async def json_object(
    request: web.Request, what: str, fields: frozenset[str], shape: str
) -> dict[str, Any]:
    """The request's body as a JSON object with only ``fields`` (an empty body is ``{}``);
    InvalidRequest naming ``what`` and the expected ``shape`` otherwise."""
    raw = await request.read()
    try:
        doc = json.loads(raw or b"{}")
    except ValueError as e:
        raise InvalidRequest(f"{what} is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise InvalidRequest(f"{what}: {shape}")
    unknown = set(doc) - fields
    if unknown:
        raise InvalidRequest(f"{what}: unknown fields {', '.join(sorted(unknown))}")
    return doc
