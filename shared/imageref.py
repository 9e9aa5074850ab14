"""Image references: ``[registry/]repository[:tag][@digest]``, parsed strictly.

Function images live in the platform's registry; a reference without a registry host
means a repository there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from shared.errors import InvalidSpec

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
REPOSITORY_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*\Z")
TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}\Z")
DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}\Z")


@dataclass(frozen=True)
class ImageRef:
    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def reference(self) -> str:
        """What to ask the registry's manifest endpoint for: the digest, else the tag."""
        return self.digest or self.tag or "latest"

    def pinned(self, digest: str) -> str:
        return f"{self.registry}/{self.repository}@{digest}"

    def __str__(self) -> str:
        out = f"{self.registry}/{self.repository}"
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out


def _bad(ref: str, why: str) -> InvalidSpec:
    return InvalidSpec({"image": f"{ref!r} is not a valid image reference: {why}"})


def parse_image_ref(ref: str, default_registry: str) -> ImageRef:
    rest = ref.strip()
    digest: str | None = None
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        if not DIGEST_RE.match(digest):
            raise _bad(ref, "the digest must be sha256: and 64 hex digits")
    registry = default_registry
    first, sep, remainder = rest.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        registry, rest = first, remainder
    tag: str | None = None
    last_slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > last_slash:
        rest, tag = rest[:colon], rest[colon + 1 :]
        if not TAG_RE.match(tag):
            raise _bad(ref, f"tag {tag!r} is not valid")
    if not REPOSITORY_RE.match(rest):
        raise _bad(ref, "the repository must be lowercase letters, digits and separators")
    if tag is None and digest is None:
        tag = "latest"
    return ImageRef(registry=registry, repository=rest, tag=tag, digest=digest)
