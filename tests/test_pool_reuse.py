"""Upstream HTTP/1.1 connection reuse (cluster/pool.py): when a connection whose response is
complete goes back to its pool and when it is closed instead, the same through pyproxy and Envoy."""

from __future__ import annotations

import http.client

import pytest

from proxy_util import HttpBackend, one_route_bootstrap, proxies, simple_response

HPO = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def _opts(**common):
    return {HPO: {"@type": "type.googleapis.com/" + HPO, "common_http_protocol_options": common,
                  "explicit_http_config": {"http_protocol_options": {}}}}


@pytest.mark.parametrize("proxy", proxies(), ids=lambda c: c.kind)
def test_max_requests_per_connection_closes_the_connection_after_its_last_request(proxy):
    """``max_requests_per_connection: 2``: five requests in a row on one downstream connection use
    upstream connections 1, 1, 2, 2, 3; each is closed after its second response."""
    be = HttpBackend()
    try:
        bs, port = one_route_bootstrap([be.port], cluster_extra={
            "typed_extension_protocol_options": _opts(max_requests_per_connection=2)})
        with proxy(bs) as px:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            try:
                for i in range(5):
                    c.request("GET", "/m%d" % i, headers={"Host": "a"})
                    r = c.getresponse()
                    assert r.status == 200 and r.read().startswith(b"b GET /m%d" % i)
            finally:
                c.close()
            assert [r.conn_id for r in be.requests] == [1, 1, 2, 2, 3], proxy.kind
            st = px.stats()
            assert st["cluster.b.upstream_cx_total"] == 3
            assert st["cluster.b.upstream_rq_total"] == 5 and st["cluster.b.upstream_rq_200"] == 5
    finally:
        be.close()


def _close_after(req, sock):
    if req.path == "/close":
        return simple_response(200, b"bye", [("connection", "close")])
    return simple_response(200, b"ok")


@pytest.mark.parametrize("proxy", proxies(), ids=lambda c: c.kind)
def test_a_response_with_connection_close_is_not_reused(proxy):
    """An upstream answer with ``connection: close`` ends that connection's use: the next request
    opens another; a keep-alive answer is reused."""
    be = HttpBackend(_close_after)
    try:
        bs, port = one_route_bootstrap([be.port])
        with proxy(bs) as px:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            try:
                for path in ("/a", "/close", "/b", "/c"):
                    c.request("GET", path, headers={"Host": "a"})
                    r = c.getresponse()
                    assert r.status == 200
                    r.read()
            finally:
                c.close()
            assert [r.conn_id for r in be.requests] == [1, 1, 2, 2], proxy.kind
            assert px.stats()["cluster.b.upstream_cx_total"] == 2
    finally:
        be.close()
