"""workers.forwarder.Forwarder against a real HTTP server on 127.0.0.1 (no container)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from shared.errors import FunctionTimeout, ResultTooLarge
from shared.settings import WorkerSettings
from workers.forwarder import ConnectionLost, Forwarder, scf_headers

from .fakes import closed_port
from .helpers import make_invocation, make_record

SETTINGS = WorkerSettings(
    scf_namespace="ns",
    scf_region="r1",
    scf_appid="app",
    scf_uin="u",
    max_result_bytes=1000,
    max_response_header_bytes=600,
)


class Fn:
    """A function's HTTP server: records what it got, answers as told."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self.answer: web.StreamResponse | None = None
        self.delay_s = 0.0
        self.server: TestServer
        self.port = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(
            {
                "method": request.method,
                "path": request.raw_path,
                "headers": list(request.headers.items()),
                "body": await request.read(),
            }
        )
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        return self.answer or web.Response(
            body=b'{"ok":true}', headers={"Content-Type": "application/json", "X-Fn": "1"}
        )


@pytest.fixture
async def fn() -> AsyncIterator[Fn]:
    f = Fn()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", f.handle)
    f.server = TestServer(app, host="127.0.0.1")
    await f.server.start_server()
    assert f.server.port is not None
    f.port = f.server.port
    yield f
    await f.server.close()


@pytest.fixture
async def forwarder() -> AsyncIterator[Forwarder]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield Forwarder(session, SETTINGS)


def test_scf_headers() -> None:
    record = make_record("hello", memory_mb=256, timeout_s=2.5)
    inv = make_invocation(record, request_id="req-1", version="7")
    assert scf_headers(inv, SETTINGS) == [
        ("X-Scf-Request-Id", "req-1"),
        ("X-Scf-Memory", "256"),
        ("X-Scf-Timeout", "2500"),
        ("X-Scf-Name", "hello"),
        ("X-Scf-Namespace", "ns"),
        ("X-Scf-Version", "7"),
        ("X-Scf-Region", "r1"),
        ("X-Scf-Appid", "app"),
        ("X-Scf-Uin", "u"),
    ]


async def test_event_is_posted_to_event_invoke(fn: Fn, forwarder: Forwarder) -> None:
    inv = make_invocation(make_record("hello"), request_id="req-2", body=b'{"a":1}')
    resp = await forwarder.send(fn.port, inv, 2.0)
    assert (resp.status, resp.body) == (200, b'{"ok":true}')
    assert ("X-Fn", "1") in resp.headers
    [got] = fn.seen
    assert (got["method"], got["path"], got["body"]) == ("POST", "/event-invoke", b'{"a":1}')
    headers = dict(got["headers"])
    assert headers["Content-Type"] == "application/json"
    assert headers["X-Scf-Request-Id"] == "req-2"
    assert headers["X-Scf-Name"] == "hello"
    assert headers["X-Scf-Timeout"] == "3000"


async def test_web_request_is_forwarded_as_sent(fn: Fn, forwarder: Forwarder) -> None:
    inv = make_invocation(
        make_record("site", type="web"),
        request_id="req-3",
        method="GET",
        path="/a/b%20c",
        query="x=1&y=%26&z=a+b",
        headers=[("Accept", "text/html"), ("X-Scf-Request-Id", "spoofed"), ("x-scf-uin", "9")],
        body=b"",
    )
    resp = await forwarder.send(fn.port, inv, 2.0)
    assert resp.status == 200
    [got] = fn.seen
    assert (got["method"], got["path"]) == ("GET", "/a/b%20c?x=1&y=%26&z=a+b")
    names = [k.lower() for k, _ in got["headers"]]
    # The caller cannot impersonate the platform: only the platform's X-Scf-* arrive.
    assert names.count("x-scf-request-id") == 1 and names.count("x-scf-uin") == 1
    assert dict(got["headers"])["X-Scf-Request-Id"] == "req-3"
    assert dict(got["headers"])["X-Scf-Uin"] == "u"
    # A GET without a body is sent without one, and without invented headers.
    assert "content-length" not in names and "content-type" not in names
    assert "user-agent" not in names


async def test_hop_by_hop_response_headers_are_dropped(fn: Fn, forwarder: Forwarder) -> None:
    fn.answer = web.Response(
        status=201,
        body=b"x",
        headers={"Connection": "close, X-Private", "X-Private": "p", "X-Public": "ok"},
    )
    resp = await forwarder.send(fn.port, make_invocation(make_record(type="web")), 2.0)
    names = [k.lower() for k, _ in resp.headers]
    assert resp.status == 201
    assert "x-public" in names
    assert "x-private" not in names and "connection" not in names
    assert "content-length" not in names


async def test_slow_function_is_function_timeout(fn: Fn, forwarder: Forwarder) -> None:
    fn.delay_s = 1.0
    with pytest.raises(FunctionTimeout, match=r"0\.1 s"):
        await forwarder.send(fn.port, make_invocation(make_record()), 0.1)


async def test_refused_connection_is_connection_lost(forwarder: Forwarder) -> None:
    with pytest.raises(ConnectionLost):
        await forwarder.send(closed_port(), make_invocation(make_record()), 1.0)


async def test_server_hanging_up_is_connection_lost(forwarder: Forwarder) -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        with pytest.raises(ConnectionLost):
            await forwarder.send(port, make_invocation(make_record()), 1.0)
    finally:
        server.close()


async def test_body_over_the_limit_is_result_too_large(fn: Fn, forwarder: Forwarder) -> None:
    fn.answer = web.Response(body=b"x" * 1001)
    with pytest.raises(ResultTooLarge, match="1000 bytes"):
        await forwarder.send(fn.port, make_invocation(make_record()), 2.0)
    fn.answer = web.Response(body=b"x" * 1000)
    assert len((await forwarder.send(fn.port, make_invocation(make_record()), 2.0)).body) == 1000


async def test_a_body_arriving_in_pieces_is_read_whole(fn: Fn, forwarder: Forwarder) -> None:
    """Within the limit, however the function's answer is split on the wire."""

    async def handle(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        for part in (b"a" * 300, b"b" * 300, b"c" * 400):
            await resp.write(part)
            await asyncio.sleep(0.02)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        assert server.port is not None
        result = await forwarder.send(server.port, make_invocation(make_record()), 2.0)
    finally:
        await server.close()
    assert result.body == b"a" * 300 + b"b" * 300 + b"c" * 400


async def test_headers_over_the_limit_are_result_too_large(fn: Fn, forwarder: Forwarder) -> None:
    fn.answer = web.Response(body=b"", headers={"X-Big": "v" * 700})
    with pytest.raises(ResultTooLarge, match="headers"):
        await forwarder.send(fn.port, make_invocation(make_record()), 2.0)


async def test_percent_encoding_reaches_the_function_unchanged(
    fn: Fn, forwarder: Forwarder
) -> None:
    inv = make_invocation(
        make_record("site", type="web"), method="GET", path="/%7Euser", query="next=%2Fa%3Fb"
    )
    await forwarder.send(fn.port, inv, 2.0)
    assert fn.seen[0]["path"] == "/%7Euser?next=%2Fa%3Fb"
