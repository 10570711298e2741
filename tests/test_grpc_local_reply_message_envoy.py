"""A gRPC request's local reply without a body text (no route: grpc-status 12) carries no
``grpc-message``, as Envoy's, side by side with Envoy (review finding F27, that part)."""

from __future__ import annotations

import re

import pytest

from proxy_util import (ENVOY, Envoy, HttpBackend, Pyproxy, bootstrap, cluster, free_port, http_listener, route,
                        route_config, until_close, with_fresh_ports)

pytestmark = pytest.mark.skipif(not ENVOY, reason="envoy not installed")


def test_no_route_grpc_reply_has_no_grpc_message():
    out = {}
    for name, cls in (("pyproxy", Pyproxy), ("envoy", Envoy)):
        be = HttpBackend()
        try:
            bs = bootstrap([http_listener(free_port(), route_config([route("/svc/", "b")]))], [cluster("b", [be.port])])
            with cls(with_fresh_ports(bs)) as p:
                buf = until_close(p.port, b"POST /other/M HTTP/1.1\r\nHost: x\r\ncontent-type: application/grpc\r\n"
                                  b"te: trailers\r\nconnection: close\r\ncontent-length: 5\r\n\r\n\0\0\0\0\0")
                head = buf.split(b"\r\n\r\n", 1)[0].decode("latin-1").lower()
                out[name] = (head.split("\r\n")[0],
                             [(k, v.strip()) for k, v in re.findall(r"^(grpc-[a-z]+):(.*)$", head, re.M)])
        finally:
            be.close()
    assert out["pyproxy"] == out["envoy"], out
    assert out["envoy"][1] == [("grpc-status", "12")], out
