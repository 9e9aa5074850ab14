"""API key scopes and the pure check of what they allow.

A scope is ``admin`` (everything), or ``ACTION:PATTERN`` where ACTION is one of
``deploy``, ``invoke``, ``read``, ``secrets``, ``logs`` and PATTERN names functions: an
exact name, a prefix ending in ``*`` (``team-a-*``), or ``*`` for every function. Key
management and the audit log need ``admin``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from shared.errors import InvalidRequest

ADMIN = "admin"
ACTIONS = ("deploy", "invoke", "read", "secrets", "logs")
# A function-name pattern: a name (see shared.spec.NAME_RE) or a prefix of one, optionally
# ending in "*"; "*" alone is every function.
_PATTERN_RE = re.compile(r"^(\*|[A-Za-z][A-Za-z0-9_-]{0,59}\*?)\Z")


@dataclass(frozen=True)
class Scope:
    action: str
    pattern: str

    def matches(self, action: str, function: str) -> bool:
        if self.action != action:
            return False
        if self.pattern.endswith("*"):
            return function.startswith(self.pattern[:-1])
        return function == self.pattern

    def __str__(self) -> str:
        return f"{self.action}:{self.pattern}"


def parse_scopes(raw: object) -> tuple[str, ...]:
    """Validate a list of scope strings; InvalidRequest naming each bad one."""
    if not isinstance(raw, list) or not raw:
        raise InvalidRequest("scopes: a non-empty list such as ['invoke:my-fn', 'read:team-*']")
    bad: list[str] = []
    out: list[str] = []
    for item in raw:
        if not isinstance(item, str):
            bad.append(repr(item))
            continue
        if item == ADMIN:
            out.append(item)
            continue
        action, sep, pattern = item.partition(":")
        if not sep or action not in ACTIONS or not _PATTERN_RE.match(pattern):
            bad.append(repr(item))
            continue
        out.append(item)
    if bad:
        raise InvalidRequest(
            f"scopes: not a scope: {', '.join(bad)} (use 'admin' or ACTION:PATTERN with "
            f"ACTION one of {', '.join(ACTIONS)} and PATTERN a function name, a prefix "
            "ending in '*', or '*')"
        )
    return tuple(dict.fromkeys(out))


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key's id (``anonymous`` for a public web function's caller)
    and what it may do."""

    key_id: str
    admin: bool = False
    scopes: tuple[Scope, ...] = ()

    @classmethod
    def from_scopes(cls, key_id: str, scopes: tuple[str, ...]) -> Principal:
        parsed = []
        for s in scopes:
            if s == ADMIN:
                continue
            action, _, pattern = s.partition(":")
            parsed.append(Scope(action, pattern))
        return cls(key_id=key_id, admin=ADMIN in scopes, scopes=tuple(parsed))

    def allows(self, action: str, function: str) -> bool:
        return self.admin or any(s.matches(action, function) for s in self.scopes)

    @property
    def authenticated(self) -> bool:
        return self.key_id != ANONYMOUS.key_id


ANONYMOUS = Principal(key_id="anonymous")
