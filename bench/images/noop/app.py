"""noop: a function server for throughput benchmarks (standard library only).

Answers every request on 0.0.0.0:9000 at once with a small body: ``POST /event-invoke``
(an SCF event) with ``{"ok":true}``, anything else (a web function's request) with
``ok``. It must not be the bottleneck of a benchmark that compares proxies in front of
it, so by default it is a single-threaded asyncio server with a minimal HTTP/1.1 parser
(keep-alive, Content-Length and chunked bodies, pipelining); ``NOOP_SERVER=threading``
runs the standard library's ThreadingHTTPServer instead (like examples/web-app), to
compare with figures taken against such a server.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOST, PORT = "0.0.0.0", 9000
EVENT_BODY = b'{"ok":true}'
WEB_BODY = b"ok"
MAX_HEAD = 64 * 1024


def response(status: bytes, ctype: bytes, body: bytes, close: bool) -> bytes:
    # Headers and body in one write: with keep-alive, separate writes meet Nagle and
    # delayed ACK (about 40 ms per request; see ENVIRONMENT.md).
    return (
        b"HTTP/1.1 " + status + b"\r\nContent-Type: " + ctype
        + b"\r\nContent-Length: " + str(len(body)).encode()
        + (b"\r\nConnection: close" if close else b"")
        + b"\r\n\r\n" + body
    )  # fmt: skip


EVENT_OK = response(b"200 OK", b"application/json", EVENT_BODY, False)
WEB_OK = response(b"200 OK", b"text/plain", WEB_BODY, False)


class Http(asyncio.Protocol):
    def __init__(self) -> None:
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while self.transport is not None and not self.transport.is_closing():
            if not self.one_request():
                break

    def bad(self) -> None:
        assert self.transport is not None
        self.transport.write(response(b"400 Bad Request", b"text/plain", b"bad request", True))
        self.transport.close()

    def one_request(self) -> bool:
        """Answer the first complete request in the buffer; False if there is none yet."""
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buf) > MAX_HEAD:
                self.bad()
            return False
        lines = bytes(self.buf[:end]).split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3:
            self.bad()
            return False
        method, path, version = parts
        length = 0
        chunked = False
        close = version == b"HTTP/1.0"
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value.strip() or b"0")
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"connection":
                v = value.strip().lower()
                close = v == b"close" or (close and v != b"keep-alive")
        pos = end + 4
        if chunked:
            # Skip the chunks; the body itself is not used.
            while True:
                eol = self.buf.find(b"\r\n", pos)
                if eol < 0:
                    return False
                size = int(bytes(self.buf[pos:eol]).split(b";")[0], 16)
                if size == 0:
                    trailer_end = self.buf.find(b"\r\n\r\n", eol)
                    if trailer_end < 0 and self.buf[eol : eol + 4] != b"\r\n\r\n":
                        return False
                    pos = (trailer_end if trailer_end >= 0 else eol) + 4
                    break
                if len(self.buf) < eol + 2 + size + 2:
                    return False
                pos = eol + 2 + size + 2
        elif len(self.buf) < pos + length:
            return False
        else:
            pos += length
        del self.buf[:pos]
        assert self.transport is not None
        if method == b"POST" and path.split(b"?")[0] == b"/event-invoke":
            out = (
                EVENT_OK
                if not close
                else response(b"200 OK", b"application/json", EVENT_BODY, True)
            )
        else:
            out = WEB_OK if not close else response(b"200 OK", b"text/plain", WEB_BODY, True)
        self.transport.write(out)
        if close:
            self.transport.close()
        return True


async def serve_asyncio() -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = await loop.create_server(Http, HOST, PORT, backlog=1024, reuse_address=True)
    print(f"noop (asyncio) listening on {HOST}:{PORT}", flush=True)
    async with server:
        await stop.wait()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    wbufsize = -1

    def answer(self) -> None:
        n = int(self.headers.get("Content-Length") or 0)
        if n:
            self.rfile.read(n)
        event = self.command == "POST" and self.path.split("?")[0] == "/event-invoke"
        body = EVENT_BODY if event else WEB_BODY
        self.send_response(200)
        self.send_header("Content-Type", "application/json" if event else "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = answer

    def log_message(self, format: str, *args: object) -> None:
        pass  # one line per request would cost more than the request


def serve_threading() -> None:
    server = ThreadingHTTPServer((HOST, PORT), Handler)
    server.daemon_threads = True
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"noop (threading) listening on {HOST}:{PORT}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    if os.environ.get("NOOP_SERVER") == "threading":
        serve_threading()
    else:
        asyncio.run(serve_asyncio())
