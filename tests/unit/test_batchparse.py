"""gateway.batchparse: both formats, chunk boundaries anywhere, and every error naming
its item and line."""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway.batchparse import ARRAY, AUTO, NDJSON, compact, parse_batch
from shared.errors import InvalidRequest

LIMIT = 1024
# Whole body, byte by byte, and a few sizes that cut tokens, escapes and UTF-8 apart.
CHUNKINGS = (None, 1, 2, 3, 7, 64)


async def _chunks(body: bytes, size: int | None) -> AsyncIterator[bytes]:
    if size is None:
        yield body
        return
    for i in range(0, len(body), size):
        yield body[i : i + size]


async def parse(
    body: bytes,
    size: int | None = None,
    *,
    fmt: str = AUTO,
    limit: int = LIMIT,
    max_items: int = 100,
) -> list[bytes]:
    return [
        item
        async for item in parse_batch(
            _chunks(body, size), max_item_bytes=limit, max_items=max_items, fmt=fmt
        )
    ]


async def parse_everyhow(body: bytes, **kw: Any) -> list[bytes]:
    """The items, the same however the body is cut into chunks."""
    results = [await parse(body, size, **kw) for size in CHUNKINGS]
    assert all(r == results[0] for r in results), results
    return results[0]


async def error_everyhow(body: bytes, **kw: Any) -> InvalidRequest:
    """The error, the same however the body is cut into chunks."""
    errors: list[InvalidRequest] = []
    for size in CHUNKINGS:
        with pytest.raises(InvalidRequest) as got:
            await parse(body, size, **kw)
        errors.append(got.value)
    first = errors[0]
    assert all((e.message, e.details) == (first.message, first.details) for e in errors), [
        (e.message, e.details) for e in errors
    ]
    assert set(first.details) == {"item", "line"}
    return first


# -- JSON arrays -------------------------------------------------------------------------


async def test_array_items_come_out_compact_with_their_text_kept() -> None:
    body = (
        b'[ {"a": [1, 2, {"b": "x, ] }"}], "c d": "\\" ]"},\n'
        b'  "caf\xc3\xa9 [au lait]", 1.50e3 , -0, true, null,\n'
        b'  [ [], {} ], "\\\\", "\\u00e9\\n" ]\n'
    )
    items = await parse_everyhow(body)
    assert items == [
        b'{"a":[1,2,{"b":"x, ] }"}],"c d":"\\" ]"}',
        '"café [au lait]"'.encode(),
        b"1.50e3",  # numbers are not rewritten (1500.0)
        b"-0",
        b"true",
        b"null",
        b"[[],{}]",
        b'"\\\\"',
        b'"\\u00e9\\n"',  # escapes neither
    ]
    for item in items:
        json.loads(item)


async def test_a_pretty_printed_array_and_a_byte_order_mark() -> None:
    doc = [{"id": i, "tags": ["x y", "z"], "nested": {"deep": [i, {"k": None}]}} for i in range(20)]
    body = b"\xef\xbb\xbf\n\n" + json.dumps(doc, indent=2).encode()
    items = await parse_everyhow(body)
    assert [json.loads(i) for i in items] == doc
    assert items[0] == json.dumps(doc[0], separators=(",", ":")).encode()


async def test_items_are_yielded_while_the_body_is_still_arriving() -> None:
    read = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal read
        yield b"["
        n = 0
        while True:
            read += 1
            yield b'{"n": %d},\n' % n
            n += 1

    got: list[bytes] = []
    async for item in parse_batch(endless(), max_item_bytes=LIMIT, max_items=10**9):
        got.append(item)
        if len(got) == 5:
            break
    assert got[4] == b'{"n":4}'
    assert read <= 6  # one chunk ahead at most


async def test_an_endless_item_is_refused_without_reading_it_all() -> None:
    read = 0

    async def endless_string() -> AsyncIterator[bytes]:
        nonlocal read
        yield b'[1, "'
        while True:
            read += 100
            yield b"x" * 100

    with pytest.raises(InvalidRequest) as got:
        async for _ in parse_batch(endless_string(), max_item_bytes=LIMIT, max_items=10):
            pass
    assert "larger than 1024 bytes (max_event_bytes" in got.value.message
    assert got.value.details == {"item": 1, "line": 1}
    assert read <= 2 * LIMIT + 200


# -- NDJSON ------------------------------------------------------------------------------


async def test_ndjson_lines_blank_lines_skipped_crlf_and_no_final_newline() -> None:
    body = b'{"a": 1}\r\n\n   \n[1, 2]\n"str ing"\n\t42  \r\n{"b": {"c": [ ]}}'
    items = await parse_everyhow(body)
    assert items == [b'{"a":1}', b"[1,2]", b'"str ing"', b"42", b'{"b":{"c":[]}}']


async def test_ndjson_of_arrays_needs_the_format_named() -> None:
    body = b"[1, 2]\n[3]\n"
    assert await parse_everyhow(body, fmt=NDJSON) == [b"[1,2]", b"[3]"]
    # Guessed, it is a JSON array followed by garbage.
    err = await error_everyhow(body)
    assert err.details == {"item": 2, "line": 2} and "after the array's closing" in err.message


async def test_the_first_byte_that_is_not_whitespace_decides() -> None:
    assert await parse_everyhow(b"\n\n  [1]") == [b"1"]
    assert await parse_everyhow(b"\n\n  1\n2") == [b"1", b"2"]
    err = await error_everyhow(b'{"a": 1}', fmt=ARRAY)
    assert "must start with '['" in err.message


# -- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "item", "line", "says"),
    [
        # NDJSON: the line of the bad item.
        (b'{"a": 1}\n\n{"b": }\n{"c": 3}\n', 1, 3, "not valid JSON: Expecting value"),
        (b"1\n2\n3\nnope\n", 3, 4, "not valid JSON"),
        (b'1\n"unterminated\n2\n', 1, 2, "not valid JSON: Unterminated string"),
        (b"1\n2\n{", 2, 3, "not valid JSON"),
        (b"1\nNaN\n", 1, 2, "NaN is not JSON"),
        (b'1\n"\xff"\n', 1, 2, "not valid JSON"),
        (b'1\n{"a": 1} {"b": 2}\n', 1, 2, "Extra data"),
        # Arrays: the line where the item goes wrong.
        (b'[\n {"a": 1},\n {"a":\n  }\n]', 1, 4, "not valid JSON: Expecting value"),
        (b"[1, 2 3]", 1, 1, "Extra data"),
        (b"[1,\n\n2,]", 2, 3, "expected an item after ','"),
        (b"[,1]", 0, 1, "expected an item, found ','"),
        (b"[1}\n", 1, 1, "expected ',' or ']'"),
        (b'[1, {"a": [1, 2}]', 1, 1, "not valid JSON"),
        (b"[1, 2\n", 2, 2, "the body ends before the array's closing ']'"),
        (b'[1, "open', 1, 1, "not valid JSON: Unterminated string"),
        (b"[1, Infinity]", 1, 1, "Infinity is not JSON"),
        (b"[1]\n\n x", 1, 3, "unexpected 'x' after the array's closing ']'"),
        (b"[1] [2]", 1, 1, "unexpected '[' after"),
    ],
)
async def test_malformed_bodies_name_the_item_and_line(
    body: bytes, item: int, line: int, says: str
) -> None:
    err = await error_everyhow(body)
    assert err.details == {"item": item, "line": line}
    assert says in err.message
    assert err.message.startswith(f"batch item {item} (line {line}): ")
    assert err.http_status == 400


@pytest.mark.parametrize("body", [b"", b"   \n\n ", b"[]", b" [ \n ] ", b"\xef\xbb\xbf"])
async def test_an_empty_batch_is_refused(body: bytes) -> None:
    err = await error_everyhow(body)
    assert err.details["item"] == 0
    assert "no items" in err.message or "not valid JSON" in err.message


async def test_an_empty_batch_names_its_last_line() -> None:
    err = await error_everyhow(b"\n\n[\n]")
    assert err.details == {"item": 0, "line": 4} and "no items" in err.message


async def test_too_many_items() -> None:
    for body in (b"1\n2\n3\n4\n", b"[1, 2, 3, 4]"):
        err = await error_everyhow(body, max_items=3)
        assert err.details["item"] == 3
        assert "more than 3 items (batch_max_items)" in err.message
    assert len(await parse_everyhow(b"1\n2\n3\n", max_items=3)) == 3


async def test_an_item_over_the_limit_names_the_limit() -> None:
    fits = b'{"s":"' + b"x" * (LIMIT - 8) + b'"}'
    over = b'{"s":"' + b"x" * (LIMIT - 7) + b'"}'
    assert (len(fits), len(over)) == (LIMIT, LIMIT + 1)
    assert await parse_everyhow(b"1\n" + fits) == [b"1", fits]
    for body, line in ((b"1\n" + over + b"\n2", 2), (b"[1,\n" + over + b"]", 2)):
        err = await error_everyhow(body)
        assert err.details == {"item": 1, "line": line}
        assert "larger than 1024 bytes (max_event_bytes" in err.message


async def test_the_limit_is_on_the_compact_item() -> None:
    # Indented, its text is larger than the limit; compact, it fits.
    doc = {"k": list(range(150))}
    pretty = json.dumps(doc, indent=2).encode()
    assert len(pretty) > LIMIT > len(json.dumps(doc, separators=(",", ":")))
    assert len(await parse_everyhow(b"[" + pretty + b"]")) == 1
    assert len(await parse_everyhow(pretty.replace(b"\n", b" ") + b"\n")) == 1


def test_compact_keeps_strings_and_drops_the_rest() -> None:
    assert compact(b'{"a":1}') == b'{"a":1}'
    assert compact(b' { "a b" : [ 1 ,\n\t"c\\" d" ] } ') == b'{"a b":[1,"c\\" d"]}'


async def test_many_items_in_both_formats_agree() -> None:
    docs = [{"n": i, "s": f"item {i}", "l": [i, i * 2]} for i in range(500)]
    ndjson = b"".join(json.dumps(d).encode() + b"\n" for d in docs)
    array = json.dumps(docs).encode()
    for size in (None, 5, 4096):
        a = await parse(ndjson, size, max_items=1000)
        b = await parse(array, size, max_items=1000)
        assert a == b
        assert [json.loads(x) for x in a] == docs


def _random_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(8 if depth < 3 else 5)
    if kind == 0:
        return rng.randrange(-(10**6), 10**6)
    if kind == 1:
        return rng.choice([0.5, -1e-7, 3.25e10, 0.1])
    if kind == 2:
        return "".join(rng.choice('ab ,[]{}"\\\n\té€😀:') for _ in range(rng.randrange(8)))
    if kind == 3:
        return rng.choice([True, False, None])
    if kind == 4:
        return ""
    if kind == 5:
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {f"k{i} ,]": _random_value(rng, depth + 1) for i in range(rng.randrange(4))}


async def test_random_arrays_cut_anywhere_agree_with_json_loads() -> None:
    rng = random.Random(9)
    for _ in range(150):
        docs = [_random_value(rng) for _ in range(rng.randrange(1, 6))]
        body = json.dumps(
            docs, indent=rng.choice([None, 1, 3]), ensure_ascii=rng.random() < 0.5
        ).encode()
        items = await parse(body, rng.choice([1, 2, 5, 17, None]), fmt=ARRAY)
        assert [json.loads(i) for i in items] == docs


async def test_random_damage_is_refused_exactly_when_json_loads_refuses() -> None:
    rng = random.Random(11)
    for _ in range(300):
        docs = [_random_value(rng) for _ in range(rng.randrange(1, 5))]
        body = bytearray(json.dumps(docs, indent=rng.choice([None, 2])).encode())
        at = rng.randrange(len(body))
        if rng.random() < 0.5:
            del body[at]
        else:
            body.insert(at, ord(rng.choice('[]{},":x ')))
        try:
            expected: Any = json.loads(bytes(body))
        except ValueError:
            expected = None
        outcomes = []
        for size in (None, 1, 3):
            try:
                outcomes.append([json.loads(i) for i in await parse(bytes(body), size, fmt=ARRAY)])
            except InvalidRequest as e:
                outcomes.append(e.details)
        assert all(o == outcomes[0] for o in outcomes), (bytes(body), outcomes)
        if isinstance(expected, list) and expected:
            assert outcomes[0] == expected, bytes(body)
        else:
            assert isinstance(outcomes[0], dict), (bytes(body), outcomes[0])
