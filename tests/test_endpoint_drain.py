"""An endpoint removed by EDS: requests in flight to it complete, its idle pooled connections are
closed, and no new request goes to it."""

from __future__ import annotations

import time
import threading

from test_xds_e2e_helpers import (  # noqa: F401 (env is a fixture)
    ENDPOINT, LISTENER, bootstrap, cla, eds_cluster, env, free_port, get, http_listener,
    route_config, try_get, wait_for)


def _established(port: int) -> int:
    """TCP connections established to 127.0.0.1:port (the proxy's upstream connections), from
    /proc/net/tcp (state 01 = ESTABLISHED, remote port in hex)."""
    n = 0
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            parts = line.split()
            if parts[3] == "01" and int(parts[2].rpartition(":")[2], 16) == port:
                n += 1
    return n


def test_removed_endpoint_drains(env):
    a, b = env.backend("A"), env.backend("B")
    p1 = free_port()
    cp = env.cp()
    lst = http_listener("l1", p1, route_config=route_config("r", ("/", "c1")))
    cp.set([eds_cluster("c1"), cla("c1", a.port, b.port), lst])
    px = env.proxy(bootstrap("DELTA_GRPC", port=cp.port))
    wait_for(lambda: px.ready() == "LIVE", 10, "LIVE")
    # warm both pools, then two slow requests in flight: round robin puts one on each host
    for _ in range(6):
        assert get(p1)[0] == 200
    results = []
    threads = [threading.Thread(target=lambda: results.append(try_get(p1, "/slow/1.5")), daemon=True)
               for _ in range(2)]
    for t in threads:
        t.start()
    wait_for(lambda: sum(1 for _, p in a.peers if p == "/slow/1.5") == 1 and
             sum(1 for _, p in b.peers if p == "/slow/1.5") == 1, 5, "a slow request on each host")
    assert _established(a.port) >= 1
    a_before = len(a.peers)

    cp.set([eds_cluster("c1"), cla("c1", b.port), lst])
    v = str(cp.cp.version)
    wait_for(lambda: cp.acked_version(ENDPOINT) == v, 8, "EDS ACK")
    # no new request to A; the idle connections to A are closed at once, the busy one stays
    for _ in range(10):
        st, body, _ = get(p1)
        assert st == 200 and body.startswith("B"), body
    assert len(a.peers) == a_before
    assert _established(a.port) == 1  # the one carrying the slow request
    for t in threads:
        t.join(5)
    assert sorted(r[0] for r in results) == [200, 200], results
    assert sorted(r[1] for r in results) == ["A /slow/1.5", "B /slow/1.5"]
    # ... and it is closed once its request completed
    wait_for(lambda: _established(a.port) == 0, 3, "the connection to A closed")
    assert _established(b.port) >= 1  # B's pool is untouched


def _switchable(name):
    from test_health_check import Switchable
    return Switchable(name)


def _hc_flags(px, key):
    st, body = px.admin("/clusters")
    for line in body.splitlines():
        p = line.split("::")
        if len(p) == 4 and p[0] == "c1" and p[1] == key and p[2] == "health_flags":
            return p[3]
    return None


def _pending_removal(env, kind):
    import os
    from test_xds_e2e_helpers import ENVOY
    a, b = _switchable("A"), _switchable("B")
    try:
        p1 = free_port()
        cp = env.cp()
        c = eds_cluster("c1")
        c["health_checks"] = [{"timeout": "0.5s", "interval": "0.1s", "unhealthy_threshold": 1,
                               "healthy_threshold": 1, "no_traffic_interval": "0.1s",
                               "http_health_check": {"path": "/healthz"}}]
        lst = http_listener("l1", p1, route_config=route_config("r", ("/", "c1")))
        cp.set([c, cla("c1", a.port, b.port), lst])
        px = env.proxy(bootstrap("DELTA_GRPC", port=cp.port), cwd=os.path.join(env.dir, kind),
                       binary=ENVOY if kind == "envoy" else None)
        wait_for(lambda: px.ready() == "LIVE", 10, "LIVE")
        ka = "127.0.0.1:%d" % a.port
        wait_for(lambda: _hc_flags(px, ka) == "healthy", 5, "A healthy")
        out = {}
        cp.set([c, cla("c1", b.port), lst])  # EDS drops A; A still passes its checks
        wait_for(lambda: _hc_flags(px, ka) == "/pending_dynamic_removal", 5, "A pending removal")
        time.sleep(1.1)  # (update_merge_window)
        out["served_while_pending"] = {get(p1)[2].get("x-backend") for _ in range(20)}
        a.hc_status = 503  # its check fails: it goes
        wait_for(lambda: _hc_flags(px, ka) is None, 5, "A removed")
        out["served_after"] = {get(p1)[2].get("x-backend") for _ in range(20)}
        return out
    finally:
        a.close()
        b.close()


def test_health_checked_endpoint_pending_dynamic_removal(env):
    """A health-checked EDS cluster keeps an endpoint EDS dropped while it passes its checks
    (/pending_dynamic_removal), and drops it when a check fails, as Envoy."""
    from test_xds_e2e_helpers import ENVOY
    mine = _pending_removal(env, "pyproxy")
    assert mine == {"served_while_pending": {"A", "B"}, "served_after": {"B"}}
    if ENVOY:
        assert _pending_removal(env, "envoy") == mine
