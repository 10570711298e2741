"""SDS from a pilot-agent-shaped server over Istio's relative ``sds-grpc`` unix socket: one
StreamSecrets stream per secret name with the node on its first message, ACKs, warming until the
secrets arrive, rotation pushed at any time without dropping connections, NACK of bad secrets
with the last good kept, and serving on while the SDS server is away.

Each proxy runs with its working directory at a temp ``root`` holding
``var/run/secrets/workload-spiffe-uds/socket`` (as pilot-agent starts Envoy)."""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import threading
import time

import pytest

from proxy_util import (HttpBackend, Pyproxy, bootstrap, cluster, free_port, hcm, request, route,
                        route_config)
from sds_util import (AgentSds, cert_secret, istio_downstream_tls, istio_upstream_tls, root_secret,
                      sds_grpc_cluster, spiffe)
from tls_certs import Pki

SERVER_ID = spiffe("default", "server")
CLIENT_ID = spiffe("default", "client")


@pytest.fixture()
def pki(tmp_path):
    return Pki(tmp_path / "pki")


@pytest.fixture()
def root():
    """The pod's working directory (short: a unix socket path holds at most 107 bytes)."""
    import shutil
    import tempfile
    d = tempfile.mkdtemp(prefix="pod", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _mtls_listener(port, backend_cluster="b", name="inbound", alpn=("h2", "http/1.1"), **hcm_extra):
    return {"name": name, "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [{"transport_socket": istio_downstream_tls(alpn=alpn),
                               "filters": [{"name": "envoy.filters.network.http_connection_manager",
                                            "typed_config": hcm(route_config([route("/", backend_cluster)]),
                                                                stat_prefix=name, **hcm_extra)}]}]}


def _plain_listener(port, cluster_name, name="outbound"):
    return {"name": name, "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                            "typed_config": hcm(route_config([route("/", cluster_name)]),
                                                                stat_prefix=name)}]}]}


def _sidecar_bs(be_port, in_port, out_port, sans=(SERVER_ID,)):
    """A listener terminating Istio mTLS in front of a plaintext backend, and a plaintext listener
    whose cluster speaks Istio mTLS to it: both sides' secrets come from SDS."""
    mtls = cluster("mtls", [in_port], transport_socket=istio_upstream_tls(
        list(sans), "outbound_.80_._.server.default.svc.cluster.local", alpn=("istio-http/1.1", "istio", "http/1.1")))
    bs = bootstrap([_mtls_listener(in_port), _plain_listener(out_port, "mtls")],
                   [cluster("b", [be_port]), mtls, sds_grpc_cluster()])
    bs["node"] = {"id": "sidecar~127.0.0.1~server.default~default.svc.cluster.local", "cluster": "server.default"}
    return bs


def _client_ctx(pki, issued):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata=pki.ca_pem.decode())
    if issued is not None:
        ctx.load_cert_chain(issued.cert_path, issued.key_path)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def _tls_get(port, ctx, path="/x", timeout=5.0):
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw:
        with ctx.wrap_socket(raw) as s:
            s.sendall(b"GET %s HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n" % path.encode())
            data = b""
            while True:
                d = s.recv(65536)
                if not d:
                    break
                data += d
    return data


def _ready(px):
    try:
        st, _, _ = request(px.admin_port, "GET", "/ready", timeout=2)
    except OSError:
        return 0
    return st


def _start(bs, root, wait_ready=True):
    px = Pyproxy(bs, cwd=str(root), wait_ready=False)
    if wait_ready:
        try:
            px.wait_ready(20)
        except BaseException:
            px.stop()
            raise
    return px


def _admin_port(px, timeout=10):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if os.path.exists(px.admin_path):
            a = open(px.admin_path).read().strip()
            if a:
                px.admin_port = int(a.rpartition(":")[2])
                return px.admin_port
        if px.proc.poll() is not None:
            raise RuntimeError(px.log())
        time.sleep(0.05)
    raise RuntimeError("no admin port:\n" + px.log())


def test_secrets_from_relative_uds_one_stream_per_name(root, pki):
    srv = pki.issue("server", uri=[SERVER_ID])
    cli = pki.issue("client", uri=[CLIENT_ID])
    be = HttpBackend(name="be")
    in_port, out_port = free_port(), free_port()
    with AgentSds(root, {"default": cert_secret("default", srv), "ROOTCA": root_secret("ROOTCA", pki.ca_pem)}) as agent:
        px = _start(_sidecar_bs(be.port, in_port, out_port), root)
        try:
            # inbound mTLS from a client holding a mesh certificate
            data = _tls_get(in_port, _client_ctx(pki, cli))
            assert data.startswith(b"HTTP/1.1 200"), data
            # outbound: pyproxy's own client certificate from SDS, SAN checked against the server's
            st, _, body = request(out_port, "GET", "/y", timeout=5)
            assert st == 200 and body.startswith(b"be GET /y"), body
            reqs, acks, nacks = agent.snapshot()
            streams = {}
            for sid, r in reqs:
                streams.setdefault(sid, []).append(r)
            # one stream per secret name, each name alone on its stream
            names = sorted(tuple(rs[0].resource_names) for rs in streams.values())
            assert names == [("ROOTCA",), ("default",)], agent.summary()
            for rs in streams.values():
                assert rs[0].node.id.startswith("sidecar~") and rs[0].type_url.endswith("tls.v3.Secret")
                assert rs[0].response_nonce == "" and rs[0].version_info == ""
                assert all(not r.HasField("node") for r in rs[1:]), "node only on the first message"
            assert len(acks) == 2 and not nacks, agent.summary()
            for _, a in acks:
                assert a.version_info and a.response_nonce
            # Envoy's SDS stats and the secrets' config dump
            stats = px.stats()
            assert stats.get("sds.default.update_success") == 1
            assert stats.get("sds.ROOTCA.update_success") == 1
            assert stats.get("listener.127.0.0.1_%d.ssl.handshake" % in_port) == 2, \
                {k: v for k, v in stats.items() if "ssl" in k}
            assert stats.get("cluster.mtls.ssl.handshake") == 1
            _, _, body = request(px.admin_port, "GET", "/config_dump?resource=dynamic_active_secrets")
            dump = json.loads(body)
            by = {c["name"]: c for c in dump["configs"]}
            assert set(by) == {"default", "ROOTCA"}
            key = by["default"]["secret"]["tls_certificate"]["private_key"]
            assert key == {"inline_bytes": "W3JlZGFjdGVkXQ=="}, key    # "[redacted]"
            assert "/" in by["default"]["version_info"]
        finally:
            px.stop()
    be.close()


def _hcm_listener_res(name, port, cluster_name, transport_socket=None):
    chain = {"filters": [{"name": "envoy.filters.network.http_connection_manager",
                          "typed_config": hcm(route_config([route("/", cluster_name)]), stat_prefix=name)}]}
    if transport_socket is not None:
        chain["transport_socket"] = transport_socket
    return {"@type": "Listener", "name": name,
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [chain]}


@pytest.fixture()
def control_plane(tmp_path):
    from xds_util import ControlPlaneProcess
    cfg = tmp_path / "cp"
    cfg.mkdir()
    started = []

    def start(resources):
        from xds_util import write_json
        write_json(str(cfg / "all.json"), resources)
        cpp = ControlPlaneProcess(str(cfg), str(tmp_path / "cp-status.json"), port=free_port()).start()
        started.append(cpp)
        return cpp
    yield start
    for c in started:
        c.kill()


def _ads_stats(px, prefix=""):
    _, _, body = request(px.admin_port, "GET", "/stats", timeout=5)
    out = {}
    for line in body.decode().splitlines():
        k, _, v = line.partition(": ")
        if k.startswith(prefix):
            try:
                out[k] = int(v)
            except ValueError:
                pass
    return out


def test_warming_until_secrets_arrive_then_serving(root, pki, control_plane):
    """LDS/CDS resources naming `default`/`ROOTCA` (initial_fetch_timeout 0s) while the agent's SDS
    socket is not there yet: the listener and cluster warm, the server stays INITIALIZING and not
    ready (what pilot-agent's readiness probe reads), nothing is served; once the agent is up,
    everything is LIVE and serves mTLS both ways."""
    from sds_util import ads_bootstrap, auto_mtls_cluster
    srv = pki.issue("server", uri=[SERVER_ID])
    cli = pki.issue("client", uri=[CLIENT_ID])
    be = HttpBackend(name="be")
    in_port, out_port = free_port(), free_port()
    backend = {"@type": "Cluster", "name": "b", "type": "STATIC", "connect_timeout": "1s",
               "load_assignment": {"cluster_name": "b", "endpoints": [{"lb_endpoints": [
                   {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": be.port}}}}]}]}}
    cpp = control_plane([
        backend,
        auto_mtls_cluster("outbound|80||server.default.svc.cluster.local", in_port, [SERVER_ID],
                          "outbound_.80_._.server.default.svc.cluster.local", alpn=("istio-http/1.1", "istio", "http/1.1")),
        _hcm_listener_res("inbound", in_port, "b", istio_downstream_tls()),
        _hcm_listener_res("outbound", out_port, "outbound|80||server.default.svc.cluster.local")])
    agent = AgentSds(root, {"default": cert_secret("default", srv), "ROOTCA": root_secret("ROOTCA", pki.ca_pem)})
    px = _start(ads_bootstrap(cpp.port), root, wait_ready=False)
    try:
        _admin_port(px)
        end = time.monotonic() + 10
        while time.monotonic() < end:
            st = _ads_stats(px)
            if st.get("listener_manager.lds.update_success") and st.get("cluster_manager.cds.update_success"):
                break
            time.sleep(0.05)
        time.sleep(0.5)
        st = _ads_stats(px)
        assert st["listener_manager.lds.update_success"] >= 1 and st["cluster_manager.cds.update_success"] >= 1
        assert _ready(px) == 503
        assert st["server.state"] == 3                      # INITIALIZING
        assert st.get("listener_manager.workers_started", 0) == 0
        assert st["listener_manager.total_listeners_warming"] == 1  # the inbound one (TLS)
        assert st["cluster_manager.warming_clusters"] == 1
        _, _, body = request(px.admin_port, "GET", "/config_dump?resource=dynamic_warming_secrets")
        warming = {c["name"]: c["version_info"] for c in json.loads(body)["configs"]}
        assert warming == {"default": "uninitialized", "ROOTCA": "uninitialized"}
        # the inbound port is not served (bound, not accepting: no TLS handshake answer)
        with socket.create_connection(("127.0.0.1", in_port), timeout=2) as s:
            s.settimeout(0.5)
            ctx = _client_ctx(pki, cli)
            with pytest.raises((socket.timeout, ssl.SSLError, OSError)):
                ctx.wrap_socket(s)
        agent.start()
        end = time.monotonic() + 15
        while time.monotonic() < end and _ready(px) != 200:
            time.sleep(0.05)
        assert _ready(px) == 200, px.log()[-3000:]
        st = _ads_stats(px)
        assert st["server.state"] == 0 and st["listener_manager.workers_started"] == 1
        assert st["listener_manager.total_listeners_warming"] == 0 and st["cluster_manager.warming_clusters"] == 0
        assert _tls_get(in_port, _client_ctx(pki, cli)).startswith(b"HTTP/1.1 200")
        status, _, body = request(out_port, "GET", "/z", timeout=5)
        assert status == 200 and body.startswith(b"be GET /z")
    finally:
        px.stop()
        agent.stop()
        be.close()
