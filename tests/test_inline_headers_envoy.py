"""Repeated request headers, side by side with Envoy 1.40 (review finding F18a): the headers Envoy
keeps inline (http/headers.py: INLINE_REQUEST) reach the upstream as one comma-joined line, in arrival order,
whichever codec the client speaks; the others (cookie, any custom header) keep one line each.
Real sockets: an HTTP/1.1 and an h2c client, one recording backend shared by pyproxy and Envoy."""

from __future__ import annotations

import pytest

from diff_util import H2, h2_script, request_headers
from proxy_util import ENVOY, Envoy, HttpBackend, Pyproxy, one_route_bootstrap, raw, with_fresh_ports

# (name, first value, second value, joined as Envoy forwards it or None for "two lines")
CASES = [
    ("accept", "text/html", "*/*", "text/html,*/*"),
    ("user-agent", "a", "b", "a,b"),
    ("x-request-id", "r1", "r2", "r1,r2"),
    ("x-forwarded-proto", "https", "http", "https,http"),
    ("x-client-trace-id", "t1", "t2", "t1,t2"),
    ("x-envoy-attempt-count", "1", "5xx", "1,5xx"),
    ("x-envoy-downstream-service-cluster", "c1", "c2", "c1,c2"),
    ("via", "1.1 a", "1.1 b", "1.1 a,1.1 b"),
    ("authorization", "Bearer x", "Bearer y", "Bearer x,Bearer y"),
    ("cache-control", "no-cache", "max-age=1", "no-cache,max-age=1"),
    ("x-forwarded-host", "h1", "h2", "h1,h2"),
    ("grpc-timeout", "1S", "2S", "1S,2S"),
    ("cookie", "a=1", "b=2", None),
    ("x-custom", "a", "b", None),
]
NAMES = {c[0] for c in CASES}


@pytest.fixture(scope="module")
def pair():
    be = HttpBackend()
    bs, _ = one_route_bootstrap([be.port])
    procs = []
    try:
        for cls in (Pyproxy, Envoy) if ENVOY else (Pyproxy,):
            procs.append(cls(with_fresh_ports(bs)))
        yield be, procs
    finally:
        for p in procs:
            p.stop()
        be.close()


def _seen(be, marker):
    for r in be.requests:
        if r.path == marker:
            return [(k, v) for k, v in r.headers if k in NAMES]
    return None


def _h1(be, port, marker):
    extra = "".join("%s: %s\r\nx-between: 1\r\n%s: %s\r\n" % (n, a, n, b) for n, a, b, _ in CASES)
    raw(port, ("GET %s HTTP/1.1\r\nhost: h\r\n%sconnection: close\r\n\r\n" % (marker, extra)).encode(), timeout=4)
    return _seen(be, marker)


def _h2(be, port, marker):
    extra = []
    for n, a, b, _ in CASES:
        extra += [(n, a), ("x-between", "1"), (n, b)]
    h2_script(port, [H2.headers(1, request_headers("GET", marker, extra=extra))], timeout=4)
    return _seen(be, marker)


def _expected():
    out = []
    for n, a, b, joined in CASES:
        out += [(n, joined)] if joined is not None else [(n, a), (n, b)]
    return out


@pytest.mark.parametrize("client", ["h1", "h2"])
def test_repeated_inline_request_headers_joined_as_envoy(pair, client):
    be, procs = pair
    send = _h1 if client == "h1" else _h2
    got = {}
    for p in procs:
        marker = "/%s/%s" % (client, p.kind)
        got[p.kind] = send(be, p.port, marker)
        assert got[p.kind] is not None, "%s forwarded no request" % p.kind
    want = _expected()
    if client == "h2":
        # (Envoy's HTTP/2 codec joins cookie crumbs with "; " for the upstream, as pyproxy does)
        want = [kv for kv in want if kv[0] != "cookie"]
        for k in got:
            got[k] = [kv for kv in got[k] if kv[0] != "cookie"]
    assert sorted(got["pyproxy"]) == sorted(want)
    if "envoy" in got:
        assert sorted(got["pyproxy"]) == sorted(got["envoy"])
