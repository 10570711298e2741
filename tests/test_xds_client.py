"""The ADS client against the shipped control plane and against a misbehaving test-local server.

Real gRPC on loopback (TCP and unix sockets), both SotW and delta.
"""

from __future__ import annotations

import asyncio
import os

import grpc
import pytest
from google.protobuf import any_pb2

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import config_source_pb2, grpc_service_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import \
    http_connection_manager_pb2 as hcm_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from pyproxy.config.errors import ConfigError
from pyproxy.control_plane import ControlPlane
from pyproxy.stats import Store
from pyproxy.xds_client import (CLUSTER, ENDPOINT, LISTENER, ROUTE, XdsClient, target_from_cluster,
                                target_from_grpc_service)
from pyproxy.xds_client.target import target_from_api_config_source

from xds_util import (AdsScript, ControlPlaneProcess, RecordingHandler, cluster, endpoints, listener, node,
                      route, run, wait_until, write_json)

APIS = ["GRPC", "DELTA_GRPC"]


def route_of(lst: listener_pb2.Listener) -> str:
    hcm = hcm_pb2.HttpConnectionManager()
    lst.filter_chains[0].filters[0].typed_config.Unpack(hcm)
    return hcm.rds.route_config_name


def make_client(target, api, handler, **kw):
    kw.setdefault("initial_backoff", 0.05)
    kw.setdefault("max_backoff", 0.3)
    c = XdsClient(target=target, node=node(), api_type=api, handler=handler, **kw)

    def follow(t, added, removed):
        # What the config manager does: EDS follows clusters, RDS follows listeners.
        if t == CLUSTER:
            c.subscribe(ENDPOINT, handler.names(CLUSTER))
        elif t == LISTENER:
            c.subscribe(ROUTE, {route_of(m) for m in handler.state[LISTENER].values()})
    handler.on_call = follow
    c.subscribe(CLUSTER, None)
    c.subscribe(LISTENER, None)
    return c


def write_config(d, clusters, eps, listeners, routes):
    write_json(os.path.join(d, "clusters.json"), [cluster(n) for n in clusters])
    write_json(os.path.join(d, "endpoints.json"), [endpoints(n, *p) for n, p in eps.items()])
    write_json(os.path.join(d, "listeners.yaml"), {"resources": [listener(n, 10000 + i, r) for i, (n, r)
                                                                 in enumerate(listeners.items())]})
    write_json(os.path.join(d, "routes.json"), [route(n, c) for n, c in routes.items()])


def ports_of(cla) -> list[int]:
    return [lb.endpoint.address.socket_address.port_value
            for le in cla.endpoints for lb in le.lb_endpoints]


# ---------------------------------------------------------------------------------------------
# against the shipped control plane, in process

@pytest.mark.parametrize("transport", ["tcp", "uds"])
@pytest.mark.parametrize("api", APIS)
def test_push_update_remove_nack_resubscribe(tmp_path, api, transport):
    d = str(tmp_path / "cfg")
    os.mkdir(d)
    write_config(d, ["c1"], {"c1": [8001]}, {"l1": "r1"}, {"r1": "c1"})
    sock = str(tmp_path / "xds.sock")

    def reject(t, added):
        if t == CLUSTER and "bad" in added:
            return "cluster 'bad': connect_timeout: refused by test"
        return None

    async def main():
        cp = ControlPlane(d, port=0 if transport == "tcp" else None,
                          uds=sock if transport == "uds" else None, poll_interval=0.05)
        await cp.start()
        h = RecordingHandler(reject=reject)
        stats = Store()
        target = "127.0.0.1:%d" % cp.port if transport == "tcp" else "unix:" + sock
        c = make_client(target, api, h, stats=stats)
        c.start()
        try:
            # initial push: CDS -> EDS, LDS -> RDS, all ACKed
            await wait_until(lambda: h.names(ROUTE) == {"r1"} and h.names(ENDPOINT) == {"c1"},
                             what="initial push")
            assert c.connected and stats.gauge("control_plane.connected_state").value == 1
            assert h.states == [True]
            assert h.names(CLUSTER) == {"c1"} and h.names(LISTENER) == {"l1"}
            assert ports_of(h.state[ENDPOINT]["c1"]) == [8001]
            assert all(call[4] == (api == "GRPC") for call in h.calls)
            await wait_until(lambda: {a["type_url"] for a in cp.acks} >= {CLUSTER, ENDPOINT,
                                                                           LISTENER, ROUTE},
                             what="ACKs for the four types")
            assert not cp.nacks
            assert c.type_state(CLUSTER)["version_info"] == "1"

            # a file change: endpoint added
            write_config(d, ["c1"], {"c1": [8001, 8002]}, {"l1": "r1"}, {"r1": "c1"})
            await wait_until(lambda: ports_of(h.state[ENDPOINT]["c1"]) == [8001, 8002],
                             what="endpoint update")

            # a cluster added, then removed
            write_config(d, ["c1", "c2"], {"c1": [8001, 8002], "c2": [9000]}, {"l1": "r1"},
                         {"r1": "c1"})
            await wait_until(lambda: h.names(ENDPOINT) >= {"c1", "c2"}, what="c2 endpoints")
            last_cds = h.calls_for(CLUSTER)[-1]
            assert set(last_cds[2]) == ({"c1", "c2"} if api == "GRPC" else {"c2"})
            write_config(d, ["c1"], {"c1": [8001, 8002]}, {"l1": "r1"}, {"r1": "c1"})
            await wait_until(lambda: h.names(CLUSTER) == {"c1"}, what="c2 removed")
            assert h.calls_for(CLUSTER)[-1][3] == {"c2"}
            # EDS follows: c2 unsubscribed
            await wait_until(lambda: c.type_state(ENDPOINT)["names"] == ["c1"], what="EDS narrowed")

            # an invalid cluster: NACKed with the handler's message, old version kept
            good_version = c.type_state(CLUSTER)["version_info"]
            n_cds = len(h.calls_for(CLUSTER))
            write_config(d, ["c1", "bad"], {"c1": [8001, 8002]}, {"l1": "r1"}, {"r1": "c1"})
            await wait_until(lambda: cp.nacks, what="NACK at the server")
            nack = cp.nacks[-1]
            assert nack["type_url"] == CLUSTER and nack["code"] == 3
            assert "cluster 'bad': connect_timeout: refused by test" in nack["error"]
            if api == "GRPC":
                assert nack["version"] == good_version   # NACK carries the last good version
            st = c.type_state(CLUSTER)
            assert st["version_info"] == good_version
            assert "refused by test" in st["last_error"]["message"]
            assert h.names(CLUSTER) == {"c1"} and len(h.calls_for(CLUSTER)) == n_cds
            # the next good push is applied and ACKed
            write_config(d, ["c1", "c3"], {"c1": [8001, 8002], "c3": [7000]}, {"l1": "r1"},
                         {"r1": "c1"})
            await wait_until(lambda: h.names(CLUSTER) == {"c1", "c3"}, what="good push after NACK")
            # (SotW named types never remove: the config manager drops EDS of removed clusters)
            await wait_until(lambda: h.names(ENDPOINT) >= {"c1", "c3"}, what="c3 endpoints")
            assert c.type_state(CLUSTER)["last_error"] is None
            assert int(c.type_state(CLUSTER)["version_info"]) > int(good_version)
            n_nacks = len(cp.nacks)

            # the listener moves to another route: RDS re-subscribed by name
            write_config(d, ["c1", "c3"], {"c1": [8001, 8002], "c3": [7000]}, {"l1": "r2"},
                         {"r1": "c1", "r2": "c3"})
            await wait_until(lambda: "r2" in h.names(ROUTE), what="r2 pushed")
            reqs = [r for r in cp.requests if r["type_url"] == ROUTE]
            if api == "GRPC":
                assert reqs[-1]["resource_names"] == ["r2"] or any(
                    r["resource_names"] == ["r2"] for r in reqs)
                assert "r1" in h.names(ROUTE)   # SotW named types: absence is not removal
            else:
                assert any(r["subscribe"] == ["r2"] and r["unsubscribe"] == ["r1"] for r in reqs)
            assert c.type_state(ROUTE)["names"] == ["r2"]
            assert len(cp.nacks) == n_nacks
        finally:
            await c.stop()
            await cp.stop()
        assert h.states == [True, False]
        assert stats.gauge("control_plane.connected_state").value == 0

    run(main(), timeout=25)


@pytest.mark.parametrize("api", APIS)
def test_control_plane_killed_and_restarted(tmp_path, api):
    d = str(tmp_path / "cfg")
    os.mkdir(d)
    write_config(d, ["c1"], {"c1": [8001]}, {"l1": "r1"}, {"r1": "c1"})
    sock = str(tmp_path / "xds.sock")
    status = str(tmp_path / "status.json")

    async def main(cpp):
        h = RecordingHandler()
        c = make_client("unix:" + sock, api, h, set_node_on_first_message_only=True)
        c.start()
        try:
            await wait_until(lambda: h.names(ROUTE) == {"r1"} and h.names(ENDPOINT) == {"c1"},
                             what="initial push")
            await wait_until(lambda: len(cpp.status().get("acks", [])) >= 4, what="ACKs in status")
            eds_versions = dict(c.type_state(ENDPOINT)["resource_versions"])
            cpp.kill()
            await wait_until(lambda: not c.connected, what="disconnect")
            assert h.states[-1] is False
            # the config in force stays; a change made while the server is away arrives later
            write_config(d, ["c1"], {"c1": [8001, 8003]}, {"l1": "r1"}, {"r1": "c1"})
            streams_before = c.streams
            await asyncio.sleep(0.3)
            assert c.streams > streams_before    # it keeps trying, with backoff
            assert c.streams - streams_before < 20
            assert h.names(CLUSTER) == {"c1"}
            await asyncio.to_thread(cpp.start)
            await wait_until(lambda: c.connected, what="reconnect")
            await wait_until(lambda: ports_of(h.state[ENDPOINT]["c1"]) == [8001, 8003],
                             what="update after reconnect")
            await wait_until(lambda: {a["type_url"] for a in cpp.status().get("acks", [])}
                             >= {CLUSTER, ENDPOINT, LISTENER, ROUTE}, what="re-subscribed")
            reqs = cpp.status()["requests"]
            first = {}
            for r in reqs:
                first.setdefault(r["type_url"], r)
            assert set(first) >= {CLUSTER, ENDPOINT, LISTENER, ROUTE}
            # node only on the first message of the new stream
            assert [r["has_node"] for r in reqs][:1] == [True]
            assert not any(r["has_node"] for r in reqs[1:])
            if api == "DELTA_GRPC":
                assert first[ENDPOINT]["initial_resource_versions"] == eds_versions
                assert first[ENDPOINT]["subscribe"] == ["c1"]
                assert set(first[CLUSTER]["initial_resource_versions"]) == {"c1"}
                assert first[CLUSTER]["subscribe"] == []       # wildcard
            else:
                assert first[CLUSTER]["version"] == "1" and first[CLUSTER]["resource_names"] == []
                assert first[ENDPOINT]["resource_names"] == ["c1"]
            assert h.names(CLUSTER) == {"c1"} and h.names(LISTENER) == {"l1"}
        finally:
            await c.stop()

    cpp = ControlPlaneProcess(d, status, port=None, uds=sock).start()
    try:
        run(main(cpp), timeout=25)
    finally:
        cpp.kill()


# ---------------------------------------------------------------------------------------------
# against a misbehaving test-local server

class ScriptedAds(AdsScript, ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    """An ADS server whose responses the test writes by hand (in the test's own loop)."""

    def send(self, resp):
        self.out.put_nowait(resp)


async def scripted_server():
    srv = grpc.aio.server()
    ads = ScriptedAds()
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(ads, srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    await srv.start()
    return srv, ads, port


def packed(msg, type_url=None):
    a = any_pb2.Any()
    a.Pack(msg)
    if type_url:
        a.type_url = type_url
    return a


def cds(api, version, nonce, clusters=(), raw=(), removed=()):
    anys = [packed(cluster_pb2.Cluster(name=n)) for n in clusters] + list(raw)
    if api == "GRPC":
        return discovery_pb2.DiscoveryResponse(version_info=version, nonce=nonce, type_url=CLUSTER,
                                               resources=anys)
    r = discovery_pb2.DeltaDiscoveryResponse(system_version_info=version, nonce=nonce,
                                             type_url=CLUSTER, removed_resources=list(removed))
    for i, a in enumerate(anys):
        name = clusters[i] if i < len(clusters) else "raw%d" % i
        r.resources.add(name=name, version=version + "-" + name).resource.CopyFrom(a)
    return r


def is_nack(r) -> bool:
    return r.HasField("error_detail")


@pytest.mark.parametrize("api", APIS)
def test_misbehaving_server(api):
    async def main():
        srv, ads, port = await scripted_server()
        boom = {"on": False}

        def reject(t, added):
            if boom["on"]:
                raise RuntimeError("handler bug")
            return None
        h = RecordingHandler(reject=reject)
        c = XdsClient(target="127.0.0.1:%d" % port, node=node(), api_type=api, handler=h,
                      initial_backoff=0.05, max_backoff=0.2)
        c.subscribe(CLUSTER, None)
        c.subscribe(ENDPOINT, set())      # nothing wanted: no request
        c.start()
        try:
            await wait_until(lambda: ads.reqs(CLUSTER), what="first CDS request")
            assert not ads.reqs(ENDPOINT)
            first = ads.reqs(CLUSTER)[0]
            assert first.node.id == node().id

            # 1. a good response
            ads.send(cds(api, "v1", "n1", ["a"]))
            await wait_until(lambda: len(ads.reqs(CLUSTER)) == 2, what="ACK v1")
            ack = ads.reqs(CLUSTER)[-1]
            assert ack.response_nonce == "n1" and not is_nack(ack)
            if api == "GRPC":
                assert ack.version_info == "v1"
            assert h.names(CLUSTER) == {"a"}
            assert c.response_versions == {"a": "v1" if api == "GRPC" else "v1-a"}

            # 2. an unknown type URL: NACKed, stream goes on
            ads.send(discovery_pb2.DiscoveryResponse(version_info="x", nonce="n2",
                                                     type_url="type.googleapis.com/foo.Bar")
                     if api == "GRPC" else
                     discovery_pb2.DeltaDiscoveryResponse(system_version_info="x", nonce="n2",
                                                          type_url="type.googleapis.com/foo.Bar"))
            await wait_until(lambda: ads.reqs("type.googleapis.com/foo.Bar"), what="NACK foo")
            nk = ads.reqs("type.googleapis.com/foo.Bar")[0]
            assert is_nack(nk) and nk.response_nonce == "n2" and "foo.Bar" in nk.error_detail.message

            # 3. garbage bytes in the Any: NACK, nothing applied, last good version kept
            garbage = any_pb2.Any(type_url=CLUSTER, value=b"\x0a\xff\xff\xff\xff")
            ads.send(cds(api, "v2", "n3", ["b"], raw=[garbage]))
            await wait_until(lambda: len(ads.reqs(CLUSTER)) == 3, what="NACK garbage")
            nk = ads.reqs(CLUSTER)[-1]
            assert is_nack(nk) and nk.response_nonce == "n3" and nk.error_detail.code == 3
            assert "cannot decode" in nk.error_detail.message
            if api == "GRPC":
                assert nk.version_info == "v1"
            assert h.names(CLUSTER) == {"a"} and len(h.calls) == 1

            # 4. a resource of the wrong type inside a CDS response: NACK
            ads.send(cds(api, "v3", "n4", raw=[packed(listener_pb2.Listener(name="l"))]))
            await wait_until(lambda: len(ads.reqs(CLUSTER)) == 4, what="NACK mismatch")
            assert "type URL mismatch" in ads.reqs(CLUSTER)[-1].error_detail.message

            # 5. the same version again (identical content): ACKed, not re-applied
            ads.send(cds(api, "v1", "n5", ["a"]))
            await wait_until(lambda: len(ads.reqs(CLUSTER)) == 5, what="ACK same version")
            r = ads.reqs(CLUSTER)[-1]
            assert not is_nack(r) and r.response_nonce == "n5"
            assert len(h.calls) == 1

            # 6. two responses back to back: each ACKed with its own nonce, in order
            ads.send(cds(api, "v6", "n6", ["a", "b"]))
            ads.send(cds(api, "v7", "n7", ["b"] if api == "GRPC" else [], removed=["a"]))
            await wait_until(lambda: len(ads.reqs(CLUSTER)) == 7, what="two ACKs")
            assert [r.response_nonce for r in ads.reqs(CLUSTER)[-2:]] == ["n6", "n7"]
            assert h.names(CLUSTER) == {"b"}
            assert h.calls[-1][3] == {"a"}
            if api == "GRPC":
                assert ads.reqs(CLUSTER)[-1].version_info == "v7"

            # 7. duplicate names in one response: NACK
            ads.send(cds(api, "v8", "n8", ["c", "c"]))
            await wait_until(lambda: len(ads.reqs(CLUSTER)) == 8, what="NACK duplicate")
            assert "duplicate" in ads.reqs(CLUSTER)[-1].error_detail.message

            # 8. a handler bug (not a ConfigError) NACKs with INTERNAL and the stream survives
            boom["on"] = True
            ads.send(cds(api, "v9", "n9", ["d"]))
            await wait_until(lambda: len(ads.reqs(CLUSTER)) == 9, what="NACK handler bug")
            nk = ads.reqs(CLUSTER)[-1]
            assert is_nack(nk) and nk.error_detail.code == 13
            boom["on"] = False
            assert c.connected and ads.streams == 1

            # 9. the stream breaks mid-push: reconnect, re-subscribe, state intact
            ads.send(cds(api, "v10", "n10", ["b", "e"] if api == "GRPC" else ["e"]))
            ads.send("abort")
            await wait_until(lambda: ads.streams == 2 and ads.reqs(CLUSTER, stream=2),
                             what="re-subscribed on a new stream")
            assert h.names(CLUSTER) == {"b", "e"}
            r = ads.reqs(CLUSTER, stream=2)[0]
            assert r.response_nonce == "" and r.node.id == node().id
            if api == "GRPC":
                assert r.version_info == "v10" and list(r.resource_names) == []
            else:
                assert dict(r.initial_resource_versions) == {"b": "v6-b", "e": "v10-e"}
            st = c.type_state(CLUSTER)
            assert st["version_info"] == "v10" and st["last_error"] is None
            # still healthy on the new stream
            ads.send(cds(api, "v11", "m1", ["b", "e", "f"] if api == "GRPC" else ["f"]))
            await wait_until(lambda: h.names(CLUSTER) == {"b", "e", "f"}, what="push on stream 2")

            # 10. a response without a nonce is still answered (with an empty nonce)
            n = len(ads.reqs(CLUSTER))
            ads.send(cds(api, "v12", "", ["b", "e", "f", "g"] if api == "GRPC" else ["g"]))
            await wait_until(lambda: len(ads.reqs(CLUSTER)) == n + 1, what="ACK without nonce")
            r = ads.reqs(CLUSTER)[-1]
            assert r.response_nonce == "" and not is_nack(r) and "g" in h.names(CLUSTER)

            # 11. the server ends the stream cleanly (status OK): the client reconnects too
            ads.send("end")
            await wait_until(lambda: ads.streams == 3 and ads.reqs(CLUSTER, stream=3),
                             what="third stream")
            assert "closed by the server" in c.last_stream_error
        finally:
            await c.stop()
            await srv.stop(None)

    run(main(), timeout=20)


def test_sotw_named_subscription_and_node_every_request():
    async def main():
        srv, ads, port = await scripted_server()
        h = RecordingHandler()
        c = XdsClient(target="127.0.0.1:%d" % port, node=node(), api_type="GRPC", handler=h)
        c.subscribe(ENDPOINT, {"x", "y"})
        c.start()
        try:
            await wait_until(lambda: ads.reqs(ENDPOINT), what="EDS request")
            assert list(ads.reqs(ENDPOINT)[0].resource_names) == ["x", "y"]
            from envoy.config.endpoint.v3 import endpoint_pb2
            anys = [packed(endpoint_pb2.ClusterLoadAssignment(cluster_name=n)) for n in "xz"]
            ads.send(discovery_pb2.DiscoveryResponse(version_info="1", nonce="a", type_url=ENDPOINT,
                                                     resources=anys))
            await wait_until(lambda: len(ads.reqs(ENDPOINT)) == 2, what="ACK")
            # unrequested 'z' is ignored; absent 'y' is not a removal
            assert h.calls == [(ENDPOINT, "1", {"x": h.state[ENDPOINT]["x"]}, set(), True)]
            c.subscribe(ENDPOINT, {"y"})
            await wait_until(lambda: len(ads.reqs(ENDPOINT)) == 3, what="subscription change")
            r = ads.reqs(ENDPOINT)[-1]
            assert list(r.resource_names) == ["y"] and r.version_info == "1" and r.response_nonce == "a"
            assert all(q.node.id for q in ads.reqs())  # node on every request by default
        finally:
            await c.stop()
            await srv.stop(None)

    run(main(), timeout=10)


# ---------------------------------------------------------------------------------------------
# targets

def test_targets(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    c = cluster_pb2.Cluster(name="xds-grpc")
    c.load_assignment.endpoints.add().lb_endpoints.add().endpoint.address.pipe.path = \
        "./etc/istio/proxy/XDS"
    assert target_from_cluster(c) == "unix:" + str(tmp_path / "etc/istio/proxy/XDS")
    t = cluster_pb2.Cluster(name="tcp")
    sa = t.load_assignment.endpoints.add().lb_endpoints.add().endpoint.address.socket_address
    sa.address, sa.port_value = "127.0.0.1", 15010
    assert target_from_cluster(t) == "127.0.0.1:15010"
    sa.address = "::1"
    assert target_from_cluster(t) == "ipv6:[::1]:15010"
    gs = grpc_service_pb2.GrpcService()
    gs.envoy_grpc.cluster_name = "xds-grpc"
    assert target_from_grpc_service(gs, {"xds-grpc": c}).startswith("unix:/")
    gs.envoy_grpc.cluster_name = "missing"
    with pytest.raises(ConfigError, match="unknown cluster 'missing'"):
        target_from_grpc_service(gs, {"xds-grpc": c})
    g2 = grpc_service_pb2.GrpcService()
    g2.google_grpc.target_uri = "unix:rel/sock"
    assert target_from_grpc_service(g2, {}) == "unix:" + str(tmp_path / "rel/sock")
    g2.google_grpc.target_uri = "istiod.istio-system.svc:15010"
    assert target_from_grpc_service(g2, {}) == "istiod.istio-system.svc:15010"
    empty = cluster_pb2.Cluster(name="e")
    with pytest.raises(ConfigError, match="cluster 'e'.*no endpoints"):
        target_from_cluster(empty)
    acs = config_source_pb2.ApiConfigSource()
    with pytest.raises(ConfigError, match="grpc_services"):
        target_from_api_config_source(acs, {})
    acs.grpc_services.add().envoy_grpc.cluster_name = "xds-grpc"
    assert target_from_api_config_source(acs, {"xds-grpc": c}).endswith("etc/istio/proxy/XDS")
    with pytest.raises(ConfigError):
        XdsClient(target="x:1", node=node(), api_type="REST", handler=RecordingHandler())


def test_istio_bootstrap_target():
    import json
    from google.protobuf import json_format
    from envoy.config.bootstrap.v3 import bootstrap_pb2
    from pyproxy.config.registry import ensure_types_for_json
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..",
                        "shared", "testdata", "istio", "sidecar-bootstrap-envoy-rev.json")
    path = path if os.path.exists(path) else "/work/shared/testdata/istio/sidecar-bootstrap-envoy-rev.json"
    if not os.path.exists(path):
        pytest.skip("Istio testdata not available")
    raw = json.load(open(path))
    ensure_types_for_json(raw)
    b = json_format.ParseDict(raw, bootstrap_pb2.Bootstrap(), ignore_unknown_fields=True)
    clusters = {c.name: c for c in b.static_resources.clusters}
    ads = b.dynamic_resources.ads_config
    assert target_from_api_config_source(ads, clusters) == "unix:/tmp/XDS"
    assert config_source_pb2.ApiConfigSource.ApiType.Name(ads.api_type) == "DELTA_GRPC"


@pytest.mark.parametrize("api", APIS)
def test_istio_config_dumps_over_xds(tmp_path, api):
    """Every dynamic resource of the Istio testdata travels control plane -> client undamaged."""
    src = "/work/shared/testdata/istio"
    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..",
                        "shared", "testdata", "istio")
    src = here if os.path.isdir(here) else src
    if not os.path.isdir(src):
        pytest.skip("Istio testdata not available")
    d = tmp_path / "cfg"
    d.mkdir()
    # one file per dump would define some names twice with different content; keep the sidecar ones
    for name in ("sidecar-listeners-configdump.json", "sidecar-endpoints-configdump.json",
                 "sidecar-secrets-configdump.json"):
        with open(os.path.join(src, name)) as f:
            (d / name).write_text(f.read())
    from pyproxy.xds_client import SECRET

    async def main():
        cp = ControlPlane(str(d), port=0, poll_interval=0.05)
        await cp.start()
        want = {t: set(by) for t, by in cp.snapshot.items()}
        h = RecordingHandler()
        c = XdsClient(target="127.0.0.1:%d" % cp.port, node=node(), api_type=api, handler=h)
        c.subscribe(LISTENER, None)
        c.subscribe(ENDPOINT, want[ENDPOINT])
        c.subscribe(SECRET, want[SECRET])
        c.start()
        try:
            await wait_until(lambda: all(h.names(t) == want[t] for t in want), what="all resources")
            assert not cp.nacks and len(want[LISTENER]) == 27 and len(want[ENDPOINT]) == 32
            # Istio's filter configs arrive as TypedStruct that the registry sees through
            from pyproxy.config.registry import type_name_of
            types = {type_name_of(f.typed_config) for lst in h.state[LISTENER].values()
                     for fc in lst.filter_chains for f in fc.filters}
            assert "envoy.tcp.metadataexchange.config.MetadataExchange" in types
        finally:
            await c.stop()
            await cp.stop()

    run(main(), timeout=15)


def test_client_under_uvloop(tmp_path):
    uvloop = pytest.importorskip("uvloop")
    d = str(tmp_path)
    write_config(d, ["c1"], {"c1": [8001]}, {"l1": "r1"}, {"r1": "c1"})
    sock = str(tmp_path / "x.sock")

    async def main():
        cp = ControlPlane(d, port=None, uds=sock, poll_interval=0.05)
        await cp.start()
        h = RecordingHandler()
        c = make_client("unix:" + sock, "DELTA_GRPC", h)
        c.start()
        try:
            await wait_until(lambda: h.names(ROUTE) == {"r1"} and h.names(ENDPOINT) == {"c1"},
                             what="initial push under uvloop")
            write_config(d, ["c1"], {"c1": [8001, 8002]}, {"l1": "r1"}, {"r1": "c1"})
            await wait_until(lambda: ports_of(h.state[ENDPOINT]["c1"]) == [8001, 8002],
                             what="update under uvloop")
        finally:
            await c.stop()
            await cp.stop()

    async def bounded():
        return await asyncio.wait_for(main(), 15)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(bounded())


def test_decode_any():
    from pyproxy.xds_client import decode_any
    cl = cluster_pb2.Cluster(name="w")
    wrapped = packed(discovery_pb2.Resource(name="w", version="1", resource=packed(cl)))
    assert decode_any(wrapped, CLUSTER).name == "w"
    with pytest.raises(ConfigError, match="no resource"):
        decode_any(packed(discovery_pb2.Resource(name="w")), CLUSTER)
    with pytest.raises(ConfigError, match="type URL mismatch"):
        decode_any(packed(cl), LISTENER)
    with pytest.raises(ConfigError, match="unknown type URL"):
        decode_any(any_pb2.Any(type_url="type.googleapis.com/no.Such"), "type.googleapis.com/no.Such")
    with pytest.raises(ConfigError, match="cannot decode"):
        decode_any(any_pb2.Any(type_url=CLUSTER, value=b"\x0a\x05ab"), CLUSTER)


def test_backoff_is_jittered_and_bounded():
    c = XdsClient(target="127.0.0.1:1", node=node(), api_type="GRPC", handler=RecordingHandler(),
                  initial_backoff=0.5, max_backoff=4.0)
    for attempt, cap in [(0, 0.5), (1, 1.0), (2, 2.0), (3, 4.0), (10, 4.0), (100, 4.0)]:
        vals = [c._backoff(attempt) for _ in range(400)]
        # Envoy's full jitter: uniform below the bound (so the spread covers the whole range)
        assert all(0 <= v <= cap for v in vals) and len(set(vals)) > 1
        assert min(vals) < cap * 0.2 and max(vals) > cap * 0.8
    with pytest.raises(ValueError):
        XdsClient(target="x:1", node=node(), api_type="GRPC", handler=RecordingHandler(),
                  initial_backoff=2, max_backoff=1)
