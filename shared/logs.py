"""structlog set-up: JSON lines on stderr, with context bound at the boundaries.

The gateway binds ``request_id`` when a request arrives; the worker binds ``request_id``
and ``function`` when an invocation arrives and ``instance`` once it is placed, through
contextvars, so every line of one invocation carries them without being passed around.

Lines written while an event loop runs are collected and written together at the end of
the loop's current pass (``TickFlushedWriter``): under load a server logs two or three
lines per invocation (the gateway's ``access``, the worker's ``invocation_done``), and one
``write`` system call per line cost more than rendering them (issue 12). A line reaches
stderr in the same pass of the loop that logged it, in order; nothing waits on a timer.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import sys
from typing import Any, TextIO

import orjson
import structlog


def _orjson_dumps(obj: Any, **kw: Any) -> str:
    # structlog hands its fallback for unknown types as ``default``; keys of any type are
    # allowed, as ``json`` allows them.
    return orjson.dumps(obj, default=kw.get("default"), option=orjson.OPT_NON_STR_KEYS).decode()


class TickFlushedWriter:
    """A file-like ``write`` that batches lines per event-loop pass.

    Without a running loop (CLI commands, start-up, shutdown) every write goes straight
    through. With one, the first write of a pass schedules one flush with ``call_soon``;
    later writes of the same pass only append. ``atexit`` flushes what is left."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._pending: list[str] = []
        self._scheduled = False
        atexit.register(self.flush)

    def write(self, text: str) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is None or loop.is_closed():
            self.flush()
            self._stream.write(text)
            self._stream.flush()
            return
        self._pending.append(text)
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        if not self._pending:
            return
        text, self._pending = "".join(self._pending), []
        try:
            self._stream.write(text)
            self._stream.flush()
        except (OSError, ValueError):
            pass  # stderr closed (the process is going away): nothing left to tell


class _TickLogger:
    """structlog's ``WriteLogger`` shape (msg → one line), on a ``TickFlushedWriter``."""

    def __init__(self, writer: TickFlushedWriter) -> None:
        self._writer = writer

    def msg(self, message: str) -> None:
        self._writer.write(message + "\n")

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


class TickLoggerFactory:
    def __init__(self, stream: TextIO) -> None:
        self._logger = _TickLogger(TickFlushedWriter(stream))

    def __call__(self, *args: Any) -> _TickLogger:
        return self._logger


def configure_logging(level: str = "info") -> None:
    lvl = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    logging.basicConfig(stream=sys.stderr, level=lvl, format="%(message)s")
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            # orjson: rendering was a visible share of a server's CPU per invocation.
            structlog.processors.JSONRenderer(serializer=_orjson_dumps),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=TickLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
