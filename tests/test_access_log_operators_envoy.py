"""Access-log operators on the upstream TLS handshake (review finding F55), side by side with Envoy:
``%UPSTREAM_TLS_VERSION%``, ``%UPSTREAM_TLS_CIPHER%``, ``%UPSTREAM_PEER_SUBJECT%``,
``%UPSTREAM_PEER_ISSUER%``, ``%UPSTREAM_PEER_DNS_SAN%`` (with ``%UPSTREAM_PEER_URI_SAN%`` /
``%UPSTREAM_LOCAL_URI_SAN%``) over HTTP to an mTLS cluster, over tcp_proxy to the same cluster, and
``-`` for each over a plaintext cluster, with TLS 1.2 and TLS 1.3 pinned on the cluster (Envoy's client
default is at most TLS 1.2, pyproxy's 1.3). Lines are compared whole: nothing in them differs legitimately."""

from __future__ import annotations

import os

import pytest

from log_util import file_access_log, log_lines
from proxy_util import ENVOY, Envoy, HttpBackend, Pyproxy, bootstrap, cluster, free_port, http_listener, raw, \
    request, route, route_config, tcp_listener
from test_tls_upstream import BACKEND_URI, TlsHttpBackend
from tls_certs import Pki, upstream_tls, uri_san

pytestmark = pytest.mark.skipif(not ENVOY, reason="envoy not installed")

OPS = ("UPSTREAM_TLS_VERSION", "UPSTREAM_TLS_CIPHER", "UPSTREAM_PEER_SUBJECT", "UPSTREAM_PEER_ISSUER",
       "UPSTREAM_PEER_DNS_SAN", "UPSTREAM_PEER_URI_SAN", "UPSTREAM_LOCAL_URI_SAN")
FMT = "|".join("%s=%%%s%%" % (n, n) for n in OPS) + "\n"


@pytest.fixture(scope="module")
def backends(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("alops"))
    pki = Pki(os.path.join(tmp, "pki"))
    be_cert = pki.issue("backend", dns=["backend.local"], uri=[BACKEND_URI])
    client = pki.issue("proxy-client", uri=["spiffe://cluster.local/ns/default/sa/proxy"])
    tls_be = TlsHttpBackend(be_cert, ca=pki)
    plain_be = HttpBackend()
    try:
        yield {"tls": tls_be, "plain": plain_be, "mtls": lambda v: upstream_tls(
            sni="backend.local", ca=pki, sans=[uri_san("exact", BACKEND_URI)], cert=client,
            tls_params={"tls_minimum_protocol_version": v, "tls_maximum_protocol_version": v})}
    finally:
        tls_be.close()
        plain_be.close()


def _lines(cls, backends, tmp_path, version):
    http_log, tcp_log = tmp_path / ("%s-http.log" % cls.__name__), tmp_path / ("%s-tcp.log" % cls.__name__)
    for p in (http_log, tcp_log):
        p.write_text("")
    good = cluster("good", [backends["tls"].port])
    good["transport_socket"] = backends["mtls"](version)
    port, tcp_port = free_port(), free_port()
    rc = route_config([route("/good/", "good"), route("/plain/", "plain")])
    bs = bootstrap([http_listener(port, rc, access_log=file_access_log(http_log, FMT)),
                    tcp_listener(tcp_port, "good", access_log=file_access_log(tcp_log, FMT))],
                   [good, cluster("plain", [backends["plain"].port])])
    proc = cls(bs)
    try:
        assert request(port, "GET", "/good/x", timeout=10)[0] == 200
        assert request(port, "GET", "/plain/x", timeout=10)[0] == 200
        data = raw(tcp_port, b"GET /tcp HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", timeout=5)
        assert data.startswith(b"HTTP/1.1 200"), data
        return log_lines(http_log, 2, timeout=5), log_lines(tcp_log, 1, timeout=5)
    finally:
        proc.stop()


@pytest.mark.parametrize("version", ["TLSv1_2", "TLSv1_3"])
def test_upstream_tls_operators_as_envoy(backends, tmp_path, version):
    px = _lines(Pyproxy, backends, tmp_path, version)
    env = _lines(Envoy, backends, tmp_path, version)
    assert px == env, (px, env)
    (good, plain), (tcp,) = px
    fields = dict(f.split("=", 1) for f in good.split("|"))
    assert fields["UPSTREAM_TLS_VERSION"] == version.replace("_", "."), good  # (real values, not "-")
    assert "CN=backend" in fields["UPSTREAM_PEER_SUBJECT"] and fields["UPSTREAM_PEER_DNS_SAN"] == "backend.local", good
    assert fields["UPSTREAM_PEER_URI_SAN"] == BACKEND_URI, good
    assert tcp == good
    assert plain == "|".join("%s=-" % n for n in OPS), plain
