"""The progress of a batch, followed until it ends (``imagefn batch submit --follow``,
``imagefn batch status --follow``): the status is polled every POLL_INTERVAL_S and shown
as a live bar (rich) on a terminal, or as a plain line every PLAIN_INTERVAL_S otherwise,
so that a log file gets a readable record rather than control characters.
"""

from __future__ import annotations

import argparse
import sys
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any, TextIO

from cli.api import CliError, request_json

POLL_INTERVAL_S = 0.5
# Without a terminal a line per poll would flood a log; one every few seconds is a record.
PLAIN_INTERVAL_S = 5.0
# While following, polls that get no answer are retried this long (a gateway restarting)
# before the CLI gives up; an error answer (404: no such batch) ends it at once.
FOLLOW_PATIENCE_S = 30.0


def duration(s: Any) -> str:
    """``42 s``, ``11 min 02 s``, ``3 h 05 min``; ``?`` for no number."""
    if not isinstance(s, int | float) or s < 0:
        return "?"
    s = round(s)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def _finished(doc: dict[str, Any]) -> int:
    return sum(int(doc.get(k) or 0) for k in ("succeeded", "failed", "cancelled"))


def progress_line(doc: dict[str, Any]) -> str:
    """``1234/10000 done (12 failed), 40 in flight, 85.2 items/s, ETA 1 min 43 s``."""
    rate = doc.get("items_per_s")
    parts = [
        f"{_finished(doc)}/{doc.get('total', '?')} done ({doc.get('failed', 0)} failed)",
        f"{doc.get('in_flight', 0)} in flight",
        f"{rate:.1f} items/s" if isinstance(rate, int | float) else "? items/s",
        f"ETA {duration(doc.get('eta_s'))}",
    ]
    return ", ".join(parts)


def _polls(args: argparse.Namespace, batch_id: str) -> Iterator[dict[str, Any]]:
    """The batch's status every POLL_INTERVAL_S, up to and with the one that ends it."""
    path = f"/v1/batches/{urllib.parse.quote(batch_id, safe='')}"
    answered = time.monotonic()
    while True:
        try:
            doc = request_json(args, "GET", path)
        except CliError as e:
            if e.error is not None or time.monotonic() - answered > FOLLOW_PATIENCE_S:
                raise CliError(f"{e} (following batch {batch_id})", error=e.error) from None
            time.sleep(POLL_INTERVAL_S)
            continue
        answered = time.monotonic()
        yield doc
        if doc.get("state") != "running":
            return
        time.sleep(POLL_INTERVAL_S)


def _interactive(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _follow_plain(polls: Iterator[dict[str, Any]], out: TextIO, batch_id: str) -> dict[str, Any]:
    last_print = float("-inf")
    doc: dict[str, Any] = {}
    for doc in polls:
        now = time.monotonic()
        if now - last_print >= PLAIN_INTERVAL_S or doc.get("state") != "running":
            out.write(f"batch {batch_id}: {progress_line(doc)}\n")
            out.flush()
            last_print = now
    return doc


def _follow_rich(polls: Iterator[dict[str, Any]], out: TextIO, batch_id: str) -> dict[str, Any]:
    # Imported here: only a terminal needs it, and it costs import time for every command.
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    doc: dict[str, Any] = {}
    with Progress(
        TextColumn(f"[bold]{escape(batch_id)}[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}", markup=False),
        console=Console(file=out),
    ) as progress:
        task = progress.add_task("batch", total=None, detail="")
        for doc in polls:
            rate = doc.get("items_per_s")
            detail = [
                f"{doc.get('failed', 0)} failed",
                f"{doc.get('in_flight', 0)} in flight",
                f"{rate:.1f}/s" if isinstance(rate, int | float) else "?/s",
                f"ETA {duration(doc.get('eta_s'))}",
            ]
            total = doc.get("total")
            progress.update(
                task,
                completed=_finished(doc),
                total=total if isinstance(total, int) else None,
                detail=" · ".join(detail),
            )
    return doc


def follow(args: argparse.Namespace, batch_id: str, out: TextIO | None = None) -> None:
    """Show the batch's progress on ``out`` (stdout by default) until it ends; a batch
    that did not complete cleanly (failed items, cancelled) is a non-zero exit, so that
    scripts notice."""
    out = out or sys.stdout
    polls = _polls(args, batch_id)
    try:
        if _interactive(out):
            doc = _follow_rich(polls, out, batch_id)
        else:
            doc = _follow_plain(polls, out, batch_id)
    except KeyboardInterrupt:
        print(
            f"\nimagefn: stopped following; batch {batch_id} keeps running "
            f"(imagefn batch status {batch_id} --follow, imagefn batch cancel {batch_id})",
            file=sys.stderr,
        )
        raise
    took = ""
    if isinstance(doc.get("finished_at"), int | float) and isinstance(
        doc.get("created_at"), int | float
    ):
        took = f" in {duration(doc['finished_at'] - doc['created_at'])}"
    counts = (
        f"{doc.get('succeeded', 0)} succeeded, {doc.get('failed', 0)} failed, "
        f"{doc.get('cancelled', 0)} cancelled of {doc.get('total', '?')}"
    )
    print(f"batch {batch_id} {doc.get('state')}{took}: {counts}", file=out, flush=True)
    if doc.get("state") != "completed" or doc.get("failed"):
        raise CliError(
            f"batch {batch_id} {doc.get('state')} with {doc.get('failed', 0)} failed and "
            f"{doc.get('cancelled', 0)} cancelled items; see: imagefn batch results {batch_id}"
        )
