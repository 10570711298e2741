"""End to end: a real pyproxy process driven over ADS by the project's control plane, with real
traffic through the pushed listeners to real backends (SotW and delta, TCP and unix socket)."""

from __future__ import annotations

import http.client
import json
import os
import threading
import time

import pytest

from test_xds_e2e_helpers import (  # noqa: F401 (env is a fixture)
    env, xds_bootstrap, make_cp, body, ENVOY, CLUSTER, ENDPOINT, LISTENER, ROUTE, bootstrap, cla,
    dump_section, dynamic_names, eds_cluster, free_port, get, http_listener, rds_route,
    route_config, try_get, wait_for)


@pytest.mark.parametrize("api,transport", [("GRPC", "tcp"), ("DELTA_GRPC", "uds"),
                                           ("GRPC", "uds"), ("DELTA_GRPC", "tcp")])
def test_push_traffic_update_nack_remove(env, api, transport):
    a, b, a2 = env.backend("A"), env.backend("B"), env.backend("A2")
    p1, p2 = free_port(), free_port()
    cp = make_cp(env, transport)
    l2 = http_listener("l2", p2, route_config=route_config("inline", ("/", "c2")))
    base = [eds_cluster("c1"), cla("c1", a.port), eds_cluster("c2"), cla("c2", b.port),
            http_listener("l1", p1, rds="r1"), l2, rds_route("r1", ("/b", "c2"), ("/", "c1"))]
    cp.set(base)
    px = env.proxy(xds_bootstrap(env, cp, api, transport))

    # -- initial push: ready, stats, traffic, config_dump
    wait_for(lambda: px.ready() == "LIVE", 10, "LIVE")
    cp.wait_acked(CLUSTER, ENDPOINT, LISTENER, ROUTE)
    st = px.stats()
    assert st["server.state"] == 0 and st["control_plane.connected_state"] == 1
    for k in ("cluster_manager.cds.", "listener_manager.lds.", "http.l1.rds.r1."):
        assert st[k + "update_success"] >= 1 and st[k + "update_rejected"] == 0, k
        assert st[k + "update_attempt"] >= 1 and st[k + "version"] != 0, k
    assert body(p1) == "A" and body(p1, "/b") == "B" and body(p2) == "B"
    dump = px.config_dump()
    names = dynamic_names(dump)
    v1 = str(cp.cp.version)
    assert names["clusters"] == {"c1": v1, "c2": v1} if api == "GRPC" else set(names["clusters"]) == {"c1", "c2"}
    assert set(names["listeners"]) == {"l1", "l2"} and set(names["routes"]) == {"r1"}
    assert not names["warming_clusters"] and not names["warming_listeners"]
    assert dump_section(dump, "ClustersConfigDump").get("version_info") == v1
    assert dump_section(dump, "ListenersConfigDump").get("version_info") == v1
    l2_updated = [e for e in dump_section(dump, "ListenersConfigDump")["dynamic_listeners"]
                  if e["name"] == "l2"][0]["active_state"]["last_updated"]
    assert l2_updated
    modified0 = (st.get("listener_manager.listener_modified", 0), st.get("cluster_manager.cluster_modified", 0))

    # -- route change: traffic follows
    cp.set(base[:-1] + [rds_route("r1", ("/a", "c1"), ("/", "c2"))])
    wait_for(lambda: body(p1) == "B", 5, "route change to take effect")
    assert body(p1, "/a") == "A"
    cp.wait_acked(ROUTE)

    # -- endpoint added: traffic reaches it, the existing host's upstream connection survives
    for _ in range(3):
        assert body(p1, "/a") == "A"
    a_ports = {pt for pt, _ in a.peers}
    assert len(a_ports) == 1, a.peers     # one pooled upstream connection so far
    n_a = len(a.peers)
    cp.set([base[0], cla("c1", a.port, a2.port)] + base[2:-1] + [rds_route("r1", ("/a", "c1"), ("/", "c2"))])
    seen = set()
    wait_for(lambda: seen.add(body(p1, "/a")) or "A2" in seen, 5, "new endpoint to get traffic")
    for _ in range(4):
        seen.add(body(p1, "/a"))
    assert seen == {"A", "A2"}
    assert len(a.peers) > n_a and {pt for pt, _ in a.peers} == a_ports, "pool to A did not survive"
    cp.wait_acked(ENDPOINT)

    # -- invalid resources NACKed; last good config stays; traffic unaffected
    st_before = px.stats()
    good_routes = rds_route("r1", ("/a", "c1"), ("/", "c2"))
    bad_route = rds_route("r1", ("/", "c1"))
    bad_route["virtual_hosts"][0]["routes"][0]["match"] = {"safe_regex": {"regex": "(["}}
    bad_listener = http_listener("l1", p1, rds="r1")
    bad_listener["filter_chains"][0]["filters"].insert(0, {
        "name": "bogus", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters."
                                                   "network.bogus.v3.Bogus"}})
    bad_cluster = eds_cluster("c3")
    bad_cluster["lb_policy"] = "CLUSTER_PROVIDED"
    snapshot = [base[0], cla("c1", a.port, a2.port), base[2], base[3], bad_cluster, bad_listener, l2,
                bad_route]
    cp.set(snapshot)
    wait_for(lambda: {n["type_url"] for n in cp.nacks()} >= {CLUSTER, LISTENER, ROUTE}, 8, "NACKs")
    by_type = {n["type_url"]: n for n in cp.nacks()}
    # Envoy's form: "Error adding/updating <kind>(s) <name>: <why>" for each rejected resource
    assert by_type[ROUTE]["error"].startswith("Error adding/updating route configuration(s) r1: ")
    assert "safe_regex" in by_type[ROUTE]["error"]
    assert by_type[LISTENER]["error"].startswith("Error adding/updating listener(s) l1: ")
    assert "bogus" in by_type[LISTENER]["error"].lower()
    assert by_type[CLUSTER]["error"].startswith("Error adding/updating cluster(s) c3: ")
    assert "lb_policy" in by_type[CLUSTER]["error"]
    for n in by_type.values():
        assert n["code"] != 0
    assert body(p1, "/a") in ("A", "A2") and body(p1) == "B" and body(p2) == "B"
    st = px.stats()
    for k in ("cluster_manager.cds.", "listener_manager.lds.", "http.l1.rds.r1."):
        assert st[k + "update_rejected"] == st_before[k + "update_rejected"] + 1, k
        assert st[k + "version"] == st_before[k + "version"], k
    dump = px.config_dump()
    names = dynamic_names(dump)
    assert set(names["clusters"]) == {"c1", "c2"}     # c3 not half-applied
    ls = {e["name"]: e for e in dump_section(dump, "ListenersConfigDump")["dynamic_listeners"]}
    es = ls["l1"]["error_state"]
    assert "bogus" in es["details"].lower() and es["last_update_attempt"]
    assert es["failed_configuration"]["name"] == "l1"
    assert "active_state" in ls["l1"] and "error_state" not in ls["l2"]
    rc = {e["route_config"]["name"]: e for e in dump_section(dump, "RoutesConfigDump")["dynamic_route_configs"]}
    assert "safe_regex" in rc["r1"]["error_state"]["details"]
    assert "regex" not in str(rc["r1"]["route_config"])     # the last good one is in force

    # -- fixed: accepted, error states cleared; then removal of a listener and a cluster
    # (delta: the server knows l1 was rejected and pyproxy kept the active l1, so re-serving that
    # same l1 sends nothing; SotW re-sends it)
    cp.set([base[0], cla("c1", a.port, a2.port), http_listener("l1", p1, rds="r1"),
            rds_route("r1", ("/a", "c1"), ("/gone", "c2"), ("/", "c1"))])
    cp.wait_acked(CLUSTER, LISTENER, ROUTE) if api == "GRPC" else cp.wait_acked(CLUSTER, ROUTE)
    wait_for(lambda: try_get(p2)[0] is None, 5, "l2 removed (connection refused)")
    assert body(p1, "/a") in ("A", "A2") and body(p1, "/") in ("A", "A2")
    st, text, _ = get(p1, "/gone")          # r1 still routes /gone to the removed c2
    assert st == 503, (st, text)
    dump = px.config_dump()
    names = dynamic_names(dump)
    assert set(names["clusters"]) == {"c1"} and set(names["listeners"]) == {"l1"}
    # as Envoy's: the listeners' error states are those of the latest LDS update (the fix, or in
    # delta the removal of l2), see test_xds_partial
    assert "error_state" not in str(dump_section(dump, "ListenersConfigDump"))
    assert "error_state" not in str(dump_section(dump, "RoutesConfigDump"))
    st = px.stats()
    assert st["cluster_manager.cluster_removed"] >= 1 and st["listener_manager.listener_removed"] >= 1
    # nothing was modified in place along the way (route/endpoint updates touch no listener/cluster)
    assert (st.get("listener_manager.listener_modified", 0), st.get("cluster_manager.cluster_modified", 0)) \
        == modified0
    assert px.alive()


@pytest.mark.parametrize("api", ["GRPC", "DELTA_GRPC"])
def test_warming_and_initial_fetch_timeout(env, api):
    """Clusters warm until their endpoints arrive, listeners until their routes arrive; /ready and
    server.state follow; a connection made to a warming listener is served once it is active.
    With a non-zero initial_fetch_timeout, warming ends without the resource."""
    a = env.backend("A")
    p1, p2 = free_port(), free_port()
    cp = env.cp()
    c1, l1 = eds_cluster("c1", timeout="0s"), http_listener("l1", p1, rds="r1", rds_timeout="0s")
    cp.set([c1, l1])
    px = env.proxy(bootstrap(api, port=cp.port))
    cp.wait_acked(CLUSTER, LISTENER)
    time.sleep(0.3)
    assert px.ready() == "INITIALIZING"
    st = px.stats()
    assert st["server.state"] == 3 and st["cluster_manager.warming_clusters"] == 1
    assert st["listener_manager.total_listeners_warming"] == 1
    names = dynamic_names(px.config_dump())
    assert "c1" in names["warming_clusters"] and not names["clusters"]
    assert "l1" in names["warming_listeners"] and not names["listeners"]

    # a client connecting now waits (the socket is bound) and is served when the listener is active
    result = {}
    t = threading.Thread(target=lambda: result.update(r=try_get(p1, "/early", timeout=8)), daemon=True)
    t.start()
    cp.set([c1, cla("c1", a.port), l1])
    cp.wait_acked(ENDPOINT)
    wait_for(lambda: "c1" in dynamic_names(px.config_dump())["clusters"], 5, "c1 active")
    assert px.ready() == "INITIALIZING" and t.is_alive()      # l1 still waits for r1
    cp.set([c1, cla("c1", a.port), l1, rds_route("r1", ("/", "c1"))])
    wait_for(lambda: px.ready() == "LIVE", 5, "LIVE")
    t.join(8)
    assert result["r"][0] == 200 and result["r"][1] == "A /early"
    st = px.stats()
    assert st["server.state"] == 0 and st["listener_manager.total_listeners_warming"] == 0
    assert st["cluster_manager.warming_clusters"] == 0
    names = dynamic_names(px.config_dump())
    assert "l1" in names["listeners"] and not names["warming_listeners"]

    # initial_fetch_timeout: c2's endpoints and r2 never come; both warm for 0.5 s, then go active
    c2 = eds_cluster("c2", timeout="0.5s")
    l2 = http_listener("l2", p2, rds="r2", rds_timeout="0.5s")
    cp.set([c1, cla("c1", a.port), l1, rds_route("r1", ("/", "c1")), c2, l2])
    cp.wait_acked(CLUSTER, LISTENER)
    names = dynamic_names(px.config_dump())
    assert "c2" in names["warming_clusters"] and "l2" in names["warming_listeners"]
    assert px.ready() == "LIVE"    # warming after initialization does not affect readiness
    wait_for(lambda: not any(dynamic_names(px.config_dump())[k] for k in ("warming_clusters",
                                                                        "warming_listeners")),
             5, "c2 and l2 warmed by timeout")
    st = px.stats()
    assert st["cluster.c2.init_fetch_timeout"] == 1 and st["http.l2.rds.r2.init_fetch_timeout"] == 1
    assert st["cluster.c2.membership_total"] == 0 if "cluster.c2.membership_total" in st else True
    code, _, _ = get(p2, "/")
    assert code == 404                 # no route configuration yet
    # the route arriving later takes effect at once
    cp.set([c1, cla("c1", a.port), l1, rds_route("r1", ("/", "c1")), c2, l2, rds_route("r2", ("/", "c1"))])
    wait_for(lambda: try_get(p2)[0] == 200, 5, "r2 applied after timeout")
    assert body(p1) == "A"


@pytest.mark.parametrize("api,transport", [("GRPC", "tcp"), ("DELTA_GRPC", "uds")])
def test_control_plane_killed_and_restarted(env, api, transport):
    """The control plane process is killed: pyproxy keeps serving on its last config, reconnects
    when it is back (same address), re-subscribes, and takes the config changed meanwhile."""
    from xds_util import ControlPlaneProcess, write_json
    a, b = env.backend("A"), env.backend("B")
    p1 = free_port()
    cfg = os.path.join(env.dir, "cfg")
    os.makedirs(cfg)
    status = os.path.join(env.dir, "cp-status.json")
    write_json(os.path.join(cfg, "all.json"), [eds_cluster("c1"), cla("c1", a.port),
                                               http_listener("l1", p1, rds="r1"), rds_route("r1", ("/", "c1"))])
    if transport == "uds":
        os.makedirs(os.path.join(env.dir, "etc", "istio", "proxy"))
        kw = {"port": None, "uds": os.path.join(env.dir, "etc", "istio", "proxy", "XDS")}
        boot = bootstrap(api, pipe="./etc/istio/proxy/XDS")
    else:
        kw = {"port": free_port()}
        boot = bootstrap(api, port=kw["port"])
    cpp = ControlPlaneProcess(cfg, status, poll_interval=0.05, **kw).start()
    try:
        px = env.proxy(boot)
        wait_for(lambda: px.ready() == "LIVE", 10, "LIVE")
        assert body(p1) == "A"
        assert px.stats("control_plane")["control_plane.connected_state"] == 1
        pid = cpp.proc.pid
        cpp.kill()                                   # SIGKILL by PID
        assert pid and cpp.proc is None
        wait_for(lambda: px.stats("control_plane")["control_plane.connected_state"] == 0, 5,
                 "disconnected state")
        t_end = time.monotonic() + 1.0
        while time.monotonic() < t_end:              # traffic goes on while it is away
            assert body(p1) == "A"
        assert px.ready() == "LIVE"
        st_before = px.stats()
        # the config changes while the control plane is down; it comes back on the same address
        write_json(os.path.join(cfg, "all.json"), [
            eds_cluster("c1"), cla("c1", a.port), eds_cluster("c2"), cla("c2", b.port),
            http_listener("l1", p1, rds="r1"), rds_route("r1", ("/", "c2"))])
        cpp.start()
        wait_for(lambda: body(p1) == "B", 8, "traffic to follow the restarted control plane")
        assert px.stats("control_plane")["control_plane.connected_state"] == 1
        st = cpp.status()
        streams = st["streams"]
        assert len(streams) == 1 and streams[0]["api"] == ("sotw" if api == "GRPC" else "delta")
        types = streams[0]["types"]
        assert types[CLUSTER]["wildcard"] and types[LISTENER]["wildcard"]
        assert set(types[ENDPOINT]["names"]) == {"c1", "c2"} and types[ROUTE]["names"] == ["r1"]
        first = {}
        for r in st["requests"]:
            first.setdefault(r["type_url"], r)
        assert first[CLUSTER]["has_node"] and not any(r["has_node"] for r in st["requests"][1:])
        if api == "DELTA_GRPC":
            # delta: the new stream tells the server what pyproxy holds
            assert set(first[CLUSTER]["initial_resource_versions"]) == {"c1"}
            assert set(first[LISTENER]["initial_resource_versions"]) == {"l1"}
        else:
            assert first[CLUSTER]["version"] != ""      # SotW: the last accepted version
        # the unchanged listener and cluster were not touched
        st_after = px.stats()
        for k in ("listener_manager.listener_modified", "cluster_manager.cluster_modified",
                  "listener_manager.listener_added"):
            assert st_after.get(k, 0) == st_before.get(k, 0), k
        assert not cpp.status()["nacks"]
    finally:
        cpp.kill()


def test_changed_listener_drains_old_connections(env):
    """LDS changes l1: in-flight requests on old connections finish (with connection: close), idle
    ones are closed, new connections take the new config; the unchanged l2 keeps its connections."""
    a, b = env.backend("A"), env.backend("B")
    p1, p2 = free_port(), free_port()
    cp = env.cp()
    res = [eds_cluster("c1"), cla("c1", a.port), eds_cluster("c2"), cla("c2", b.port)]
    l1_old = http_listener("l1", p1, route_config=route_config("x", ("/", "c1")))
    l1_new = http_listener("l1", p1, route_config=route_config("x", ("/", "c2")))
    l2 = http_listener("l2", p2, route_config=route_config("y", ("/", "c1")))
    cp.set(res + [l1_old, l2])
    px = env.proxy(bootstrap("DELTA_GRPC", port=cp.port), drain_time=2)
    wait_for(lambda: px.ready() == "LIVE", 10, "LIVE")
    idle = http.client.HTTPConnection("127.0.0.1", p1, timeout=5)
    assert get(p1, conn=idle)[1] == "A /"
    keep2 = http.client.HTTPConnection("127.0.0.1", p2, timeout=5)
    assert get(p2, conn=keep2)[1] == "A /"
    slow = {}
    t = threading.Thread(target=lambda: slow.update(r=try_get(p1, "/slow/1.0")), daemon=True)
    t.start()
    wait_for(lambda: any(path == "/slow/1.0" for _, path in a.peers), 5, "slow request upstream")

    cp.set(res + [l1_new, l2])
    v = str(cp.cp.version)
    wait_for(lambda: cp.acked_version(LISTENER) == v or cp.nacks(LISTENER), 8, "LDS ACK or NACK")
    assert not cp.nacks(LISTENER), cp.nacks(LISTENER)[-1]["error"]
    assert body(p1) == "B"                                   # new connections: new config
    dump = px.config_dump()
    ls = {e["name"]: e for e in dump_section(dump, "ListenersConfigDump")["dynamic_listeners"]
          if "draining_state" in e}
    assert "l1" in ls                                        # the old l1 drains
    t.join(5)
    code, text, hdrs = slow["r"]
    assert code == 200 and text == "A /slow/1.0"             # in-flight request finished on old config
    assert hdrs.get("connection") == "close"
    # the idle old connection was closed by the drain
    with pytest.raises((http.client.HTTPException, OSError)):
        idle.request("GET", "/", headers={"host": "x"})
        idle.getresponse().read()
    idle.close()
    assert get(p2, conn=keep2)[1] == "A /"                   # unchanged l2: same connection works
    keep2.close()
    st = px.stats()
    assert st["listener_manager.listener_modified"] == 1 and st["listener_manager.listener_added"] == 2
    wait_for(lambda: px.stats("listener_manager")["listener_manager.total_listeners_draining"] == 0,
             5, "drain to finish")


@pytest.mark.skipif(ENVOY is None, reason="envoy binary not on PATH")
@pytest.mark.parametrize("api", ["GRPC", "DELTA_GRPC"])
def test_config_dump_after_nack_matches_envoy(env, api):
    """pyproxy and the real Envoy as clients of the same control plane: after a listener NACK both
    keep the last good listener active and show Envoy's error_state next to it; the per-type and
    per-resource version_info agree."""
    cp = env.cp()
    good = [eds_cluster("c1"), cla("c1", 9), http_listener("l1", 0, rds="r1"), rds_route("r1", ("/", "c1"))]
    cp.set(good)
    boot = bootstrap(api, port=cp.port)
    px = env.proxy(boot)
    ev = env.proxy(boot, cwd=os.path.join(env.dir, "envoy"), binary=ENVOY)
    both = (px, ev)
    for p in both:
        wait_for(lambda: p.ready() == "LIVE", 10, "LIVE")
    bad_l1 = http_listener("l1", 0, rds="r1")
    bad_l1["filter_chains"][0]["filters"].insert(0, {
        "name": "bogus", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters."
                                                   "network.bogus.v3.Bogus"}})
    cp.set(good[:2] + [bad_l1, good[3]])
    wait_for(lambda: len({n["stream"] for n in cp.nacks(LISTENER)}) == 2, 8, "NACKs from both")
    dumps = [p.config_dump() for p in both]
    views = []
    for d in dumps:
        ls = dump_section(d, "ListenersConfigDump")
        l1 = [e for e in ls["dynamic_listeners"] if e.get("name") == "l1"][0]
        es = l1["error_state"]
        views.append({
            "lds_version": ls.get("version_info"),
            "cds_version": dump_section(d, "ClustersConfigDump").get("version_info"),
            "l1_active_version": l1["active_state"]["version_info"],
            "l1_active_has_bogus": "bogus" in json.dumps(l1["active_state"]["listener"]),
            "error_keys": sorted(es),
            "failed_name": es["failed_configuration"].get("name"),
            "failed_type": es["failed_configuration"].get("@type"),
            "failed_has_bogus": "bogus" in json.dumps(es["failed_configuration"]),
            "names": {k: sorted(v.items()) for k, v in dynamic_names(d).items()},
        })
    assert views[0] == views[1], views
    assert views[0]["error_keys"] == ["details", "failed_configuration", "last_update_attempt"]
    assert not views[0]["l1_active_has_bogus"] and views[0]["failed_has_bogus"]
    for p in both:
        st = p.stats("lds")
        assert st["listener_manager.lds.update_rejected"] == 1
