"""Object-storage events, whatever their source, as one value (``ObjectChange``): from
SeaweedFS's filer feed (``from_filer``) or from standard S3 ``Records[]`` notifications
(MinIO, Ceph RGW: ``from_s3_records``). Then which cos triggers an event matches
(``matches``), the event a function receives (``cos_event``: the SCF COS event shape) and
the request id that makes a redelivered event run once (``request_id``).

Pure functions: no I/O, tested without a store (tests/unit/test_cos_events.py).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import urllib.parse
from dataclasses import dataclass
from typing import Any

from shared.triggers import Trigger

# SeaweedFS keeps every S3 bucket as a directory under this one.
BUCKETS_DIR = "/buckets/"
# Entries under these names are the store's own: bucket metadata, multipart parts.
INTERNAL_PARTS = frozenset({".system", ".uploads"})
EVENT_NAMES = {"created": "cos:ObjectCreated:Put", "removed": "cos:ObjectRemoved:Delete"}
# What the COS event shape calls the account and the region; a self-hosted store has
# neither, so fixed names stand in (documented in the user guide).
APPID = "imagefn"
REGION = "imagefn"


@dataclass(frozen=True)
class ObjectChange:
    bucket: str
    key: str
    kind: str  # "created" or "removed"
    size: int
    etag: str
    time: float
    content_type: str = ""
    # Where the event came from ("topic/partition/offset", "webhook"); reported in the
    # event's eventQueue.
    source: str = ""
    # What identifies the event among all others (webhook: a digest of its record), for
    # ``request_id``; '' when the caller knows better (the Kafka record's place).
    origin: str = ""

    @property
    def event_name(self) -> str:
        return EVENT_NAMES[self.kind]


def split_path(path: str) -> tuple[str, str] | None:
    """(bucket, key) of a filer path ``/buckets/<bucket>/<key>``; None for anything else:
    a bucket itself, the store's internal entries, paths outside ``/buckets/``."""
    if not path.startswith(BUCKETS_DIR):
        return None
    bucket, _, key = path[len(BUCKETS_DIR) :].partition("/")
    if not bucket or not key or bucket in INTERNAL_PARTS:
        return None
    if any(part in INTERNAL_PARTS for part in key.split("/")):
        return None
    return bucket, key


def _etag(entry: Any) -> str:
    raw = dict(entry.extended).get("Seaweed-X-Amz-ETag")
    if raw:
        return bytes(raw).decode(errors="replace").strip('"')
    md5 = bytes(entry.attributes.md5)
    return md5.hex() if md5 else ""


def _change(path: str, entry: Any, kind: str, source: str) -> ObjectChange | None:
    if entry.is_directory:
        return None
    where = split_path(path)
    if where is None:
        return None
    attrs = entry.attributes
    size = int(attrs.file_size) or sum(int(c.size) for c in entry.chunks) or len(entry.content)
    return ObjectChange(
        bucket=where[0],
        key=where[1],
        kind=kind,
        size=size,
        etag=_etag(entry),
        time=float(attrs.mtime),
        content_type=str(attrs.mime),
        source=source,
    )


def _same_object(old: Any, new: Any) -> bool:
    """True when an update changed only metadata (tags, ACLs): same content and time."""
    return bool(
        _etag(old) == _etag(new)
        and old.attributes.file_size == new.attributes.file_size
        and old.attributes.mtime == new.attributes.mtime
    )


def from_filer(path: str, event: Any, source: str = "") -> list[ObjectChange]:
    """The object changes in one filer ``EventNotification`` (decoded by
    ``shared/filer_events.py``) of the entry at ``path`` (the Kafka record's key).

    A create gives "created"; a delete "removed"; an overwrite "created"; a rename
    "removed" at the old path and "created" at the new; a metadata-only update nothing.
    A multipart upload's parts live under ``.uploads/`` and are dropped: only the final
    object, created when the upload completes, gives an event."""
    has_old, has_new = event.HasField("old_entry"), event.HasField("new_entry")
    if event.is_from_other_cluster:
        return []  # replicated from a peer cluster: its own feed reported it
    old_path = path
    new_path = path
    if has_new and event.new_parent_path:
        new_path = event.new_parent_path.rstrip("/") + "/" + event.new_entry.name
    if has_new and has_old and old_path != new_path:
        old_path = path.rsplit("/", 1)[0] + "/" + event.old_entry.name
    out: list[ObjectChange] = []
    if has_old and (not has_new or old_path != new_path):
        c = _change(old_path, event.old_entry, "removed", source)
        if c is not None:
            out.append(c)
    if has_new:
        if has_old and old_path == new_path and _same_object(event.old_entry, event.new_entry):
            return out
        c = _change(new_path, event.new_entry, "created", source)
        if c is not None:
            out.append(c)
    return out


def _s3_time(raw: Any) -> float:
    if isinstance(raw, str) and raw:
        try:
            return datetime.datetime.fromisoformat(raw.replace("Z", "+00:00")).timestamp()
        except ValueError:
            pass
    return 0.0


def from_s3_records(doc: Any) -> list[ObjectChange]:
    """The changes in an S3-format notification (``{"Records": [...]}``, as MinIO and Ceph
    RGW send): ObjectCreated:* → created, ObjectRemoved:* → removed; other events (and
    records that are not object events) are left out. ValueError when ``doc`` is not a
    notification at all."""
    if not isinstance(doc, dict) or not isinstance(doc.get("Records"), list):
        raise ValueError('an S3 notification: {"Records": [...]}')
    out: list[ObjectChange] = []
    for rec in doc["Records"]:
        if not isinstance(rec, dict):
            continue
        name = str(rec.get("eventName", ""))
        action = name.removeprefix("s3:").split(":", 1)[0]
        kind = {"ObjectCreated": "created", "ObjectRemoved": "removed"}.get(action)
        s3 = rec.get("s3")
        if kind is None or not isinstance(s3, dict):
            continue
        bucket = (s3.get("bucket") or {}).get("name")
        obj = s3.get("object") or {}
        key = obj.get("key")
        if not isinstance(bucket, str) or not isinstance(key, str) or not key:
            continue
        size = obj.get("size", 0)
        out.append(
            ObjectChange(
                bucket=bucket,
                # S3 notifications URL-encode the key (a space as '+').
                key=urllib.parse.unquote_plus(key),
                kind=kind,
                size=size if isinstance(size, int) and not isinstance(size, bool) else 0,
                etag=str(obj.get("eTag", "")).strip('"'),
                time=_s3_time(rec.get("eventTime")),
                content_type=str(obj.get("contentType", "")),
                source="webhook",
                origin=hashlib.sha256(
                    json.dumps(rec, sort_keys=True, separators=(",", ":")).encode()
                ).hexdigest(),
            )
        )
    return out


def matches(trigger: Trigger, change: ObjectChange) -> bool:
    """Whether an enabled cos trigger's bucket, events, prefix and suffix take ``change``."""
    cfg = trigger.config
    return (
        trigger.type == "cos"
        and trigger.enabled
        and cfg.get("bucket") == change.bucket
        and change.kind in cfg.get("events", ())
        and change.key.startswith(cfg.get("prefix", ""))
        and change.key.endswith(cfg.get("suffix", ""))
    )


def request_id(trigger: Trigger, origin: str) -> str:
    """The request id of the invocation ``trigger`` makes of one event; ``origin``
    identifies the event (the record it came in and its place in it), so that the same
    event delivered again maps to the same id and is accepted once."""
    digest = hashlib.sha256(f"{trigger.id}\0{origin}".encode()).hexdigest()[:32]
    return f"cos-{digest}"


def cos_event(change: ObjectChange, request_id: str, endpoint: str = "") -> bytes:
    """The SCF COS event (``{"Records": [{"cos": ..., "event": ...}]}``) for ``change``."""
    url = ""
    if endpoint:
        quoted = urllib.parse.quote(change.key)
        url = f"{endpoint.rstrip('/')}/{change.bucket}/{quoted}"
    meta = {"x-cos-request-id": request_id, "Content-Type": change.content_type}
    if change.etag:
        meta["ETag"] = change.etag
    record = {
        "cos": {
            "cosSchemaVersion": "1.0",
            "cosObject": {
                "url": url,
                "meta": meta,
                "vid": "",
                "key": f"/{APPID}/{change.bucket}/{change.key}",
                "size": change.size,
            },
            "cosBucket": {"region": REGION, "name": change.bucket, "appid": APPID},
            "cosNotificationId": "unkown",  # sic: SCF's spelling
        },
        "event": {
            "eventName": change.event_name,
            "eventVersion": "1.0",
            "eventTime": int(change.time),
            "eventSource": "qcs::cos",
            "requestParameters": {"requestSourceIP": "", "requestHeaders": {}},
            "eventQueue": change.source,
            "reservedInfo": "",
            "reqid": int(request_id.removeprefix("cos-")[:12], 16)
            if request_id.startswith("cos-")
            else 0,
        },
    }
    return json.dumps({"Records": [record]}, separators=(",", ":")).encode()
