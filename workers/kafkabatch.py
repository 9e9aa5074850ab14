"""The Kafka trigger's decisions, pure and tested without a broker: how records become
a CKafka event, how many go into one batch, and what a call's answer means for the
batch (done, retry from an offset, give up).

A batch always holds consecutive records of one partition, oldest first. Its call's
answer is judged as:

* ``ok`` — a 2xx answer without ``batchItemFailures``: the whole batch is handled;
* ``partial`` — a 2xx answer ``{"batchItemFailures": [{"itemIdentifier": "<offset>"}]}``
  naming offsets of the batch: the records before the lowest named offset are handled,
  that one and every later one are retried (AWS Lambda's semantics: order is kept);
* ``user`` — the function failed (an error of its own, an HTTP status >= 400, an answer
  naming offsets that are not in the batch) or the call cannot succeed as it is (a caller
  error such as RequestTooLarge, or an alias that does not exist): retried up to
  ``max_retries``, split in halves first with ``bisect``, then given up;
* ``platform`` — throttling or the platform's own trouble (ServiceUnavailable,
  ConcurrencyLimitExceeded, QueueUnavailable, image pulls, container starts): retried with
  backoff for as long as it takes, never counted.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from shared.messages import InvocationResult
from shared.retry import classify, failure_summary

Verdict = Literal["ok", "partial", "user", "platform"]

# ``{"Records":[]}`` around the records, and the comma between two of them.
EVENT_OVERHEAD_BYTES = len('{"Records":[]}')


@dataclass(frozen=True)
class KafkaRecord:
    """One consumed record, as much of it as the event and the error topic need."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...] = ()


def _text(raw: bytes | None) -> str:
    # SCF passes key and body as strings; bytes that are not UTF-8 are replaced (U+FFFD):
    # functions that consume binary records should encode them (base64) at the producer.
    return "" if raw is None else raw.decode("utf-8", errors="replace")


def record_doc(r: KafkaRecord) -> dict[str, Any]:
    return {
        "Ckafka": {
            "topic": r.topic,
            "partition": r.partition,
            "offset": r.offset,
            "msgKey": _text(r.key),
            "msgBody": _text(r.value),
        }
    }


def record_size(r: KafkaRecord) -> int:
    """Bytes the record takes in the event (its comma included)."""
    return len(json.dumps(record_doc(r), separators=(",", ":")).encode()) + 1


def event_body(records: Sequence[KafkaRecord]) -> bytes:
    """SCF's CKafka event: ``{"Records": [{"Ckafka": {...}}, ...]}``."""
    doc = {"Records": [record_doc(r) for r in records]}
    return json.dumps(doc, separators=(",", ":")).encode()


def batch_length(pending: Sequence[KafkaRecord], batch_size: int, max_bytes: int) -> int:
    """How many of ``pending`` (oldest first) the next batch takes: up to ``batch_size``,
    and no more than keeps the event within ``max_bytes``. Always at least one: a record
    too large on its own is sent alone (and fails as RequestTooLarge, a user failure)."""
    total = EVENT_OVERHEAD_BYTES
    n = 0
    for r in pending[:batch_size]:
        total += record_size(r)
        if n and total > max_bytes:
            break
        n += 1
    return max(1, n) if pending else 0


@dataclass(frozen=True)
class Judgement:
    verdict: Verdict
    # partial: the offsets the function named (sorted); the retry starts at the first.
    failed: tuple[int, ...] = ()
    reason: str = ""


def _item_failures(body: bytes) -> list[Any] | None:
    """The answer's ``batchItemFailures`` list, or None when it has none."""
    if not body.lstrip().startswith(b"{"):
        return None
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    if not isinstance(doc, dict):
        return None
    items = doc.get("batchItemFailures")
    return items if isinstance(items, list) and items else None


def judge(result: InvocationResult, offsets: Sequence[int]) -> Judgement:
    """What the answer to a call carrying the records at ``offsets`` means."""
    kind = classify(result)
    if kind == "platform":
        summary = failure_summary(result) or {}
        return Judgement("platform", reason=f"{summary.get('type')}: {summary.get('message')}")
    if kind in ("user", "caller"):
        summary = failure_summary(result) or {}
        return Judgement("user", reason=f"{summary.get('type')}: {summary.get('message')}")
    items = _item_failures(result.body)
    if items is None:
        return Judgement("ok")
    named: set[int] = set()
    for item in items:
        ident = item.get("itemIdentifier") if isinstance(item, dict) else None
        try:
            named.add(int(str(ident)))
        except ValueError:
            named.add(-1)
    if not named <= set(offsets):
        # As Lambda does: an answer that cannot be understood fails the whole batch.
        bad = sorted(named - set(offsets))[:5]
        return Judgement("user", reason=f"batchItemFailures names offsets not in the batch: {bad}")
    failed = tuple(sorted(named))
    return Judgement("partial", failed=failed, reason=f"the function reported offsets {failed}")


def retry_delay_s(retry: int, base_s: float = 0.2, cap_s: float = 5.0) -> float:
    """The pause before the ``retry``-th retry (1-based) of a user failure."""
    return float(min(cap_s, base_s * 2 ** max(0, retry - 1)))


def error_headers(
    trigger_id: str, r: KafkaRecord, reason: str, attempts: int
) -> list[tuple[str, bytes]]:
    """The headers of a record sent to the error topic: the original record's value and
    key are kept byte for byte; where it came from and why it failed ride in headers
    (the original headers follow)."""
    return [
        ("imagefn-trigger", trigger_id.encode()),
        ("imagefn-source-topic", r.topic.encode()),
        ("imagefn-source-partition", str(r.partition).encode()),
        ("imagefn-source-offset", str(r.offset).encode()),
        ("imagefn-attempts", str(attempts).encode()),
        ("imagefn-error", reason[:1000].encode()),
        *r.headers,
    ]
