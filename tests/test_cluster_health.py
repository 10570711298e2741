"""Host health as Envoy keeps it: EDS health_status, /clusters health flags (compared with Envoy),
the hosts a load balancer leaves out."""

from __future__ import annotations

import pytest

from proxy_util import (ENVOY, Envoy, HttpBackend, Pyproxy, bootstrap, free_port, health_flags, http_listener,
                        request, route, route_config, with_fresh_ports)

STATUSES = ["HEALTHY", "UNHEALTHY", "DRAINING", "TIMEOUT", "DEGRADED", "UNKNOWN"]


def _flags(px) -> dict:
    """(cluster, host) -> health_flags from the text /clusters."""
    return health_flags(px.admin_port)


def _eds_cluster_bootstrap(ports, statuses):
    eps = [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}},
            "health_status": st} for p, st in zip(ports, statuses)]
    c = {"name": "c", "type": "STATIC", "connect_timeout": "1s",
         "load_assignment": {"cluster_name": "c", "endpoints": [{"lb_endpoints": eps}]}}
    return bootstrap([http_listener(free_port(), route_config([route("/", "c")]))], [c])


def test_health_flags_of_eds_statuses_as_envoy():
    ports = [free_port() for _ in STATUSES]
    bs = _eds_cluster_bootstrap(ports, STATUSES)
    with Pyproxy(bs) as px:
        mine = _flags(px)
    assert mine[("c", "127.0.0.1:%d" % ports[0])] == "healthy"
    assert mine[("c", "127.0.0.1:%d" % ports[1])] == "/failed_eds_health"
    assert all(len(v) < 40 for v in mine.values())  # not one character at a time
    if not ENVOY:
        pytest.skip("envoy binary not available")
    with Envoy(with_fresh_ports(bs)) as ev:
        theirs = _flags(ev)
    assert mine == theirs


def test_unhealthy_eds_hosts_get_no_traffic():
    """UNHEALTHY, DRAINING and TIMEOUT endpoints are out of rotation. (2 healthy of 6 is 46 % of
    the load at overprovisioning 1.4: the DEGRADED host takes part of the rest.)"""
    bes = [HttpBackend(name="be%d" % i) for i in range(len(STATUSES))]
    try:
        bs = _eds_cluster_bootstrap([b.port for b in bes], STATUSES)
        with Pyproxy(bs) as px:
            seen = set()
            for _ in range(60):
                st, h, _ = request(px.port, "GET", "/")
                assert st == 200
                seen.add(h["x-backend"])
        assert {"be0", "be5"} <= seen and not seen & {"be1", "be2", "be3"}
    finally:
        for b in bes:
            b.close()
