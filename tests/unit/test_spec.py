"""shared.spec: strict validation of function specs, and the record's JSON form."""

from __future__ import annotations

import json
from typing import Any

import pytest

from shared.errors import InvalidSpec
from shared.spec import SPEC_FIELDS, FunctionRecord, FunctionSpec, parse_spec

MINIMAL = {"name": "hello", "image": "repo/hello:1"}


def bad_fields(doc: Any) -> dict[str, str]:
    with pytest.raises(InvalidSpec) as info:
        parse_spec(doc)
    assert info.value.fields == info.value.details["fields"]
    return info.value.fields


def with_(**kw: Any) -> dict[str, Any]:
    return {**MINIMAL, **kw}


def test_minimal_spec_takes_the_documented_defaults() -> None:
    spec = parse_spec(dict(MINIMAL))
    assert spec == FunctionSpec(
        name="hello",
        image="repo/hello:1",
        type="event",
        command=None,
        args=None,
        env={},
        memory_mb=512,
        cpus=1.0,
        timeout_s=3.0,
        init_timeout_s=30.0,
        idle_ttl_s=300.0,
        max_instances=10,
    )


def test_full_spec_keeps_every_field() -> None:
    doc = {
        "name": "web-App_2",
        "image": "registry.local:5000/team/web@sha256:" + "a" * 64,
        "type": "web",
        "command": ["python3", "-u"],
        "args": ["app.py", "--port", "9000"],
        "env": {"LOG_LEVEL": "debug", "_PRIVATE": ""},
        "memory_mb": 1024,
        "cpus": 0.5,
        "timeout_s": 900,
        "init_timeout_s": 1.5,
        "idle_ttl_s": 86400,
        "max_instances": 1000,
    }
    spec = parse_spec(doc)
    assert spec.name == "web-App_2"
    assert spec.image == doc["image"]
    assert spec.type == "web"
    assert spec.command == ("python3", "-u")
    assert spec.args == ("app.py", "--port", "9000")
    assert spec.env == {"LOG_LEVEL": "debug", "_PRIVATE": ""}
    assert (spec.memory_mb, spec.cpus, spec.timeout_s) == (1024, 0.5, 900.0)
    assert (spec.init_timeout_s, spec.idle_ttl_s, spec.max_instances) == (1.5, 86400.0, 1000)
    assert isinstance(spec.memory_mb, int) and isinstance(spec.max_instances, int)
    assert isinstance(spec.timeout_s, float) and isinstance(spec.cpus, float)


def test_parsed_env_is_a_copy_of_the_document() -> None:
    env = {"A": "1"}
    spec = parse_spec(with_(env=env))
    env["B"] = "2"
    assert spec.env == {"A": "1"}


def test_empty_args_list_is_kept_as_empty_not_none() -> None:
    # An empty Args overrides the image's CMD with nothing; None keeps the image's CMD.
    assert parse_spec(with_(args=[])).args == ()


def test_integral_float_is_accepted_for_integer_fields() -> None:
    spec = parse_spec(with_(memory_mb=256.0, max_instances=3.0))
    assert spec.memory_mb == 256 and isinstance(spec.memory_mb, int)
    assert spec.max_instances == 3 and isinstance(spec.max_instances, int)


@pytest.mark.parametrize("doc", [None, [], "name: x", 3])
def test_non_mapping_document(doc: Any) -> None:
    assert list(bad_fields(doc)) == ["<document>"]


@pytest.mark.parametrize(
    ("doc", "field", "says"),
    [
        (with_(memory=512), "memory", "unknown field"),
        (with_(Name="x"), "Name", "unknown field"),
        ({"image": "x"}, "name", "required"),
        (with_(name=""), "name", "required"),
        (with_(name="1abc"), "name", "letter"),
        (with_(name="-abc"), "name", "letter"),
        (with_(name="has space"), "name", "letters"),
        (with_(name="dot.ted"), "name", "letters"),
        (with_(name="a" * 61), "name", "1-60"),
        (with_(name=42), "name", "required"),
        ({"name": "x"}, "image", "required"),
        (with_(image=""), "image", "required"),
        (with_(image="   "), "image", "required"),
        (with_(image="repo/x :1"), "image", "image reference"),
        (with_(image="repo/x:1\n"), "image", "image reference"),
        (with_(image="\trepo"), "image", "image reference"),
        (with_(image=["repo"]), "image", "required"),
        (with_(type="http"), "type", "'event' or 'web'"),
        (with_(type=None), "type", "'event' or 'web'"),
        (with_(command="python3 app.py"), "command", '["python3", "app.py"]'),
        (with_(command=[]), "command", "must not be empty"),
        (with_(command=["", "x"]), "command", "must not be empty"),
        (with_(command=["python3", 3]), "command", "list of strings"),
        (with_(command={"0": "x"}), "command", "list of strings"),
        (with_(args="--port 9000"), "args", '["python3", "app.py"]'),
        (with_(args=["--port", 9000]), "args", "list of strings"),
        (with_(args=[None]), "args", "list of strings"),
        (with_(env=["A=1"]), "env", "mapping"),
        (with_(env={"1ABC": "x"}), "env", "invalid variable names: 1ABC"),
        (with_(env={"A-B": "x"}), "env", "invalid variable names: A-B"),
        (with_(env={"A B": "x"}), "env", "invalid variable names"),
        (with_(env={"": "x"}), "env", "invalid variable names"),
        (with_(env={"A": 1}), "env", "values must be strings: A"),
        (with_(env={"A": None, "B": "ok"}), "env", "values must be strings: A"),
        (with_(env={"A": True}), "env", "values must be strings"),
        (with_(env={"SCF_RUNTIME": "x"}), "env", "reserved names"),
        (with_(env={"IMAGEFN_X": "x"}), "env", "reserved names"),
    ],
)
def test_each_bad_field_is_named(doc: Any, field: str, says: str) -> None:
    fields = bad_fields(doc)
    assert list(fields) == [field]
    assert says in fields[field]


def test_env_over_4_kb_is_rejected_and_at_4_kb_accepted() -> None:
    # Each variable counts len(name) + len(value) + 2 ("=" and the terminating NUL).
    at_limit = {"A": "x" * (4096 - 3)}
    assert parse_spec(with_(env=at_limit)).env == at_limit
    fields = bad_fields(with_(env={"A": "x" * (4096 - 2)}))
    assert "4097 bytes" in fields["env"] and "4096" in fields["env"]


def test_env_size_counts_utf8_bytes_not_characters() -> None:
    # 2 bytes per "é": 2100 characters are 4200 bytes.
    fields = bad_fields(with_(env={"A": "é" * 2100}))
    assert "4203 bytes" in fields["env"]


RANGE_CASES = [
    ("memory_mb", 64, 16384),
    ("cpus", 0.05, 16),
    ("timeout_s", 1, 900),
    ("init_timeout_s", 1, 300),
    ("idle_ttl_s", 1, 86400),
    ("max_instances", 1, 1000),
]


@pytest.mark.parametrize(("field", "low", "high"), RANGE_CASES)
def test_numeric_range_bounds_are_inclusive(field: str, low: float, high: float) -> None:
    assert getattr(parse_spec(with_(**{field: low})), field) == low
    assert getattr(parse_spec(with_(**{field: high})), field) == high


@pytest.mark.parametrize(("field", "low", "high"), RANGE_CASES)
def test_numeric_range_just_outside_is_rejected(field: str, low: float, high: float) -> None:
    integer = field in ("memory_mb", "max_instances")
    below = low - 1 if integer else low - 0.01
    above = high + 1 if integer else high + 0.01
    for value in (below, above, 0, -1):
        fields = bad_fields(with_(**{field: value}))
        assert list(fields) == [field]
        assert fields[field] == f"must be between {low:g} and {high:g}"


@pytest.mark.parametrize("field", [f for f, _, _ in RANGE_CASES])
def test_bool_is_not_a_number(field: str) -> None:
    # True == 1 in Python and 1 is in range for several fields: must still be refused.
    fields = bad_fields(with_(**{field: True}))
    assert fields[field] in ("must be an integer", "must be a number")


@pytest.mark.parametrize("field", [f for f, _, _ in RANGE_CASES])
@pytest.mark.parametrize("value", ["5", None, [5], {"v": 5}])
def test_non_numbers_are_rejected(field: str, value: Any) -> None:
    assert field in bad_fields(with_(**{field: value}))


@pytest.mark.parametrize("field", ["memory_mb", "max_instances"])
def test_fractional_float_for_integer_field(field: str) -> None:
    assert bad_fields(with_(**{field: 100.5})) == {field: "must be an integer"}


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_numbers_are_rejected(value: float) -> None:
    assert "cpus" in bad_fields(with_(cpus=value))
    assert "timeout_s" in bad_fields(with_(timeout_s=value))


def test_every_bad_field_is_named_at_once() -> None:
    doc = {
        "name": "9bad",
        "image": "has space",
        "type": "cron",
        "command": "python3",
        "args": [1],
        "env": {"SCF_X": "1"},
        "memory_mb": 1,
        "cpus": 99,
        "timeout_s": 0,
        "init_timeout_s": 301,
        "idle_ttl_s": True,
        "max_instances": 1.5,
        "replicas": 3,
    }
    with pytest.raises(InvalidSpec) as info:
        parse_spec(doc)
    expected = {
        "name",
        "image",
        "type",
        "command",
        "args",
        "env",
        "memory_mb",
        "cpus",
        "timeout_s",
        "init_timeout_s",
        "idle_ttl_s",
        "max_instances",
        "replicas",
    }
    assert set(info.value.fields) == expected
    # The message lists every field too, sorted, so a log line is enough to fix the spec.
    assert info.value.message == "invalid function spec: " + ", ".join(sorted(expected))


def test_name_with_trailing_newline_is_rejected() -> None:
    assert "name" in bad_fields(with_(name="hello\n"))


def test_env_name_with_trailing_newline_is_rejected() -> None:
    assert "env" in bad_fields(with_(env={"FOO\n": "x"}))


def full_record() -> FunctionRecord:
    spec = parse_spec(
        with_(
            type="web",
            command=["/bin/server"],
            args=["-p", "9000"],
            env={"K": "v", "UNICODE": "ü→✓"},
            cpus=0.25,
            timeout_s=12.5,
        )
    )
    return FunctionRecord(
        spec=spec,
        image_ref="127.0.0.1:5000/hello@sha256:" + "b" * 64,
        image_digest="sha256:" + "b" * 64,
        version=7,
        created_at=1_700_000_000.25,
        updated_at=1_700_000_123.5,
    )


def test_record_json_round_trip() -> None:
    record = full_record()
    raw = record.to_json()
    assert FunctionRecord.from_json(raw) == record
    assert FunctionRecord.from_json(raw.encode()) == record


def test_record_round_trip_with_default_spec() -> None:
    record = FunctionRecord(parse_spec(dict(MINIMAL)), "img@sha256:" + "0" * 64, "", 1, 1.0, 2.0)
    again = FunctionRecord.from_json(record.to_json())
    assert again == record
    assert again.spec.command is None and again.spec.args is None


def test_record_dict_is_flat_and_json_friendly() -> None:
    d = full_record().to_dict()
    assert d["name"] == "hello" and d["version"] == 7
    assert d["image_ref"] == "127.0.0.1:5000/hello@" + d["image_digest"]
    assert d["image_digest"] == "sha256:" + "b" * 64
    assert d["command"] == ["/bin/server"] and d["args"] == ["-p", "9000"]
    assert set(d) == SPEC_FIELDS | {
        "image_ref",
        "image_digest",
        "version",
        "created_at",
        "updated_at",
    }


def test_record_without_image_digest_decodes_with_an_empty_one() -> None:
    d = full_record().to_dict()
    del d["image_digest"]
    again = FunctionRecord.from_dict(d)
    assert again.image_digest == ""
    assert again.image_ref == full_record().image_ref


def test_record_from_dict_revalidates_the_spec() -> None:
    d = full_record().to_dict()
    d["memory_mb"] = 1
    with pytest.raises(InvalidSpec) as info:
        FunctionRecord.from_dict(d)
    assert list(info.value.fields) == ["memory_mb"]


def test_instance_concurrency_is_for_web_functions_only() -> None:
    web = parse_spec({"name": "w", "image": "r/w:1", "type": "web", "instance_concurrency": 8})
    assert web.instance_concurrency == 8
    with pytest.raises(InvalidSpec) as info:
        parse_spec({"name": "e", "image": "r/e:1", "instance_concurrency": 2})
    assert set(info.value.fields) == {"instance_concurrency"}


@pytest.mark.parametrize(
    ("field", "bad"),
    [
        ("instance_concurrency", 0),
        ("instance_concurrency", 101),
        ("max_concurrency", -1),
        ("max_concurrency", 1.5),
    ],
)
def test_concurrency_fields_are_checked(field: str, bad: float) -> None:
    with pytest.raises(InvalidSpec) as info:
        parse_spec({"name": "w", "image": "r/w:1", "type": "web", field: bad})
    assert field in info.value.fields


def test_concurrency_defaults() -> None:
    spec = parse_spec({"name": "e", "image": "r/e:1"})
    assert (spec.instance_concurrency, spec.max_concurrency) == (1, 0)


# -- asynchronous invocation policy and destinations ------------------------------------------


def test_async_policy_and_destinations_round_trip() -> None:
    doc = {
        **MINIMAL,
        "async": {"max_retries": 5, "max_event_age_s": 600},
        "destinations": {
            "on_success": {"kafka": "fn.done"},
            "on_failure": {"url": "http://127.0.0.1:9999/hook"},
        },
    }
    spec = parse_spec(doc)
    assert (spec.async_policy.max_retries, spec.async_policy.max_event_age_s) == (5, 600)
    assert spec.destinations.on_success is not None
    assert spec.destinations.on_success.kafka == "fn.done"
    d = spec.to_dict()
    assert d["async"] == {"max_retries": 5, "max_event_age_s": 600}
    assert d["destinations"] == doc["destinations"]
    record = FunctionRecord(spec, "img@sha256:" + "0" * 64, "", 1, 1.0, 2.0)
    assert FunctionRecord.from_json(record.to_json()) == record


def test_async_defaults_follow_scf() -> None:
    spec = parse_spec(dict(MINIMAL))
    assert (spec.async_policy.max_retries, spec.async_policy.max_event_age_s) == (2, 21600)
    assert spec.destinations.on_success is None and spec.destinations.on_failure is None


@pytest.mark.parametrize(
    ("value", "field", "says"),
    [
        ({"max_retries": 11}, "async.max_retries", "between 0 and 10"),
        ({"max_retries": -1}, "async.max_retries", "between 0 and 10"),
        ({"max_retries": 1.5}, "async.max_retries", "integer"),
        ({"max_retries": True}, "async.max_retries", "integer"),
        ({"max_event_age_s": 59}, "async.max_event_age_s", "between 60 and 21600"),
        ({"max_event_age_s": 21601}, "async.max_event_age_s", "between 60 and 21600"),
        ({"retries": 1}, "async.retries", "unknown field"),
        ([1], "async", "mapping"),
    ],
)
def test_bad_async_policy_names_the_field(value: Any, field: str, says: str) -> None:
    fields = bad_fields({**MINIMAL, "async": value})
    assert says in fields[field]


@pytest.mark.parametrize(
    ("value", "field"),
    [
        ({"on_success": {"kafka": "bad topic"}}, "destinations.on_success"),
        ({"on_failure": {"url": "ftp://x/y"}}, "destinations.on_failure"),
        ({"on_failure": {"url": "http://"}}, "destinations.on_failure"),
        ({"on_failure": {"kafka": "a", "url": "http://x"}}, "destinations.on_failure"),
        ({"on_error": {"kafka": "a"}}, "destinations.on_error"),
        ("x", "destinations"),
    ],
)
def test_bad_destination_names_the_field(value: Any, field: str) -> None:
    assert field in bad_fields({**MINIMAL, "destinations": value})


def test_freeze_idle_defaults_to_true_and_must_be_a_boolean() -> None:
    base = {"name": "f", "image": "repo/f:1"}
    assert parse_spec(base).freeze_idle is True
    assert parse_spec({**base, "freeze_idle": False}).freeze_idle is False
    for bad in ("no", 0, None):
        with pytest.raises(InvalidSpec) as info:
            parse_spec({**base, "freeze_idle": bad})
        assert info.value.details["fields"] == {"freeze_idle": "must be true or false"}


def test_records_published_before_freeze_idle_existed_still_freeze() -> None:
    record = FunctionRecord(
        spec=FunctionSpec(name="f", image="repo/f:1"),
        image_ref="repo/f@sha256:" + "0" * 64,
        image_digest="sha256:" + "0" * 64,
        version=1,
        created_at=1.0,
        updated_at=1.0,
    )
    data = record.to_dict()
    del data["freeze_idle"]
    assert FunctionRecord.from_json(json.dumps(data)).spec.freeze_idle is True
