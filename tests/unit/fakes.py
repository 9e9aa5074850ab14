"""In-memory stand-ins for the container runtime, the forwarder and Redis."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from shared.messages import Invocation
from workers.forwarder import Response
from workers.runtime import ContainerConfig, ContainerState, ManagedContainer


def closed_port() -> int:
    """A loopback port nothing listens on (connections are refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@dataclass
class Behaviour:
    """How the next container created by FakeRuntime behaves."""

    # start() raises this (a factory, so every container gets a fresh exception).
    start_error: Callable[[], Exception] | None = None
    # start() takes this long (an engine that is slow to start the container).
    start_delay_s: float = 0.0
    # The process exits right after start with this code (never listens).
    exit_code: int | None = None
    oom_killed: bool = False
    # False: the process runs but never listens on its port.
    ready: bool = True
    logs: list[str] = field(default_factory=lambda: ["booting", "listening"])


@dataclass
class FakeContainer:
    id: str
    config: ContainerConfig
    behaviour: Behaviour
    running: bool = False
    started: bool = False
    exit_code: int | None = None
    oom_killed: bool = False
    removed: bool = False
    port: int = 0
    server: asyncio.Server | None = None
    conns: list[asyncio.StreamWriter] = field(default_factory=list)


class FakeRuntime:
    """The ContainerRuntime protocol in memory; "ready" containers are tiny TCP servers on
    127.0.0.1 so that the pool's real readiness probe succeeds."""

    def __init__(self) -> None:
        self.containers: dict[str, FakeContainer] = {}
        self.default = Behaviour()
        self._next: deque[Behaviour] = deque()
        self._ids = itertools.count(1)
        self.removed: list[tuple[str, float]] = []
        self.deaths: asyncio.Queue[str] = asyncio.Queue()
        self.closed = False

    # -- test controls -----------------------------------------------------------------

    def queue(self, *behaviours: Behaviour) -> None:
        """Behaviours of the next containers created, in order (then the default)."""
        self._next.extend(behaviours)

    def by_port(self, port: int) -> FakeContainer:
        return next(c for c in self.containers.values() if c.port == port)

    async def exit(self, container_id: str, code: int, *, oom: bool = False) -> None:
        c = self.containers[container_id]
        c.running, c.exit_code, c.oom_killed = False, code, oom
        await self._stop_server(c)

    def live(self) -> list[FakeContainer]:
        return [c for c in self.containers.values() if not c.removed]

    # -- the protocol --------------------------------------------------------------------

    async def create(self, config: ContainerConfig) -> str:
        cid = f"cid{next(self._ids):04d}"
        behaviour = self._next.popleft() if self._next else self.default
        self.containers[cid] = FakeContainer(cid, config, behaviour)
        return cid

    async def start(self, container_id: str) -> None:
        c = self.containers[container_id]
        b = c.behaviour
        if b.start_delay_s:
            await asyncio.sleep(b.start_delay_s)
        if b.start_error is not None:
            raise b.start_error()
        c.started = True
        if b.exit_code is not None or b.oom_killed:
            c.exit_code, c.oom_killed = b.exit_code, b.oom_killed
            c.port = closed_port()
            return
        c.running = True
        if not b.ready:
            c.port = closed_port()
            return

        async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            c.conns.append(writer)
            with contextlib.suppress(OSError):
                await reader.read()
            writer.close()

        c.server = await asyncio.start_server(hold, "127.0.0.1", 0)
        c.port = c.server.sockets[0].getsockname()[1]

    async def host_port(self, container_id: str) -> int:
        return self.containers[container_id].port

    async def state(self, container_id: str) -> ContainerState:
        c = self.containers.get(container_id)
        if c is None or c.removed:
            return ContainerState(running=False, status="removed")
        return ContainerState(
            running=c.running,
            status="running" if c.running else "exited",
            exit_code=None if c.running else c.exit_code,
            oom_killed=c.oom_killed,
            pid=0,
        )

    async def logs_tail(self, container_id: str, lines: int) -> list[str]:
        return list(self.containers[container_id].behaviour.logs[-lines:])

    async def remove(self, container_id: str, stop_timeout_s: float) -> None:
        self.removed.append((container_id, stop_timeout_s))
        c = self.containers[container_id]
        c.running = False
        c.removed = True
        await self._stop_server(c)

    async def list_managed(self) -> list[ManagedContainer]:
        return [ManagedContainer(c.id, dict(c.config.labels)) for c in self.live()]

    async def die_events(self, worker_id: str) -> AsyncIterator[str]:
        while True:
            yield await self.deaths.get()

    async def close(self) -> None:
        self.closed = True
        for c in self.containers.values():
            await self._stop_server(c)

    @staticmethod
    async def _stop_server(c: FakeContainer) -> None:
        if c.server is not None:
            c.server.close()
            c.server = None
        for w in c.conns:
            w.close()
        c.conns.clear()


Step = Response | BaseException | Callable[[int, Invocation, float], Awaitable[Response]]


class FakeForwarder:
    """Answers the pool's ``send`` from a script of steps (then a default 200 answer).

    A step is a Response to return, an exception to raise, or an async callable
    ``(host_port, inv, timeout_s) -> Response``.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[int, Invocation, float]] = []
        self.script: deque[Step] = deque()
        self.default = Response(200, [("Content-Type", "application/json")], b'{"ok":true}')

    def then(self, *steps: Step) -> None:
        self.script.extend(steps)

    async def send(self, host_port: int, inv: Invocation, timeout_s: float) -> Response:
        self.calls.append((host_port, inv, timeout_s))
        step = self.script.popleft() if self.script else self.default
        if isinstance(step, BaseException):
            raise step
        if isinstance(step, Response):
            return step
        return await step(host_port, inv, timeout_s)


class FakeRedis:
    """The few commands the registry and the worker use: hashes, strings, ping."""

    def __init__(self) -> None:
        self.hashes: dict[str, dict[str, bytes]] = {}
        self.strings: dict[str, bytes] = {}
        self.ttls_ms: dict[str, int] = {}
        self.ping_error: Exception | None = None
        self.closed = False

    @staticmethod
    def _b(value: Any) -> bytes:
        return value if isinstance(value, bytes) else str(value).encode()

    async def ping(self) -> bool:
        if self.ping_error is not None:
            raise self.ping_error
        return True

    async def set(self, key: str, value: Any, px: int | None = None) -> bool:
        self.strings[key] = self._b(value)
        if px is not None:
            self.ttls_ms[key] = px
        return True

    async def exists(self, *keys: str) -> int:
        return sum(1 for k in keys if k in self.strings or k in self.hashes)

    async def delete(self, *keys: str) -> int:
        found = [k for k in keys if self.strings.pop(k, None) is not None]
        return len(found)

    async def hget(self, key: str, name: str) -> bytes | None:
        return self.hashes.get(key, {}).get(name)

    async def hset(self, key: str, name: str, value: Any) -> int:
        h = self.hashes.setdefault(key, {})
        new = name not in h
        h[name] = self._b(value)
        return int(new)

    async def hincrby(self, key: str, name: str, amount: int = 1) -> int:
        h = self.hashes.setdefault(key, {})
        value = int(h.get(name, b"0")) + amount
        h[name] = self._b(value)
        return value

    async def hgetall(self, key: str) -> dict[bytes, bytes]:
        return {k.encode(): v for k, v in self.hashes.get(key, {}).items()}

    async def hdel(self, key: str, name: str) -> int:
        return 1 if self.hashes.get(key, {}).pop(name, None) is not None else 0

    async def aclose(self) -> None:
        self.closed = True
