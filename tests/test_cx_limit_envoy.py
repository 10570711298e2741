"""Cluster-wide ``max_connections`` below the number of endpoints (Istio's DestinationRule
``connectionPool.tcp.maxConnections`` on a service with more pods), side by side with Envoy (review
finding F40): a host whose pool has no connection still opens one at the limit (Envoy's
``tryCreateNewConnection``; ``upstream_cx_overflow`` is counted), instead of failing the request
with 503 UO. HTTP/1.1 and HTTP/2 upstreams, sequential and concurrent requests."""

from __future__ import annotations

import threading
import time

import pytest

from h2_upstream_util import ThreadedH2Upstream
from proxy_util import (ENVOY, Envoy, HttpBackend, Pyproxy, bootstrap, cluster, free_port, get_close,
                        http_listener, route, route_config, simple_response, until_close, with_fresh_ports)

pytestmark = pytest.mark.skipif(not ENVOY, reason="envoy not installed")
HPO = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
KEYS = ("cluster.b.upstream_cx_total", "cluster.b.upstream_cx_overflow", "cluster.b.upstream_rq_2xx",
        "cluster.b.upstream_rq_5xx", "cluster.b.upstream_rq_pending_overflow")


def _bs(ports, max_connections, h2=False):
    extra = {}
    if h2:
        extra["typed_extension_protocol_options"] = {HPO: {
            "@type": "type.googleapis.com/" + HPO, "explicit_http_config": {"http2_protocol_options": {}}}}
    return bootstrap([http_listener(free_port(), route_config([route("/", "b", timeout="5s")]))],
                     [cluster("b", ports, circuit_breakers={"thresholds": [{"max_connections": max_connections}]},
                              **extra)])


def _status(port, i):
    return until_close(port, get_close("/%d" % i))[9:12].decode()


def _run(make_backends, max_connections, h2, send):
    """For pyproxy and Envoy (fresh backends each): (statuses, counter deltas)."""
    out = {}
    for name, cls in (("pyproxy", Pyproxy), ("envoy", Envoy)):
        bes = make_backends()
        try:
            with cls(with_fresh_ports(_bs([b.port for b in bes], max_connections, h2))) as p:
                s0 = p.stats()
                statuses = send(p.port)
                s1 = p.stats()
                out[name] = (statuses, {k: s1.get(k, 0) - s0.get(k, 0) for k in KEYS})
        finally:
            for b in bes:
                b.close()
    return out


def _sequential(port):
    return [_status(port, i) for i in range(9)]


def test_h1_sequential_three_hosts_two_connections():
    res = _run(lambda: [HttpBackend() for _ in range(3)], 2, False, _sequential)
    assert res["pyproxy"] == res["envoy"], res
    assert res["pyproxy"][0] == ["200"] * 9, res
    assert res["pyproxy"][1]["cluster.b.upstream_cx_total"] == 3, res


def test_h2_sequential_three_hosts_two_connections():
    res = _run(lambda: [ThreadedH2Upstream() for _ in range(3)], 2, True, _sequential)
    assert res["pyproxy"] == res["envoy"], res
    assert res["pyproxy"][0] == ["200"] * 9, res


def _slow(req, sock):
    time.sleep(0.6)  # (the three requests overlap: each host's pool is busy or empty)
    return simple_response(200, b"ok")


def _concurrent(port):
    out = {}

    def one(i):
        out[i] = _status(port, i)

    ts = [threading.Thread(target=one, args=(i,)) for i in range(3)]
    for t in ts:
        t.start()
        time.sleep(0.05)
    for t in ts:
        t.join(8)
    return [out.get(i) for i in range(3)]


def test_h1_concurrent_three_hosts_one_connection():
    res = _run(lambda: [HttpBackend(_slow) for _ in range(3)], 1, False, _concurrent)
    assert res["pyproxy"][0] == res["envoy"][0] == ["200"] * 3, res
    assert res["pyproxy"][1] == res["envoy"][1], res
