"""Resolving a spec's image reference at deploy time.

For now images come from the local Docker engine; the tag is resolved to the image id
once, at deploy, and instances run exactly that id (rebuilding the tag changes nothing
until the next deploy).
"""

from __future__ import annotations

from typing import Protocol

import aiodocker
from aiodocker.exceptions import DockerError

from shared.errors import InvalidSpec, ServiceUnavailable


class ImageResolver(Protocol):
    async def resolve(self, ref: str) -> str: ...
    async def close(self) -> None: ...


class LocalImageResolver:
    def __init__(self, docker_url: str | None) -> None:
        self._docker = aiodocker.Docker(url=docker_url)

    async def resolve(self, ref: str) -> str:
        try:
            data = await self._docker.images.inspect(ref)
        except DockerError as e:
            if e.status == 404:
                raise InvalidSpec(
                    {"image": f"image {ref!r} does not exist in the local Docker engine"}
                ) from None
            if e.status == 900:
                raise ServiceUnavailable(f"Docker engine unavailable: {e.message}") from e
            raise InvalidSpec({"image": f"image {ref!r} cannot be used: {e.message}"}) from None
        return str(data["Id"])

    async def close(self) -> None:
        await self._docker.close()


class UncheckedImageResolver:
    """Accepts any reference as is (settings: check_images=false)."""

    async def resolve(self, ref: str) -> str:
        return ref

    async def close(self) -> None:
        return None
