"""Protos to JSON for /config_dump, whatever ``Any`` types they carry.

``json_format`` can only print an ``Any`` whose type is imported. Known types are imported on
demand; an ``Any`` of a type no installed module defines (Istio's own filters arrive so over xDS)
is printed as its type URL plus the base64 payload instead of failing the whole dump.
"""

from __future__ import annotations

import base64

from google.protobuf import any_pb2, json_format
from google.protobuf.descriptor import FieldDescriptor
from udpa.annotations import sensitive_pb2

from .registry import message_class

REDACTED = "[redacted]"


def to_dict(msg) -> dict:
    """``MessageToDict(msg, preserving_proto_field_name=True)`` that never fails on an Any.

    Fields annotated ``udpa.annotations.sensitive`` (private keys, passwords, HMAC secrets...) are
    redacted as Envoy's ``MessageUtil::redact`` does: every string or bytes value under such a field
    becomes ``[redacted]`` and any other scalar under it is cleared, including inside an ``Any``.
    """
    msg = redacted(msg)
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


def redacted(msg):
    """``msg`` itself when it holds no sensitive value, else a redacted copy."""
    if not _may_hold_sensitive(msg.DESCRIPTOR):
        return msg
    m = type(msg)()
    m.CopyFrom(msg)
    return m if _redact(m, False) else msg


_SENSITIVE: dict = {}
_MAY: dict = {}


def _is_sensitive(fd) -> bool:
    s = _SENSITIVE.get(fd)
    if s is None:
        s = _SENSITIVE[fd] = bool(fd.GetOptions().Extensions[sensitive_pb2.sensitive])
    return s


def _may_hold_sensitive(desc) -> bool:
    """Whether a message of this type can carry a sensitive field (an ``Any`` can carry anything)."""
    may = _MAY.get(desc)
    if may is None:
        _MAY[desc] = False  # a recursive type does not make itself sensitive
        may = desc.full_name in ("google.protobuf.Any", "xds.type.v3.TypedStruct", "udpa.type.v1.TypedStruct")
        for fd in desc.fields:
            if may:
                break
            may = _is_sensitive(fd) or (fd.message_type is not None and _may_hold_sensitive(fd.message_type))
        _MAY[desc] = may
    return may


def _redact_scalars(msg, fd, value) -> None:
    if fd.type == FieldDescriptor.TYPE_STRING or fd.type == FieldDescriptor.TYPE_BYTES:
        r = REDACTED if fd.type == FieldDescriptor.TYPE_STRING else REDACTED.encode()
        if fd.is_repeated:
            value[:] = [r] * len(value)
        else:
            setattr(msg, fd.name, r)
    else:
        msg.ClearField(fd.name)


def _redact(msg, sensitive: bool) -> bool:
    """Redact ``msg`` in place; whether anything changed."""
    if isinstance(msg, any_pb2.Any):
        cls = message_class(msg.type_url.rpartition("/")[2])
        inner = cls() if cls is not None else None
        if inner is None or not msg.Unpack(inner) or not _redact(inner, sensitive):
            return False
        msg.Pack(inner)
        return True
    if not sensitive and not _may_hold_sensitive(msg.DESCRIPTOR):
        return False
    changed = False
    for fd, value in msg.ListFields():
        s = sensitive or _is_sensitive(fd)
        if fd.message_type is None:
            if s:
                _redact_scalars(msg, fd, value)
                changed = True
            continue
        if fd.message_type.GetOptions().map_entry:
            vfd = fd.message_type.fields_by_name["value"]
            if vfd.message_type is not None:
                for v in value.values():
                    changed = _redact(v, s) or changed
            elif s:
                r = REDACTED if vfd.type == FieldDescriptor.TYPE_STRING else REDACTED.encode()
                for k in list(value):
                    if vfd.type in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES):
                        value[k] = r
                    else:
                        del value[k]
                changed = True
        elif fd.is_repeated:
            for v in value:
                changed = _redact(v, s) or changed
        else:
            changed = _redact(value, s) or changed
    return changed
