"""The body of a batch submission, parsed as it streams in (docs/architecture.md,
section 15, "Batches").

A body is a JSON array of items or NDJSON (one JSON value per line, blank lines
skipped); ``parse_batch`` tells them apart by the first byte that is not whitespace
(``[``: an array) unless the caller names the format (``application/x-ndjson``: NDJSON,
so that NDJSON whose items are arrays can be sent too). It yields each item as compact
JSON bytes while the body is still arriving, and never holds more than one item plus one
chunk: a 100 MB batch costs the gateway the same memory as a small one.

Items keep their text: only whitespace outside strings is dropped, so numbers, escapes
and key order reach the function exactly as sent. Each item is checked with
``json.loads`` (NaN and Infinity are refused: they are not JSON).

Every error is an ``InvalidRequest`` whose details name the item (0-based, as in the
result lines) and the line (1-based) where it happened: ``{"item": i, "line": n}``.

How an array is cut into items without parsing it twice: a regex scan finds the
structural bytes (quotes, brackets, braces, commas), skips strings whole, and counts
nesting; a comma or the closing bracket at depth 0 ends the item, whose slice is then
checked by ``json.loads``. Scanning bytes is safe: in UTF-8 every byte of a multi-byte
character is >= 0x80, so none looks like a quote, bracket or comma. If every slice is
valid JSON and they are separated by commas and closed by ``]``, the array is valid.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncGenerator, AsyncIterable
from typing import Any

from shared.errors import InvalidRequest

AUTO = "auto"
ARRAY = "array"
NDJSON = "ndjson"
FORMATS = (AUTO, ARRAY, NDJSON)

# JSON's whitespace (RFC 8259), nothing else: other Unicode spaces are not allowed
# between tokens.
WS = b" \t\r\n"
BOM = b"\xef\xbb\xbf"
# An item's text in the body may be this many times the item limit (pretty-printed
# arrays are indented); its compact form must fit the limit itself.
RAW_FACTOR = 2

_SKIP_WS = re.compile(rb"[ \t\r\n]*")
# A whole string, captured: splitting on it leaves the text outside strings at the even
# places.
_STRING = re.compile(rb'("[^"\\]*(?:\\.[^"\\]*)*")', re.S)
# A run of bytes that are neither brackets, braces nor commas, whole strings included;
# it stops at the next structural byte, or at the quote of a string not complete yet.
_RUN = re.compile(rb'(?:[^"\[\]{},]+|"[^"\\]*(?:\\.[^"\\]*)*")*', re.S)
# The fast path: a whole item nested at most two deep (most events), with the comma or
# bracket after it, in one match. Possessive quantifiers: a failed match (a deeper or
# incomplete item, left to the scan) gives up at once instead of backtracking.
_STR = rb'"[^"\\]*+(?:\\.[^"\\]*+)*+"'
_FLAT = rb'\{(?:[^"\[\]{}]++|' + _STR + rb')*+\}|\[(?:[^"\[\]{}]++|' + _STR + rb")*+\]"
_INSIDE = rb'(?:[^"\[\]{}]++|' + _STR + rb"|" + _FLAT + rb")*+"
_FLAT_ITEM = re.compile(
    rb"[ \t\r\n]*+("
    + (rb"\{" + _INSIDE + rb"\}|\[" + _INSIDE + rb"\]")
    + (rb'|(?:[^"\[\]{},]++|' + _STR + rb")++")
    + rb")[ \t\r\n]*+([,\]])",
    re.S,
)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# One decoder for every item (building one per call costs as much as the decoding).
_DECODER = json.JSONDecoder(parse_constant=_refuse_constant)


def _show(byte: bytes) -> str:
    """One byte of the body, as an error message names it."""
    b = byte[0]
    return repr(chr(b)) if 0x20 <= b < 0x7F else f"byte 0x{b:02x}"


def compact(raw: bytes) -> bytes:
    """``raw`` without whitespace outside strings."""
    if len(raw.translate(None, WS)) == len(raw):
        return raw  # no whitespace at all
    parts = _STRING.split(raw)
    parts[::2] = [p.translate(None, WS) for p in parts[::2]]
    return b"".join(parts)


class _Items:
    """What both formats share: counting, checking and compacting items."""

    def __init__(self, max_item_bytes: int, max_items: int) -> None:
        self.max_item_bytes = max_item_bytes
        self.max_items = max_items
        self.count = 0

    def error(self, what: str, line: int, item: int | None = None) -> InvalidRequest:
        index = self.count if item is None else item
        return InvalidRequest(
            f"batch item {index} (line {line}): {what}", details={"item": index, "line": line}
        )

    def too_large(self, line: int) -> InvalidRequest:
        return self.error(
            f"larger than {self.max_item_bytes} bytes (max_event_bytes, the limit of one "
            "item as compact JSON)",
            line,
        )

    def check_raw_size(self, size: int, line: int) -> None:
        if size > self.max_item_bytes * RAW_FACTOR:
            raise self.too_large(line)

    def item(self, raw: bytes, line: int) -> bytes:
        """The checked, compact item; ``line`` is where its text starts."""
        if self.count >= self.max_items:
            raise self.error(f"more than {self.max_items} items (batch_max_items)", line)
        try:
            _DECODER.decode(raw.decode("utf-8"))
        except json.JSONDecodeError as e:
            raise self.error(f"not valid JSON: {e.msg}", line + e.lineno - 1) from None
        except ValueError as e:  # not UTF-8, NaN, Infinity
            raise self.error(f"not valid JSON: {e}", line) from None
        out = compact(raw)
        if len(out) > self.max_item_bytes:
            raise self.too_large(line)
        self.count += 1
        return out

    def empty(self, line: int) -> InvalidRequest:
        return self.error("the batch has no items; send a JSON array or NDJSON", line)


class NdjsonParser:
    """One JSON value per line; blank lines are skipped."""

    def __init__(self, max_item_bytes: int, max_items: int, first_line: int = 1) -> None:
        self._items = _Items(max_item_bytes, max_items)
        self._rest = b""
        # The line that ``_rest`` starts on.
        self._line = first_line

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._rest + data if self._rest else data
        lines = buf.split(b"\n")
        self._rest = lines.pop()
        out = [item for item in map(self._line_item, lines) if item is not None]
        # The unfinished line is refused as soon as it is too long, not at its end.
        self._items.check_raw_size(len(self._rest), self._line)
        return out

    def _line_item(self, text: bytes) -> bytes | None:
        line = self._line
        self._line += 1
        text = text.strip(WS)
        if not text:
            return None
        self._items.check_raw_size(len(text), line)
        return self._items.item(text, line)

    def end(self) -> list[bytes]:
        last = self._line_item(self._rest)
        self._rest = b""
        if self._items.count == 0:
            raise self._items.empty(self._line - 1)
        return [last] if last is not None else []


# States of the array parser.
_OPEN, _BEFORE_ITEM, _IN_ITEM, _AFTER_ITEM, _CLOSED = range(5)


class ArrayParser:
    """A JSON array of items, cut into items as it arrives (see the module text)."""

    def __init__(self, max_item_bytes: int, max_items: int, first_line: int = 1) -> None:
        self._items = _Items(max_item_bytes, max_items)
        self._buf = b""
        self._pos = 0  # where scanning continues
        self._state = _OPEN
        self._item_start = 0
        self._depth = 0
        self._after_comma = False
        # Line numbers: ``_line`` is the line of byte ``_line_pos`` of the buffer.
        self._line = first_line
        self._line_pos = 0

    def _line_at(self, pos: int) -> int:
        """The line of byte ``pos`` (asked for in increasing order only)."""
        if pos > self._line_pos:
            self._line += self._buf.count(b"\n", self._line_pos, pos)
            self._line_pos = pos
        return self._line

    def feed(self, data: bytes) -> list[bytes]:
        # Drop what is consumed: everything before the item being scanned.
        keep = self._item_start if self._state == _IN_ITEM else self._pos
        self._line_at(keep)
        self._buf = self._buf[keep:] + data
        self._pos -= keep
        self._item_start -= keep
        self._line_pos = 0
        out: list[bytes] = []
        while self._step(out):
            pass
        return out

    def _skip_ws(self) -> bool:
        """Skip whitespace; False when the buffer ends first."""
        m = _SKIP_WS.match(self._buf, self._pos)
        self._pos = m.end() if m else self._pos
        return self._pos < len(self._buf)

    def _step(self, out: list[bytes]) -> bool:
        """One step of the state machine; False when it needs more data."""
        buf = self._buf
        if self._state == _IN_ITEM:
            return self._scan_item(out)
        if self._state == _BEFORE_ITEM:
            m = _FLAT_ITEM.match(buf, self._pos)
            if m is not None:
                text = m.group(1).rstrip(WS)
                line = self._line_at(m.start(1))
                self._items.check_raw_size(len(text), line)
                out.append(self._items.item(text, line))
                self._pos = m.end()
                self._state = _BEFORE_ITEM if m.group(2) == b"," else _CLOSED
                self._after_comma = True
                return True
        if not self._skip_ws():
            return False
        c = buf[self._pos : self._pos + 1]
        line = self._line_at(self._pos)
        if self._state == _OPEN:
            if c != b"[":
                raise self._items.error("a JSON array must start with '['", line)
            self._pos += 1
            self._state = _BEFORE_ITEM
        elif self._state == _BEFORE_ITEM:
            if c == b"]":
                if self._after_comma:
                    raise self._items.error("expected an item after ','", line)
                raise self._items.empty(line)
            if c == b",":
                raise self._items.error("expected an item, found ','", line)
            self._state, self._item_start, self._depth = _IN_ITEM, self._pos, 0
        elif self._state == _AFTER_ITEM:
            if c == b",":
                self._state, self._after_comma = _BEFORE_ITEM, True
            elif c == b"]":
                self._state = _CLOSED
            else:
                raise self._items.error(f"expected ',' or ']', found {_show(c)}", line)
            self._pos += 1
        else:  # _CLOSED
            raise self._items.error(f"unexpected {_show(c)} after the array's closing ']'", line)
        return True

    def _scan_item(self, out: list[bytes]) -> bool:
        buf, start, end = self._buf, self._item_start, len(self._buf)
        while True:
            p = _RUN.match(buf, self._pos).end()  # type: ignore[union-attr]  # matches ""
            self._pos = p
            if p == end or buf[p] == 0x22:  # '"': a string that goes on in the next chunk
                self._check_size(end - start)
                return False
            c = buf[p]
            if c in b"[{":
                self._depth += 1
            elif self._depth > 0:  # a comma or closing bracket inside the item
                if c != 0x2C:
                    self._depth -= 1
            else:  # ',' or ']' at depth 0 ends the item ('}' too: then AFTER_ITEM refuses it)
                self._check_size(p - start)
                text = buf[start:p].rstrip(WS)
                out.append(self._items.item(text, self._line_at(start)))
                self._state = _AFTER_ITEM
                return True
            self._pos = p + 1

    def _check_size(self, size: int) -> None:
        if size > self._items.max_item_bytes * RAW_FACTOR:
            raise self._items.too_large(self._line_at(self._item_start))

    def end(self) -> list[bytes]:
        if self._state == _CLOSED:
            return []
        if self._state == _IN_ITEM:
            # The last item never ended: say what is wrong with it if it is broken.
            text = self._buf[self._item_start :].rstrip(WS)
            self._items.item(text, self._line_at(self._item_start))
        line = self._line_at(len(self._buf))
        raise self._items.error("the body ends before the array's closing ']'", line)


Parser = NdjsonParser | ArrayParser


def make_parser(fmt: str, first: int, max_item_bytes: int, max_items: int, line: int) -> Parser:
    """The parser for ``fmt``; under AUTO, ``first`` (the first byte that is not
    whitespace) decides."""
    if fmt == ARRAY or (fmt == AUTO and first == 0x5B):
        return ArrayParser(max_item_bytes, max_items, line)
    return NdjsonParser(max_item_bytes, max_items, line)


async def parse_batch(
    chunks: AsyncIterable[bytes],
    *,
    max_item_bytes: int,
    max_items: int,
    fmt: str = AUTO,
) -> AsyncGenerator[bytes, None]:
    """Yield each item of the streamed body as compact JSON bytes, in order."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown batch format {fmt!r}")
    parser: Parser | None = None
    head = b""  # bytes read before the format is known
    line = 1  # lines of whitespace dropped before that
    at_start = True  # where a byte order mark may stand
    async for chunk in chunks:
        if parser is not None:
            for item in parser.feed(chunk):
                yield item
            continue
        head += chunk
        if at_start:
            if len(head) < len(BOM) and BOM.startswith(head):
                continue  # maybe a byte order mark, split over chunks
            head, at_start = head.removeprefix(BOM), False
        body = head.lstrip(WS)
        if not body:
            # Only whitespace so far: remember its lines, keep nothing.
            line += head.count(b"\n")
            head = b""
            continue
        line += head.count(b"\n", 0, len(head) - len(body))
        parser = make_parser(fmt, body[0], max_item_bytes, max_items, line)
        head = b""
        for item in parser.feed(body):
            yield item
    if parser is None:
        # Nothing but whitespace (or nothing at all).
        parser = make_parser(fmt, 0, max_item_bytes, max_items, line)
        for item in parser.feed(head.lstrip(WS)):
            yield item
    for item in parser.end():
        yield item
