"""grpc_stats keeps per-status counters only for gRPC's 17 codes: an upstream sending arbitrary
``grpc-status`` values cannot grow the stats. Known codes are counted as Envoy counts them (same
names, compared with Envoy on the same bootstrap)."""

from __future__ import annotations

import pytest

from proxy_util import (ENVOY, Envoy, HttpBackend, Pyproxy, bootstrap, cluster, free_port, http_listener,
                        request, route_config, simple_response)

GRPC_STATS = "type.googleapis.com/envoy.extensions.filters.http.grpc_stats.v3.FilterConfig"
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"


def _backend():
    def handler(req, sock):
        st = req.header("x-st", "")
        return simple_response(200, b"", [("content-type", "application/grpc"), ("grpc-status", st)])
    return HttpBackend(handler)


def _bs(port, be_port):
    rc = route_config([{"match": {"prefix": "/"}, "route": {"cluster": "be"}}])
    filters = [{"name": "envoy.filters.http.grpc_stats", "typed_config": {"@type": GRPC_STATS}},
               {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}}]
    return bootstrap([http_listener(port, rc, http_filters=filters)], [cluster("be", [be_port])])


def _grpc_stats(px):
    return {k: v for k, v in px.stats().items() if k.startswith("cluster.be.grpc.")}


KNOWN = ["0", "5", "14", "16"]
HOSTILE = ["17", "999", "abc", "-1", "03", "x" * 200] + ["9%04d" % i for i in range(300)]


def test_unknown_statuses_make_no_counters():
    with _backend() as be:
        port = free_port()
        with Pyproxy(_bs(port, be.port)) as px:
            for st in KNOWN + HOSTILE:
                assert request(port, "POST", "/svc.S/m", headers={"content-type": "application/grpc",
                                                                  "x-st": st})[0] == 200
            got = _grpc_stats(px)
    n = len(KNOWN) + len(HOSTILE)
    assert got == {"cluster.be.grpc.0": 1, "cluster.be.grpc.5": 1, "cluster.be.grpc.14": 1,
                   "cluster.be.grpc.16": 1, "cluster.be.grpc.success": 1,
                   "cluster.be.grpc.failure": n - 1, "cluster.be.grpc.total": n}


@pytest.mark.skipif(ENVOY is None, reason="envoy binary not on PATH")
def test_known_statuses_counted_as_envoy():
    out = {}
    with _backend() as be:
        for kind in (Pyproxy, Envoy):
            port = free_port()
            with kind(_bs(port, be.port)) as px:
                for st in KNOWN + ["0", "14"]:
                    request(port, "POST", "/svc.S/m", headers={"content-type": "application/grpc", "x-st": st})
                out[kind.kind] = _grpc_stats(px)
    assert out["pyproxy"] == out["envoy"]
