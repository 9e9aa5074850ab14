"""gateway.connguard: slow headers, slow bodies, idle keep-alive and the connection cap,
on a real socket (loopback) with a small app, on asyncio's loop and on uvloop."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace

import pytest
from aiohttp import web

from gateway.connguard import ConnectionGuard, GuardedSite
from shared.settings_security import IntakeSettings

FAST = IntakeSettings(
    header_timeout_s=0.5,
    body_min_bytes_per_s=1000,
    body_grace_s=0.5,
    keepalive_timeout_s=0.8,
    max_connections=100,
)


class Served:
    def __init__(self, site: GuardedSite, outcomes: list[str]) -> None:
        self.site = site
        self.port = site.port
        # What each body-reading handler saw: "read N" or the exception's type.
        self.outcomes = outcomes

    @property
    def guard(self) -> ConnectionGuard:
        return self.site.guard

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.port)


def _app(outcomes: list[str]) -> web.Application:
    async def hello(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def upload(request: web.Request) -> web.Response:
        try:
            body = await request.read()
        except Exception as e:
            outcomes.append(type(e).__name__)
            raise
        outcomes.append(f"read {len(body)}")
        return web.json_response({"read": len(body)})

    app = web.Application()
    app.router.add_get("/hello", hello)
    app.router.add_post("/upload", upload)
    return app


@contextlib.asynccontextmanager
async def serve(intake: IntakeSettings = FAST) -> AsyncIterator[Served]:
    outcomes: list[str] = []
    runner = web.AppRunner(
        _app(outcomes), access_log=None, keepalive_timeout=intake.keepalive_timeout_s
    )
    await runner.setup()
    site = GuardedSite(runner, "127.0.0.1", 0, intake)
    await site.start()
    try:
        yield Served(site, outcomes)
    finally:
        started = time.monotonic()
        await runner.cleanup()
        # Shutdown is bounded even with clients still connected.
        assert time.monotonic() - started < 5


GET = b"GET /hello HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
    body = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", "0"))), 5)
    return status, headers, body


async def closed_within(reader: asyncio.StreamReader, timeout_s: float) -> float:
    """Seconds until the server closes (reading and dropping whatever it sends)."""
    started = time.monotonic()
    # A reset counts as closed: the server closes with the client's bytes still unread.
    async with asyncio.timeout(timeout_s):
        with contextlib.suppress(ConnectionResetError):
            while await reader.read(65536):
                pass
    return time.monotonic() - started


async def test_a_normal_request_is_answered_and_keep_alive_reused() -> None:
    async with serve() as s:
        reader, writer = await s.connect()
        for _ in range(3):
            writer.write(GET)
            status, _, body = await read_answer(reader)
            assert status == 200 and json.loads(body) == {"ok": True}
            # Between requests (well within the header timeout of each).
            await asyncio.sleep(0.3)
        writer.close()


async def test_slow_headers_get_408_and_are_closed_while_others_are_served() -> None:
    async with serve() as s:
        reader, writer = await s.connect()
        started = time.monotonic()

        async def drip() -> None:
            with contextlib.suppress(ConnectionError):
                for byte in GET:
                    writer.write(bytes([byte]))
                    await writer.drain()
                    await asyncio.sleep(0.1)

        dripping = asyncio.create_task(drip())
        # Another client is served meanwhile.
        r2, w2 = await s.connect()
        w2.write(GET)
        assert (await read_answer(r2))[0] == 200
        w2.close()
        status, headers, body = await read_answer(reader)
        elapsed = time.monotonic() - started
        assert status == 408
        assert headers["connection"] == "close"
        err = json.loads(body)["error"]
        assert err["type"] == "RequestTimeout" and err["limit"] == "header_timeout_s"
        await closed_within(reader, 2)
        assert FAST.header_timeout_s <= elapsed < FAST.header_timeout_s + 0.5
        assert s.guard.header_timeouts == 1
        dripping.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await dripping
        writer.close()


async def test_a_connection_that_sends_nothing_is_closed_without_an_answer() -> None:
    async with serve(replace(FAST, keepalive_timeout_s=30)) as s:
        reader, writer = await s.connect()
        started = time.monotonic()
        assert await reader.read() == b""
        assert time.monotonic() - started < FAST.header_timeout_s + 0.5
        writer.close()


async def test_an_idle_keep_alive_connection_is_closed() -> None:
    intake = replace(FAST, header_timeout_s=5, keepalive_timeout_s=0.5)
    async with serve(intake) as s:
        reader, writer = await s.connect()
        writer.write(GET)
        assert (await read_answer(reader))[0] == 200
        idle = await closed_within(reader, 3)
        assert intake.keepalive_timeout_s - 0.1 <= idle < intake.keepalive_timeout_s + 1.5
        # Not the header timer: the request line was complete.
        assert s.guard.header_timeouts == 0
        writer.close()


async def test_a_slow_body_is_closed_after_the_grace_period() -> None:
    async with serve() as s:
        reader, writer = await s.connect()
        writer.write(b"POST /upload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n\r\n")
        started = time.monotonic()

        async def drip() -> None:
            with contextlib.suppress(ConnectionError):
                while True:
                    writer.write(b"x" * 10)  # 100 B/s, the minimum is 1000
                    await writer.drain()
                    await asyncio.sleep(0.1)

        dripping = asyncio.create_task(drip())
        await closed_within(reader, 5)
        elapsed = time.monotonic() - started
        dripping.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await dripping
        # Checked once a second: closed at the first check past the grace period.
        assert FAST.body_grace_s <= elapsed < FAST.body_grace_s + 1.5
        assert s.guard.slow_bodies == 1
        await wait_until(lambda: bool(s.outcomes))
        # What the handler sees is a reset connection (the gateway logs client_aborted).
        assert s.outcomes[0] in {"ConnectionResetError", "ClientConnectionResetError"}
        writer.close()


async def test_a_body_at_a_fair_rate_is_read_whole() -> None:
    async with serve() as s:
        reader, writer = await s.connect()
        writer.write(b"POST /upload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 3000\r\n\r\n")
        for _ in range(15):  # 1.5 s at 2000 B/s: past the grace period, above the minimum
            writer.write(b"x" * 200)
            await writer.drain()
            await asyncio.sleep(0.1)
        status, _, body = await read_answer(reader)
        assert status == 200 and json.loads(body) == {"read": 3000}
        assert s.guard.slow_bodies == 0
        writer.close()


async def test_past_the_connection_cap_a_503_names_the_limit() -> None:
    async with serve(replace(FAST, max_connections=2, header_timeout_s=5)) as s:
        held = [await s.connect() for _ in range(2)]
        await wait_until(lambda: len(s.guard.open) == 2)
        reader, writer = await s.connect()
        writer.write(GET)
        status, headers, body = await read_answer(reader)
        assert status == 503
        assert headers["retry-after"] == "1"
        err = json.loads(body)["error"]
        assert err["type"] == "ServiceUnavailable" and err["limit"] == "max_connections"
        assert "IMAGEFN_MAX_CONNECTIONS" in err["message"]
        await closed_within(reader, 3)
        writer.close()
        # Room again once one closes.
        held[0][1].close()
        await wait_until(lambda: len(s.guard.open) == 1)
        r3, w3 = await s.connect()
        w3.write(GET)
        assert (await read_answer(r3))[0] == 200
        w3.close()
        held[1][1].close()
        assert s.guard.refused == 1


async def test_shutdown_is_bounded_with_refused_connections_lingering() -> None:
    async with serve(replace(FAST, max_connections=1, header_timeout_s=5)) as s:
        _, w1 = await s.connect()
        await wait_until(lambda: len(s.guard.open) == 1)
        r2, w2 = await s.connect()
        await read_answer(r2)
        await wait_until(lambda: bool(s.guard.lingering))
    # serve() asserted the cleanup took under 5 s; nothing is left lingering.
    assert not s.guard.lingering
    w1.close()
    w2.close()


def test_slow_headers_are_closed_on_uvloop_too() -> None:
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> float:
        async with serve() as s:
            reader, writer = await s.connect()
            writer.write(b"GET /hel")
            started = time.monotonic()
            status, _, _ = await read_answer(reader)
            assert status == 408
            await closed_within(reader, 2)
            writer.close()
            # And a normal request on the same loop.
            r2, w2 = await s.connect()
            w2.write(GET)
            assert (await read_answer(r2))[0] == 200
            w2.close()
            return time.monotonic() - started

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        elapsed = runner.run(scenario())
    assert elapsed < FAST.header_timeout_s + 0.5


async def wait_until(predicate: Callable[[], bool], timeout_s: float = 3) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)
