"""grpc_stats counts only calls whose path names a service and a method, side by side with Envoy
(review finding F36): ``application/grpc`` requests to ``/notgrpc`` or ``/a/b/c`` are not counted
(pyproxy counted them under the cluster's un-named ``grpc.*`` stats); empty path segments and the
query are skipped when the path is read (``//pkg.Svc/Ok?x=1`` is ``pkg.Svc``/``Ok``). Istio's shape
(emit_filter_state, stats_for_all_methods false) and stats_for_all_methods true."""

from __future__ import annotations

import pytest

from proxy_util import (ENVOY, Envoy, HttpBackend, Pyproxy, bootstrap, cluster, free_port, http_listener, request,
                        route_config, simple_response)

pytestmark = pytest.mark.skipif(not ENVOY, reason="envoy not installed")
GRPC_STATS = "type.googleapis.com/envoy.extensions.filters.http.grpc_stats.v3.FilterConfig"
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
PATHS = ["/pkg.Svc/Ok", "/notgrpc", "/a/b/c", "//pkg.Svc/Ok?x=1", "/pkg.Svc/Ok/", "/pkg.Svc/"]


def _bs(port, be_port, all_methods):
    rc = route_config([{"match": {"prefix": "/"}, "route": {"cluster": "be"}}])
    filters = [{"name": "envoy.filters.http.grpc_stats", "typed_config": {
                   "@type": GRPC_STATS, "emit_filter_state": True, "stats_for_all_methods": all_methods}},
               {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}}]
    return bootstrap([http_listener(port, rc, http_filters=filters)], [cluster("be", [be_port])])


@pytest.mark.parametrize("all_methods", [False, True])
def test_only_service_method_paths_are_counted(all_methods):
    def handler(req, sock):
        # (trailers-only: grpc-status in the headers of a bodiless response)
        return simple_response(200, b"", [("content-type", "application/grpc"), ("grpc-status", "0")])

    out = {}
    with HttpBackend(handler) as be:
        for kind in (Pyproxy, Envoy):
            port = free_port()
            with kind(_bs(port, be.port, all_methods)) as px:
                for path in PATHS:
                    assert request(port, "POST", path, body=b"\0\0\0\0\x01z",
                                   headers={"content-type": "application/grpc"})[0] == 200
                out[kind.kind] = {k: v for k, v in px.stats().items() if k.startswith("cluster.be.grpc.") and v}
    assert out["envoy"], out
    assert out["pyproxy"] == out["envoy"], out


def test_status_in_headers_of_a_response_with_a_body():
    """A response with ``grpc-status`` in its headers and a body (no trailers): Envoy's grpc_stats
    charges the headers' status (and counts the response's messages)."""
    def handler(req, sock):
        st = "0" if "Ok" in req.path else "14"
        return simple_response(200, b"\0\0\0\0\x01z\0\0\0\0\x01y", [("content-type", "application/grpc"),
                                                                    ("grpc-status", st)])

    out = {}
    with HttpBackend(handler) as be:
        for kind in (Pyproxy, Envoy):
            port = free_port()
            with kind(_bs(port, be.port, False)) as px:
                for path in ("/pkg.Svc/Ok", "/pkg.Svc/Ok", "/pkg.Svc/Fail"):
                    assert request(port, "POST", path, body=b"\0\0\0\0\x01z",
                                   headers={"content-type": "application/grpc"})[0] == 200
                out[kind.kind] = {k: v for k, v in px.stats().items() if k.startswith("cluster.be.grpc.") and v}
    assert out["envoy"].get("cluster.be.grpc.total") == 3, out
    assert out["pyproxy"] == out["envoy"], out
