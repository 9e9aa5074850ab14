"""gateway.params: numbers in query parameters are checked, never a 500."""

from __future__ import annotations

import pytest

from gateway.params import whole_number
from shared.errors import InvalidRequest


def test_a_whole_number_within_bounds() -> None:
    assert whole_number({"limit": "7"}, "limit", 100, 0, 1000) == 7
    assert whole_number({}, "limit", 100, 0, 1000) == 100


@pytest.mark.parametrize("raw", ["-1", "1001", "1.5", "", "²", "9" * 5000, " 1", "0x10"])
def test_anything_else_names_the_parameter(raw: str) -> None:
    with pytest.raises(InvalidRequest, match="limit"):
        whole_number({"limit": raw}, "limit", 100, 0, 1000)
