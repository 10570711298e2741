"""Downstream byte counters of the HTTP connection manager, side by side with Envoy (review
finding F32): ``http.<prefix>.downstream_cx_rx/tx_bytes_total`` count the connection's bytes
(they stayed 0), and no ``listener.<address>.downstream_cx_*_bytes_total`` (names Envoy does
not have); the HTTP/1.1 upstream's ``cluster.<c>.upstream_cx_rx/tx_bytes_total`` too."""

from __future__ import annotations

import socket
import time

import pytest

from proxy_util import (ENVOY, Envoy, HttpBackend, Pyproxy, bootstrap, cluster, free_port, http_listener, route,
                        route_config, with_fresh_ports)

pytestmark = pytest.mark.skipif(not ENVOY, reason="envoy not installed")
ROUTER = {"name": "envoy.filters.http.router", "typed_config": {
    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router", "suppress_envoy_headers": True}}


def _bs(be_port):
    return bootstrap([http_listener(free_port(), route_config([route("/", "b")]), stat_prefix="in",
                                    http_filters=[ROUTER])], [cluster("b", [be_port])])


def _post_twice(port):
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    got = b""
    try:
        for i in range(2):
            s.sendall(b"POST /p%d HTTP/1.1\r\nHost: x\r\ncontent-length: 10\r\n\r\n0123456789" % i)
            while got.count(b"HTTP/1.1 200") <= i or not got.endswith(b"10"):
                d = s.recv(65536)
                if not d:
                    break
                got += d
    finally:
        s.close()
    return got


def _run(cls):
    be = HttpBackend(name="b")
    try:
        with cls(with_fresh_ports(_bs(be.port))) as p:
            got = _post_twice(p.port)
            assert got.count(b"HTTP/1.1 200") == 2, got
            # (a proxy may count the last write a moment after the client has read it: wait, bounded,
            # until the bytes the client got are counted)
            deadline = time.monotonic() + 3
            st = p.stats()
            while st.get("http.in.downstream_cx_tx_bytes_total", 0) < len(got) and time.monotonic() < deadline:
                time.sleep(0.05)
                st = p.stats()
    finally:
        be.close()
    out = {k: st.get(k) for k in ("http.in.downstream_cx_rx_bytes_total", "http.in.downstream_cx_tx_bytes_total",
                                  "cluster.b.upstream_cx_rx_bytes_total", "cluster.b.upstream_cx_tx_bytes_total")}
    out["listener bytes"] = sorted(k for k in st if k.startswith("listener.") and "_bytes_total" in k)
    return out


def test_hcm_and_upstream_byte_counters_like_envoy():
    px, env = _run(Pyproxy), _run(Envoy)
    assert env["http.in.downstream_cx_rx_bytes_total"] > 0, env  # (the reference itself)
    assert px == env, (px, env)
