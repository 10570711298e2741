"""TLS config compilation without a proxy process: contexts built once and shared, SDS/static
secrets resolved through the store (refused until present, rebuilt on change), SAN matching rules,
config-time errors, lazy imports, and the TLS layer over a real socket pair."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import subprocess
import sys

import pytest
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2, tls_pb2
from google.protobuf import json_format

from pyproxy.config import ConfigError
from pyproxy.tls import TlsNotReady, downstream_factory, upstream_factory
from pyproxy.tls.secrets import SecretStore, STORE
from tls_certs import Pki, cert_entry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    p = Pki(tmp_path_factory.mktemp("pki"))
    p.server = p.issue("server", dns=["localhost", "*.svc.local"], uri=["spiffe://cluster.local/ns/a/sa/s"])
    p.client = p.issue("client", uri=["spiffe://cluster.local/ns/a/sa/c"])
    return p


@pytest.fixture
def store():
    STORE.clear()
    yield STORE
    STORE.clear()


def dctx(d) -> tls_pb2.DownstreamTlsContext:
    return json_format.ParseDict(d, tls_pb2.DownstreamTlsContext())


def uctx(d) -> tls_pb2.UpstreamTlsContext:
    return json_format.ParseDict(d, tls_pb2.UpstreamTlsContext())


def secret(d) -> secret_pb2.Secret:
    return json_format.ParseDict(d, secret_pb2.Secret())


def test_context_built_at_config_time_and_shared(pki):
    cfg = {"common_tls_context": {"alpn_protocols": ["h2"], "tls_certificates": [cert_entry(pki.server)]}}
    a, b = downstream_factory(dctx(cfg)), downstream_factory(dctx(cfg))
    assert a.compiled_tls is not None and a.compiled_tls is b.compiled_tls  # one SSLContext
    assert isinstance(a.compiled_tls.ctx, ssl.SSLContext)
    assert a.compiled_tls.local_uri_san == "spiffe://cluster.local/ns/a/sa/s"
    cfg["common_tls_context"]["alpn_protocols"] = ["http/1.1"]
    assert downstream_factory(dctx(cfg)).compiled_tls is not a.compiled_tls


def test_versions_and_verify_modes(pki):
    ca = {"trusted_ca": {"inline_string": pki.ca_pem.decode()}}
    f = downstream_factory(dctx({"common_tls_context": {
        "tls_params": {"tls_minimum_protocol_version": "TLSv1_3"},
        "tls_certificates": [cert_entry(pki.server, inline=False)], "validation_context": ca}}))
    c = f.compiled_tls.ctx
    assert c.minimum_version == ssl.TLSVersion.TLSv1_3 and c.maximum_version == ssl.TLSVersion.TLSv1_3
    assert c.verify_mode == ssl.CERT_OPTIONAL  # a CA without require_client_certificate
    f = downstream_factory(dctx({"require_client_certificate": True, "common_tls_context": {
        "tls_certificates": [cert_entry(pki.server)], "validation_context": ca}}))
    assert f.compiled_tls.ctx.verify_mode == ssl.CERT_REQUIRED
    u = upstream_factory(uctx({"sni": "x", "common_tls_context": {}}))
    assert u.compiled_tls.ctx.verify_mode == ssl.CERT_NONE and u.compiled_tls.sni == "x"
    u = upstream_factory(uctx({"common_tls_context": {"validation_context": ca}}))
    assert u.compiled_tls.ctx.verify_mode == ssl.CERT_REQUIRED and u.compiled_tls.sni is None


def test_sds_secrets_resolved_refused_until_present_and_rebuilt(pki, store):
    f = downstream_factory(dctx({"common_tls_context": {
        "tls_certificate_sds_secret_configs": [{"name": "default", "sds_config": {"ads": {}}}],
        "combined_validation_context": {
            "default_validation_context": {"match_subject_alt_names": [{"prefix": "spiffe://cluster.local/"}]},
            "validation_context_sds_secret_config": {"name": "ROOTCA", "sds_config": {"ads": {}}}}},
        "require_client_certificate": True}))
    assert f.compiled_tls is None
    with pytest.raises(TlsNotReady, match="default, ROOTCA"):
        f.compiled()
    store.apply_sds({"default": secret({"name": "default", "tls_certificate": cert_entry(pki.server)})})
    with pytest.raises(TlsNotReady, match="ROOTCA"):
        f.compiled()
    store.apply_sds({"ROOTCA": secret({"name": "ROOTCA", "validation_context": {
        "trusted_ca": {"inline_bytes": __import__("base64").b64encode(pki.ca_pem).decode()}}})})
    c1 = f.compiled()
    assert c1.ctx.verify_mode == ssl.CERT_REQUIRED and len(c1.san_matchers) == 1
    assert f.compiled() is c1  # nothing changed: no rebuild
    other = pki.issue("server2", dns=["localhost"])
    store.apply_sds({"default": secret({"name": "default", "tls_certificate": cert_entry(other)})})
    c2 = f.compiled()
    assert c2 is not c1 and c2.local_uri_san == ""
    store.apply_sds(removed=["default"])
    with pytest.raises(TlsNotReady):
        f.compiled()


def test_static_secret_reference(pki):
    s = SecretStore()
    s.load_static([secret({"name": "srv", "tls_certificate": cert_entry(pki.server)})])
    assert s.get("srv", "").name == "srv" and s.get("srv", "ads").name == "srv"
    with pytest.raises(ConfigError, match="does not match"):
        s.load_static([secret({"name": "bad", "tls_certificate": {
            "certificate_chain": {"inline_string": pki.server.cert_pem.decode()},
            "private_key": {"inline_string": pki.client.key_pem.decode()}}})])


def test_config_errors(pki):
    with pytest.raises(ConfigError, match="no TLS certificates found"):
        downstream_factory(dctx({"common_tls_context": {}}))
    with pytest.raises(ConfigError, match="cannot read certificate chain"):
        downstream_factory(dctx({"common_tls_context": {"tls_certificates": [{
            "certificate_chain": {"filename": "/nonexistent.pem"}, "private_key": {"inline_string": "x"}}]}}))
    with pytest.raises(ConfigError, match="SAN-based verification"):
        upstream_factory(uctx({"common_tls_context": {"validation_context": {
            "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": {"exact": "x"}}]}}}))


class _Peer:
    """Stands in for an SSLObject's peer-certificate accessors (check_peer reads only these)."""

    def __init__(self, sans, der=b"x"):
        self.sans = sans
        self.der = der

    def getpeercert(self, binary=False):
        return self.der if binary else {"subjectAltName": self.sans}


@pytest.mark.parametrize("matchers,sans,ok", [
    ([{"san_type": "URI", "matcher": {"exact": "spiffe://td/ns/a/sa/b"}}], [("URI", "spiffe://td/ns/a/sa/b")], True),
    ([{"san_type": "URI", "matcher": {"prefix": "spiffe://td/ns/a/"}}], [("URI", "spiffe://td/ns/b/sa/x")], False),
    ([{"san_type": "URI", "matcher": {"suffix": "/sa/b"}}], [("DNS", "x/sa/b")], False),  # type matters
    ([{"san_type": "DNS", "matcher": {"safe_regex": {"regex": "[a-z]+\\.svc"}}}], [("DNS", "api.svc")], True),
    ([{"san_type": "DNS", "matcher": {"exact": "a.svc.local"}}], [("DNS", "*.svc.local")], True),
    ([{"san_type": "DNS", "matcher": {"exact": "a.b.svc.local"}}], [("DNS", "*.svc.local")], False),
    ([{"san_type": "DNS", "matcher": {"exact": "x"}}, {"san_type": "URI", "matcher": {"exact": "u"}}],
     [("URI", "u")], True),  # any matcher
])
def test_san_matching(pki, matchers, sans, ok):
    u = upstream_factory(uctx({"common_tls_context": {"validation_context": {
        "trusted_ca": {"inline_string": pki.ca_pem.decode()}, "match_typed_subject_alt_names": matchers}}}))
    assert u.compiled_tls.check_peer(_Peer(sans)) == ("" if ok else "fail_verify_san")


def test_legacy_matcher_any_type(pki):
    u = upstream_factory(uctx({"common_tls_context": {"validation_context": {
        "trusted_ca": {"inline_string": pki.ca_pem.decode()}, "match_subject_alt_names": [{"exact": "10.0.0.1"}]}}}))
    assert u.compiled_tls.check_peer(_Peer([("IP Address", "10.0.0.1")])) == ""
    assert u.compiled_tls.check_peer(_Peer([("DNS", "10.0.0.2")])) == "fail_verify_san"


def test_certificate_hash_pin(pki):
    import hashlib
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    der = x509.load_pem_x509_certificate(pki.server.cert_pem).public_bytes(serialization.Encoding.DER)
    h = hashlib.sha256(der).hexdigest()
    u = upstream_factory(uctx({"common_tls_context": {"validation_context": {
        "trusted_ca": {"inline_string": pki.ca_pem.decode()}, "verify_certificate_hash": [h.upper()]}}}))
    assert u.compiled_tls.check_peer(_Peer([], der)) == ""
    assert u.compiled_tls.check_peer(_Peer([], der + b"x")) == "fail_verify_cert_hash"


def test_plaintext_config_imports_nothing_tls(tmp_path):
    """A bootstrap without TLS compiles without importing pyproxy.tls or cryptography."""
    prog = ("import sys\n"
            "from pyproxy.validate import read_items, validate_items\n"
            "items = validate_items(read_items(sys.argv[1]))\n"
            "print([i.verdict for i in items])\n"
            "print('TLS' if any(m.startswith(('pyproxy.tls', 'cryptography', 'OpenSSL')) for m in sys.modules)"
            " else 'NOTLS')\n")
    import json
    cfg = tmp_path / "plain.json"
    cfg.write_text(json.dumps({"static_resources": {"listeners": [{
        "name": "l", "address": {"socket_address": {"address": "127.0.0.1", "port_value": 1}},
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.tcp_proxy", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
            "stat_prefix": "t", "cluster": "c"}}]}]}],
        "clusters": [{"name": "c", "type": "STATIC", "connect_timeout": "1s", "load_assignment": {
            "cluster_name": "c", "endpoints": []}}]}}))
    p = subprocess.run([sys.executable, "-c", prog, str(cfg)], capture_output=True, text=True, timeout=60, cwd=ROOT)
    out = p.stdout.strip().splitlines()
    assert out and "accepted" in out[0] and "rejected" not in out[0], p.stdout + p.stderr
    assert out[-1] == "NOTLS", p.stdout + p.stderr


# -- the layer over a real socket pair -----------------------------------------------------------------

def test_client_layer_handshake_and_close_notify(pki):
    """ClientTls against a stdlib TLS server over a socketpair: handshake before connection_made,
    data both ways, close_notify on write_eof, peer's close_notify seen as EOF."""
    from pyproxy.tls.client import connect_client

    u = upstream_factory(uctx({"sni": "localhost", "common_tls_context": {"alpn_protocols": ["x-test"],
                               "validation_context": {"trusted_ca": {"inline_string": pki.ca_pem.decode()}}}}))
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(pki.server.cert_path, pki.server.key_path)
    sctx.set_alpn_protocols(["x-test"])
    a, b = socket.socketpair()
    seen = {}

    def server():
        b.settimeout(5)
        t = sctx.wrap_socket(b, server_side=True)
        seen["alpn"] = t.selected_alpn_protocol()
        seen["req"] = t.recv(100)
        t.sendall(b"pong")
        try:
            seen["eof"] = t.recv(100)  # our close_notify
        except ssl.SSLError as e:
            seen["eof"] = e
        t.unwrap()
        b.close()

    import threading
    th = threading.Thread(target=server, daemon=True)
    th.start()

    class App(asyncio.Protocol):
        def __init__(self):
            self.events = []
            self.done = None

        def connection_made(self, t):
            self.t = t
            self.events.append(("made", t.get_extra_info("ssl_object").selected_alpn_protocol()))

        def data_received(self, d):
            self.events.append(("data", d))
            self.t.write_eof()

        def eof_received(self):
            self.events.append(("eof",))
            return False

        def connection_lost(self, exc):
            self.events.append(("lost",))
            self.done.set_result(None)

    async def main():
        loop = asyncio.get_running_loop()
        app = App()
        app.done = loop.create_future()
        a.setblocking(False)
        await connect_client(loop, u.compiled(), a, app, 5.0, None)
        app.t.write(b"ping")
        await asyncio.wait_for(app.done, 5)
        return app.events

    events = asyncio.run(main())
    th.join(5)
    assert seen["alpn"] == "x-test" and seen["req"] == b"ping" and seen["eof"] == b""
    assert events == [("made", "x-test"), ("data", b"pong"), ("eof",), ("lost",)], events


def test_sni_and_sans_do_not_split_the_ssl_context(pki):
    """Istio gives every outbound cluster its own SNI and SANs: one SSLContext serves them all."""
    def u(sni, san):
        return upstream_factory(uctx({"sni": sni, "common_tls_context": {"validation_context": {
            "trusted_ca": {"inline_string": pki.ca_pem.decode()},
            "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": {"exact": san}}]}}}))
    a, b = u("outbound_.80_._.a", "spiffe://td/sa/a"), u("outbound_.80_._.b", "spiffe://td/sa/b")
    assert a.compiled_tls is not b.compiled_tls and a.compiled_tls.ctx is b.compiled_tls.ctx
    assert (a.compiled_tls.sni, b.compiled_tls.sni) == ("outbound_.80_._.a", "outbound_.80_._.b")
    c = upstream_factory(uctx({"sni": "x", "common_tls_context": {"alpn_protocols": ["istio"], "validation_context": {
        "trusted_ca": {"inline_string": pki.ca_pem.decode()}}}}))
    assert c.compiled_tls.ctx is not a.compiled_tls.ctx


def test_sds_validation_context_san_matchers_merged(pki, store):
    """SAN matchers and pins delivered inside an SDS validation context are applied, merged after
    the default context's (Envoy's combined context: default MergeFrom SDS); a bad one NACKs."""
    import base64
    u = upstream_factory(uctx({"common_tls_context": {"combined_validation_context": {
        "default_validation_context": {"match_subject_alt_names": [{"exact": "spiffe://td/ns/a/sa/one"}]},
        "validation_context_sds_secret_config": {"name": "ROOTCA", "sds_config": {"ads": {}}}}}}))
    ca = {"trusted_ca": {"inline_bytes": base64.b64encode(pki.ca_pem).decode()}}
    store.apply_sds({"ROOTCA": secret({"name": "ROOTCA", "validation_context": dict(
        ca, match_typed_subject_alt_names=[{"san_type": "URI", "matcher": {"exact": "spiffe://td/ns/a/sa/two"}}])})})
    c = u.compiled()
    assert c.check_peer(_Peer([("URI", "spiffe://td/ns/a/sa/one")])) == ""
    assert c.check_peer(_Peer([("URI", "spiffe://td/ns/a/sa/two")])) == ""
    assert c.check_peer(_Peer([("URI", "spiffe://td/ns/a/sa/three")])) == "fail_verify_san"
    # only the SDS context has matchers: they alone apply
    d = upstream_factory(uctx({"common_tls_context": {
        "validation_context_sds_secret_config": {"name": "ROOTCA", "sds_config": {"ads": {}}}}}))
    assert d.compiled().check_peer(_Peer([("URI", "spiffe://td/ns/a/sa/one")])) == "fail_verify_san"
    assert d.compiled().check_peer(_Peer([("URI", "spiffe://td/ns/a/sa/two")])) == ""
    # an SDS context whose matcher does not compile is refused; the last good stays
    with pytest.raises(ConfigError):
        store.apply_sds({"ROOTCA": secret({"name": "ROOTCA", "validation_context": dict(
            ca, match_typed_subject_alt_names=[{"san_type": "URI", "matcher": {"safe_regex": {"regex": "("}}}])})})
    assert u.compiled() is c


def test_istio_alpn_pools_keyed_by_list_and_dropped_with_their_host(pki, tmp_path):
    """istio.alpn: the cluster hands out a pool per (host, ALPN list) whose TLS offers that list
    instead of the cluster's own; a plaintext host keeps its ordinary pool; an EDS update that
    removes the host drains its ALPN pools too."""
    from envoy.config.cluster.v3 import cluster_pb2
    from envoy.config.endpoint.v3 import endpoint_pb2
    import pyproxy.extensions  # noqa: F401 (the built-in transport sockets)
    from pyproxy.cluster.cluster import Cluster
    from pyproxy.cluster.host import Host
    from pyproxy.cluster.manager import ClusterManager
    from pyproxy.stats import Store
    proto = json_format.ParseDict({"name": "c", "type": "EDS", "connect_timeout": "1s",
                                   "eds_cluster_config": {"eds_config": {"ads": {}}},
                                   "transport_socket": {"name": "tls", "typed_config": {
                                       "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                                       "common_tls_context": {"alpn_protocols": ["istio-peer-exchange", "istio"],
                                                              "validation_context": {"trusted_ca": {
                                                                  "inline_string": pki.ca_pem.decode()}}}}}},
                                  cluster_pb2.Cluster())
    loop = asyncio.new_event_loop()
    try:
        c = Cluster(proto, ClusterManager(loop, Store()))
        cla = json_format.ParseDict({"cluster_name": "c", "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}}
            for p in (1, 2)]}]}, endpoint_pb2.ClusterLoadAssignment())
        c.update_load_assignment(cla)
        h1, h2 = c.priority_set.all_hosts[:2]
        alpn = ("istio-http/1.1", "istio", "http/1.1")
        p = c.http_pool(h1, False, alpn)
        assert p is c.http_pool(h1, False, alpn) and p is not c.http_pool(h1, False)
        assert p.transport.alpn == alpn and c.transport_for(h1).alpn == ("istio-peer-exchange", "istio")
        assert p.transport.compiled().ctx is not c.transport_for(h1).compiled().ctx
        c.http_pool(h2, False, alpn)
        cla2 = json_format.ParseDict({"cluster_name": "c", "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 2}}}}]}]},
            endpoint_pb2.ClusterLoadAssignment())
        c.update_load_assignment(cla2)
        assert [k[0] for k in c.alpn_pools] == [h2.key]
        c.close()
    finally:
        loop.close()


def test_sds_secrets_kept_apart_per_config_source(pki, store):
    """``default`` from the agent's sds-grpc and ``default`` over ADS are two secrets (Envoy keys
    its SDS providers by config source and name): each context gets its own, updates to one leave
    the other alone, and removing one does not remove the other."""
    grpc_src = {"api_config_source": {"api_type": "GRPC", "transport_api_version": "V3",
                                      "grpc_services": [{"envoy_grpc": {"cluster_name": "sds-grpc"}}]}}

    def factory(src):
        return downstream_factory(dctx({"common_tls_context": {
            "tls_certificate_sds_secret_configs": [{"name": "default", "sds_config": src}]}}))
    fg, fa = factory(grpc_src), factory({"ads": {}})
    assert {p.key for p in fg.secret_providers} == {("grpc:sds-grpc", "default")}
    agent_cert = pki.issue("agent", uri=["spiffe://cluster.local/ns/default/sa/agent"])
    istiod_cert = pki.issue("istiod", uri=["spiffe://cluster.local/ns/default/sa/istiod"])
    store.apply_sds({"default": secret({"name": "default", "tls_certificate": cert_entry(agent_cert)})},
                    source="grpc:sds-grpc")
    assert fg.compiled().local_uri_san == "spiffe://cluster.local/ns/default/sa/agent"
    with pytest.raises(TlsNotReady):
        fa.compiled()   # nothing arrived over ADS yet
    assert [p.ready for p in fg.secret_providers] == [True] and [p.ready for p in fa.secret_providers] == [False]
    store.apply_sds({"default": secret({"name": "default", "tls_certificate": cert_entry(istiod_cert)})})
    assert fa.compiled().local_uri_san == "spiffe://cluster.local/ns/default/sa/istiod"
    assert fg.compiled().local_uri_san == "spiffe://cluster.local/ns/default/sa/agent"
    store.apply_sds(removed=["default"])    # removed over ADS only
    with pytest.raises(TlsNotReady):
        fa.compiled()
    assert fg.compiled().local_uri_san == "spiffe://cluster.local/ns/default/sa/agent"


def test_upstream_max_session_keys():
    """Upstream session resumption follows max_session_keys: on by default (Envoy's 1), off at 0;
    above 1 one session is kept, and said so."""
    assert upstream_factory(uctx({"common_tls_context": {}})).compiled().resume is True
    off = upstream_factory(uctx({"max_session_keys": 0, "common_tls_context": {}}))
    assert off.compiled().resume is False and not off.notes
    many = upstream_factory(uctx({"max_session_keys": 4, "common_tls_context": {}}))
    assert many.compiled().resume is True
    assert many.notes == ["max_session_keys 4: one session is kept (the most recent)"]


def test_peer_facts_cached_by_der_and_bounded(monkeypatch):
    """The parsed peer certificate is cached by its DER (a second handshake with it parses
    nothing), the SAN check still runs per context on the cached facts, and the cache is bounded."""
    from pyproxy.tls import peer

    class Obj:
        calls = 0

        def __init__(self, sans):
            self.sans = sans

        def getpeercert(self, binary=False):
            Obj.calls += 1
            return {"subjectAltName": self.sans, "subject": ((("commonName", "c"),),),
                    "issuer": ((("commonName", "ca"),),), "serialNumber": "0A"}

    monkeypatch.setattr(peer, "_FACTS", {})
    o = Obj((("URI", "spiffe://td/ns/a/sa/one"), ("DNS", "d.svc")))
    f = peer.peer_facts(o, b"der-1")
    assert (f.uri, f.dns, f.subject, f.issuer, f.serial, f.principal) == (
        "spiffe://td/ns/a/sa/one", "d.svc", "CN=c", "CN=ca", "0a", "spiffe://td/ns/a/sa/one")
    assert f.principals == ("spiffe://td/ns/a/sa/one", "d.svc", "CN=c")
    assert peer.peer_facts(o, b"der-1") is f and Obj.calls == 1
    # a different certificate is parsed on its own
    g = peer.peer_facts(Obj((("URI", "spiffe://td/ns/a/sa/two"),)), b"der-2")
    assert g.uri == "spiffe://td/ns/a/sa/two" and Obj.calls == 2
    monkeypatch.setattr(peer, "FACTS_MAX", 3)
    for i in range(10):
        peer.peer_facts(o, b"other-%d" % i)
    assert len(peer._FACTS) <= 3


def test_san_check_runs_on_cached_facts(pki):
    from pyproxy.tls.peer import PeerFacts
    good = upstream_factory(uctx({"common_tls_context": {"validation_context": {
        "trusted_ca": {"inline_string": pki.ca_pem.decode()},
        "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": {"exact": "spiffe://td/ns/a/sa/one"}}]}}}))
    bad = upstream_factory(uctx({"common_tls_context": {"validation_context": {
        "trusted_ca": {"inline_string": pki.ca_pem.decode()},
        "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": {"exact": "spiffe://td/ns/a/sa/two"}}]}}}))
    f = PeerFacts({"subjectAltName": (("URI", "spiffe://td/ns/a/sa/one"),)})
    p = _Peer([("URI", "spiffe://td/ns/a/sa/one")])
    assert good.compiled_tls.check_peer(p, f) == ""
    assert bad.compiled_tls.check_peer(p, f) == "fail_verify_san"


def test_tls13_suites_in_envoys_order(pki):
    """TLS 1.3 suites ordered as BoringSSL orders them (AES-128-GCM first), on both sides, all three
    still offered, and a TLS 1.2 cipher list does not undo it; a TLS 1.3 handshake with a client
    offering OpenSSL's default order (AES-256 first) lands on AES-128 (server preference)."""
    from pyproxy.tls import tickets
    if not tickets.AVAILABLE:
        pytest.skip("libssl not reachable from ctypes here")
    f = downstream_factory(dctx({"common_tls_context": {
        "tls_params": {"cipher_suites": ["ECDHE-ECDSA-AES128-GCM-SHA256"]},
        "tls_certificates": [cert_entry(pki.server)]}}))
    u = upstream_factory(uctx({"common_tls_context": {}}))
    for ctx in (f.compiled_tls.ctx, u.compiled_tls.ctx):
        names = [c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.3"]
        assert names == ["TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"]
    cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    cctx.check_hostname = False
    cctx.verify_mode = ssl.CERT_NONE
    si, so, ci, co = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    s = f.compiled_tls.ctx.wrap_bio(si, so, server_side=True)
    c = cctx.wrap_bio(ci, co, server_side=False)
    for _ in range(6):
        for o in (c, s):
            try:
                o.do_handshake()
            except ssl.SSLWantReadError:
                pass
        if co.pending:
            si.write(co.read())
        if so.pending:
            ci.write(so.read())
    assert s.version() == "TLSv1.3" and s.cipher()[0] == "TLS_AES_128_GCM_SHA256"


class _RawSink:
    """The plaintext transport under a TLS layer, in memory: what the layer wrote, and how it ended."""

    def __init__(self):
        self.out = []
        self.ended = None

    def write(self, data):
        self.out.append(bytes(data))

    def write_eof(self):
        self.ended = "eof"

    def close(self):
        self.ended = "close"

    def abort(self):
        self.ended = "abort"


@pytest.mark.parametrize("ticket_fails", [False, True])
def test_close_notify_even_when_a_ticket_would_fail(pki, ticket_fails):
    """A server-side TLS layer closing a TLS 1.3 connection it never wrote to (a session ticket
    still due, tls/tickets.py) sends close_notify: the client reads a clean end. The ticket is not
    asked for at the close: with OpenSSL, a requested ticket keeps the connection "in init" until it
    is written, so a ticket that failed to be written (here: the session-id callback refuses) would
    leave SSL_shutdown refusing ("shutdown while in init") and the peer with an internal_error
    alert instead of close_notify."""
    import ctypes
    import _ssl
    from pyproxy.tls import tickets
    from pyproxy.tls.socket import TlsLayer
    if not tickets.AVAILABLE:
        pytest.skip("libssl not reachable from ctypes here")
    f = downstream_factory(dctx({"common_tls_context": {"tls_certificates": [cert_entry(pki.server)]}}))

    class Layer(TlsLayer):
        __slots__ = ()

    layer = Layer()
    layer._init(f.compiled_tls, None)
    layer._wrap(True)
    layer.raw = raw = _RawSink()
    cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    cctx.load_verify_locations(pki.ca_path)
    cctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ci, co = ssl.MemoryBIO(), ssl.MemoryBIO()
    c = cctx.wrap_bio(ci, co, server_hostname="localhost")
    done = False
    for _ in range(10):
        try:
            c.do_handshake()
            done = True
        except ssl.SSLWantReadError:
            pass
        if co.pending:
            layer.inc.write(co.read())
            assert layer._handshake() is not None
        if raw.out:
            ci.write(b"".join(raw.out))
            raw.out.clear()
        if done and layer.state == 1:
            break
    assert done and layer.obj.version() == "TLSv1.3" and not raw.out  # num_tickets 0: none yet
    assert f.compiled_tls.defer_ticket
    layer.ticket_due = True  # (as ServerTls._opened sets it)
    refuse = None
    if ticket_fails:
        cb_type = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)
        refuse = cb_type(lambda ssl_ptr, sid, n: 0)
        set_cb = ctypes.CDLL(_ssl.__file__).SSL_set_generate_session_id
        set_cb.argtypes = [ctypes.c_void_p, cb_type]
        assert set_cb(tickets._ptr(id(layer.so) + tickets._SSL_AT), refuse) == 1
    layer.close()
    assert raw.ended == "close" and raw.out
    ci.write(b"".join(raw.out))
    try:
        got = c.read(100)
    except ssl.SSLZeroReturnError:
        got = b""
    assert got == b""  # close_notify (an alert would raise SSLError here)
    assert not c.session.has_ticket


@pytest.mark.parametrize("chunks", [(1, 7, 150, 5000, 3), (64,), (17000,), (300, 16000)])
def test_server_layer_reads_records_however_they_are_split(pki, chunks):
    """ServerTls.feed reads each arrival into a buffer of the arrival's size (a record's plaintext
    is shorter than its ciphertext); a record begun in an earlier arrival can hold more plaintext
    than the arrival that completes it, and that rest (kept by OpenSSL) must come out at once:
    every plaintext byte reaches the sink in order, whatever the ciphertext's split."""
    from pyproxy.tls.socket import OPEN, ServerTls
    f = downstream_factory(dctx({"common_tls_context": {"tls_certificates": [cert_entry(pki.server)]}}))
    layer = ServerTls.__new__(ServerTls)
    layer._init(f.compiled_tls, None)
    layer._wrap(True)
    layer.raw = raw = _RawSink()
    layer.conn = type("Conn", (), {"closed": False})()
    got = []
    layer.sink = lambda data, end: got.append((bytes(data), end))
    cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    cctx.load_verify_locations(pki.ca_path)
    ci, co = ssl.MemoryBIO(), ssl.MemoryBIO()
    c = cctx.wrap_bio(ci, co, server_hostname="localhost")
    done = False
    for _ in range(10):
        try:
            c.do_handshake()
            done = True
        except ssl.SSLWantReadError:
            pass
        if co.pending:
            layer.inc.write(co.read())
            assert layer._handshake() is not None
        if raw.out:
            ci.write(b"".join(raw.out))
            raw.out.clear()
        if done and layer.state == OPEN:
            break
    assert done and layer.state == OPEN
    sent = b""
    for i, size in enumerate((1, 100, 3000, 16384, 20000, 3000)):
        data = bytes([65 + i]) * size
        c.write(data)
        sent += data
    wire = co.read()
    pos = k = 0
    while pos < len(wire) - 1:
        step = chunks[k % len(chunks)]
        layer.feed(wire[pos:min(pos + step, len(wire) - 1)], False)
        pos += step
        k += 1
    layer.feed(wire[-1:], False)  # (the last record completed by its last byte alone)
    assert b"".join(d for d, _ in got) == sent
    assert all(d and not end for d, end in got)
