"""Client-side image work for ``imagefn deploy``: build a function's image from its
directory and push it to the platform registry, showing progress.

The push authenticates as the deployer through the Engine API (X-Registry-Auth): the
engine does the registry's token dance itself, and no credential is written to disk
(``docker login`` would store it in ~/.docker/config.json).
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import aiodocker
from aiodocker.exceptions import DockerError

from shared.imageref import ImageRef, parse_image_ref
from shared.settings import Settings


class ImageBuildError(Exception):
    pass


def target_ref(image: str, settings: Settings) -> ImageRef:
    return parse_image_ref(image, settings.registry.address)


async def _build_and_push(context: Path, ref: ImageRef, settings: Settings) -> None:
    name = f"{ref.registry}/{ref.repository}"
    tag = ref.tag or "latest"
    docker = aiodocker.Docker(url=settings.worker.docker_url)
    try:
        print(f"==> building {name}:{tag} from {context}", file=sys.stderr)
        # The docker CLI shows build progress best and reads .dockerignore; it needs no
        # credential (base images are local).
        # Build on the same engine the push talks to.
        env = dict(os.environ)
        if settings.worker.docker_url:
            env["DOCKER_HOST"] = settings.worker.docker_url
        proc = await asyncio.create_subprocess_exec(
            "docker", "build", "-t", f"{name}:{tag}", str(context), env=env
        )
        if await proc.wait() != 0:
            raise ImageBuildError(f"docker build of {context} failed")
        print(f"==> pushing {name}:{tag} to {ref.registry}", file=sys.stderr)
        auth = {
            "username": settings.registry.deploy_user,
            "password": settings.registry.deploy_password,
            "serveraddress": ref.registry,
        }
        last = ""
        async for event in docker.images.push(name, tag=tag, auth=auth, stream=True):
            if "error" in event:
                raise ImageBuildError(f"push of {name}:{tag} failed: {event['error']}")
            line = " ".join(str(event.get(k, "")) for k in ("id", "status") if event.get(k))
            if line and line != last and "progress" not in event:
                print(f"    {line}", file=sys.stderr)
                last = line
    except DockerError as e:
        raise ImageBuildError(f"Docker engine: {e.message}") from None
    finally:
        await docker.close()


def build_and_push(context: Path, image: str, settings: Settings) -> str:
    """Build ``context`` as ``image`` in the platform registry and push it; returns the
    full reference pushed (registry/repository:tag)."""
    if not (context / "Dockerfile").is_file():
        raise ImageBuildError(f"no Dockerfile in {context}")
    if not settings.registry.deploy_password:
        raise ImageBuildError(
            "IMAGEFN_DEPLOY_PASSWORD is not set (deploy/setup.sh writes it to "
            "/var/lib/imagefn/credentials.env)"
        )
    ref = target_ref(image, settings)
    asyncio.run(_build_and_push(context, ref, settings))
    return f"{ref.registry}/{ref.repository}:{ref.tag or 'latest'}"
