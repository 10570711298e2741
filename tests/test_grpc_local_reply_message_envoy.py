"""A gRPC request's local reply without a body text (no route: grpc-status 12) carries no
``grpc-message``, as Envoy's, side by side with Envoy (review finding F27, that part)."""

from __future__ import annotations

import re
import socket

import pytest

from proxy_util import (ENVOY, Envoy, HttpBackend, Pyproxy, bootstrap, cluster, free_port, http_listener, route,
                        route_config, with_fresh_ports)

pytestmark = pytest.mark.skipif(not ENVOY, reason="envoy not installed")


def test_no_route_grpc_reply_has_no_grpc_message():
    out = {}
    for name, cls in (("pyproxy", Pyproxy), ("envoy", Envoy)):
        be = HttpBackend()
        try:
            bs = bootstrap([http_listener(free_port(), route_config([route("/svc/", "b")]))], [cluster("b", [be.port])])
            with cls(with_fresh_ports(bs)) as p:
                s = socket.create_connection(("127.0.0.1", p.port), timeout=5)
                try:
                    s.sendall(b"POST /other/M HTTP/1.1\r\nHost: x\r\ncontent-type: application/grpc\r\nte: trailers\r\n"
                              b"connection: close\r\ncontent-length: 5\r\n\r\n\0\0\0\0\0")
                    buf = b""
                    while True:
                        d = s.recv(65536)
                        if not d:
                            break
                        buf += d
                finally:
                    s.close()
                head = buf.split(b"\r\n\r\n", 1)[0].decode("latin-1").lower()
                out[name] = (head.split("\r\n")[0],
                             [(k, v.strip()) for k, v in re.findall(r"^(grpc-[a-z]+):(.*)$", head, re.M)])
        finally:
            be.close()
    assert out["pyproxy"] == out["envoy"], out
    assert out["envoy"][1] == [("grpc-status", "12")], out
