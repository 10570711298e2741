"""TLS to upstream hosts (UpstreamTlsContext): HTTP/1.1 and HTTP/2 pools through a real TLS server,
SNI, SAN and CA checks, client certificates, transport_socket_matches, failures as connect failures
(503 UF, upstream_cx_connect_fail, cluster.<name>.ssl.*). Real sockets on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import time

import pytest

from proxy_util import (HttpBackend, Pyproxy, TcpBackend, bootstrap, cluster, free_port, http_listener, raw,
                        request, route, route_config, tcp_listener)
from tls_certs import Pki, upstream_tls, uri_san

NGHTTPD = shutil.which("nghttpd")
BACKEND_URI = "spiffe://cluster.local/ns/default/sa/backend"
H2_OPTS = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
    "explicit_http_config": {"http2_protocol_options": {}}}}


class TlsHttpBackend(TcpBackend):
    """HTTP/1.1 keep-alive server over TLS (threads). Answers with the SNI it saw and the client
    certificate's URI SAN."""

    def __init__(self, cert, ca: Pki | None = None):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert.cert_path, cert.key_path)
        if ca is not None:
            ctx.load_verify_locations(ca.ca_path)
            ctx.verify_mode = ssl.CERT_OPTIONAL
        ctx.sni_callback = self._sni
        self.ctx = ctx
        self.snis = []
        self.handshakes = 0
        super().__init__(self._serve)

    def _sni(self, obj, name, ctx):
        self.snis.append(name or "-")

    def _serve(self, raw):
        raw.settimeout(10)
        try:
            c = self.ctx.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError):
            raw.close()
            return
        self.handshakes += 1
        try:
            buf = b""
            while True:
                while b"\r\n\r\n" not in buf:
                    d = c.recv(65536)
                    if not d:
                        return
                    buf += d
                head, _, buf = buf.partition(b"\r\n\r\n")
                sans = dict((k, v) for k, v in (c.getpeercert() or {}).get("subjectAltName", ()))
                body = ("sni=%s client=%s alpn=%s path=%s" % (
                    self.snis[-1] if self.snis else "-", sans.get("URI", "-"), c.selected_alpn_protocol(),
                    head.split(b" ")[1].decode())).encode()
                c.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        except (ssl.SSLError, OSError):
            pass
        finally:
            c.close()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("tlsu"))
    pki = Pki(os.path.join(tmp, "pki"))
    other = Pki(os.path.join(tmp, "pki-o"), name="other CA")
    be_cert = pki.issue("backend", dns=["backend.local"], uri=[BACKEND_URI])
    client = pki.issue("proxy-client", uri=["spiffe://cluster.local/ns/default/sa/proxy"])
    tls_be = TlsHttpBackend(be_cert, ca=pki)
    plain_be = HttpBackend()
    docroot = os.path.join(tmp, "docroot")
    os.makedirs(docroot)
    with open(os.path.join(docroot, "index.html"), "wb") as f:
        f.write(b"hello over h2 and tls\n")
    big = os.urandom(4 * 1024 * 1024)
    with open(os.path.join(docroot, "big"), "wb") as f:
        f.write(big)
    ng = None
    ng_port = free_port()
    if NGHTTPD:
        ng = subprocess.Popen([NGHTTPD, "-d", docroot, str(ng_port), be_cert.key_path, be_cert.cert_path],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    port = free_port()
    good = upstream_tls(sni="backend.local", ca=pki, sans=[uri_san("exact", BACKEND_URI)], cert=client)
    routes = []
    clusters = []

    def add(name, ports, ts=None, rewrite=None, **extra):
        routes.append(route("/%s/" % name, name, **({"prefix_rewrite": rewrite} if rewrite else {})))
        c = cluster(name, ports, **extra)
        if ts is not None:
            c["transport_socket"] = ts
        clusters.append(c)

    add("good", [tls_be.port], good)
    add("nocert", [tls_be.port], upstream_tls(sni="backend.local", ca=pki))
    add("badsan", [tls_be.port], upstream_tls(sni="backend.local", ca=pki,
                                              sans=[uri_san("prefix", "spiffe://cluster.local/ns/other/")]))
    add("badca", [tls_be.port], upstream_tls(sni="backend.local", ca=other))
    add("dnssan", [tls_be.port], upstream_tls(ca=pki, sans=[{"san_type": "DNS", "matcher": {"suffix": ".local"}}]))
    add("plain", [plain_be.port], upstream_tls(sni="backend.local"))
    silent = socket.socket()  # accepts TCP (backlog) but never speaks TLS
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    add("stuck", [silent.getsockname()[1]], upstream_tls(sni="backend.local"), connect_timeout="0.3s")
    add("h2", [ng_port], upstream_tls(sni="backend.local", alpn=["h2"], ca=pki,
                                      sans=[uri_san("exact", BACKEND_URI)]),
        rewrite="/", typed_extension_protocol_options=H2_OPTS)
    # transport_socket_matches: the endpoint labelled tlsMode=istio gets TLS, the cluster default is plaintext
    m = cluster("matched", [tls_be.port])
    m["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["metadata"] = {
        "filter_metadata": {"envoy.transport_socket_match": {"tlsMode": "istio"}}}
    m["transport_socket_matches"] = [{"name": "tlsMode-istio", "match": {"tlsMode": "istio"},
                                      "transport_socket": good}]
    routes.append(route("/matched/", "matched"))
    clusters.append(m)
    tcp_port = free_port()  # tcp_proxy to the TLS cluster "good": plaintext in, TLS out
    bs = bootstrap([http_listener(port, route_config(routes)), tcp_listener(tcp_port, "good")], clusters)
    px = Pyproxy(bs)
    try:
        if ng is not None:
            _wait_port(ng_port)
        yield {"px": px, "port": port, "tls_be": tls_be, "big": big, "tcp_port": tcp_port}
    finally:
        px.stop()
        tls_be.close()
        plain_be.close()
        silent.close()
        if ng is not None:
            ng.kill()
            ng.wait(5)


def _wait_port(port, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("port %d never opened" % port)


def get(env, path):
    return request(env["port"], "GET", path, timeout=10)


def test_http1_over_tls_sni_san_client_cert(env):
    px = env["px"]
    for i in range(3):
        status, _, body = get(env, "/good/%d" % i)
        assert status == 200, body
        assert body.decode() == ("sni=backend.local client=spiffe://cluster.local/ns/default/sa/proxy "
                                 "alpn=None path=/good/%d" % i)
    st = px.stats()
    assert st["cluster.good.ssl.handshake"] == 1  # one pooled connection served all three
    assert st["cluster.good.upstream_cx_total"] == 1
    assert st.get("cluster.good.ssl.versions.TLSv1.3") == 1


def test_without_client_cert_and_dns_san(env):
    status, _, body = get(env, "/nocert/")
    assert status == 200 and b"client=- " in body, body
    status, _, body = get(env, "/dnssan/")
    assert status == 200 and body.startswith(b"sni=- "), body  # no sni configured: none sent


@pytest.mark.parametrize("name,stat", [("badsan", "fail_verify_san"), ("badca", "fail_verify_error"),
                                       ("plain", "connection_error")])
def test_handshake_failure_is_connect_failure(env, name, stat):
    px = env["px"]
    before = px.stats()
    status, _, body = get(env, "/%s/" % name)
    assert status == 503, (status, body)
    after = px.stats()
    for s in ("cluster.%s.upstream_cx_connect_fail" % name, "cluster.%s.ssl.%s" % (name, stat)):
        assert after.get(s, 0) >= before.get(s, 0) + 1, (s, after)
    assert after.get("cluster.%s.ssl.handshake" % name, 0) == 0
    status, _, _ = get(env, "/good/again")
    assert status == 200


@pytest.mark.skipif(NGHTTPD is None, reason="nghttpd not installed")
def test_http2_over_tls(env):
    """nghttpd speaks only h2 over TLS (ALPN h2): the HTTP/2 pool connects through the TLS layer."""
    for _ in range(3):
        status, _, body = get(env, "/h2/index.html")
        assert status == 200 and body == b"hello over h2 and tls\n", (status, body)
    status, _, body = get(env, "/h2/big")
    assert status == 200 and body == env["big"]
    st = env["px"].stats()
    assert st["cluster.h2.ssl.handshake"] == 1, st
    assert st["cluster.h2.upstream_cx_total"] == 1, st


def test_transport_socket_matches(env):
    status, _, body = get(env, "/matched/x")
    assert status == 200 and body.startswith(b"sni=backend.local "), body
    assert env["px"].stats()["cluster.matched.ssl.handshake"] == 1



def test_handshake_timeout_is_connect_timeout(env):
    px = env["px"]
    t0 = time.monotonic()
    status, _, _ = get(env, "/stuck/")
    took = time.monotonic() - t0
    assert status == 503 and 0.25 < took < 3, (status, took)
    st = px.stats()
    assert st["cluster.stuck.upstream_cx_connect_timeout"] == 1 and st["cluster.stuck.upstream_cx_connect_fail"] == 1
    assert st.get("cluster.stuck.ssl.connection_error", 0) == 0


def test_tcp_proxy_to_tls_cluster(env):
    """tcp_proxy connects through the cluster's transport socket: the backend sees TLS with SNI and
    the client certificate, the client speaks plaintext."""
    before = env["px"].stats().get("cluster.good.ssl.handshake", 0)
    data = raw(env["tcp_port"], b"GET /tcp HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", timeout=5)
    assert data.startswith(b"HTTP/1.1 200"), data
    assert b"sni=backend.local client=spiffe://cluster.local/ns/default/sa/proxy" in data, data
    assert env["px"].stats().get("cluster.good.ssl.handshake", 0) == before + 1


def test_upstream_session_resumption(env):
    """As Envoy's upstream TLS (max_session_keys 1 by default): a new connection resumes the TLS
    session the server gave the previous one (a TLS 1.3 ticket, read before the first response
    bytes), counted under ssl.session_reused; the resumed connection still carries the client
    certificate the server saw first, and the SAN check still applies."""
    px = env["px"]
    st = px.stats()
    reused0 = st.get("cluster.good.ssl.session_reused", 0)
    hs0 = st.get("cluster.good.ssl.handshake", 0)
    for _ in range(3):  # one upstream connection each (tcp_proxy)
        data = raw(env["tcp_port"], b"GET /resume HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", timeout=5)
        assert data.startswith(b"HTTP/1.1 200"), data
        assert b"sni=backend.local client=spiffe://cluster.local/ns/default/sa/proxy" in data, data
    st = px.stats()
    assert st.get("cluster.good.ssl.handshake", 0) == hs0 + 3
    # the first may find a session an earlier test's connection left; the next two always do
    assert st.get("cluster.good.ssl.session_reused", 0) - reused0 >= 2, st
    # a cluster whose SAN check fails never keeps a session, and fails every time
    for _ in range(2):
        status, _, _ = get(env, "/badsan/")
        assert status == 503
    assert px.stats().get("cluster.badsan.ssl.session_reused", 0) == 0
