"""shared.messages: the wire formats of invocations and results."""

from __future__ import annotations

import json

from shared.errors import FunctionTimeout, UserCodeError
from shared.messages import Invocation, InvocationResult

from .helpers import make_record

ALL_BYTES = bytes(range(256))
REPEATED = [
    ("Set-Cookie", "a=1"),
    ("X-Trace", "t"),
    ("Set-Cookie", "b=2; Path=/"),
    ("set-cookie", "c=3"),
    ("Accept", "ü, text/plain"),
]


def wire(fields: dict[str, bytes]) -> dict[bytes, bytes]:
    """What a Redis stream read gives back: the same fields, with bytes keys."""
    return {k.encode(): v for k, v in fields.items()}


def test_invocation_round_trip() -> None:
    inv = Invocation(
        request_id="req-1",
        record=make_record("site", version=4, type="web", env={"A": "1"}, command=("srv",)),
        kind="web",
        method="PATCH",
        path="/a/b%20c",
        query="x=1&x=2",
        headers=REPEATED,
        body=ALL_BYTES,
        deadline=1_700_000_100.5,
        enqueued_at=1_700_000_000.25,
        reply_to="imagefn:replies:g1",
        version="3",
    )
    fields = inv.encode()
    # The body travels as raw bytes, never inside the JSON metadata.
    assert fields["b"] == ALL_BYTES
    # The record travels in its own field, as the registry stores it.
    assert b"site" in fields["r"] and b"site" not in fields["m"]
    back = Invocation.decode(wire(fields))
    assert back == inv
    assert back.body == ALL_BYTES
    assert back.headers == REPEATED
    assert back.function == "site"


def test_invocation_defaults_and_missing_body() -> None:
    inv = Invocation(request_id="r", record=make_record(), kind="event")
    fields = wire(inv.encode())
    del fields[b"b"]
    back = Invocation.decode(fields)
    assert back.body == b""
    assert (back.method, back.path, back.version) == ("POST", "/event-invoke", "$LATEST")
    assert back.enqueued_at == inv.enqueued_at


def test_invocation_without_version_decodes_as_latest() -> None:
    fields = wire(Invocation(request_id="r", record=make_record(), kind="event").encode())
    meta = json.loads(fields[b"m"])
    del meta["version"]
    fields[b"m"] = json.dumps(meta).encode()
    assert Invocation.decode(fields).version == "$LATEST"


def test_result_round_trip() -> None:
    result = InvocationResult(
        request_id="req-2",
        status=207,
        headers=REPEATED,
        body=ALL_BYTES,
        error=None,
        instance="abc123",
        worker="w1",
        cold_start=True,
        timings={"queue": 0.001, "create": 0.2, "run": 1.5},
    )
    fields = result.encode()
    assert fields["b"] == ALL_BYTES
    back = InvocationResult.decode(wire(fields))
    assert back == result
    assert back.headers == REPEATED


def test_failure_result_round_trip_and_raise() -> None:
    err = UserCodeError("HTTP 500", details={"function_status": 500})
    result = InvocationResult.failure("req-3", err, instance="i1", cold_start=False)
    assert result.status == 502
    back = InvocationResult.decode(wire(result.encode()))
    assert back == result
    assert back.error == {
        "type": "UserCodeError",
        "message": "HTTP 500",
        "code": 443,
        "function_status": 500,
    }
    try:
        back.raise_for_error()
    except UserCodeError as raised:
        assert raised.details == {"function_status": 500}
    else:
        raise AssertionError("raise_for_error did not raise")


def test_raise_for_error_is_silent_on_success() -> None:
    InvocationResult(request_id="r").raise_for_error()


def test_result_decode_tolerates_missing_optional_fields() -> None:
    fields = {b"m": json.dumps({"request_id": "r", "status": "504", "headers": []}).encode()}
    back = InvocationResult.decode(fields)
    assert back.status == 504
    assert (back.body, back.error, back.instance, back.cold_start, back.timings) == (
        b"",
        None,
        "",
        False,
        {},
    )


def test_failure_uses_the_error_status() -> None:
    result = InvocationResult.failure("r", FunctionTimeout("slow"))
    assert result.status == 504
    assert result.error is not None and result.error["code"] == 433
