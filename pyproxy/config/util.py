"""Small helpers for reading protos."""

from __future__ import annotations

import os

from .errors import ConfigError


def has(msg, field: str) -> bool:
    try:
        return msg.HasField(field)
    except ValueError:
        return False


def duration_s(msg, field: str, default: float | None) -> float | None:
    """A ``google.protobuf.Duration`` field in seconds, or ``default`` when unset."""
    try:
        if not msg.HasField(field):
            return default
    except ValueError:
        return default
    d = getattr(msg, field)
    return d.seconds + d.nanos / 1e9


def u32(msg, field: str, default: int | None) -> int | None:
    """A ``google.protobuf.UInt32Value``-style wrapper field, or ``default`` when unset."""
    try:
        if not msg.HasField(field):
            return default
    except ValueError:
        return default
    return getattr(msg, field).value


def socket_address_str(addr) -> str:
    """``envoy.config.core.v3.Address`` as ``ip:port`` (IPv6 in brackets) or the pipe path."""
    if addr.HasField("pipe"):
        return addr.pipe.path
    sa = addr.socket_address
    if ":" in sa.address:
        return "[%s]:%d" % (sa.address, sa.port_value)
    return "%s:%d" % (sa.address, sa.port_value)


def request_header_name(name: str) -> str:
    """A request header's name as pyproxy's request header maps hold it: lower case, with the legacy
    ``host`` resolved to ``:authority``, where both codecs keep HTTP/1.1's Host and HTTP/2's
    :authority (Envoy's request header map resolves ``host`` the same way, so route and RBAC header
    matches, hash policies and ``%REQ(host)%`` see the authority)."""
    n = name.lower()
    return ":authority" if n == "host" else n


def data_source_bytes(ds, field: str, max_size: int | None = None) -> bytes | None:
    """The bytes of a ``config.core.v3.DataSource`` (inline, a file read once now, or an
    environment variable); None when it is unset. ``max_size``: a file is read no further than one
    byte past it (the caller rejects what is longer)."""
    which = ds.WhichOneof("specifier")
    if which == "inline_string":
        return ds.inline_string.encode()
    if which == "inline_bytes":
        return ds.inline_bytes
    if which == "filename":
        try:
            with open(ds.filename, "rb") as f:
                return f.read() if max_size is None else f.read(max_size + 1)
        except OSError as e:
            raise ConfigError("cannot read '%s': %s" % (ds.filename, e.strerror), field) from None
    if which == "environment_variable":
        v = os.environ.get(ds.environment_variable)
        if v is None:
            raise ConfigError("environment variable '%s' is not set" % ds.environment_variable, field)
        return v.encode()
    return None
