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


def _peer_serial(port, ctx):
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw) as s:
            der = s.getpeercert(True)
    from cryptography import x509
    return x509.load_der_x509_certificate(der).serial_number


def _serial(issued):
    from cryptography import x509
    return x509.load_pem_x509_certificate(issued.cert_pem).serial_number


class _Load:
    """Threads sending requests until stopped: keep-alive through the outbound mTLS cluster, and
    a new inbound mTLS connection per request. Every failure is kept."""

    def __init__(self, out_port, in_port, ctx, threads=3):
        self.ok = 0
        self.failures = []
        self.stop_ev = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._keepalive, args=(out_port,), daemon=True)
                        for _ in range(threads)]
        self.threads.append(threading.Thread(target=self._new_tls, args=(in_port, ctx), daemon=True))
        for t in self.threads:
            t.start()

    def _note(self, ok, what=None):
        with self.lock:
            if ok:
                self.ok += 1
            else:
                self.failures.append(what)

    def _keepalive(self, port):
        import http.client
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        while not self.stop_ev.is_set():
            try:
                c.request("GET", "/k")
                r = c.getresponse()
                body = r.read()
                self._note(r.status == 200, (r.status, body[:200]))
            except Exception as e:  # noqa: BLE001
                self._note(False, repr(e))
                c.close()
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        c.close()

    def _new_tls(self, port, ctx):
        while not self.stop_ev.is_set():
            try:
                data = _tls_get(port, ctx)
                self._note(data.startswith(b"HTTP/1.1 200"), data[:200])
            except Exception as e:  # noqa: BLE001
                self._note(False, repr(e))

    def stop(self):
        self.stop_ev.set()
        for t in self.threads:
            t.join(10)


def test_rotation_under_load_new_handshakes_new_cert_no_failures(root, pki):
    """`default` pushed twice and `ROOTCA` once (a bundle with a second CA, then a workload
    certificate from it) while requests flow: 0 failed requests, an established connection goes
    on, each new handshake presents the current certificate."""
    srv = pki.issue("server", uri=[SERVER_ID])
    cli = pki.issue("client", uri=[CLIENT_ID])
    be = HttpBackend(name="be")
    in_port, out_port = free_port(), free_port()
    with AgentSds(root, {"default": cert_secret("default", srv), "ROOTCA": root_secret("ROOTCA", pki.ca_pem)}) as agent:
        px = _start(_sidecar_bs(be.port, in_port, out_port), root)
        try:
            ctx = _client_ctx(pki, cli)
            assert _peer_serial(in_port, ctx) == _serial(srv)
            # a connection established before the rotation
            held = ctx.wrap_socket(socket.create_connection(("127.0.0.1", in_port), timeout=5))
            held.sendall(b"GET /held1 HTTP/1.1\r\nhost: x\r\n\r\n")
            assert held.recv(65536).startswith(b"HTTP/1.1 200")
            pki2 = Pki(os.path.join(root, "pki2"), name="second CA")
            ctx2 = _client_ctx(pki, cli)   # the trust bundle of the load's client: both CAs
            ctx2.load_verify_locations(cadata=pki2.ca_pem.decode())
            load = _Load(out_port, in_port, ctx2)
            try:
                time.sleep(0.7)
                srv2 = pki.issue("server2", uri=[SERVER_ID])
                agent.set("default", cert_secret("default", srv2))
                agent.wait(lambda: _peer_serial(in_port, ctx) == _serial(srv2), 10, "new cert on new handshakes")
                time.sleep(0.7)
                agent.set("ROOTCA", root_secret("ROOTCA", pki.ca_pem + pki2.ca_pem))
                agent.wait(lambda: px.stat("sds.ROOTCA.update_success") == 2, 10, "ROOTCA applied")
                srv3 = pki2.issue("server3", uri=[SERVER_ID])
                agent.set("default", cert_secret("default", srv3))
                agent.wait(lambda: _peer_serial(in_port, ctx2) == _serial(srv3), 10, "cert from the new CA")
                time.sleep(0.7)
            finally:
                load.stop()
            assert not load.failures, load.failures[:5]
            assert load.ok > 50, load.ok
            # the connection made before any rotation still works, on its old certificate
            held.sendall(b"GET /held2 HTTP/1.1\r\nhost: x\r\n\r\n")
            assert held.recv(65536).startswith(b"HTTP/1.1 200")
            from cryptography import x509
            assert x509.load_der_x509_certificate(held.getpeercert(True)).serial_number == _serial(srv)
            held.close()
            _, acks, nacks = agent.snapshot()
            assert not nacks and px.stat("sds.default.update_success") == 3
        finally:
            px.stop()
    be.close()


def _sds_secret(**kw):
    from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
    from google.protobuf import json_format
    return json_format.ParseDict(kw, secret_pb2.Secret())


@pytest.mark.parametrize("case", ["key_mismatch", "wrong_name", "two_secrets", "empty", "key_provider",
                                  "garbage_cert"])
def test_bad_secret_nacked_last_good_kept(root, pki, case):
    srv = pki.issue("server", uri=[SERVER_ID])
    other = pki.issue("other", uri=[SERVER_ID])
    cli = pki.issue("client", uri=[CLIENT_ID])
    be = HttpBackend(name="be")
    in_port, out_port = free_port(), free_port()
    good = cert_secret("default", srv)
    bad = {
        "key_mismatch": [_sds_secret(name="default", tls_certificate={
            "certificate_chain": {"inline_bytes": base64(srv.cert_pem)},
            "private_key": {"inline_bytes": base64(other.key_pem)}})],
        "wrong_name": [cert_secret("kubernetes://other", other)],
        "two_secrets": [cert_secret("default", other), cert_secret("default", other)],
        "empty": [],
        "key_provider": [_sds_secret(name="default", tls_certificate={
            "certificate_chain": {"inline_bytes": base64(other.cert_pem)},
            "private_key_provider": {"provider_name": "cryptomb"}})],
        "garbage_cert": [_sds_secret(name="default", tls_certificate={
            "certificate_chain": {"inline_bytes": base64(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")},
            "private_key": {"inline_bytes": base64(other.key_pem)}})],
    }[case]
    expect = {"key_mismatch": "does not match", "wrong_name": "unexpected resource 'kubernetes://other'",
              "two_secrets": "duplicate", "empty": "Missing SDS resources for default",
              "key_provider": "private_key_provider is not supported", "garbage_cert": "invalid PEM certificate"}[case]
    with AgentSds(root, {"default": good, "ROOTCA": root_secret("ROOTCA", pki.ca_pem)}) as agent:
        px = _start(_sidecar_bs(be.port, in_port, out_port), root)
        try:
            ctx = _client_ctx(pki, cli)
            assert _peer_serial(in_port, ctx) == _serial(srv)
            agent.override = {"default": bad}
            agent.push("default")
            nacks = agent.wait(lambda: agent.snapshot()[2], 10, "a NACK")
            msg = nacks[0][1].error_detail.message
            assert expect in msg, msg
            sent = [x for x in agent.sent if x[1] == "default"]
            # the NACK names the rejected response's nonce and carries the last accepted version
            assert nacks[0][1].response_nonce == sent[-1][3]
            assert nacks[0][1].version_info == sent[0][2] != sent[-1][2]
            time.sleep(0.3)
            assert len(agent.snapshot()[2]) == 1   # not resent
            # still serving, with the last good certificate, both ways
            assert _peer_serial(in_port, ctx) == _serial(srv)
            assert request(out_port, "GET", "/after", timeout=5)[0] == 200
            assert px.stat("sds.default.update_rejected") == 1
            assert px.log().count(expect) <= 2, px.log()   # logged once (plus the NACK line)
            # the next good push is taken
            agent.override = None
            agent.set("default", cert_secret("default", other))
            agent.wait(lambda: _peer_serial(in_port, ctx) == _serial(other), 10, "the next good secret")
        finally:
            px.stop()
    be.close()


def base64(b: bytes) -> str:
    import base64 as b64
    return b64.b64encode(b).decode()


def test_sds_server_goes_away_and_comes_back(root, pki):
    """The agent goes away (and a stream is ended with an error status): pyproxy serves on with the
    secrets in force, reconnects with backoff on new streams (node again on the first message),
    and takes the secret the agent has when it is back."""
    srv = pki.issue("server", uri=[SERVER_ID])
    cli = pki.issue("client", uri=[CLIENT_ID])
    be = HttpBackend(name="be")
    in_port, out_port = free_port(), free_port()
    agent = AgentSds(root, {"default": cert_secret("default", srv), "ROOTCA": root_secret("ROOTCA", pki.ca_pem)})
    agent.start()
    px = _start(_sidecar_bs(be.port, in_port, out_port), root)
    try:
        ctx = _client_ctx(pki, cli)
        agent.close_streams()      # "CA unreachable": the streams end with a status
        agent.wait(lambda: len({sid for sid, _ in agent.snapshot()[0]}) >= 4, 10, "two new streams")
        agent.stop()
        for _ in range(20):
            assert _tls_get(in_port, ctx).startswith(b"HTTP/1.1 200")
            assert request(out_port, "GET", "/away", timeout=5)[0] == 200
        assert _ready(px) == 200
        srv2 = pki.issue("server2", uri=[SERVER_ID])
        agent.secrets["default"] = cert_secret("default", srv2)
        n_before = len(agent.snapshot()[0])
        agent.start()
        agent.wait(lambda: _peer_serial(in_port, ctx) == _serial(srv2), 15, "the secret after reconnecting")
        reqs = agent.snapshot()[0][n_before:]
        firsts = {}
        for sid, r in reqs:
            firsts.setdefault(sid, r)
        assert firsts and all(r.node.id and r.response_nonce == "" for r in firsts.values()), agent.summary()
        assert all(r.version_info for r in firsts.values())   # the version it holds
        # one line per outage and secret, however many reconnection attempts it took
        assert px.log().count("SDS server for secret 'default' went away") == 2, px.log()[-3000:]
    finally:
        px.stop()
        agent.stop()
        be.close()


def test_ads_kubernetes_and_agent_file_secret_names(root, pki, control_plane):
    """A DestinationRule credentialName (`kubernetes://...` over ADS from istiod, default 15s
    timeout) and the agent's `file-cert:`/`file-root:` names (over sds-grpc): each is subscribed
    where its sds_config says, and both clusters carry mTLS."""
    from sds_util import ads_bootstrap, sds_ref
    import base64 as b64
    srv = pki.issue("server", uri=[SERVER_ID])
    cred = pki.issue("cred", uri=[spiffe("default", "cred")])
    filec = pki.issue("filecert", uri=[spiffe("default", "file")])
    be = HttpBackend(name="be")
    in_port, out1, out2 = free_port(), free_port(), free_port()
    ads_ref = {"sds_config": {"ads": {}, "resource_api_version": "V3"}}

    def mutual(name, cert_ref, ca_ref):
        return {"@type": "Cluster", "name": name, "type": "STATIC", "connect_timeout": "1s",
                "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": in_port}}}}]}]},
                "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                    "common_tls_context": {
                        "tls_certificate_sds_secret_configs": [cert_ref],
                        "combined_validation_context": {
                            "default_validation_context": {"match_subject_alt_names": [{"exact": SERVER_ID}]},
                            "validation_context_sds_secret_config": ca_ref}},
                    "sni": "server.default.svc.cluster.local"}}}
    fc = "file-cert:/etc/certs/cert-chain.pem~/etc/certs/key.pem"
    fr = "file-root:/etc/certs/root-cert.pem"
    backend = {"@type": "Cluster", "name": "b", "type": "STATIC", "connect_timeout": "1s",
               "load_assignment": {"cluster_name": "b", "endpoints": [{"lb_endpoints": [
                   {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": be.port}}}}]}]}}
    k8s_cert = {"@type": "Secret", "name": "kubernetes://cred", "tls_certificate": {
        "certificate_chain": {"inline_bytes": b64.b64encode(cred.cert_pem).decode()},
        "private_key": {"inline_bytes": b64.b64encode(cred.key_pem).decode()}}}
    k8s_ca = {"@type": "Secret", "name": "kubernetes://cred-cacert", "validation_context": {
        "trusted_ca": {"inline_bytes": b64.b64encode(pki.ca_pem).decode()}}}
    cpp = control_plane([
        backend, k8s_cert, k8s_ca,
        mutual("k8s", dict(ads_ref, name="kubernetes://cred"), dict(ads_ref, name="kubernetes://cred-cacert")),
        mutual("files", sds_ref(fc, timeout="15s"), sds_ref(fr, timeout="15s")),
        _hcm_listener_res("inbound", in_port, "b", istio_downstream_tls()),
        _hcm_listener_res("out1", out1, "k8s"), _hcm_listener_res("out2", out2, "files")])
    with AgentSds(root, {"default": cert_secret("default", srv), "ROOTCA": root_secret("ROOTCA", pki.ca_pem),
                         fc: cert_secret(fc, filec), fr: root_secret(fr, pki.ca_pem)}) as agent:
        px = _start(ads_bootstrap(cpp.port), root)
        try:
            for port, who in ((out1, "cred"), (out2, "file")):
                st, _, body = request(port, "GET", "/" + who, timeout=5)
                assert st == 200 and body.startswith(b"be GET /" + who.encode()), body
            names = sorted(tuple(r.resource_names) for _, r in agent.snapshot()[0] if not r.response_nonce)
            assert names == sorted([("ROOTCA",), ("default",), (fc,), (fr,)]), agent.summary()
            _, _, body = request(px.admin_port, "GET", "/config_dump?resource=dynamic_active_secrets")
            got = {c["name"] for c in json.loads(body)["configs"]}
            assert got == {"default", "ROOTCA", fc, fr, "kubernetes://cred", "kubernetes://cred-cacert"}
        finally:
            px.stop()
    be.close()


def test_certs_endpoint_and_expiry_stat(root, pki):
    """/certs as Envoy shows it (per TLS context: ca_cert and cert_chain with serial, SANs, days
    until expiration, valid_from, expiration_time) and server.days_until_first_cert_expiring."""
    srv = pki.issue("server", uri=[SERVER_ID], days=2)
    be = HttpBackend(name="be")
    in_port, out_port = free_port(), free_port()
    with AgentSds(root, {"default": cert_secret("default", srv), "ROOTCA": root_secret("ROOTCA", pki.ca_pem)}) as agent:
        px = _start(_sidecar_bs(be.port, in_port, out_port), root)
        try:
            _, _, body = request(px.admin_port, "GET", "/certs")
            certs = json.loads(body)["certificates"]
            assert certs, body
            serial = "%x" % _serial(srv)
            for entry in certs:    # both contexts (inbound server, outbound client) hold the same
                assert [c["serial_number"] for c in entry["cert_chain"]] == [serial]
                leaf = entry["cert_chain"][0]
                assert leaf["subject_alt_names"] == [{"uri": SERVER_ID}]
                assert leaf["days_until_expiration"] in ("1", "2")
                assert leaf["valid_from"].endswith("Z") and leaf["expiration_time"].endswith("Z")
                assert leaf["path"] == "secret 'default'"
                ca = entry["ca_cert"][0]
                from cryptography import x509
                assert ca["serial_number"] == "%x" % pki.ca_cert.serial_number
                assert ca["path"] == "secret 'ROOTCA'"
            assert px.stat("server.days_until_first_cert_expiring") in (1, 2)
            # rotation to a shorter-lived certificate moves the stat and /certs
            short = pki.issue("short", uri=[SERVER_ID], days=1)
            agent.set("default", cert_secret("default", short))
            agent.wait(lambda: px.stat("server.days_until_first_cert_expiring") == 0, 10, "the stat to follow")
            _, _, body = request(px.admin_port, "GET", "/certs")
            assert all(e["cert_chain"][0]["serial_number"] == "%x" % _serial(short)
                       for e in json.loads(body)["certificates"])
        finally:
            px.stop()
    be.close()


def test_concurrency_workers_get_secrets_and_rotation(root, pki):
    """pilot-agent runs the proxy with --concurrency 2: the SDS streams live in the main process
    and every worker serves with the secrets, rotated ones included."""
    srv = pki.issue("server", uri=[SERVER_ID])
    cli = pki.issue("client", uri=[CLIENT_ID])
    be = HttpBackend(name="be")
    in_port, out_port = free_port(), free_port()
    with AgentSds(root, {"default": cert_secret("default", srv), "ROOTCA": root_secret("ROOTCA", pki.ca_pem)}) as agent:
        px = _ConcurrencyPyproxy(_sidecar_bs(be.port, in_port, out_port), cwd=str(root))
        try:
            ctx = _client_ctx(pki, cli)
            for _ in range(20):   # connections spread over the workers
                assert _tls_get(in_port, ctx).startswith(b"HTTP/1.1 200")
                assert request(out_port, "GET", "/w", timeout=5)[0] == 200
            srv2 = pki.issue("server2", uri=[SERVER_ID])
            agent.set("default", cert_secret("default", srv2))
            agent.wait(lambda: all(_peer_serial(in_port, ctx) == _serial(srv2) for _ in range(10)), 10,
                       "every worker on the new certificate")
            names = sorted(tuple(r.resource_names) for _, r in agent.snapshot()[0] if not r.response_nonce)
            assert names == [("ROOTCA",), ("default",)]     # one stream per name, from the main process
        finally:
            px.stop()
    be.close()


class _ConcurrencyPyproxy(Pyproxy):
    def command(self, extra):
        cmd = super().command(extra)
        i = cmd.index("--concurrency")
        cmd[i + 1] = "2"
        return cmd


ISTIO = "/work/shared/testdata/istio"
if not os.path.isdir(ISTIO):
    ISTIO = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                         "shared", "testdata", "istio")


@pytest.mark.skipif(not os.path.isdir(ISTIO), reason="Istio testdata not available")
def test_validate_istio_dumps_nothing_ignored_for_sds():
    """`pyproxy validate` on Istio's sidecar dumps: the mTLS listeners and clusters (SDS secrets
    from sds-grpc's api_config_source, combined validation contexts, transport_socket_matches) are
    accepted with nothing ignored about SDS or TLS; the secrets are accepted."""
    from proxy_util import run_pyproxy
    files = [os.path.join(ISTIO, f) for f in ("sidecar-bootstrap-envoy-rev.json", "sidecar-listeners-configdump.json",
                                               "sidecar-http-clusters-configdump.json", "sidecar-secrets-configdump.json")]
    r = run_pyproxy(["validate"] + files, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for line in r.stdout.splitlines():
        if "ignored parts" not in line:
            continue
        why = line.split("ignored parts", 1)[1].lower()
        for word in ("sds", "secret", "api_config_source", "tls", "certificate", "transport_socket", "alpn"):
            if word in why and "redacted (from a config dump)" not in why and \
                    "no content yet (warming)" not in why:   # the dump's own warming entry
                raise AssertionError("SDS/TLS part ignored: " + line)
    assert "secret 'ROOTCA': accepted" in r.stdout
    assert "secret 'default': accepted" in r.stdout   # (its key is redacted in the dump: not checked)


def test_static_listener_warms_until_secrets_then_serves(root, pki):
    """Static listeners and clusters naming SDS secrets (0s fetch timeout) with the agent not up
    yet: not ready, the TLS port accepts nothing, the cluster warms; once the agent is up, LIVE."""
    srv = pki.issue("server", uri=[SERVER_ID])
    cli = pki.issue("client", uri=[CLIENT_ID])
    be = HttpBackend(name="be")
    in_port, out_port = free_port(), free_port()
    agent = AgentSds(root, {"default": cert_secret("default", srv), "ROOTCA": root_secret("ROOTCA", pki.ca_pem)})
    px = _start(_sidecar_bs(be.port, in_port, out_port), root, wait_ready=False)
    try:
        _admin_port(px)
        time.sleep(1.0)
        st = _ads_stats(px)
        assert _ready(px) == 503 and st["server.state"] == 3
        assert st.get("listener_manager.workers_started", 0) == 0
        assert st["cluster_manager.warming_clusters"] == 1      # the mTLS cluster
        with socket.create_connection(("127.0.0.1", in_port), timeout=2) as s:
            s.settimeout(0.5)
            with pytest.raises((socket.timeout, ssl.SSLError, OSError)):
                _client_ctx(pki, cli).wrap_socket(s)
        agent.start()
        end = time.monotonic() + 15
        while time.monotonic() < end and _ready(px) != 200:
            time.sleep(0.05)
        assert _ready(px) == 200, px.log()[-2000:]
        assert _tls_get(in_port, _client_ctx(pki, cli)).startswith(b"HTTP/1.1 200")
        assert request(out_port, "GET", "/z", timeout=5)[0] == 200
    finally:
        px.stop()
        agent.stop()
        be.close()


def test_initial_fetch_timeout_proceeds_in_every_worker(root, pki):
    """A secret the agent never sends, named with initial_fetch_timeout 1s, under --concurrency 2:
    after the timeout every process goes on (LIVE, listener accepting), and the TLS chain that
    lacks its certificate refuses connections (closed, never served in plaintext)."""
    from sds_util import sds_ref
    srv = pki.issue("server", uri=[SERVER_ID])
    be = HttpBackend(name="be")
    port = free_port()
    ts = istio_downstream_tls()
    ts["typed_config"]["common_tls_context"]["tls_certificate_sds_secret_configs"] = [sds_ref("missing", timeout="1s")]
    ts["typed_config"]["common_tls_context"]["combined_validation_context"][
        "validation_context_sds_secret_config"] = sds_ref("ROOTCA", timeout="1s")
    lst = {"name": "in", "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
           "filter_chains": [{"transport_socket": ts, "filters": [{
               "name": "envoy.filters.network.http_connection_manager",
               "typed_config": hcm(route_config([route("/", "b")]), stat_prefix="in")}]}]}
    bs = bootstrap([lst], [cluster("b", [be.port]), sds_grpc_cluster()])
    bs["node"] = {"id": "sidecar~127.0.0.1~x.default~default.svc.cluster.local", "cluster": "x.default"}
    with AgentSds(root, {"default": cert_secret("default", srv), "ROOTCA": root_secret("ROOTCA", pki.ca_pem)}):
        px = _ConcurrencyPyproxy(bs, cwd=str(root), wait_ready=False)
        try:
            t0 = time.monotonic()
            px.wait_ready(15)
            assert time.monotonic() - t0 >= 0.8
            assert px.stat("sds.missing.init_fetch_timeout") == 1
            for _ in range(10):   # every worker accepts and closes (no hang, no plaintext)
                with socket.create_connection(("127.0.0.1", port), timeout=3) as s:
                    s.settimeout(3)
                    s.sendall(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
                    try:
                        assert s.recv(100) == b""
                    except ConnectionResetError:
                        pass
        finally:
            px.stop()
    be.close()


def test_agent_sds_rejects_a_stream_without_node_and_serves_sotw_only(root, pki):
    """The test server is as strict as pilot-agent: a stream whose first message has no node is
    ended with INVALID_ARGUMENT "missing node information"; DeltaSecrets is UNIMPLEMENTED."""
    import grpc
    from envoy.service.discovery.v3 import discovery_pb2
    from envoy.service.secret.v3 import sds_pb2_grpc
    from sds_util import SECRET_TYPE
    srv = pki.issue("server", uri=[SERVER_ID])
    with AgentSds(root, {"default": cert_secret("default", srv)}) as agent:
        ch = grpc.insecure_channel("unix:" + agent.path)
        stub = sds_pb2_grpc.SecretDiscoveryServiceStub(ch)
        call = stub.StreamSecrets(iter([discovery_pb2.DiscoveryRequest(type_url=SECRET_TYPE,
                                                                      resource_names=["default"])]), timeout=5)
        with pytest.raises(grpc.RpcError) as ei:
            list(call)
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "missing node information" in ei.value.details()
        with pytest.raises(grpc.RpcError) as ei:
            list(stub.DeltaSecrets(iter([discovery_pb2.DeltaDiscoveryRequest(type_url=SECRET_TYPE)]), timeout=5))
        assert ei.value.code() == grpc.StatusCode.UNIMPLEMENTED
        req = discovery_pb2.DiscoveryRequest(type_url=SECRET_TYPE, resource_names=["default"])
        req.node.id = "sidecar~1.2.3.4~x.default~default.svc.cluster.local"
        it = stub.StreamSecrets(iter([req]), timeout=5)
        resp = next(it)
        assert resp.version_info and resp.nonce and len(resp.resources) == 1
        it.cancel()
        ch.close()
        assert agent.rejected_streams == 1


def test_ads_secret_rejected_first_response_ends_warming(root, pki, control_plane):
    """A `kubernetes://` secret istiod sends broken (key of another certificate): NACKed, and as in
    Envoy the rejected first response ends the cluster's wait (LIVE well before the 15 s initial
    fetch timeout); the cluster's TLS stays unusable, so requests fail (503), never plaintext."""
    from sds_util import ads_bootstrap
    import base64 as b64
    cred, other = pki.issue("cred", uri=[spiffe("default", "cred")]), pki.issue("other", uri=[SERVER_ID])
    be = HttpBackend(name="be")
    out = free_port()
    ads_ref = {"sds_config": {"ads": {}, "resource_api_version": "V3"}}
    bad = {"@type": "Secret", "name": "kubernetes://cred", "tls_certificate": {
        "certificate_chain": {"inline_bytes": b64.b64encode(cred.cert_pem).decode()},
        "private_key": {"inline_bytes": b64.b64encode(other.key_pem).decode()}}}
    ext = {"@type": "Cluster", "name": "ext", "type": "STATIC", "connect_timeout": "1s",
           "load_assignment": {"cluster_name": "ext", "endpoints": [{"lb_endpoints": [{"endpoint": {
               "address": {"socket_address": {"address": "127.0.0.1", "port_value": be.port}}}}]}]},
           "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
               "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
               "common_tls_context": {"tls_certificate_sds_secret_configs": [dict(ads_ref, name="kubernetes://cred")]}}}}
    cpp = control_plane([bad, ext, _hcm_listener_res("out", out, "ext")])
    with AgentSds(root, {}):
        px = _start(ads_bootstrap(cpp.port), root, wait_ready=False)
        try:
            t0 = time.monotonic()
            px.wait_ready(10)
            assert time.monotonic() - t0 < 8
            st, _, _ = request(out, "GET", "/x", timeout=5)
            assert st == 503 and not be.requests
            assert "does not match the certificate" in px.log()
        finally:
            px.stop()
    be.close()
