"""Connection-level intake bounds: slow and idle clients, and the number of connections.

aiohttp has no time limit on reading a request's line and headers, and none on how slowly
a body may arrive, so a client sending one byte a second holds a connection (and a
``RequestHandler``) for ever. ``GuardedSite`` serves the app like ``web.TCPSite``, but
each connection's protocol is a ``GuardedConnection`` wrapped around aiohttp's own
``RequestHandler``: it sees every byte before aiohttp does and owns the timers.

* **Headers**: the request line and headers must be complete ``header_timeout_s`` after
  the request's first byte (for a new connection: after it opened, so one that sends
  nothing goes too). Past it: a small 408 answer, then close.
* **Body**: after ``body_grace_s``, a body must have arrived at ``body_min_bytes_per_s`` on
  average. Time during which aiohttp itself stopped reading (the handler not keeping up:
  flow control) does not count against the client. Past it: close.
* **Idle keep-alive**: aiohttp's own ``keepalive_timeout`` (set on the runner).
* **Connections**: at most ``max_connections`` open; the next gets a small 503 answer
  naming the limit and is closed.

Knowing where a request's headers end without parsing HTTP twice: aiohttp calls the
server's request handler once it has parsed them. ``GuardedSite`` wraps that handler
(``web.Server.request_handler``, read by each new ``RequestHandler``), which tells the
connection its request started and, when it returns, that it ended. Nothing here touches
aiohttp's private attributes; the same code runs on uvloop.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, cast

import structlog
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from gateway.errors import RequestTimeout, error_body
from shared.errors import ImagefnError, ServiceUnavailable
from shared.http import REQUEST_ID_HEADER, SCF_ERROR_TYPE_HEADER, SCF_REQUEST_ID_HEADER
from shared.settings_security import IntakeSettings

log = structlog.get_logger("imagefn.gateway")

# A refused connection is kept open this long (reading and discarding) so that the client
# reads the 503 rather than a reset; at most this many such connections at once.
REFUSED_LINGER_S = 2.0
MAX_LINGERING = 256
# How often a body's arrival rate is checked.
BODY_TICK_S = 1.0

_RequestHandlerFn = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


def raw_error(err: ImagefnError, reason: str, extra: dict[str, str] | None = None) -> bytes:
    """A whole HTTP/1.1 error answer (JSON body, as ``gateway.errors`` writes them) for
    connections refused before aiohttp has a request to answer."""
    request_id = str(uuid.uuid4())
    body = json.dumps({"error": error_body(err, request_id)}).encode()
    headers = {
        "Content-Type": "application/json",
        "Content-Length": str(len(body)),
        "Connection": "close",
        SCF_ERROR_TYPE_HEADER: err.type_name,
        REQUEST_ID_HEADER: request_id,
        SCF_REQUEST_ID_HEADER: request_id,
        **(extra or {}),
    }
    head = f"HTTP/1.1 {err.http_status} {reason}\r\n" + "".join(
        f"{k}: {v}\r\n" for k, v in headers.items()
    )
    return head.encode() + b"\r\n" + body


class ConnectionGuard:
    """The bounds of one gateway's connections: counts them, refuses past the cap, and
    holds the per-connection state the request-handler wrapper needs."""

    def __init__(self, intake: IntakeSettings) -> None:
        self.intake = intake
        self.open: dict[RequestHandler, GuardedConnection] = {}
        self.lingering: set[_Refused] = set()
        # Counters, for tests and the docs' figures.
        self.refused = 0
        self.header_timeouts = 0
        self.slow_bodies = 0
        self._installed: web.Server | None = None

    def install(self, server: web.Server) -> None:
        """Wrap the server's request handler (once): it marks a connection's request as
        started (headers complete) and ended."""
        if self._installed is server:
            return
        self._installed = server
        inner: _RequestHandlerFn = server.request_handler
        connections = self.open

        async def guarded(request: web.BaseRequest) -> web.StreamResponse:
            conn = connections.get(request.protocol)
            if conn is None:
                return await inner(request)
            conn.request_started(request)
            try:
                return await inner(request)
            finally:
                conn.request_ended()

        server.request_handler = guarded

    def factory(self, server: web.Server) -> Callable[[], asyncio.Protocol]:
        return lambda: GuardedConnection(self, server)

    def close(self) -> None:
        """Drop the refused connections still lingering (the open ones are aiohttp's to
        close, on the runner's cleanup)."""
        for refused in list(self.lingering):
            refused.abort()


class GuardedConnection(asyncio.Protocol):
    """aiohttp's ``RequestHandler`` for one connection, with the header and body timers."""

    def __init__(self, guard: ConnectionGuard, server: web.Server) -> None:
        self._guard = guard
        self._server = server
        # aiohttp's handler, made once the connection is admitted.
        self._inner: RequestHandler | None = None
        # Set instead when the connection is over the cap.
        self._refused: _Refused | None = None
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        # Headers awaited since this loop time (None: not awaiting any: in a request, or
        # idle between requests).
        self._headers_since: float | None = None
        self._received = 0
        self._received_at_start = 0
        self._in_request = False
        self._body: Any = None  # the request's StreamReader while its body is read
        self._window_at = 0.0
        self._window_base = 0

    # -- asyncio.Protocol, delegated to aiohttp ------------------------------------------

    # Counted here rather than in the factory: asyncio may make several protocols before
    # the first of them is told its connection is made.

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = t = cast(asyncio.Transport, transport)
        if len(self._guard.open) >= self._guard.intake.max_connections:
            self._refused = _Refused(self._guard)
            self._refused.connection_made(t)
            return
        self._inner = inner = self._server()
        self._guard.open[inner] = self
        inner.connection_made(transport)
        # A new connection owes its first request's headers from now on.
        self._await_headers()

    def data_received(self, data: bytes) -> None:
        if self._inner is None:
            return  # refused: read and dropped
        self._received += len(data)
        if self._headers_since is None and not self._in_request and not self._body_open():
            self._await_headers()
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        if self._inner is not None:
            self._inner.eof_received()
        return False  # either way the connection closes once the answers are out

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        self._body = None
        if self._refused is not None:
            self._refused.connection_lost(exc)
        if self._inner is not None:
            self._guard.open.pop(self._inner, None)
            self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    # -- what the request-handler wrapper says ---------------------------------------------

    def request_started(self, request: web.BaseRequest) -> None:
        self._headers_since = None
        self._in_request = True
        self._cancel_timer()
        if (
            self._guard.intake.body_min_bytes_per_s > 0
            and request.body_exists
            and not request.content.is_eof()
        ):
            self._body = request.content
            self._window_at, self._window_base = self._loop.time(), self._received
            self._timer = self._loop.call_later(BODY_TICK_S, self._check_body)

    def request_ended(self) -> None:
        self._in_request = False
        # An unread body is still drained by aiohttp (for a bounded time): its bytes are
        # not a next request's first ones, so _body stays until it ends.
        if self._body is not None and self._body.is_eof():
            self._body = None
        if self._body is None:
            self._cancel_timer()

    # -- timers -----------------------------------------------------------------------------

    def _body_open(self) -> bool:
        if self._body is not None and self._body.is_eof():
            self._body = None
        return self._body is not None

    def _await_headers(self) -> None:
        self._headers_since = self._loop.time()
        self._received_at_start = self._received
        self._cancel_timer()
        self._timer = self._loop.call_later(self._guard.intake.header_timeout_s, self._headers_late)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _headers_late(self) -> None:
        self._timer = None
        transport = self._transport
        if self._headers_since is None or transport is None or transport.is_closing():
            return
        timeout = self._guard.intake.header_timeout_s
        sent = self._received - self._received_at_start
        self._guard.header_timeouts += 1
        log.info("slow_headers_closed", peer=_peer(transport), bytes=sent, timeout_s=timeout)
        if sent:
            # Something was sent: say why it is closed. A connection that sent nothing
            # (a browser's spare one) is just closed, as for an idle keep-alive.
            err = RequestTimeout(
                f"request headers not complete within {timeout:g} s (IMAGEFN_HEADER_TIMEOUT_S)",
                details={"limit": "header_timeout_s"},
            )
            transport.write(raw_error(err, "Request Timeout"))
        transport.close()

    def _check_body(self) -> None:
        self._timer = None
        transport = self._transport
        if not self._body_open() or transport is None or transport.is_closing():
            return
        now = self._loop.time()
        intake = self._guard.intake
        elapsed = now - self._window_at
        got = self._received - self._window_base
        if not transport.is_reading():
            # aiohttp paused reading (flow control): the server, not the client, is slow.
            self._window_at, self._window_base = now, self._received
        elif elapsed >= intake.body_grace_s and got < intake.body_min_bytes_per_s * elapsed:
            self._guard.slow_bodies += 1
            log.info(
                "slow_body_closed",
                peer=_peer(transport),
                bytes=got,
                elapsed_s=round(elapsed, 3),
                min_bytes_per_s=intake.body_min_bytes_per_s,
            )
            # The handler sees a reset connection (logged as client_aborted).
            transport.close()
            return
        self._timer = self._loop.call_later(BODY_TICK_S, self._check_body)


class _Refused:
    """A connection past ``max_connections``: a 503, then close (driven by the
    ``GuardedConnection`` that found it over the cap)."""

    def __init__(self, guard: ConnectionGuard) -> None:
        self._guard = guard
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:
        self._transport = t = transport
        guard = self._guard
        guard.refused += 1
        limit = guard.intake.max_connections
        log.info("connection_refused", peer=_peer(t), max_connections=limit)
        err = ServiceUnavailable(
            f"this gateway has {limit} connections open, its limit "
            "(IMAGEFN_MAX_CONNECTIONS); retry shortly",
            details={"limit": "max_connections"},
        )
        t.write(raw_error(err, "Service Unavailable", {"Retry-After": "1"}))
        if len(guard.lingering) >= MAX_LINGERING or not t.can_write_eof():
            t.close()
            return
        # Half-close, and read what the client still sends: closing with unread data
        # would send a reset, which can destroy the answer before the client reads it.
        t.write_eof()
        guard.lingering.add(self)
        self._timer = asyncio.get_running_loop().call_later(REFUSED_LINGER_S, self.abort)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._guard.lingering.discard(self)

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()


def _peer(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else ""


class GuardedSite(web.BaseSite):
    """``web.TCPSite`` whose connections go through a ``ConnectionGuard``."""

    __slots__ = ("_bound_port", "_guard", "_host", "_port")

    def __init__(
        self, runner: web.BaseRunner, host: str, port: int, intake: IntakeSettings
    ) -> None:
        super().__init__(runner)
        self._host = host
        self._port = port
        self._bound_port: int | None = None
        self._guard = ConnectionGuard(intake)

    @property
    def guard(self) -> ConnectionGuard:
        return self._guard

    @property
    def port(self) -> int:
        return self._bound_port if self._bound_port is not None else self._port

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self.port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        self._guard.install(server)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._guard.factory(server), self._host, self._port, backlog=self._backlog
        )
        sockets = self._server.sockets
        self._bound_port = sockets[0].getsockname()[1] if sockets else self._port

    async def stop(self) -> None:
        await super().stop()
        self._guard.close()
