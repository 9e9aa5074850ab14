"""Sends one invocation to an instance's HTTP server on port 9000, as the contract says.

Events go as ``POST /event-invoke`` with the X-Scf-* headers; web requests go as the
caller sent them, with X-Scf-Request-Id (and the other X-Scf-* headers) added.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import aiohttp
from yarl import URL

from shared.errors import FunctionTimeout, ResultTooLarge
from shared.http import strip_hop_by_hop
from shared.messages import Headers, Invocation
from shared.settings import WorkerSettings


class ConnectionLost(Exception):
    """The instance closed the connection or refused it before answering; the pool decides
    what that means after looking at the container."""


@dataclass(frozen=True)
class Response:
    status: int
    headers: Headers
    body: bytes


def scf_headers(inv: Invocation, settings: WorkerSettings) -> list[tuple[str, str]]:
    spec = inv.record.spec
    return [
        ("X-Scf-Request-Id", inv.request_id),
        ("X-Scf-Memory", str(spec.memory_mb)),
        ("X-Scf-Timeout", str(int(spec.timeout_s * 1000))),
        ("X-Scf-Name", spec.name),
        ("X-Scf-Namespace", settings.scf_namespace),
        ("X-Scf-Version", inv.version),
        ("X-Scf-Region", settings.scf_region),
        ("X-Scf-Appid", settings.scf_appid),
        ("X-Scf-Uin", settings.scf_uin),
    ]


class Forwarder:
    def __init__(self, session: aiohttp.ClientSession, settings: WorkerSettings) -> None:
        self._session = session
        self._settings = settings

    async def send(self, host_port: int, inv: Invocation, timeout_s: float) -> Response:
        base = f"http://127.0.0.1:{host_port}"
        url: str | URL
        if inv.kind == "event":
            url = base + "/event-invoke"
            method = "POST"
            headers: list[tuple[str, str]] = [("Content-Type", "application/json")]
        else:
            # encoded=True: path and query reach the function exactly as the caller sent them.
            url = URL(base + inv.path + (f"?{inv.query}" if inv.query else ""), encoded=True)
            method = inv.method
            # The caller's own X-Scf-* headers must not impersonate the platform's.
            headers = [(k, v) for k, v in inv.headers if not k.lower().startswith("x-scf-")]
        headers.extend(scf_headers(inv, self._settings))
        try:
            async with asyncio.timeout(timeout_s):
                async with self._session.request(
                    method,
                    url,
                    headers=headers,
                    # No body, no Content-Length: forward a GET as the caller sent it.
                    data=inv.body or None,
                    allow_redirects=False,
                    skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
                ) as resp:
                    header_bytes = sum(len(k) + len(v) + 4 for k, v in resp.headers.items())
                    if header_bytes > self._settings.max_response_header_bytes:
                        raise ResultTooLarge(
                            f"response headers are {header_bytes} bytes; at most "
                            f"{self._settings.max_response_header_bytes} bytes"
                        )
                    limit = self._settings.max_result_bytes
                    # Piece by piece until the end: one read returns only what has
                    # arrived so far, which for a large answer is not all of it.
                    body = bytearray()
                    async for piece in resp.content.iter_any():
                        body += piece
                        if len(body) > limit:
                            raise ResultTooLarge(f"response body exceeds {limit} bytes")
                    return Response(
                        status=resp.status,
                        headers=strip_hop_by_hop(list(resp.headers.items())),
                        body=bytes(body),
                    )
        except TimeoutError:
            raise FunctionTimeout(f"function did not answer within {timeout_s:.3g} s") from None
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as e:
            raise ConnectionLost(str(e) or type(e).__name__) from e
