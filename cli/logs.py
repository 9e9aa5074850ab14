"""The CLI's side of the logs API: reading its Server-Sent Events and showing records.

The CLI asks for SSE rather than NDJSON: while following, the gateway's heartbeats let it
tell a quiet function from a dead connection, and the closing ``end`` event tells a
complete answer from one cut short.

A record is shown as one line::

    2026-11-28T10:00:00.123Z  stdout    1a2b3c4d  the function's text

(time in UTC, stream, the request id's first 8 characters, then the text); the platform's
START/END/REPORT/GAP records are spelled out (``render``).
"""

from __future__ import annotations

import binascii
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from shared.logrecords import line_bytes

SHORT_ID = 8


@dataclass(frozen=True)
class SseEvent:
    event: str  # "message" unless the stream named another
    data: str


def sse_events(lines: Iterable[bytes]) -> Iterator[SseEvent]:
    """The events of a Server-Sent Events stream given line by line (each line with or
    without its end). Comments (heartbeats) and fields other than ``event`` and ``data``
    are skipped, as the SSE specification says."""
    event = ""
    data: list[str] = []
    for raw in lines:
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if not line:
            if data:
                yield SseEvent(event or "message", "\n".join(data))
            event, data = "", []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            event = value
        elif field == "data":
            data.append(value)


def format_ts(ts: Any) -> str:
    """``2026-11-28T10:00:00.123Z`` for seconds since the epoch; the value as given when
    it is not a number."""
    if isinstance(ts, bool) or not isinstance(ts, int | float):
        return str(ts)
    try:
        moment = datetime.fromtimestamp(ts, UTC)
    except (OverflowError, OSError, ValueError):
        return str(ts)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def line_text(record: dict[str, Any]) -> str:
    """A line record's text for a terminal: output that was not UTF-8 (carried as
    base64) is decoded with replacement characters."""
    try:
        return line_bytes(record).decode("utf-8", "replace")
    except (binascii.Error, ValueError):
        return str(record.get("line", ""))  # not base64 after all: show it as it came


def _request_column(record: dict[str, Any]) -> str:
    rid = record.get("request_id")
    if isinstance(rid, str) and rid:
        return rid[:SHORT_ID]
    concurrent = record.get("concurrent")
    if isinstance(concurrent, list) and concurrent:
        return f"({len(concurrent)} req)"  # written while several requests were in flight
    return "-"


def _ms(value: Any) -> str:
    return f"{value:.1f} ms" if isinstance(value, int | float) else "? ms"


def _report(record: dict[str, Any]) -> str:
    parts = [
        f"REPORT RequestId: {record.get('request_id')}",
        f"Duration: {_ms(record.get('duration_ms'))}",
        f"Status: {record.get('status')}",
    ]
    if record.get("cold"):
        parts.append("Cold start")
        if record.get("init_ms") is not None:
            parts.append(f"Init: {_ms(record.get('init_ms'))}")
    peak, limit = record.get("memory_peak_mb"), record.get("memory_limit_mb")
    used = "n/a" if peak is None else f"{peak:g} MB" if isinstance(peak, int | float) else peak
    parts.append(f"Max memory used: {used}" + (f" of {limit} MB" if limit is not None else ""))
    if record.get("lines") is not None:
        parts.append(f"Lines: {record.get('lines')}")
    return "  ".join(parts)


def _message(record: dict[str, Any]) -> str:
    kind = record.get("type", "line")
    rid = record.get("request_id")
    if kind == "START":
        version = record.get("version")
        cold = "  (cold start)" if record.get("cold") else ""
        return (
            f"START RequestId: {rid}  Version: {version}  Instance: {record.get('instance')}{cold}"
        )
    if kind == "END":
        error = f"  Error: {record['error']}" if record.get("error") else ""
        return f"END RequestId: {rid}  Status: {record.get('status')}{error}"
    if kind == "REPORT":
        return _report(record)
    if kind == "GAP":
        return (
            f"GAP {record.get('dropped_lines')} lines ({record.get('dropped_bytes')} bytes) of "
            f"instance {record.get('instance')} dropped between "
            f"{format_ts(record.get('first_ts'))} and {format_ts(record.get('last_ts'))} "
            "(the worker's buffer was full while Kafka was slow or away)"
        )
    text = line_text(record)
    part = record.get("part")
    if part is not None:
        text += f"  [part {part}{', last' if record.get('last') else ''}]"
    return text


def render(record: dict[str, Any]) -> str:
    """One record as a line for people (see the module's docstring)."""
    stream = str(record.get("stream") or ("platform" if record.get("type") != "line" else "-"))
    return (
        f"{format_ts(record.get('ts'))}  {stream:<8}  {_request_column(record):<{SHORT_ID}}  "
        f"{_message(record)}"
    )
