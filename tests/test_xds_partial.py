"""Partial xDS apply, as Envoy does it, checked against the real Envoy driven by the same control
plane: a state-of-the-world (or delta) response with bad resources applies the good ones, the NACK's
error_detail names every bad one, the stats count the rejection, and nothing of a bad resource is
applied. Also: a filter_chain_matcher action naming a chain the listener lacks is accepted (the
connection it selects is closed), as Envoy accepts it."""

from __future__ import annotations

import os
import re
import time

import pytest

from proxy_util import until_close
from test_xds_e2e_helpers import (  # noqa: F401 (env is a fixture)
    env, ENVOY, CLUSTER, ENDPOINT, LISTENER, ROUTE, bootstrap, cla, dump_section, dynamic_names,
    eds_cluster, free_port, get, http_listener, rds_route, try_get, wait_for)

BOGUS = {"name": "bogus", "typed_config": {
    "@type": "type.googleapis.com/envoy.extensions.filters.network.bogus.v3.Bogus"}}


def _start(env, cp, api, kind):
    boot = bootstrap(api, port=cp.port)
    px = env.proxy(boot, cwd=os.path.join(env.dir, kind), binary=ENVOY if kind == "envoy" else None)
    wait_for(lambda: px.ready() == "LIVE", 15, "LIVE")
    return px


KINDS = ["pyproxy"] + (["envoy"] if ENVOY else [])


def _nack_names(text: str) -> list:
    """The resource names an Envoy-style NACK lists: '<header> a: why, b: why' / 'a: why\nb: why\n'."""
    body = text.split("(s) ", 1)[1]
    return re.findall(r"(?:^|, |\n)([a-z]\d): ", body)


def _partial_scenario(env, api, kind):
    """One proxy (pyproxy or Envoy) and its own control plane through a partly bad push, with
    traffic; returns what can be compared between the two."""
    a, b = env.backend("A"), env.backend("B")
    cp = env.cp()
    p1, p2, p5 = free_port(), free_port(), free_port()
    base = [eds_cluster("c1"), cla("c1", a.port), eds_cluster("c2"), cla("c2", a.port),
            http_listener("l1", p1, rds="r1"), http_listener("l2", p2, rds="r2"),
            rds_route("r1", ("/", "c1")), rds_route("r2", ("/", "c1"))]
    cp.set(base)
    v1 = str(cp.cp.version)
    px = _start(env, cp, api, kind)
    cp.wait_acked(CLUSTER, ENDPOINT, LISTENER, ROUTE)
    assert get(p1)[1] == "A /" and get(p2)[1] == "A /"
    b0 = px.stats()
    # Envoy's counting from the start: the subscription's start is an attempt, then one response
    initial = {k: v for k, v in b0.items()
               if k.endswith((".update_attempt", ".update_success", ".update_rejected"))
               and k.split(".")[1] in ("cds", "lds", "c1", "c2", "l1", "l2")}

    bad_c = [dict(eds_cluster(n), lb_policy="CLUSTER_PROVIDED") for n in ("c3", "c4")]
    bad_cla = cla("c2", b.port)
    bad_cla["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]["address"] = "not-an-ip"
    bad_l = []
    for n in ("l3", "l4"):
        lst = http_listener(n, 0, rds="r1")
        lst["filter_chains"][0]["filters"].insert(0, BOGUS)
        bad_l.append(lst)
    bad_r = rds_route("r1", ("/", "c5"))
    bad_r["virtual_hosts"][0]["routes"][0]["match"] = {"safe_regex": {"regex": "(["}}
    # l1 also gets a bad update: the l1 in force must stay exactly as it was
    bad_l1 = http_listener("l1", p1, rds="r1")
    bad_l1["filter_chains"][0]["filters"].insert(0, BOGUS)
    snapshot = [eds_cluster("c1"), cla("c1", a.port, b.port), eds_cluster("c2"), bad_cla, *bad_c,
                eds_cluster("c5"), cla("c5", b.port), bad_l1, http_listener("l2", p2, rds="r2"), *bad_l,
                http_listener("l5", p5, rds="r2"), bad_r, rds_route("r2", ("/", "c5"))]
    cp.set(snapshot)
    v2 = str(cp.cp.version)
    want = {CLUSTER, ENDPOINT, LISTENER, ROUTE}
    wait_for(lambda: {n["type_url"] for n in cp.nacks()} >= want, 10, "NACKs of every type")
    wait_for(lambda: try_get(p5)[0] == 200, 5, "l5 serving")
    nacks = {}
    for n in cp.nacks():
        nacks.setdefault(n["type_url"], n["error"])
    # CDS and LDS: Envoy's exact form, every bad resource named, in the response's order
    assert nacks[CLUSTER].startswith("Error adding/updating cluster(s) c3: "), nacks[CLUSTER]
    assert nacks[LISTENER].startswith("Error adding/updating listener(s) l1: "), nacks[LISTENER]
    assert nacks[LISTENER].endswith("\n")
    assert "not-an-ip" in nacks[ENDPOINT] and "[" in nacks[ROUTE]
    if kind == "pyproxy":
        # pyproxy names every bad resource of EDS and RDS too (Envoy's message is the first one's alone)
        assert nacks[ENDPOINT].startswith("Error adding/updating cluster load assignment(s) c2: ")
        assert nacks[ROUTE].startswith("Error adding/updating route configuration(s) r1: ")

    def current_view():
        names = dynamic_names(px.config_dump())
        st = px.stats()
        # (Envoy 1.40 may list an error_state in an entry of its own, without "name": merged here)
        ls = {}
        for e in dump_section(px.config_dump(), "ListenersConfigDump")["dynamic_listeners"]:
            ls.setdefault(e.get("name") or e["error_state"]["failed_configuration"]["name"], {}).update(e)
        view = {
            "cds_nack_names": _nack_names(nacks[CLUSTER]),
            "lds_nack_names": _nack_names(nacks[LISTENER]),
            "clusters": sorted(names["clusters"]),
            "listeners": sorted(names["listeners"]),
            "routes": sorted(names["routes"]),
            # SotW: the good resources of the rejected response carry its version, the rest the old one
            "versions": (None if api != "GRPC" else
                         (names["clusters"]["c5"] == v2, names["clusters"]["c1"] == v1,
                          names["listeners"]["l5"] == v2, names["listeners"]["l1"] == v1,
                          names["routes"]["r2"] == v2, names["routes"]["r1"] == v1)),
            "cds": tuple(st["cluster_manager.cds." + k] - b0["cluster_manager.cds." + k]
                         for k in ("update_rejected", "update_success")),
            "lds": tuple(st["listener_manager.lds." + k] - b0["listener_manager.lds." + k]
                         for k in ("update_rejected", "update_success")),
            "versions_kept": (st["cluster_manager.cds.version"] == b0["cluster_manager.cds.version"],
                              st["listener_manager.lds.version"] == b0["listener_manager.lds.version"],
                              st["http.l1.rds.r1.version"] == b0["http.l1.rds.r1.version"]),
            "rds_rejected": (st["http.l1.rds.r1.update_rejected"] - b0["http.l1.rds.r1.update_rejected"] >= 1,
                             st["http.l2.rds.r2.update_rejected"] - b0["http.l2.rds.r2.update_rejected"] >= 1),
            "eds_rejected_c2": st["cluster.c2.update_rejected"] - b0.get("cluster.c2.update_rejected", 0) >= 1,
            "error_state": sorted(n for n, e in ls.items() if "error_state" in e),
            "l1_kept": "bogus" not in str(ls["l1"]["active_state"]),
            "c2_hosts": st["cluster.c2.membership_total"],
        }
        return view

    # the proxy answers several responses of the push (EDS twice: the new cluster c5 widens the
    # subscription); take the view once it has settled
    view, prev = None, None
    for _ in range(40):
        try:
            view = current_view()
        except (KeyError, AssertionError):
            view = None
        if view is not None and view == prev:
            break
        prev = view
        time.sleep(0.25)
    assert view is not None
    # traffic: the good parts are in force, the bad parts changed nothing (Envoy applies the RDS and
    # EDS watches it reaches before the bad resource, in an order of its own: pyproxy only)
    traffic = (get(p5)[1], get(p2)[1], get(p1)[1] in ("A /", "B /"))
    if kind == "pyproxy":
        assert traffic == ("B /", "B /", True), traffic
        seen = {get(p1, "/x%d" % i)[1].split()[0] for i in range(6)}
        assert seen == {"A", "B"}                  # c1's good endpoint update applied

    # fixed: everything accepted, error states cleared
    fixed = [x for x in snapshot if x not in (bad_cla, *bad_c, bad_l1, *bad_l, bad_r)]
    fixed += [cla("c2", b.port), http_listener("l1", p1, rds="r1"), rds_route("r1", ("/", "c2"))]
    cp.set(fixed)
    v3 = str(cp.cp.version)
    cp.wait_acked(CLUSTER, ENDPOINT, ROUTE, LISTENER)
    wait_for(lambda: get(p1)[1] == "B /", 5, "fixed r1")
    names = dynamic_names(px.config_dump())
    ls = dump_section(px.config_dump(), "ListenersConfigDump")["dynamic_listeners"]
    view["initial"] = initial
    view["fixed"] = (sorted(names["clusters"]), sorted(names["listeners"]),
                     [e.get("name") for e in ls if "error_state" in e],
                     None if api != "GRPC" else (names["routes"]["r1"] == v3, names["clusters"]["c5"] == v2))
    px.kill()
    cp.stop()
    return view


@pytest.mark.parametrize("api", ["GRPC", "DELTA_GRPC"])
def test_partial_apply_matches_envoy(env, api):
    views = {kind: _partial_scenario(env, api, kind) for kind in KINDS}
    pv = views["pyproxy"]
    assert pv["cds_nack_names"] == ["c3", "c4"] and pv["lds_nack_names"] == ["l1", "l3", "l4"]
    assert pv["clusters"] == ["c1", "c2", "c5"] and pv["listeners"] == ["l1", "l2", "l5"]
    assert pv["cds"] == (1, 0) and pv["lds"] == (1, 0) and all(pv["versions_kept"])
    assert pv["initial"]["cluster_manager.cds.update_attempt"] == 2
    assert pv["initial"]["http.l1.rds.r1.update_attempt"] == 2
    assert pv["initial"]["cluster.c1.update_attempt"] == 2
    assert pv["rds_rejected"] == (True, True) and pv["eds_rejected_c2"]
    assert pv["error_state"] == ["l1", "l3", "l4"] and pv["l1_kept"] and pv["c2_hosts"] == 1
    if api == "GRPC":
        assert all(pv["versions"])
        assert pv["fixed"] == (["c1", "c2", "c5"], ["l1", "l2", "l5"], [], (True, True))
    else:
        assert pv["fixed"][:2] == (["c1", "c2", "c5"], ["l1", "l2", "l5"])
    if "envoy" in views:
        assert views["envoy"] == pv, views


def _matcher_listener(name, port, missing_from="127.0.0.2"):
    """A listener whose filter_chain_matcher sends connections from ``missing_from`` to a chain it
    does not have; the others to chain 'real'; a default chain that must not be used for the former."""
    tp = "type.googleapis.com/"

    def chain(body):
        return {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": {
            "@type": tp + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": name,
            "route_config": {"virtual_hosts": [{"name": "v", "domains": ["*"], "routes": [
                {"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": body}}}]}]},
            "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                "@type": tp + "envoy.extensions.filters.http.router.v3.Router"}}]}}]}

    def action(n):
        return {"action": {"name": n, "typed_config": {"@type": tp + "google.protobuf.StringValue", "value": n}}}
    real = dict(chain("real"), name="real")
    return {"@type": "Listener", "name": name,
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [real],
            "default_filter_chain": chain("default"),
            "filter_chain_matcher": {
                "matcher_tree": {
                    "input": {"name": "src", "typed_config": {
                        "@type": tp + "envoy.extensions.matching.common_inputs.network.v3.SourceIPInput"}},
                    "exact_match_map": {"map": {missing_from: action("no-such-chain")}}},
                "on_no_match": action("real")}}


def _get_from(src_ip, port):
    return until_close(port, b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n", 3, resets=True,
                       source=src_ip)


@pytest.mark.parametrize("api", ["GRPC", "DELTA_GRPC"])
def test_matcher_naming_a_missing_chain_is_accepted_like_envoy(env, api):
    results = {}
    for kind in KINDS:
        cp = env.cp()
        port = free_port()
        cp.set([_matcher_listener("m", port)])
        px = _start(env, cp, api, kind)
        cp.wait_acked(LISTENER)
        assert not cp.nacks(LISTENER), cp.nacks(LISTENER)
        ok = _get_from("127.0.0.1", port)
        closed = _get_from("127.0.0.2", port)
        again = _get_from("127.0.0.1", port)
        st = px.stats("no_filter_chain_match")
        results[kind] = (b"real" in ok and ok.startswith(b"HTTP/1.1 200"), closed, b"real" in again,
                         st.get("listener.127.0.0.1_%d.no_filter_chain_match" % port))
        px.kill()
        cp.stop()
    for kind, r in results.items():
        assert r == (True, b"", True, 1), (kind, r)


def test_partial_apply_reaches_every_worker(env):
    """--concurrency 2: the good resources of a partly rejected response are applied in every
    process (the main one forwards exactly what it applied)."""
    from test_xds_e2e_helpers import body
    a, b = env.backend("A"), env.backend("B")
    p1, p2 = free_port(), free_port()
    cp = env.cp()
    base = [eds_cluster("c1"), cla("c1", a.port), http_listener("l1", p1, rds="r1"),
            rds_route("r1", ("/", "c1"))]
    cp.set(base)
    px = env.proxy(bootstrap("DELTA_GRPC", port=cp.port), extra=("--concurrency", "2"))
    wait_for(lambda: px.ready() == "LIVE", 10, "LIVE")
    cp.wait_acked(CLUSTER, ENDPOINT, LISTENER, ROUTE)
    bad_l = http_listener("l3", 0, rds="r1")
    bad_l["filter_chains"][0]["filters"].insert(0, BOGUS)
    bad_c = dict(eds_cluster("c3"), lb_policy="CLUSTER_PROVIDED")
    bad_r = rds_route("r9", ("/", "c2"))
    bad_r["virtual_hosts"][0]["routes"][0]["match"] = {"safe_regex": {"regex": "(["}}
    cp.set(base[:3] + [eds_cluster("c2"), cla("c2", b.port), bad_c, bad_l,
                       http_listener("l2", p2, rds="r1"), rds_route("r1", ("/", "c2")), bad_r])
    wait_for(lambda: {n["type_url"] for n in cp.nacks()} >= {CLUSTER, LISTENER}, 10, "NACKs")
    wait_for(lambda: try_get(p2)[0] == 200 and body(p1) == "B", 8, "the good part applied")
    time.sleep(0.3)
    # both processes: every request, on either listener, sees the new route to the new cluster
    seen = [body(p1) for _ in range(30)] + [body(p2) for _ in range(30)]
    assert seen == ["B"] * 60, seen
    assert len({pt for pt, _ in b.peers}) >= 2, "only one process took the partial update"
