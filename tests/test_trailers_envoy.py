"""Trailers through HTTP/1.1, side by side with Envoy 1.40: its HTTP/1.1 codec drops trailers unless
``http_protocol_options.enable_trailers`` is set (the connection manager's for responses to an
HTTP/1.1 client; the cluster's for an HTTP/1.1 upstream, both ways). Cases: a gRPC answer from an
HTTP/2 upstream to an HTTP/1.1 client; a chunked HTTP/1.1 upstream answer with trailers to an
HTTP/1.1 and an HTTP/2 client; an HTTP/2 client's request trailers to an HTTP/1.1 upstream.
Real sockets; the same upstreams serve both proxies."""

from __future__ import annotations

import pytest

from diff_util import H2, ScriptedH2, h2_script, request_headers
from proxy_util import (ENVOY, Envoy, HttpBackend, Pyproxy, bootstrap, cluster, free_port, http_listener, raw,
                        route, route_config)

_OPTS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def _explicit(http_config):
    return {"typed_extension_protocol_options": {_OPTS: {
        "@type": "type.googleapis.com/" + _OPTS, "explicit_http_config": http_config}}}


def _h2_script(h, n):
    return [("headers", [(":status", "200"), ("content-type", "application/grpc")], False),
            ("data", b"ok", False), ("trailers", [("grpc-status", "0"), ("x-t", "1")])]


def _h1_handler(req, sock):
    return b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nx-t: 1\r\n\r\n"


# listener name -> (HCM enable_trailers, cluster)
LISTENERS = {
    "h1": (False, "h1"), "h1-cl": (False, "h1t"), "h1-hcm": (True, "h1"), "h1-both": (True, "h1t"),
    "h2": (False, "h2"), "h2-hcm": (True, "h2"),
}


@pytest.fixture(scope="module")
def pair():
    be1 = HttpBackend(_h1_handler)
    be2 = ScriptedH2(_h2_script)
    clusters = [cluster("h1", [be1.port]),
                cluster("h1t", [be1.port], **_explicit({"http_protocol_options": {"enable_trailers": True}})),
                cluster("h2", [be2.port], **_explicit({"http2_protocol_options": {}}))]
    procs = []
    try:
        for cls in (Pyproxy, Envoy) if ENVOY else (Pyproxy,):
            ls = [http_listener(free_port(), route_config([route("/", c)]), name=name,
                                **({"http_protocol_options": {"enable_trailers": True}} if on else {}))
                  for name, (on, c) in LISTENERS.items()]
            procs.append(cls(bootstrap(ls, clusters)))
        yield be1, procs
    finally:
        for p in procs:
            p.stop()
        be1.close()
        be2.close()


def _port(p, name):
    return p.ports[list(LISTENERS).index(name)]


@pytest.mark.parametrize("name", list(LISTENERS))
def test_response_trailers_to_http1_client(pair, name):
    _, procs = pair
    got = {}
    for p in procs:
        out = raw(_port(p, name), b"GET /t HTTP/1.1\r\nhost: h\r\nte: trailers\r\nconnection: close\r\n\r\n", timeout=3)
        got[p.kind] = out.partition(b"\r\n\r\n")[2]
    hcm_on, c = LISTENERS[name]
    passes = hcm_on and c != "h1"
    want = b"2\r\nok\r\n0\r\n" + ((b"grpc-status: 0\r\nx-t: 1\r\n" if c == "h2" else b"x-t: 1\r\n") if passes else b"") + b"\r\n"
    assert got["pyproxy"] == want, got
    if "envoy" in got:
        assert got["pyproxy"] == got["envoy"]


@pytest.mark.parametrize("name", ["h1", "h1-cl"])
def test_http1_upstream_trailers_to_http2_client(pair, name):
    _, procs = pair
    got = {}
    for p in procs:
        (frames, _), _ = h2_script(_port(p, name), [H2.headers(1, request_headers("GET", "/t"))], timeout=3)
        got[p.kind] = [f for f in frames if f[0] != "headers" or f[3]]  # (data and trailers)
    want = [["data", 1, b"ok", False], ["headers", 1, [("x-t", "1")], True]] if name == "h1-cl" else \
        [["data", 1, b"ok", True]]
    assert got["pyproxy"] == want, got
    if "envoy" in got:
        assert got["pyproxy"] == got["envoy"]


@pytest.mark.parametrize("name", ["h1", "h1-cl"])
def test_http2_request_trailers_to_http1_upstream(pair, name):
    be, procs = pair
    got = {}
    for p in procs:
        path = "/rt/%s/%s" % (name, p.kind)
        h2_script(_port(p, name), [H2.headers(1, request_headers("POST", path), end_stream=False),
                                   H2.data(1, b"ab", end_stream=False), H2.headers(1, [("x-rt", "1")])], timeout=3)
        seen = [r for r in be.requests if r.path == path]
        assert seen, "%s forwarded nothing" % p.kind
        got[p.kind] = (seen[0].body, [kv for kv in seen[0].headers if kv[0] == "x-rt"])
    assert got["pyproxy"][0] == b"ab"
    if "envoy" in got:
        assert got["pyproxy"] == got["envoy"]
