"""Istio telemetry between two pyproxy sidecars: peer metadata exchange over the
``x-envoy-peer-metadata`` headers (HTTP ``peer_metadata``), ``istio.stats`` (HTTP and TCP), and the
Prometheus exposition, checked label by label against the contract (ISTIO_SECURITY_TELEMETRY.md D).

Topology (all on 127.0.0.1): client app -> sidecar A (svc-a, OUTBOUND listener, route to
``outbound|8080||svc-b.default.svc.cluster.local``) -> sidecar B (svc-b-v1, INBOUND listener,
``inbound|8080||``) -> backend (HTTP, gRPC echo, TCP echo). Both sidecars are pyproxy processes
with Istio-shaped bootstraps (node metadata as pilot-agent renders it).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import tempfile
import http.client
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import pytest
from google.protobuf import struct_pb2

from tests import grpc_util
from tests.proxy_util import Pyproxy, cyclic_garbage, free_port
from tests.tls_certs import Pki, downstream_tls, upstream_tls

T = "type.googleapis.com/"
HCM = T + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = {"name": "envoy.filters.http.router", "typed_config": {"@type": T + "envoy.extensions.filters.http.router.v3.Router"}}
STATS_IN = {"name": "istio.stats", "typed_config": {"@type": T + "stats.PluginConfig", "disable_host_header_fallback": True}}
STATS_OUT = {"name": "istio.stats", "typed_config": {"@type": T + "udpa.type.v1.TypedStruct",
                                                      "type_url": T + "stats.PluginConfig", "value": {}}}
MX_IN = {"name": "istio.metadata_exchange", "typed_config": {
    "@type": T + "io.istio.http.peer_metadata.Config",
    "downstream_discovery": [{"istio_headers": {}}, {"workload_discovery": {}}],
    "downstream_propagation": [{"istio_headers": {}}]}}
MX_OUT = {"name": "istio.metadata_exchange", "typed_config": {
    "@type": T + "io.istio.http.peer_metadata.Config",
    "upstream_discovery": [{"istio_headers": {}}, {"workload_discovery": {}}],
    "upstream_propagation": [{"istio_headers": {}}]}}
GRPC_STATS = {"name": "envoy.filters.http.grpc_stats", "typed_config": {
    "@type": T + "envoy.extensions.filters.http.grpc_stats.v3.FilterConfig", "emit_filter_state": True,
    "stats_for_all_methods": True}}
SVC_B = "svc-b.default.svc.cluster.local"
OUT_CLUSTER = "outbound|8080||" + SVC_B
OUT_GRPC = "outbound|9090||" + SVC_B


def node(workload, app, version, ip):
    return {"id": "sidecar~%s~%s-abc.default~default.svc.cluster.local" % (ip, workload),
            "cluster": "%s.default" % app,
            "metadata": {"NAME": "%s-abc" % workload, "NAMESPACE": "default", "CLUSTER_ID": "Kubernetes",
                         "WORKLOAD_NAME": workload, "ISTIO_VERSION": "1.32.0", "MESH_ID": "cluster.local",
                         "OWNER": "kubernetes://apis/apps/v1/namespaces/default/deployments/%s" % workload,
                         "LABELS": {"app": app, "version": version,
                                    "service.istio.io/canonical-name": app,
                                    "service.istio.io/canonical-revision": version}}}


def _static(name, port, h2=False, **extra):
    c = {"name": name, "type": "STATIC", "connect_timeout": "1s",
         "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
             {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]}}
    if h2:
        c["typed_extension_protocol_options"] = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": T + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}}}}
    c.update(extra)
    return c


def _hcm_listener(name, port, direction, filters, vhosts, stat, log_path=None, tls=None):
    hcm = {"@type": HCM, "stat_prefix": stat, "codec_type": "AUTO",
           "route_config": {"name": stat, "virtual_hosts": vhosts},
           "http_filters": filters + [ROUTER]}
    if log_path:
        hcm["access_log"] = [{"name": "envoy.access_loggers.file", "typed_config": {
            "@type": T + "envoy.extensions.access_loggers.file.v3.FileAccessLog", "path": log_path,
            "log_format": {"text_format_source": {"inline_string": PEER_LOG}}}}]
    chain = {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
    if tls is not None:
        chain["transport_socket"] = tls
    return {"name": name, "traffic_direction": direction,
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [chain]}


PEER_LOG = ("%REQ(:PATH)% %FILTER_STATE(downstream_peer_obj:FIELD:workload)% "
            "%FILTER_STATE(downstream_peer_obj:FIELD:namespace)% %FILTER_STATE(downstream_peer_obj:FIELD:type)% "
            "%FILTER_STATE(upstream_peer_obj:FIELD:workload)% %FILTER_STATE(downstream_peer)%\n")


def _tcp_listener(name, port, direction, cluster, stats_filter, mx=False, tls=None):
    chain = {"filters": ([MX_TCP] if mx else []) + [stats_filter, {"name": "envoy.filters.network.tcp_proxy",
                                                                    "typed_config": {
        "@type": T + "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
        "stat_prefix": cluster, "cluster": cluster}}]}
    if tls is not None:
        chain["transport_socket"] = tls
    return {"name": name, "traffic_direction": direction,
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [chain]}


# as istiod renders it: a TypedStruct on listeners, a directly typed config in clusters' filters
MX_TCP = {"name": "istio.metadata_exchange", "typed_config": {
    "@type": T + "udpa.type.v1.TypedStruct", "type_url": T + "envoy.tcp.metadataexchange.config.MetadataExchange",
    "value": {"protocol": "istio-peer-exchange"}}}
MX_CLUSTER = {"name": "istio.metadata_exchange", "typed_config": {
    "@type": T + "envoy.tcp.metadataexchange.config.MetadataExchange", "protocol": "istio-peer-exchange"}}
SA_A = "spiffe://cluster.local/ns/default/sa/svc-a"
SA_B = "spiffe://cluster.local/ns/default/sa/svc-b"


def istio_meta(host, name, ns="default"):
    return {"filter_metadata": {"istio": {"services": [{"host": host, "name": name, "namespace": ns}]}}}


class Backend(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen = []

    def do_GET(self):
        Backend.seen.append(dict(self.headers.items()))
        body = b"hello from b"
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


def _echo_server(greeting=b""):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)

    def serve():
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return

            def one(c=c):
                with c:
                    if greeting:
                        c.sendall(greeting)
                    while True:
                        try:
                            d = c.recv(65536)
                        except OSError:
                            return
                        if not d:
                            return
                        c.sendall(d)
            threading.Thread(target=one, daemon=True).start()
    threading.Thread(target=serve, daemon=True).start()
    return srv


class Mesh:
    def __init__(self):
        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Backend)
        threading.Thread(target=self.http.serve_forever, daemon=True).start()
        self.grpc_server, self.grpc_port = grpc_util.start_grpc_server()
        self.echo = _echo_server()
        self.greeter = _echo_server(greeting=b"HELLO from the server\n")
        gb = self.greeter.getsockname()[1]
        self.b_greet, self.a_greet = free_port(), free_port()
        self.b_https, self.a_https = free_port(), free_port()
        hb, eb = self.http.server_address[1], self.echo.getsockname()[1]
        self.b_http, self.b_grpc, self.b_tcp = free_port(), free_port(), free_port()
        self.a_http, self.a_grpc, self.a_tcp = free_port(), free_port(), free_port()
        closed = free_port()
        self.tmp = tempfile.mkdtemp(prefix="px-mx-")
        self.b_log = os.path.join(self.tmp, "b.log")
        pki = Pki(self.tmp)
        cert_a = pki.issue("svc-a", uri=[SA_A])
        cert_b = pki.issue("svc-b", uri=[SA_B])
        self.b_mtls, self.a_mtls = free_port(), free_port()
        catch_all = lambda cluster: [{"name": "inbound|http", "domains": ["*"], "routes": [  # noqa: E731
            {"name": "default", "match": {"prefix": "/"}, "route": {"cluster": cluster}}]}]
        b = {"node": node("svc-b-v1", "svc-b", "v1", "10.0.0.2"),
             "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
             "static_resources": {
                 "listeners": [
                     _hcm_listener("in_http", self.b_http, "INBOUND", [MX_IN, STATS_IN], catch_all("inbound|8080||"),
                                   "inbound_0.0.0.0_8080", log_path=self.b_log),
                     _hcm_listener("in_grpc", self.b_grpc, "INBOUND", [MX_IN, STATS_IN], catch_all("inbound|9090||"),
                                   "inbound_0.0.0.0_9090"),
                     _tcp_listener("in_tcp", self.b_tcp, "INBOUND", "inbound|7070||", STATS_IN),
                     _tcp_listener("in_mtls", self.b_mtls, "INBOUND", "inbound|7070||", STATS_IN, mx=True,
                                   tls=downstream_tls(cert_b, alpn=("istio-peer-exchange", "h2", "http/1.1"),
                                                      ca=pki, require=True)),
                     _hcm_listener("in_https", self.b_https, "INBOUND", [MX_IN, STATS_IN],
                                   catch_all("inbound|8080||"), "inbound_0.0.0.0_8443",
                                   tls=downstream_tls(cert_b, alpn=("istio-http/1.1", "istio", "http/1.1"),
                                                      ca=pki, require=True)),
                     _tcp_listener("in_greet", self.b_greet, "INBOUND", "inbound|7072||", STATS_IN, mx=True,
                                   tls=downstream_tls(cert_b, alpn=("istio-peer-exchange", "h2", "http/1.1"),
                                                      ca=pki, require=True))],
                 "clusters": [_static("inbound|8080||", hb), _static("inbound|9090||", self.grpc_port, h2=True),
                              _static("inbound|7070||", eb), _static("inbound|7072||", gb)]}}
        vh = [{"name": SVC_B + ":8080", "domains": [SVC_B, "svc-b", "svc-b:8080"], "routes": [
            {"name": "uf", "match": {"prefix": "/uf"}, "route": {"cluster": "outbound|8081||" + SVC_B}},
            {"name": "default", "match": {"prefix": "/"}, "route": {"cluster": OUT_CLUSTER}}]}]
        vh_grpc = [{"name": SVC_B + ":9090", "domains": ["*"], "routes": [
            {"name": "default", "match": {"prefix": "/"}, "route": {"cluster": OUT_GRPC}}]}]
        self.a_prom, a_admin = free_port(), free_port()
        prom = {"name": "0.0.0.0_15090", "address": {"socket_address": {"address": "127.0.0.1",
                                                                         "port_value": self.a_prom}},
                "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": {
                    "@type": HCM, "stat_prefix": "stats", "codec_type": "AUTO",
                    "route_config": {"virtual_hosts": [{"name": "backend", "domains": ["*"], "routes": [
                        {"match": {"prefix": "/stats/prometheus"}, "route": {"cluster": "prometheus_stats"}}]}]},
                    "http_filters": [ROUTER]}}]}]}
        a = {"node": node("svc-a", "svc-a", "v1", "10.0.0.1"),
             "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": a_admin}}},
             "static_resources": {
                 "listeners": [
                     _hcm_listener("out_http", self.a_http, "OUTBOUND", [MX_OUT, STATS_OUT], vh, "outbound_0.0.0.0_8080"),
                     _hcm_listener("out_grpc", self.a_grpc, "OUTBOUND", [MX_OUT, GRPC_STATS, STATS_OUT], vh_grpc,
                                   "outbound_0.0.0.0_9090"),
                     _tcp_listener("out_tcp", self.a_tcp, "OUTBOUND", "outbound|7070||" + SVC_B, STATS_OUT),
                     _tcp_listener("out_mtls", self.a_mtls, "OUTBOUND", "outbound|7071||" + SVC_B, STATS_OUT),
                     _hcm_listener("out_https", self.a_https, "OUTBOUND", [MX_OUT, STATS_OUT], [
                         {"name": "svc-b:8443", "domains": ["*"], "routes": [
                             {"name": "default", "match": {"prefix": "/"},
                              "route": {"cluster": "outbound|8443||" + SVC_B}}]}], "outbound_0.0.0.0_8443"),
                     _tcp_listener("out_greet", self.a_greet, "OUTBOUND", "outbound|7072||" + SVC_B, STATS_OUT),
                     prom],
                 "clusters": [_static("prometheus_stats", a_admin),
                     _static(OUT_CLUSTER, self.b_http, metadata=istio_meta(SVC_B, "svc-b")),
                     _static("outbound|8081||" + SVC_B, closed, metadata=istio_meta(SVC_B, "svc-b")),
                     _static(OUT_GRPC, self.b_grpc, h2=True, metadata=istio_meta(SVC_B, "svc-b")),
                     _static("outbound|7070||" + SVC_B, self.b_tcp, metadata=istio_meta(SVC_B, "svc-b")),
                     _static("outbound|7071||" + SVC_B, self.b_mtls, metadata=istio_meta(SVC_B, "svc-b"),
                             filters=[MX_CLUSTER],
                             transport_socket=upstream_tls(alpn=("istio-peer-exchange", "istio"), ca=pki,
                                                           cert=cert_a)),
                     _static("outbound|8443||" + SVC_B, self.b_https, metadata=istio_meta(SVC_B, "svc-b"),
                             filters=[MX_CLUSTER],
                             transport_socket=upstream_tls(alpn=("istio-http/1.1",), ca=pki, cert=cert_a)),
                     _static("outbound|7072||" + SVC_B, self.b_greet, metadata=istio_meta(SVC_B, "svc-b"),
                             filters=[MX_CLUSTER],
                             transport_socket=upstream_tls(alpn=("istio-peer-exchange", "istio"), ca=pki,
                                                           cert=cert_a))]}}
        self.b = Pyproxy(b, extra_args=["--file-flush-interval-msec", "100"])
        try:
            self.a = Pyproxy(a)
        except BaseException:
            self.b.stop()
            raise

    def close(self):
        for p in (getattr(self, "a", None), getattr(self, "b", None)):
            if p is not None:
                p.stop()
        self.http.shutdown()
        self.http.server_close()
        self.grpc_server.stop(0)
        self.echo.close()
        self.greeter.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def mesh():
    m = Mesh()
    try:
        yield m
    finally:
        m.close()


def get(port, path, host=SVC_B, headers=None):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        c.request("GET", path, headers=dict({"host": host}, **(headers or {})))
        r = c.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        c.close()


def admin(p, path, headers=None):
    c = http.client.HTTPConnection("127.0.0.1", p.admin_port, timeout=10)
    try:
        c.request("GET", path, headers=headers or {})
        r = c.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read().decode()
    finally:
        c.close()


_SERIES = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)\{(.*)\} (\S+)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def series(p, name):
    """[(labels as an ordered list of (k, v)), value] of one family in /stats/prometheus."""
    _, _, body = admin(p, "/stats/prometheus")
    out = []
    for line in body.splitlines():
        m = _SERIES.match(line)
        if m and m.group(1) == name:
            out.append((_LABEL.findall(m.group(2)), float(m.group(3))))
    return out


def find(p, name, **want):
    """The one series of ``name`` whose labels include ``want``; its (labels, value)."""
    hits = [(l, v) for l, v in series(p, name) if all(dict(l).get(k) == w for k, w in want.items())]
    assert len(hits) == 1, (name, want, hits, series(p, name))
    return hits[0]


HTTP_ORDER = ["reporter", "source_workload", "source_canonical_service", "source_canonical_revision",
              "source_workload_namespace", "source_principal", "source_app", "source_version", "source_cluster",
              "destination_workload", "destination_workload_namespace", "destination_principal",
              "destination_app", "destination_version", "destination_service", "destination_canonical_service",
              "destination_canonical_revision", "destination_service_name", "destination_service_namespace",
              "destination_cluster", "request_protocol", "response_code", "grpc_response_status", "response_flags",
              "connection_security_policy"]
TCP_ORDER = HTTP_ORDER[:21] + ["response_flags", "connection_security_policy"]

SOURCE_SIDE = {"source_workload": "svc-a", "source_canonical_service": "svc-a", "source_canonical_revision": "v1",
               "source_workload_namespace": "default", "source_app": "svc-a", "source_version": "v1",
               "source_cluster": "Kubernetes"}
DEST_SIDE = {"destination_workload": "svc-b-v1", "destination_workload_namespace": "default",
             "destination_app": "svc-b", "destination_version": "v1", "destination_canonical_service": "svc-b",
             "destination_canonical_revision": "v1", "destination_cluster": "Kubernetes"}


def test_http_success_labels_on_both_sides(mesh):
    Backend.seen.clear()
    st, h, body = get(mesh.a_http, "/hello")
    assert st == 200 and body == b"hello from b"
    # the app behind B never sees the exchange headers; A's client never sees B's
    assert not any(k.lower().startswith("x-envoy-peer-metadata") for k in Backend.seen[-1])
    assert "x-envoy-peer-metadata" not in h and "x-envoy-peer-metadata-id" not in h
    labels, v = find(mesh.a, "istio_requests_total", response_code="200", reporter="source")
    assert [k for k, _ in labels] == HTTP_ORDER
    assert v == 1
    assert dict(labels) == dict(SOURCE_SIDE, **DEST_SIDE, reporter="source", source_principal="unknown",
                                destination_principal="unknown", destination_service=SVC_B,
                                destination_service_name="svc-b", destination_service_namespace="default",
                                request_protocol="http", response_code="200", grpc_response_status="",
                                response_flags="-", connection_security_policy="unknown")
    labels, v = find(mesh.b, "istio_requests_total", response_code="200", reporter="destination")
    assert [k for k, _ in labels] == HTTP_ORDER
    assert v == 1
    # server side: no host fallback (disable_host_header_fallback), the inbound cluster has no
    # istio.services: destination_service falls back to the local canonical name
    assert dict(labels) == dict(SOURCE_SIDE, **DEST_SIDE, reporter="destination", source_principal="unknown",
                                destination_principal="unknown", destination_service="svc-b",
                                destination_service_name="svc-b", destination_service_namespace="default",
                                request_protocol="http", response_code="200", grpc_response_status="",
                                response_flags="-", connection_security_policy="none")
    # histograms with Istio's (Envoy's default) buckets, same labels
    _, _, text = admin(mesh.a, "/stats/prometheus")
    assert "# TYPE istio_requests_total counter" in text
    assert "# TYPE istio_request_duration_milliseconds histogram" in text
    buckets = [float(m) for m in re.findall(
        r'^istio_request_duration_milliseconds_bucket\{[^}]*response_code="200"[^}]*,le="([0-9.e+]+)"\} ', text, re.M)]
    assert buckets == [0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000,
                       600000, 1800000, 3600000]
    m = re.search(r'^istio_request_bytes_sum\{[^}]*response_code="200"[^}]*\} (\d+)$', text, re.M)
    assert m and int(m.group(1)) > 0
    m = re.search(r'^istio_response_bytes_sum\{[^}]*response_code="200"[^}]*\} (\d+)$', text, re.M)
    assert m and int(m.group(1)) >= len(b"hello from b")
    assert 'istio_build{component="proxy",tag="1.32.0"} 1' in text
    assert "\n# TYPE envoy_server_initialization_time_ms histogram\n" in text  # envoy_ names beside


def test_404_nr_and_503_uf(mesh):
    st, _, _ = get(mesh.a_http, "/x", host="nowhere.example")
    assert st == 404
    labels, v = find(mesh.a, "istio_requests_total", response_code="404")
    d = dict(labels)
    assert d["response_flags"] == "NR" and d["destination_workload"] == "unknown"
    assert d["destination_canonical_revision"] == "latest" and d["destination_service"] == "nowhere.example"
    assert d["destination_service_name"] == "nowhere.example"
    st, _, _ = get(mesh.a_http, "/uf")
    assert st == 503
    labels, v = find(mesh.a, "istio_requests_total", response_code="503")
    d = dict(labels)
    assert d["response_flags"] == "UF" and d["destination_workload"] == "unknown"
    assert d["destination_service"] == SVC_B and d["destination_service_name"] == "svc-b"
    assert d["destination_service_namespace"] == "default"


def test_grpc_ok_and_error_status(mesh):
    ch = grpc_util.channel(mesh.a_grpc)
    try:
        call = ch.unary_unary("/test.Echo/Unary")
        assert call(b"hi", timeout=10) == b"hi"
        with pytest.raises(grpc.RpcError) as e:
            call(b"status:5:no such thing", timeout=10)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        ch.close()
    for p, rep in ((mesh.a, "source"), (mesh.b, "destination")):
        labels, v = find(p, "istio_requests_total", request_protocol="grpc", grpc_response_status="0")
        assert [k for k, _ in labels] == HTTP_ORDER and v == 1
        d = dict(labels)
        assert d["reporter"] == rep and d["response_code"] == "200"
        assert d["source_workload"] == "svc-a" and d["destination_workload"] == "svc-b-v1"
        labels, v = find(p, "istio_requests_total", request_protocol="grpc", grpc_response_status="5")
        assert v == 1 and dict(labels)["response_code"] == "200"
    # the client's chain has grpc_stats (emit_filter_state): one message each way per call
    for st, want in (("0", 1), ("5", 0)):
        for name in ("istio_request_messages_total", "istio_response_messages_total"):
            labels, v = find(mesh.a, name, grpc_response_status=st)
            assert [k for k, _ in labels] == HTTP_ORDER
            assert v == (1 if name == "istio_request_messages_total" else want), (name, st, v)
    assert not series(mesh.b, "istio_request_messages_total")  # no grpc_stats on B's chain


def test_tcp_metrics_without_exchange(mesh):
    s = socket.create_connection(("127.0.0.1", mesh.a_tcp), timeout=10)
    s.sendall(b"x" * 1000)
    got = b""
    while len(got) < 1000:
        d = s.recv(65536)
        assert d
        got += d
    s.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if series(mesh.a, "istio_tcp_connections_closed_total") and series(mesh.b, "istio_tcp_connections_closed_total"):
            break
        time.sleep(0.1)
    for p, rep in ((mesh.a, "source"), (mesh.b, "destination")):
        for name, want in (("istio_tcp_connections_opened_total", 1), ("istio_tcp_connections_closed_total", 1),
                           ("istio_tcp_sent_bytes_total", 1000), ("istio_tcp_received_bytes_total", 1000)):
            labels, v = find(p, name, reporter=rep)
            assert [k for k, _ in labels] == TCP_ORDER
            assert v == want, (name, v)
            d = dict(labels)
            assert d["request_protocol"] == "tcp" and d["response_flags"] == "-"
    # no exchange without mTLS: the peer is unknown on both sides
    d = dict(find(mesh.b, "istio_tcp_connections_opened_total", reporter="destination")[0])
    assert d["source_workload"] == "unknown" and d["source_canonical_revision"] == "latest"
    assert d["destination_workload"] == "svc-b-v1" and d["connection_security_policy"] == "none"
    d = dict(find(mesh.a, "istio_tcp_connections_opened_total", reporter="source")[0])
    assert d["destination_workload"] == "unknown" and d["destination_service"] == SVC_B
    assert d["destination_canonical_revision"] == "latest" and d["connection_security_policy"] == "unknown"


def test_malformed_peer_header_is_counted_and_ignored(mesh):
    before = mesh.b.stat("istio_peer_metadata.malformed_header")
    for bad in ("!!!not base64!!!", base64.b64encode(b"\xff\xff\xff").decode()):
        st, _, body = get(mesh.b_http, "/direct", headers={"x-envoy-peer-metadata": bad,
                                                           "x-envoy-peer-metadata-id": "evil"})
        assert st == 200 and body == b"hello from b"
    assert mesh.b.stat("istio_peer_metadata.malformed_header") - before == 2
    # a valid header straight to B (no sidecar A): B reads it and echoes its own back
    s = struct_pb2.Struct()
    s.fields["WORKLOAD_NAME"].string_value = "curl-client"
    s.fields["NAMESPACE"].string_value = "other"
    s.fields["LABELS"].struct_value.fields["app"].string_value = "curl"
    v = base64.b64encode(s.SerializeToString()).decode().rstrip("=")  # unpadded is accepted too
    st, h, _ = get(mesh.b_http, "/direct2", headers={"x-envoy-peer-metadata": v, "x-envoy-peer-metadata-id": "c1"})
    assert st == 200
    assert h["x-envoy-peer-metadata-id"] == "sidecar~10.0.0.2~svc-b-v1-abc.default~default.svc.cluster.local"
    back = struct_pb2.Struct()
    back.ParseFromString(base64.b64decode(h["x-envoy-peer-metadata"]))
    assert back.fields["WORKLOAD_NAME"].string_value == "svc-b-v1"
    assert back.fields["OWNER"].string_value == "kubernetes://apis/apps/v1/namespaces/default/deployments/svc-b-v1"
    assert dict(back.fields["LABELS"].struct_value.fields.items())["app"].string_value == "svc-b"
    labels, _ = find(mesh.b, "istio_requests_total", source_workload="curl-client")
    d = dict(labels)
    assert d["source_workload_namespace"] == "other" and d["source_app"] == "curl"
    assert d["source_canonical_service"] == "unknown"


PROM_ACCEPT = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
               "text/plain;version=0.0.4;q=0.5,*/*;q=0.1")


def _samples_text(text):
    from prometheus_client.parser import text_string_to_metric_families
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name.removesuffix("_total"), tuple(sorted(s.labels.items())))] = s.value
    return out


def _samples_om(text):
    from prometheus_client.openmetrics.parser import text_string_to_metric_families
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name.endswith("_created"):
                continue
            out[(s.name.removesuffix("_total"), tuple(sorted(s.labels.items())))] = s.value
    return out


def test_prometheus_text_and_openmetrics_agree_and_15090_serves_them(mesh):
    get(mesh.a_http, "/again")
    st, h, text = admin(mesh.a, "/stats/prometheus", {"accept": "text/plain"})
    assert st == 200 and h["content-type"].startswith("text/plain")
    st, h, om = admin(mesh.a, "/stats/prometheus", {"accept": PROM_ACCEPT})
    assert st == 200 and h["content-type"].startswith("application/openmetrics-text; version=1.0.0")
    assert om.endswith("# EOF\n")
    assert "# TYPE istio_requests counter" in om and "# TYPE istio_request_duration_milliseconds histogram" in om
    a, b = _samples_text(text), _samples_om(om)
    # every text sample is in the OpenMetrics exposition with the same labels and value (counters
    # without _total keep their names there as 'unknown' families; the 0.0.4 parser adds _total to
    # every counter sample, hence the comparison without it); values may move between the scrapes
    # except the istio_* ones, which nothing touches in between
    ia = {k: v for k, v in a.items() if k[0].startswith("istio_")}
    ib = {k: v for k, v in b.items() if k[0].startswith("istio_")}
    assert ia and ia == ib
    assert set(a) == set(b)
    # through the 15090 listener (-> cluster prometheus_stats -> admin), as Prometheus scrapes a pod
    st, h, body = get(mesh.a_prom, "/stats/prometheus", host="pod", headers={"accept": PROM_ACCEPT})
    assert st == 200 and body.decode().endswith("# EOF\n")
    st, h, body = get(mesh.a_prom, "/stats/prometheus?filter=istio_requests", host="pod")
    lines = [l for l in body.decode().splitlines() if l and not l.startswith("#")]
    assert lines and all(l.startswith("istio_requests_total{") for l in lines)


def test_peer_in_filter_state_for_access_logs(mesh):
    get(mesh.a_http, "/logged")
    deadline = time.monotonic() + 10
    line = None
    while time.monotonic() < deadline and line is None:
        if os.path.exists(mesh.b_log):
            for l in open(mesh.b_log).read().splitlines():
                if l.startswith("/logged "):
                    line = l
        time.sleep(0.1)
    assert line is not None
    path, wl, ns, typ, up, peer = line.split(" ", 5)
    assert (wl, ns, typ, up) == ("svc-a", "default", "deployment", "-")
    assert json.loads(peer) == {"app": "svc-a", "cluster": "Kubernetes", "name": "svc-a-abc", "namespace": "default",
                                "revision": "v1", "service": "svc-a", "type": "deployment", "version": "v1",
                                "workload": "svc-a"}


def _echo_through(port, data, server_first=False):
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        s.sendall(data)
        got = b""
        while len(got) < len(data):
            d = s.recv(65536)
            assert d, got
            got += d
        return got
    finally:
        s.close()


def _wait_series(p, name, timeout=10, **want):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        hits = [(l, v) for l, v in series(p, name) if all(dict(l).get(k) == w for k, w in want.items())]
        if hits:
            return hits
        time.sleep(0.1)
    return []


def test_tcp_metadata_exchange_over_mtls(mesh):
    """ALPN istio-peer-exchange negotiated: both sides write their frame before any byte, strip
    the peer's, and the TCP metrics carry the peer's labels and the SPIFFE principals."""
    before = {k: mesh.b.stat("metadata_exchange." + k) for k in ("alpn_protocol_found", "metadata_added")}
    payload = bytes(range(256)) * 40
    assert _echo_through(mesh.a_mtls, payload) == payload  # byte-exact: the frames never reach the apps
    assert _wait_series(mesh.b, "istio_tcp_connections_closed_total", source_workload="svc-a")
    assert _wait_series(mesh.a, "istio_tcp_connections_closed_total", destination_workload="svc-b-v1")
    assert mesh.b.stat("metadata_exchange.alpn_protocol_found") - before["alpn_protocol_found"] == 1
    assert mesh.b.stat("metadata_exchange.metadata_added") - before["metadata_added"] == 1
    labels, v = find(mesh.b, "istio_tcp_connections_opened_total", source_workload="svc-a")
    assert [k for k, _ in labels] == TCP_ORDER and v == 1
    assert dict(labels) == dict(SOURCE_SIDE, **DEST_SIDE, reporter="destination", source_principal=SA_A,
                                destination_principal=SA_B, destination_service="svc-b",
                                destination_service_name="svc-b", destination_service_namespace="default",
                                request_protocol="tcp", response_flags="-", connection_security_policy="mutual_tls")
    labels, v = find(mesh.a, "istio_tcp_connections_opened_total", destination_workload="svc-b-v1")
    assert [k for k, _ in labels] == TCP_ORDER and v == 1
    assert dict(labels) == dict(SOURCE_SIDE, **DEST_SIDE, reporter="source", source_principal=SA_A,
                                destination_principal=SA_B, destination_service=SVC_B,
                                destination_service_name="svc-b", destination_service_namespace="default",
                                request_protocol="tcp", response_flags="-", connection_security_policy="unknown")
    for p, want in ((mesh.a, {"destination_workload": "svc-b-v1"}), (mesh.b, {"source_workload": "svc-a"})):
        assert find(p, "istio_tcp_sent_bytes_total", **want)[1] == len(payload)
        assert find(p, "istio_tcp_received_bytes_total", **want)[1] == len(payload)


def test_tcp_exchange_server_speaks_first(mesh):
    """A server-first protocol (a greeting) and a client that sends nothing: B's first write to A
    is preceded by B's frame (the write hook), A's upstream side answers with its frame on its
    first read; the greeting reaches the client alone, and both sides learn the peer."""
    s = socket.create_connection(("127.0.0.1", mesh.a_greet), timeout=10)
    try:
        got = b""
        deadline = time.monotonic() + 10
        while not got.endswith(b"\n") and time.monotonic() < deadline:
            got += s.recv(65536)
        assert got == b"HELLO from the server\n"
        s.sendall(b"ping")
        assert s.recv(4) == b"ping"
    finally:
        s.close()
    assert _wait_series(mesh.b, "istio_tcp_connections_closed_total", source_workload="svc-a",
                        destination_service_name="svc-b")
    d = dict(_wait_series(mesh.a, "istio_tcp_connections_opened_total", destination_workload="svc-b-v1",
                          destination_service=SVC_B)[0][0])
    assert d["destination_principal"] == SA_B


def test_tcp_exchange_bad_magic_passes_bytes_untouched(mesh):
    """A peer without the filter (no frame, bad magic): peer_not_found, its bytes go on untouched
    (after our own frame, which the server wrote first)."""
    import ssl
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["istio-peer-exchange"])
    pki_dir = mesh.tmp
    ctx.load_cert_chain(os.path.join(pki_dir, "svc-a.pem"), os.path.join(pki_dir, "svc-a-key.pem"))
    before = mesh.b.stat("metadata_exchange.initial_header_not_found")
    raw = socket.create_connection(("127.0.0.1", mesh.b_mtls), timeout=10)
    s = ctx.wrap_socket(raw)
    try:
        assert s.selected_alpn_protocol() == "istio-peer-exchange"
        s.sendall(b"NOT A FRAME, just bytes")
        got = b""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            got += s.recv(65536)
            if got.endswith(b"just bytes"):
                break
        # the server's frame first (magic), then our bytes echoed untouched
        assert got[:4] == bytes.fromhex("3D230467")
        n = int.from_bytes(got[4:8], "big")
        assert got[8 + n:] == b"NOT A FRAME, just bytes"
    finally:
        s.close()
    assert mesh.b.stat("metadata_exchange.initial_header_not_found") > before


def test_http_over_mtls_principals(mesh):
    """HTTP between the sidecars over mTLS (ALPN istio-http/1.1: the TCP exchange stays out of the
    way, the headers carry the metadata): SPIFFE principals on both sides, mutual_tls on the server."""
    st, _, body = get(mesh.a_https, "/secure", host="svc-b")
    assert st == 200 and body == b"hello from b"
    labels, v = find(mesh.b, "istio_requests_total", source_principal=SA_A)
    assert [k for k, _ in labels] == HTTP_ORDER and v == 1
    assert dict(labels) == dict(SOURCE_SIDE, **DEST_SIDE, reporter="destination", source_principal=SA_A,
                                destination_principal=SA_B, destination_service="svc-b",
                                destination_service_name="svc-b", destination_service_namespace="default",
                                request_protocol="http", response_code="200", grpc_response_status="",
                                response_flags="-", connection_security_policy="mutual_tls")
    labels, v = find(mesh.a, "istio_requests_total", destination_principal=SA_B)
    assert dict(labels) == dict(SOURCE_SIDE, **DEST_SIDE, reporter="source", source_principal=SA_A,
                                destination_principal=SA_B, destination_service=SVC_B,
                                destination_service_name="svc-b", destination_service_namespace="default",
                                request_protocol="http", response_code="200", grpc_response_status="",
                                response_flags="-", connection_security_policy="unknown")


def test_istio_series_summed_across_workers(tmp_path):
    """--concurrency 2: each worker process records its own istio_* series; the admin's
    Prometheus output sums them under the same labels (tags travel with the worker reports)."""
    http = ThreadingHTTPServer(("127.0.0.1", 0), Backend)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    port = free_port()
    bs = {"node": node("svc-a", "svc-a", "v1", "10.0.0.1"),
          "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
          "static_resources": {
              "listeners": [_hcm_listener("out", port, "OUTBOUND", [MX_OUT, STATS_OUT], [
                  {"name": "vh", "domains": ["*"], "routes": [
                      {"name": "default", "match": {"prefix": "/"}, "route": {"cluster": OUT_CLUSTER}}]}], "out")],
              "clusters": [_static(OUT_CLUSTER, http.server_address[1], metadata=istio_meta(SVC_B, "svc-b"))]}}
    p = Pyproxy(bs, extra_args=["--concurrency", "2"])
    try:
        n = 40
        for i in range(n):
            st, _, _ = get(port, "/w%d" % i)
            assert st == 200
        deadline = time.monotonic() + 10
        total = 0
        while time.monotonic() < deadline:
            rows = series(p, "istio_requests_total")
            total = sum(v for _, v in rows)
            if total == n:
                break
            time.sleep(0.2)
        assert total == n
        assert len(rows) == 1 and dict(rows[0][0])["destination_service"] == SVC_B
        assert [k for k, _ in rows[0][0]] == HTTP_ORDER
    finally:
        p.stop()
        http.shutdown()
        http.server_close()


def test_istio_chain_leaves_no_cyclic_garbage(monkeypatch, capsys):
    """The Istio chain (peer_metadata, fault, cors, istio.stats) frees every per-request object by
    reference counting, as tests/test_no_cycles.py checks for the plain chain."""
    kinds = cyclic_garbage(monkeypatch, "micro_istio", ["-n", "300"])
    assert sum(kinds.values()) < 50, kinds.most_common(10)
