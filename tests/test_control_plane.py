"""The file-driven control plane: file formats, protocol details seen by raw gRPC clients, the CLI,
and real Envoy as its client."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request

import grpc
import pytest

from envoy.config.listener.v3 import listener_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from pyproxy.config.errors import ConfigError
from pyproxy.config.registry import type_name_of
from pyproxy.control_plane import ControlPlane, load_dir, load_file, main
from pyproxy.xds_client import CLUSTER, ENDPOINT, LISTENER, ROUTE

from xds_util import ROOT, cluster, endpoints, listener, route, run, wait_until, write_json

TESTDATA = os.path.join(os.path.dirname(ROOT), "shared", "testdata", "istio")
if not os.path.isdir(TESTDATA):
    TESTDATA = "/work/shared/testdata/istio"


# ---------------------------------------------------------------------------------------------
# files

@pytest.mark.skipif(not os.path.isdir(TESTDATA), reason="Istio testdata not available")
def test_istio_config_dumps_load():
    counts = {}
    for name in sorted(os.listdir(TESTDATA)):
        if name.endswith("configdump.json"):
            for r in load_file(os.path.join(TESTDATA, name)):
                counts[(name, r.type_url.rpartition(".")[2])] = counts.get(
                    (name, r.type_url.rpartition(".")[2]), 0) + 1
    assert counts[("sidecar-listeners-configdump.json", "Listener")] == 27
    assert counts[("sidecar-endpoints-configdump.json", "ClusterLoadAssignment")] == 32
    assert counts[("sidecar-http-clusters-configdump.json", "Cluster")] == 1
    assert counts[("sidecar-http-clusters-configdump.json", "RouteConfiguration")] == 1
    assert counts[("waypoint-full-configdump.json", "Listener")] == 1
    assert ("waypoint-full-configdump.json", "Secret") in counts
    # Istio's own filter types arrive as xds.type.v3.TypedStruct or, where pyproxy knows their
    # proto (config/istio_protos.py), as that type; either way they keep their type name
    lst = {r.name: r for r in load_file(os.path.join(TESTDATA, "sidecar-listeners-configdump.json"))}
    found = set()
    for r in lst.values():
        msg = listener_pb2.Listener()
        r.any.Unpack(msg)
        for fc in msg.filter_chains:
            for f in fc.filters:
                found.add(type_name_of(f.typed_config))
    assert "io.istio.network.authn.Config" in found or \
        "envoy.tcp.metadataexchange.config.MetadataExchange" in found


def test_file_formats(tmp_path):
    d = tmp_path
    (d / "a.yaml").write_text(
        "- '@type': Cluster\n  name: c1\n  connect_timeout: 1s\n"
        "---\n"
        "resources:\n- '@type': type.googleapis.com/envoy.config.cluster.v3.Cluster\n  name: c2\n"
        "---\n"
        "'@type': envoy.config.endpoint.v3.ClusterLoadAssignment\ncluster_name: c1\n")
    write_json(str(d / "b.json"), [route("r1", "c1")])
    (d / ".hidden.yaml").write_text("garbage: [")
    (d / "notes.txt").write_text("ignored")
    snap = load_dir(str(d))
    assert sorted(snap[CLUSTER]) == ["c1", "c2"]
    assert sorted(snap[ENDPOINT]) == ["c1"] and sorted(snap[ROUTE]) == ["r1"]
    v1 = snap[CLUSTER]["c1"].version
    (d / "a.yaml").write_text("- {'@type': Cluster, name: c1, connect_timeout: 2s}\n")
    assert load_dir(str(d))[CLUSTER]["c1"].version != v1


@pytest.mark.parametrize("content,match", [
    ("- {'@type': Nope, name: x}\n", "unknown resource type 'Nope'"),
    ("- {'@type': Cluster, name: x, connect_timeout: soon}\n", "invalid Cluster"),
    ("- {'@type': Cluster, name: x, no_such_field: 1}\n", "no_such_field"),
    ("- {'@type': Cluster}\n", "has no name"),
    ("- {name: x}\n", "missing '@type'"),
    ("just a string\n", "expected a list"),
    ("resources: 3\n", "must be a list"),
    ("[unclosed\n", "cannot parse"),
])
def test_file_errors(tmp_path, content, match):
    (tmp_path / "bad.yaml").write_text(content)
    with pytest.raises(ConfigError, match=match) as ei:
        load_dir(str(tmp_path))
    assert "bad.yaml" in str(ei.value)


def test_duplicate_definition(tmp_path):
    write_json(str(tmp_path / "a.json"), [cluster("c1")])
    c = cluster("c1")
    c["connect_timeout"] = "5s"
    write_json(str(tmp_path / "b.json"), [c])
    with pytest.raises(ConfigError, match="defined twice"):
        load_dir(str(tmp_path))


# ---------------------------------------------------------------------------------------------
# protocol, with raw gRPC streams

class RawStream:
    def __init__(self, target: str, delta: bool):
        self.channel = grpc.aio.insecure_channel(target)
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self.channel)
        self.call = stub.DeltaAggregatedResources() if delta else stub.StreamAggregatedResources()
        self._pending = None

    async def send(self, req):
        await self.call.write(req)

    async def _read(self, timeout: float):
        # A read that times out stays pending for the next call: cancelling it would cancel the RPC.
        if self._pending is None:
            self._pending = asyncio.ensure_future(self.call.read())
        done, _ = await asyncio.wait([self._pending], timeout=timeout)
        if not done:
            return None
        fut, self._pending = self._pending, None
        return fut.result()

    async def recv(self, timeout: float = 3.0):
        r = await self._read(timeout)
        if r is None:
            raise AssertionError("no response within %.1fs" % timeout)
        return r

    async def expect_nothing(self, wait: float = 0.3):
        r = await self._read(wait)
        if r is not None:
            raise AssertionError("unexpected response: %s" % r)

    async def close(self):
        if self._pending is not None:
            self._pending.cancel()
        self.call.cancel()
        await self.channel.close()


def test_sotw_stale_nonce_and_names(tmp_path):
    write_json(str(tmp_path / "r.json"), [cluster("c1"), cluster("c2"), endpoints("c1", 1),
                                          endpoints("c2", 2)])

    async def main():
        cp = ControlPlane(str(tmp_path), port=0, poll_interval=0.05)
        await cp.start()
        s = RawStream("127.0.0.1:%d" % cp.port, delta=False)
        try:
            await s.send(discovery_pb2.DiscoveryRequest(type_url=ENDPOINT, resource_names=["c1"]))
            r1 = await s.recv()
            assert [a.type_url for a in r1.resources] == [ENDPOINT] and r1.version_info == "1"
            # a request with a stale nonce is ignored, even with new names
            await s.send(discovery_pb2.DiscoveryRequest(type_url=ENDPOINT, resource_names=["c1", "c2"],
                                                        response_nonce="stale", version_info="1"))
            await s.expect_nothing()
            # the same with the right nonce: answered with both
            await s.send(discovery_pb2.DiscoveryRequest(type_url=ENDPOINT, resource_names=["c1", "c2"],
                                                        response_nonce=r1.nonce, version_info="1"))
            r2 = await s.recv()
            assert len(r2.resources) == 2 and r2.nonce != r1.nonce
            # an ACK without changes gets no response
            await s.send(discovery_pb2.DiscoveryRequest(type_url=ENDPOINT, resource_names=["c1", "c2"],
                                                        response_nonce=r2.nonce, version_info="1"))
            await s.expect_nothing()
            assert cp.acks[-1]["nonce"] == r2.nonce
            # a change to a resource not subscribed: nothing; to one subscribed: pushed
            await s.send(discovery_pb2.DiscoveryRequest(type_url=ENDPOINT, resource_names=["c1"],
                                                        response_nonce=r2.nonce, version_info="1"))
            r3 = await s.recv()
            await s.send(discovery_pb2.DiscoveryRequest(type_url=ENDPOINT, resource_names=["c1"],
                                                        response_nonce=r3.nonce, version_info="1"))
            write_json(str(tmp_path / "r.json"), [cluster("c1"), cluster("c2"), endpoints("c1", 1),
                                                  endpoints("c2", 3)])
            await wait_until(lambda: cp.version == 2, what="reload")
            await s.expect_nothing()
            write_json(str(tmp_path / "r.json"), [cluster("c1"), cluster("c2"), endpoints("c1", 4),
                                                  endpoints("c2", 3)])
            r4 = await s.recv()
            assert r4.version_info == "3" and len(r4.resources) == 1
        finally:
            await s.close()
            await cp.stop()

    run(main())


def test_delta_initial_resource_versions_and_removal(tmp_path):
    write_json(str(tmp_path / "r.json"), [cluster("c1"), cluster("c2")])

    async def main():
        cp = ControlPlane(str(tmp_path), port=0, poll_interval=0.05)
        await cp.start()
        c1v = cp.snapshot[CLUSTER]["c1"].version
        s = RawStream("127.0.0.1:%d" % cp.port, delta=True)
        try:
            req = discovery_pb2.DeltaDiscoveryRequest(type_url=CLUSTER)
            req.initial_resource_versions["c1"] = c1v
            req.initial_resource_versions["gone"] = "old"
            await s.send(req)
            r = await s.recv()
            assert [x.name for x in r.resources] == ["c2"]        # c1 is up to date
            assert list(r.removed_resources) == ["gone"]
            await s.send(discovery_pb2.DeltaDiscoveryRequest(type_url=CLUSTER, response_nonce=r.nonce))
            await wait_until(lambda: cp.acks, what="ACK")
            # NACK: the client kept what it had, so the next change resends the rejected ones too
            write_json(str(tmp_path / "r.json"), [cluster("c2"), cluster("c3")])
            r2 = await s.recv()
            assert [x.name for x in r2.resources] == ["c3"] and list(r2.removed_resources) == ["c1"]
            nack = discovery_pb2.DeltaDiscoveryRequest(type_url=CLUSTER, response_nonce=r2.nonce)
            nack.error_detail.code, nack.error_detail.message = 3, "c3 is bad"
            await s.send(nack)
            await wait_until(lambda: cp.nacks, what="NACK recorded")
            assert cp.nacks[-1]["error"] == "c3 is bad" and cp.nacks[-1]["code"] == 3
            write_json(str(tmp_path / "r.json"), [cluster("c2"), cluster("c3"), cluster("c4")])
            r3 = await s.recv()
            assert sorted(x.name for x in r3.resources) == ["c3", "c4"]
            assert list(r3.removed_resources) == ["c1"]
            # named subscriptions on another type: subscribe, unsubscribe
            write_json(str(tmp_path / "r.json"), [cluster("c2"), endpoints("c2", 5),
                                                  endpoints("c9", 9)])
            r4 = await s.recv()
            assert sorted(r4.removed_resources) == ["c3", "c4"]
            await s.send(discovery_pb2.DeltaDiscoveryRequest(type_url=ENDPOINT,
                                                             resource_names_subscribe=["c2", "zz"]))
            r5 = await s.recv()
            assert [x.name for x in r5.resources] == ["c2"] and r5.type_url == ENDPOINT
            await s.send(discovery_pb2.DeltaDiscoveryRequest(type_url=ENDPOINT,
                                                             resource_names_unsubscribe=["c2"]))
            write_json(str(tmp_path / "r.json"), [cluster("c2"), endpoints("c2", 6)])
            await wait_until(lambda: cp.version == 5, what="reload")
            await s.expect_nothing()
        finally:
            await s.close()
            await cp.stop()

    run(main())


def test_invalid_file_keeps_last_good(tmp_path):
    write_json(str(tmp_path / "r.json"), [cluster("c1")])

    async def main():
        cp = ControlPlane(str(tmp_path), port=0, poll_interval=0.05)
        await cp.start()
        s = RawStream("127.0.0.1:%d" % cp.port, delta=False)
        try:
            await s.send(discovery_pb2.DiscoveryRequest(type_url=CLUSTER))
            r1 = await s.recv()
            await s.send(discovery_pb2.DiscoveryRequest(type_url=CLUSTER, response_nonce=r1.nonce,
                                                        version_info=r1.version_info))
            (tmp_path / "r.json").write_text('[{"@type": "Cluster", "name": ')
            await wait_until(lambda: cp.load_error, what="load error")
            assert "r.json" in cp.load_error and cp.version == 1
            await s.expect_nothing()
            write_json(str(tmp_path / "r.json"), [cluster("c1"), cluster("c2")])
            r2 = await s.recv()
            assert r2.version_info == "2" and len(r2.resources) == 2 and cp.load_error is None
        finally:
            await s.close()
            await cp.stop()

    run(main())


# ---------------------------------------------------------------------------------------------
# CLI

def test_cli_usage_errors(tmp_path):
    assert main(["--config-dir", str(tmp_path)]) == 2
    with pytest.raises(SystemExit):
        main([])


def test_cli_serves_and_exits_on_sigterm(tmp_path):
    write_json(str(tmp_path / "r.json"), [cluster("c1")])
    status = tmp_path / "status.json"
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.Popen([sys.executable, "-m", "pyproxy.control_plane", "--config-dir",
                          str(tmp_path), "--port", "0", "--status-file", str(status)],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
                         cwd=ROOT)
    try:
        line = p.stdout.readline()
        assert line.startswith("listening port=")
        port = int(line.split("port=")[1].split()[0])

        async def main_():
            s = RawStream("127.0.0.1:%d" % port, delta=False)
            try:
                await s.send(discovery_pb2.DiscoveryRequest(type_url=CLUSTER))
                r = await s.recv()
                assert r.resources[0].type_url == CLUSTER
            finally:
                await s.close()
        run(main_(), timeout=10)
        st = json.loads(status.read_text())
        assert st["resources"] == {CLUSTER: ["c1"]} and st["version"] == 1
        p.terminate()
        assert p.wait(timeout=5) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=5)
        p.stdout.close()


# ---------------------------------------------------------------------------------------------
# real Envoy as the client

ENVOY = shutil.which("envoy")


def envoy_bootstrap(sock: str, api: str) -> dict:
    return {
        "node": {"id": "envoy-test", "cluster": "test"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "dynamic_resources": {
            "ads_config": {"api_type": api, "transport_api_version": "V3",
                           "set_node_on_first_message_only": True,
                           "grpc_services": [{"envoy_grpc": {"cluster_name": "xds-grpc"}}]},
            "cds_config": {"ads": {}, "resource_api_version": "V3", "initial_fetch_timeout": "0s"},
            "lds_config": {"ads": {}, "resource_api_version": "V3", "initial_fetch_timeout": "0s"},
        },
        "static_resources": {"clusters": [{
            "name": "xds-grpc", "type": "STATIC", "connect_timeout": "1s",
            "typed_extension_protocol_options": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}}}},
            "load_assignment": {"cluster_name": "xds-grpc", "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"pipe": {"path": sock}}}}]}]}}]},
    }


@pytest.mark.skipif(ENVOY is None, reason="envoy binary not on PATH")
@pytest.mark.parametrize("api", ["GRPC", "DELTA_GRPC"])
def test_real_envoy_takes_the_config(tmp_path, api):
    cfg = tmp_path / "cfg"
    cfg.mkdir()
    lst = listener("l1", 0, "r1")
    write_json(str(cfg / "r.json"), [cluster("c1"), endpoints("c1", 8001), lst, route("r1", "c1")])
    sock = tempfile.mktemp(prefix="xds-", suffix=".sock", dir="/tmp")
    boot = tmp_path / "envoy.json"
    boot.write_text(json.dumps(envoy_bootstrap(sock, api)))
    admin_file = tmp_path / "admin"

    def config_dump(port):
        with urllib.request.urlopen("http://127.0.0.1:%d/config_dump?include_eds" % port,
                                    timeout=2) as r:
            return json.loads(r.read())

    def names(dump, section_type, key, inner, namefield="name"):
        out = set()
        for c in dump["configs"]:
            if c["@type"].endswith(section_type):
                for e in c.get(key, []):
                    res = e.get(inner) if inner != "listener" else (e.get("active_state") or {}).get(
                        "listener")
                    if res:
                        out.add(res.get(namefield))
        return out

    async def main():
        cp = ControlPlane(str(cfg), port=None, uds=sock, poll_interval=0.05)
        await cp.start()
        proc = subprocess.Popen([ENVOY, "-c", str(boot), "--admin-address-path", str(admin_file),
                                 "--use-dynamic-base-id", "-l", "warning",
                                 "--concurrency", "1"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            await wait_until(lambda: admin_file.exists() and admin_file.read_text().strip(),
                             timeout=10, what="envoy admin address")
            port = int(admin_file.read_text().strip().rsplit(":", 1)[1])
            await wait_until(lambda: {a["type_url"] for a in cp.acks} >= {CLUSTER, ENDPOINT,
                                                                           LISTENER, ROUTE},
                             timeout=10, what="Envoy ACKs for CDS/EDS/LDS/RDS")
            dump = await asyncio.to_thread(config_dump, port)
            assert "c1" in names(dump, "ClustersConfigDump", "dynamic_active_clusters", "cluster")
            assert "l1" in names(dump, "ListenersConfigDump", "dynamic_listeners", "listener")
            assert "r1" in names(dump, "RoutesConfigDump", "dynamic_route_configs", "route_config")
            assert "c1" in names(dump, "EndpointsConfigDump", "dynamic_endpoint_configs",
                                 "endpoint_config", "cluster_name")
            assert not cp.nacks
            assert cp.streams_total == 1 and list(cp.streams.values())[0].api == (
                "sotw" if api == "GRPC" else "delta")
            # an invalid route config: Envoy NACKs it and the control plane records why
            bad = route("r1", "c1")
            bad["virtual_hosts"].append(dict(bad["virtual_hosts"][0], name="dup"))
            write_json(str(cfg / "r.json"), [cluster("c1"), endpoints("c1", 8001), lst, bad])
            await wait_until(lambda: cp.nacks, timeout=10, what="Envoy NACK")
            assert cp.nacks[-1]["type_url"] == ROUTE and "single wildcard domain" in cp.nacks[-1]["error"]
            # fixed: accepted again, with a new endpoint
            write_json(str(cfg / "r.json"), [cluster("c1"), endpoints("c1", 8001, 8002), lst,
                                              route("r1", "c1", "/x")])
            n = len(cp.acks)
            await wait_until(lambda: any(a["type_url"] == ROUTE for a in cp.acks[n:]), timeout=10,
                             what="ACK after fix")
            dump = await asyncio.to_thread(config_dump, port)
            text = json.dumps(dump)
            assert '"/x"' in text and "8002" in text
        finally:
            proc.kill()
            proc.wait(timeout=10)
            await cp.stop()

    run(main(), timeout=30)


def test_set_resources_in_process(tmp_path):
    async def main():
        cp = ControlPlane(str(tmp_path), port=0)
        await cp.start()
        try:
            assert cp.version == 0 or not cp.snapshot
            assert cp.set_resources([cluster("a"), endpoints("a", 1)])
            v = cp.version
            assert not cp.set_resources([cluster("a"), endpoints("a", 1)])   # no change
            assert cp.version == v and sorted(cp.snapshot[CLUSTER]) == ["a"]
        finally:
            await cp.stop()
    run(main())
