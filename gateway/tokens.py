"""Registry bearer tokens (Docker registry token authentication, JWT flavour).

The registry (distribution 2.8) trusts tokens signed by a key whose certificate is in its
``rootcertbundle``. It finds that key by the JWT header's ``kid``, written in libtrust's
key-id format (``key_id``); no certificate chain (``x5c``) is needed. It then checks
``iss`` against its ``issuer``, ``aud`` against its ``service``, ``exp``/``nbf`` (with
60 s of leeway for clock skew) and finds the repository and action it needs in
``access``.

Scopes and grants are pure functions here; who may have what is decided by the route
(``gateway.token_service``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from shared.errors import InvalidRequest
from shared.settings import MAX_TOKEN_TTL_S, RegistrySettings

# The distribution reference grammar for repository names (no registry host: the
# registry names its own repositories without one).
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
REPOSITORY_NAME_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*\Z")
_ACTION_RE = re.compile(r"^(?:[a-z]+|\*)\Z")
_TYPE_RE = re.compile(r"^[a-z0-9]+(?:\([a-z0-9]+\))?\Z")
MAX_NAME_LENGTH = 255

REPOSITORY = "repository"


@dataclass(frozen=True)
class Access:
    """One entry of a token's ``access`` claim."""

    type: str
    name: str
    actions: tuple[str, ...]

    def to_claim(self) -> dict[str, Any]:
        return {"type": self.type, "name": self.name, "actions": list(self.actions)}


@dataclass(frozen=True)
class IssuedToken:
    token: str = field(repr=False)
    expires_in: int
    issued_at: str  # RFC 3339, UTC


def parse_scope(scope: str) -> list[tuple[str, str, tuple[str, ...]]]:
    """``"repository:a/b:pull,push registry:catalog:*"`` → one (type, name, actions)
    per resource scope, actions deduplicated in order. The name sits between the first
    and the last ':' (so it may hold '/'); a repository name must follow the reference
    grammar. Raises InvalidRequest for anything malformed."""
    parsed: list[tuple[str, str, tuple[str, ...]]] = []
    for item in scope.split():
        rtype, sep1, rest = item.partition(":")
        name, sep2, actions_text = rest.rpartition(":")
        if not (sep1 and sep2 and rtype and name and actions_text):
            raise InvalidRequest(f"invalid scope {item!r}: expected type:name:actions")
        if not _TYPE_RE.match(rtype):
            raise InvalidRequest(f"invalid scope {item!r}: bad resource type")
        if len(name) > MAX_NAME_LENGTH or (
            rtype == REPOSITORY and not REPOSITORY_NAME_RE.match(name)
        ):
            raise InvalidRequest(f"invalid scope {item!r}: bad repository name")
        actions: list[str] = []
        for action in actions_text.split(","):
            if not _ACTION_RE.match(action):
                raise InvalidRequest(f"invalid scope {item!r}: bad action {action!r}")
            if action not in actions:
                actions.append(action)
        parsed.append((rtype, name, tuple(actions)))
    return parsed


def grant(
    requested: Iterable[tuple[str, str, tuple[str, ...]]], allowed: frozenset[str]
) -> list[Access]:
    """What a principal allowed ``allowed`` actions on every repository gets: per
    repository, the intersection of what was asked (over all its scopes) and what is
    allowed. Other resource types (``registry:catalog:*``) and empty intersections are
    left out."""
    wanted: dict[str, list[str]] = {}
    for rtype, name, actions in requested:
        if rtype != REPOSITORY:
            continue
        granted = wanted.setdefault(name, [])
        granted.extend(a for a in actions if a in allowed and a not in granted)
    return [Access(REPOSITORY, name, tuple(acts)) for name, acts in wanted.items() if acts]


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def libtrust_key_id(public_key: rsa.RSAPublicKey) -> str:
    """The key id distribution matches a token's ``kid`` against: base32 of the first
    240 bits of SHA-256 over the DER SubjectPublicKeyInfo, unpadded, in ':'-joined
    groups of four."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    encoded = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode("ascii").rstrip("=")
    return ":".join(encoded[i : i + 4] for i in range(0, len(encoded), 4))


def _rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class TokenIssuer:
    """Signs RS256 registry tokens with one RSA key."""

    def __init__(
        self,
        private_key: rsa.RSAPrivateKey,
        certificate: x509.Certificate,
        *,
        issuer: str,
        service: str,
        ttl_s: int,
    ) -> None:
        cert_key = certificate.public_key()
        if not isinstance(cert_key, rsa.RSAPublicKey) or cert_key.public_numbers() != (
            private_key.public_key().public_numbers()
        ):
            raise InvalidRequest("the token certificate does not belong to the signing key")
        _check_ttl(ttl_s)
        self._key = private_key
        self.issuer = issuer
        self.service = service
        self.ttl_s = ttl_s
        self.key_id = libtrust_key_id(cert_key)
        self._header = _b64url(
            json.dumps(
                {"typ": "JWT", "alg": "RS256", "kid": self.key_id}, separators=(",", ":")
            ).encode()
        )

    @classmethod
    def from_files(
        cls, key_path: str | Path, cert_path: str | Path, *, issuer: str, service: str, ttl_s: int
    ) -> TokenIssuer:
        try:
            key_pem = Path(key_path).read_bytes()
            cert_pem = Path(cert_path).read_bytes()
        except OSError as e:
            raise InvalidRequest(
                f"cannot read the registry token key or certificate: {e.strerror}: "
                f"{e.filename} (run deploy/registry.sh)"
            ) from None
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
            cert = x509.load_pem_x509_certificate(cert_pem)
        except (ValueError, TypeError) as e:
            raise InvalidRequest(
                f"the registry token key or certificate is unusable: {e}"
            ) from None
        if not isinstance(key, rsa.RSAPrivateKey):
            raise InvalidRequest(f"the registry token key {key_path} is not an RSA key")
        return cls(key, cert, issuer=issuer, service=service, ttl_s=ttl_s)

    @classmethod
    def from_settings(cls, settings: RegistrySettings) -> TokenIssuer:
        return cls.from_files(
            settings.signing_key,
            settings.signing_cert,
            issuer=settings.issuer,
            service=settings.service,
            ttl_s=settings.token_ttl_s,
        )

    def issue(
        self,
        subject: str,
        access: Iterable[Access],
        *,
        ttl_s: int | None = None,
        now: float | None = None,
    ) -> IssuedToken:
        """A token for ``subject`` carrying exactly ``access``. ``now`` is for tests
        (a token issued in the past is an expired one)."""
        ttl = self.ttl_s if ttl_s is None else ttl_s
        _check_ttl(ttl)
        issued = int(time.time() if now is None else now)
        claims: Mapping[str, Any] = {
            "iss": self.issuer,
            "sub": subject,
            "aud": self.service,
            "exp": issued + ttl,
            "nbf": issued,
            "iat": issued,
            "jti": secrets.token_hex(16),
            "access": [a.to_claim() for a in access],
        }
        payload = _b64url(json.dumps(claims, separators=(",", ":")).encode())
        signing_input = f"{self._header}.{payload}".encode("ascii")
        signature = self._key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
        return IssuedToken(
            token=f"{self._header}.{payload}.{_b64url(signature)}",
            expires_in=ttl,
            issued_at=_rfc3339(issued),
        )


def _check_ttl(ttl_s: int) -> None:
    if not 1 <= ttl_s <= MAX_TOKEN_TTL_S:
        raise InvalidRequest(f"token TTL {ttl_s} s: must be between 1 and {MAX_TOKEN_TTL_S}")
