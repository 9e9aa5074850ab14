"""The CLI's HTTP client of the gateway API: requests, streamed answers, and error answers
turned into one clear line (``CliError``).

It is a module of its own, not part of cli/main.py, so that the command modules
(cli/asyncinv.py, cli/batch.py) can use it without importing cli.main: run as
``python -m cli.main`` that module is ``__main__``, and importing it again would make a
second ``CliError`` class that ``main()`` does not catch.
"""

from __future__ import annotations

import argparse
import http.client
import json
import urllib.error
import urllib.request
from collections.abc import Iterable
from typing import Any, cast

# What urllib sends as a body: bytes whole, or an iterable of blocks (streamed).
Body = bytes | Iterable[bytes]


class CliError(Exception):
    def __init__(self, message: str, *, error: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        # The gateway's error object, when the failure was an error answer.
        self.error = error


class SendInterrupted(CliError):
    """The gateway closed the connection while the request was being sent, answering
    nothing that could be read."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def request(
    args: argparse.Namespace,
    method: str,
    path: str,
    body: Body | None = None,
    content_type: str = "application/json",
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """Send one request; (status, headers, body) of a 2xx answer, else ``CliError``."""
    with open_response(args, method, path, body, content_type, headers) as resp:
        try:
            return resp.status, dict(resp.headers.items()), resp.read()
        except TimeoutError:
            raise CliError(
                f"the gateway at {args.gateway} did not answer in {args.timeout} s"
            ) from None


def request_json(args: argparse.Namespace, method: str, path: str, doc: Any = None) -> Any:
    """A JSON request (``doc``, when given) whose answer is a JSON document."""
    body = None if doc is None else json.dumps(doc).encode()
    status, _, raw = request(args, method, path, body)
    try:
        return json.loads(raw)
    except ValueError:
        raise CliError(
            f"the gateway answered HTTP {status} with something that is not JSON: "
            f"{raw[:200].decode('utf-8', 'replace')}"
        ) from None


def open_response(
    args: argparse.Namespace,
    method: str,
    path: str,
    body: Body | None = None,
    content_type: str = "application/json",
    headers: dict[str, str] | None = None,
    timeout: float | None = -1.0,
) -> http.client.HTTPResponse:
    """The open answer to a request, for reading as it arrives (use it in ``with``).

    ``timeout`` is the socket timeout: ``args.timeout`` unless given; ``None`` waits as
    long as it takes (a stream that may stay quiet for hours)."""
    url = args.gateway.rstrip("/") + path
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    api_key = getattr(args, "api_key", "")
    if api_key and not req.has_header("Authorization"):
        req.add_header("Authorization", f"Bearer {api_key}")
    if body is not None:
        req.add_header("Content-Type", content_type)
    wait = args.timeout if timeout == -1.0 else timeout
    try:
        # urlopen answers a urllib response, which is an HTTPResponse for http:// URLs.
        return cast(http.client.HTTPResponse, urllib.request.urlopen(req, timeout=wait))
    except urllib.error.URLError as e:
        if isinstance(e.reason, BrokenPipeError | ConnectionResetError):
            # urllib wraps errors while sending: this one is not "cannot reach".
            raise SendInterrupted(
                f"the gateway at {args.gateway} closed the connection before it had read "
                f"the whole request ({e.reason.strerror or e.reason})",
                reason=e.reason.strerror or str(e.reason),
            ) from None
        raise gateway_error(args, e) from None
    except TimeoutError:
        raise CliError(f"the gateway at {args.gateway} did not answer in {wait} s") from None
    except (http.client.HTTPException, ConnectionError) as e:
        # The gateway closed the connection while we were still sending (it refused a
        # streamed body early, say) and sent no answer we could read.
        raise CliError(f"the connection to the gateway at {args.gateway} broke: {e}") from None


def gateway_error(args: argparse.Namespace, e: urllib.error.URLError) -> CliError:
    """The one-line error for a gateway that answered with an error, or not at all."""
    if isinstance(e, urllib.error.HTTPError):
        raw = e.read()
        return CliError(describe_error(e.code, raw), error=error_object(raw))
    return CliError(f"cannot reach the gateway at {args.gateway}: {e.reason}")


def error_object(raw: bytes) -> dict[str, Any] | None:
    try:
        err = json.loads(raw)["error"]
    except (ValueError, KeyError, TypeError):
        return None
    return err if isinstance(err, dict) else None


def describe_error(status: int, raw: bytes) -> str:
    err = error_object(raw)
    if err is None:
        return f"HTTP {status}: {raw[:500].decode('utf-8', 'replace')}"
    line = f"{err.get('type', 'Error')}: {err.get('message', '')}"
    if isinstance(err.get("fields"), dict):
        line += "".join(f"\n  {k}: {v}" for k, v in sorted(err["fields"].items()))
    if err.get("logs"):
        line += "\n  last log lines:" + "".join(f"\n    {ln}" for ln in err["logs"])
    if err.get("request_id"):
        line += f"\n  request id: {err['request_id']}"
    return line
