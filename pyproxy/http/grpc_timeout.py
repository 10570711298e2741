"""The ``grpc-timeout`` request header as Envoy reads and writes it (gRPC over HTTP/2 spec:
``TimeoutValue TimeoutUnit``, at most 8 digits, units H M S m u n), in whole milliseconds.

Two places use it: the route's legacy ``max_grpc_timeout``/``grpc_timeout_offset`` (the router's
timeout, filters/http/router.py) and the route's ``max_stream_duration.grpc_timeout_header_max``/
``grpc_timeout_header_offset`` (the stream's duration timer, stream_parts.py ``route_duration``)."""

from __future__ import annotations

MAX_VALUE = 99999999  # (8 digits)
_MS = {"H": 3600000, "M": 60000, "S": 1000, "m": 1}
_CEIL = {"u": 1000, "n": 1000000}  # (sub-millisecond units round up, as Envoy's)
_DIGITS = frozenset("0123456789")


def grpc_timeout_ms(v) -> int | None:
    """The header value in milliseconds, or None when absent or malformed (then ignored)."""
    if not v or len(v) < 2:
        return None
    num = v[:-1]
    if num[0] == "+":
        num = num[1:]
    if not num or not _DIGITS.issuperset(num):
        return None
    n = int(num)
    if n > MAX_VALUE:
        return None
    unit = v[-1]
    m = _MS.get(unit)
    if m is not None:
        return n * m
    d = _CEIL.get(unit)
    if d is None:
        return None
    return -(-n // d)


def to_grpc_timeout(ms: int) -> str:
    """``ms`` as a header value: milliseconds, or a larger unit once the value needs more than 8
    digits (clipped at 99999999 hours), as Envoy writes it."""
    t = ms
    unit = "m"
    if t > MAX_VALUE:
        t //= 1000
        unit = "S"
    while t > MAX_VALUE:
        if unit == "H":
            t = MAX_VALUE
        else:
            t //= 60
            unit = "M" if unit == "S" else "H"
    return "%d%s" % (t, unit)
