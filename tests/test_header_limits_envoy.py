"""Request header count limit (HCM default max_headers_count 100), side by side with Envoy
(review finding F35): on HTTP/2 the pseudo-headers count too (a request with 4 pseudo-headers and
98 others is refused, one with 96 others is served), and header-limit rejections are not counted
as ``downstream_rq_too_large`` (Envoy's body-buffer overflow counter), over HTTP/1.1 and HTTP/2."""

from __future__ import annotations

import socket

import h2.config
import h2.connection
import h2.events
import pytest

from proxy_util import (ENVOY, Envoy, HttpBackend, Pyproxy, bootstrap, cluster, free_port, http_listener, raw, route,
                        route_config, with_fresh_ports)

pytestmark = pytest.mark.skipif(not ENVOY, reason="envoy not installed")


def _h2_request(port, extra):
    """'200' when answered, 'reset' when the stream is reset."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, validate_outbound_headers=False))
    try:
        c.initiate_connection()
        hs = [(":method", "GET"), (":path", "/"), (":scheme", "http"), (":authority", "x")]
        hs += [("x-h%d" % i, "v") for i in range(extra)]
        c.send_headers(1, hs, end_stream=True)
        s.sendall(c.data_to_send())
        while True:
            d = s.recv(65536)
            if not d:
                return "closed"
            for ev in c.receive_data(d):
                if isinstance(ev, h2.events.ResponseReceived):
                    return dict(ev.headers)[b":status"].decode()
                if isinstance(ev, h2.events.StreamReset):
                    return "reset"
            s.sendall(c.data_to_send())
    finally:
        s.close()


def _run(cls):
    be = HttpBackend()
    try:
        bs = bootstrap([http_listener(free_port(), route_config([route("/", "b")]), stat_prefix="in")],
                       [cluster("b", [be.port])])
        with cls(with_fresh_ports(bs)) as p:
            out = {"h2 96": _h2_request(p.port, 96), "h2 98": _h2_request(p.port, 98),
                   "h2 120": _h2_request(p.port, 120)}
            many = b"".join(b"x-h%d: v\r\n" % i for i in range(120))
            out["h1 120"] = raw(p.port, b"GET / HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n")[:12]
            out["rq_too_large"] = p.stats().get("http.in.downstream_rq_too_large", 0)
    finally:
        be.close()
    return out


def test_header_count_limits_like_envoy():
    px, env = _run(Pyproxy), _run(Envoy)
    assert env["h2 96"] == "200" and env["h2 98"] == "reset", env  # (the reference itself)
    assert px == env, (px, env)
