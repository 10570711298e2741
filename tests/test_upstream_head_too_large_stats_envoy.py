"""An HTTP/1.1 upstream response head over the limit (one 100 KB header, 150 headers), side by side
with Envoy (review finding F61): the same 502, and the cluster counts it as
``upstream_cx_protocol_error`` (a stock alert metric), not ``upstream_rq_rx_reset``."""

from __future__ import annotations

import pytest

from proxy_util import (ENVOY, Envoy, HttpBackend, Pyproxy, bootstrap, cluster, free_port, http_listener, raw,
                        route, route_config, simple_response, with_fresh_ports)

pytestmark = pytest.mark.skipif(not ENVOY, reason="envoy not installed")
KEYS = ("upstream_cx_protocol_error", "upstream_rq_rx_reset", "upstream_rq_5xx", "upstream_cx_destroy_local")


def _handler(req, sock):
    if req.path == "/big":
        return simple_response(200, b"ok", [("x-big", "a" * 100 * 1024)])
    return simple_response(200, b"ok", [("x-h%d" % i, "v") for i in range(150)])


def _run(cls):
    with HttpBackend(_handler) as be:
        bs = bootstrap([http_listener(free_port(), route_config([route("/", "b")]))], [cluster("b", [be.port])])
        with cls(with_fresh_ports(bs)) as p:
            codes = [raw(p.port, b"GET %s HTTP/1.1\r\nHost: x\r\nconnection: close\r\n\r\n" % path, timeout=5)[9:12]
                     for path in (b"/big", b"/many")]
            st = p.stats()
    return codes, {k: st.get("cluster.b." + k, 0) for k in KEYS}


def test_upstream_head_too_large_counted_like_envoy():
    px, env = _run(Pyproxy), _run(Envoy)
    assert env == ([b"502", b"502"], {"upstream_cx_protocol_error": 2, "upstream_rq_rx_reset": 0,
                                      "upstream_rq_5xx": 2, "upstream_cx_destroy_local": 2}), env
    assert px == env, (px, env)
