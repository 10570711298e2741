"""What removed clusters and unused ORIGINAL_DST hosts held is freed: a cluster removed over xDS
leaves /stats (as in Envoy; a cluster whose name merely starts with the same text keeps its stats),
and an ORIGINAL_DST host no request used for ``cleanup_interval`` is dropped with its pool (its idle
upstream connection closes), while a host in use keeps its connection."""

from __future__ import annotations

import time

import pytest

from proxy_util import HttpBackend, Pyproxy, bootstrap, free_port, http_listener, request, route_config
from test_xds_e2e_helpers import (  # noqa: F401 (env is a fixture)
    CLUSTER, ENVOY, cla, eds_cluster, env, get, http_listener as xds_http_listener, make_cp, route_config as
    xds_route_config, wait_for, xds_bootstrap)


@pytest.mark.parametrize("binary", [None] + ([ENVOY] if ENVOY else []), ids=["pyproxy", "envoy"][:1 + bool(ENVOY)])
def test_removed_cluster_stats_vanish(env, binary):
    a = env.backend("A")
    p1 = free_port()
    cp = make_cp(env, "tcp")
    lis = xds_http_listener("l1", p1, route_config=xds_route_config("r", ("/x", "c1.x"), ("/", "c1")))
    cp.set([eds_cluster("c1"), cla("c1", a.port), eds_cluster("c1.x"), cla("c1.x", a.port), lis])
    px = env.proxy(xds_bootstrap(env, cp, "GRPC", "tcp"), binary=binary)
    wait_for(lambda: px.ready() == "LIVE", 10, "LIVE")
    assert get(p1, "/")[0] == 200 and get(p1, "/x")[0] == 200
    st = px.stats()
    assert st["cluster.c1.upstream_rq_total"] == 1 and st["cluster.c1.x.upstream_rq_total"] == 1
    lis2 = xds_http_listener("l1", p1, route_config=xds_route_config("r", ("/", "c1.x")))
    cp.set([eds_cluster("c1.x"), cla("c1.x", a.port), lis2])
    wait_for(lambda: px.stats().get("cluster_manager.cluster_removed") == 1, 10, "c1 removed")
    wait_for(lambda: not any(k.startswith("cluster.c1.") and not k.startswith("cluster.c1.x.")
                             for k in px.stats()), 5, "c1's stats gone")
    st = px.stats()
    assert st["cluster.c1.x.upstream_rq_total"] == 1
    # added again: its stats start from nothing
    cp.set([eds_cluster("c1"), cla("c1", a.port), eds_cluster("c1.x"), cla("c1.x", a.port), lis])
    wait_for(lambda: "cluster.c1.upstream_rq_total" in px.stats(), 10, "c1 back")
    assert px.stats()["cluster.c1.upstream_rq_total"] == 0


def test_original_dst_hosts_are_reaped_after_cleanup_interval():
    a, b = HttpBackend(name="A"), HttpBackend(name="B")
    try:
        port = free_port()
        rc = route_config([{"match": {"prefix": "/"}, "route": {"cluster": "odst"}}])
        odst = {"name": "odst", "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED",
                "connect_timeout": "1s", "cleanup_interval": "1s",
                "original_dst_lb_config": {"use_http_header": True}}
        with Pyproxy(bootstrap([http_listener(port, rc)], [odst])):
            def hit(be):
                st, _, body = request(port, "GET", "/", headers={
                    "x-envoy-original-dst-host": "127.0.0.1:%d" % be.port})
                assert st == 200 and body.startswith(be.name.encode())
            hit(a)
            hit(b)
            wait_for(lambda: len(a.socks) == 1 and len(b.socks) == 1, 3, "one upstream connection each")
            # B stays in use; A is not used again
            end = time.monotonic() + 3.0  # past two cleanup passes
            while time.monotonic() < end:
                hit(b)
                time.sleep(0.1)
            assert len(a.socks) == 0, "A's host was not reaped: its idle connection is still open"
            assert len(b.socks) == 1 and b.connections == 1  # in use: kept, the same connection
            hit(a)  # reaped hosts come back on demand
            assert a.connections == 2
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("binary", [None] + ([ENVOY] if ENVOY else []), ids=["pyproxy", "envoy"][:1 + bool(ENVOY)])
def test_removed_listener_stats_vanish_after_drain(env, binary):
    a = env.backend("A")
    p1, p2 = free_port(), free_port()
    cp = make_cp(env, "tcp")
    l1 = xds_http_listener("l1", p1, route_config=xds_route_config("r1", ("/", "c1")))
    l2 = xds_http_listener("l2", p2, route_config=xds_route_config("r2", ("/", "c1")))
    cp.set([eds_cluster("c1"), cla("c1", a.port), l1, l2])
    px = env.proxy(xds_bootstrap(env, cp, "GRPC", "tcp"), binary=binary, drain_time=1)
    wait_for(lambda: px.ready() == "LIVE", 10, "LIVE")
    assert get(p1, "/")[0] == 200 and get(p2, "/")[0] == 200
    n1, n2 = "listener.127.0.0.1_%d." % p1, "listener.127.0.0.1_%d." % p2
    st = px.stats()
    assert st[n1 + "downstream_cx_total"] == 1 and st[n2 + "downstream_cx_total"] == 1
    cp.set([eds_cluster("c1"), cla("c1", a.port), l2])
    wait_for(lambda: px.stats().get("listener_manager.listener_removed") == 1, 10, "l1 removed")
    wait_for(lambda: not any(k.startswith(n1) for k in px.stats()), 8, "l1's stats gone after the drain")
    st = px.stats()
    assert st[n2 + "downstream_cx_total"] == 1
    # its HTTP connection manager's stats go too; l2's stay
    assert not any(k.startswith("http.l1.") for k in st) and st["http.l2.downstream_rq_2xx"] == 1
    # a modified listener keeps its stats once the old version has drained
    l2b = xds_http_listener("l2", p2, route_config=xds_route_config("r2b", ("/", "c1")))
    cp.set([eds_cluster("c1"), cla("c1", a.port), l2b])
    wait_for(lambda: px.stats().get("listener_manager.listener_modified") == 1, 10, "l2 modified")
    time.sleep(2.0)  # past the drain time
    assert get(p2, "/")[0] == 200
    st = px.stats()
    assert st["http.l2.downstream_rq_2xx"] == 2 and st[n2 + "downstream_cx_total"] == 2


def test_removed_cluster_closes_its_pool_and_stops_its_health_checks(env):
    """A cluster removed over xDS takes its idle upstream connections and its health-check timer
    with it: the backend sees its connections close and no more checks arrive."""
    a = HttpBackend(name="A")
    try:
        _removed_cluster_pool_and_checks(env, a)
    finally:
        a.close()


def _removed_cluster_pool_and_checks(env, a):
    p1 = free_port()
    cp = make_cp(env, "tcp")
    c1 = dict(eds_cluster("c1"), health_checks=[{
        "timeout": "1s", "interval": "0.2s", "no_traffic_interval": "0.2s", "unhealthy_threshold": 2, "healthy_threshold": 1,
        "http_health_check": {"path": "/healthz"}}])
    lis = xds_http_listener("l1", p1, route_config=xds_route_config("r", ("/", "c1")))
    cp.set([c1, cla("c1", a.port), lis])
    px = env.proxy(xds_bootstrap(env, cp, "GRPC", "tcp"))
    wait_for(lambda: px.ready() == "LIVE", 10, "LIVE")
    assert get(p1, "/")[0] == 200

    def checks():
        return sum(1 for r in list(a.requests) if r.path == "/healthz")
    wait_for(lambda: checks() >= 2, 5, "health checks arriving")
    assert len(a.socks) >= 1  # the request's pooled connection (and the checker's) stay open
    cp.set([eds_cluster("c2"), cla("c2", a.port),
            xds_http_listener("l1", p1, route_config=xds_route_config("r", ("/", "c2")))])
    wait_for(lambda: px.stats().get("cluster_manager.cluster_removed") == 1, 10, "c1 removed")
    wait_for(lambda: len(a.socks) == 0, 5, "c1's upstream connections closed")
    n = checks()
    time.sleep(1.0)  # five intervals
    assert checks() == n, "health checks of a removed cluster still run"
