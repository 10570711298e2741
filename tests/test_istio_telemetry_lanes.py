"""Istio telemetry on the compiled path against the filter-by-filter reference mode.

``peer_metadata`` (``istio.metadata_exchange``), ``istio.alpn`` and ``istio.stats`` declare
``compiled_hooks`` (ChainPlan, filters/network/http_connection_manager.py): on the default path a
request through Istio's sidecar chain runs the router's first attempt in the stream (relaying the
response head as bytes for a bodiless HTTP/1.1 request), which does the filters' work through the
hooks; with
``PYPROXY_REFERENCE=1`` the filters run one by one. Two pyproxy processes (tests/diff_util.py
``ModePair``) run one bootstrap with an outbound and an inbound sidecar listener; each case runs in
both, and what the client receives, what the upstream receives, the counter deltas and every
``istio_*`` series (label by label: counters' values, histograms' counts, and the byte
histograms' sums) must be the same.

The upstream answers some requests as another sidecar would, with ``x-envoy-peer-metadata``
headers: the outbound side must strip them and take the peer's labels from them; the inbound side
gets them from the client, strips them from the request and echoes its own in the response.
"""

from __future__ import annotations

import base64
import re

import pytest

from diff_util import H2, ModePair, assert_same, h1_script, h2_script, http1, request_headers
from proxy_util import bootstrap, cluster, free_port, http_listener, request, simple_response

T = "type.googleapis.com/"
HF = T + "envoy.extensions.filters.http."
NODE = {"id": "sidecar~10.0.0.1~svc-a-abc.default~default.svc.cluster.local", "cluster": "svc-a.default",
        "metadata": {"NAME": "svc-a-abc", "NAMESPACE": "default", "CLUSTER_ID": "Kubernetes",
                     "WORKLOAD_NAME": "svc-a", "ISTIO_VERSION": "1.32.0",
                     "OWNER": "kubernetes://apis/apps/v1/namespaces/default/deployments/svc-a",
                     "LABELS": {"app": "svc-a", "version": "v1", "service.istio.io/canonical-name": "svc-a",
                                "service.istio.io/canonical-revision": "v1"}}}
PEER_ID = "sidecar~10.0.0.2~svc-b-xyz.default~default.svc.cluster.local"


def peer_value() -> str:
    """``x-envoy-peer-metadata`` of a workload svc-b v2 in namespace default (a Struct, base64)."""
    from google.protobuf import struct_pb2
    s = struct_pb2.Struct()
    s.update({"NAME": "svc-b-xyz", "NAMESPACE": "default", "WORKLOAD_NAME": "svc-b", "CLUSTER_ID": "Kubernetes",
              "LABELS": {"app": "svc-b", "version": "v2", "service.istio.io/canonical-name": "svc-b",
                         "service.istio.io/canonical-revision": "v2"}})
    return base64.b64encode(s.SerializeToString(deterministic=True)).decode()


PEER = peer_value()
MX_OUT = {"name": "istio.metadata_exchange", "typed_config": {
    "@type": T + "io.istio.http.peer_metadata.Config",
    "upstream_discovery": [{"istio_headers": {}}, {"workload_discovery": {}}],
    "upstream_propagation": [{"istio_headers": {}}]}}
MX_IN = {"name": "istio.metadata_exchange", "typed_config": {
    "@type": T + "io.istio.http.peer_metadata.Config",
    "downstream_discovery": [{"istio_headers": {}}, {"workload_discovery": {}}],
    "downstream_propagation": [{"istio_headers": {}}]}}
ALPN = {"name": "istio.alpn", "typed_config": {
    "@type": T + "istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig",
    "alpn_override": [{"alpn_override": ["istio-http/1.0", "istio", "http/1.0"]},
                      {"upstream_protocol": "HTTP11", "alpn_override": ["istio-http/1.1", "istio", "http/1.1"]},
                      {"upstream_protocol": "HTTP2", "alpn_override": ["istio-h2", "istio", "h2"]}]}}
FAULT = {"name": "envoy.filters.http.fault", "typed_config": {"@type": HF + "fault.v3.HTTPFault"}}
CORS = {"name": "envoy.filters.http.cors", "typed_config": {"@type": HF + "cors.v3.Cors"}}
ROUTER = {"name": "envoy.filters.http.router", "typed_config": {"@type": HF + "router.v3.Router"}}


def stats(**value):
    return {"name": "istio.stats", "typed_config": {
        "@type": T + "udpa.type.v1.TypedStruct", "type_url": T + "stats.PluginConfig", "value": value}}


def routes(name):
    return {"name": name, "virtual_hosts": [{"name": "svc", "domains": ["*"], "routes": [
        {"match": {"prefix": "/dead"}, "route": {"cluster": "dead", "timeout": "0s"}},
        {"match": {"prefix": "/nomx"}, "route": {"cluster": "nomx", "timeout": "0s"}},
        {"match": {"prefix": "/add"}, "route": {"cluster": "b", "timeout": "0s"},
         "request_headers_to_add": [{"header": {"key": "x-route", "value": "r"}}]},
        {"match": {"prefix": "/"}, "route": {"cluster": "b", "timeout": "5s"}},
    ]}]}


def make_bootstrap(h1_port, h2_port):
    out = http_listener(free_port(), routes("out"), name="outbound", stat_prefix="outbound_0.0.0.0_80",
                        http_filters=[MX_OUT, ALPN, FAULT, CORS, stats(), ROUTER],
                        request_id_extension={"typed_config": {
                            "@type": T + "envoy.extensions.request_id.uuid.v3.UuidRequestIdConfig",
                            "use_request_id_for_trace_sampling": True}})
    out["traffic_direction"] = "OUTBOUND"
    inb = http_listener(free_port(), routes("in"), name="inbound", stat_prefix="inbound_0.0.0.0_8080",
                        http_filters=[MX_IN, FAULT, CORS, stats(disable_host_header_fallback=True), ROUTER])
    inb["traffic_direction"] = "INBOUND"
    b = cluster("b", [h1_port])
    b["metadata"] = {"filter_metadata": {"istio": {"services": [
        {"host": "svc-b.default.svc.cluster.local", "name": "svc-b", "namespace": "default"}]}}}
    nomx = cluster("nomx", [h1_port])
    nomx["metadata"] = {"filter_metadata": {"istio": {"disable_mx": True}}}
    bs = bootstrap([out, inb], [b, nomx, cluster("dead", [free_port()])])
    bs["node"] = NODE
    return bs


def h1_upstream(req, sock, n):
    if "/peer" in req.path:  # another sidecar's answer, with its metadata
        return simple_response(200, b"from b", [("X-Envoy-Peer-Metadata-Id", PEER_ID),
                                                 ("X-Envoy-Peer-Metadata", PEER), ("X-Up", "1")])
    if req.path.startswith("/bad-peer"):
        return simple_response(200, b"from b", [("X-Envoy-Peer-Metadata-Id", PEER_ID),
                                                 ("X-Envoy-Peer-Metadata", "%%%not base64")])
    if req.path.startswith("/busy"):
        return simple_response(503, b"busy", [("X-Up", "1")], reason="Service Unavailable")
    if req.path.startswith("/chunked"):
        return (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Envoy-Peer-Metadata-Id: " +
                PEER_ID.encode() + b"\r\nX-Envoy-Peer-Metadata: " + PEER.encode() +
                b"\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    return simple_response(200, b"ok", [("X-Up", "1"), ("Content-Type", "text/plain")])


def h2_upstream(h, n):
    return [("headers", [(":status", "200")], False), ("data", b"h2", True)]


_SERIES = re.compile(r"^(istio_[a-z_]+?)(_bucket|_sum|_count)?(\{[^}]*\})? (\S+)$")


def istio_series(pair, mode):
    """{(name, labels): value} of every istio_* series (durations: counts only)."""
    px = pair.sides[mode]["px"]
    _, _, body = request(px.admin_port, "GET", "/stats/prometheus", timeout=5)
    out = {}
    for line in body.decode().splitlines():
        m = _SERIES.match(line)
        if not m:
            continue
        name, part, labels, value = m.groups()
        if name == "istio_request_duration_milliseconds" and part != "_count":
            continue
        if part == "_bucket":
            continue
        out[(name + (part or ""), labels or "")] = value
    return out


@pytest.fixture(scope="module")
def pair():
    p = ModePair(make_bootstrap, h1_upstream, h2_upstream)
    try:
        yield p
    finally:
        p.close()


H1_OUT = {
    "plain": [http1("GET", "/ok", host="svc-b.default:80")],
    "peer-answer": [http1("GET", "/peer", host="svc-b.default:80")],
    "peer-answer-chunked": [http1("GET", "/chunked", host="svc-b.default:80")],
    "peer-answer-malformed": [http1("GET", "/bad-peer", host="svc-b.default:80")],
    "route-header-add": [http1("GET", "/add/peer", host="svc-b.default:80")],
    "disable-mx-cluster": [http1("GET", "/nomx/peer", host="svc-b.default:80")],
    # (a cluster without istio.services: destination_service is the Host header; no peer answers)
    "host-header-service": [http1("GET", "/nomx/ok", host="svc-c.default:80")],
    "503-from-upstream": [http1("GET", "/busy", host="svc-b.default:80")],
    "503-uf": [http1("GET", "/dead", host="svc-b.default:80")],
    "client-sent-exchange-headers": [http1("GET", "/peer", [("X-Envoy-Peer-Metadata", "abc"),
                                                             ("X-Envoy-Peer-Metadata-Id", "me")],
                                           host="svc-b.default:80")],
    "post-with-body": [http1("POST", "/peer", [("Content-Type", "text/plain")], b"hello", host="svc-b.default")],
    "two-on-one-connection": [http1("GET", "/peer", host="svc-b.default") + http1("GET", "/ok", host="svc-b.default")],
}
H1_IN = {
    "from-a-sidecar": [http1("GET", "/ok", [("X-Envoy-Peer-Metadata-Id", PEER_ID),
                                            ("X-Envoy-Peer-Metadata", PEER)], host="svc-a.default")],
    "id-only": [http1("GET", "/ok", [("X-Envoy-Peer-Metadata-Id", PEER_ID)], host="svc-a.default")],
    "no-exchange": [http1("GET", "/ok", host="svc-a.default")],
    "malformed": [http1("GET", "/ok", [("X-Envoy-Peer-Metadata-Id", PEER_ID),
                                       ("X-Envoy-Peer-Metadata", "!!")], host="svc-a.default")],
    "upstream-echoes": [http1("GET", "/peer", [("X-Envoy-Peer-Metadata-Id", PEER_ID),
                                               ("X-Envoy-Peer-Metadata", PEER)], host="svc-a.default")],
}


def _check(pair, client, listener):
    before = {m: istio_series(pair, m) for m in ("compiled", "reference")}
    seen = pair.run(client, listener=listener)
    assert_same(seen)
    after = {m: istio_series(pair, m) for m in ("compiled", "reference")}
    delta = {m: {k: v for k, v in after[m].items() if before[m].get(k) != v} for m in after}
    a, b = delta["compiled"], delta["reference"]
    diff = sorted((k[0], k[1], a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k) and not (
        # (x-envoy-upstream-service-time's value, in the response head, varies in length by nature)
        k[0] == "istio_response_bytes_sum" and a.get(k) and b.get(k) and abs(float(a[k]) - float(b[k])) <= 4))
    assert not diff, "istio_* series differ (name, labels, compiled, reference):\n%s" % "\n".join(map(repr, diff))
    return seen, delta["compiled"]


@pytest.mark.parametrize("case", sorted(H1_OUT))
def test_outbound_h1(pair, case):
    n = case.count("two-on") + 1
    methods = ("POST",) if case.startswith("post") else ("GET",)
    seen, delta = _check(pair, lambda port: h1_script(port, H1_OUT[case], methods=methods, n=n), 0)
    assert any(k[0] == "istio_requests_total" for k in delta), delta
    view = seen["compiled"][0][0]
    assert b"x-envoy-peer-metadata" not in view.lower()
    if case in ("peer-answer", "peer-answer-chunked", "route-header-add"):
        labels = [k[1] for k in delta if k[0] == "istio_requests_total"][0]
        assert 'destination_workload="svc-b"' in labels and 'destination_version="v2"' in labels
        assert 'destination_canonical_revision="v2"' in labels
    up = seen["compiled"][1]
    if case == "host-header-service":
        labels = [k[1] for k in delta if k[0] == "istio_requests_total"][0]
        assert 'destination_service="svc-c.default:80"' in labels and 'destination_workload="unknown"' in labels
    if case in ("disable-mx-cluster", "host-header-service"):
        assert b"x-envoy-peer-metadata" not in up.lower()
    elif case not in ("503-uf",):
        assert b"x-envoy-peer-metadata-id: " + NODE["id"].encode() in up


@pytest.mark.parametrize("case", sorted(H1_IN))
def test_inbound_h1(pair, case):
    seen, delta = _check(pair, lambda port: h1_script(port, H1_IN[case]), 1)
    labels = [k[1] for k in delta if k[0] == "istio_requests_total"]
    assert len(labels) == 1 and 'reporter="destination"' in labels[0]
    assert b"x-envoy-peer-metadata" not in seen["compiled"][1].lower()  # stripped on the way in
    view = seen["compiled"][0][0]
    if case in ("from-a-sidecar", "upstream-echoes"):
        assert 'source_workload="svc-b"' in labels[0]
        assert b"x-envoy-peer-metadata-id: " + NODE["id"].encode() in view
    elif case == "no-exchange":
        assert b"x-envoy-peer-metadata" not in view.lower()


def test_outbound_h2(pair):
    steps = [H2.headers(1, request_headers("GET", "/peer", "svc-b.default")), H2.wait(1),
             H2.headers(3, request_headers("GET", "/ok", "svc-b.default")), H2.wait(3)]
    seen, delta = _check(pair, lambda port: h2_script(port, steps), 0)
    assert len([k for k in delta if k[0] == "istio_requests_total"]) == 2
