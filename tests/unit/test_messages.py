"""shared.messages: the wire formats of invocations, results, heartbeats and control
commands."""

from __future__ import annotations

import json

import pytest

from shared.errors import FunctionTimeout, UserCodeError
from shared.messages import (
    BatchResultLine,
    ControlCommand,
    Heartbeat,
    Invocation,
    InvocationResult,
    MalformedMessage,
    batch_item_id,
)

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


# -- heartbeat ---------------------------------------------------------------------------

BEAT = Heartbeat(
    worker="w1",
    functions={"f@3": {"ready": 1, "busy": 0, "paused": 2, "starting": 0, "provisioned": 1}},
    draining=False,
    memory_capacity_mb=4096,
    memory_used_mb=384,
    desired={"f@3": 1},
    queue={"partitions": [0, 4]},
    ts=1_700_000_000.5,
)


def test_heartbeat_round_trip_from_str_and_bytes() -> None:
    raw = BEAT.encode()
    assert Heartbeat.decode(raw) == BEAT
    # What MGET gives back: bytes.
    assert Heartbeat.decode(raw.encode()) == BEAT


def test_heartbeat_wire_format_is_the_one_workers_sent_before_the_codec() -> None:
    # Byte for byte what an older reader (and a rolling upgrade) expects.
    assert BEAT.encode() == json.dumps(
        {
            "worker": "w1",
            "ts": 1_700_000_000.5,
            "draining": False,
            "memory_capacity_mb": 4096,
            "memory_used_mb": 384,
            "functions": BEAT.functions,
            "desired": {"f@3": 1},
            "queue": {"partitions": [0, 4]},
        },
        separators=(",", ":"),
    )


def test_heartbeat_of_an_older_worker_decodes_with_defaults() -> None:
    # A plain heartbeat: no memory, desired targets, queue report, draining flag or time.
    beat = Heartbeat.decode(json.dumps({"worker": "old", "functions": {"f@1": {"ready": 2}}}))
    assert beat == Heartbeat(worker="old", functions={"f@1": {"ready": 2}}, ts=0.0)
    assert (beat.memory_capacity_mb, beat.memory_used_mb, beat.queue) == (None, None, None)
    # Unreported stays unreported: no "null" entries that would read as garbage.
    assert "queue" not in json.loads(beat.encode())
    assert "memory_capacity_mb" not in json.loads(beat.encode())


def test_heartbeat_queue_report_other_than_an_object_is_no_report() -> None:
    raw = json.dumps({"worker": "w", "functions": {}, "queue": [1, 2]})
    assert Heartbeat.decode(raw).queue is None
    # An empty report is a report (the Redis backend's), not its absence.
    assert Heartbeat.decode(json.dumps({"worker": "w", "functions": {}, "queue": {}})).queue == {}


def test_heartbeat_numbers_are_normalised() -> None:
    raw = json.dumps(
        {
            "worker": 7,
            "functions": {"f@1": {"ready": "2"}},
            "memory_capacity_mb": "1024",
            "memory_used_mb": 0,
            "desired": {"f@1": "1"},
        }
    )
    beat = Heartbeat.decode(raw)
    assert beat.worker == "7"
    assert beat.functions == {"f@1": {"ready": 2}}
    assert (beat.memory_capacity_mb, beat.memory_used_mb, beat.desired) == (1024, 0, {"f@1": 1})


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"not json",
        b"\xff\xfe",
        "[]",
        "null",
        json.dumps({"functions": {}}),  # no worker
        json.dumps({"worker": "w"}),  # no functions
        json.dumps({"worker": "w", "functions": []}),
        json.dumps({"worker": "w", "functions": {"f@1": 3}}),
        json.dumps({"worker": "w", "functions": {"f@1": {"ready": "many"}}}),
        json.dumps({"worker": "w", "functions": {}, "memory_capacity_mb": "lots"}),
        json.dumps({"worker": "w", "functions": {}, "desired": None}),
        json.dumps({"worker": "w", "functions": {}, "desired": {"f@1": None}}),
    ],
)
def test_heartbeat_garbage_is_a_value_error(raw: bytes | str) -> None:
    with pytest.raises(MalformedMessage):
        Heartbeat.decode(raw)
    # Callers that skip what they cannot decode may catch the plain ValueError.
    assert issubclass(MalformedMessage, ValueError)


# -- control command -----------------------------------------------------------------------


def test_control_command_round_trip() -> None:
    command = ControlCommand(targets={"b@2": 1, "a@1": 3}, images=["r/a@sha256:1", "r/b:2"])
    fields = command.encode()
    # As the manager wrote it before the codec: targets with sorted keys.
    assert fields == {
        "targets": b'{"a@1": 3, "b@2": 1}',
        "images": b'["r/a@sha256:1", "r/b:2"]',
    }
    assert ControlCommand.decode(wire(fields)) == command


def test_control_command_empty_means_keep_none() -> None:
    back = ControlCommand.decode(wire(ControlCommand().encode()))
    assert back == ControlCommand(targets={}, images=[])


def test_control_command_without_or_with_garbled_images_still_sets_targets() -> None:
    # The images are a pre-pull hint: an older manager's command has none.
    assert ControlCommand.decode({b"targets": b'{"f@1": 2}'}) == ControlCommand({"f@1": 2}, [])
    for images in (b"not json", b'"a string"', b"{}", b"3"):
        back = ControlCommand.decode({b"targets": b'{"f@1": "2"}', b"images": images})
        assert back == ControlCommand(targets={"f@1": 2}, images=[])


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {b"images": b"[]"},
        {b"targets": b"not json"},
        {b"targets": b"\xff"},
        {b"targets": b"[1, 2]"},
        {b"targets": b"null"},
        {b"targets": b'{"f@1": "two"}'},
        {b"targets": b'{"f@1": null}'},
    ],
)
def test_control_command_garbage_is_a_value_error(fields: dict[bytes, bytes]) -> None:
    with pytest.raises(MalformedMessage):
        ControlCommand.decode(fields)


def test_batch_result_lines_round_trip_and_refuse_garbage() -> None:
    ok = BatchResultLine(3, batch_item_id("b-1", 3), "succeeded", {"x": [1]})
    assert ok.request_id == "b-1-3"
    assert BatchResultLine.decode(ok.encode()) == ok
    failed = BatchResultLine(4, "b-1-4", "failed", error={"type": "UserCodeError"})
    assert b'"result"' not in failed.encode()
    assert BatchResultLine.decode(failed.encode()) == failed
    for raw in (b"[]", b'{"index": 1}', b"nope"):
        with pytest.raises(MalformedMessage):
            BatchResultLine.decode(raw)
