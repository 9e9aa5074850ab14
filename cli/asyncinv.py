"""Asynchronous invocations and dead letters from the command line (issue 9):
``imagefn invoke NAME --async``, ``imagefn invocation ID`` and ``imagefn dlq ...``.

Each command talks to the HTTP API of docs/architecture.md, section 15 (and
gateway/openapi.yaml) and prints for people by default; ``--json`` prints the gateway's
document as it came, for scripts.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import sys
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

from cli.api import CliError, request, request_json
from cli.logs import format_ts
from shared.settings import Settings

# Asks the gateway to queue the call and answer 202 at once (docs/architecture.md, section 15).
INVOCATION_TYPE_HEADER = "X-Imagefn-Invocation-Type"
# How much of a result body `imagefn invocation` shows: enough to recognise it, not a
# megabyte of JSON flooding the terminal (--json shows it whole).
RESULT_PREVIEW_CHARS = 1500
RESULT_PREVIEW_LINES = 20
# Error messages in the one-line-per-entry `dlq ls` table are cut to this.
TABLE_ERROR_CHARS = 60
LABEL_WIDTH = 12


def _quote(segment: str) -> str:
    """A request id or name as one path segment (ids may hold `.`, names never `/`)."""
    return urllib.parse.quote(segment, safe="")


def _print_json(doc: Any) -> None:
    print(json.dumps(doc, indent=2, ensure_ascii=False))


def _field(label: str, value: str) -> None:
    print(f"{label:<{LABEL_WIDTH}} {value}")


# -- invoke --async -----------------------------------------------------------------------------


def invoke_async(args: argparse.Namespace, path: str, body: bytes, headers: dict[str, str]) -> None:
    """``imagefn invoke NAME --async``: queue the event, print its request id and state."""
    if args.log:
        # --log waits for the call's REPORT; an asynchronous call may run much later.
        raise CliError(
            "--log and --async do not go together: follow the call's records with "
            "`imagefn logs NAME --request-id ID -f`"
        )
    status, answer_headers, raw = request(
        args, "POST", path, body, headers={**headers, INVOCATION_TYPE_HEADER: "Event"}
    )
    if status != 202:
        # A gateway without asynchronous invocation ignores the header and runs the call
        # while we wait: its result is worth keeping, but the user asked for something else.
        sys.stdout.write(raw.decode("utf-8", "replace").rstrip("\n") + "\n")
        raise CliError(
            f"the gateway ran the call synchronously (HTTP {status}, result above): "
            "it does not know asynchronous invocation"
        )
    try:
        doc = json.loads(raw)
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        doc = {}  # the request id is in the X-Request-Id header too
    rid = str(doc.get("request_id") or answer_headers.get("X-Request-Id", "?"))
    line = f"{rid} {doc.get('state', 'queued')}"
    if doc.get("duplicate"):
        line += " (duplicate: this request id was accepted before; not queued again)"
    # stdout holds just "ID STATE" for scripts (`rid=$(imagefn invoke f --async | cut -d' ' -f1)`).
    print(line, flush=True)
    print(f"see what became of it: imagefn invocation {rid}", file=sys.stderr)


# -- imagefn invocation ID --------------------------------------------------------------------


def _ms(value: Any) -> str:
    return f"{value:.0f} ms" if isinstance(value, int | float) else "? ms"


def _when(ts: Any) -> str:
    """An absolute time, and how far it is from now, for a time that is coming."""
    if not isinstance(ts, int | float):
        return "?"
    left = ts - time.time()
    return f"{format_ts(ts)} ({'in ' + _seconds(left) if left > 0 else 'due now'})"


def _seconds(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    if s < 172800:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} days"


def _error_text(error: Any) -> str:
    if not isinstance(error, dict):
        return "" if error is None else str(error)
    return f"{error.get('type', 'Error')}: {error.get('message', '')}"


def attempt_line(a: dict[str, Any]) -> str:
    """One attempt: number, start, duration, status, error, where it ran, cold or warm."""
    started, finished = a.get("started_at"), a.get("finished_at")
    duration = (
        _ms((finished - started) * 1000)
        if isinstance(started, int | float) and isinstance(finished, int | float)
        else "? ms"
    )
    status = a.get("status")
    parts = [
        f"#{a.get('attempt', '?')}",
        format_ts(started),
        duration,
        # 0 or none: the attempt failed before the function answered (start, throttle).
        f"HTTP {status}" if isinstance(status, int) and status > 0 else "no answer",
    ]
    if a.get("error"):
        parts.append(_error_text(a["error"]))
    where = [f"worker {a['worker']}"] if a.get("worker") else []
    where += [f"instance {a['instance']}"] if a.get("instance") else []
    parts += where
    if a.get("cold_start") is not None:
        parts.append("cold" if a["cold_start"] else "warm")
    return "  ".join(parts)


def _print_attempts(attempts: Any, running: Any = None) -> None:
    attempts = attempts if isinstance(attempts, list) else []
    if not attempts and not isinstance(running, dict):
        _field("attempts", "none yet")
        return
    print("attempts")
    for a in attempts:
        print("  " + attempt_line(a if isinstance(a, dict) else {}))
    if isinstance(running, dict):
        print(
            f"  #{running.get('attempt', '?')}  {format_ts(running.get('started_at'))}  "
            f"running on worker {running.get('worker', '?')}"
        )


def preview(text: str) -> str:
    """The start of a long text, saying how much was left out."""
    lines = text.splitlines()
    shown = "\n".join(lines[:RESULT_PREVIEW_LINES])[:RESULT_PREVIEW_CHARS]
    if len(shown) < len(text.rstrip("\n")):
        shown += f"\n… ({len(text) - len(shown)} more characters; --json shows it whole)"
    return shown


def _b64_size(text: Any) -> str:
    try:
        return f"{len(base64.b64decode(str(text), validate=True))} bytes"
    except (binascii.Error, ValueError):
        return "not even valid base64"


def _print_result(result: Any) -> None:
    if not isinstance(result, dict):
        return
    ctype = result.get("content_type") or "no content type"
    _field("result", f"HTTP {result.get('status', '?')}, {ctype}")
    if "body" in result:
        body = str(result["body"])
        print("  " + preview(body).replace("\n", "\n  ") if body else "  (empty body)")
    elif "body_base64" in result:
        print(f"  (not UTF-8 text, {_b64_size(result['body_base64'])}; --json shows it as base64)")


def show_invocation(doc: dict[str, Any]) -> None:
    _field("request id", str(doc.get("request_id")))
    fn = f"{doc.get('function')}, version {doc.get('version')}"
    if doc.get("qualifier"):
        fn += f" (as {doc['qualifier']})"
    _field("function", f"{fn}, {doc.get('mode', 'sync')}")
    state = str(doc.get("state"))
    if state == "retrying" and "next_attempt_at" in doc:
        state += f": next attempt at {_when(doc['next_attempt_at'])}"
    _field("state", state)
    if doc.get("reason"):
        _field("reason", str(doc["reason"]))
    if doc.get("batch"):
        _field("batch", f"{doc['batch']}, item {doc.get('index')}")
    created, updated = format_ts(doc.get("created_at")), format_ts(doc.get("updated_at"))
    _field("created", f"{created}  updated {updated}")
    if doc.get("duplicates"):
        _field("duplicates", f"{doc['duplicates']} repeated deliveries dropped")
    _print_attempts(doc.get("attempts"), doc.get("running"))
    _print_result(doc.get("result"))


def cmd_invocation(args: argparse.Namespace, settings: Settings) -> None:
    doc = request_json(args, "GET", f"/v1/invocations/{_quote(args.id)}")
    if args.json:
        _print_json(doc)
    else:
        show_invocation(doc)


# -- imagefn dlq ---------------------------------------------------------------------------


def _dlq_path(name: str, tail: str = "") -> str:
    return f"/v1/functions/{_quote(name)}/dlq{tail}"


def _last_error(entry: dict[str, Any]) -> str:
    attempts = entry.get("attempts")
    last = attempts[-1] if isinstance(attempts, list) and attempts else {}
    text = _error_text(last.get("error") if isinstance(last, dict) else None)
    text = " ".join(text.split())  # one table row, whatever the message holds
    if len(text) > TABLE_ERROR_CHARS:
        text = text[: TABLE_ERROR_CHARS - 1] + "…"
    return text or "-"


def _letters(n: int) -> str:
    return f"{n} dead letter{'' if n == 1 else 's'}"


def cmd_dlq_ls(args: argparse.Namespace, settings: Settings) -> None:
    query = urllib.parse.urlencode({"limit": args.limit, "offset": args.offset})
    doc = request_json(args, "GET", _dlq_path(args.name) + "?" + query)
    if args.json:
        _print_json(doc)
        return
    items = [i for i in doc.get("items", []) if isinstance(i, dict)]
    count = doc.get("count", len(items))
    if not items:
        print(
            f"no dead letters past {args.offset}" if count else f"no dead letters for {args.name}"
        )
        return
    rows = [("REQUEST ID", "PARKED", "REASON", "ATTEMPTS", "VERSION", "LAST ERROR")] + [
        (
            str(i.get("request_id")),
            format_ts(i.get("parked_at")),
            str(i.get("reason", "-")),
            str(len(i.get("attempts") or [])),
            f"{i.get('version', '?')}" + (f" ({i['qualifier']})" if i.get("qualifier") else ""),
            _last_error(i),
        )
        for i in items
    ]
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    if isinstance(count, int) and count > len(items):
        first = args.offset + 1
        print(f"({first}-{args.offset + len(items)} of {count}; see --limit and --offset)")


def cmd_dlq_show(args: argparse.Namespace, settings: Settings) -> None:
    entry = request_json(args, "GET", _dlq_path(args.name, f"/{_quote(args.id)}"))
    if args.json:
        _print_json(entry)
        return
    _field("request id", str(entry.get("request_id")))
    ran_as = f"{args.name}, version {entry.get('version')}"
    if entry.get("qualifier"):
        ran_as += f" (as {entry['qualifier']})"
    _field("function", ran_as)
    _field("parked", f"{format_ts(entry.get('parked_at'))}: {entry.get('reason', '?')}")
    if entry.get("batch"):
        _field("batch", f"{entry['batch']}, item {entry.get('index')}")
    _print_attempts(entry.get("attempts"))
    if "event" in entry:
        print("event")
        print("  " + json.dumps(entry["event"], indent=2, ensure_ascii=False).replace("\n", "\n  "))
    elif "event_base64" in entry:
        _field("event", f"not JSON, {_b64_size(entry['event_base64'])} (base64 with --json)")


def cmd_dlq_redrive(args: argparse.Namespace, settings: Settings) -> None:
    body: dict[str, Any] = {"all": True} if args.all else {"ids": args.ids}
    if args.qualifier:
        body["qualifier"] = args.qualifier
    doc = request_json(args, "POST", _dlq_path(args.name, "/redrive"), body)
    redriven = doc.get("redriven") or []
    missing = doc.get("missing") or []
    as_what = f" as {args.qualifier}" if args.qualifier else ""
    print(f"redrove {_letters(len(redriven))} of {args.name}{as_what}", flush=True)
    if missing:
        # Named but not there (already redriven or purged, or a typo): worth a non-zero exit.
        raise CliError(
            f"not in the dead-letter queue of {args.name}: {', '.join(map(str, missing))}"
        )


def cmd_dlq_purge(args: argparse.Namespace, settings: Settings) -> None:
    tail = f"/{_quote(args.id)}" if args.id else ""
    doc = request_json(args, "DELETE", _dlq_path(args.name, tail))
    print(f"purged {_letters(int(doc.get('purged') or 0))} of {args.name}")


# -- the parsers ----------------------------------------------------------------------------


def _in_range(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: a whole number from low to high (the gateway's own bounds, so
    that a bad value is a usage error rather than a round trip)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"from {low} to {high}")
        return value

    return parse


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``invocation`` and ``dlq`` (``sub``: build_parser's subparsers action)."""
    inv = sub.add_parser("invocation", help="show what happened to one invocation")
    inv.add_argument("id", help="the request id")
    inv.add_argument("--json", action="store_true", help="print the record as JSON")
    inv.set_defaults(fn=cmd_invocation)

    dlq = sub.add_parser("dlq", help="list, show, redrive and purge a function's dead letters")
    ds = dlq.add_subparsers(dest="dlq_command", required=True, metavar="ACTION")
    ls = ds.add_parser("ls", help="list dead letters, oldest first")
    ls.add_argument("name")
    ls.add_argument(
        "--limit", type=_in_range(1, 1000), default=100, help="at most this many (default 100)"
    )
    ls.add_argument("--offset", type=_in_range(0, 10**9), default=0, help="skip this many first")
    ls.add_argument("--json", action="store_true", help="print the answer as JSON")
    ls.set_defaults(fn=cmd_dlq_ls)
    show = ds.add_parser("show", help="show one dead letter with its event")
    show.add_argument("name")
    show.add_argument("id", help="the request id")
    show.add_argument("--json", action="store_true", help="print the entry as JSON")
    show.set_defaults(fn=cmd_dlq_show)
    rd = ds.add_parser("redrive", help="run dead letters again, each with its own request id")
    rd.add_argument("name")
    which = rd.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--id", dest="ids", action="append", metavar="ID", help="this one (repeatable)"
    )
    which.add_argument("--all", action="store_true", help="every dead letter of the function")
    rd.add_argument(
        "-q", "--qualifier", default=None, help="run as this version or alias (default: as before)"
    )
    rd.set_defaults(fn=cmd_dlq_redrive)
    purge = ds.add_parser("purge", help="delete dead letters (all, or --id)")
    purge.add_argument("name")
    purge.add_argument("--id", default=None, help="only this one")
    purge.set_defaults(fn=cmd_dlq_purge)
