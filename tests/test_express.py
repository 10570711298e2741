"""The compiled HTTP/1.1 path against the plain filter-by-filter reference mode.

Two pyproxy processes run the same bootstrap: the default (the chain plan and the route plans:
a bodiless request's first attempt run by the stream, the StreamInfo made lazily, the upstream
response head relayed as bytes, route response header mutations compiled to bytes) and
``PYPROXY_REFERENCE=1`` (every request through the configured filter chain and the router filter).
Every case sends the same raw request to each and compares, byte for byte after masking the values
that differ by nature (request ids, dates, service times):

- what the client receives (status line, header names, order and values, framing, body);
- what the upstream receives (request line and head);
- the stats the exchange leaves behind.

The upstream is a raw HTTP/1.1 server answering per path: with and without ``server``, with two,
chunked, ``content-length: 0``, 204, 304, a HEAD, mixed-case names, ``connection: close``.
"""

from __future__ import annotations

import os
import re
import time

import pytest

from proxy_util import (HttpBackend, Pyproxy, bootstrap, cluster, free_port, http_listener, one_response,
                        route_config, simple_response)

LANES = {"compiled": {}, "reference": {"PYPROXY_REFERENCE": "1"}}

RESPONSES = {
    "/plain": simple_response(200, b"hello", [("Server", "up"), ("Content-Type", "text/plain")]),
    "/noserver": simple_response(200, b"x" * 300, [("X-Mixed-Case", "Value")]),
    "/twoservers": simple_response(200, b"2", [("server", "a"), ("X-A", "1"), ("Server", "b")]),
    "/chunked": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-B: 2\r\n\r\n"
                 b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"),
    "/empty": simple_response(200, b"", [("X-C", "3")]),
    "/nocontent": b"HTTP/1.1 204 No Content\r\nX-D: 4\r\n\r\n",
    "/notmodified": b"HTTP/1.1 304 Not Modified\r\nETag: \"e\"\r\n\r\n",
    "/close": simple_response(200, b"bye", [("Connection", "close")]),
    "/keepalive": simple_response(200, b"ka", [("Connection", "keep-alive"), ("Keep-Alive", "timeout=5")]),
    "/status": simple_response(503, b"busy", [("Retry-After", "1")], reason="Service Unavailable"),
    "/rewrite/x": simple_response(200, b"rw"),
    "/weighted": simple_response(201, b"w"),
    "/resp": simple_response(200, b"mut", [("X-Drop", "1"), ("X-Over", "up"), ("X-Keep", "k"),
                                          ("X-Over", "up2")]),
    "/trailers": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"3\r\nabc\r\n0\r\nX-Trailer: t\r\n\r\n"),
}


def _handler(req, sock):
    path = req.path.split("?")[0]
    if path == "/cut":
        # the upstream dies in the middle of the body: the client sees the head, then a reset
        sock.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789")
        time.sleep(0.05)
        return "close"
    out = RESPONSES.get(path) or RESPONSES.get("/" + path.split("/")[1] + "/x") or simple_response(200, b"default")
    if req.method == "HEAD":
        head, _, _ = out.partition(b"\r\n\r\n")
        return head + b"\r\n\r\n"
    return out


REQUESTS = [
    ("GET", "/plain", []),
    ("GET", "/noserver", [("User-Agent", "t"), ("Accept", "*/*")]),
    ("GET", "/twoservers", []),
    ("GET", "/chunked", []),
    ("GET", "/empty", []),
    ("GET", "/nocontent", []),
    ("GET", "/notmodified", [("If-None-Match", "\"e\"")]),
    ("HEAD", "/plain", []),
    ("GET", "/keepalive", [("Connection", "keep-alive"), ("TE", "trailers")]),
    ("GET", "/status", [("X-Request-Id", "client-chosen-id"), ("X-Forwarded-Proto", "https")]),
    ("GET", "/plain", [("x-envoy-expected-rq-timeout-ms", "1")]),
    ("DELETE", "/plain", []),
    ("OPTIONS", "/plain", []),
    ("POST", "/plain", [("Content-Length", "0")]),
    ("GET", "/rewrite/x?q=1", []),
    ("GET", "/weighted", []),
    ("GET", "/fmt", []),
    ("GET", "/trailers", []),
    ("GET", "/resp", []),
    ("GET", "/resp/fmt", []),
    ("GET", "/cut", []),
    ("GET", "/plain", [("Connection", "close")]),
    ("GET", "/close", []),
]

_MASK = [
    (re.compile(rb"(?im)^(x-request-id: )[0-9a-f-]{36}\r$"), rb"\1<uuid>\r"),
    (re.compile(rb"(?im)^(date: ).*\r$"), rb"\1<date>\r"),
    (re.compile(rb"(?im)^(x-envoy-upstream-service-time: )\d+\r$"), rb"\1<n>\r"),
]


def _mask(b: bytes) -> bytes:
    for rx, sub in _MASK:
        b = rx.sub(sub, b)
    return b


@pytest.fixture(scope="module")
def lanes():
    be = HttpBackend(_handler)
    port = free_port()
    routes = [
        {"match": {"prefix": "/rewrite/"}, "route": {"cluster": "b", "prefix_rewrite": "/rewrite/"},
         "request_headers_to_add": [{"header": {"key": "x-route", "value": "rw"}}]},
        {"match": {"prefix": "/weighted"}, "route": {"weighted_clusters": {"clusters": [
            {"name": "b", "weight": 1, "request_headers_to_add": [{"header": {"key": "x-w", "value": "1"}}]},
            {"name": "b2", "weight": 1, "request_headers_to_add": [{"header": {"key": "x-w", "value": "2"}}]}]}}},
        # a formatted value needs the StreamInfo: this route's requests take the Headers path
        {"match": {"prefix": "/fmt"}, "route": {"cluster": "b"},
         "request_headers_to_add": [{"header": {"key": "x-peer", "value": "%PROTOCOL%"}}]},
        # response header mutations: literal ones are compiled to bytes for the head relay
        # (append, overwrite-or-add moving the header to the end, remove); a formatted value
        # keeps the route's responses on the Headers path
        {"match": {"prefix": "/resp/fmt"}, "route": {"cluster": "b"},
         "response_headers_to_add": [{"header": {"key": "x-proto", "value": "%PROTOCOL%"}},
                                     {"header": {"key": "x-added", "value": "a"}}],
         "response_headers_to_remove": ["x-drop"]},
        {"match": {"prefix": "/resp"}, "route": {"cluster": "b"},
         "response_headers_to_add": [
             {"header": {"key": "x-added", "value": "a"}},
             {"header": {"key": "x-over", "value": "route"}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"},
             {"header": {"key": "x-keep", "value": "k2"}},
             {"header": {"key": "x-empty", "value": ""}},
             {"header": {"key": "x-kept-empty", "value": ""}, "keep_empty_value": True}],
         "response_headers_to_remove": ["x-drop"]},
        {"match": {"prefix": "/"}, "route": {"cluster": "b", "timeout": "7s"},
         "request_headers_to_add": [{"header": {"key": "x-bench-route", "value": "r"},
                                     "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}]},
    ]
    procs = {}
    try:
        for name, env in LANES.items():
            p = free_port()
            bs = bootstrap([http_listener(p, route_config(routes))],
                           [cluster("b", [be.port]), cluster("b2", [be.port])])
            procs[name] = Pyproxy(bs, env=dict(os.environ, **env))
        yield procs, be
    finally:
        for px in procs.values():
            px.stop()
        be.close()
    del port


def _one(port, method, path, headers):
    req = ("%s %s HTTP/1.1\r\nHost: svc.local\r\n%s\r\n" % (
        method, path, "".join("%s: %s\r\n" % kv for kv in headers))).encode()
    return one_response(port, req, method)


def _upstream_head(be, before: int) -> bytes:
    """The head of the last request the backend received after ``before`` raw bytes."""
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        with be.lock:
            data = bytes(be.raw[before:])
        if b"\r\n\r\n" in data:
            return data.split(b"\r\n\r\n")[0]
        time.sleep(0.01)
    return b""


@pytest.mark.parametrize("method,path,headers", REQUESTS,
                         ids=["%s %s %d" % (m, p, i) for i, (m, p, _) in enumerate(REQUESTS)])
def test_same_bytes_as_the_reference(lanes, method, path, headers):
    procs, be = lanes
    seen = {}
    for name, px in procs.items():
        with be.lock:
            before = len(be.raw)
        out, closed = _one(px.port, method, path, headers)
        up = _upstream_head(be, before)
        seen[name] = (_mask(out), closed, _mask(up))
    assert seen["compiled"][0].startswith(b"HTTP/1.1 "), seen["compiled"]
    if path == "/weighted":
        # the cluster choice is random per request: compare all but the x-w header
        for k, v in seen.items():
            seen[k] = (v[0], v[1], re.sub(rb"x-w: \d", b"x-w: ?", v[2]))
    if path == "/resp":
        assert b"\r\nx-over: route\r\n" in seen["compiled"][0] and b"x-drop" not in seen["compiled"][0]
    assert seen["compiled"] == seen["reference"], "compiled vs reference:\n%r\n%r" % (
        seen["compiled"], seen["reference"])


def _rq_stats(px) -> dict:
    return {k: v for k, v in px.stats().items()
            if k.startswith("http.ingress.downstream_rq") or k.startswith("cluster.b.upstream_rq")
            or k.startswith("cluster.b.upstream_cx_total")}


def test_same_stats_as_the_reference(lanes):
    """The same exchanges move the same counters (deltas: earlier cases chose clusters at random)."""
    procs, _ = lanes
    deltas = {}
    for name, px in procs.items():
        before = _rq_stats(px)
        for _ in range(5):
            _one(px.port, "GET", "/plain", [])
        _one(px.port, "GET", "/status", [])
        _one(px.port, "HEAD", "/chunked", [])
        time.sleep(0.1)
        after = _rq_stats(px)
        deltas[name] = {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
    assert deltas["compiled"]["http.ingress.downstream_rq_5xx"] == 1, deltas
    assert deltas["compiled"]["http.ingress.downstream_rq_2xx"] == 6, deltas
    assert deltas["compiled"]["cluster.b.upstream_rq_503"] == 1, deltas
    assert deltas["compiled"] == deltas["reference"]


def test_compiled_failures_are_local_replies(lanes):
    """Failures after the route is chosen (no upstream -> 503 UF) are shaped as the reference's."""
    procs, be = lanes
    dead = free_port()
    outs = {}
    for name, env in LANES.items():
        p = free_port()
        bs = bootstrap([http_listener(p, route_config([{"match": {"prefix": "/"}, "route": {"cluster": "d"}}]))],
                       [cluster("d", [dead])])
        px = Pyproxy(bs, env=dict(os.environ, **env))
        try:
            out, closed = _one(px.port, "GET", "/x", [])
            outs[name] = (_mask(out), closed)
            assert px.stat("cluster.d.upstream_cx_connect_fail") == 1
            assert px.stat("http.ingress.downstream_rq_5xx") == 1
        finally:
            px.stop()
    assert outs["compiled"][0].startswith(b"HTTP/1.1 503 "), outs
    assert b"upstream connect error" in outs["compiled"][0]
    assert outs["compiled"] == outs["reference"]


def test_the_plan_relays_a_bodiless_request():
    """In process (the micro benchmark's stack): a plain GET's stream runs the first attempt itself
    (no filter objects), makes no StreamInfo, and relays the upstream head as bytes; a request
    with a body runs the filter chain; the response is the one the upstream gave, with Envoy's
    additions."""
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import micro_h1
    from pyproxy.cluster.pool import UpstreamConnection
    from pyproxy.listeners.connection import DownstreamConnection
    loop, lm, al, cl, host, pool = micro_h1.build_stack(micro_h1.BOOTSTRAP)
    try:
        up = UpstreamConnection(pool, host)
        ut = micro_h1.FakeTransport(("127.0.0.1", 9), ("127.0.0.1", 40000))
        up.connection_made(ut)
        cl.cx_total_active += 1
        pool._on_idle_or_pending(up)
        down = DownstreamConnection(lm, al)
        dt = micro_h1.FakeTransport(("127.0.0.1", 50000), ("127.0.0.1", 8080))
        down.connection_made(dt)
        down.data_received(micro_h1.REQUEST)
        hc = down.filters[0]
        s = hc.codec.stream
        assert s.raw_head and s.filters is None and s.router is s
        assert ut.out[-1].startswith(b"GET /r18/bench HTTP/1.1\r\nhost: 127.0.0.1:8080\r\nuser-agent: wrk\r\n")
        up.data_received(micro_h1.RESPONSE)
        assert hc.codec.stream is None and not hc.live
        assert "stream_info" not in vars(s) and s.status == 200  # (no StreamInfo was needed)
        out = b"".join(dt.out)
        assert out.startswith(b"HTTP/1.1 200 OK\r\nserver: envoy\r\n") and out.endswith(micro_h1.BODY)
        down.data_received(b"POST /r18/x HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi")
        s = hc.codec.stream
        assert not s.raw_head and s.filters and s.router is not s
    finally:
        loop.close()


@pytest.mark.parametrize("upstream_date", [False, True])
def test_response_head_names_match_envoy(upstream_date):
    """What Envoy adds to an upstream response head (x-envoy-upstream-service-time, a date when the
    upstream sent none, server), in Envoy's order, in every lane."""
    from proxy_util import ENVOY, Envoy, one_route_bootstrap
    if not ENVOY:
        pytest.skip("envoy not installed")
    extra = [("Date", "Sun, 06 Nov 1994 08:49:37 GMT")] if upstream_date else []
    be = HttpBackend(lambda req, sock: simple_response(200, b"hi", extra + [("X-Up", "1")]))
    try:
        names = {}
        for name, env in list(LANES.items()) + [("envoy", None)]:
            bs, port = one_route_bootstrap([be.port])
            px = Envoy(bs) if env is None else Pyproxy(bs, env=dict(os.environ, **env))
            try:
                out, _ = _one(port, "GET", "/", [])
            finally:
                px.stop()
            head = out.split(b"\r\n\r\n")[0].split(b"\r\n")[1:]
            names[name] = [line.split(b":")[0].lower() for line in head]
            if upstream_date:
                assert b"date: Sun, 06 Nov 1994 08:49:37 GMT" in out, (name, out)  # kept as it was
        assert names["compiled"] == names["envoy"], names
        assert names["reference"] == names["envoy"], names
    finally:
        be.close()
