"""The container runtime the pool drives: a small interface, with the Docker Engine API
(aiodocker) behind it. Unit tests use a fake with the same interface.

Only this module talks to Docker, and it translates Docker's failures into the
contract's error types at the boundary.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiodocker
import aiohttp
import structlog
from aiodocker.exceptions import DockerError

from shared.errors import ContainerInitError, PullImageFailed, ServiceUnavailable

log = structlog.get_logger("imagefn.runtime")

MiB = 1024 * 1024
# Bound on the engine's read-only queries (inspect, log tail): they wait for the
# container's lock inside the engine, which an engine operation stuck on that container
# never releases; a caller must get an error rather than wait for good.
ENGINE_QUERY_TIMEOUT_S = 30.0
LABEL_MANAGED = "imagefn.managed"
LABEL_WORKER = "imagefn.worker"
LABEL_FUNCTION = "imagefn.function"
LABEL_INSTANCE = "imagefn.instance"
# The installation (Redis key prefix): two installations may share one Docker engine, and
# each must only clean up its own containers.
LABEL_INSTALLATION = "imagefn.installation"


@dataclass(frozen=True)
class ContainerConfig:
    name: str
    image: str
    command: tuple[str, ...] | None
    args: tuple[str, ...] | None
    env: dict[str, str]
    labels: dict[str, str]
    # The function's memory; its /tmp (a tmpfs, so memory too) has a budget of its own,
    # added to the container's limit so that files in /tmp never eat into memory_mb.
    memory_mb: int
    cpus: float
    pids_limit: int
    nofile_limit: int
    tmp_mb: int
    # The Docker network (workers/sandbox.py picks it by the spec's egress).
    network: str
    # The engine's log of the instance: at most ``log_files`` files of ``log_max_mb`` each,
    # so a chatty instance's disk use is bounded. Docker 20.10 follows a rotating file
    # unreliably (workers/logship.py copes), so files are large enough that rotation is
    # rare within one instance's life. "local" keeps output byte for byte (json-file
    # turns bytes that are not UTF-8 into U+FFFD) and costs the engine less per line.
    log_max_mb: int = 64
    log_files: int = 2
    log_driver: str = "local"

    def _log_options(self) -> dict[str, str]:
        options = {"max-size": f"{self.log_max_mb}m", "max-file": str(self.log_files)}
        if self.log_driver == "local":
            # Gzipping a full file at rotation would cost the engine a CPU-second in the
            # middle of a burst of output.
            options["compress"] = "false"
        return options

    def to_docker(self) -> dict[str, Any]:
        """The Engine API create body: the sandbox every function instance runs in."""
        # A ceiling, not a reservation of pages: memory_mb for the process plus tmp_mb
        # for what it writes to /tmp (tmpfs pages are charged to the container).
        memory = (self.memory_mb + self.tmp_mb) * MiB
        body: dict[str, Any] = {
            "Image": self.image,
            "Env": [f"{k}={v}" for k, v in self.env.items()],
            "Labels": self.labels,
            "ExposedPorts": {"9000/tcp": {}},
            "HostConfig": {
                # Ephemeral host port on loopback only: nothing outside the machine can
                # reach an instance except through the gateway.
                "PortBindings": {"9000/tcp": [{"HostIp": "127.0.0.1", "HostPort": ""}]},
                "Memory": memory,
                "MemorySwap": memory,  # no swap: memory_mb + tmp_mb is the whole budget
                "NanoCpus": int(self.cpus * 1e9),
                "PidsLimit": self.pids_limit,
                "ReadonlyRootfs": True,
                # The only writable place; full at tmp_mb (ENOSPC), whatever the heap uses.
                "Tmpfs": {"/tmp": f"rw,nosuid,nodev,size={self.tmp_mb}m"},
                "CapDrop": ["ALL"],
                "SecurityOpt": ["no-new-privileges"],
                "Ulimits": [
                    {"Name": "nofile", "Soft": self.nofile_limit, "Hard": self.nofile_limit}
                ],
                "LogConfig": {"Type": self.log_driver, "Config": self._log_options()},
                # A platform network (deploy/network.sh): instances reach neither each
                # other nor the host and the platform's services; the port published on
                # 127.0.0.1 still reaches the instance from the host.
                "NetworkMode": self.network,
                "Init": False,
            },
        }
        # The contract: Command and Args override the image's ENTRYPOINT and CMD.
        if self.command is not None:
            body["Entrypoint"] = list(self.command)
        if self.args is not None:
            body["Cmd"] = list(self.args)
        return body


@dataclass(frozen=True)
class ContainerState:
    running: bool
    status: str
    exit_code: int | None = None
    oom_killed: bool = False
    error: str = ""
    pid: int = 0


@dataclass(frozen=True)
class ManagedContainer:
    id: str
    labels: dict[str, str] = field(default_factory=dict)


class ContainerRuntime(Protocol):
    async def create(self, config: ContainerConfig) -> str: ...
    async def start(self, container_id: str) -> None: ...
    async def host_port(self, container_id: str) -> int: ...
    async def state(self, container_id: str) -> ContainerState: ...
    async def logs_tail(self, container_id: str, lines: int) -> list[str]: ...
    async def stop(self, container_id: str, timeout_s: float) -> None: ...
    async def remove(self, container_id: str, stop_timeout_s: float) -> None: ...
    def log_stream(
        self, container_id: str, *, follow: bool = True, since_ns: int | None = None
    ) -> AsyncGenerator[bytes, None]: ...
    async def pause(self, container_id: str) -> None: ...
    async def unpause(self, container_id: str) -> None: ...
    async def list_managed(self) -> list[ManagedContainer]: ...
    def die_events(self, worker_id: str) -> AsyncIterator[str]: ...
    async def network_exists(self, name: str) -> bool: ...
    async def image_size(self, image_ref: str) -> int | None: ...
    async def image_digests(self, image_ref: str) -> list[str]: ...
    async def pull(
        self, image_ref: str, auth: dict[str, str], progress: Callable[[dict[str, Any]], None]
    ) -> None: ...
    async def remove_image(self, image_ref: str) -> bool: ...
    async def close(self) -> None: ...


def _docker_message(e: DockerError) -> str:
    msg = e.message if isinstance(e.message, str) else str(e.message)
    return msg.strip()


class DockerRuntime:
    """ContainerRuntime over the Docker Engine API."""

    def __init__(
        self,
        docker: aiodocker.Docker,
        streams: aiodocker.Docker | None = None,
        query_timeout_s: float = ENGINE_QUERY_TIMEOUT_S,
    ) -> None:
        self._docker = docker
        self._query_timeout_s = query_timeout_s
        # Log streams hold one connection per running container for its whole life: on
        # the main client they would use up its connection pool (100) and stall every
        # other engine call, so they get a client of their own where that is possible.
        self._streams = streams or docker

    @classmethod
    def connect(cls, url: str | None) -> DockerRuntime:
        docker = aiodocker.Docker(url=url)
        streams = None
        # The engine's socket, as the main client resolved it (url, DOCKER_HOST, or the
        # default paths); aiodocker itself addresses it as "unix://localhost".
        main = getattr(docker, "connector", None)
        if isinstance(main, aiohttp.UnixConnector):
            streams = aiodocker.Docker(
                url="unix://localhost", connector=aiohttp.UnixConnector(main.path, limit=0)
            )
        return cls(docker, streams)

    async def close(self) -> None:
        if self._streams is not self._docker:
            await self._streams.close()
            # aiodocker leaves a connector it was given open.
            await self._streams.connector.close()
        await self._docker.close()

    async def create(self, config: ContainerConfig) -> str:
        try:
            container = await self._docker.containers.create(config.to_docker(), name=config.name)
        except DockerError as e:
            if e.status == 404:
                raise ContainerInitError(
                    f"image {config.image} is not present on this worker: {_docker_message(e)}"
                ) from e
            raise ContainerInitError(f"container create failed: {_docker_message(e)}") from e
        return str(container.id)

    async def start(self, container_id: str) -> None:
        try:
            await self._docker.containers.container(container_id).start()
        except DockerError as e:
            # The engine refuses to start a container whose Command does not exist or
            # cannot be executed; that is the user's Command/Args, not the platform.
            raise ContainerInitError(f"container could not start: {_docker_message(e)}") from e

    async def _inspect(self, container_id: str) -> dict[str, Any]:
        try:
            async with asyncio.timeout(self._query_timeout_s):
                data: dict[str, Any] = await self._docker.containers.container(container_id).show()
            return data
        except DockerError as e:
            if e.status == 404:
                return {}
            raise ServiceUnavailable(f"docker inspect failed: {_docker_message(e)}") from e
        except TimeoutError:
            raise ServiceUnavailable(self._no_answer("inspect", container_id[:12])) from None

    def _no_answer(self, call: str, subject: str) -> str:
        # The engine answers a query on a container only once it holds that container's
        # lock; a container stuck in an engine operation would hang the caller for good.
        return f"docker {call} of {subject} got no answer within {self._query_timeout_s:g} s"

    async def host_port(self, container_id: str) -> int:
        data = await self._inspect(container_id)
        ports = (data.get("NetworkSettings") or {}).get("Ports") or {}
        bindings = ports.get("9000/tcp") or []
        for b in bindings:
            if b.get("HostIp") in ("127.0.0.1", "") and b.get("HostPort"):
                return int(b["HostPort"])
        raise ContainerInitError("the engine published no host port for 9000/tcp")

    async def state(self, container_id: str) -> ContainerState:
        data = await self._inspect(container_id)
        st = data.get("State") or {}
        if not st:
            return ContainerState(running=False, status="removed")
        return ContainerState(
            running=bool(st.get("Running")) and not bool(st.get("Restarting")),
            status=str(st.get("Status", "")),
            exit_code=st.get("ExitCode"),
            oom_killed=bool(st.get("OOMKilled")),
            error=str(st.get("Error") or ""),
            pid=int(st.get("Pid") or 0),
        )

    async def logs_tail(self, container_id: str, lines: int) -> list[str]:
        try:
            async with asyncio.timeout(self._query_timeout_s):
                out = await self._docker.containers.container(container_id).log(
                    stdout=True, stderr=True, tail=lines
                )
        except (DockerError, TimeoutError):
            return []  # only ever an error message's context
        return [str(line).rstrip("\n") for line in out]

    async def stop(self, container_id: str, timeout_s: float) -> None:
        """SIGTERM, then SIGKILL after ``timeout_s`` (at once for 0); the container stays."""
        with contextlib.suppress(DockerError):  # gone or already stopped: nothing to do
            await self._docker.containers.container(container_id).stop(t=max(0, int(timeout_s)))

    async def log_stream(
        self, container_id: str, *, follow: bool = True, since_ns: int | None = None
    ) -> AsyncGenerator[bytes, None]:
        """The container's stdout and stderr as the engine's raw multiplexed stream (8-byte
        frame headers, each payload led by an RFC 3339 timestamp), in chunks as they come.
        Following ends when the container stops; ``since_ns`` (inclusive) skips older
        output. An engine error ends the stream with ServiceUnavailable."""
        params: dict[str, str] = {"stdout": "1", "stderr": "1", "timestamps": "1"}
        if follow:
            params["follow"] = "1"
        if since_ns is not None:
            params["since"] = f"{since_ns // 1_000_000_000}.{since_ns % 1_000_000_000:09d}"
        try:
            async with self._streams._query(
                f"containers/{container_id}/logs", method="GET", params=params, timeout=None
            ) as resp:
                while chunk := await resp.content.readany():
                    yield chunk
        except DockerError as e:
            raise ServiceUnavailable(f"docker logs failed: {_docker_message(e)}") from e

    async def remove(self, container_id: str, stop_timeout_s: float) -> None:
        container = self._docker.containers.container(container_id)
        with contextlib.suppress(DockerError):
            # SIGTERM first so a server can finish cleanly, then the engine kills it.
            await container.stop(t=max(0, int(stop_timeout_s)))
        try:
            await container.delete(force=True)
        except DockerError as e:
            if e.status not in (404, 409):
                raise

    async def pause(self, container_id: str) -> None:
        try:
            await self._docker.containers.container(container_id).pause()
        except DockerError as e:
            raise ServiceUnavailable(f"docker pause failed: {_docker_message(e)}") from e

    async def unpause(self, container_id: str) -> None:
        try:
            await self._docker.containers.container(container_id).unpause()
        except DockerError as e:
            raise ServiceUnavailable(f"docker unpause failed: {_docker_message(e)}") from e

    async def list_managed(self) -> list[ManagedContainer]:
        items = await self._docker.containers.list(
            all=True, filters=json.dumps({"label": [f"{LABEL_MANAGED}=1"]})
        )
        return [
            ManagedContainer(id=str(c.id), labels=dict(c._container.get("Labels") or {}))
            for c in items
        ]

    async def die_events(self, worker_id: str) -> AsyncIterator[str]:
        """Yield the ids of this worker's containers as they die (exit, OOM, docker kill)."""
        params = {
            "filters": (
                f'{{"type":["container"],"event":["die"],"label":["{LABEL_WORKER}={worker_id}"]}}'
            )
        }
        async with self._docker._query("events", method="GET", params=params, timeout=None) as resp:
            async for line in resp.content:
                if not line.strip():
                    continue
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                cid = event.get("id") or (event.get("Actor") or {}).get("ID")
                if cid:
                    yield str(cid)

    async def network_exists(self, name: str) -> bool:
        try:
            async with asyncio.timeout(self._query_timeout_s):
                await self._docker.networks.get(name)
        except DockerError as e:
            if e.status == 404:
                return False
            raise ServiceUnavailable(f"docker network inspect failed: {_docker_message(e)}") from e
        except TimeoutError:
            raise ServiceUnavailable(self._no_answer("network inspect", name)) from None
        return True

    # -- images ----------------------------------------------------------------------------

    async def _image(self, image_ref: str) -> dict[str, Any] | None:
        try:
            async with asyncio.timeout(self._query_timeout_s):
                data: dict[str, Any] = await self._docker.images.inspect(image_ref)
        except DockerError as e:
            if e.status == 404:
                return None
            raise ServiceUnavailable(f"docker image inspect failed: {_docker_message(e)}") from e
        except TimeoutError:
            raise ServiceUnavailable(self._no_answer("image inspect", image_ref)) from None
        return data

    async def image_size(self, image_ref: str) -> int | None:
        data = await self._image(image_ref)
        return None if data is None else int(data.get("Size") or 0)

    async def image_digests(self, image_ref: str) -> list[str]:
        data = await self._image(image_ref)
        return [str(d) for d in (data or {}).get("RepoDigests") or []]

    async def pull(
        self, image_ref: str, auth: dict[str, str], progress: Callable[[dict[str, Any]], None]
    ) -> None:
        try:
            async for event in self._docker.images.pull(image_ref, auth=auth, stream=True):
                if "error" in event:
                    raise PullImageFailed(_pull_reason(image_ref, str(event["error"])))
                progress(event)
        except DockerError as e:
            raise PullImageFailed(_pull_reason(image_ref, _docker_message(e))) from None

    async def remove_image(self, image_ref: str) -> bool:
        try:
            await self._docker.images.delete(image_ref)
        except DockerError as e:
            if e.status == 404:
                return True
            # 409: a container still uses it; keep it for now.
            return False
        return True


def _pull_reason(image_ref: str, message: str) -> str:
    low = message.lower()
    if "unauthorized" in low or "authentication required" in low or "denied" in low:
        why = "the registry refused the credential"
    elif "manifest unknown" in low or "not found" in low:
        why = "the image is no longer in the registry"
    elif "connection refused" in low or "no such host" in low or "timeout" in low:
        why = "the registry is unreachable"
    else:
        why = "the pull failed"
    return f"cannot pull {image_ref}: {why} ({message.strip()[:300]})"


async def wait_for_exit(
    runtime: ContainerRuntime, container_id: str, within_s: float
) -> ContainerState:
    """Poll until the container is no longer running or ``within_s`` passes.

    A server process that dies closes its sockets a moment before the engine records the
    exit, so a broken connection is only classified after this short wait.
    """
    loop = asyncio.get_running_loop()
    end = loop.time() + within_s
    state = await runtime.state(container_id)
    while state.running and loop.time() < end:
        await asyncio.sleep(0.02)
        state = await runtime.state(container_id)
    return state
