"""Small helpers for reading protos."""

from __future__ import annotations


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
