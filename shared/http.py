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
