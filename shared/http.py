"""HTTP details shared by the gateway and the workers."""

from __future__ import annotations

import re
from collections.abc import Iterable

# RFC 9110 §7.6.1: connection-specific headers a proxy must not forward.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# Recomputed by whoever writes the message next.
FRAMING = frozenset({"content-length", "host"})


def strip_hop_by_hop(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Drop hop-by-hop and framing headers, including any the Connection header names."""
    pairs = list(headers)
    named: set[str] = set()
    for k, v in pairs:
        if k.lower() == "connection":
            named.update(t.strip().lower() for t in v.split(",") if t.strip())
    drop = HOP_BY_HOP | FRAMING | named
    return [(k, v) for k, v in pairs if k.lower() not in drop]


REQUEST_ID_HEADER = "X-Request-Id"
# A request id a caller may choose (X-Request-Id); the gateway makes its own otherwise.
CALLER_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{8,64}\Z")
SCF_REQUEST_ID_HEADER = "X-Scf-Request-Id"
SCF_ERROR_TYPE_HEADER = "X-Scf-Error-Type"

# Set by the gateway alone: a caller's own values would let it claim another address,
# host or scheme to the function.
FORWARDED = frozenset(
    {"x-forwarded-for", "x-forwarded-host", "x-forwarded-proto", "x-forwarded-prefix", "forwarded"}
)


def forwarded_headers(
    caller: Iterable[tuple[str, str]], peer: str, host: str, scheme: str, prefix: str = ""
) -> list[tuple[str, str]]:
    """What a web function receives of the caller's headers: hop-by-hop ones dropped;
    X-Scf-* (the platform's own) and any header name with an underscore (which some
    servers read as a dash, so ``X_Scf_Request_Id`` could pass for ``X-Scf-Request-Id``)
    dropped; X-Forwarded-* built here, the caller's X-Forwarded-For appended to, never
    trusted as it is. ``prefix`` (``/web/NAME``), when given, goes out as
    X-Forwarded-Prefix: the path the function's own paths hang under, which an app
    needs to write absolute links and redirects (werkzeug's ProxyFix ``x_prefix``,
    Django's ``FORCE_SCRIPT_NAME``)."""
    prior: list[str] = []
    out: list[tuple[str, str]] = []
    for k, v in strip_hop_by_hop(caller):
        low = k.lower()
        if low == "x-forwarded-for":
            prior.append(v.strip())
        elif low in FORWARDED or low.startswith("x-scf-") or "_" in k:
            continue
        else:
            out.append((k, v))
    chain = ", ".join([*[p for p in prior if p], peer]) if peer else ", ".join(prior)
    out += [
        # The function sees the Host the caller used, as behind any reverse proxy.
        ("Host", host),
        ("X-Forwarded-For", chain),
        ("X-Forwarded-Host", host),
        ("X-Forwarded-Proto", scheme),
    ]
    if prefix:
        out.append(("X-Forwarded-Prefix", prefix))
    return out


def scope_cookie(set_cookie: str, prefix: str) -> str:
    """A web function's ``Set-Cookie`` with its ``Path`` moved under ``prefix``
    (``/web/NAME``), as nginx's ``proxy_cookie_path`` does: every web function shares the
    gateway's host, so a cookie for ``Path=/`` would reach every other function, and
    theirs this one. ``/`` becomes ``/web/NAME`` (which, by RFC 6265's path match,
    covers ``/web/NAME/...`` but not ``/web/NAMEx``), ``/x`` becomes ``/web/NAME/x``; a
    path already under the prefix is kept. Without a ``Path`` the browser takes the
    request's own directory, which is under the prefix already."""
    parts = set_cookie.split(";")
    for i, part in enumerate(parts[1:], start=1):
        name, sep, value = part.strip().partition("=")
        if name.lower() != "path" or not sep:
            continue
        path = value.strip()
        if path == prefix or path.startswith(prefix + "/"):
            return set_cookie
        scoped = prefix if path in ("", "/") else prefix + (path if path[0] == "/" else "/" + path)
        parts[i] = f" Path={scoped}"
        return ";".join(parts)
    return set_cookie
