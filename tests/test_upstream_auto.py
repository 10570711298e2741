"""``auto_config`` upstreams (HttpProtocolOptions): HTTP/2 when the host picks ``h2`` by ALPN,
HTTP/1.1 when it picks ``http/1.1`` or offers no ALPN, HTTP/1.1 without TLS (as Envoy). Real TLS
servers on 127.0.0.1: nghttpd (h2 only), a Python TLS server that speaks HTTP/1.1 (with and without
ALPN), and a plaintext backend."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from proxy_util import HttpBackend, Pyproxy, bootstrap, cluster, free_port, http_listener, request, route, route_config
from test_tls_upstream import TlsHttpBackend, _wait_port
from tls_certs import Pki, upstream_tls

NGHTTPD = shutil.which("nghttpd")
AUTO = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
    "auto_config": {"http2_protocol_options": {}}}}


class AlpnHttp1Backend(TlsHttpBackend):
    """The TLS HTTP/1.1 backend, announcing ``http/1.1`` by ALPN."""

    def __init__(self, cert, ca=None):
        super().__init__(cert, ca)
        self.ctx.set_alpn_protocols(["http/1.1"])


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("auto"))
    pki = Pki(os.path.join(tmp, "pki"))
    be_cert = pki.issue("backend", dns=["backend.local"])
    docroot = os.path.join(tmp, "docroot")
    os.makedirs(docroot)
    with open(os.path.join(docroot, "index.html"), "wb") as f:
        f.write(b"hello from h2\n")
    ng_port = free_port()
    ng = subprocess.Popen([NGHTTPD, "-d", docroot, str(ng_port), be_cert.key_path, be_cert.cert_path],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) if NGHTTPD else None
    h1_alpn = AlpnHttp1Backend(be_cert)
    h1_plain_tls = TlsHttpBackend(be_cert)  # no ALPN at all
    plain = HttpBackend()
    tls = upstream_tls(sni="backend.local", ca=pki)  # no alpn_protocols: auto offers h2, http/1.1
    routes, clusters = [], []
    dead = free_port()  # nothing listens: the ALPN probe fails
    for name, port, ts in (("ng", ng_port, tls), ("alpn11", h1_alpn.port, tls),
                           ("noalpn", h1_plain_tls.port, tls), ("plain", plain.port, None),
                           ("dead", dead, tls)):
        routes.append(route("/%s/" % name, name, prefix_rewrite="/"))
        c = cluster(name, [port], typed_extension_protocol_options=AUTO)
        if ts is not None:
            c["transport_socket"] = ts
        clusters.append(c)
    port = free_port()
    px = Pyproxy(bootstrap([http_listener(port, route_config(routes))], clusters))
    try:
        if ng is not None:
            _wait_port(ng_port)
        yield {"px": px, "port": port}
    finally:
        px.stop()
        h1_alpn.close()
        h1_plain_tls.close()
        plain.close()
        if ng is not None:
            ng.kill()
            ng.wait(5)


def _get(env, path):
    return request(env["port"], "GET", path, timeout=10)


@pytest.mark.skipif(NGHTTPD is None, reason="nghttpd not installed")
def test_alpn_h2_goes_http2(env):
    for _ in range(3):
        status, _, body = _get(env, "/ng/index.html")
        assert status == 200 and body == b"hello from h2\n", (status, body)
    st = env["px"].stats()
    assert st.get("cluster.ng.upstream_cx_http2_total", 0) >= 1, {k: v for k, v in st.items() if "cluster.ng." in k}
    assert st.get("cluster.ng.upstream_cx_http1_total", 0) == 0


@pytest.mark.parametrize("name,alpn", [("alpn11", "http/1.1"), ("noalpn", "None")])
def test_http11_by_alpn_or_without_it(env, name, alpn):
    for i in range(2):
        status, _, body = _get(env, "/%s/x%d" % (name, i))
        assert status == 200, body
        # the backend saw our offer answered with its choice; its protocol is HTTP/1.1
        assert body.decode().endswith("alpn=%s path=/x%d" % (alpn, i)), body
    st = env["px"].stats()
    assert st.get("cluster.%s.upstream_cx_http2_total" % name, 0) == 0


def test_plaintext_auto_is_http11(env):
    status, _, _ = _get(env, "/plain/")
    assert status == 200
    st = env["px"].stats()
    assert st.get("cluster.plain.upstream_cx_http2_total", 0) == 0
    assert st.get("cluster.plain.ssl.handshake", 0) == 0


def test_failed_probe_is_a_connect_failure(env):
    for _ in range(2):  # each request probes again
        status, _, body = _get(env, "/dead/")
        assert status == 503 and body.startswith(b"upstream connect error"), (status, body)
    st = env["px"].stats()
    assert st.get("cluster.dead.upstream_cx_connect_fail") == 2
    # the ALPN-learned hosts still serve
    assert _get(env, "/alpn11/y")[0] == 200
