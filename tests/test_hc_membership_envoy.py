"""Active health checks' initial round, side by side with Envoy (review finding F37): hosts that pass
their first check count in ``cluster.<c>.membership_healthy`` (pyproxy left the gauge at 0 until a later
health change)."""

from __future__ import annotations

import time

import pytest

from proxy_util import (ENVOY, Envoy, HttpBackend, Pyproxy, bootstrap, cluster, free_port, http_listener, route,
                        route_config, simple_response, with_fresh_ports)

pytestmark = pytest.mark.skipif(not ENVOY, reason="envoy not installed")
HC = [{"timeout": "1s", "interval": "0.3s", "no_traffic_interval": "0.3s", "unhealthy_threshold": 2,
       "healthy_threshold": 1, "http_health_check": {"path": "/healthz"}}]


def _handler(i):
    def h(req, sock):
        if req.path == "/healthz":
            return simple_response(503 if i == 0 else 200, b"hc")
        return simple_response(200, b"b%d" % i)
    return h


def _membership(cls):
    bes = [HttpBackend(_handler(i)) for i in range(2)]
    try:
        bs = bootstrap([http_listener(free_port(), route_config([route("/", "b")]))],
                       [cluster("b", [b.port for b in bes], health_checks=HC)])
        with cls(with_fresh_ports(bs)) as p:
            deadline = time.monotonic() + 15
            st = p.stats()
            # (both hosts have had at least two checks: the initial round is over on both proxies)
            while time.monotonic() < deadline and st.get("cluster.b.health_check.attempt", 0) < 6:
                time.sleep(0.1)
                st = p.stats()
            time.sleep(0.3)
            st = p.stats()
            return (st.get("cluster.b.membership_total"), st.get("cluster.b.membership_healthy"),
                    st.get("cluster.b.membership_degraded"), st.get("cluster.b.membership_excluded"))
    finally:
        for b in bes:
            b.close()


def test_initial_health_check_round_counts_in_membership_healthy():
    px, ev = _membership(Pyproxy), _membership(Envoy)
    assert ev[:2] == (2, 1), ev
    assert px == ev, (px, ev)
