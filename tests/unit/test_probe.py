"""workers.probe: readiness of a published port, and listener diagnosis from /proc."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest

from workers.probe import diagnose_listeners, probe_port

from .fakes import closed_port

Conn = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def serving(handler: Conn) -> AsyncIterator[int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read()
    writer.close()


async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.close()


async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"220 hello\r\n")
    await writer.drain()
    await reader.read()
    writer.close()


async def test_a_listening_server_is_ready() -> None:
    async with serving(silent) as port:
        assert await probe_port(port) is True


async def test_nothing_listening_is_not_ready() -> None:
    assert await probe_port(closed_port()) is False


async def test_a_proxy_that_hangs_up_at_once_is_not_ready() -> None:
    # Docker's userland proxy accepts, then closes when nothing listens inside.
    async with serving(hang_up) as port:
        assert await probe_port(port) is False


async def test_a_server_that_speaks_first_is_ready() -> None:
    async with serving(greet) as port:
        assert await probe_port(port) is True


async def test_no_pid_means_no_listeners() -> None:
    assert await diagnose_listeners(0) == []
    assert await diagnose_listeners(-1) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
async def test_listeners_of_a_process_are_read_from_proc() -> None:
    async with serving(silent) as port:
        assert f"127.0.0.1:{port}" in await diagnose_listeners(os.getpid())


async def test_gone_process_has_no_listeners() -> None:
    assert await diagnose_listeners(2**22 + 12345) == []


async def test_listeners_are_read_from_proc_and_unreadable_is_not_false() -> None:
    import os
    import socket

    from workers.probe import _listeners, listens_on_9000

    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        port = s.getsockname()[1]
        found = _listeners(os.getpid())
        assert found is not None and f"0.0.0.0:{port}" in found
    assert _listeners(2**22 + 12345) is None  # no such process: unreadable, not "none"
    assert await listens_on_9000(2**22 + 12345) is None
    assert await listens_on_9000(0) is None


async def test_the_engines_embedded_dns_listener_is_not_the_functions() -> None:
    import os
    import socket

    from workers.probe import ENGINE_DNS, _listeners

    # On a user-defined network the engine's DNS server listens in the container's
    # namespace on 127.0.0.11: a server that never listens must not be taken for one on
    # the wrong address because of it.
    with socket.socket() as dns, socket.socket() as own:
        dns.bind((ENGINE_DNS, 0))
        dns.listen()
        own.bind(("127.0.0.12", 0))
        own.listen()
        found = _listeners(os.getpid()) or []
        assert f"127.0.0.12:{own.getsockname()[1]}" in found
        assert not [a for a in found if a.startswith(ENGINE_DNS + ":")]
