"""An HTTP/1.1 local reply sent before the request body was read (a fault abort at the request
headers: what an RBAC denial of a POST or Istio's fault injection does), side by side with Envoy
(review finding F38): the reply says ``connection: close`` (the connection closes after it); a
GET answered the same way keeps its connection (the next request is served)."""

from __future__ import annotations

import socket
import time

import pytest

from proxy_util import (ENVOY, Envoy, HttpBackend, Pyproxy, bootstrap, cluster, free_port, http_listener, route,
                        route_config, with_fresh_ports)

pytestmark = pytest.mark.skipif(not ENVOY, reason="envoy not installed")
FAULT = {"name": "envoy.filters.http.fault", "typed_config": {
    "@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault",
    "abort": {"http_status": 503, "percentage": {"numerator": 100}}}}
NOFAULT = {"envoy.filters.http.fault": {
    "@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"}}
ROUTER = {"name": "envoy.filters.http.router", "typed_config": {
    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}
CASES = {
    "body-in-same-packet": [b"POST /abort HTTP/1.1\r\nHost: x\r\ncontent-length: 5\r\n\r\nhello"],
    "body-later": [b"POST /abort HTTP/1.1\r\nHost: x\r\ncontent-length: 10\r\n\r\nhello", b"world"],
    "chunked-later": [b"POST /abort HTTP/1.1\r\nHost: x\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n",
                      b"0\r\n\r\n"],
    "get": [b"GET /abort HTTP/1.1\r\nHost: x\r\n\r\n"],
}


def _bs(be_port):
    nxt = route("/next", "b")
    nxt["typed_per_filter_config"] = NOFAULT
    rc = route_config([nxt, route("/", "b")])
    return bootstrap([http_listener(free_port(), rc, stat_prefix="in", http_filters=[FAULT, ROUTER])],
                     [cluster("b", [be_port])])


def _exchange(port, parts):
    """The reply's status line and connection header, then whether ``GET /next`` on the same
    connection is answered."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.settimeout(2)
    buf = b""
    try:
        for i, p in enumerate(parts):
            if i:
                time.sleep(0.2)
            try:
                s.sendall(p)
            except OSError:
                break
        while b"\r\n\r\n" not in buf:
            d = s.recv(65536)
            if not d:
                break
            buf += d
        head = buf.split(b"\r\n\r\n")[0].split(b"\r\n")
        lines = [head[0][:12]] + [l.lower() for l in head if l.lower().startswith(b"connection:")]
        try:
            s.sendall(b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
            time.sleep(0.3)
            more = s.recv(65536)
        except OSError:
            more = b""
        return lines, b"HTTP/1.1 200" in buf + more
    finally:
        s.close()


def _run(cls):
    be = HttpBackend()
    try:
        with cls(with_fresh_ports(_bs(be.port))) as p:
            return {name: _exchange(p.port, parts) for name, parts in CASES.items()}
    finally:
        be.close()


def test_reply_before_request_body_says_connection_close():
    px, env = _run(Pyproxy), _run(Envoy)
    assert env["body-later"] == ([b"HTTP/1.1 503", b"connection: close"], False), env  # (the reference)
    assert env["get"] == ([b"HTTP/1.1 503"], True), env
    assert px == env, (px, env)
