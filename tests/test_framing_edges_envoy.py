"""Response framing edge cases, side by side with Envoy 1.40: an HTTP/2 upstream's repeated
content-length (even with one value: a protocol error, 502), 204/304 answers carrying a
content-length, HEAD answers with and without one from HTTP/2 and HTTP/1.1 upstreams (an HTTP/1.1
client gets ``transfer-encoding: chunked`` on a HEAD answer without a length, and a 204 to HEAD
loses its ``content-length: 0``; with ``connection: close`` the framing line the codec adds comes last), to
HTTP/1.1 and HTTP/2 clients; and an HTTP/2 client's request
with a repeated content-length (Envoy ends the connection). Real sockets; the same upstreams serve
both proxies."""

from __future__ import annotations

import re

import pytest

from diff_util import H2, ScriptedH2, h2_script, request_headers
from proxy_util import (ENVOY, Envoy, HttpBackend, Pyproxy, bootstrap, cluster, free_port, http_listener, raw,
                        route, route_config)

_OPTS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
H2_CLUSTER = {"typed_extension_protocol_options": {_OPTS: {
    "@type": "type.googleapis.com/" + _OPTS, "explicit_http_config": {"http2_protocol_options": {}}}}}

H2_ANSWERS = {
    "/cl2": [("headers", [(":status", "200"), ("content-length", "2"), ("content-length", "2")], False),
             ("data", b"ok", True)],
    "/cl2diff": [("headers", [(":status", "200"), ("content-length", "2"), ("content-length", "3")], False),
                 ("data", b"ok", True)],
    "/204cl0": [("headers", [(":status", "204"), ("content-length", "0")], True)],
    "/204cl5": [("headers", [(":status", "204"), ("content-length", "5")], True)],
    "/304cl": [("headers", [(":status", "304"), ("content-length", "5")], True)],
    "/head": [("headers", [(":status", "200"), ("content-length", "10")], True)],
    "/head0": [("headers", [(":status", "200"), ("content-length", "0")], True)],
    "/headnocl": [("headers", [(":status", "200")], True)],
    "/chunked": [("headers", [(":status", "200"), ("x-a", "1")], False), ("data", b"ok", True)],
}


def _h1_handler(req, sock):
    if req.path == "/h1/te":
        return b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
    if req.path == "/h1/204":
        return b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n"
    return b"HTTP/1.1 200 OK\r\n\r\n" if req.method == "HEAD" else b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"


@pytest.fixture(scope="module")
def pair():
    be1 = HttpBackend(_h1_handler)
    be2 = ScriptedH2(lambda h, n: H2_ANSWERS[h[":path"]])
    procs = []
    try:
        for cls in (Pyproxy, Envoy) if ENVOY else (Pyproxy,):
            rc = route_config([route("/h1/", "h1"), route("/", "h2")])
            procs.append(cls(bootstrap([http_listener(free_port(), rc)],
                                       [cluster("h1", [be1.port]), cluster("h2", [be2.port], **H2_CLUSTER)])))
        yield procs
    finally:
        for p in procs:
            p.stop()
        be1.close()
        be2.close()


CASES = [("GET", "/cl2"), ("GET", "/headnocl"), ("GET", "/chunked"), ("GET", "/cl2diff"), ("GET", "/204cl0"), ("GET", "/204cl5"), ("GET", "/304cl"),
         ("HEAD", "/head"), ("HEAD", "/head0"), ("HEAD", "/headnocl"), ("GET", "/head"),
         ("HEAD", "/h1/x"), ("HEAD", "/h1/te"), ("GET", "/h1/204"), ("HEAD", "/h1/204")]
_VARIES = re.compile(rb"(date: [^\r]*|x-envoy-upstream-service-time: \d+)\r\n")


@pytest.mark.parametrize("method,path", CASES)
def test_http1_client(pair, method, path):
    got = {}
    for p in pair:
        out = raw(p.port, ("%s %s HTTP/1.1\r\nhost: h\r\nconnection: close\r\n\r\n" % (method, path)).encode(), timeout=2.0)
        got[p.kind] = _VARIES.sub(b"", out)
    px = got["pyproxy"]
    if path == "/cl2":
        assert px.startswith(b"HTTP/1.1 502 "), px
    if method == "HEAD" and path in ("/headnocl", "/h1/x", "/h1/te"):
        assert b"transfer-encoding: chunked\r\n" in px and b"content-length" not in px, px
    if path == "/h1/204":
        assert b"content-length" not in px, px
    if "envoy" in got:
        assert px == got["envoy"]


@pytest.mark.parametrize("method,path", [c for c in CASES if not c[1].startswith("/h1/")])
def test_http2_client(pair, method, path):
    got = {}
    for p in pair:
        got[p.kind] = h2_script(p.port, [H2.headers(1, request_headers(method, path))], timeout=2)[0]
    if path == "/cl2":
        assert got["pyproxy"][0][0][2][0] == (":status", "502"), got
    if "envoy" in got:
        assert got["pyproxy"] == got["envoy"]


@pytest.mark.parametrize("second", ["2", "3"])
def test_http2_request_repeated_content_length(pair, second):
    got = {}
    for p in pair:
        got[p.kind] = h2_script(p.port, [
            H2.headers(1, request_headers("POST", "/h1/x", extra=[("content-length", "2"), ("content-length", second)]),
                       end_stream=False), H2.data(1, b"ab")], timeout=2)[0]
    assert got["pyproxy"][1] == "closed" and not [f for f in got["pyproxy"][0] if f[0] in ("headers", "data")], got
    if "envoy" in got:
        assert got["pyproxy"] == got["envoy"]
