"""A TCP proxy on 127.0.0.1 for fault tests: it can slow every answer down or go away."""

from __future__ import annotations

import asyncio
import contextlib


class SlowProxy:
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        # Seconds to hold every chunk coming back from upstream.
        self.delay_s = 0.0
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        # Connections first: from Python 3.12 on, wait_closed() waits for every open
        # connection, and a client stuck behind a slow answer may never close its own.
        if self._server is not None:
            self._server.close()
        for task in list(self._conns):
            task.cancel()
        await asyncio.gather(*self._conns, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.close()
            self._conns.discard(task)
            return
        try:
            await asyncio.gather(
                self._pipe(reader, up_writer, 0.0), self._pipe(up_reader, writer, None)
            )
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            for w in (writer, up_writer):
                w.close()
            self._conns.discard(task)

    async def _pipe(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, delay_s: float | None
    ) -> None:
        while data := await src.read(65536):
            wait = self.delay_s if delay_s is None else delay_s
            if wait:
                await asyncio.sleep(wait)
            dst.write(data)
            await dst.drain()
        with contextlib.suppress(OSError):
            dst.write_eof()
