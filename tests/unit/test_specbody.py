"""gateway.specbody: spec bodies are read safely (issue 10's bounded intake)."""

from __future__ import annotations

import time

import pytest

from gateway.specbody import MAX_DEPTH, MAX_SPEC_BYTES, parse_spec_body
from shared.errors import InvalidRequest, RequestTooLarge

# A few hundred bytes that expand nine times per level through aliases ("billion laughs").
ALIAS_BOMB = b"""\
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
"""


def test_json_and_yaml_specs_parse() -> None:
    assert parse_spec_body(b'{"image": "x"}', "application/json") == {"image": "x"}
    doc = parse_spec_body(b"image: x\nenv: {A: b}\n", "application/yaml")
    assert doc == {"image": "x", "env": {"A": "b"}}
    # An anchor without an alias is harmless.
    assert parse_spec_body(b"env: &e {A: b}\n", "application/yaml") == {"env": {"A": "b"}}


def test_a_yaml_alias_bomb_is_refused_at_once_with_a_short_answer() -> None:
    t0 = time.monotonic()
    with pytest.raises(InvalidRequest) as info:
        parse_spec_body(ALIAS_BOMB, "application/yaml")
    assert time.monotonic() - t0 < 1
    assert "aliases (*name) are not allowed" in info.value.message
    assert len(info.value.message) < 1000


@pytest.mark.parametrize(
    ("body", "ctype"),
    [
        (b"[" * 5000 + b"]" * 5000, "application/json"),
        (b"[" * 5000 + b"]" * 5000, "application/yaml"),
        (b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1), "application/json"),
        (b"a:\n" + b"".join(b" " * i + b"b:\n" for i in range(1, 60)), "application/yaml"),
    ],
)
def test_deep_nesting_is_a_400_naming_the_problem(body: bytes, ctype: str) -> None:
    with pytest.raises(InvalidRequest, match="nests deeper than"):
        parse_spec_body(body, ctype)


def test_a_large_body_is_a_413_naming_the_limit() -> None:
    with pytest.raises(RequestTooLarge, match=f"at most {MAX_SPEC_BYTES} bytes"):
        parse_spec_body(b"x: " + b"y" * MAX_SPEC_BYTES, "application/yaml")


def test_garbage_names_the_format() -> None:
    with pytest.raises(InvalidRequest, match="not valid YAML"):
        parse_spec_body(b"a: [", "application/yaml")
    with pytest.raises(InvalidRequest, match="not valid JSON"):
        parse_spec_body(b"{", "application/json")
