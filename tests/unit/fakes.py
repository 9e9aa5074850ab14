"""In-memory stand-ins for the container runtime, the forwarder and Redis."""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import hashlib
import itertools
import json
import socket
import struct
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from shared.errors import PullImageFailed
from shared.messages import Invocation
from shared.settings_security import NetworkSettings
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
    paused: bool = False
    port: int = 0
    server: asyncio.Server | None = None
    conns: list[asyncio.StreamWriter] = field(default_factory=list)
    # The engine's log of the container: (timestamp ns of the chunk's first frame, raw
    # multiplexed bytes), and an event poked whenever it grows or the container stops.
    log: list[tuple[int, bytes]] = field(default_factory=list)
    log_changed: asyncio.Event = field(default_factory=asyncio.Event)


def rfc3339(ts_ns: int) -> bytes:
    """An engine timestamp: RFC 3339 in UTC with nanoseconds."""
    sec, ns = divmod(ts_ns, 1_000_000_000)
    return (time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)) + f".{ns:09d}Z").encode()


def log_frame(payload: bytes | str, *, stream: int = 1, ts_ns: int | None = None) -> bytes:
    """One frame of the engine's multiplexed log stream, with its timestamp."""
    data = payload.encode() if isinstance(payload, str) else payload
    body = rfc3339(time.time_ns() if ts_ns is None else ts_ns) + b" " + data
    return struct.pack(">BxxxI", stream, len(body)) + body


MiB = 1024 * 1024


def fake_digest(seed: str) -> str:
    """A well-formed sha256 digest, the same for the same seed."""
    return "sha256:" + hashlib.sha256(seed.encode()).hexdigest()


@dataclass
class PullBehaviour:
    """How the next FakeRuntime.pull behaves."""

    # pull() takes this long before it finishes (a slow registry).
    delay_s: float = 0.0
    # pull() raises this (a factory: a fresh exception for every pull) after the delay.
    error: Callable[[], Exception] | None = None
    # The registry served other content: the engine ends up holding another digest of
    # the repository, not the one asked for.
    wrong_digest: bool = False
    size_mb: int = 100
    progress: list[dict[str, Any]] = field(
        default_factory=lambda: [
            {"status": "Pulling fs layer", "id": "layer1"},
            {"status": "Downloading", "id": "layer1", "progress": "[=>   ] 1MB/10MB"},
            {"status": "Pull complete", "id": "layer1"},
        ]
    )


def pull_failure(reason: str = "unauthorized: authentication required") -> PullBehaviour:
    """A pull the engine reports as failed, the way DockerRuntime maps engine errors."""
    return PullBehaviour(error=lambda: PullImageFailed(f"cannot pull: {reason}"))


@dataclass
class FakeImage:
    size_bytes: int
    # RepoDigests, as the engine reports them (repository@sha256:...).
    digests: list[str]


class FakeRuntime:
    """The ContainerRuntime protocol in memory; "ready" containers are tiny TCP servers on
    127.0.0.1 so that the pool's real readiness probe succeeds. Images are pulled on
    demand (instantly, unless told otherwise by ``queue_pulls`` or ``pull_default``)."""

    def __init__(self) -> None:
        self.containers: dict[str, FakeContainer] = {}
        self.default = Behaviour()
        self._next: deque[Behaviour] = deque()
        self._ids = itertools.count(1)
        self.removed: list[tuple[str, float]] = []
        self.deaths: asyncio.Queue[str] = asyncio.Queue()
        self.closed = False
        self.pauses: list[str] = []
        # Stops, removals and ends of log streams in order: ("stop"|"remove"|"log_end", id).
        self.events: list[tuple[str, str]] = []
        # Every log stream asked for: (container id, follow, since_ns).
        self.log_reads: list[tuple[str, bool, int | None]] = []
        # The engine hands out a log chunk at most this often (a slow engine).
        self.log_chunk_delay_s = 0.0
        self.unpauses: list[str] = []
        self.pause_error: Exception | None = None
        self.unpause_delay_s = 0.0
        # Images the engine holds, by the reference they can be found under.
        self.images: dict[str, FakeImage] = {}
        self.pull_default = PullBehaviour()
        self._next_pulls: deque[PullBehaviour] = deque()
        # Every pull asked for: (image_ref, auth).
        self.pulls: list[tuple[str, dict[str, str]]] = []
        self.pulls_cancelled: list[str] = []
        self.pulls_running = 0
        self.removed_images: list[str] = []
        # Images remove_image refuses to delete (a container still uses them).
        self.image_locked: set[str] = set()
        # Docker networks that exist: the platform's, as deploy/network.sh creates them.
        defaults = NetworkSettings()
        self.networks: set[str] = {defaults.network, defaults.network_no_egress}

    # -- test controls -----------------------------------------------------------------

    def queue(self, *behaviours: Behaviour) -> None:
        """Behaviours of the next containers created, in order (then the default)."""
        self._next.extend(behaviours)

    def by_port(self, port: int) -> FakeContainer:
        return next(c for c in self.containers.values() if c.port == port)

    async def exit(self, container_id: str, code: int, *, oom: bool = False) -> None:
        c = self.containers[container_id]
        c.running, c.exit_code, c.oom_killed = False, code, oom
        c.log_changed.set()
        await self._stop_server(c)

    def write_log(
        self,
        container_id: str,
        *lines: bytes | str,
        stream: int = 1,
        ts_ns: int | None = None,
        newline: bool = True,
    ) -> None:
        """The container writes ``lines`` (each its own frame) to stdout (1) or stderr (2),
        received by the engine at ``ts_ns`` (now by default; later lines 1 µs apart)."""
        ts = time.time_ns() if ts_ns is None else ts_ns
        for i, line in enumerate(lines):
            data = line.encode() if isinstance(line, str) else line
            self.write_raw(
                container_id,
                log_frame(data + (b"\n" if newline else b""), stream=stream, ts_ns=ts + i * 1000),
                ts_ns=ts + i * 1000,
            )

    def write_raw(self, container_id: str, chunk: bytes, *, ts_ns: int | None = None) -> None:
        """Raw bytes of the multiplexed stream, exactly as given (frames may be split)."""
        c = self.containers[container_id]
        c.log.append((time.time_ns() if ts_ns is None else ts_ns, chunk))
        c.log_changed.set()

    def live(self) -> list[FakeContainer]:
        return [c for c in self.containers.values() if not c.removed]

    def queue_pulls(self, *behaviours: PullBehaviour) -> None:
        """Behaviours of the next pulls, in order (then ``pull_default``)."""
        self._next_pulls.extend(behaviours)

    def add_image(self, image_ref: str, size_mb: int = 100) -> None:
        """An image the engine already holds (pulled before, by someone)."""
        self.images[image_ref] = FakeImage(size_mb * MiB, [image_ref])

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
        if b.logs:
            self.write_log(container_id, *b.logs)
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

    async def stop(self, container_id: str, timeout_s: float) -> None:
        self.events.append(("stop", container_id))
        c = self.containers[container_id]
        c.running = False
        c.log_changed.set()
        await self._stop_server(c)

    async def remove(self, container_id: str, stop_timeout_s: float) -> None:
        self.events.append(("remove", container_id))
        self.removed.append((container_id, stop_timeout_s))
        c = self.containers[container_id]
        c.running = False
        c.removed = True
        c.log_changed.set()
        await self._stop_server(c)

    async def log_stream(
        self, container_id: str, *, follow: bool = True, since_ns: int | None = None
    ) -> AsyncGenerator[bytes, None]:
        """The container's log as the engine streams it: what is there (from ``since_ns``),
        then, when following, what comes, until the container stops. A removed container's
        stream ends at once: output not read by then is lost, as with the engine."""
        self.log_reads.append((container_id, follow, since_ns))
        c = self.containers[container_id]
        pos = 0
        try:
            while True:
                while pos < len(c.log):
                    if self.log_chunk_delay_s:
                        await asyncio.sleep(self.log_chunk_delay_s)
                    if c.removed:
                        return
                    ts, chunk = c.log[pos]
                    pos += 1
                    if since_ns is None or ts >= since_ns:
                        yield chunk
                if not follow or not c.running or c.removed:
                    return
                c.log_changed.clear()
                await c.log_changed.wait()
        finally:
            self.events.append(("log_end", container_id))

    async def pause(self, container_id: str) -> None:
        if self.pause_error is not None:
            raise self.pause_error
        self.containers[container_id].paused = True
        self.pauses.append(container_id)

    async def unpause(self, container_id: str) -> None:
        if self.unpause_delay_s:
            await asyncio.sleep(self.unpause_delay_s)
        self.containers[container_id].paused = False
        self.unpauses.append(container_id)

    async def list_managed(self) -> list[ManagedContainer]:
        return [ManagedContainer(c.id, dict(c.config.labels)) for c in self.live()]

    async def die_events(self, worker_id: str) -> AsyncIterator[str]:
        while True:
            yield await self.deaths.get()

    async def network_exists(self, name: str) -> bool:
        return name in self.networks

    async def image_size(self, image_ref: str) -> int | None:
        image = self.images.get(image_ref)
        return None if image is None else image.size_bytes

    async def image_digests(self, image_ref: str) -> list[str]:
        image = self.images.get(image_ref)
        return [] if image is None else list(image.digests)

    async def pull(
        self,
        image_ref: str,
        auth: dict[str, str],
        progress: Callable[[dict[str, Any]], None],
    ) -> None:
        self.pulls.append((image_ref, dict(auth)))
        b = self._next_pulls.popleft() if self._next_pulls else self.pull_default
        self.pulls_running += 1
        try:
            if b.delay_s:
                await asyncio.sleep(b.delay_s)
            if b.error is not None:
                raise b.error()
            for event in b.progress:
                progress(event)
        except asyncio.CancelledError:
            self.pulls_cancelled.append(image_ref)
            raise
        finally:
            self.pulls_running -= 1
        held = image_ref
        if b.wrong_digest:
            repository = image_ref.split("@", 1)[0]
            held = f"{repository}@{fake_digest('other content of ' + image_ref)}"
        self.images[held] = FakeImage(b.size_mb * MiB, [held])

    async def remove_image(self, image_ref: str) -> bool:
        if image_ref in self.image_locked:
            return False
        self.images.pop(image_ref, None)
        self.removed_images.append(image_ref)
        return True

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


class FakeTokens:
    """The worker's pull-token source: hands out a fresh token per pull and remembers it
    (so a test can look for it where it must never be)."""

    def __init__(self) -> None:
        self.issued: list[tuple[str, str]] = []
        self.error: Exception | None = None
        self.delay_s = 0.0
        self._n = itertools.count(1)

    async def pull_token(self, repository: str) -> str:
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.error is not None:
            raise self.error
        token = f"tok-{next(self._n)}-s3cr3t-{repository.replace('/', '-')}"
        self.issued.append((repository, token))
        return token


class FakePipeline:
    """``client.pipeline(transaction=...)``: commands are queued and applied together by
    ``execute`` (with transaction=True, all of them or, on a failure, none)."""

    def __init__(self, redis: FakeRedis, transaction: bool) -> None:
        self._redis = redis
        self.transaction = transaction
        self._ops: list[tuple[str, tuple[Any, ...]]] = []
        self._kwargs: list[dict[str, Any]] = []

    async def __aenter__(self) -> FakePipeline:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._ops.clear()

    def _queue(self, name: str, *args: Any, **kwargs: Any) -> FakePipeline:
        self._ops.append((name, args))
        self._kwargs.append(kwargs)
        return self

    def set(self, key: str, value: Any, px: int | None = None) -> FakePipeline:
        return self._queue("set", key, value, px=px)

    def zadd(self, key: str, mapping: dict[str, float]) -> FakePipeline:
        return self._queue("zadd", key, mapping)

    def zremrangebyscore(self, key: str, low: Any, high: Any) -> FakePipeline:
        return self._queue("zremrangebyscore", key, low, high)

    def hset(
        self,
        key: str,
        name: str | None = None,
        value: Any = None,
        mapping: dict[str, Any] | None = None,
    ) -> FakePipeline:
        return self._queue("hset", key, name, value, mapping=mapping)

    def expire(self, key: str, seconds: int) -> FakePipeline:
        return self._queue("expire", key, seconds)

    def hdel(self, key: str, *names: str) -> FakePipeline:
        return self._queue("hdel", key, *names)

    def hget(self, key: str, name: str) -> FakePipeline:
        return self._queue("hget", key, name)

    def hincrby(self, key: str, name: str, amount: int = 1) -> FakePipeline:
        return self._queue("hincrby", key, name, amount)

    def hgetall(self, key: str) -> FakePipeline:
        return self._queue("hgetall", key)

    def get(self, key: str) -> FakePipeline:
        return self._queue("get", key)

    def delete(self, *keys: str) -> FakePipeline:
        return self._queue("delete", *keys)

    async def execute(self) -> list[Any]:
        r = self._redis
        if r.before_execute is not None:
            await r.before_execute([name for name, _ in self._ops])
        # A failure (connection lost, ...) applies none of the queued commands.
        for name, _ in self._ops:
            r._fail_if_told("execute")
            r._fail_if_told(name)
        ops, self._ops = self._ops, []
        kwargs, self._kwargs = self._kwargs, []
        if self.transaction:
            r.transactions.append([(name, args[0]) for name, args in ops])
        results = []
        for (name, args), kw in zip(ops, kwargs, strict=True):
            # None of these suspend: nothing runs between them, as with MULTI/EXEC.
            results.append(await getattr(r, name)(*args, **kw))
        return results


class _FakeBuckets:
    """The rate limiter's token-bucket script (gateway.ratelimit.take over the fake's
    hashes). ``sha`` is empty, so AutoPipeline calls it directly."""

    sha = ""

    def __init__(self, redis: FakeRedis) -> None:
        self._redis = redis

    async def __call__(self, keys: list[str], args: list[Any]) -> list[int]:
        from gateway.ratelimit import Bucket, Limit, take

        self._redis._run("evalsha")
        limits = [
            Limit(k, "", float(args[2 * i]), int(args[2 * i + 1])) for i, k in enumerate(keys)
        ]
        buckets = []
        for k in keys:
            h = self._redis.hashes.get(k)
            buckets.append(Bucket(float(h["tokens"]), float(h["at"])) if h else None)
        after, denied = take(buckets, limits, time.time())
        if denied is not None:
            return [limits.index(denied.limit) + 1, int(denied.wait_s * 1000) + 1]
        for k, bucket in zip(keys, after, strict=True):
            self._redis.hashes[k] = {
                "tokens": str(bucket.tokens).encode(),
                "at": str(bucket.at).encode(),
            }
        return [0, 0]


class FakeRedis:
    """The few commands the registry and the worker use: hashes, strings, ping, and
    pipelines (transactional or not).

    ``fail`` makes a command raise (``fail["hget"] = ConnectionError(...)``);
    ``commands`` lists every command run, ``transactions`` every MULTI/EXEC as
    ``[(command, key), ...]``; ``before_execute`` is awaited before a pipeline runs (to
    interleave concurrent writers in a test).
    """

    def __init__(self) -> None:
        self.hashes: dict[str, dict[str, bytes]] = {}
        self.strings: dict[str, bytes] = {}
        self.zsets: dict[str, dict[str, float]] = {}
        self.streams: dict[str, list[tuple[bytes, dict[bytes, bytes]]]] = {}
        self.ttls_ms: dict[str, int] = {}
        self.ping_error: Exception | None = None
        self.closed = False
        self.fail: dict[str, Exception] = {}
        self.commands: list[str] = []
        self.transactions: list[list[tuple[str, str]]] = []
        self.before_execute: Callable[[list[str]], Awaitable[None]] | None = None

    @staticmethod
    def _b(value: Any) -> bytes:
        return value if isinstance(value, bytes) else str(value).encode()

    async def scan_iter(self, match: str = "*") -> AsyncIterator[bytes]:
        self._run("scan")
        for key in sorted({*self.strings, *self.hashes}):
            if fnmatch.fnmatchcase(key, match):
                yield key.encode()

    async def mget(self, keys: list[Any]) -> list[bytes | None]:
        self._run("mget")
        return [self.strings.get(k.decode() if isinstance(k, bytes) else k) for k in keys]

    def _fail_if_told(self, command: str) -> None:
        err = self.fail.get(command)
        if err is not None:
            raise err

    def _run(self, command: str) -> None:
        self._fail_if_told(command)
        self.commands.append(command)

    def pipeline(self, transaction: bool = True) -> FakePipeline:
        return FakePipeline(self, transaction)

    async def _record_script(self, keys: list[str], args: list[Any]) -> int:
        """shared.invocations' record script: a synchronous call's record, never written
        over another caller's."""
        self._run("evalsha")
        self._fail_if_told("evalsha")
        [key] = keys
        owner = self._b(args[0])
        held = self.hashes.get(key, {}).get("owner")
        if held is not None and held != owner:
            return 0
        pairs = [self._b(a) for a in args[2:]]
        fields = {k.decode(): v for k, v in zip(pairs[::2], pairs[1::2], strict=True)}
        self.hashes.setdefault(key, {}).update({"owner": owner, **fields})
        self.ttls_ms[key] = int(args[1]) * 1000
        return 1

    def register_script(self, script: str) -> Callable[..., Awaitable[Any]]:
        """Only the registry's publish script, the rate limiter's bucket script and the
        synchronous record script are known (their semantics, in Python)."""
        from gateway.ratelimit import TAKE_SCRIPT
        from shared.invocations import _RECORD
        from shared.registry import PUBLISH_SCRIPT

        if script == TAKE_SCRIPT:
            return _FakeBuckets(self)
        if script == _RECORD:
            return self._record_script
        if script != PUBLISH_SCRIPT:
            # Registering is harmless (components register their scripts when built);
            # running one is not something this fake can do.
            async def unknown(keys: list[str], args: list[Any]) -> int:
                raise NotImplementedError("FakeRedis runs only the registry's publish script")

            return unknown

        async def publish(keys: list[str], args: list[Any]) -> int:
            if self.before_execute is not None:
                await self.before_execute(["evalsha"])
            self._run("evalsha")
            versions, functions = keys
            version, raw, name = int(args[0]), self._b(args[1]), str(args[2])
            self.hashes.setdefault(versions, {})[str(version)] = raw
            current = self.hashes.get(functions, {}).get(name)
            self.transactions.append([("hset", versions), ("hset", functions)])
            if current is not None and json.loads(current)["version"] > version:
                return 0
            self.hashes.setdefault(functions, {})[name] = raw
            return 1

        return publish

    async def ping(self) -> bool:
        if self.ping_error is not None:
            raise self.ping_error
        return True

    async def set(self, key: str, value: Any, px: int | None = None, ex: int | None = None) -> bool:
        self._run("set")
        self.strings[key] = self._b(value)
        if px is not None:
            self.ttls_ms[key] = px
        elif ex is not None:
            self.ttls_ms[key] = ex * 1000
        return True

    async def get(self, key: str) -> bytes | None:
        self._run("get")
        return self.strings.get(key)

    async def expire(self, key: str, seconds: int) -> bool:
        self._run("expire")
        self.ttls_ms[key] = int(seconds) * 1000
        return key in self.strings or key in self.hashes

    async def zadd(self, key: str, mapping: dict[str, float]) -> int:
        self._run("zadd")
        zset = self.zsets.setdefault(key, {})
        added = sum(1 for m in mapping if m not in zset)
        zset.update(mapping)
        return added

    async def zrange(self, key: str, start: int, end: int) -> list[bytes]:
        self._run("zrange")
        members = sorted(self.zsets.get(key, {}).items(), key=lambda kv: (kv[1], kv[0]))
        stop = None if end == -1 else end + 1
        return [m.encode() for m, _ in members[start:stop]]

    async def zrem(self, key: str, *members: str) -> int:
        self._run("zrem")
        zset = self.zsets.get(key, {})
        return sum(1 for m in members if zset.pop(m, None) is not None)

    async def zremrangebyscore(self, key: str, low: Any, high: Any) -> int:
        self._run("zremrangebyscore")
        lo = float("-inf") if low == "-inf" else float(low)
        zset = self.zsets.get(key, {})
        gone = [m for m, score in zset.items() if lo <= score <= float(high)]
        for m in gone:
            del zset[m]
        return len(gone)

    async def exists(self, *keys: str) -> int:
        self._run("exists")
        return sum(1 for k in keys if k in self.strings or k in self.hashes)

    async def delete(self, *keys: str) -> int:
        self._run("delete")
        found = 0
        for k in keys:
            if self.strings.pop(k, None) is not None or self.hashes.pop(k, None) is not None:
                found += 1
            self.ttls_ms.pop(k, None)
        return found

    async def hget(self, key: str, name: str) -> bytes | None:
        self._run("hget")
        return self.hashes.get(key, {}).get(name)

    async def hexists(self, key: str, name: str) -> bool:
        self._run("hexists")
        return name in self.hashes.get(key, {})

    async def hset(
        self,
        key: str,
        name: str | None = None,
        value: Any = None,
        mapping: dict[str, Any] | None = None,
    ) -> int:
        self._run("hset")
        h = self.hashes.setdefault(key, {})
        items = dict(mapping or {})
        if name is not None:
            items[name] = value
        new = sum(1 for k in items if k not in h)
        for k, v in items.items():
            h[k] = self._b(v)
        return new

    async def hincrby(self, key: str, name: str, amount: int = 1) -> int:
        self._run("hincrby")
        h = self.hashes.setdefault(key, {})
        value = int(h.get(name, b"0")) + amount
        h[name] = self._b(value)
        return value

    async def hgetall(self, key: str) -> dict[bytes, bytes]:
        self._run("hgetall")
        return {k.encode(): v for k, v in self.hashes.get(key, {}).items()}

    async def hdel(self, key: str, *names: str) -> int:
        self._run("hdel")
        h = self.hashes.get(key, {})
        removed = sum(1 for n in names if h.pop(n, None) is not None)
        if key in self.hashes and not h:
            del self.hashes[key]  # Redis drops empty hashes
        return removed

    async def xadd(
        self,
        key: str,
        fields: dict[str, Any],
        maxlen: int | None = None,
        approximate: bool = True,
    ) -> bytes:
        self._run("xadd")
        entries = self.streams.setdefault(key, [])
        entry_id = f"{len(entries) + 1}-0".encode()
        entries.append((entry_id, {k.encode(): self._b(v) for k, v in fields.items()}))
        if maxlen is not None:
            del entries[: max(0, len(entries) - maxlen)]
        return entry_id

    async def xrevrange(
        self, key: str, count: int | None = None
    ) -> list[tuple[bytes, dict[bytes, bytes]]]:
        self._run("xrevrange")
        newest_first = list(reversed(self.streams.get(key, [])))
        return newest_first if count is None else newest_first[:count]

    async def aclose(self) -> None:
        self.closed = True
