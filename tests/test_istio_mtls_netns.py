"""Two pods (network namespaces) with pyproxy sidecars behind init/istio-iptables, talking Istio
mTLS with workload certificates from a pilot-agent-shaped SDS server in each pod's directory
(the relative ``./var/run/secrets/workload-spiffe-uds/socket``).

Pod b serves port 8080 STRICT and port 9090 PERMISSIVE (virtualInbound chains by destination port,
transport and offered ALPN). App a (uid 1000) calls b: captured into a's virtualOutbound (15001),
out as mTLS with a's SPIFFE id (auto-mTLS, istio.alpn, b's id checked), captured into b's
virtualInbound (15006), terminated, and delivered to b's app from 127.0.0.6. A plaintext client
that is not in the mesh (uid 1337 in pod a is not captured) is refused on 8080 (STRICT) and served
on 9090 (PERMISSIVE).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

from sds_util import (TP, AgentSds, cert_secret, istio_downstream_tls, istio_upstream_tls, root_secret,
                      sds_grpc_cluster, spiffe)
from tls_certs import Pki

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from scripts.netns_mesh import APP_UID, IPTABLES_FLAGS, PROXY_UID, as_user  # noqa: E402
from tests.netns import NetnsEnv, netns_unavailable_reason  # noqa: E402

MTLS_HTTP = ["istio-http/1.0", "istio-http/1.1", "istio-h2"]
MTLS_TCP = ["istio-peer-exchange", "istio"]
HCM_T = TP + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
TCP_T = TP + "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
ALPN_T = TP + "istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig"


def _router():
    return {"name": "envoy.filters.http.router", "typed_config": {"@type": TP + "envoy.extensions.filters.http.router.v3.Router"}}


def _hcm(stat, cluster, direction):
    filters = []
    if direction == "outbound":
        filters.append({"name": "istio.alpn", "typed_config": {"@type": ALPN_T, "alpn_override": [
            {"alpn_override": ["istio-http/1.0", "istio", "http/1.0"]},
            {"upstream_protocol": "HTTP11", "alpn_override": ["istio-http/1.1", "istio", "http/1.1"]},
            {"upstream_protocol": "HTTP2", "alpn_override": ["istio-h2", "istio", "h2"]}]}})
    filters.append(_router())
    h = {"@type": HCM_T, "stat_prefix": stat, "codec_type": "AUTO", "http_filters": filters,
         "route_config": {"name": stat, "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
             {"match": {"prefix": "/"}, "route": {"cluster": cluster, "timeout": "5s"}}]}]}}
    if direction == "inbound":
        h["forward_client_cert_details"] = "APPEND_FORWARD"
        h["set_current_client_cert_details"] = {"subject": True, "uri": True, "dns": True}
    return {"name": "envoy.filters.network.http_connection_manager", "typed_config": h}


def _tcp(stat, cluster):
    return {"name": "envoy.filters.network.tcp_proxy", "typed_config": {"@type": TCP_T, "stat_prefix": stat, "cluster": cluster}}


def _inbound_cluster(port):
    return {"name": "inbound|%d||" % port, "type": "STATIC", "connect_timeout": "1s",
            "upstream_bind_config": {"source_address": {"address": "127.0.0.6", "port_value": 0}},
            "load_assignment": {"cluster_name": "inbound|%d||" % port, "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]}}


def _outbound_cluster(name, ip, port, sa, tls_mode="istio"):
    ep = {"endpoint": {"address": {"socket_address": {"address": ip, "port_value": port}}}}
    if tls_mode:
        ep["metadata"] = {"filter_metadata": {"envoy.transport_socket_match": {"tlsMode": tls_mode}}}
    return {"name": name, "type": "STATIC", "connect_timeout": "1s",
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [ep]}]},
            "transport_socket_matches": [
                {"name": "tlsMode-istio", "match": {"tlsMode": "istio"},
                 "transport_socket": istio_upstream_tls([spiffe("default", sa)],
                                                        "outbound_.%d_._.%s.default.svc.cluster.local" % (port, sa))},
                {"name": "tlsMode-disabled", "match": {}, "transport_socket": {
                    "name": "envoy.transport_sockets.raw_buffer",
                    "typed_config": {"@type": TP + "envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"}}}]}


def _bootstrap(name, ip, peer_ip, peer):
    tls_i = {"name": "envoy.filters.listener.tls_inspector", "typed_config": {
        "@type": TP + "envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"}}
    http_i = {"name": "envoy.filters.listener.http_inspector", "typed_config": {
        "@type": TP + "envoy.extensions.filters.listener.http_inspector.v3.HttpInspector"}}
    odst = {"name": "envoy.filters.listener.original_dst", "typed_config": {
        "@type": TP + "envoy.extensions.filters.listener.original_dst.v3.OriginalDst"}}
    dtls_http, dtls_tcp = istio_downstream_tls(), istio_downstream_tls(alpn=("istio-peer-exchange", "h2", "http/1.1"))

    def chain(port, match, filters, ts=None):
        c = {"filter_chain_match": dict({"destination_port": port}, **match), "filters": filters}
        if ts is not None:
            c["transport_socket"] = ts
        return c
    inbound_chains = [
        # 8080 STRICT: mTLS only
        chain(8080, {"transport_protocol": "tls", "application_protocols": MTLS_HTTP},
              [_hcm("inbound_8080", "inbound|8080||", "inbound")], dtls_http),
        chain(8080, {"transport_protocol": "tls"}, [_tcp("inbound_8080_tcp", "inbound|8080||")], dtls_tcp),
        # 9090 PERMISSIVE
        chain(9090, {"transport_protocol": "tls", "application_protocols": MTLS_HTTP},
              [_hcm("inbound_9090", "inbound|9090||", "inbound")], dtls_http),
        chain(9090, {"transport_protocol": "raw_buffer", "application_protocols": ["http/1.1", "h2c"]},
              [_hcm("inbound_9090_plain", "inbound|9090||", "inbound")]),
        chain(9090, {"transport_protocol": "tls", "application_protocols": MTLS_TCP},
              [_tcp("inbound_9090_tcp", "inbound|9090||")], dtls_tcp),
        chain(9090, {"transport_protocol": "raw_buffer"}, [_tcp("inbound_9090_plain_tcp", "inbound|9090||")]),
    ]
    listeners = [
        {"name": "virtualOutbound", "address": {"socket_address": {"address": "0.0.0.0", "port_value": 15001}},
         "use_original_dst": True, "traffic_direction": "OUTBOUND",
         "filter_chains": [{"filters": [_tcp("PassthroughCluster", "PassthroughCluster")]}]},
        {"name": "virtualInbound", "address": {"socket_address": {"address": "0.0.0.0", "port_value": 15006}},
         "traffic_direction": "INBOUND", "listener_filters": [odst, tls_i, http_i],
         "listener_filters_timeout": "1s", "continue_on_listener_filters_timeout": True,
         "filter_chains": inbound_chains},
    ]
    clusters = [_inbound_cluster(8080), _inbound_cluster(9090), sds_grpc_cluster(),
                {"name": "PassthroughCluster", "type": "ORIGINAL_DST", "connect_timeout": "1s", "lb_policy": "CLUSTER_PROVIDED"}]
    for port in (8080, 9090):
        cname = "outbound|%d||svc-%s" % (port, peer)
        clusters.append(_outbound_cluster(cname, peer_ip, port, peer))
        clusters.append(_outbound_cluster(cname + "-plain", peer_ip, port, peer, tls_mode=""))
        listeners.append({"name": "0.0.0.0_%d" % port, "bind_to_port": False, "traffic_direction": "OUTBOUND",
                          "address": {"socket_address": {"address": "0.0.0.0", "port_value": port}},
                          "filter_chains": [{"filters": [_hcm("outbound_%d" % port, cname, "outbound")]}]})
    return {"node": {"id": "sidecar~%s~%s.default~default.svc.cluster.local" % (ip, name), "cluster": name + ".default"},
            "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 15000}}},
            "static_resources": {"listeners": listeners, "clusters": clusters}}


class _Pod:
    def __init__(self, env, name, ns, ip, root):
        self.env, self.name, self.ns, self.ip, self.root = env, name, ns, ip, root

    def run(self, argv, uid=None, check=False, timeout=20):
        full = ["ip", "netns", "exec", self.ns.name] + (as_user(uid) if uid is not None else []) + list(argv)
        return subprocess.run(full, capture_output=True, text=True, timeout=timeout, check=check)

    def curl(self, url, uid=APP_UID, timeout=5):
        p = self.run(["curl", "-sS", "--max-time", str(timeout), "-o", "-", "-w", "\n%{http_code}", url],
                     uid=uid, timeout=timeout + 5)
        body, _, code = p.stdout.rpartition("\n")
        return int(code or 0), body

    def stats(self):
        _, body = self.curl("http://127.0.0.1:15000/stats", uid=None)
        out = {}
        for line in body.splitlines():
            k, _, v = line.partition(": ")
            if v.strip().isdigit():
                out[k] = int(v)
        return out


@pytest.fixture(scope="module")
def pods():
    reason = netns_unavailable_reason()
    if reason:
        pytest.skip(reason)
    if not shutil.which("curl"):
        pytest.skip("curl not installed")
    env = NetnsEnv(prefix="pxm")
    roots = []
    agents = []
    try:
        a_ns, b_ns = env.netns("a"), env.netns("b")
        a_ip, b_ip = env.veth(a_ns, b_ns)
        for ns in (a_ns, b_ns):
            ns.run([sys.executable, os.path.join(ROOT, "init", "istio-iptables")] + IPTABLES_FLAGS)
        pki = Pki(tempfile.mkdtemp(prefix="pki", dir="/tmp"))
        roots.append(pki.dir)
        made = {}
        for name, ns, ip, peer, peer_ip in (("a", a_ns, a_ip, "b", b_ip), ("b", b_ns, b_ip, "a", a_ip)):
            root = tempfile.mkdtemp(prefix="pod", dir="/tmp")
            roots.append(root)
            os.chmod(root, 0o755)
            agent = AgentSds(root, {"default": cert_secret("default", pki.issue(name, uri=[spiffe("default", name)])),
                                    "ROOTCA": root_secret("ROOTCA", pki.ca_pem)})
            agent.start()
            os.chmod(agent.path if not os.path.islink(agent.path) else os.path.realpath(agent.path), 0o777)
            agents.append(agent)
            with open(os.path.join(root, "envoy-rev.json"), "w") as f:
                json.dump(_bootstrap(name, ip, peer_ip, peer), f)
            pod = made[name] = _Pod(env, name, ns, ip, root)
            for port in (8080, 9090):
                env.spawn(ns, as_user(APP_UID) + [sys.executable, os.path.join(ROOT, "scripts", "mesh_app.py"),
                                                  "http", str(port), "svc-%s-%d" % (name, port)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            pod.log = open(os.path.join(root, "proxy.log"), "w")
            pod.proc = env.spawn(ns, as_user(PROXY_UID) + [sys.executable, "-m", "pyproxy", "-c", "envoy-rev.json",
                                                          "--concurrency", "2", "-l", "warning",
                                                          "--disable-hot-restart"],
                                 cwd=root, env=dict(os.environ, PYTHONPATH=ROOT), stdout=pod.log,
                                 stderr=subprocess.STDOUT, text=False)
        for pod in made.values():
            end = time.monotonic() + 30
            while time.monotonic() < end:
                s = pod.stats()
                if s.get("server.state") == 0 and s.get("listener_manager.workers_started") == 1:
                    break
                if pod.proc.poll() is not None:
                    break
                time.sleep(0.2)
            else:
                pass
            s = pod.stats()
            assert s.get("server.state") == 0, open(os.path.join(pod.root, "proxy.log")).read()[-3000:]
        yield made["a"], made["b"]
    finally:
        env.close()
        for a in agents:
            a.stop()
        for r in roots:
            shutil.rmtree(r, ignore_errors=True)


def _body(text):
    try:
        return json.loads(text)
    except ValueError:
        return {"raw": text}


@pytest.mark.parametrize("port", [8080, 9090], ids=["strict", "permissive"])
def test_mesh_call_is_mtls_both_ways(pods, port):
    a, b = pods
    before_a, before_b = a.stats(), b.stats()
    for i in range(5):
        code, body = a.curl("http://%s:%d/hello%d" % (b.ip, port, i))
        assert code == 200, (code, body)
        j = _body(body)
        assert j["pod"] == "svc-b-%d" % port and j["peer"] == "127.0.0.6", j
    out = "cluster.outbound|%d||svc-b.ssl.handshake" % port
    hcm = "http.inbound_%d.downstream_rq_total" % port
    end = time.monotonic() + 5     # (--concurrency 2: the workers' stats arrive once a second)
    while time.monotonic() < end:
        sa, sb = a.stats(), b.stats()
        if sa.get(out, 0) > before_a.get(out, 0) and sb.get(hcm, 0) - before_b.get(hcm, 0) >= 5:
            break
        time.sleep(0.2)
    assert sa.get(out, 0) > before_a.get(out, 0), {k: v for k, v in sa.items() if "ssl" in k}
    assert sb.get(hcm, 0) - before_b.get(hcm, 0) == 5     # the mTLS HTTP chain (istio.alpn's ALPN)
    assert sb.get("sds.default.update_success") == 1 and sb.get("sds.ROOTCA.update_success") == 1


def test_plaintext_from_outside_the_mesh_strict_refused_permissive_served(pods):
    a, b = pods
    # uid 1337 in pod a is not captured: a plaintext client straight to b's ports
    code, _ = a.curl("http://%s:8080/plain" % b.ip, uid=PROXY_UID)
    assert code == 0                                        # STRICT: closed, nothing served
    code, body = a.curl("http://%s:9090/plain" % b.ip, uid=PROXY_UID)
    assert code == 200 and _body(body)["pod"] == "svc-b-9090"
