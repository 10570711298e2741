"""End to end, bad input: a real pyproxy process against a test-local ADS server that misbehaves.
Never a crash, never a half-applied update, the data path unaffected."""

from __future__ import annotations

import time

import pytest
from google.protobuf import any_pb2
from envoy.service.discovery.v3 import discovery_pb2

from pyproxy.control_plane import parse_resource

from test_xds_e2e_helpers import (  # noqa: F401 (env is a fixture)
    env, CLUSTER, LISTENER, ScriptedAds, body, bootstrap, dynamic_names, free_port, http_listener,
    route_config, try_get, wait_for)


def static_cluster(name, port):
    return {"@type": "Cluster", "name": name, "type": "STATIC", "connect_timeout": "1s",
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]}}


class Responder:
    """Builds SotW or delta responses from control-plane-format dicts."""

    def __init__(self, api):
        self.api = api
        self.n = 0

    def __call__(self, type_url, version, resources=(), removed=(), raw=()):
        self.n += 1
        nonce = "n%d" % self.n
        anys = [parse_resource(r, "<test>").any for r in resources] + list(raw)
        names = [r.get("name") or r.get("cluster_name") for r in resources] + \
            ["raw%d" % i for i in range(len(raw))]
        if self.api == "GRPC":
            return discovery_pb2.DiscoveryResponse(version_info=version, type_url=type_url, nonce=nonce,
                                                   resources=anys)
        r = discovery_pb2.DeltaDiscoveryResponse(system_version_info=version, type_url=type_url,
                                                 nonce=nonce, removed_resources=list(removed))
        for name, a in zip(names, anys):
            r.resources.add(name=name, version="%s-%s" % (name, version)).resource.CopyFrom(a)
        return r


def is_nack(r):
    return r.HasField("error_detail")


def answers(ads, type_url, nonce):
    return [r for r in ads.reqs(type_url) if r.response_nonce == nonce]


@pytest.mark.parametrize("api", ["GRPC", "DELTA_GRPC"])
def test_bad_input_never_breaks_the_data_path(env, api):
    a, b = env.backend("A"), env.backend("B")
    p1, p2 = free_port(), free_port()
    ads = ScriptedAds(env.loop)
    resp = Responder(api)
    px = env.proxy(bootstrap(api, port=ads.port))
    wait_for(lambda: {r.type_url for r in ads.reqs()} >= {CLUSTER, LISTENER}, 5, "CDS and LDS requests")
    assert px.ready() == "INITIALIZING"
    first = ads.reqs()[0]
    assert first.node.id.startswith("sidecar~") and first.type_url == CLUSTER   # CDS first
    assert not any(r.HasField("node") for r in ads.reqs()[1:])     # set_node_on_first_message_only

    c1, c2 = static_cluster("c1", a.port), static_cluster("c2", b.port)
    l1 = http_listener("l1", p1, route_config=route_config("x", ("/", "c1")))
    ok = resp(CLUSTER, "1", [c1])
    ads.send(ok, resp(LISTENER, "1", [l1]))
    wait_for(lambda: px.ready() == "LIVE", 5, "LIVE")
    assert body(p1) == "A"

    def stats():
        s = px.stats("cds|lds")
        return (s["cluster_manager.cds.update_attempt"], s["cluster_manager.cds.update_success"],
                s["cluster_manager.cds.update_rejected"], s["cluster_manager.cds.version"])

    def check_nacked(r, *words):
        ads.send(r)
        wait_for(lambda: answers(ads, r.type_url, r.nonce), 5, "answer to %s" % r.nonce)
        ans = answers(ads, r.type_url, r.nonce)[-1]
        assert is_nack(ans), "expected a NACK for %s" % r.nonce
        for w in words:
            assert w in ans.error_detail.message, (w, ans.error_detail.message)
        if api == "GRPC" and r.type_url == CLUSTER:
            assert ans.version_info == "1"       # the last good version
        assert px.alive() and body(p1) == "A"
        return ans

    s0 = stats()
    # 1. an unknown type URL
    check_nacked(resp("type.googleapis.com/acme.v1.Gadget", "9"), "acme.v1.Gadget")
    # 2. an undecodable resource of a known type
    junk = any_pb2.Any(type_url=CLUSTER, value=b"\xff\xff\xff\x0f garbage")
    check_nacked(resp(CLUSTER, "2", raw=[junk]), "decode")
    # 3. a resource whose type is not the response's
    check_nacked(resp(CLUSTER, "3", [l1]), "mismatch")
    # 4. one invalid resource with valid ones: as Envoy, the good ones are applied, the bad one is not
    # (and named in the NACK); the version stays the last fully accepted one
    bad = dict(static_cluster("c3", b.port), lb_policy="CLUSTER_PROVIDED")
    ans = check_nacked(resp(CLUSTER, "4", [c1, c2, bad]), "cluster(s) c3: ", "lb_policy")
    assert "c2" not in ans.error_detail.message.replace("c3", "")
    assert set(dynamic_names(px.config_dump())["clusters"]) == {"c1", "c2"}
    s = stats()
    assert s[2] == s0[2] + 1 and s[3] == s0[3]   # rejected once (1-3 never reach the config)
    assert s[1] == s0[1]                         # and not counted a success
    # 5. the last good version again: applied (c2, which it lacks, goes: the response holds the full
    # state; delta says so), ACKed; once more: ACKed, nothing re-applied
    again = resp(CLUSTER, "1", [c1], removed=["c2"])
    ads.send(again)
    wait_for(lambda: answers(ads, CLUSTER, again.nonce), 5, "ACK of the same version")
    assert not is_nack(answers(ads, CLUSTER, again.nonce)[-1])
    assert set(dynamic_names(px.config_dump())["clusters"]) == {"c1"}
    s = stats()
    again = resp(CLUSTER, "1", [c1])
    ads.send(again)
    wait_for(lambda: answers(ads, CLUSTER, again.nonce), 5, "ACK of the same version")
    assert not is_nack(answers(ads, CLUSTER, again.nonce)[-1])
    assert stats()[0] == s[0]                    # no update attempt: nothing to apply
    # 6. a malformed response on the wire: the stream fails, pyproxy reconnects and re-subscribes
    streams = ads.streams
    ads.send(b"\x0a\xff\xff\xff\xff\x0f\x01")
    wait_for(lambda: ads.streams > streams and ads.reqs(CLUSTER, stream=ads.streams), 5, "re-subscription")
    assert px.alive() and body(p1) == "A"
    re = ads.reqs(stream=ads.streams)
    assert re[0].HasField("node") and re[0].type_url == CLUSTER
    if api == "GRPC":
        assert re[0].version_info == "1"
    else:
        assert dict(re[0].initial_resource_versions) == {"c1": "c1-1"}
    # 7. the stream breaks in the middle of a push: CDS arrived, LDS did not
    l2 = http_listener("l2", p2, route_config=route_config("y", ("/", "c2")))
    cds5 = resp(CLUSTER, "5", [c1, c2])
    ads.send(cds5, "abort")
    wait_for(lambda: ads.streams > streams + 1, 5, "reconnect after abort")
    assert px.alive() and body(p1) == "A"
    assert set(dynamic_names(px.config_dump())["clusters"]) <= {"c1", "c2"}
    assert try_get(p2, timeout=0.5)[0] is None   # l2 never arrived
    # the new stream finishes the push
    ads.send(resp(CLUSTER, "5", [c1, c2]), resp(LISTENER, "5", [l1, l2]))
    wait_for(lambda: try_get(p2)[0] == 200, 5, "l2 after reconnect")
    assert body(p2) == "B" and body(p1) == "A"
    st = px.stats("cds|lds")
    assert st["cluster_manager.cds.update_rejected"] == s0[2] + 1
    assert st["listener_manager.lds.update_rejected"] == 0
    ads.stop()


def test_malformed_response_is_reported_clearly(env):
    ads = ScriptedAds(env.loop)
    px = env.proxy(bootstrap("GRPC", port=ads.port))
    wait_for(lambda: ads.reqs(CLUSTER), 5, "CDS request")
    ads.send(b"\x0a\xff\xff\xff\xff\x0f\x01")
    wait_for(lambda: ads.streams > 1, 5, "reconnect")
    assert px.alive()
    log = px.log_text()
    assert "Traceback" not in log and "malformed" in log.lower(), log
    ads.stop()


@pytest.mark.parametrize("timeout,live", [("0.4s", True), ("0s", False)])
def test_cds_lds_initial_fetch_timeout(env, timeout, live):
    """A server that never answers: with initial_fetch_timeout the server goes LIVE when it
    elapses (init_fetch_timeout counted); with 0s it waits forever, as Istio configures it."""
    ads = ScriptedAds(env.loop)
    px = env.proxy(bootstrap("DELTA_GRPC", port=ads.port, cds_timeout=timeout, lds_timeout=timeout))
    wait_for(lambda: {r.type_url for r in ads.reqs()} >= {CLUSTER, LISTENER}, 5, "requests")
    if live:
        wait_for(lambda: px.ready() == "LIVE", 5, "LIVE after the initial fetch timeout")
        st = px.stats("init_fetch_timeout")
        assert st["cluster_manager.cds.init_fetch_timeout"] == 1
        assert st["listener_manager.lds.init_fetch_timeout"] == 1
    else:
        time.sleep(1.0)
        assert px.ready() == "INITIALIZING" and px.stats("server.state")["server.state"] == 3
    ads.stop()


def test_per_type_config_source_is_rejected_clearly(tmp_path):
    """Only ADS is spoken: a per-type api_config_source is refused at start with a precise error."""
    import subprocess
    import sys
    boot = {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "dynamic_resources": {"cds_config": {"resource_api_version": "V3", "api_config_source": {
            "api_type": "GRPC", "transport_api_version": "V3",
            "grpc_services": [{"envoy_grpc": {"cluster_name": "xds"}}]}}},
        "static_resources": {"clusters": [{
            "name": "xds", "type": "STATIC", "connect_timeout": "1s",
            "load_assignment": {"cluster_name": "xds", "endpoints": [{"lb_endpoints": [{"endpoint": {
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": 9}}}}]}]}}]},
    }
    path = tmp_path / "bs.json"
    path.write_text(__import__("json").dumps(boot))
    root = __import__("os").path.dirname(__import__("os").path.dirname(__import__("os").path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-m", "pyproxy", "-c", str(path), "-l", "error"], cwd=root,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1
    assert "dynamic_resources.cds_config" in r.stderr and "api_config_source" in r.stderr, r.stderr
