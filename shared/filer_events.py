"""SeaweedFS's filer change feed, decoded: the protobuf ``filer_pb.EventNotification``
its filer publishes to Kafka (``notification.kafka`` in ``notification.toml``), one
record per change, keyed by the entry's full path.

The message classes are built at import from a descriptor written here — the few
messages and fields of SeaweedFS's ``weed/pb/filer.proto`` the platform reads — with the
``protobuf`` runtime (``descriptor_pb2`` + ``message_factory``): no generated code, no
``protoc``. Fields the filer sends that are not declared here are skipped by the parser,
so a newer SeaweedFS still decodes.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_F = descriptor_pb2.FieldDescriptorProto
# (name, number, type, label, message type name or "")
_MESSAGES: dict[str, list[tuple[str, int, int, int, str]]] = {
    "FuseAttributes": [
        ("file_size", 1, _F.TYPE_UINT64, _F.LABEL_OPTIONAL, ""),
        ("mtime", 2, _F.TYPE_INT64, _F.LABEL_OPTIONAL, ""),
        ("file_mode", 3, _F.TYPE_UINT32, _F.LABEL_OPTIONAL, ""),
        ("crtime", 6, _F.TYPE_INT64, _F.LABEL_OPTIONAL, ""),
        ("mime", 7, _F.TYPE_STRING, _F.LABEL_OPTIONAL, ""),
        ("md5", 14, _F.TYPE_BYTES, _F.LABEL_OPTIONAL, ""),
    ],
    "FileChunk": [
        ("file_id", 1, _F.TYPE_STRING, _F.LABEL_OPTIONAL, ""),
        ("offset", 2, _F.TYPE_INT64, _F.LABEL_OPTIONAL, ""),
        ("size", 3, _F.TYPE_UINT64, _F.LABEL_OPTIONAL, ""),
        ("mtime", 4, _F.TYPE_INT64, _F.LABEL_OPTIONAL, ""),
        ("e_tag", 5, _F.TYPE_STRING, _F.LABEL_OPTIONAL, ""),
    ],
    "Entry.ExtendedEntry": [
        ("key", 1, _F.TYPE_STRING, _F.LABEL_OPTIONAL, ""),
        ("value", 2, _F.TYPE_BYTES, _F.LABEL_OPTIONAL, ""),
    ],
    "Entry": [
        ("name", 1, _F.TYPE_STRING, _F.LABEL_OPTIONAL, ""),
        ("is_directory", 2, _F.TYPE_BOOL, _F.LABEL_OPTIONAL, ""),
        ("chunks", 3, _F.TYPE_MESSAGE, _F.LABEL_REPEATED, ".filer_pb.FileChunk"),
        ("attributes", 4, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, ".filer_pb.FuseAttributes"),
        ("extended", 5, _F.TYPE_MESSAGE, _F.LABEL_REPEATED, ".filer_pb.Entry.ExtendedEntry"),
        ("content", 9, _F.TYPE_BYTES, _F.LABEL_OPTIONAL, ""),
    ],
    "EventNotification": [
        ("old_entry", 1, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, ".filer_pb.Entry"),
        ("new_entry", 2, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, ".filer_pb.Entry"),
        ("delete_chunks", 3, _F.TYPE_BOOL, _F.LABEL_OPTIONAL, ""),
        ("new_parent_path", 4, _F.TYPE_STRING, _F.LABEL_OPTIONAL, ""),
        ("is_from_other_cluster", 5, _F.TYPE_BOOL, _F.LABEL_OPTIONAL, ""),
        ("signatures", 6, _F.TYPE_INT32, _F.LABEL_REPEATED, ""),
    ],
}


def _add_fields(msg: descriptor_pb2.DescriptorProto, name: str) -> None:
    for fname, number, ftype, label, type_name in _MESSAGES[name]:
        f = msg.field.add(name=fname, number=number, type=ftype, label=label)
        if type_name:
            f.type_name = type_name


def _file() -> descriptor_pb2.FileDescriptorProto:
    fd = descriptor_pb2.FileDescriptorProto(
        name="imagefn/filer_events.proto", package="filer_pb", syntax="proto3"
    )
    for name in ("FuseAttributes", "FileChunk", "Entry", "EventNotification"):
        msg = fd.message_type.add(name=name)
        _add_fields(msg, name)
        if name == "Entry":
            # map<string, bytes> extended = 5: a repeated nested entry with map_entry set.
            ext = msg.nested_type.add(name="ExtendedEntry")
            ext.options.map_entry = True
            _add_fields(ext, "Entry.ExtendedEntry")
    return fd


_POOL = descriptor_pool.DescriptorPool()
_POOL.Add(_file())
EventNotification: Any = message_factory.GetMessageClass(
    _POOL.FindMessageTypeByName("filer_pb.EventNotification")
)
Entry: Any = message_factory.GetMessageClass(_POOL.FindMessageTypeByName("filer_pb.Entry"))


def decode(raw: bytes) -> Any:
    """An ``EventNotification``; ``google.protobuf.message.DecodeError`` if ``raw`` is not
    one."""
    msg = EventNotification()
    msg.ParseFromString(raw)
    return msg
