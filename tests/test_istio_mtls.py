"""Istio's mTLS shapes on one pyproxy fed by a pilot-agent-shaped SDS server (secrets `default`,
`ROOTCA` over the relative `sds-grpc` socket):

- inbound PERMISSIVE (virtualInbound's auto chains split by tls_inspector / http_inspector and the
  *offered* ALPN) and STRICT (no plaintext chain: plaintext is closed, never served);
- outbound auto-mTLS (`transport_socket_matches` on `tlsMode: istio`, SNI, exact SPIFFE SAN via the
  untyped `match_subject_alt_names`), with `istio.alpn` making HTTP offer `istio-http/1.1` so the
  server picks its HTTP chain, and without it (TCP) offering `istio-peer-exchange, istio`;
- the peer principal in RBAC (`authenticated`), in `istio_authn`'s filter state, and in access logs;
- bad input on the STRICT port refused and counted: no client certificate, untrusted CA, expired
  certificate, wrong SPIFFE id, TLS below the minimum, garbage instead of a ClientHello.
"""

from __future__ import annotations

import datetime
import os
import shutil
import socket
import ssl
import tempfile
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from proxy_util import HttpBackend, Pyproxy, TcpBackend, cluster, free_port, hcm, request, route, route_config
from sds_util import (TP, AgentSds, cert_secret, istio_downstream_tls, istio_upstream_tls, root_secret,
                      sds_grpc_cluster, spiffe)
from tls_certs import Issued, Pki

SERVER_ID = spiffe("default", "server")
CLIENT_ID = spiffe("default", "client")
MTLS_HTTP = ["istio-http/1.0", "istio-http/1.1", "istio-h2"]
MTLS_TCP = ["istio-peer-exchange", "istio"]
FILE_AL = TP + "envoy.extensions.access_loggers.file.v3.FileAccessLog"
RBAC_HTTP = TP + "envoy.extensions.filters.http.rbac.v3.RBAC"
RBAC_NET = TP + "envoy.extensions.filters.network.rbac.v3.RBAC"
TCP = TP + "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
ALPN = TP + "istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig"
AUTHN = {"@type": "type.googleapis.com/udpa.type.v1.TypedStruct",
         "type_url": "type.googleapis.com/io.istio.network.authn.Config", "value": {"shared": False}}


def _tls_inspector():
    return {"name": "envoy.filters.listener.tls_inspector", "typed_config": {
        "@type": TP + "envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"}}


def _http_inspector():
    return {"name": "envoy.filters.listener.http_inspector", "typed_config": {
        "@type": TP + "envoy.extensions.filters.listener.http_inspector.v3.HttpInspector"}}


def _http_chain(name, match, prefix, ts=None, rbac=None, log_path=None):
    filters = []
    if rbac is not None:
        filters.append({"name": "envoy.filters.http.rbac", "typed_config": dict({"@type": RBAC_HTTP}, **rbac)})
    filters.append({"name": "envoy.filters.http.router", "typed_config": {
        "@type": TP + "envoy.extensions.filters.http.router.v3.Router"}})
    h = hcm(route_config([route("/", "app")]), stat_prefix=prefix, http_filters=filters,
            forward_client_cert_details="APPEND_FORWARD",
            set_current_client_cert_details={"subject": True, "uri": True, "dns": True})
    if log_path:
        h["access_log"] = [{"name": "envoy.access_loggers.file", "typed_config": {
            "@type": FILE_AL, "path": log_path, "log_format": {"text_format_source": {"inline_string":
                "%PROTOCOL% peer=%DOWNSTREAM_PEER_URI_SAN% local=%DOWNSTREAM_LOCAL_URI_SAN% "
                "sni=%REQUESTED_SERVER_NAME% tls=%DOWNSTREAM_TLS_VERSION%\n"}}}}]
    c = {"name": name, "filter_chain_match": match,
         "filters": [{"name": "istio_authn", "typed_config": AUTHN},
                     {"name": "envoy.filters.network.http_connection_manager", "typed_config": h}]}
    if ts is not None:
        c["transport_socket"] = ts
    return c


def _tcp_chain(name, match, prefix, cluster_name="app", ts=None, rbac=None):
    filters = [{"name": "istio_authn", "typed_config": AUTHN}]
    if rbac is not None:
        filters.append({"name": "envoy.filters.network.rbac", "typed_config": dict(
            {"@type": RBAC_NET, "stat_prefix": prefix + "."}, **rbac)})
    filters.append({"name": "envoy.filters.network.tcp_proxy", "typed_config": {
        "@type": TCP, "stat_prefix": prefix, "cluster": cluster_name}})
    c = {"name": name, "filter_chain_match": match, "filters": filters}
    if ts is not None:
        c["transport_socket"] = ts
    return c


def _principal_rbac(principal):
    """Allow only `principal` (Istio's AuthorizationPolicy source.principals shape)."""
    return {"rules": {"action": "ALLOW", "policies": {"ns[default]-policy[allow-client]-rule[0]": {
        "permissions": [{"and_rules": {"rules": [{"any": True}]}}],
        "principals": [{"and_ids": {"ids": [{"authenticated": {"principal_name": {"exact": principal}}}]}}]}}}}


def _filter_state_rbac(principal):
    return {"rules": {"action": "ALLOW", "policies": {"p": {
        "permissions": [{"any": True}],
        "principals": [{"filter_state": {"key": "io.istio.peer_principal",
                                         "string_match": {"exact": principal}}}]}}}}


class TlsBackend(TcpBackend):
    """A TLS server with its own certificate (the target of PERMISSIVE's TLS passthrough)."""

    def __init__(self, issued):
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(issued.cert_path, issued.key_path)
        super().__init__(self._serve)

    def _serve(self, c):
        try:
            with self.ctx.wrap_socket(c, server_side=True) as s:
                s.settimeout(5)
                s.recv(65536)
                s.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 11\r\nconnection: close\r\n\r\npassthrough")
        except (OSError, ssl.SSLError):
            pass


def _issue(pki, cn, uri, not_before=None, not_after=None):
    """A leaf certificate from ``pki`` with explicit validity (for the expired case)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(pki.ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or now - datetime.timedelta(minutes=5))
            .not_valid_after(not_after or now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False)
            .sign(pki.ca_key, hashes.SHA256()))
    cp = os.path.join(pki.dir, cn + ".pem")
    kp = os.path.join(pki.dir, cn + "-key.pem")
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    with open(cp, "wb") as f:
        f.write(cert_pem)
    with open(kp, "wb") as f:
        f.write(key_pem)
    return Issued(cert_pem, key_pem, cp, kp)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("istio-mtls")
    root = tempfile.mkdtemp(prefix="pod", dir="/tmp")
    pki = Pki(tmp / "pki")
    srv = pki.issue("server", uri=[SERVER_ID])
    app = HttpBackend(name="app")
    passthrough = TlsBackend(pki.issue("passthrough", dns=["app.local"]))
    strict, permissive, out_http, out_tcp = free_port(), free_port(), free_port(), free_port()
    log_path = str(tmp / "inbound.log")
    dtls_http = istio_downstream_tls(alpn=("h2", "http/1.1"))
    dtls_tcp = istio_downstream_tls(alpn=("istio-peer-exchange", "h2", "http/1.1"))
    inbound_strict = {
        "name": "strict", "address": {"socket_address": {"address": "127.0.0.1", "port_value": strict}},
        "listener_filters": [_tls_inspector()],
        "filter_chains": [
            _http_chain("strict-http", {"transport_protocol": "tls", "application_protocols": MTLS_HTTP},
                        "strict_http", dtls_http, rbac=_principal_rbac(CLIENT_ID), log_path=log_path),
            _tcp_chain("strict-tcp", {"transport_protocol": "tls"}, "strict_tcp", ts=dtls_tcp,
                       rbac=_filter_state_rbac(CLIENT_ID))]}
    inbound_permissive = {
        "name": "permissive", "address": {"socket_address": {"address": "127.0.0.1", "port_value": permissive}},
        "listener_filters": [_tls_inspector(), _http_inspector()],
        "filter_chains": [
            _http_chain("p-mtls-http", {"transport_protocol": "tls", "application_protocols": MTLS_HTTP},
                        "p_mtls_http", dtls_http),
            _http_chain("p-plain-http", {"transport_protocol": "raw_buffer",
                                         "application_protocols": ["http/1.1", "h2c"]}, "p_plain_http"),
            _tcp_chain("p-mtls-tcp", {"transport_protocol": "tls", "application_protocols": MTLS_TCP},
                       "p_mtls_tcp", ts=dtls_tcp),
            _tcp_chain("p-plain-tcp", {"transport_protocol": "raw_buffer"}, "p_plain_tcp"),
            _tcp_chain("p-passthrough", {"transport_protocol": "tls"}, "p_passthrough", cluster_name="tlsapp")]}
    up = cluster("inbound-permissive", [permissive])
    up["transport_socket_matches"] = [
        {"name": "tlsMode-istio", "match": {"tlsMode": "istio"},
         "transport_socket": istio_upstream_tls([SERVER_ID], "outbound_.80_._.server.default.svc.cluster.local")},
        {"name": "tlsMode-disabled", "match": {}, "transport_socket": {
            "name": "envoy.transport_sockets.raw_buffer",
            "typed_config": {"@type": TP + "envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"}}}]
    up["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["metadata"] = {
        "filter_metadata": {"envoy.transport_socket_match": {"tlsMode": "istio"}}}
    out_http_l = {"name": "out-http", "address": {"socket_address": {"address": "127.0.0.1", "port_value": out_http}},
                  "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                  "typed_config": hcm(route_config([route("/", "inbound-permissive")]),
                                                                      stat_prefix="out_http", http_filters=[
                                                      {"name": "istio.alpn", "typed_config": {"@type": ALPN, "alpn_override": [
                                                          {"alpn_override": ["istio-http/1.0", "istio", "http/1.0"]},
                                                          {"upstream_protocol": "HTTP11",
                                                           "alpn_override": ["istio-http/1.1", "istio", "http/1.1"]},
                                                          {"upstream_protocol": "HTTP2",
                                                           "alpn_override": ["istio-h2", "istio", "h2"]}]}},
                                                      {"name": "envoy.filters.http.router", "typed_config": {
                                                          "@type": TP + "envoy.extensions.filters.http.router.v3.Router"}}])}]}]}
    out_tcp_l = {"name": "out-tcp", "address": {"socket_address": {"address": "127.0.0.1", "port_value": out_tcp}},
                 "filter_chains": [{"filters": [{"name": "envoy.filters.network.tcp_proxy", "typed_config": {
                     "@type": TCP, "stat_prefix": "out_tcp", "cluster": "inbound-permissive"}}]}]}
    bs = {"node": {"id": "sidecar~127.0.0.1~server.default~default.svc.cluster.local", "cluster": "server.default"},
          "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
          "static_resources": {
              "listeners": [inbound_strict, inbound_permissive, out_http_l, out_tcp_l],
              "clusters": [cluster("app", [app.port]), cluster("tlsapp", [passthrough.port]), up,
                           sds_grpc_cluster()]}}
    agent = AgentSds(root, {"default": cert_secret("default", srv), "ROOTCA": root_secret("ROOTCA", pki.ca_pem)})
    agent.start()
    px = Pyproxy(bs, cwd=root, extra_args=["--file-flush-interval-msec", "50"])

    class M:
        pass
    m = M()
    m.pki, m.px, m.app, m.agent = pki, px, app, agent
    m.strict, m.permissive, m.out_http, m.out_tcp = strict, permissive, out_http, out_tcp
    m.log_path = log_path
    m.client = pki.issue("client", uri=[CLIENT_ID])
    m.other = pki.issue("other", uri=[spiffe("default", "other")])
    try:
        yield m
    finally:
        px.stop()
        agent.stop()
        app.close()
        passthrough.close()
        shutil.rmtree(root, ignore_errors=True)


def _ctx(pki, issued, alpn=None, ca=True):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    if ca:
        ctx.load_verify_locations(cadata=pki.ca_pem.decode())
    else:
        ctx.verify_mode = ssl.CERT_NONE
    if issued is not None:
        ctx.load_cert_chain(issued.cert_path, issued.key_path)
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


def _exchange(port, ctx, data, sni=None):
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname=sni) as s:
            alpn, der = s.selected_alpn_protocol(), s.getpeercert(True)
            s.sendall(data)
            return _read_response(s), alpn, der


def _read_response(s, timeout=5.0):
    """Bytes until one whole HTTP response (content-length) arrived, the peer closed, or an error."""
    out = b""
    s.settimeout(timeout)
    while True:
        head, sep, body = out.partition(b"\r\n\r\n")
        if sep:
            for line in head.split(b"\r\n")[1:]:
                k, _, v = line.partition(b":")
                if k.strip().lower() == b"content-length" and len(body) >= int(v):
                    return out
        try:
            d = s.recv(65536)
        except (ssl.SSLError, OSError):
            return out
        if not d:
            return out
        out += d


GET = b"GET /hello HTTP/1.1\r\nhost: app\r\nconnection: close\r\n\r\n"


def _stat(m, name):
    return m.px.stats().get(name, 0)


def test_strict_http_chain_by_offered_alpn_rbac_principal_and_log(mesh):
    m = mesh
    body, alpn, _ = _exchange(m.strict, _ctx(m.pki, m.client, ["istio-http/1.1", "istio", "http/1.1"]), GET,
                              sni="outbound_.80_._.server.default.svc.cluster.local")
    assert body.startswith(b"HTTP/1.1 200") and b"app GET /hello" in body, body
    assert alpn == "http/1.1"     # the server's own list order: h2, http/1.1
    req = m.app.requests[-1]
    xfcc = req.header("x-forwarded-client-cert")   # XFCC on inbound mTLS (APPEND_FORWARD)
    assert xfcc is not None and xfcc.startswith("By=%s;Hash=" % SERVER_ID), xfcc
    assert ';Subject="CN=client";URI=%s' % CLIENT_ID in xfcc, xfcc
    # RBAC `authenticated`: another mesh identity is denied
    body, _, _ = _exchange(m.strict, _ctx(m.pki, m.other, ["istio-http/1.1"]), GET)
    assert body.startswith(b"HTTP/1.1 403"), body
    assert _stat(m, "http.strict_http.rbac.denied") == 1
    end = time.monotonic() + 5
    lines = []
    while time.monotonic() < end:
        lines = open(m.log_path).read().splitlines() if os.path.exists(m.log_path) else []
        if len(lines) >= 2:
            break
        time.sleep(0.05)
    assert lines[0] == ("HTTP/1.1 peer=%s local=%s sni=outbound_.80_._.server.default.svc.cluster.local "
                        "tls=TLSv1.3" % (CLIENT_ID, SERVER_ID)), lines


def test_strict_tcp_chain_istio_authn_filter_state_rbac(mesh):
    m = mesh
    body, alpn, _ = _exchange(m.strict, _ctx(m.pki, m.client, MTLS_TCP), GET)
    assert body.startswith(b"HTTP/1.1 200"), body       # TCP proxied to the app
    assert alpn == "istio-peer-exchange"
    body, _, _ = _exchange(m.strict, _ctx(m.pki, m.other, MTLS_TCP), GET)
    assert body == b""                                  # network RBAC on io.istio.peer_principal
    assert _stat(m, "strict_tcp.rbac.denied") == 1


def test_strict_refuses_plaintext(mesh):
    m = mesh
    before = len(m.app.requests)
    with socket.create_connection(("127.0.0.1", m.strict), timeout=5) as s:
        s.sendall(GET)
        s.settimeout(5)
        assert s.recv(65536) == b""                    # closed, nothing served
    assert len(m.app.requests) == before


def _handshake_fails(port, ctx):
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        try:
            with ctx.wrap_socket(raw) as s:
                s.sendall(GET)
                s.settimeout(5)
                return s.recv(65536) == b""
        except (ssl.SSLError, OSError):
            return True


@pytest.mark.parametrize("case,stat", [
    ("no_cert", "ssl.fail_verify_no_cert"),
    ("untrusted_ca", "ssl.fail_verify_error"),
    ("expired", "ssl.fail_verify_error"),
    ("wrong_spiffe_td", "ssl.fail_verify_san"),
    ("tls11", "ssl.connection_error"),
    ("garbage", "no_filter_chain_match"),            # not a ClientHello: no TLS chain takes it
    ("garbage_after_hello", "ssl.connection_error"),  # a ClientHello, then junk records
])
def test_strict_bad_input_refused_and_counted(mesh, case, stat, tmp_path):
    m = mesh
    before = len(m.app.requests)
    name = "listener.127.0.0.1_%d.%s" % (m.strict, stat)
    n0 = _stat(m, name)
    now = datetime.datetime.now(datetime.timezone.utc)
    if case in ("garbage", "garbage_after_hello"):
        if case == "garbage":
            data = b"\x16\x03\x01\x00\x30" + os.urandom(48)
        else:
            c = _ctx(m.pki, m.client, ["istio-http/1.1"])
            out = ssl.MemoryBIO()
            obj = c.wrap_bio(ssl.MemoryBIO(), out)
            with pytest.raises(ssl.SSLWantReadError):
                obj.do_handshake()
            data = out.read() + b"\x17\x03\x03\x00\x20" + os.urandom(32)
        with socket.create_connection(("127.0.0.1", m.strict), timeout=5) as s:
            s.sendall(data)
            s.settimeout(5)
            got = b""
            try:
                while True:
                    d = s.recv(65536)
                    if not d:
                        break
                    got += d
            except (ConnectionResetError, socket.timeout):
                pass
            assert b"HTTP" not in got    # never served: nothing, or TLS records / an alert
    else:
        if case == "no_cert":
            ctx = _ctx(m.pki, None, ["istio-http/1.1"])
        elif case == "untrusted_ca":
            ctx = _ctx(m.pki, Pki(tmp_path / "evil", name="evil CA").issue("evil", uri=[CLIENT_ID]), ["istio-http/1.1"])
        elif case == "expired":
            ctx = _ctx(m.pki, _issue(m.pki, "expired", CLIENT_ID, now - datetime.timedelta(days=3),
                                     now - datetime.timedelta(days=1)), ["istio-http/1.1"])
        elif case == "wrong_spiffe_td":
            ctx = _ctx(m.pki, m.pki.issue("othertd", uri=["spiffe://evil.td/ns/default/sa/client"]), ["istio-http/1.1"])
        else:
            ctx = _ctx(m.pki, m.client, ["istio-http/1.1"])
            try:
                ctx.minimum_version = ssl.TLSVersion.TLSv1_1
                ctx.maximum_version = ssl.TLSVersion.TLSv1_1
                ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
            except (ValueError, ssl.SSLError):
                pytest.skip("this OpenSSL cannot speak TLS 1.1")
        assert _handshake_fails(m.strict, ctx)
    end = time.monotonic() + 5
    while time.monotonic() < end and _stat(m, name) == n0:
        time.sleep(0.05)
    assert _stat(m, name) == n0 + 1, {k: v for k, v in m.px.stats().items() if ".ssl." in k}
    assert len(m.app.requests) == before             # nothing reached the app


def test_permissive_chains(mesh):
    m = mesh
    # plaintext HTTP: http_inspector picks the plaintext HTTP chain
    st, _, body = request(m.permissive, "GET", "/plain", timeout=5,
                          headers={"x-forwarded-client-cert": "By=spiffe://forged;URI=spiffe://forged"})
    assert st == 200 and body.startswith(b"app GET /plain")
    assert m.app.requests[-1].header("x-forwarded-client-cert") is None   # not mTLS: stripped
    assert _stat(m, "http.p_plain_http.downstream_rq_total") == 1
    # mTLS with an istio HTTP ALPN: the mTLS HTTP chain
    body, _, _ = _exchange(m.permissive, _ctx(m.pki, m.client, ["istio-http/1.1", "istio", "http/1.1"]), GET)
    assert body.startswith(b"HTTP/1.1 200") and _stat(m, "http.p_mtls_http.downstream_rq_total") == 1
    # mTLS with istio-peer-exchange: the mTLS TCP chain
    body, alpn, _ = _exchange(m.permissive, _ctx(m.pki, m.client, MTLS_TCP), GET)
    assert body.startswith(b"HTTP/1.1 200") and alpn == "istio-peer-exchange"
    assert _stat(m, "tcp.p_mtls_tcp.downstream_cx_total") == 1
    # TLS without an istio ALPN: passed through, not terminated (the app's own certificate)
    body, _, der = _exchange(m.permissive, _ctx(m.pki, None, ["http/1.1"], ca=False), GET)
    assert body.endswith(b"passthrough")
    cn = x509.load_der_x509_certificate(der).subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert cn == "passthrough"
    # plaintext non-HTTP: the plaintext TCP chain
    with socket.create_connection(("127.0.0.1", m.permissive), timeout=5) as s:
        s.sendall(b"\x00\x01binary")
        s.shutdown(socket.SHUT_WR)
        s.settimeout(5)
        s.recv(100)
    assert _stat(m, "tcp.p_plain_tcp.downstream_cx_total") == 1


def test_outbound_auto_mtls_istio_alpn_http_and_tcp(mesh):
    """Outbound HTTP through istio.alpn offers istio-http/1.1 and lands on the server's mTLS HTTP
    chain; outbound TCP offers istio-peer-exchange,istio and lands on its mTLS TCP chain."""
    m = mesh
    h0 = _stat(m, "http.p_mtls_http.downstream_rq_total")
    t0 = _stat(m, "tcp.p_mtls_tcp.downstream_cx_total")
    st, _, body = request(m.out_http, "GET", "/via-http", timeout=5)
    assert st == 200 and body.startswith(b"app GET /via-http")
    assert _stat(m, "http.p_mtls_http.downstream_rq_total") == h0 + 1
    with socket.create_connection(("127.0.0.1", m.out_tcp), timeout=5) as s:
        s.sendall(b"GET /via-tcp HTTP/1.1\r\nhost: app\r\nconnection: close\r\n\r\n")
        data = _read_response(s)
    assert data.startswith(b"HTTP/1.1 200") and b"app GET /via-tcp" in data
    assert _stat(m, "tcp.p_mtls_tcp.downstream_cx_total") == t0 + 1
    assert _stat(m, "cluster.inbound-permissive.ssl.handshake") >= 2


def test_rbac_authenticated_tries_every_san(mesh):
    """RBAC `authenticated` tries every URI SAN, then every DNS SAN, then the subject (Envoy's
    order): a certificate whose second URI SAN is the allowed principal is allowed."""
    m = mesh
    two = m.pki.issue("two-uris", uri=[spiffe("other", "first"), CLIENT_ID])
    body, _, _ = _exchange(m.strict, _ctx(m.pki, two, ["istio-http/1.1"]), GET)
    assert body.startswith(b"HTTP/1.1 200"), body
    one = m.pki.issue("first-only", uri=[spiffe("other", "first")], dns=["client.default.svc"])
    body, _, _ = _exchange(m.strict, _ctx(m.pki, one, ["istio-http/1.1"]), GET)
    assert body.startswith(b"HTTP/1.1 403"), body
