"""shared.errors: contract codes, HTTP statuses, and the round trip across the queue."""

from __future__ import annotations

import pytest

from shared import errors as E
from shared.errors import ERROR_TYPES, ImagefnError, InvalidSpec, error_from_dict

# (class, SCF contract code or None, HTTP status), written out from the contract's table.
EXPECTED: list[tuple[type[ImagefnError], int | None, int]] = [
    (E.ImagefnError, None, 500),
    (E.InvalidRequest, None, 400),
    (E.InvalidSpec, None, 400),
    (E.Unauthorized, None, 401),
    (E.Forbidden, None, 403),
    (E.KeyNotFound, None, 404),
    (E.RequestIdConflict, None, 409),
    (E.FunctionNotFound, None, 404),
    (E.VersionNotFound, None, 404),
    (E.TriggerNotFound, None, 404),
    (E.InvocationNotFound, None, 404),
    (E.BatchNotFound, None, 404),
    (E.RequestTooLarge, 406, 413),
    (E.ResourceLimitReached, 429, 429),
    (E.ConcurrencyLimitExceeded, 432, 429),
    (E.UserCodeError, 443, 502),
    (E.FunctionTimeout, 433, 504),
    (E.OutOfMemory, 434, 502),
    (E.UserProcessExited, 439, 502),
    (E.ContainerStateExited, 405, 502),
    (E.ResultTooLarge, 407, 502),
    (E.PullImageFailed, 444, 502),
    (E.ContainerInitError, 445, 502),
    (E.PortBindingFailed, 446, 502),
    (E.PullImageTimeout, 447, 504),
    (E.InitContainerTimeout, 450, 504),
    (E.RequestCanceled, 499, 499),
    (E.ServiceUnavailable, None, 503),
    (E.QueueUnavailable, None, 503),
    (E.InternalError, None, 500),
]


@pytest.mark.parametrize(
    ("cls", "code", "status"), EXPECTED, ids=lambda x: getattr(x, "__name__", x)
)
def test_contract_code_and_http_status(
    cls: type[ImagefnError], code: int | None, status: int
) -> None:
    assert cls.scf_code == code
    assert cls.http_status == status


def test_every_error_type_is_in_the_table_above() -> None:
    # A new error type must get its code and status pinned here.
    assert {c.__name__ for c, _, _ in EXPECTED} == set(ERROR_TYPES)


def test_invalid_spec_is_an_invalid_request() -> None:
    err = InvalidSpec({"b": "x", "a": "y"})
    assert isinstance(err, E.InvalidRequest)
    assert err.message == "invalid function spec: a, b"
    assert err.details == {"fields": {"b": "x", "a": "y"}}


def test_to_dict_carries_type_message_code_and_details() -> None:
    err = E.UserProcessExited("exited with 3", details={"exit_code": 3, "logs": ["a", "b"]})
    assert err.to_dict() == {
        "type": "UserProcessExited",
        "message": "exited with 3",
        "code": 439,
        "exit_code": 3,
        "logs": ["a", "b"],
    }
    # No contract code: no "code" key at all.
    assert "code" not in E.ServiceUnavailable("down").to_dict()


@pytest.mark.parametrize("cls", [c for c, _, _ in EXPECTED if c is not InvalidSpec])
def test_round_trip_keeps_type_message_and_details(cls: type[ImagefnError]) -> None:
    err = cls("something broke", details={"exit_code": 137, "logs": ["l1"], "nested": {"k": 1}})
    back = error_from_dict(err.to_dict())
    assert type(back) is cls
    assert back.message == "something broke"
    assert back.details == {"exit_code": 137, "logs": ["l1"], "nested": {"k": 1}}
    assert back.to_dict() == err.to_dict()


def test_round_trip_without_details() -> None:
    back = error_from_dict(E.FunctionTimeout("too slow").to_dict())
    assert isinstance(back, E.FunctionTimeout)
    assert back.details == {}


def test_invalid_spec_round_trip_keeps_fields() -> None:
    err = InvalidSpec({"memory_mb": "must be between 64 and 16384", "name": "required"})
    back = error_from_dict(err.to_dict())
    assert isinstance(back, InvalidSpec)
    assert back.fields == err.fields
    assert back.message == err.message


def test_round_trip_survives_json() -> None:
    import json

    err = E.ContainerInitError("bad command", details={"exit_code": 127})
    back = error_from_dict(json.loads(json.dumps(err.to_dict())))
    assert isinstance(back, E.ContainerInitError) and back.details == {"exit_code": 127}


@pytest.mark.parametrize(
    "data",
    [
        {"type": "NoSuchError", "message": "m"},
        {"type": "KeyError", "message": "m"},  # a builtin name is not one of ours
        {"message": "m"},
    ],
)
def test_unknown_or_missing_type_becomes_internal_error(data: dict[str, str]) -> None:
    err = error_from_dict(data)
    assert type(err) is E.InternalError
    assert err.message == "m"
    assert err.http_status == 500


def test_missing_message_gets_a_placeholder() -> None:
    err = error_from_dict({"type": "FunctionTimeout"})
    assert isinstance(err, E.FunctionTimeout)
    assert err.message == "unknown error"


def test_errors_are_exceptions_with_their_message() -> None:
    with pytest.raises(E.FunctionTimeout, match="over 3 s"):
        raise E.FunctionTimeout("over 3 s")
    assert str(E.OutOfMemory("oom")) == "oom"
    assert E.OutOfMemory("oom").type_name == "OutOfMemory"
