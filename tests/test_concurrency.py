"""--concurrency N: N processes share the listeners; xDS and admin stay in the main one."""

from __future__ import annotations

import os
import time

from proxy_util import HttpBackend, Pyproxy, one_route_bootstrap, request
from test_xds_e2e_helpers import (  # noqa: F401 (env is a fixture)
    CLUSTER, ENDPOINT, LISTENER, ROUTE, body, cla, eds_cluster, env, free_port, http_listener,
    rds_route, wait_for, xds_bootstrap, make_cp)


def _children(pid: int) -> list:
    try:
        with open("/proc/%d/task/%d/children" % (pid, pid)) as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def test_two_processes_serve_and_stats_are_summed():
    be = HttpBackend()
    try:
        bs, port = one_route_bootstrap([be.port])
        with Pyproxy(bs, extra_args=["--concurrency", "2"]) as px:
            workers = _children(px.pid)
            assert len(workers) == 1, workers
            n = 60
            for _ in range(n):  # fresh connections: the kernel spreads them over both processes
                assert request(port, "GET", "/")[0] == 200
            # each process has its own upstream pool: more than one upstream connection means both served
            assert be.connections >= 2, be.connections
            deadline = time.time() + 5
            while time.time() < deadline and px.stats().get("http.ingress.downstream_rq_total", 0) < n:
                time.sleep(0.1)
            st = px.stats()
            assert st["http.ingress.downstream_rq_total"] == n
            assert st["cluster.b.upstream_rq_200"] == n
            assert st["server.concurrency"] == 2 and st["listener_manager.workers_started"] == 1
            px.proc.terminate()
            assert px.proc.wait(10) == 0
            deadline = time.time() + 5
            while time.time() < deadline and any(os.path.exists("/proc/%d" % w) for w in workers):
                time.sleep(0.05)
            assert not any(os.path.exists("/proc/%d/status" % w) and "Z" not in
                           open("/proc/%d/status" % w).read().split("State:")[1][:4] for w in workers)
    finally:
        be.close()


def test_xds_updates_reach_every_worker(env):
    a, b = env.backend("A"), env.backend("B")
    p1 = free_port()
    cp = make_cp(env, "tcp")
    base = [eds_cluster("c1"), cla("c1", a.port), eds_cluster("c2"), cla("c2", b.port),
            http_listener("l1", p1, rds="r1"), rds_route("r1", ("/", "c1"))]
    cp.set(base)
    px = env.proxy(xds_bootstrap(env, cp, "DELTA_GRPC", "tcp"), extra=("--concurrency", "2"))
    wait_for(lambda: px.ready() == "LIVE", 10, "LIVE")
    cp.wait_acked(CLUSTER, ENDPOINT, LISTENER, ROUTE)
    wait_for(lambda: all(body(p1) == "A" for _ in range(20)), 5, "every process to serve l1")
    assert len({pt for pt, _ in a.peers}) >= 2, "only one process served the pushed listener"
    # a route change must reach both processes: no request may still see the old route
    cp.set(base[:-1] + [rds_route("r1", ("/", "c2"))])
    wait_for(lambda: body(p1) == "B", 5, "route change")
    time.sleep(0.3)
    assert [body(p1) for _ in range(40)] == ["B"] * 40


def test_config_update_stats_are_not_counted_per_worker(env):
    """cds/lds/rds update counters belong to the main process, as Envoy's main thread's."""
    a = env.backend("A")
    p1 = free_port()
    cp = make_cp(env, "tcp")
    cp.set([eds_cluster("c1"), cla("c1", a.port), http_listener("l1", p1, rds="r1"),
            rds_route("r1", ("/", "c1"))])
    px = env.proxy(xds_bootstrap(env, cp, "GRPC", "tcp"), extra=("--concurrency", "2"))
    wait_for(lambda: px.ready() == "LIVE", 10, "LIVE")
    wait_for(lambda: all(body(p1) == "A" for _ in range(10)), 5, "traffic")
    time.sleep(1.5)  # a worker stats report
    st = px.stats()
    assert st["cluster_manager.cds.update_success"] == 1
    assert st["listener_manager.lds.update_success"] == 1
    assert st["http.l1.rds.r1.update_success"] == 1
    assert st["cluster_manager.active_clusters"] == 2  # c1 and xds-grpc, not summed
