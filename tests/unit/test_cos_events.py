"""Object-storage events: SeaweedFS's filer records (real ones, captured from a
``weed mini``) and S3 notifications mapped to changes, filtered by triggers, and turned
into SCF's COS event."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from shared import cos_events, filer_events
from shared.cos_events import ObjectChange, from_filer, from_s3_records, matches, split_path
from shared.triggers import Trigger

RECORDS = {
    r["case"]: r
    for r in json.loads((Path(__file__).parent / "filer_records.json").read_text())["records"]
}


def recorded(case: str) -> tuple[str, Any]:
    r = RECORDS[case]
    return r["key"], filer_events.decode(bytes.fromhex(r["value_hex"]))


def cos_trigger(**config: Any) -> Trigger:
    cfg = {"bucket": "probe", "events": ["created"], "prefix": "", "suffix": "", **config}
    return Trigger(function="thumbs", name="uploads", type="cos", config=cfg)


def change(key: str = "a/b.txt", kind: str = "created", bucket: str = "probe") -> ObjectChange:
    return ObjectChange(bucket=bucket, key=key, kind=kind, size=5, etag="e", time=1.0)


def test_a_put_is_one_created_change_with_size_etag_and_type() -> None:
    [c] = from_filer(*recorded("put"), source="t/1/2")
    assert (c.bucket, c.key, c.kind, c.size) == ("probe", "a/b.txt", "created", 5)
    assert c.etag == "5d41402abc4b2a76b9719d911017c592"  # md5("hello")
    assert c.content_type.startswith("text/plain")
    assert c.event_name == "cos:ObjectCreated:Put"
    assert c.time > 1.7e9 and c.source == "t/1/2"


def test_a_delete_is_one_removed_change() -> None:
    [c] = from_filer(*recorded("delete"))
    assert (c.bucket, c.key, c.kind, c.size) == ("probe", "a/b.txt", "removed", 5)
    assert c.event_name == "cos:ObjectRemoved:Delete"


def test_a_multipart_upload_gives_its_final_object_only() -> None:
    assert from_filer(*recorded("multipart_part")) == []
    [c] = from_filer(*recorded("multipart_complete"))
    assert (c.key, c.kind, c.size) == ("big.bin", "created", 12 * 1024 * 1024)
    assert c.etag.endswith("-3")  # S3's multipart ETag: md5 of the parts' md5s, "-parts"


def test_directories_are_dropped() -> None:
    assert from_filer(*recorded("directory")) == []


@pytest.mark.parametrize(
    "path",
    [
        "/buckets",
        "/buckets/probe",
        "/buckets/.system/owners/imagefn",
        "/buckets/probe/.uploads/abc/0001.part",
        "/etc/passwd",
        "/bucketsX/a/b",
        "/topics/x/y",
    ],
)
def test_internal_and_outside_paths_are_not_objects(path: str) -> None:
    assert split_path(path) is None


def test_object_paths_split_into_bucket_and_key() -> None:
    assert split_path("/buckets/b1/dir/x y.jpg") == ("b1", "dir/x y.jpg")


def _entry(name: str, size: int, mtime: int, etag: str) -> Any:
    e = filer_events.Entry(name=name)
    e.attributes.file_size = size
    e.attributes.mtime = mtime
    e.extended["Seaweed-X-Amz-ETag"] = etag.encode()
    return e


def test_an_overwrite_is_created_and_a_metadata_update_is_nothing() -> None:
    ev = filer_events.EventNotification(new_parent_path="/buckets/b1/d")
    ev.old_entry.CopyFrom(_entry("k", 1, 100, "aa"))
    ev.new_entry.CopyFrom(_entry("k", 2, 101, "bb"))
    [c] = from_filer("/buckets/b1/d/k", ev)
    assert (c.key, c.kind, c.size, c.etag) == ("d/k", "created", 2, "bb")
    ev.new_entry.CopyFrom(_entry("k", 1, 100, "aa"))
    assert from_filer("/buckets/b1/d/k", ev) == []


def test_a_rename_is_removed_then_created() -> None:
    ev = filer_events.EventNotification(new_parent_path="/buckets/b1/new")
    ev.old_entry.CopyFrom(_entry("k", 1, 100, "aa"))
    ev.new_entry.CopyFrom(_entry("k2", 1, 100, "aa"))
    got = [(c.key, c.kind) for c in from_filer("/buckets/b1/old/k", ev)]
    assert got == [("old/k", "removed"), ("new/k2", "created")]


def test_changes_replicated_from_another_cluster_are_dropped() -> None:
    ev = filer_events.EventNotification(new_parent_path="/buckets/b1", is_from_other_cluster=True)
    ev.new_entry.CopyFrom(_entry("k", 1, 100, "aa"))
    assert from_filer("/buckets/b1/k", ev) == []


def test_undecodable_bytes_raise_decode_error() -> None:
    from google.protobuf.message import DecodeError

    with pytest.raises(DecodeError):
        filer_events.decode(b"\x12\xff\xff\xff")


def test_filters_bucket_events_prefix_and_suffix() -> None:
    t = cos_trigger(prefix="img/", suffix=".jpg")
    assert matches(t, change("img/a.jpg"))
    assert not matches(t, change("img/a.png"))
    assert not matches(t, change("doc/a.jpg"))
    assert not matches(t, change("img/a.jpg", bucket="other"))
    assert not matches(t, change("img/a.jpg", kind="removed"))
    assert matches(cos_trigger(events=["removed"]), change(kind="removed"))
    disabled = Trigger(function="f", name="n", type="cos", enabled=False, config=t.config)
    assert not matches(disabled, change("img/a.jpg"))


def test_request_ids_are_stable_per_trigger_and_event() -> None:
    t, other = cos_trigger(), Trigger(function="f2", name="n", type="cos")
    a = cos_events.request_id(t, "kafka:t/0/5:abc:0")
    assert a == cos_events.request_id(t, "kafka:t/0/5:abc:0")
    assert a != cos_events.request_id(t, "kafka:t/0/6:abc:0")
    assert a != cos_events.request_id(other, "kafka:t/0/5:abc:0")
    assert a.startswith("cos-") and len(a) <= 64


def test_the_cos_event_has_the_contract_shape() -> None:
    c = ObjectChange(
        bucket="probe",
        key="dir/a b.txt",
        kind="created",
        size=5,
        etag="e1",
        time=1700000000.7,
        content_type="text/plain",
        source="topic/0/1",
    )
    doc = json.loads(cos_events.cos_event(c, "cos-0123456789abcdef", "http://127.0.0.1:8333"))
    [rec] = doc["Records"]
    obj = rec["cos"]["cosObject"]
    assert obj["key"] == "/imagefn/probe/dir/a b.txt"
    assert obj["size"] == 5
    assert obj["url"] == "http://127.0.0.1:8333/probe/dir/a%20b.txt"
    assert obj["meta"] == {
        "x-cos-request-id": "cos-0123456789abcdef",
        "Content-Type": "text/plain",
        "ETag": "e1",
    }
    assert rec["cos"]["cosBucket"]["name"] == "probe"
    assert rec["cos"]["cosSchemaVersion"] == "1.0"
    ev = rec["event"]
    assert ev["eventName"] == "cos:ObjectCreated:Put"
    assert ev["eventTime"] == 1700000000
    assert ev["eventSource"] == "qcs::cos"
    assert ev["eventQueue"] == "topic/0/1"
    assert isinstance(ev["reqid"], int)


MINIO = {
    "EventName": "s3:ObjectCreated:Put",
    "Key": "photos/a+b%2Bc.jpg",
    "Records": [
        {
            "eventVersion": "2.0",
            "eventSource": "minio:s3",
            "eventTime": "2026-12-03T17:00:00.000Z",
            "eventName": "s3:ObjectCreated:Put",
            "s3": {
                "bucket": {"name": "photos"},
                "object": {
                    "key": "a+b%2Bc.jpg",
                    "size": 42,
                    "eTag": "d41d8cd98f00b204e9800998ecf8427e",
                    "contentType": "image/jpeg",
                    "sequencer": "17A",
                },
            },
        },
        {
            "eventName": "s3:ObjectRemoved:Delete",
            "s3": {"bucket": {"name": "photos"}, "object": {"key": "old.jpg"}},
        },
        {
            "eventName": "s3:ObjectAccessed:Get",
            "s3": {"bucket": {"name": "photos"}, "object": {"key": "x"}},
        },
        "not a record",
    ],
}


def test_s3_notifications_map_object_events_and_decode_keys() -> None:
    created, removed = from_s3_records(MINIO)
    assert (created.bucket, created.key, created.kind) == ("photos", "a b+c.jpg", "created")
    assert (created.size, created.etag, created.content_type) == (
        42,
        "d41d8cd98f00b204e9800998ecf8427e",
        "image/jpeg",
    )
    assert created.time == 1796317200.0  # 2026-12-03T17:00:00Z
    assert (removed.key, removed.kind, removed.size) == ("old.jpg", "removed", 0)
    # The same record sent again identifies the same event; another record another.
    again = from_s3_records(MINIO)
    assert again[0].origin == created.origin != removed.origin


@pytest.mark.parametrize("doc", [None, [], {"records": []}, {"Records": {}}])
def test_a_body_that_is_no_notification_is_refused(doc: Any) -> None:
    with pytest.raises(ValueError):
        from_s3_records(doc)


def test_object_store_settings_load_and_hide_the_secret() -> None:
    from shared.settings import load_settings

    s = load_settings(
        {
            "IMAGEFN_S3_ENDPOINT": "http://127.0.0.1:8333/",
            "IMAGEFN_S3_ACCESS_KEY": "ak",
            "IMAGEFN_S3_SECRET_KEY": "very-secret",
            "IMAGEFN_OBJECTSTORE_EVENTS_TOPIC": "feed",
        }
    ).objectstore
    assert (s.endpoint, s.access_key, s.secret_key, s.events_topic) == (
        "http://127.0.0.1:8333",
        "ak",
        "very-secret",
        "feed",
    )
    assert "very-secret" not in repr(s)
    assert load_settings({}).objectstore.endpoint == ""  # no store: no bucket check


async def test_no_configured_store_skips_the_bucket_check() -> None:
    from shared.objectstore import check_bucket
    from shared.settings_objectstore import ObjectStoreSettings

    await check_bucket(ObjectStoreSettings(), "any-bucket")


def test_the_cli_sends_cos_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    from cli import triggers as cli_triggers
    from cli.main import build_parser
    from shared.settings import Settings

    sent: list[dict[str, Any]] = []

    def fake_put(args: Any, function: str, doc: dict[str, Any]) -> dict[str, Any]:
        sent.append(doc)
        return {
            "name": doc["name"],
            "function": function,
            "type": doc["type"],
            "qualifier": "$LATEST",
        }

    monkeypatch.setattr(cli_triggers, "put_trigger", fake_put)
    args = build_parser().parse_args(
        "trigger add thumbs uploads --type cos --bucket photos --events created,removed "
        "--prefix img/ --suffix .jpg".split()
    )
    args.fn(args, Settings())
    assert sent == [
        {
            "name": "uploads",
            "type": "cos",
            "bucket": "photos",
            "events": ["created", "removed"],
            "prefix": "img/",
            "suffix": ".jpg",
        }
    ]
