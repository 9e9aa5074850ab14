"""Batches without Redis: the feeder's pure parts (how many to feed, the token bucket, the
item invocations), the status document, and the routes' query checks."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway.batches import parse_results_params, parse_submit_params
from shared.batches import BatchMeta, BatchProgress, cancelled_line, status_doc
from shared.errors import InvalidRequest
from shared.messages import Invocation
from shared.settings import AsyncSettings
from shared.spec import FunctionRecord, parse_spec
from workers.feeder import Bucket, item_invocation, refill, spend, to_feed, version_of

META = BatchMeta("fn", "prod", 4, 1, 600, created_at=1000.0)


def progress(**kw: Any) -> BatchProgress:
    base: dict[str, Any] = dict(
        batch_id="b-" + "0" * 32,
        meta=META,
        state="running",
        total=100,
        fed=0,
        succeeded=0,
        failed=0,
        cancelled=0,
    )
    return BatchProgress(**{**base, **kw})


def record(version: int = 3) -> FunctionRecord:
    spec = parse_spec({"name": "fn", "image": "repo/fn:1"})
    digest = "sha256:" + "a" * 64
    return FunctionRecord(spec, f"reg/repo/fn@{digest}", digest, version, 1.0, 2.0)


# -- how many to feed ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("total", "fed", "counted", "conc", "budget", "expected"),
    [
        (100, 0, 0, 4, 1000, 4),  # the concurrency is the bound
        (100, 4, 1, 4, 1000, 1),  # one finished: one more
        (100, 4, 4, 4, 2.9, 2),  # whole tokens only
        (100, 98, 97, 4, 1000, 2),  # what is left
        (100, 100, 50, 4, 1000, 0),  # all fed
        (100, 10, 0, 4, 1000, 0),  # over the concurrency (it was lowered): nothing, never < 0
        (100, 0, 0, 4, 0.5, 0),  # empty bucket
        (100, 5, 9, 4, 1000, 4),  # more counted than fed (a crash re-published): in flight 0
    ],
)
def test_to_feed(
    total: int, fed: int, counted: int, conc: int, budget: float, expected: int
) -> None:
    assert to_feed(total, fed, counted, conc, budget) == expected


def test_the_bucket_starts_full_refills_at_the_rate_and_caps() -> None:
    b = refill(None, now=10.0, rate=1000)
    assert b == Bucket(500.0, 10.0)  # BURST_S = 0.5 s of the rate
    b = spend(b, 500)
    assert b.tokens == 0
    b = refill(b, now=10.1, rate=1000)
    assert b.tokens == pytest.approx(100)
    b = refill(b, now=60.0, rate=1000)
    assert b.tokens == 500  # an idle function does not save up more
    b = refill(spend(b, 500), now=59.0, rate=1000)  # a clock going back adds nothing
    assert b.tokens == 0


def test_a_slow_rate_still_feeds_one_item_at_a_time() -> None:
    b = refill(None, now=0.0, rate=1)
    assert b.tokens == 1
    b = refill(spend(b, 1), now=0.5, rate=1)
    assert to_feed(10, 1, 1, 5, b.tokens) == 0
    b = refill(b, now=1.0, rate=1)
    assert to_feed(10, 1, 1, 5, b.tokens) == 1


def test_the_rate_is_shared_by_the_batches_of_a_function() -> None:
    # Two batches in one tick draw from one bucket: the first takes what it may.
    b = refill(None, now=0.0, rate=100)  # 50 tokens
    first = to_feed(1000, 0, 0, 40, b.tokens)
    b = spend(b, first)
    second = to_feed(1000, 0, 0, 40, b.tokens)
    assert (first, second) == (40, 10)


def test_item_invocations() -> None:
    p = progress(fed=7)
    inv = item_invocation(p, record(3), 7, b'{"n":7}')
    assert inv.request_id == f"{p.batch_id}-7"
    assert (inv.kind, inv.mode, inv.attempt, inv.reply_to, inv.deadline) == (
        "event",
        "async",
        1,
        "",
        0.0,
    )
    assert (inv.batch, inv.index, inv.body) == (p.batch_id, 7, b'{"n":7}')
    # The age counts from the batch's acceptance; the batch's overrides travel along.
    assert inv.accepted_at == 1000.0 and inv.first_accepted_at == 1000.0
    assert (inv.max_retries, inv.max_event_age_s, inv.retry_limit, inv.age_limit_s) == (
        1,
        600,
        1,
        600,
    )
    assert (inv.qualifier, inv.version) == ("prod", "3")
    # It crosses the queue unchanged.
    assert Invocation.decode({k.encode(): v for k, v in inv.encode().items()}) == inv


def test_version_of() -> None:
    assert version_of("$LATEST", record(3)) == "$LATEST"
    assert version_of("", record(3)) == "$LATEST"
    assert version_of("2", record(2)) == "2"


# -- the status document -------------------------------------------------------------------


def test_status_of_a_running_batch() -> None:
    p = progress(fed=30, succeeded=15, failed=5)
    doc = status_doc(p, now=1010.0)
    assert doc["queued"] == 70 and doc["in_flight"] == 10
    assert doc["items_per_s"] == 2.0  # 20 finished in 10 s
    assert doc["eta_s"] == 40.0  # 80 left at 2/s
    assert doc["finished_at"] is None and doc["max_concurrency"] == 4
    assert (doc["function"], doc["qualifier"], doc["state"], doc["total"]) == (
        "fn",
        "prod",
        "running",
        100,
    )


def test_status_before_anything_finished_and_when_over() -> None:
    assert status_doc(progress(), now=1001.0)["eta_s"] is None
    done = progress(state="completed", fed=100, succeeded=99, failed=1, finished_at=1050.0)
    doc = status_doc(done, now=5000.0)
    assert doc["eta_s"] == 0.0 and doc["items_per_s"] == 2.0  # until it finished
    cancelled = progress(state="cancelled", fed=100, succeeded=10, cancelled=88, fed_at_cancel=12)
    doc = status_doc(cancelled, now=1010.0)
    assert (doc["queued"], doc["in_flight"]) == (0, 2)
    assert not cancelled.over and doc["eta_s"] is not None


def test_progress_parses_the_hash_and_a_gone_one_is_none() -> None:
    values = [META.to_json().encode(), b"running", b"10", b"4", b"1", b"0", b"0", None, None]
    p = BatchProgress.parse("b-x", values)
    assert p is not None and (p.total, p.fed, p.counted, p.in_flight) == (10, 4, 1, 3)
    assert p.meta == META
    assert BatchProgress.parse("b-x", [None] * 9) is None


def test_cancelled_line() -> None:
    assert json.loads(cancelled_line("b-1", 5)) == {
        "index": 5,
        "request_id": "b-1-5",
        "status": "cancelled",
    }


# -- the routes' parameters ----------------------------------------------------------------

SETTINGS = AsyncSettings()


def test_submit_parameters_and_their_defaults() -> None:
    p = parse_submit_params({}, SETTINGS)
    assert (p.qualifier, p.max_concurrency, p.max_retries, p.max_event_age_s) == (
        "$LATEST",
        SETTINGS.batch_max_concurrency,
        -1,
        0,
    )
    query = {"qualifier": "prod", "max_concurrency": "10000", "max_retries": "0"}
    p = parse_submit_params({**query, "max_event_age_s": "60"}, SETTINGS)
    assert (p.qualifier, p.max_concurrency, p.max_retries, p.max_event_age_s) == (
        "prod",
        10000,
        0,
        60,
    )
    assert parse_submit_params({"qualifier": "7"}, SETTINGS).qualifier == "7"


@pytest.mark.parametrize(
    ("query", "named"),
    [
        ({"max_concurrency": "0"}, "max_concurrency"),
        ({"max_concurrency": "10001"}, "max_concurrency"),
        ({"max_concurrency": "x"}, "max_concurrency"),
        ({"max_retries": "11"}, "max_retries"),
        ({"max_retries": "-1"}, "max_retries"),
        ({"max_event_age_s": "59"}, "max_event_age_s"),
        ({"max_event_age_s": "21601"}, "max_event_age_s"),
        ({"max_event_age_s": "²"}, "max_event_age_s"),
        ({"qualifier": "0"}, "qualifier"),
        ({"qualifier": "no spaces"}, "qualifier"),
        ({"qualifier": "-x"}, "qualifier"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_bad_submit_parameters_are_named(query: dict[str, str], named: str) -> None:
    with pytest.raises(InvalidRequest) as got:
        parse_submit_params(query, SETTINGS)
    assert got.value.message.startswith(f"{named}: ")


def test_results_parameters() -> None:
    assert parse_results_params({}) == (False, 0)
    assert parse_results_params({"follow": "true", "start": "17"}) == (True, 17)
    for query in ({"follow": "maybe"}, {"start": "-1"}, {"limit": "3"}):
        with pytest.raises(InvalidRequest) as got:
            parse_results_params(query)
        assert got.value.message.startswith(f"{next(iter(query))}: ")
