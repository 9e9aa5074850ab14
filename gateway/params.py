"""Checked query parameters, shared by the routes that take numbers."""

from __future__ import annotations

from collections.abc import Mapping

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
