"""The worker's image store: pulls function images by digest, with a temporary credential,
once per digest however many instances start at the same time, and garbage-collects
unused images by least recent use when they take more room than allowed.

The credential is a short-lived registry token scoped to pulling that one repository. It
is fetched from the gateway's token service when a pull starts, handed to the engine for
that pull only, and dropped: it is never logged, written to disk or put in a container.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp
import structlog

from shared.errors import ImagefnError, PullImageFailed, PullImageTimeout
from shared.imageref import parse_image_ref
from shared.settings import WORKER_USER, RegistrySettings
from workers.runtime import ContainerRuntime
from workers.sandbox import check_image

log = structlog.get_logger("imagefn.images")

MiB = 1024 * 1024
TOKEN_TIMEOUT_S = 10.0


class TokenSource:
    """Fetches pull-only tokens from the gateway's token service as the worker principal."""

    def __init__(self, settings: RegistrySettings, session: aiohttp.ClientSession) -> None:
        self._s = settings
        self._session = session

    async def pull_token(self, repository: str) -> str:
        params = {"service": self._s.service, "scope": f"repository:{repository}:pull"}
        basic = base64.b64encode(f"{WORKER_USER}:{self._s.worker_secret}".encode()).decode()
        try:
            async with self._session.get(
                self._s.token_url,
                params=params,
                headers={"Authorization": f"Basic {basic}"},
                timeout=aiohttp.ClientTimeout(total=TOKEN_TIMEOUT_S),
            ) as resp:
                if resp.status != 200:
                    # The body is our own error JSON; it never holds a credential.
                    detail = (await resp.text())[:300]
                    raise PullImageFailed(
                        f"the token service refused a pull token for {repository} "
                        f"(HTTP {resp.status}): {detail}"
                    )
                token = (await resp.json()).get("token")
        except (aiohttp.ClientError, TimeoutError) as e:
            raise PullImageFailed(f"token service unreachable at {self._s.token_url}: {e}") from e
        if not isinstance(token, str) or not token:
            raise PullImageFailed("the token service answered without a token")
        return token


@dataclass
class _Cached:
    size_bytes: int
    last_used: float


class ImageStore:
    def __init__(
        self,
        runtime: ContainerRuntime,
        pull_token: Callable[[str], Awaitable[str]],
        settings: RegistrySettings,
        in_use: Callable[[], set[str]],
    ) -> None:
        self._runtime = runtime
        self._pull_token = pull_token
        self._s = settings
        self._in_use = in_use
        self._pulls: dict[str, asyncio.Task[None]] = {}
        self._cached: dict[str, _Cached] = {}
        # Two pulls finishing together must not both collect (and both remove) one image.
        self._gc_lock = asyncio.Lock()
        self._gc_tasks: set[asyncio.Task[None]] = set()

    def check(self, image_ref: str, digest: str = "") -> None:
        """Raise PullImageFailed unless ``image_ref`` is the platform registry's, pinned by
        digest (``digest``, when given, must be its digest)."""
        check_image(image_ref, self._s.address, digest)

    async def ensure(self, image_ref: str) -> float:
        """Make ``image_ref`` (registry/repository@sha256:...) present; returns seconds
        spent pulling (0 when it already was). Concurrent callers for one digest share one
        pull. A reference check_image refuses is neither looked up nor pulled."""
        self.check(image_ref)
        size = await self._runtime.image_size(image_ref)
        if size is not None:
            self._touch(image_ref, size)
            return 0.0
        started = time.monotonic()
        task = self._pulls.get(image_ref)
        if task is None:
            task = asyncio.create_task(self._pull(image_ref), name=f"pull-{image_ref[-12:]}")
            self._pulls[image_ref] = task
            task.add_done_callback(lambda _t: self._pulls.pop(image_ref, None))
        # shield: one waiter giving up must not cancel the pull for the others.
        await asyncio.shield(task)
        return time.monotonic() - started

    def _touch(self, image_ref: str, size_bytes: int | None = None) -> None:
        entry = self._cached.get(image_ref)
        if entry is None:
            self._cached[image_ref] = _Cached(size_bytes or 0, time.monotonic())
        else:
            entry.last_used = time.monotonic()
            if size_bytes is not None:
                entry.size_bytes = size_bytes

    async def _pull(self, image_ref: str) -> None:
        ref = parse_image_ref(image_ref, self._s.address)
        if not ref.digest:
            raise PullImageFailed(f"{image_ref} is not pinned by digest; redeploy the function")
        log.info("image_pull_started", image=image_ref)
        started = time.monotonic()
        try:
            async with asyncio.timeout(self._s.pull_timeout_s):
                token = await self._pull_token(ref.repository)
                await self._runtime.pull(image_ref, {"registrytoken": token}, _progress_logger())
                del token  # used for this pull only
        except TimeoutError:
            raise PullImageTimeout(
                f"pulling {image_ref} took longer than {self._s.pull_timeout_s:g} s"
            ) from None
        except ImagefnError:
            raise
        size = await self._runtime.image_size(image_ref)
        digests = await self._runtime.image_digests(image_ref)
        if size is None or image_ref not in digests:
            raise PullImageFailed(
                f"pulled {image_ref} but the engine holds {', '.join(digests) or 'nothing'}"
            )
        self._touch(image_ref, size)
        log.info(
            "image_pulled",
            image=image_ref,
            seconds=round(time.monotonic() - started, 3),
            size_mb=round(size / MiB, 1),
        )
        # Clean up after the caller has its instance, not on its cold-start path.
        task = asyncio.create_task(self._collect_quietly(), name="image-gc")
        self._gc_tasks.add(task)
        task.add_done_callback(self._gc_tasks.discard)

    async def collections_done(self) -> None:
        """Wait for clean-ups started by pulls (at shutdown, and in tests)."""
        while self._gc_tasks:
            await asyncio.gather(*self._gc_tasks, return_exceptions=True)

    async def _collect_quietly(self) -> None:
        try:
            await self.collect_garbage()
        except Exception:
            # The pull succeeded; a failed clean-up must not fail anything.
            log.exception("image_collection_failed")

    async def collect_garbage(self) -> list[str]:
        """Remove least recently used function images (pulled or found present), not used
        by any instance, until they fit in ``image_cache_mb``."""
        async with self._gc_lock:
            return await self._collect()

    async def _collect(self) -> list[str]:
        limit = self._s.image_cache_mb * MiB
        total = sum(c.size_bytes for c in self._cached.values())
        if total <= limit:
            return []
        busy = self._in_use() | set(self._pulls)
        removed: list[str] = []
        for ref, entry in sorted(self._cached.items(), key=lambda kv: kv[1].last_used):
            if total <= limit:
                break
            if ref in busy:
                continue
            if await self._runtime.remove_image(ref):
                total -= entry.size_bytes
                removed.append(ref)
                self._cached.pop(ref, None)
                log.info("image_collected", image=ref, size_mb=round(entry.size_bytes / MiB, 1))
        return removed


def _progress_logger() -> Callable[[dict[str, object]], None]:
    """Logs pull progress at most once a second, and every finished layer."""
    last = 0.0

    def report(event: dict[str, object]) -> None:
        nonlocal last
        status = str(event.get("status", ""))
        now = time.monotonic()
        if status in ("Pull complete", "Already exists") or now - last >= 1.0:
            last = now
            log.info(
                "image_pull_progress",
                status=status,
                layer=event.get("id"),
                progress=event.get("progress"),
            )

    return report
