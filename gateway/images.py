"""Resolving a spec's image at deploy time: tag → manifest digest, in the platform registry.

The deployed version is pinned to ``registry/repository@sha256:...``; pushing new content
under the same tag changes nothing until the next deploy. Deploy refuses, with the reason,
an image reference that does not parse, one the registry does not hold, and one without a
manifest for the workers' platform.
"""

from __future__ import annotations

import platform
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp

from shared.errors import InvalidSpec, ServiceUnavailable
from shared.imageref import ImageRef, parse_image_ref

MANIFEST_TYPES = ", ".join(
    [
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    ]
)
INDEX_TYPES = frozenset(
    {
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    }
)
REGISTRY_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class ResolvedImage:
    ref: str  # registry/repository@sha256:...
    digest: str


class ImageResolver(Protocol):
    async def resolve(self, image: str) -> ResolvedImage: ...
    async def close(self) -> None: ...


# Returns a bearer token that may pull ``repository``.
PullTokenSource = Callable[[str], Awaitable[str]]


def local_platform() -> tuple[str, str]:
    """The (os, architecture) the workers run, in OCI terms."""
    machine = platform.machine().lower()
    arch = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm"}.get(machine, machine)
    return "linux", arch


class RegistryImageResolver:
    def __init__(
        self,
        registry: str,
        pull_token: PullTokenSource,
        *,
        want_platform: tuple[str, str] | None = None,
    ) -> None:
        self._registry = registry
        self._pull_token = pull_token
        self._platform = want_platform or local_platform()
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=REGISTRY_TIMEOUT_S)
        )

    async def close(self) -> None:
        await self._session.close()

    async def resolve(self, image: str) -> ResolvedImage:
        ref = parse_image_ref(image, self._registry)
        if ref.registry != self._registry:
            raise InvalidSpec(
                {
                    "image": f"{image!r} names registry {ref.registry}; function images must "
                    f"be in the platform registry {self._registry}"
                }
            )
        token = await self._pull_token(ref.repository)
        status, headers, manifest = await self._get(
            ref, f"manifests/{ref.reference}", token, accept=MANIFEST_TYPES
        )
        if status == 404:
            raise InvalidSpec(
                {
                    "image": f"{image!r} is not in the registry ({ref.repository}:{ref.reference} "
                    "not found); push it first"
                }
            )
        if status != 200:
            raise ServiceUnavailable(f"registry answered HTTP {status} for {image!r}")
        digest = headers.get("Docker-Content-Digest", "")
        if not digest.startswith("sha256:"):
            raise ServiceUnavailable(f"registry gave no digest for {image!r}")
        if ref.digest and digest != ref.digest:
            raise InvalidSpec({"image": f"registry holds {digest} under {image!r}"})
        await self._check_platform(ref, image, manifest, headers, token)
        return ResolvedImage(ref=ref.pinned(digest), digest=digest)

    async def _check_platform(
        self,
        ref: ImageRef,
        image: str,
        manifest: dict[str, Any],
        headers: dict[str, str],
        token: str,
    ) -> None:
        want = "/".join(self._platform)
        media_type = manifest.get("mediaType") or headers.get("Content-Type", "")
        if media_type in INDEX_TYPES or "manifests" in manifest:
            found = [
                f"{(m.get('platform') or {}).get('os')}/"
                f"{(m.get('platform') or {}).get('architecture')}"
                for m in manifest.get("manifests", [])
            ]
            if want not in found:
                raise InvalidSpec(
                    {"image": f"{image!r} has no manifest for {want} (it has {', '.join(found)})"}
                )
            return
        config_digest = (manifest.get("config") or {}).get("digest")
        if not config_digest:
            raise InvalidSpec({"image": f"{image!r}: manifest without an image config"})
        status, _, config = await self._get(ref, f"blobs/{config_digest}", token)
        if status != 200:
            raise ServiceUnavailable(f"registry answered HTTP {status} for {image!r}'s config")
        have = f"{config.get('os')}/{config.get('architecture')}"
        if have != want:
            raise InvalidSpec({"image": f"{image!r} is built for {have}; workers run {want}"})

    async def _get(
        self, ref: ImageRef, path: str, token: str, accept: str | None = None
    ) -> tuple[int, dict[str, str], dict[str, Any]]:
        url = f"http://{ref.registry}/v2/{ref.repository}/{path}"
        headers = {"Authorization": f"Bearer {token}"}
        if accept:
            headers["Accept"] = accept
        try:
            async with self._session.get(url, headers=headers) as resp:
                body: dict[str, Any] = {}
                if resp.status == 200:
                    body = await resp.json(content_type=None)
                return resp.status, dict(resp.headers), body
        except (aiohttp.ClientError, TimeoutError) as e:
            raise ServiceUnavailable(f"registry {ref.registry} unreachable: {e}") from e


class UncheckedImageResolver:
    """Accepts any reference as is, with no registry (unit tests only)."""

    async def resolve(self, image: str) -> ResolvedImage:
        return ResolvedImage(ref=image, digest="")

    async def close(self) -> None:
        return None
