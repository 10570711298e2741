"""Fault drills around the control plane, each bounded in time: reconnect paced by the bootstrap's
retry_back_off (measured against Envoy), and the control plane gone for a while (60 s by default,
``PYPROXY_DRILL_CP_DOWN_S``) with traffic flowing, then reconnect and resync."""

from __future__ import annotations

import os
import threading
import time

import pytest

from test_xds_e2e_helpers import (  # noqa: F401 (env is a fixture)
    env, ENVOY, CLUSTER, ENDPOINT, LISTENER, ROUTE, bootstrap, cla, dynamic_names, eds_cluster,
    free_port, get, http_listener, rds_route, try_get, wait_for)
from xds_util import ControlPlaneProcess, write_json

CP_DOWN_S = float(os.environ.get("PYPROXY_DRILL_CP_DOWN_S", "60"))


def _boot(port, base=None, cap=None):
    boot = bootstrap("GRPC", port=port)
    eg = boot["dynamic_resources"]["ads_config"]["grpc_services"][0]["envoy_grpc"]
    if base is None:
        del eg["retry_policy"]            # Envoy's defaults: 0.5 s base, 30 s cap
    else:
        eg["retry_policy"] = {"retry_back_off": {"base_interval": base, "max_interval": cap}}
    return boot


def _connected(px):
    return px.stats("control_plane")["control_plane.connected_state"] == 1


def _reconnect_times(env, kind, cfg_dir, boot_kw, downs):
    """Kill the control plane, keep it down ``d`` seconds, restart it on the same port; returns the
    seconds from its restart to the proxy's ``connected_state`` 1, for each ``d``."""
    port = free_port()
    cpp = ControlPlaneProcess(cfg_dir, os.path.join(env.dir, "st-%s.json" % kind), port=port).start()
    try:
        px = env.proxy(_boot(port, **boot_kw), cwd=os.path.join(env.dir, kind),
                       binary=ENVOY if kind == "envoy" else None)
        wait_for(lambda: px.ready() == "LIVE", 15, "LIVE")
        out = []
        for d in downs:
            cpp.kill()
            wait_for(lambda: not _connected(px), 10, "disconnected")
            time.sleep(d)
            cpp.start()
            t0 = time.monotonic()
            wait_for(lambda: _connected(px), 20, "reconnected", interval=0.01)
            out.append(time.monotonic() - t0)
        st = px.stats("update_failure|update_attempt")
        px.kill()
        return out, st
    finally:
        cpp.kill()


def test_reconnect_follows_retry_back_off(env):
    """With retry_back_off 0.1 s / 0.4 s the proxy is back within the cap of the control plane's
    return, however long it was away (gRPC's own channel backoff, 1 s growing to 120 s, must not
    stand in between); each failed attempt counts update_failure on CDS and LDS, as Envoy's."""
    a = env.backend("A")
    cfg = os.path.join(env.dir, "cfg")
    os.makedirs(cfg)
    write_json(os.path.join(cfg, "all.json"), [eds_cluster("c1"), cla("c1", a.port),
                                               http_listener("l1", 0, rds="r1"), rds_route("r1", ("/", "c1"))])
    results = {}
    for kind in ["pyproxy"] + (["envoy"] if ENVOY else []):
        results[kind] = _reconnect_times(env, kind, cfg, {"base": "0.1s", "cap": "0.4s"}, [0.5, 2.0, 4.0])
    print("reconnect seconds after the control plane is back (0.1 s/0.4 s backoff):",
          {k: [round(x, 2) for x in v[0]] for k, v in results.items()})
    times, st = results["pyproxy"]
    # the cap, plus the control plane's own start and the stats poll
    assert max(times) < 1.0, times
    for k in ("cluster_manager.cds.", "listener_manager.lds."):
        assert st[k + "update_failure"] >= 3, st           # at least once per outage
        assert st[k + "update_attempt"] > st[k + "update_failure"], st
    if "envoy" in results:
        est = results["envoy"][1]
        assert est["cluster_manager.cds.update_failure"] >= 3


def test_default_backoff_is_envoys():
    """Without retry_back_off the pacing is Envoy's default: full jitter below 0.5 s doubling to 30 s."""
    from pyproxy.xds.sources import backoff as _backoff
    from envoy.config.core.v3 import grpc_service_pb2
    gs = grpc_service_pb2.GrpcService()
    gs.envoy_grpc.cluster_name = "xds-grpc"
    assert _backoff(gs) == {}          # the client's defaults
    from pyproxy.xds_client import XdsClient
    from xds_util import RecordingHandler, node
    c = XdsClient(target="127.0.0.1:1", node=node(), api_type="GRPC", handler=RecordingHandler())
    assert (c.initial_backoff, c.max_backoff) == (0.5, 30.0)
    gs.envoy_grpc.retry_policy.retry_back_off.base_interval.FromMilliseconds(200)
    assert _backoff(gs) == {"initial_backoff": 0.2, "max_backoff": 2.0}


class _Traffic:
    """A client thread sending a request every ``interval`` seconds; counts failures."""

    def __init__(self, port, interval=0.02):
        self.port = port
        self.interval = interval
        self.ok = 0
        self.failed = []
        self.bodies = set()
        self.stop_ev = threading.Event()
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self):
        while not self.stop_ev.is_set():
            st, body, _ = try_get(self.port, timeout=5)
            if st == 200:
                self.ok += 1
                self.bodies.add(body.split()[0])
            else:
                self.failed.append((st, body[:100]))
            self.stop_ev.wait(self.interval)

    def stop(self):
        self.stop_ev.set()
        self.t.join(10)


def test_control_plane_gone_traffic_unaffected_then_resync(env):
    """The control plane is killed and stays away CP_DOWN_S seconds: every request meanwhile is
    served, the proxy stays LIVE; the config changed while it was away is taken on reconnect."""
    a, b = env.backend("A"), env.backend("B")
    p1 = free_port()
    cfg = os.path.join(env.dir, "cfg")
    os.makedirs(cfg)
    write_json(os.path.join(cfg, "all.json"), [eds_cluster("c1"), cla("c1", a.port),
                                               http_listener("l1", p1, rds="r1"), rds_route("r1", ("/", "c1"))])
    port = free_port()
    cpp = ControlPlaneProcess(cfg, os.path.join(env.dir, "st.json"), port=port).start()
    traffic = None
    try:
        px = env.proxy(_boot(port, "0.5s", "2s"))
        wait_for(lambda: px.ready() == "LIVE", 15, "LIVE")
        traffic = _Traffic(p1)
        wait_for(lambda: traffic.ok >= 5, 5, "traffic flowing")
        cpp.kill()
        wait_for(lambda: not _connected(px), 5, "disconnected")
        t_end = time.monotonic() + CP_DOWN_S
        while time.monotonic() < t_end:
            assert px.ready() == "LIVE"
            time.sleep(min(1.0, max(0.0, t_end - time.monotonic())))
        served_while_down = traffic.ok
        write_json(os.path.join(cfg, "all.json"), [
            eds_cluster("c1"), cla("c1", a.port), eds_cluster("c2"), cla("c2", b.port),
            http_listener("l1", p1, rds="r1"), rds_route("r1", ("/", "c2"))])
        cpp.start()
        t0 = time.monotonic()
        wait_for(lambda: _connected(px), 5, "reconnected (cap 2 s)")
        reconnect_s = time.monotonic() - t0
        wait_for(lambda: "B" in traffic.bodies, 5, "traffic to follow the resynced route")
        traffic.stop()
        print("control plane down %.0f s: %d requests, %d failed; reconnect %.2f s after its return"
              % (CP_DOWN_S, traffic.ok, len(traffic.failed), reconnect_s))
        assert not traffic.failed, traffic.failed[:5]
        assert served_while_down > 10 * CP_DOWN_S      # ~50/s: traffic really flowed throughout
        names = dynamic_names(px.config_dump())
        assert set(names["clusters"]) == {"c1", "c2"}
        st = cpp.status()
        assert not st["nacks"] and len(st["streams"]) == 1
        assert px.stats("control_plane")["control_plane.connected_state"] == 1
    finally:
        if traffic is not None:
            traffic.stop()
        cpp.kill()


def _churn_cla(name, real_ports, fake_base, n_total):
    """A ClusterLoadAssignment of ``n_total`` endpoints: the real backends in priority 0, the rest
    unroutable placeholders (127.1.x.y:9, never chosen while priority 0 is healthy) in priority 1,
    numbered from ``fake_base`` so each push changes which of them exist."""
    def ep(addr, port):
        return {"endpoint": {"address": {"socket_address": {"address": addr, "port_value": port}}}}
    fakes = []
    for i in range(fake_base, fake_base + n_total - len(real_ports)):
        i %= 60000
        fakes.append(ep("127.1.%d.%d" % (i // 250, i % 250 + 1), 9))
    return {"@type": "ClusterLoadAssignment", "cluster_name": name, "endpoints": [
        {"priority": 0, "lb_endpoints": [ep("127.0.0.1", p) for p in real_ports]},
        {"priority": 1, "lb_endpoints": fakes}]}


def test_eds_churn_10k_endpoints_while_serving(env):
    """10,000 endpoints pushed over delta EDS again and again while traffic flows: each push
    changes 2,000 of them and swaps one of the real backends; no request fails, and the time from
    the push to pyproxy's ACK is reported."""
    backends = [env.backend("B%d" % i) for i in range(10)]
    ports = [b.port for b in backends]
    p1 = free_port()
    cp = env.cp()
    base = [eds_cluster("c1"), http_listener("l1", p1, rds="r1"), rds_route("r1", ("/", "c1"))]
    cp.set(base + [_churn_cla("c1", ports[:6], 0, 10000)])
    px = env.proxy(bootstrap("DELTA_GRPC", port=cp.port))
    wait_for(lambda: px.ready() == "LIVE", 20, "LIVE")
    traffic = [_Traffic(p1, interval=0.0) for _ in range(2)]
    try:
        wait_for(lambda: sum(t.ok for t in traffic) >= 20, 10, "traffic flowing")
        times = []
        for k in range(1, 9):
            real = [ports[(k + i) % len(ports)] for i in range(6)]      # one backend out, one in
            cp.set(base + [_churn_cla("c1", real, 2000 * k, 10000)])
            v = str(cp.cp.version)
            t0 = time.monotonic()
            wait_for(lambda: cp.acked_version(ENDPOINT) == v or cp.nacks(ENDPOINT), 30,
                     "EDS ACK of push %d" % k, interval=0.005)
            times.append(time.monotonic() - t0)
            assert not cp.nacks(ENDPOINT), cp.nacks(ENDPOINT)[-1]
        st = px.stats("cluster.c1.")
        served_before_stop = sum(t.ok for t in traffic)
        time.sleep(0.3)
    finally:
        for t in traffic:
            t.stop()
    failed = [f for t in traffic for f in t.failed]
    times.sort()
    print("EDS churn: 8 pushes of 10,000 endpoints (2,000 changed each), push->ACK median %.3f s, "
          "max %.3f s; %d requests, %d failed" % (times[len(times) // 2], times[-1],
                                                  served_before_stop, len(failed)))
    assert not failed, failed[:5]
    assert st["cluster.c1.membership_total"] == 10000
    assert st["cluster.c1.update_rejected"] == 0 and st["cluster.c1.update_success"] >= 9
    assert served_before_stop > 100
    seen = set().union(*(t.bodies for t in traffic))
    assert len(seen) >= 8, seen            # traffic followed the swapped backends
