"""shared.imageref.parse_image_ref: ``[registry/]repository[:tag][@digest]``, strictly."""

from __future__ import annotations

import pytest

from shared.errors import InvalidSpec
from shared.imageref import ImageRef, parse_image_ref

DEFAULT = "127.0.0.1:5000"
DIGEST = "sha256:" + "0123456789abcdef" * 4


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("app", ImageRef(DEFAULT, "app", "latest", None)),
        ("team/app:1.2", ImageRef(DEFAULT, "team/app", "1.2", None)),
        ("a/b/c:v_1-x", ImageRef(DEFAULT, "a/b/c", "v_1-x", None)),
        ("team/app:1@" + DIGEST, ImageRef(DEFAULT, "team/app", "1", DIGEST)),
        ("team/app@" + DIGEST, ImageRef(DEFAULT, "team/app", None, DIGEST)),
        # The first component is a registry host when it looks like one.
        ("localhost/app", ImageRef("localhost", "app", "latest", None)),
        ("localhost:5000/app:2", ImageRef("localhost:5000", "app", "2", None)),
        ("registry.example.com/team/app", ImageRef("registry.example.com", "team/app", "latest")),
        ("10.0.0.1:5000/app@" + DIGEST, ImageRef("10.0.0.1:5000", "app", None, DIGEST)),
        ("reg:443/x", ImageRef("reg:443", "x", "latest", None)),
        # ... and otherwise part of the repository.
        ("team/app", ImageRef(DEFAULT, "team/app", "latest", None)),
        # Separators inside a component.
        ("team/my.app_x__y-z--w:1", ImageRef(DEFAULT, "team/my.app_x__y-z--w", "1", None)),
        # A dot in the first component makes it a registry host.
        ("my.team/app", ImageRef("my.team", "app", "latest", None)),
        ("  app:1  ", ImageRef(DEFAULT, "app", "1", None)),
        ("app:" + "t" * 128, ImageRef(DEFAULT, "app", "t" * 128, None)),
    ],
)
def test_valid_references(given: str, expected: ImageRef) -> None:
    assert parse_image_ref(given, DEFAULT) == expected


@pytest.mark.parametrize(
    ("given", "why"),
    [
        ("", "repository"),
        ("Team/App:1", "repository"),
        ("app:", "tag"),
        ("app:-x", "tag"),
        ("app:" + "t" * 129, "tag"),
        ("a//b", "repository"),
        ("/app", "repository"),
        ("app/", "repository"),
        ("a___b", "repository"),
        ("a_-b", "repository"),
        ("registry.example.com/", "repository"),
        ("app@sha256:abc", "digest"),
        ("app@md5:" + "0" * 32, "digest"),
        ("app@sha256:" + "A" * 64, "digest"),
        ("app@" + DIGEST + "x", "digest"),
        ("app@", "digest"),
    ],
)
def test_invalid_references_are_an_invalid_image_field(given: str, why: str) -> None:
    with pytest.raises(InvalidSpec) as info:
        parse_image_ref(given, DEFAULT)
    assert list(info.value.fields) == ["image"]
    message = info.value.fields["image"]
    assert repr(given) in message
    assert why in message


def test_reference_asks_for_the_digest_first_then_the_tag() -> None:
    assert parse_image_ref("app:1@" + DIGEST, DEFAULT).reference == DIGEST
    assert parse_image_ref("app:1", DEFAULT).reference == "1"
    assert parse_image_ref("app", DEFAULT).reference == "latest"
    assert ImageRef(DEFAULT, "app").reference == "latest"


def test_pinned_drops_the_tag_and_names_the_registry() -> None:
    ref = parse_image_ref("team/app:1", DEFAULT)
    other = "sha256:" + "f" * 64
    assert ref.pinned(other) == f"{DEFAULT}/team/app@{other}"
    # A pinned reference parses back to the same repository and digest.
    again = parse_image_ref(ref.pinned(other), "elsewhere:1")
    assert (again.registry, again.repository, again.tag, again.digest) == (
        DEFAULT,
        "team/app",
        None,
        other,
    )


@pytest.mark.parametrize(
    ("given", "text"),
    [
        ("app", f"{DEFAULT}/app:latest"),
        ("team/app:1@" + DIGEST, f"{DEFAULT}/team/app:1@{DIGEST}"),
        ("localhost/app@" + DIGEST, f"localhost/app@{DIGEST}"),
    ],
)
def test_str_is_the_full_reference(given: str, text: str) -> None:
    assert str(parse_image_ref(given, DEFAULT)) == text
    assert parse_image_ref(text, "other:1") == parse_image_ref(given, DEFAULT)
