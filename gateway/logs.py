"""The logs API: ``GET /v1/functions/{name}/logs``.

Streams a function's log records (``shared/logrecords.py``) out of Kafka through
``shared.logreader``: as NDJSON (one record per line, the default) or as Server-Sent
Events when the caller accepts ``text/event-stream``.

Everything that can fail before the first byte (parameters, the function, Kafka) is
answered as a normal error response; the response starts only once the backlog has been
read. After that, the stream says what happened in-band, with *notices*: JSON objects
with a ``notice`` field instead of a ``type`` (an SSE ``notice`` event):

* ``omitted``: older matching records were left out by ``limit``;
* ``report_timeout``: ``wait_report`` gave up waiting for the REPORT;
* ``shutdown``: the gateway is stopping and ended the stream;
* ``error``: reading failed midway (``error`` holds the usual error body).

An SSE stream always ends with an ``end`` event naming why (``complete``, ``until``,
``report``, ``report_timeout``, ``shutdown``, ``error``), so a client can tell a finished
stream from a cut connection and does not reconnect after it; while following, a comment
line goes out every ``HEARTBEAT_S`` without records so proxies keep the connection.

A follower reads until the client goes away, ``until`` passes or the gateway shuts down
(``on_shutdown`` tells every stream to end; each then closes its consumer).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Mapping
from contextlib import aclosing
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import structlog
from aiohttp import web

from gateway.context import LOG_READER, LOG_STREAMS, REGISTRY, REQUEST_ID, SETTINGS
from gateway.errors import error_body
from shared import logrecords
from shared.errors import ImagefnError, InternalError, InvalidRequest, ServiceUnavailable
from shared.logreader import Backlog, LogReader, LogStream, is_report_of
from shared.logrecords import LogQuery

log = structlog.get_logger("imagefn.gateway")

routes = web.RouteTableDef()

NDJSON = "application/x-ndjson"
SSE = "text/event-stream"
DEFAULT_LIMIT = 1000
MAX_LIMIT = 10_000
DEFAULT_REPORT_TIMEOUT_S = 30.0
MAX_REPORT_TIMEOUT_S = 900.0
# Seconds without output after which a following SSE stream sends a comment line.
HEARTBEAT_S = 15.0
# How often a follower looks at its reasons to stop (client gone, until, shutdown,
# report timeout) while nothing arrives; this bounds how long each takes to act on.
POLL_S = 1.0
# Streams one gateway serves at once; each holds a Kafka consumer (a connection and a
# fetch loop), so they are bounded like any other resource.
MAX_STREAMS = 256
# Backlog output is written in chunks of about this size rather than record by record.
FLUSH_BYTES = 64 * 1024

PARAMETERS = (
    "version",
    "request_id",
    "since",
    "until",
    "follow",
    "limit",
    "wait_report",
    "timeout",
)
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}\Z")
DURATION_RE = re.compile(r"^(?:\d+(?:\.\d+)?(?:ms|s|m|h|d))+\Z")
DURATION_PART_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
EPOCH_RE = re.compile(r"^\d+(?:\.\d+)?\Z")
# Epoch seconds beyond this (year 5138) are epoch milliseconds given by mistake.
MAX_EPOCH_S = 1e11
TRUE = ("1", "true", "yes", "on", "")
FALSE = ("0", "false", "no", "off")


@dataclass(frozen=True)
class LogParams:
    """The query string, checked."""

    version: str | None = None  # a version number, an alias or $LATEST
    request_id: str | None = None
    since: float | None = None
    until: float | None = None
    follow: bool = False
    limit: int = DEFAULT_LIMIT
    wait_report: bool = False
    timeout_s: float = DEFAULT_REPORT_TIMEOUT_S


def parse_time(name: str, raw: str, now: float) -> float:
    """Seconds since the epoch for a time parameter: a duration before ``now`` (``30s``,
    ``10m``, ``2h``, ``1d``, ``1h30m``, ``500ms``), an RFC 3339 time with its offset
    (``2026-11-28T10:00:00Z``) or epoch seconds (``1795859600``, ``1795859600.25``)."""
    text = raw.strip()
    if DURATION_RE.match(text):
        ago = sum(float(n) * UNIT_S[unit] for n, unit in DURATION_PART_RE.findall(text))
        if not ago <= now:  # also inf: a duration of thousands of digits
            raise InvalidRequest(f"{name}: {raw!r} reaches back before 1970")
        return now - ago
    if EPOCH_RE.match(text):
        value = float(text)
        if value > MAX_EPOCH_S:
            raise InvalidRequest(f"{name}: {raw!r} is too large for epoch seconds (milliseconds?)")
        return value
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidRequest(
            f"{name}: {raw!r} is not a duration (30s, 10m, 2h, 1d), an RFC 3339 time "
            "(2026-11-28T10:00:00Z) or epoch seconds"
        ) from None
    if parsed.tzinfo is None:
        raise InvalidRequest(f"{name}: {raw!r} has no time zone offset (add Z or +01:00)")
    return parsed.timestamp()


def parse_bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in TRUE:
        return True  # a bare ?follow means yes
    if value in FALSE:
        return False
    raise InvalidRequest(f"{name}: {raw!r} is not a boolean (1/0, true/false)")


def _number(name: str, raw: str, low: float, high: float) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise InvalidRequest(f"{name}: {raw!r} is not a number") from None
    if not low < value <= high:  # also refuses nan
        raise InvalidRequest(f"{name}: {raw} is out of range (over {low:g}, at most {high:g})")
    return value


def parse_params(query: Mapping[str, str], now: float) -> LogParams:
    """The checked parameters; InvalidRequest naming the first bad one otherwise."""
    for key in query:
        if key not in PARAMETERS:
            raise InvalidRequest(f"{key}: unknown parameter; known: {', '.join(PARAMETERS)}")
    version = query.get("version")
    if version is not None and not version.strip():
        raise InvalidRequest("version: empty; give a version number, an alias or $LATEST")
    # isascii: str.isdigit() also holds for digits int() refuses, such as "²".
    if version is not None and version.isascii() and version.isdigit() and int(version) < 1:
        raise InvalidRequest(f"version: {version} is not a version number (1, 2, ...)")
    request_id = query.get("request_id")
    if request_id is not None and not REQUEST_ID_RE.match(request_id):
        raise InvalidRequest("request_id: 1-128 characters of A-Za-z0-9._-")
    since = parse_time("since", query["since"], now) if "since" in query else None
    until = parse_time("until", query["until"], now) if "until" in query else None
    if since is not None and until is not None and since > until:
        raise InvalidRequest("since: later than until")
    limit = DEFAULT_LIMIT
    if "limit" in query:
        raw = query["limit"]
        if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= MAX_LIMIT:
            raise InvalidRequest(f"limit: {raw!r} is not a whole number from 1 to {MAX_LIMIT}")
        limit = int(raw)
    wait_report = (
        parse_bool("wait_report", query["wait_report"]) if "wait_report" in query else False
    )
    if wait_report and request_id is None:
        raise InvalidRequest("wait_report: needs request_id (the request whose REPORT ends it)")
    timeout_s = DEFAULT_REPORT_TIMEOUT_S
    if "timeout" in query:
        timeout_s = _number("timeout", query["timeout"], 0, MAX_REPORT_TIMEOUT_S)
    return LogParams(
        version=version.strip() if version is not None else None,
        request_id=request_id,
        since=since,
        until=until,
        follow=parse_bool("follow", query["follow"]) if "follow" in query else False,
        limit=limit,
        wait_report=wait_report,
        timeout_s=timeout_s,
    )


def wants_sse(accept: str) -> bool:
    """Whether an Accept header asks for Server-Sent Events (else NDJSON is sent)."""
    for item in accept.split(","):
        media, _, rest = item.partition(";")
        if media.strip().lower() == SSE:
            # "q=0" is a refusal.
            return not re.search(r"(?:^|;)\s*q\s*=\s*0(?:\.0*)?\s*(?:;|$)", rest)
    return False


def sse_event(data: bytes, event: str | None = None) -> bytes:
    """One SSE event carrying ``data`` (each of its lines becomes a ``data:`` field)."""
    head = f"event: {event}\n".encode() if event else b""
    lines = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    return head + b"".join(b"data: " + line + b"\n" for line in lines) + b"\n"


SSE_HEARTBEAT = b": keepalive\n\n"


class Framing:
    """How records, notices and the end are written: NDJSON."""

    content_type = NDJSON
    heartbeats = False

    def record(self, record: dict[str, Any]) -> bytes:
        return logrecords.dumps(record) + b"\n"

    def notice(self, notice: dict[str, Any]) -> bytes:
        return logrecords.dumps(notice) + b"\n"

    def end(self, reason: str) -> bytes:
        return b""  # the end of the body says it


class SseFraming(Framing):
    content_type = SSE
    heartbeats = True

    def record(self, record: dict[str, Any]) -> bytes:
        return sse_event(logrecords.dumps(record))

    def notice(self, notice: dict[str, Any]) -> bytes:
        return sse_event(logrecords.dumps(notice), "notice")

    def end(self, reason: str) -> bytes:
        return sse_event(logrecords.dumps({"reason": reason}), "end")


class _Writer:
    """Buffers output, and notices the client leaving instead of failing on it."""

    def __init__(self, request: web.Request, response: web.StreamResponse) -> None:
        self._request = request
        self._response = response
        self._buffer = bytearray()
        self.last_write = time.monotonic()
        self.gone = False
        self.records = 0

    def add(self, data: bytes) -> None:
        self._buffer += data

    async def flush(self, *, at_least: int = 0) -> bool:
        """Write what is buffered (if it is ``at_least`` that long); False once the client
        is gone."""
        if self.gone or self.client_left():
            self.gone = True
            return False
        if not self._buffer or len(self._buffer) < at_least:
            return True
        data, self._buffer = bytes(self._buffer), bytearray()
        try:
            await self._response.write(data)
        except ConnectionError:
            self.gone = True
            return False
        self.last_write = time.monotonic()
        return True

    def client_left(self) -> bool:
        transport = self._request.transport
        return transport is None or transport.is_closing()

    async def finish(self) -> None:
        if await self.flush():
            try:
                await self._response.write_eof()
            except ConnectionError:
                self.gone = True


async def _end_streams(app: web.Application) -> None:
    """on_shutdown: tell every open stream to end (each closes its consumer)."""
    streams = app[LOG_STREAMS]
    for stop in list(streams):
        stop.set()


def setup(app: web.Application) -> None:
    """Add the logs route and its state to the gateway ``app`` (settings already set)."""
    settings = app[SETTINGS]
    app[LOG_READER] = LogReader(settings.kafka, settings.logs)
    app[LOG_STREAMS] = set()
    app.on_shutdown.append(_end_streams)
    app.router.add_routes(routes)


@routes.get("/v1/functions/{name}/logs")
async def get_logs(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    structlog.contextvars.bind_contextvars(function=name)
    now = time.time()
    started = time.monotonic()
    params = parse_params(request.query, now)
    registry = request.app[REGISTRY]
    version: int | None = None
    if params.version is not None:
        version = (await registry.resolve(name, params.version)).version
    else:
        await registry.get(name)  # FunctionNotFound
    settings = request.app[SETTINGS]
    if not settings.logs.enabled:
        why = (
            "IMAGEFN_KAFKA_BOOTSTRAP is empty" if not settings.kafka.bootstrap else "IMAGEFN_LOGS=0"
        )
        raise ServiceUnavailable(f"container logs are off on this gateway ({why})")
    streams = request.app[LOG_STREAMS]
    if len(streams) >= MAX_STREAMS:
        raise ServiceUnavailable(f"this gateway serves {MAX_STREAMS} log streams already; retry")
    query = LogQuery(
        function=name,
        version=version,
        request_id=params.request_id,
        since=params.since,
        until=params.until,
    )
    framing = SseFraming() if wants_sse(request.headers.get("Accept", "")) else Framing()
    stop = asyncio.Event()
    streams.add(stop)
    try:
        async with request.app[LOG_READER].open(query, now=now) as stream:
            backlog = await stream.backlog(params.limit)
            response = web.StreamResponse(
                headers={
                    "Content-Type": framing.content_type,
                    "Cache-Control": "no-cache",
                    # nginx would otherwise hold the stream back in its buffer.
                    "X-Accel-Buffering": "no",
                }
            )
            await response.prepare(request)
            writer = _Writer(request, response)
            reason = await _stream(request, writer, framing, stream, backlog, params, stop, started)
            if not writer.gone:
                writer.add(framing.end(reason))
                await writer.finish()
            log.info(
                "logs_stream_closed",
                function=name,
                reason="client_gone" if writer.gone else reason,
                follow=params.follow or params.wait_report,
                sse=framing.heartbeats,
                partition=stream.partition,
                records=writer.records,
                omitted=backlog.omitted,
                duplicates=stream.dedupe.dropped,
                unreadable=stream.unreadable,
                duration_s=round(time.monotonic() - started, 3),
            )
            return response
    finally:
        streams.discard(stop)


async def _stream(
    request: web.Request,
    writer: _Writer,
    framing: Framing,
    stream: LogStream,
    backlog: Backlog,
    params: LogParams,
    stop: asyncio.Event,
    started: float,
) -> str:
    """Write the backlog, then (following) live records; return why the stream ends."""
    if backlog.omitted:
        writer.add(
            framing.notice(
                {
                    "notice": "omitted",
                    "omitted": backlog.omitted,
                    "message": f"{backlog.omitted} older matching records left out "
                    f"(limit={params.limit}); narrow since/until or raise limit",
                }
            )
        )
    following = params.follow or params.wait_report
    try:
        async with aclosing(backlog.records()) as records:
            async for record in records:
                writer.add(framing.record(record))
                writer.records += 1
                if not await writer.flush(at_least=FLUSH_BYTES):
                    return "client_gone"
        if not await writer.flush():
            return "client_gone"
        if params.wait_report and backlog.report_seen:
            return "report"
        if not following:
            return "complete"
        if params.until is not None and time.time() > params.until:
            return "until"
        deadline = started + params.timeout_s
        async with aclosing(stream.live(POLL_S)) as live:
            async for item in live:
                if item is not None:
                    writer.add(framing.record(item))
                    writer.records += 1
                    if params.wait_report and is_report_of(item, params.request_id):
                        await writer.flush()
                        return "report"
                    continue
                # A poll ended: flush what it brought, then look at the reasons to stop.
                if not await writer.flush():
                    return "client_gone"
                if stop.is_set():
                    writer.add(
                        framing.notice(
                            {"notice": "shutdown", "message": "the gateway is shutting down"}
                        )
                    )
                    return "shutdown"
                if params.until is not None and time.time() > params.until:
                    return "until"
                if params.wait_report and time.monotonic() > deadline:
                    writer.add(
                        framing.notice(
                            {
                                "notice": "report_timeout",
                                "request_id": params.request_id,
                                "message": f"no REPORT for request {params.request_id} within "
                                f"{params.timeout_s:g} s (still running, or its logs not "
                                "shipped yet?)",
                            }
                        )
                    )
                    return "report_timeout"
                if framing.heartbeats and time.monotonic() - writer.last_write >= HEARTBEAT_S:
                    writer.add(SSE_HEARTBEAT)
                    if not await writer.flush():
                        return "client_gone"
    except Exception as e:
        # The response has started: an error can only go in-band (the middleware's error
        # answer would be a second response).
        err = (
            e
            if isinstance(e, ImagefnError)
            else InternalError("internal error; see the gateway log")
        )
        if isinstance(e, ImagefnError):
            log.warning("logs_stream_failed", error=err.type_name, reason=err.message)
        else:
            log.exception("logs_stream_crashed")
        body = error_body(err, request[REQUEST_ID])
        writer.add(framing.notice({"notice": "error", "message": err.message, "error": body}))
        return "error"
    return "complete"  # live() does not end by itself; kept for the type checker
