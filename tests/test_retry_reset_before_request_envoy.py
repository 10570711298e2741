"""``retry_on: reset-before-request`` side by side with Envoy (review finding F42): a connect failure
(the request never went out) is retried on the other host; a reset after the request was sent is
not. Cluster [a port nothing listens on, a live backend], round robin."""

from __future__ import annotations


import pytest

from proxy_util import (ENVOY, Envoy, HttpBackend, Pyproxy, bootstrap, cluster, free_port, get_close,
                        http_listener, route, route_config, until_close, with_fresh_ports)

pytestmark = pytest.mark.skipif(not ENVOY, reason="envoy not installed")
KEYS = ("cluster.b.upstream_rq_retry", "cluster.b.upstream_rq_retry_success", "cluster.b.upstream_rq_200",
        "cluster.b.upstream_cx_connect_fail")


def _close_after_read(req, sock):
    return "close" if req.path.startswith("/close") else None


def _status(port, path):
    return until_close(port, get_close(path), 6)[9:12].decode()


def _run(paths, handler=None):
    out = {}
    for name, cls in (("pyproxy", Pyproxy), ("envoy", Envoy)):
        be = HttpBackend(handler)
        dead = free_port()  # (nothing listens there)
        try:
            bs = bootstrap([http_listener(free_port(), route_config([route("/", "b", timeout="5s", retry_policy={
                "retry_on": "reset-before-request", "num_retries": 2})]))],
                [cluster("b", [dead, be.port], connect_timeout="1s")])
            with cls(with_fresh_ports(bs)) as p:
                s0 = p.stats()
                statuses = [_status(p.port, path) for path in paths]
                s1 = p.stats()
                out[name] = (statuses, {k: s1.get(k, 0) - s0.get(k, 0) for k in KEYS}, len(be.requests))
        finally:
            be.close()
    return out


def test_connect_failures_are_retried():
    res = _run(["/a", "/b", "/c", "/d"])
    assert res["pyproxy"][0] == res["envoy"][0] == ["200"] * 4, res
    for name, (statuses, c, n) in res.items():
        # (how many first attempts hit the dead host depends on the round robin's start)
        assert c["cluster.b.upstream_rq_retry"] == c["cluster.b.upstream_rq_retry_success"] \
            == c["cluster.b.upstream_cx_connect_fail"] >= 2, (name, c)


def test_reset_after_the_request_went_out_is_not_retried():
    res = _run(["/close1", "/close2"], _close_after_read)
    for name, (statuses, counters, n) in res.items():
        assert statuses == ["503", "503"], (name, res)
    assert res["pyproxy"][2] == res["envoy"][2], res
