"""End to end: Istio's generated configuration (../shared/testdata/istio) pushed to a real pyproxy
over ADS in istiod's order (CDS, EDS, LDS, RDS) and over the project's control plane: accepted
without a NACK, warmed, and live."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from google.protobuf import json_format
from envoy.config.listener.v3 import listener_pb2
from envoy.service.discovery.v3 import discovery_pb2

from pyproxy.control_plane import load_dir, parse_resource

from test_xds_e2e_helpers import (  # noqa: F401 (env is a fixture)
    env, CLUSTER, ENDPOINT, LISTENER, ROUTE, ScriptedAds, bootstrap as _bootstrap, dynamic_names,
    free_port, wait_for)
from sds_util import AgentSds, cert_secret, root_secret, sds_grpc_cluster
from tls_certs import Pki


def bootstrap(*a, **kw):
    """The helpers' bootstrap plus Istio's ``sds-grpc`` cluster (the dumps' mTLS contexts name
    ``default`` and ``ROOTCA`` from it and warm until they arrive)."""
    bs = _bootstrap(*a, **kw)
    bs["static_resources"]["clusters"].append(sds_grpc_cluster())
    return bs


@pytest.fixture(autouse=True)
def agent_sds(env):
    """pilot-agent's SDS server in the proxy's working directory."""
    pki = Pki(os.path.join(env.dir, "pki"))
    wl = pki.issue("workload", uri=["spiffe://cluster.local/ns/default/sa/productpage"])
    a = AgentSds(env.dir, {"default": cert_secret("default", wl), "ROOTCA": root_secret("ROOTCA", pki.ca_pem)})
    a.start()
    yield a
    a.stop()

TESTDATA = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                        "shared", "testdata", "istio")
if not os.path.isdir(TESTDATA):
    TESTDATA = "/work/shared/testdata/istio"

SIDECAR = ("sidecar-listeners-configdump.json", "sidecar-endpoints-configdump.json",
           "sidecar-http-clusters-configdump.json", "sidecar-tls-clusters-configdump.json")
WAYPOINT = ("waypoint-full-configdump.json",)

pytestmark = [
    pytest.mark.skipif(not os.path.isdir(TESTDATA), reason="Istio testdata not available"),
]


def _rewrite_ports(obj, ports: dict):
    """Listeners that bind real ports (15001, 15006, 15008...) get free ones instead."""
    if isinstance(obj, dict):
        lst = obj.get("listener") if isinstance(obj.get("listener"), dict) else None
        if lst is not None and lst.get("bind_to_port", True) is not False:
            sa = lst.get("address", {}).get("socket_address", {})
            if sa.get("port_value"):
                sa["port_value"] = ports.setdefault(sa["port_value"], free_port())
                sa["address"] = "127.0.0.1"
        for v in obj.values():
            _rewrite_ports(v, ports)
    elif isinstance(obj, list):
        for v in obj:
            _rewrite_ports(v, ports)


def istio_snapshot(tmpdir, files):
    """The dynamic resources of the dumps (ports rewritten), plus what they need to warm: an EDS
    cluster for every ClusterLoadAssignment and a route configuration for every RDS name no dump
    defines. Returns {type URL: {name: Any}} and the port map."""
    d = os.path.join(tmpdir, "istio")
    os.makedirs(d)
    ports: dict = {}
    for f in files:
        with open(os.path.join(TESTDATA, f)) as fh:
            data = json.load(fh)
        _rewrite_ports(data, ports)
        with open(os.path.join(d, f), "w") as fh:
            json.dump(data, fh)
    snap = {t: {n: r.any for n, r in by.items()} for t, by in load_dir(d).items()}
    shutil.rmtree(d)
    for name in list(snap.get(ENDPOINT, {})):
        if name not in snap.setdefault(CLUSTER, {}):
            snap[CLUSTER][name] = parse_resource({
                "@type": "Cluster", "name": name, "type": "EDS", "connect_timeout": "10s",
                "eds_cluster_config": {"service_name": name, "eds_config": {
                    "ads": {}, "initial_fetch_timeout": "0s", "resource_api_version": "V3"}}},
                "<test>").any
    from envoy.config.cluster.v3 import cluster_pb2
    for a in list(snap.get(CLUSTER, {}).values()):
        c = cluster_pb2.Cluster()
        a.Unpack(c)
        svc = c.eds_cluster_config.service_name or c.name
        if c.type == cluster_pb2.Cluster.EDS and svc not in snap.setdefault(ENDPOINT, {}):
            # istiod sends an (empty) assignment for every EDS cluster; the dumps lack some
            snap[ENDPOINT][svc] = parse_resource({"@type": "ClusterLoadAssignment",
                                                  "cluster_name": svc}, "<test>").any
    wanted = set()
    for a in snap.get(LISTENER, {}).values():
        lst = listener_pb2.Listener()
        a.Unpack(lst)
        text = json_format.MessageToJson(lst)
        for part in text.split('"routeConfigName": "')[1:]:
            wanted.add(part.split('"', 1)[0])
    for name in wanted - set(snap.setdefault(ROUTE, {})):
        snap[ROUTE][name] = parse_resource({"@type": "RouteConfiguration", "name": name,
                                            "virtual_hosts": []}, "<test>").any
    # clusters named by a listener's inline route_config that no dump defines (a static route
    # config's validate_clusters, true by default, refuses a listener naming an unknown cluster)
    for name in _inline_route_clusters(snap.get(LISTENER, {}).values()) - set(snap[CLUSTER]):
        snap[CLUSTER][name] = parse_resource({
            "@type": "Cluster", "name": name, "type": "STATIC", "connect_timeout": "1s",
            "load_assignment": {"cluster_name": name}}, "<test>").any
    return snap, ports


def _inline_route_clusters(listeners) -> set:
    out = set()

    def walk(o, in_rc=False):
        if isinstance(o, dict):
            if in_rc and isinstance(o.get("route"), dict) and isinstance(o["route"].get("cluster"), str):
                out.add(o["route"]["cluster"])
            for k, v in o.items():
                walk(v, in_rc or k == "routeConfig")
        elif isinstance(o, list):
            for v in o:
                walk(v, in_rc)
    for a in listeners:
        lst = listener_pb2.Listener()
        a.Unpack(lst)
        walk(json.loads(json_format.MessageToJson(lst)))
    return out


@pytest.mark.parametrize("api,files", [("DELTA_GRPC", SIDECAR), ("GRPC", WAYPOINT)],
                         ids=["delta-sidecar", "sotw-waypoint"])
def test_istio_config_in_istiods_order(env, api, files):
    snap, ports = istio_snapshot(env.dir, files)
    ads = ScriptedAds(env.loop)
    px = env.proxy(bootstrap(api, port=ads.port))
    nonces = iter(range(1, 1000))

    def push(t, names=None):
        res = snap.get(t, {})
        if names is not None:
            res = {n: a for n, a in res.items() if n in names}
        nonce = "n%d" % next(nonces)
        if api == "GRPC":
            r = discovery_pb2.DiscoveryResponse(version_info="2026-08-22T00:00:00Z/1", type_url=t,
                                                nonce=nonce, resources=list(res.values()))
        else:
            r = discovery_pb2.DeltaDiscoveryResponse(system_version_info="2026-08-22T00:00:00Z/1",
                                                     type_url=t, nonce=nonce)
            for n, a in res.items():
                r.resources.add(name=n, version="v1").resource.CopyFrom(a)
        ads.send(r)
        wait_for(lambda: [q for q in ads.reqs(t) if q.response_nonce == nonce], 10, "answer to " + t)
        ans = [q for q in ads.reqs(t) if q.response_nonce == nonce][-1]
        assert not ans.HasField("error_detail"), ans.error_detail.message
        return res

    def subscribed(t):
        names = set()
        for q in ads.reqs(t):
            if api == "GRPC":
                names = set(q.resource_names)
            else:
                names |= set(q.resource_names_subscribe)
                names -= set(q.resource_names_unsubscribe)
        return names

    wait_for(lambda: ads.reqs(CLUSTER) and ads.reqs(LISTENER), 5, "CDS and LDS requests")
    push(CLUSTER)
    eds = {n for n in snap.get(ENDPOINT, {})}
    if eds:
        wait_for(lambda: subscribed(ENDPOINT) >= eds, 5, "EDS subscription")
        assert px.ready() == "INITIALIZING"          # EDS clusters warm until their endpoints
        for name in subscribed(ENDPOINT) - set(snap[ENDPOINT]):
            # istiod sends an (empty) assignment for every EDS cluster; the dumps lack one
            snap[ENDPOINT][name] = parse_resource({"@type": "ClusterLoadAssignment",
                                                   "cluster_name": name}, "<test>").any
        push(ENDPOINT, subscribed(ENDPOINT))
    push(LISTENER)
    needs_rds = False
    for a in snap[LISTENER].values():
        lst = listener_pb2.Listener()
        a.Unpack(lst)
        needs_rds = needs_rds or '"routeConfigName"' in json_format.MessageToJson(lst)
    rds = set()
    if needs_rds:  # the waypoint's listeners use inline routes only: no RDS request is due
        wait_for(lambda: subscribed(ROUTE), 5, "RDS subscription")
        rds = subscribed(ROUTE)
        assert rds <= set(snap[ROUTE])
        push(ROUTE, rds)
    wait_for(lambda: px.ready() == "LIVE", 10, "LIVE")
    st = px.stats("cds|lds|warming|server.state")
    assert st["cluster_manager.cds.update_success"] >= 1 and st["listener_manager.lds.update_success"] >= 1
    assert st["cluster_manager.cds.update_rejected"] == 0 and st["listener_manager.lds.update_rejected"] == 0
    assert st["listener_manager.total_listeners_warming"] == 0 and st["cluster_manager.warming_clusters"] == 0
    names = dynamic_names(px.config_dump())
    assert set(names["listeners"]) == set(snap[LISTENER])
    assert set(names["clusters"]) == set(snap[CLUSTER])
    assert set(names["routes"]) == rds
    # the rewritten ports are really served
    import socket
    for a in snap[LISTENER].values():
        lst = listener_pb2.Listener()
        a.Unpack(lst)
        if lst.HasField("bind_to_port") and not lst.bind_to_port.value:
            continue
        port = lst.address.socket_address.port_value
        if port:
            assert port in ports.values(), (lst.name, port)
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
    assert px.alive()
    ads.stop()


def test_istio_dumps_through_the_control_plane(env):
    """The project's control plane serving the (port-rewritten) sidecar dumps to pyproxy: no NACK."""
    snap, _ = istio_snapshot(env.dir, SIDECAR)
    cp = env.cp()
    res = []
    for t, by in snap.items():
        for a in by.values():
            res.append(_resource(t, a))
    cp.set(res)
    px = env.proxy(bootstrap("DELTA_GRPC", port=cp.port))
    wait_for(lambda: cp.nacks() or px.ready() == "LIVE", 10, "LIVE or a NACK")
    assert not cp.nacks(), cp.nacks()[0]["error"]
    cp.wait_acked(CLUSTER, ENDPOINT, LISTENER, ROUTE)
    names = dynamic_names(px.config_dump())
    assert set(names["listeners"]) == set(snap[LISTENER]) and not names["warming_listeners"]


def _resource(t, a):
    from pyproxy.control_plane.loader import Resource
    import hashlib
    from pyproxy.xds_client.resources import class_for_type_url, resource_name
    msg = class_for_type_url(t)()
    a.Unpack(msg)
    return Resource(type_url=t, name=resource_name(msg), any=a,
                    version=hashlib.sha256(a.value).hexdigest()[:16], source="<test>")
