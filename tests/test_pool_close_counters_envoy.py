"""Upstream connections closed by the pool's own limits are counted as Envoy counts them (review
finding F41): ``upstream_cx_max_requests`` (cluster max_requests_per_connection, Istio's
DestinationRule maxRequestsPerConnection) and ``upstream_cx_idle_timeout`` (idle_timeout, Istio's
idleTimeout), HTTP/1.1 and HTTP/2 upstreams, side by side with Envoy. Event-driven: each idle
close is awaited (upstream_cx_destroy_local) before the next request."""

from __future__ import annotations

import time

import pytest

from h2_upstream_util import ThreadedH2Upstream
from proxy_util import (ENVOY, Envoy, HttpBackend, Pyproxy, bootstrap, cluster, free_port, http_listener, request,
                        route, route_config)

pytestmark = pytest.mark.skipif(not ENVOY, reason="envoy not installed")
HPO = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
KEYS = ("cluster.b.upstream_cx_total", "cluster.b.upstream_cx_max_requests", "cluster.b.upstream_cx_idle_timeout",
        "cluster.b.upstream_cx_destroy_local")


def _bs(port, be_port, common, h2):
    proto = {"http2_protocol_options": {}} if h2 else {"http_protocol_options": {}}
    return bootstrap([http_listener(port, route_config([route("/", "b", timeout="5s")]))],
                     [cluster("b", [be_port], typed_extension_protocol_options={HPO: {
                         "@type": "type.googleapis.com/" + HPO, "common_http_protocol_options": common,
                         "explicit_http_config": proto}})])


def _wait(p, key, n):
    end = time.monotonic() + 5
    while time.monotonic() < end and p.stats().get(key, 0) < n:
        time.sleep(0.05)


def _run(kind, common, h2, n, idle):
    be = ThreadedH2Upstream() if h2 else HttpBackend()
    try:
        port = free_port()
        with kind(_bs(port, be.port, common, h2)) as p:
            for i in range(n):
                assert request(port, "GET", "/%d" % i)[0] == 200
                if idle:  # (the idle close of this request's connection, before the next request)
                    _wait(p, "cluster.b.upstream_cx_idle_timeout", i + 1)
            _wait(p, "cluster.b.upstream_cx_destroy_local", n if idle else n // 2)
            st = p.stats()
            return {k: st.get(k, 0) for k in KEYS}
    finally:
        be.close()


@pytest.mark.parametrize("h2", [False, True], ids=["h1", "h2"])
def test_max_requests_per_connection_counted(h2):
    px, ev = (_run(k, {"max_requests_per_connection": 2}, h2, 6, False) for k in (Pyproxy, Envoy))
    assert ev["cluster.b.upstream_cx_max_requests"] == 3, ev
    assert px == ev, (px, ev)


@pytest.mark.parametrize("h2", [False, True], ids=["h1", "h2"])
def test_idle_timeout_counted(h2):
    px, ev = (_run(k, {"idle_timeout": "0.3s"}, h2, 3, True) for k in (Pyproxy, Envoy))
    assert ev["cluster.b.upstream_cx_idle_timeout"] == 3, ev
    assert px == ev, (px, ev)
