"""What every xDS handler shares: version hashes, initial fetch timeouts, config_dump JSON of a
resource and the NACK of a partly applied response."""

from __future__ import annotations

import hashlib
import time

from ..config import duration_s
from ..config.dump import to_dict
from ..config.registry import message_class
from ..xds_client import PartiallyApplied

EDS_TYPE = 3  # envoy.config.cluster.v3.Cluster.EDS
DEFAULT_INITIAL_FETCH_TIMEOUT = 15.0   # Envoy's default when a config source does not say


def version_hash(v: str) -> int:
    """The ``version`` gauge of an xDS subscription: a 63-bit hash of its version_info."""
    return int.from_bytes(hashlib.blake2b(v.encode(), digest_size=8).digest(), "little") >> 1


def fetch_timeout(config_source) -> float:
    """``initial_fetch_timeout`` of a ConfigSource in seconds (0 = wait forever)."""
    return duration_s(config_source, "initial_fetch_timeout", DEFAULT_INITIAL_FETCH_TIMEOUT) or 0.0


def now_ts() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + ".%03dZ" % (int(t * 1000) % 1000)


def ts(t) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + ".000Z" if t else ""


def ordered(d: dict, keys) -> dict:
    out = {k: d[k] for k in keys if k in d}
    out.update((k, v) for k, v in d.items() if k not in out)
    return out


def _load_wrapper_types():
    # json_format resolves an Any through the default descriptor pool: the wrappers Istio uses for
    # configs (TypedStruct) must be imported or every /config_dump holding one fails.
    for mod in ("xds.type.v3.typed_struct_pb2", "udpa.type.v1.typed_struct_pb2"):
        try:
            __import__(mod)
        except ImportError:  # pragma: no cover - part of xds-protos
            pass


_load_wrapper_types()


def _import_any_types(msg, depth=0) -> None:
    """Import the proto module of every Any inside ``msg`` that some module defines."""
    if depth > 32:
        return
    for fd, value in msg.ListFields():
        if fd.message_type is None:
            continue
        if fd.message_type.GetOptions().map_entry:
            vd = fd.message_type.fields_by_name["value"]
            items = list(value.values()) if vd.message_type is not None else []
        else:
            items = list(value) if _is_repeated(fd) else [value]
        for v in items:
            if v.DESCRIPTOR.full_name == "google.protobuf.Any":
                cls = message_class(v.type_url.rpartition("/")[2])
                if cls is not None:
                    inner = cls()
                    if v.Unpack(inner):
                        _import_any_types(inner, depth + 1)
            else:
                _import_any_types(v, depth + 1)


def _is_repeated(fd) -> bool:
    r = getattr(fd, "is_repeated", None)
    return r if r is not None else fd.label == fd.LABEL_REPEATED


def as_json(msg, type_name: str) -> dict:
    """A resource as config_dump JSON; never raises (an Any of an unknown type becomes a note)."""
    try:
        body = to_dict(msg)
    except (TypeError, KeyError, ValueError):
        try:
            _import_any_types(msg)
            body = to_dict(msg)
        except Exception as e:  # noqa: BLE001 - a dump must not fail the update
            body = {"name": getattr(msg, "name", ""), "_unprintable": str(e)}
    body["@type"] = "type.googleapis.com/" + type_name
    return body


def _why(err, name: str) -> str:
    """A resource's rejection without the leading ``<kind> '<name>'`` (the NACK names it already)."""
    text = str(err)
    tag = "'%s': " % name
    i = text.find(tag)
    if 0 <= i < 48 and ":" not in text[:i]:
        return text[i + len(tag):]
    return text


def partially_applied(header: str, failures: list, applied, sep: str = ", ",
                      end: str = "") -> PartiallyApplied:
    """The NACK of a response whose good resources were applied: ``<header> <name>: <why>``
    for every rejected resource, joined as Envoy joins them."""
    text = header + " " + sep.join("%s: %s" % (name, _why(err, name)) for name, err in failures) + end
    return PartiallyApplied(text, applied)
