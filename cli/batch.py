"""Batches from the command line (issue 9): ``imagefn batch submit|status|results|cancel``.

``submit`` streams the items file to the gateway as it reads it (a batch file may be
far larger than what the CLI should hold in memory): a regular file goes with its
Content-Length, standard input chunked. ``--follow`` then shows the batch's progress
until it ends (cli/batchprogress.py).

``results`` copies the gateway's NDJSON to stdout as it arrives, byte for byte.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import stat
import sys
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any, BinaryIO

from cli.api import CliError, SendInterrupted, open_response, request_json
from cli.batchprogress import duration, follow
from cli.logs import format_ts
from shared.settings import Settings

# Read and sent this much at a time: large enough that a 1 GB file is not a million
# syscalls, small enough that the CLI's memory stays flat.
BLOCK_BYTES = 256 * 1024
# A followed results stream that ends before every item's line is out (its gateway shut
# down, say) is resumed at the next item; this many times in a row without a new line,
# RESUME_DELAY_S apart, and the CLI gives up.
RESUME_TRIES = 3
RESUME_DELAY_S = 1.0
NDJSON = "application/x-ndjson"
WHITESPACE = b" \t\r\n"
UTF8_BOM = b"\xef\xbb\xbf"


def _quote(segment: str) -> str:
    return urllib.parse.quote(segment, safe="")


# -- batch submit ------------------------------------------------------------------------------


class Upload:
    """A batch file as urllib sends it: an iterable of blocks read as they are sent.

    The first block is read up front: the Content-Type (a JSON array or NDJSON) is
    decided from the first character, before the request starts."""

    def __init__(self, f: BinaryIO, name: str) -> None:
        self.name = name
        self._f = f
        self.length = _remaining_bytes(f)  # None: unknown (a pipe), so sent chunked
        self.sent = 0
        self._head: list[bytes] = []
        first = b""
        while not first:
            block = self._read()
            if not block:
                raise CliError(f"{name} is empty: a batch needs at least one item")
            self._head.append(block)
            first = block.lstrip(WHITESPACE).removeprefix(UTF8_BOM).lstrip(WHITESPACE)[:1]
        # docs/architecture.md, section 15, "Batches": a JSON array, or NDJSON. An
        # .ndjson/.jsonl file is NDJSON even when its first item happens to be an array.
        ndjson_name = name.endswith((".ndjson", ".jsonl"))
        self.content_type = "application/json" if first == b"[" and not ndjson_name else NDJSON

    def _read(self) -> bytes:
        try:
            return self._f.read(BLOCK_BYTES)
        except OSError as e:
            # Not an OSError any more: urllib would report one raised while sending as
            # "cannot reach the gateway".
            raise CliError(f"cannot read {self.name}: {e.strerror or e}") from None

    def __iter__(self) -> Iterator[bytes]:
        while self._head:
            block = self._head.pop(0)
            self.sent += len(block)
            yield block
        while block := self._read():
            self.sent += len(block)
            yield block


def _remaining_bytes(f: BinaryIO) -> int | None:
    try:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            return None
        return st.st_size - f.tell()
    except (OSError, ValueError):  # io.UnsupportedOperation is both
        return None


@contextlib.contextmanager
def _items_file(path: str) -> Iterator[BinaryIO]:
    if path == "-":
        yield sys.stdin.buffer
        return
    try:
        f = open(path, "rb")  # closed by the `with` below, once the upload is over
    except OSError as e:
        raise CliError(f"cannot read {path}: {e.strerror or e}") from None
    with f:
        yield f


def _size(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _located(e: CliError, upload: Upload) -> CliError:
    """The error of a refused batch, naming the file and where in it the bad item is."""
    err = e.error or {}
    # The contract writes `details: {"item", "line"}`; the gateway's error objects carry
    # their details at the top level. Either is understood.
    details = err.get("details")
    where: dict[str, Any] = details if isinstance(details, dict) else err
    line, item = where.get("line"), where.get("item")
    if line is None and item is None:
        return e
    text = str(e)
    # The gateway's message says "batch item 3 (line 4): ..." already; add it if not.
    if line is not None and f"line {line}" not in text:
        text = f"line {line}" + (f" (item {item})" if item is not None else "") + f": {text}"
    elif line is None and f"item {item}" not in text:
        text = f"item {item}: {text}"
    return CliError(f"{upload.name}: {text}", error=e.error)


def cmd_batch_submit(args: argparse.Namespace, settings: Settings) -> None:
    query = {
        key: str(value)
        for key, value in (
            ("qualifier", args.qualifier),
            ("max_concurrency", args.max_concurrency),
            ("max_retries", args.max_retries),
            ("max_event_age_s", args.max_event_age),
        )
        if value is not None
    }
    path = f"/v1/functions/{_quote(args.name)}/batches"
    if query:
        path += "?" + urllib.parse.urlencode(query)
    with _items_file(args.file) as f:
        upload = Upload(f, "standard input" if args.file == "-" else args.file)
        headers = {} if upload.length is None else {"Content-Length": str(upload.length)}
        try:
            with open_response(args, "POST", path, upload, upload.content_type, headers) as resp:
                raw = resp.read()
        except SendInterrupted as e:
            # Cut off while sending, with no answer to read: say how far it got.
            of = "" if upload.length is None else f" of {_size(upload.length)}"
            raise CliError(
                f"the gateway at {args.gateway} closed the connection after "
                f"{_size(upload.sent)}{of} of {upload.name} had been sent ({e.reason}); "
                "nothing of the batch is kept"
            ) from None
        except CliError as e:
            raise _located(e, upload) from None
    doc = _json(raw)
    batch_id = str(doc.get("batch_id"))
    print(batch_id, flush=True)
    qualifier = f" ({doc['qualifier']})" if doc.get("qualifier") else ""
    print(
        f"{doc.get('items', '?')} items of {doc.get('function', args.name)}{qualifier} "
        f"stored ({_size(upload.sent)} sent); see: imagefn batch status {batch_id}",
        file=sys.stderr,
        flush=True,
    )
    if args.follow:
        # On stderr: stdout carries only the batch id, for scripts (id=$(... --follow)).
        follow(args, batch_id, out=sys.stderr)


def _json(raw: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(raw)
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        raise CliError(f"the gateway's answer is not a JSON object: {raw[:200]!r}")
    return doc


# -- status, results, cancel ---------------------------------------------------------------------


def _show_status(doc: dict[str, Any]) -> None:
    def field(label: str, value: str) -> None:
        print(f"{label:<16} {value}")

    field("batch", str(doc.get("batch_id")))
    qualifier = f" (as {doc['qualifier']})" if doc.get("qualifier") else ""
    field("function", f"{doc.get('function')}{qualifier}")
    field("state", str(doc.get("state")))
    field("items", f"{doc.get('total', '?')}")
    for key in ("succeeded", "failed", "cancelled", "in_flight", "queued"):
        field(f"  {key.replace('_', ' ')}", str(doc.get(key, 0)))
    if doc.get("state") == "running":
        rate = doc.get("items_per_s")
        field("rate", f"{rate:.1f} items/s" if isinstance(rate, int | float) else "?")
        field("eta", duration(doc.get("eta_s")))
    if doc.get("max_concurrency"):
        field("max concurrency", str(doc["max_concurrency"]))
    field("created", format_ts(doc.get("created_at")))
    if doc.get("finished_at"):
        field("finished", format_ts(doc.get("finished_at")))


def cmd_batch_status(args: argparse.Namespace, settings: Settings) -> None:
    if args.follow:
        follow(args, args.id)
        return
    doc = request_json(args, "GET", f"/v1/batches/{_quote(args.id)}")
    if args.json:
        print(json.dumps(doc, indent=2, ensure_ascii=False))
    else:
        _show_status(doc)


class _StdoutClosed(Exception):
    """Our reader went away (`imagefn batch results ID | head`)."""


class _Lines:
    """Copies a results stream to ``out`` a whole line at a time, as it arrives: a stream
    that breaks off mid-line leaves no half line behind, so that resuming at the next
    item keeps the output valid NDJSON."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.count = 0  # whole lines copied
        self._tail = b""

    def feed(self, block: bytes) -> None:
        data = self._tail + block
        cut = data.rfind(b"\n") + 1
        self._tail = data[cut:]
        if cut:
            self._write(data[:cut])
            self.count += data.count(b"\n", 0, cut)

    def end(self) -> None:
        """The stream ended cleanly: a last line without its newline is still a line."""
        if self._tail:
            self._write(self._tail + b"\n")
            self.count += 1
        self._tail = b""

    def drop_partial(self) -> None:
        self._tail = b""

    def _write(self, data: bytes) -> None:
        try:
            self.out.write(data)
            self.out.flush()
        except BrokenPipeError:
            raise _StdoutClosed from None


def _copy_results(args: argparse.Namespace, lines: _Lines, *, follow: bool) -> str | None:
    """Copy one answer of the results route; None when it ended cleanly, else why it
    broke off (the lines before stay copied). Following, it starts at the next item."""
    query = {"follow": "true" if follow else "false"}
    if follow and lines.count:
        # Resume at item N (docs/architecture.md, section 15, "Batches").
        query["start"] = str(lines.count)
    path = f"/v1/batches/{_quote(args.id)}/results?{urllib.parse.urlencode(query)}"
    # Following, the next line may be hours away (an item retrying with backoff) and the
    # stream has no heartbeat to tell quiet from dead: no read timeout then.
    timeout = None if follow else args.timeout
    try:
        with open_response(args, "GET", path, headers={"Accept": NDJSON}, timeout=timeout) as resp:
            while block := resp.read1(BLOCK_BYTES):
                lines.feed(block)
    except TimeoutError:
        lines.drop_partial()
        return f"the gateway went silent for {timeout} s"
    except (http.client.HTTPException, ConnectionError) as e:
        lines.drop_partial()
        return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    lines.end()
    return None


def _follow_results(args: argparse.Namespace, lines: _Lines) -> None:
    """Copy the followed stream until every item's line is out, resuming at the next item
    when it ends early (a gateway that shuts down ends its streams)."""
    status_path = f"/v1/batches/{_quote(args.id)}"
    stalls = 0
    first = True
    while True:
        before = lines.count
        try:
            reason = _copy_results(args, lines, follow=True)
        except CliError as e:
            # An error answer (no such batch), or no gateway at all to begin with, is final;
            # a gateway that went away after the stream began may be restarting.
            if e.error is not None or first:
                raise
            reason = str(e)
        first = False
        try:
            total = request_json(args, "GET", status_path).get("total")
        except CliError as e:
            if e.error is not None:
                raise
            total, reason = None, reason or str(e)
        if isinstance(total, int) and lines.count >= total:
            return
        stalls = 0 if lines.count > before else stalls + 1
        if stalls >= RESUME_TRIES:
            of = f" of {total}" if isinstance(total, int) else ""
            raise CliError(
                f"the results stream of batch {args.id} ended after {lines.count}{of} lines "
                f"({reason or 'connection closed'})"
            )
        time.sleep(RESUME_DELAY_S)


def cmd_batch_results(args: argparse.Namespace, settings: Settings) -> None:
    lines = _Lines(sys.stdout.buffer)
    try:
        if args.follow:
            _follow_results(args, lines)
            return
        reason = _copy_results(args, lines, follow=False)
    except _StdoutClosed:
        # Stop quietly, and keep Python from failing again on flushing stdout at exit.
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return
    if reason is not None:
        raise CliError(
            f"the results stream of batch {args.id} broke off after {lines.count} lines ({reason})"
        )


def cmd_batch_cancel(args: argparse.Namespace, settings: Settings) -> None:
    doc = request_json(args, "DELETE", f"/v1/batches/{_quote(args.id)}")
    running = int(doc.get("in_flight") or 0)
    print(
        f"batch {args.id} {doc.get('state', 'cancelled')}: {doc.get('cancelled', 0)} items "
        f"will not run, {running} running finish; {doc.get('succeeded', 0)} succeeded, "
        f"{doc.get('failed', 0)} failed"
    )


# -- the parser ----------------------------------------------------------------------------------


def _at_least(low: int) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be {low} or more")
        return value

    return parse


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``batch`` and its actions (``sub``: build_parser's subparsers action)."""
    b = sub.add_parser("batch", help="submit many events at once, follow them, read results")
    bs = b.add_subparsers(dest="batch_command", required=True, metavar="ACTION")
    s = bs.add_parser("submit", help="send a file of events (JSON array or NDJSON) as a batch")
    s.add_argument("name")
    s.add_argument("file", help="JSON array or NDJSON file; - for standard input")
    s.add_argument("-q", "--qualifier", default=None, help="version or alias ($LATEST)")
    s.add_argument(
        "--max-concurrency", type=_at_least(1), default=None, help="items running at once"
    )
    s.add_argument(
        "--max-retries", type=_at_least(0), default=None, help="per item (default: the spec's)"
    )
    s.add_argument(
        "--max-event-age",
        type=_at_least(1),
        default=None,
        metavar="S",
        help="seconds an item may wait and retry (default: the spec's)",
    )
    s.add_argument("-f", "--follow", action="store_true", help="show progress until the batch ends")
    s.set_defaults(fn=cmd_batch_submit)
    st = bs.add_parser("status", help="show a batch's progress")
    st.add_argument("id")
    st.add_argument("--json", action="store_true", help="print the status as JSON")
    st.add_argument(
        "-f", "--follow", action="store_true", help="show progress until the batch ends"
    )
    st.set_defaults(fn=cmd_batch_status)
    r = bs.add_parser("results", help="print a batch's results as NDJSON, in item order")
    r.add_argument("id")
    r.add_argument("-f", "--follow", action="store_true", help="keep printing until the batch ends")
    r.set_defaults(fn=cmd_batch_results)
    c = bs.add_parser("cancel", help="cancel a batch: items not started yet do not run")
    c.add_argument("id")
    c.set_defaults(fn=cmd_batch_cancel)
