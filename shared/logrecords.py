"""The log record: one JSON object per Kafka record on ``{prefix}.logs``.

Every record is keyed by the function name, so all of one function's records land on one
partition and keep the order they were produced in (per worker; lines of one instance are
always produced by one worker, in order). The Kafka record timestamp is ``ts`` in
milliseconds, which is what time-range queries seek by.

Fields (absent when not applicable):

``type``        "line" (container output) or one of the platform's records: "START",
                "END", "REPORT" (per invocation) and "GAP" (lines that could not be kept).
``ts``          seconds since the epoch (float): when the engine received the line, or when
                the platform event happened.
``function``, ``version`` (int), ``instance`` (container name), ``worker``
``request_id``  the invocation the line belongs to, or null (see ``attribution``).
``stream``      "stdout", "stderr", or "platform" for the platform's records.
``line``        the text without its newline. Output that is not UTF-8 is carried as
                base64 with ``encoding: "base64"`` so no byte is lost or altered.
``seq``         per instance, increasing by one per record: readers use (instance, seq) to
                drop the duplicates an at-least-once retry may produce and to spot order.
``part``        on a line longer than ``max_line_bytes``: its parts are 1, 2, ...;
                ``last`` is true on the final part.
``concurrent``  on output of a web instance that serves several requests at once: the ids
                of all the requests in flight when the line was written (``request_id`` is
                then null, since nobody can tell which one wrote it).
START           ``cold`` (bool)
END             ``status`` (the function's HTTP status, the platform's when it did not
                answer, null if the call was abandoned), ``error`` (error type or null),
                ``duration_ms``
REPORT          ``duration_ms``, ``status``, ``error``, ``cold``, ``init_ms`` (cold starts),
                ``memory_peak_mb`` (the instance's peak so far as its cgroup reports it,
                null where unavailable), ``memory_limit_mb``, ``lines`` (output lines
                attributed to the request and placed before its END; a line in parts
                counts once), ``dropped_lines`` (only when some of its lines were dropped)
GAP             ``dropped_lines``, ``dropped_bytes``, ``first_ts``, ``last_ts``: lines of
                this instance that were dropped because the buffer was full while Kafka
                was slow or away; emitted where they were dropped, once records flow again.
                ``request_id`` is set when all of them belonged to one request;
                ``dropped_platform`` counts platform records dropped too (rare: only beyond
                a reserve kept for them).
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

LINE = "line"
START = "START"
END = "END"
REPORT = "REPORT"
GAP = "GAP"
PLATFORM_TYPES = (START, END, REPORT, GAP)


def encode_line_text(raw: bytes) -> dict[str, Any]:
    """The ``line`` field (and ``encoding`` when needed) for raw output bytes."""
    try:
        return {"line": raw.decode("utf-8")}
    except UnicodeDecodeError:
        return {"line": base64.b64encode(raw).decode("ascii"), "encoding": "base64"}


def line_bytes(record: dict[str, Any]) -> bytes:
    """The exact bytes of a line record's output."""
    text = str(record.get("line", ""))
    if record.get("encoding") == "base64":
        return base64.b64decode(text)
    return text.encode("utf-8")


def dumps(record: dict[str, Any]) -> bytes:
    return json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def loads(value: bytes) -> dict[str, Any]:
    out = json.loads(value)
    if not isinstance(out, dict):
        raise ValueError("a log record is a JSON object")
    return out


@dataclass(frozen=True)
class LogQuery:
    """What a reader asks for; every field narrows (None means any)."""

    function: str
    version: int | None = None
    request_id: str | None = None
    since: float | None = None  # seconds since the epoch
    until: float | None = None

    def matches(self, record: dict[str, Any]) -> bool:
        if record.get("function") != self.function:
            return False  # another function sharing the partition
        if self.version is not None and record.get("version") != self.version:
            return False
        if self.request_id is not None and record.get("request_id") != self.request_id:
            concurrent = record.get("concurrent") or ()
            if self.request_id not in concurrent:
                return False
        ts = float(record.get("ts", 0.0))
        if self.since is not None and ts < self.since:
            return False
        return not (self.until is not None and ts > self.until)
