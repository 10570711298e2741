"""Responses from an HTTP/1.1 upstream that Envoy refuses or rewrites, and request hop-by-hop
headers Envoy rewrites: each case runs through pyproxy (compiled and PYPROXY_REFERENCE=1 modes)
and Envoy on the same bootstrap and upstream; the client pipelines a second request on the same
connection, and both answers (and, for requests, what the upstream received) must agree.

- a status below 100: 502 "protocol error" (not a body with no head);
- 204 with a content-length other than 0, or with a transfer-encoding: 502; ``content-length: 0``
  on a 204 is dropped;
- a transfer-encoding other than one ``chunked`` (``gzip, chunked``, ``chunked, gzip``, ``gzip``,
  two header lines): 502;
- an upstream's own ``x-envoy-upstream-service-time``: one header goes out, the router's;
- a 101 the request did not ask for: a plain head (no upgrade, no connection), the response ends;
- request ``TE: trailers, gzip`` goes upstream as ``te: trailers``;
- request headers nominated by Connection are removed.
"""

from __future__ import annotations

import re
import shutil

import pytest

from tests.proxy_util import (HttpBackend, bootstrap, cluster, http_listener, raw, route, route_config,
                              three_ways)

ENVOY = shutil.which("envoy")
pytestmark = pytest.mark.skipif(ENVOY is None, reason="needs the envoy binary")

NEXT = b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nnext"
RESPONSES = {
    "status-099": b"HTTP/1.1 099 X\r\ncontent-length: 2\r\n\r\nok",
    "status-100-with-body": (b"HTTP/1.1 100 Continue\r\ncontent-length: 2\r\n\r\nok"
                             b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhi"),
    "204-cl": b"HTTP/1.1 204 No Content\r\ncontent-length: 5\r\n\r\nhello",
    "204-cl0": b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n",
    "204-te": b"HTTP/1.1 204 No Content\r\ntransfer-encoding: chunked\r\n\r\n",
    "304-cl": b"HTTP/1.1 304 Not Modified\r\ncontent-length: 5\r\n\r\n",
    "te-gzip-chunked": b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    "te-chunked-gzip": b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked, gzip\r\n\r\nok",
    "te-gzip": b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\nok",
    "te-two-lines": (b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\ntransfer-encoding: chunked\r\n\r\n"
                     b"2\r\nok\r\n0\r\n\r\n"),
    "te-chunked-upper": b"HTTP/1.1 200 OK\r\ntransfer-encoding: Chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    "service-time": b"HTTP/1.1 200 OK\r\nx-envoy-upstream-service-time: 99\r\ncontent-length: 2\r\n\r\nok",
    "101-unasked": b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\nhello",
}
_MASK = re.compile(rb"(x-envoy-upstream-service-time: )\d+|date: [^\r]+\r\n")


def _answer(req, sock):
    return RESPONSES.get(req.path.strip("/"), NEXT)


@pytest.fixture(scope="module")
def procs():
    be = HttpBackend(_answer)
    bs = bootstrap([http_listener(1, route_config([route("/", "b", timeout="2s")]))], [cluster("b", [be.port])])
    try:
        for out in three_ways(bs):
            yield be, out
    finally:
        be.close()


def _lines(head: bytes) -> list:
    """A response head as its status line and its sorted header lines (Envoy writes the router's
    x-envoy-upstream-service-time where the upstream had its own; pyproxy adds it)."""
    first, _, rest = head.partition(b"\r\n")
    return [first] + sorted(rest.split(b"\r\n"))


def _view(out: bytes):
    out = _MASK.sub(rb"\1", out)
    views = []
    while out:
        head, sep, out = out.partition(b"\r\n\r\n")
        if not sep:
            views.append(head)
            break
        m = re.search(rb"content-length: (\d+)", head)
        n = int(m.group(1)) if m and not head.startswith((b"HTTP/1.1 304", b"HTTP/1.1 204")) else 0
        if b"transfer-encoding: chunked" in head:
            n = out.find(b"0\r\n\r\n") + 5 if b"0\r\n\r\n" in out else len(out)
        views.append((_lines(head), out[:n]))
        out = out[n:]
    return views


@pytest.mark.parametrize("case", sorted(RESPONSES))
def test_upstream_h1_response_framing_as_envoy(procs, case):
    _, ps = procs
    req = b"GET /%s HTTP/1.1\r\nhost: x\r\n\r\nGET /next HTTP/1.1\r\nhost: x\r\n\r\n" % case.encode()
    seen = {k: _view(raw(p.port, req, timeout=2.5)) for k, p in ps.items()}
    want = seen["envoy"]
    assert want and want[-1][1] == b"next", want  # (the premise: the connection goes on after the case)
    if case == "service-time":
        assert sum(1 for ln in want[0][0] if ln.startswith(b"x-envoy-upstream-service-time")) == 1
    assert seen["pyproxy"] == want, seen
    assert seen["reference"] == want, seen


@pytest.mark.parametrize("te,forwarded", [("trailers, gzip", "trailers"), ("gzip, trailers", "trailers"),
                                          ("gzip", None), ("trailers", "trailers")])
def test_request_te_as_envoy(procs, te, forwarded):
    be, ps = procs
    got = {}
    for k, p in ps.items():
        n = len(be.requests)
        out = raw(p.port, b"GET /te HTTP/1.1\r\nhost: x\r\nte: %s\r\n\r\n" % te.encode(), until_close=False,
                  settle=0.3, timeout=2.5)
        assert out.startswith(b"HTTP/1.1 200"), out
        got[k] = [r.header("te") for r in be.requests[n:]]
    assert got["envoy"] == [forwarded], got
    assert got["pyproxy"] == got["envoy"] and got["reference"] == got["envoy"], got


_MASKED_REQUEST = ("x-request-id", "x-forwarded-proto", "x-envoy-expected-rq-timeout-ms", "host")


@pytest.mark.parametrize("extra", [b"connection: x-foo\r\nx-foo: 1\r\nx-bar: 2",
                                   b"connection: close, X-Foo\r\nx-foo: 1",
                                   b"connection: keep-alive, x-foo, x-bar\r\nx-foo: 1\r\nx-bar: 2\r\nx-baz: 3",
                                   b"connection: cookie, authorization\r\ncookie: a=1\r\nauthorization: x",
                                   b"connection: te\r\nte: trailers"])
def test_request_connection_nominated_headers_as_envoy(procs, extra):
    be, ps = procs
    got = {}
    for k, p in ps.items():
        n = len(be.requests)
        out = raw(p.port, b"GET /c HTTP/1.1\r\nhost: x\r\n" + extra + b"\r\n\r\n", until_close=False, settle=0.3,
                  timeout=2.5)
        got[k] = (out[:12], [[kv for kv in r.headers if kv[0] not in _MASKED_REQUEST] for r in be.requests[n:]])
    assert got["envoy"][0] == b"HTTP/1.1 200", got
    assert got["pyproxy"] == got["envoy"] and got["reference"] == got["envoy"], got


@pytest.mark.parametrize("nominated", ["x-forwarded-for", "X-Forwarded-Proto", "x-foo, x-forwarded-host", "host",
                                       "x-request-id"])
def test_connection_may_not_nominate_forwarding_headers_as_envoy(procs, nominated):
    _, ps = procs
    got = {k: raw(p.port, b"GET / HTTP/1.1\r\nhost: x\r\nconnection: %s\r\n\r\n" % nominated.encode(),
                  until_close=False, settle=0.2, timeout=2.5)[:12] for k, p in ps.items()}
    assert got["envoy"] == (b"HTTP/1.1 200" if nominated == "x-request-id" else b"HTTP/1.1 400"), got
    assert got["pyproxy"] == got["envoy"] and got["reference"] == got["envoy"], got
