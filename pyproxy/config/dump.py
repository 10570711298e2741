"""Protos to JSON for /config_dump, whatever ``Any`` types they carry.

``json_format`` can only print an ``Any`` whose type is imported. Known types are imported on
demand; an ``Any`` of a type no installed module defines (Istio's own filters arrive so over xDS)
is printed as its type URL plus the base64 payload instead of failing the whole dump.
"""

from __future__ import annotations

import base64

from google.protobuf import any_pb2, json_format

from .registry import message_class


def to_dict(msg) -> dict:
    """``MessageToDict(msg, preserving_proto_field_name=True)`` that never fails on an Any."""
    try:
        return json_format.MessageToDict(msg, preserving_proto_field_name=True)
    except (TypeError, KeyError):
        pass
    # import what can be imported, then retry
    unknown = []
    _visit_any(msg, lambda a: (message_class(a.type_url.rpartition("/")[2]) is None) and unknown.append(a))
    try:
        if not unknown:
            return json_format.MessageToDict(msg, preserving_proto_field_name=True)
    except (TypeError, KeyError):
        pass
    # unknown types remain: print a copy where each becomes a readable placeholder
    from google.protobuf import struct_pb2
    m = type(msg)()
    m.CopyFrom(msg)

    def replace(a: any_pb2.Any):
        if message_class(a.type_url.rpartition("/")[2]) is None:
            s = struct_pb2.Struct()
            s.update({"type_url": a.type_url, "value_base64": base64.b64encode(a.value).decode()})
            a.Pack(s)
    _visit_any(m, replace)
    return json_format.MessageToDict(m, preserving_proto_field_name=True)


def _visit_any(msg, fn) -> None:
    """Call ``fn`` on every ``google.protobuf.Any`` inside ``msg`` (recursively, incl. repeated/maps)."""
    if isinstance(msg, any_pb2.Any):
        fn(msg)
        cls = message_class(msg.type_url.rpartition("/")[2])
        if cls is not None:
            inner = cls()
            if msg.Unpack(inner):
                before = inner.SerializeToString()
                _visit_any(inner, fn)
                if inner.SerializeToString() != before:
                    msg.Pack(inner)
        return
    for fd, value in msg.ListFields():
        if fd.message_type is None:
            continue
        if fd.is_repeated:
            if fd.message_type.GetOptions().map_entry:
                vfd = fd.message_type.fields_by_name["value"]
                if vfd.message_type is not None:
                    for v in value.values():
                        _visit_any(v, fn)
            else:
                for v in value:
                    _visit_any(v, fn)
        else:
            _visit_any(value, fn)
