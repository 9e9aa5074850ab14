"""Readiness probing of an instance's port 9000, and diagnosis when it never comes up."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

# With Docker's userland proxy, a connect to the published port always succeeds; the
# proxy then closes it within about a millisecond if nothing listens inside. A
# connection still open after this long has a real server behind it.
PROXY_SETTLE_S = 0.015
PORT_9000_HEX = "2328"
TCP_LISTEN = "0A"


async def probe_port(host_port: int) -> bool:
    """True when a server accepts connections on the instance's published port."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", host_port)
    except OSError:
        return False
    try:
        data = await asyncio.wait_for(reader.read(1), PROXY_SETTLE_S)
    except TimeoutError:
        return True
    except OSError:
        return False
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    # Closed at once (proxy found nobody listening); a server that speaks first is up.
    return data != b""


# On a user-defined network the engine's embedded DNS server listens inside every
# container's namespace on 127.0.0.11 (a random TCP port): the engine's, not the function's.
ENGINE_DNS = "127.0.0.11"


def _listeners(pid: int) -> list[str] | None:
    """Listening addresses in the process's network namespace; None when unreadable."""
    found: list[str] = []
    readable = False
    for name, v6 in (("tcp", False), ("tcp6", True)):
        try:
            lines = Path(f"/proc/{pid}/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        readable = True
        for line in lines:
            parts = line.split()
            if len(parts) < 4 or parts[3] != TCP_LISTEN:
                continue
            addr_hex, port_hex = parts[1].split(":")
            port = int(port_hex, 16)
            if v6:
                addr = "::" if set(addr_hex) == {"0"} else "[v6]"
                if addr_hex.endswith("01000000") and addr_hex.startswith("0000000000000000"):
                    addr = "::1"
            else:
                octets = [str(int(addr_hex[i : i + 2], 16)) for i in (6, 4, 2, 0)]
                addr = ".".join(octets)
                if addr == ENGINE_DNS:
                    continue
            found.append(f"{addr}:{port}")
    return sorted(set(found)) if readable else None


async def diagnose_listeners(pid: int) -> list[str]:
    """Addresses the container's processes listen on, read from the host's /proc.

    Read from outside the container (no process is started inside it). Empty when the
    process is gone or /proc is not readable.
    """
    if pid <= 0:
        return []
    return await asyncio.to_thread(_listeners, pid) or []


async def listens_on_9000(pid: int) -> bool | None:
    """Whether a server in the container listens on 0.0.0.0:9000 (or [::]:9000), read
    from the host's /proc; None when that cannot be read (another host's engine, no
    permission). It settles what the proxy probe cannot: under load the userland proxy
    may hold a connection open for a moment even though nothing listens inside yet."""
    if pid <= 0:
        return None
    found = await asyncio.to_thread(_listeners, pid)
    if found is None:
        return None
    return any(a in found for a in ("0.0.0.0:9000", ":::9000"))
