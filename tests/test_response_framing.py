"""An upstream response whose body disagrees with its framing is a protocol error of the upstream
stream, never bytes that run into the next response of a keep-alive connection (response queue
poisoning). Every case runs through pyproxy and through Envoy on the same bootstrap and the same
scripted upstream, and what the client sees must agree.

- HTTP/2 upstream, HTTP/1.1 client: DATA beyond / short of the content-length, DATA on a 204 or
  to a HEAD (even a complete HTTP/1.1 response as DATA), a head with END_STREAM that announces a
  body; the client pipelines a second request on the same connection.
- HTTP/2 upstream, HTTP/2 client: the same cases seen as frames.
- The HTTP/1.1 server encoder on its own refuses body bytes its head did not announce.
"""

from __future__ import annotations

import re
import shutil
import time

import pytest

from tests.diff_util import H2, ScriptedH2, h2_script, request_headers
from tests.proxy_util import Envoy, Pyproxy, bootstrap, cluster, http_listener, raw, route, route_config, with_fresh_ports

ENVOY = shutil.which("envoy")
pytestmark = pytest.mark.skipif(ENVOY is None, reason="needs the envoy binary")
T = "type.googleapis.com/"

H2_CASES = {
    "cl-short": [("headers", [(":status", "200"), ("content-length", "5")], False), ("data", b"ok", True)],
    "cl-over": [("headers", [(":status", "200"), ("content-length", "2")], False), ("data", b"okEXTRA", True)],
    "cl-over-later": [("headers", [(":status", "200"), ("content-length", "2")], False), ("data", b"ok", False),
                      ("sleep", 0.3), ("data", b"EXTRA", True)],
    "204-data": [("headers", [(":status", "204")], False), ("data", b"abc", True)],
    "head-data": [("headers", [(":status", "200"), ("content-length", "3")], False), ("data", b"abc", True)],
    "head-injected": [("headers", [(":status", "200")], False),
                      ("data", b"HTTP/1.1 200 OK\r\ncontent-length: 8\r\nx-injected: 1\r\n\r\nINJECTED", True)],
    "head-ok": [("headers", [(":status", "200"), ("content-length", "3")], True)],
    "304-cl": [("headers", [(":status", "304"), ("content-length", "20")], True)],
    "headers-end-cl": [("headers", [(":status", "200"), ("content-length", "10")], True)],
    "trailers-short": [("headers", [(":status", "200"), ("content-length", "5")], False), ("data", b"ok", False),
                       ("trailers", [("x-t", "1")])],
    "rst-after-head": [("headers", [(":status", "200")], False), ("data", b"ok", False), ("sleep", 0.2),
                       ("reset", 8)],
    "cl-exact": [("headers", [(":status", "200"), ("content-length", "2")], False), ("data", b"o", False),
                 ("data", b"k", True)],
    # a :status that is not three digits (review F2): a protocol error, 502 (Envoy relays "099")
    "status-2000": [("headers", [(":status", "2000"), ("content-length", "2")], False), ("data", b"ok", True)],
    "status-abc": [("headers", [(":status", "abc"), ("content-length", "2")], False), ("data", b"ok", True)],
}


def _script(h, n):
    last = h.get(":path", "").rsplit("/", 1)[-1]
    return H2_CASES.get(last) or [("headers", [(":status", "200"), ("content-length", "4")], False),
                                  ("data", b"next", True)]


def _bootstrap(port: int) -> dict:
    c = cluster("h2b", [port])
    c["typed_extension_protocol_options"] = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": T + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": {"http2_protocol_options": {}}}}
    return bootstrap([http_listener(1, route_config([route("/", "h2b", timeout="3s")]))], [c])


@pytest.fixture(scope="module")
def pair():
    up = ScriptedH2(_script)
    procs = {}
    try:
        for cls in (Pyproxy, Envoy):
            procs[cls.kind] = cls(with_fresh_ports(_bootstrap(up.port)))
        yield procs
    finally:
        for p in procs.values():
            p.stop()
        up.close()


_MASK = re.compile(rb"(x-envoy-upstream-service-time: \d+|date: [^\r]+|transfer-encoding: chunked)\r\n")


def _h1_view(out: bytes):
    """The client's view: the first response's head (masked; Envoy writes transfer-encoding:
    chunked on a HEAD response without content-length), what followed it, the second answer."""
    head, _, rest = out.partition(b"\r\n\r\n")
    return _MASK.sub(b"", head + b"\r\n"), _MASK.sub(b"", rest)


@pytest.mark.parametrize("case", sorted(H2_CASES))
def test_h2_upstream_body_framing_h1_client_as_envoy(pair, case):
    method = "HEAD" if case.startswith("head") else "GET"
    req = ("%s /%s HTTP/1.1\r\nhost: x\r\n\r\nGET /next HTTP/1.1\r\nhost: x\r\n\r\n" % (method, case)).encode()
    seen = {k: _h1_view(raw(p.port, req, timeout=3)) for k, p in pair.items()}
    got, want = seen["pyproxy"], seen["envoy"]
    assert b"INJECTED" not in got[1]
    if case in ("head-ok", "304-cl", "cl-exact"):
        assert want[1].endswith(b"next"), want  # (the premise: a valid response, the connection reused)
    assert got == want, (got, want)


@pytest.mark.parametrize("case", ["cl-short", "cl-over", "204-data", "headers-end-cl", "trailers-short",
                                  "cl-exact", "rst-after-head"])
def test_h2_upstream_body_framing_h2_client_as_envoy(pair, case):
    def view(port):
        (frames, _end), _ = h2_script(port, [H2.headers(1, request_headers("GET", "/" + case))], timeout=4,
                                      settle=0.2)
        return [f[:2] + [[kv for kv in f[2] if kv[0] not in ("date", "x-envoy-upstream-service-time")]]
                + f[3:] if f[0] == "headers" else f for f in frames]
    got, want = view(pair["pyproxy"].port), view(pair["envoy"].port)
    assert got == want, (got, want)


class _Conn:
    def __init__(self):
        self.out = []
        self.closed = False

    def write(self, b):
        assert not self.closed
        self.out.append(b)

    def close(self, flush=True):
        self.closed = True


def _encoder(method="GET"):
    from pyproxy.http.http1 import HTTP11, Http1ServerCodec
    from pyproxy.http.http1_response import Http1ResponseEncoder

    c = object.__new__(Http1ServerCodec)
    c.conn = _Conn()
    c.method = method
    c.version = HTTP11
    c.tunnel = c.drain_close = c.response_close = c.response_chunked = False
    c.request_complete = True
    c.pending = None
    c.stream = None
    c.body_left = None
    assert isinstance(c, Http1ResponseEncoder)
    return c


@pytest.mark.parametrize("status,method,cl,body,ok", [
    ("200", "GET", "2", [b"ok"], True),
    ("200", "GET", "2", [b"o", b"k"], True),
    ("200", "GET", "2", [b"okEXTRA"], False),
    ("200", "GET", "5", [b"ok"], False),
    ("200", "GET", "2", [b"ok", b"X"], False),
    ("200", "HEAD", "3", [b"abc"], False),
    ("200", "HEAD", None, [b"HTTP/1.1 200 OK\r\n\r\n"], False),
    ("204", "GET", None, [b"abc"], False),
    ("304", "GET", "20", [b"abc"], False),
    ("200", "GET", None, [b"any", b"length"], True),  # (chunked)
])
def test_http1_encoder_refuses_a_body_its_head_did_not_announce(status, method, cl, body, ok):
    from pyproxy.http.headers import Headers

    c = _encoder(method)
    h = [(":status", status)] + ([("content-length", cl)] if cl is not None else [])
    c.encode_headers(Headers(h), False)
    for i, b in enumerate(body):
        c.encode_data(b, i == len(body) - 1)
    written = b"".join(c.conn.out)
    head, _, rest = written.partition(b"\r\n\r\n")
    if ok:
        assert not c.conn.closed
    else:
        assert c.conn.closed
        limit = 0 if method == "HEAD" or status in ("204", "304") else int(cl)
        assert len(rest) <= limit, rest


@pytest.mark.parametrize("te", ["trailers, gzip", "gzip, trailers", "gzip", "trailers"])
def test_request_te_to_an_h2_upstream_as_envoy(te):
    """A request TE listing trailers among other codings reaches an HTTP/2 upstream as
    ``te: trailers``; without trailers, no TE."""
    up = ScriptedH2(_script)
    seen = {}
    try:
        for cls in (Pyproxy, Envoy):
            with cls(with_fresh_ports(_bootstrap(up.port))) as p:
                mark = up.mark()
                out = raw(p.port, b"GET /x HTTP/1.1\r\nhost: x\r\nte: %s\r\n\r\n" % te.encode(), until_close=False,
                          settle=0.3, timeout=2)
                assert out.startswith(b"HTTP/1.1 200"), out
                seen[cls.kind] = [dict(e[1]).get("te") for e in up.since(mark) if e[0] == "request"]
    finally:
        up.close()
    assert seen["envoy"] == ["trailers" if "trailers" in te else None], seen
    assert seen["pyproxy"] == seen["envoy"], seen
