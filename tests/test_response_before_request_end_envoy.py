"""HTTP/1.1: a response sent before the request was fully read (fault abort at decodeHeaders of a
POST whose body is still coming, as an AuthorizationPolicy denial or VirtualService fault
injection) says ``connection: close`` before the proxy closes, side by side with Envoy (review
finding F38); a GET abort keeps the connection on both."""

from __future__ import annotations

import socket

import pytest

from proxy_util import (ENVOY, Envoy, HttpBackend, Pyproxy, bootstrap, cluster, free_port, head_done,
                        http_listener, recv_until, route, route_config, simple_response, with_fresh_ports)

pytestmark = pytest.mark.skipif(not ENVOY, reason="envoy not installed")
FT = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"
CASES = {
    "body-in-same-packet": [b"POST /abort HTTP/1.1\r\nHost: x\r\ncontent-length: 5\r\n\r\nhello"],
    "body-partial": [b"POST /abort HTTP/1.1\r\nHost: x\r\ncontent-length: 10\r\n\r\nhello", b"world"],
    "chunked-partial": [b"POST /abort HTTP/1.1\r\nHost: x\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n",
                        b"0\r\n\r\n"],
    "get": [b"GET /abort HTTP/1.1\r\nHost: x\r\n\r\n"],
}


def _bs(be_port):
    r = route("/abort", "b")
    r["typed_per_filter_config"] = {"envoy.filters.http.fault": {
        "@type": FT, "abort": {"http_status": 503, "percentage": {"numerator": 100}}}}
    ln = http_listener(free_port(), route_config([r, route("/", "b")]))
    ln["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"].insert(
        0, {"name": "envoy.filters.http.fault", "typed_config": {"@type": FT}})
    return bootstrap([ln], [cluster("b", [be_port])])


def _case(port, chunks):
    """(status line, 'connection: close' said, answered a second request on the connection)"""
    s = socket.create_connection(("127.0.0.1", port), timeout=3)
    try:
        s.sendall(chunks[0])
        head = recv_until(s, 5, head_done)[0].split(b"\r\n\r\n", 1)[0].lower()
        for c in chunks[1:]:
            try:
                s.sendall(c)
            except OSError:
                break
        try:
            s.sendall(b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
            rest = recv_until(s, 3, lambda b: b"b-next" in b)[0]
        except OSError:
            rest = b""
        return head.split(b"\r\n")[0].decode(), b"\r\nconnection: close" in head, b"b-next" in rest
    finally:
        s.close()


def test_response_before_request_end_says_connection_close():
    def handler(req, sock):
        return simple_response(200, b"b-next")

    out = {}
    with HttpBackend(handler) as be:
        for cls in (Pyproxy, Envoy):
            with cls(with_fresh_ports(_bs(be.port))) as p:
                out[cls.__name__] = {n: _case(p.port, c) for n, c in CASES.items()}
    ev = out["Envoy"]
    assert ev["body-partial"][:2] == ("http/1.1 503 service unavailable", True), ev
    assert ev["get"] == ("http/1.1 503 service unavailable", False, True), ev
    assert out["Pyproxy"] == ev, out
