"""The HCM's chain plan (ChainPlan in pyproxy/filters/network/http_connection_manager.py) against
the plain filter-by-filter chain.

Istio's outbound sidecar chain (grpc_stats with ``emit_filter_state``, an empty ``fault``, ``cors``
without a filter-level policy, router, with istiod's HCM settings) runs in two pyproxy processes on
the same bootstrap: the default, where a request whose route and content type leave grpc_stats,
fault and cors inert skips them and the stream runs the router's first attempt itself (relaying
the response head as bytes for a bodiless HTTP/1.1 request), and ``PYPROXY_REFERENCE=1``, where
every request runs the chain filter by filter. The same raw requests go to both and are compared byte
for byte (after masking request ids, dates and service times): what the client receives, what
the upstream receives, and the stats deltas (``http.<prefix>.*``, ``cluster.b.*`` including
grpc_stats' ``cluster.b.grpc.*``, ``http.<prefix>.fault.*`` and ``http.<prefix>.cors.*``).

The route table makes filters live on some routes: a CORS policy on one route and on one
virtual host, a fault (abort) configured per route, a weighted cluster carrying a fault config;
gRPC requests make grpc_stats live.
"""

from __future__ import annotations

import os
import re
import sys
import time

import pytest

from proxy_util import (HttpBackend, Pyproxy, bootstrap, cluster, http_listener, one_response,
                        simple_response)
from test_express import _MASK, _upstream_head

T = "type.googleapis.com/"
HF = T + "envoy.extensions.filters.http."
LANES = {"planned": {}, "reference": {"PYPROXY_REFERENCE": "1"}}

CORS_POLICY = {"@type": HF + "cors.v3.CorsPolicy",
               "allow_origin_string_match": [{"exact": "https://a.example"}],
               "allow_methods": "GET,POST", "allow_headers": "x-h", "max_age": "60",
               "expose_headers": "x-up", "allow_credentials": True}
FAULT_ABORT = {"@type": HF + "fault.v3.HTTPFault",
               "abort": {"http_status": 418, "percentage": {"numerator": 100}}}


def istio_chain():
    """The outbound chain istiod renders (sidecar-listeners-configdump.json), less istio.*."""
    return [
        {"name": "envoy.filters.http.grpc_stats", "typed_config": {
            "@type": HF + "grpc_stats.v3.FilterConfig", "emit_filter_state": True,
            "stats_for_all_methods": False}},
        {"name": "envoy.filters.http.fault", "typed_config": {"@type": HF + "fault.v3.HTTPFault"}},
        {"name": "envoy.filters.http.cors", "typed_config": {"@type": HF + "cors.v3.Cors"}},
        {"name": "envoy.filters.http.router", "typed_config": {"@type": HF + "router.v3.Router"}},
    ]


def route_table():
    return {"name": "rc", "virtual_hosts": [
        {"name": "corsvh", "domains": ["cors.local"],
         "typed_per_filter_config": {"envoy.filters.http.cors": CORS_POLICY},
         "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "b", "timeout": "0s"}}]},
        {"name": "svc", "domains": ["*"], "routes": [
            {"match": {"prefix": "/cors"}, "route": {"cluster": "b", "timeout": "0s"},
             "typed_per_filter_config": {"envoy.filters.http.cors": CORS_POLICY}},
            {"match": {"prefix": "/fault"}, "route": {"cluster": "b", "timeout": "0s"},
             "typed_per_filter_config": {"envoy.filters.http.fault": FAULT_ABORT}},
            {"match": {"prefix": "/wfault"}, "route": {"weighted_clusters": {"clusters": [
                {"name": "b", "weight": 1,
                 "typed_per_filter_config": {"envoy.filters.http.fault": FAULT_ABORT}}]}}},
            {"match": {"prefix": "/slow"}, "route": {"cluster": "b", "timeout": "0.3s"}},
            # istiod's default retry policy: the first attempt runs without retry state; a 503
            # hands the request to the router filter's retry logic
            {"match": {"prefix": "/retry"}, "route": {"cluster": "b", "timeout": "0s", "retry_policy": {
                "retry_on": "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes",
                "num_retries": 2, "host_selection_retry_max_attempts": "5", "retriable_status_codes": [503],
                "retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts", "typed_config": {
                    "@type": T + "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"}}]}}},
            {"match": {"prefix": "/"}, "route": {"cluster": "b", "timeout": "0s"},
             "decorator": {"operation": "b.default.svc.cluster.local:80/*"}},
        ]},
    ]}


def _handler(req, sock):
    path = req.path.split("?")[0]
    if path == "/retry/503":
        return simple_response(503, b"busy", [("X-Up", "1")], reason="Service Unavailable")
    if path == "/slow":
        time.sleep(0.8)  # past the route's 0.3 s timeout: 504 UT from every lane
    if path.startswith("/pkg.Svc/"):
        # a trailers-only gRPC answer (grpc-status in the response head) ...
        if path.endswith("Fail"):
            return simple_response(200, b"", [("Content-Type", "application/grpc"), ("Grpc-Status", "14")])
        # ... and one with a message and the status in the trailers
        return (b"HTTP/1.1 200 OK\r\nContent-Type: application/grpc\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"7\r\n\x00\x00\x00\x00\x02hi\r\n0\r\nGrpc-Status: 0\r\n\r\n")
    return simple_response(200, b"ok", [("X-Up", "1"), ("Content-Type", "text/plain")])


@pytest.fixture(scope="module")
def lanes():
    be = HttpBackend(_handler)
    procs = {}
    try:
        for name, env in LANES.items():
            lst = http_listener(0, route_table(), stat_prefix="outbound_0.0.0.0_80",
                                http_filters=istio_chain(), normalize_path=True,
                                upgrade_configs=[{"upgrade_type": "websocket"}], stream_idle_timeout="0s",
                                request_id_extension={"typed_config": {
                                    "@type": T + "envoy.extensions.request_id.uuid.v3.UuidRequestIdConfig",
                                    "use_request_id_for_trace_sampling": True}})
            from proxy_util import free_port
            lst["address"]["socket_address"]["port_value"] = free_port()
            # (the gRPC answer's trailers come from an HTTP/1.1 upstream: kept, as Envoy keeps them, only with
            # the cluster's enable_trailers)
            bs = bootstrap([lst], [cluster("b", [be.port], typed_extension_protocol_options={
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": T + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http_protocol_options": {"enable_trailers": True}}}})])
            procs[name] = Pyproxy(bs, env=dict(os.environ, **env))
        yield procs, be
    finally:
        for px in procs.values():
            px.stop()
        be.close()


GRPC_BODY = b"\x00\x00\x00\x00\x03abc"

# (method, path, host, headers, body)
REQUESTS = [
    ("GET", "/plain", "svc.local", [], b""),
    ("GET", "/plain", "svc.local", [("Origin", "https://a.example")], b""),
    ("OPTIONS", "/plain", "svc.local", [("Origin", "https://a.example"), ("Access-Control-Request-Method", "GET")], b""),
    ("POST", "/plain", "svc.local", [("Content-Type", "text/plain")], b"body"),
    # a CORS policy on the route: preflight answered, simple request decorated, bad origin counted
    ("OPTIONS", "/cors", "svc.local", [("Origin", "https://a.example"), ("Access-Control-Request-Method", "POST")], b""),
    ("GET", "/cors", "svc.local", [("Origin", "https://a.example")], b""),
    ("GET", "/cors", "svc.local", [("Origin", "https://evil.example")], b""),
    ("GET", "/cors", "svc.local", [], b""),
    # ... and on a virtual host
    ("OPTIONS", "/x", "cors.local", [("Origin", "https://a.example"), ("Access-Control-Request-Method", "GET")], b""),
    ("GET", "/x", "cors.local", [("Origin", "https://a.example")], b""),
    # a fault configured per route, and on a weighted cluster (filters do not read the latter)
    ("GET", "/fault", "svc.local", [], b""),
    ("GET", "/wfault", "svc.local", [], b""),
    # gRPC: grpc_stats counts the call (a bodiless one too, which could skip the filters)
    ("POST", "/pkg.Svc/Call", "svc.local", [("Content-Type", "application/grpc"), ("TE", "trailers")], GRPC_BODY),
    ("POST", "/pkg.Svc/Fail", "svc.local", [("Content-Type", "application/grpc+proto")], GRPC_BODY),
    ("GET", "/pkg.Svc/Call", "svc.local", [("Content-Type", "application/grpc")], b""),
    # the route timeout, with and without a request body (a body runs the filter chain)
    ("GET", "/slow", "svc.local", [], b""),
    ("POST", "/slow", "svc.local", [("Content-Type", "text/plain")], b"body"),
    ("GET", "/retry", "svc.local", [], b""),
    ("GET", "/retry/503", "svc.local", [("Origin", "https://a.example")], b""),
    # what the HCM settings do before any filter
    ("GET", "/a/../b/./c", "svc.local", [], b""),
    ("GET", "/ws", "svc.local", [("Connection", "upgrade"), ("Upgrade", "websocket")], b""),
    ("GET", "/plain", "svc.local", [("X-Request-Id", "client-id"), ("X-Envoy-Fault-Abort-Request", "500")], b""),
]


_UUID = re.compile(rb"(?i)[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _mask(b: bytes) -> bytes:
    b = _UUID.sub(b"<uuid>", b)
    for rx, sub in _MASK:
        b = rx.sub(sub, b)
    return b


def _send(port, method, path, host, headers, body):
    hs = list(headers)
    if body or method == "POST":
        hs.append(("Content-Length", str(len(body))))
    req = ("%s %s HTTP/1.1\r\nHost: %s\r\n%s\r\n" % (
        method, path, host, "".join("%s: %s\r\n" % kv for kv in hs))).encode() + body
    return one_response(port, req, method)


def _stats(px) -> dict:
    return {k: v for k, v in px.stats().items()
            if k.startswith("http.outbound_0.0.0.0_80.") or k.startswith("cluster.b.")}


@pytest.mark.parametrize("method,path,host,headers,body", REQUESTS,
                         ids=["%s %s %d" % (m, p, i) for i, (m, p, _h, _x, _b) in enumerate(REQUESTS)])
def test_same_bytes_and_stats_as_the_reference_chain(lanes, method, path, host, headers, body):
    procs, be = lanes
    seen = {}
    for name, px in procs.items():
        before_stats = _stats(px)
        with be.lock:
            before = len(be.raw)
        out, closed = _send(px.port, method, path, host, headers, body)
        up = _upstream_head(be, before) if not out.startswith((b"HTTP/1.1 418", b"HTTP/1.1 403")) \
            and not (method == "OPTIONS" and b"access-control-allow-origin" in out.lower()) else b""
        deadline = time.monotonic() + 2
        while True:  # (the stats of a finished stream are in once the access to it is over)
            after = _stats(px)
            delta = {k: v - before_stats.get(k, 0) for k, v in after.items() if v != before_stats.get(k, 0)}
            if delta.get("http.outbound_0.0.0.0_80.downstream_rq_active", 0) == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        # gauges and times that differ by nature
        delta = {k: v for k, v in delta.items() if "_active" not in k and not k.endswith("_ms")
                 and "upstream_cx" not in k}
        # bytes sent: counted against what the client got (a masked value such as
        # x-envoy-upstream-service-time may take another number of digits in each lane)
        tx = "http.outbound_0.0.0.0_80.downstream_cx_tx_bytes_total"
        if tx in delta:
            delta[tx] -= len(out)
        seen[name] = (_mask(out), closed, _mask(up), delta)
    a = seen["planned"]
    for lane in ("reference",):
        b = seen[lane]
        assert a[0] == b[0], "client bytes (%s):\n%r\n%r" % (lane, a[0], b[0])
        assert a[1] == b[1], "connection close (%s): %r %r" % (lane, a[1], b[1])
        assert a[2] == b[2], "upstream bytes (%s):\n%r\n%r" % (lane, a[2], b[2])
        assert a[3] == b[3], "stats deltas (%s):\n%r\n%r" % (lane, a[3], b[3])
    # the cases the plan must leave live really are live (a broken plan fails here, not only above)
    if path == "/slow":
        assert a[0].startswith(b"HTTP/1.1 504 ") and a[3].get("cluster.b.upstream_rq_timeout") == 1, a
    if path == "/fault":
        assert a[0].startswith(b"HTTP/1.1 418 "), a[0]
        assert a[3].get("http.outbound_0.0.0.0_80.fault.aborts_injected") == 1, a[3]
    if path == "/cors" and method == "OPTIONS" or host == "cors.local" and method == "OPTIONS":
        assert a[0].startswith(b"HTTP/1.1 200 ") and b"access-control-allow-origin: https://a.example" in a[0]
    if path == "/cors" and headers and "evil" in headers[0][1]:
        assert a[3].get("http.outbound_0.0.0.0_80.cors.origin_invalid") == 1, a[3]
    if path == "/pkg.Svc/Call" and method == "POST":
        assert a[3].get("cluster.b.grpc.success") == 1 and a[3].get("cluster.b.grpc.0") == 1, a[3]
        assert a[3].get("cluster.b.grpc.request_message_count") == 1, a[3]
    if path == "/pkg.Svc/Fail":
        assert a[3].get("cluster.b.grpc.failure") == 1 and a[3].get("cluster.b.grpc.14") == 1, a[3]
    if path == "/plain" and host == "svc.local" and method == "OPTIONS":
        assert b"access-control" not in a[0].lower()  # no policy on that route: forwarded untouched


def _stack(bs=None):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import micro_h1
    loop, lm, al, cl, host, pool = micro_h1.build_stack(bs or micro_h1.istio_outbound_bootstrap())
    up, ut, down, dt = micro_h1.connect(loop, lm, al, cl, host, pool)
    return micro_h1, loop, down, up, dt, ut


def test_the_istio_chain_plan_skips_inert_filters():
    """In process (micro_h1 --istio): with grpc_stats, an empty fault and a policy-less cors in front
    of the router, a plain GET runs no filter object (the stream runs the first attempt and relays
    the head as bytes), a body request and a gRPC request run all four filters."""
    micro_h1, loop, down, up, dt, ut = _stack()
    try:
        hc = down.filters[0]
        plan = hc.cfg.plan
        assert plan.plannable and plan.live_on_grpc
        assert plan.live_on_route == {"envoy.filters.http.fault", "envoy.fault", "envoy.filters.http.cors", "envoy.cors"}
        down.data_received(micro_h1.REQUEST)
        s = hc.codec.stream
        assert s.filters is None and s.router is s and s.raw_head
        up.data_received(micro_h1.RESPONSE)
        assert b"".join(dt.out).endswith(micro_h1.BODY)
        down.data_received(b"POST /r18/x HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi")
        s = hc.codec.stream
        assert not s.raw_head and len(s.filters) == 4  # (a body: the router filter, whole chain)
        up.data_received(micro_h1.RESPONSE)
        down.data_received(b"GET /r18/x HTTP/1.1\r\nHost: a\r\nContent-Type: application/grpc\r\n\r\n")
        s = hc.codec.stream
        assert not s.raw_head and s.filters and len(s.filters) == 4
        assert s.filters[0].active  # grpc_stats saw it
    finally:
        loop.close()


def test_a_live_filter_level_fault_keeps_the_generic_chain():
    """A fault configured on the filter itself (not per route) is live for every request: the plan
    is not plannable and every request runs the chain filter by filter."""
    import json

    import yaml
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import micro_h1
    doc = yaml.safe_load(micro_h1.istio_outbound_bootstrap())
    hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"][1]["typed_config"] = {"@type": HF + "fault.v3.HTTPFault",
                                              "delay": {"fixed_delay": "0.001s", "percentage": {"numerator": 0}}}
    _, loop, down, up, dt, ut = _stack(json.dumps(doc))
    try:
        hc = down.filters[0]
        assert not hc.cfg.plan.plannable and not hc.cfg.fast_router
        down.data_received(micro_h1.REQUEST)
        s = hc.codec.stream
        assert not getattr(s, "raw_head", False) and s.router is not s and len(s.filters) == 4
    finally:
        loop.close()


def test_route_response_mutations_compile_to_bytes():
    """The route plan compiles literal response header mutations (route, virtual host, route table)
    for the byte relay, in the order the Headers path applies them; a formatted value or an action
    that depends on the response keeps the route on the Headers path."""
    from envoy.config.route.v3 import route_pb2
    from google.protobuf import json_format

    from pyproxy.routing import compile_route_config

    def route(rc_extra=None, vh_extra=None, **r):
        rc = {"name": "rc", "virtual_hosts": [dict({"name": "v", "domains": ["*"], "routes": [
            dict({"match": {"prefix": "/"}, "route": {"cluster": "b"}}, **r)]}, **(vh_extra or {}))]}
        rc.update(rc_extra or {})
        t = compile_route_config(json_format.ParseDict(rc, route_pb2.RouteConfiguration()))
        return t.virtual_hosts[0].routes[0]

    e = route()
    assert e.resp_raw is None and e.inline is True and e.timeout_ms == "15000"  # (the default, 15 s)
    e = route(response_headers_to_add=[{"header": {"key": "x-a", "value": "1"}},
                                       {"header": {"key": "x-o", "value": "2"},
                                        "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}],
              response_headers_to_remove=["x-r"],
              vh_extra={"response_headers_to_add": [{"header": {"key": "x-a", "value": "vh"},
                                                      "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}]},
              rc_extra={"response_headers_to_add": [{"header": {"key": "x-t", "value": "t"}}]})
    drop, lines, names = e.resp_raw
    # route: x-r removed, x-o overwritten, x-a appended; virtual host: x-a overwritten (the route's
    # x-a goes too); route table: x-t appended
    assert drop == {b"x-r", b"x-o", b"x-a"} and names == drop | {b"x-t"}
    assert lines == b"x-o: 2\r\nx-a: vh\r\nx-t: t\r\n"
    assert e.inline is True
    for bad in ({"response_headers_to_add": [{"header": {"key": "x-f", "value": "%PROTOCOL%"}}]},
                {"response_headers_to_add": [{"header": {"key": "x-f", "value": "1"},
                                              "append_action": "ADD_IF_ABSENT"}]},
                {"response_headers_to_add": [{"header": {"key": "server", "value": "1"}}]},
                {"response_headers_to_remove": ["content-length"]}):
        e = route(**bad)
        assert e.resp_raw is None and e.inline is False, bad


H2_REQUESTS = [r for r in REQUESTS if not any(k.lower() in ("connection", "upgrade") for k, _ in r[3])]
_H2_MASKED = {"date": "<date>", "x-envoy-upstream-service-time": "<n>"}


def _h2_one(port, method, path, host, headers, body):
    """One request on a fresh h2c connection: the response's (ordered headers, body, trailers, reset)."""
    import h2.events as E

    from grpc_util import H2Raw
    c = H2Raw(port)
    try:
        sid = c.h2.get_next_available_stream_id()
        h = [(":method", method), (":path", path), (":scheme", "http"), (":authority", host)]
        h += [(k.lower(), v) for k, v in headers]
        c.h2.send_headers(sid, h, end_stream=not body)
        if body:
            c.h2.send_data(sid, body, end_stream=True)
        c.flush()
        _, data, trailers, reset = c.response(sid)
        head = [next(list(e.headers) for e in c.events if isinstance(e, E.ResponseReceived) and e.stream_id == sid)
                if any(isinstance(e, E.ResponseReceived) and e.stream_id == sid for e in c.events) else None][0]
        head = [(k, _H2_MASKED.get(k, v)) for k, v in head] if head is not None else None
        return head, data, trailers, reset
    finally:
        c.close()


@pytest.mark.parametrize("method,path,host,headers,body", H2_REQUESTS,
                         ids=["h2 %s %s %d" % (m, p, i) for i, (m, p, _h, _x, _b) in enumerate(H2_REQUESTS)])
def test_http2_same_response_and_stats_as_the_reference_chain(lanes, method, path, host, headers, body):
    """The same over h2c (the plan skips inert filters on HTTP/2 requests too)."""
    procs, be = lanes
    seen = {}
    for name in ("planned", "reference"):
        px = procs[name]
        before_stats = _stats(px)
        with be.lock:
            before = len(be.raw)
        out = _h2_one(px.port, method, path, host, headers, body)
        up = _upstream_head(be, before) if out[0] and dict(out[0]).get(":status") not in ("418",) \
            and not (method == "OPTIONS" and any(k == "access-control-allow-origin" for k, _ in out[0])) else b""
        deadline = time.monotonic() + 2
        while True:
            after = _stats(px)
            delta = {k: v - before_stats.get(k, 0) for k, v in after.items() if v != before_stats.get(k, 0)}
            if delta.get("http.outbound_0.0.0.0_80.downstream_rq_active", 0) == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        delta = {k: v for k, v in delta.items() if "_active" not in k and not k.endswith("_ms")
                 and "upstream_cx" not in k and "downstream_cx" not in k}
        seen[name] = (out, _mask(up), delta)
    a, b = seen["planned"], seen["reference"]
    assert a[0] == b[0], "client view:\n%r\n%r" % (a[0], b[0])
    assert a[1] == b[1], "upstream bytes:\n%r\n%r" % (a[1], b[1])
    assert a[2] == b[2], "stats deltas:\n%r\n%r" % (a[2], b[2])
    assert a[0][0] is not None and a[2].get("http.outbound_0.0.0.0_80.downstream_rq_http2_total") == 1, a
    if path == "/pkg.Svc/Call" and method == "POST":
        assert a[2].get("cluster.b.grpc.success") == 1, a[2]
    if path == "/fault":
        assert dict(a[0][0])[":status"] == "418", a[0]


def test_route_filter_names_compile_with_the_route():
    """What the plan reads per request is compiled with each route (so an RDS table, compiled when
    it arrives, needs no re-planning): the names of the per-filter configs of the route, its
    virtual host, its route configuration and its weighted clusters."""
    from envoy.config.route.v3 import route_pb2
    from google.protobuf import json_format

    from pyproxy.filters.http import cors, fault  # noqa: F401 (register the config types)
    from pyproxy.routing import compile_route_config
    rc = {"name": "rc", "typed_per_filter_config": {"envoy.filters.http.fault": FAULT_ABORT},
          "virtual_hosts": [
              {"name": "a", "domains": ["a"], "typed_per_filter_config": {"envoy.filters.http.cors": CORS_POLICY},
               "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "b"}}]},
              {"name": "b", "domains": ["*"], "routes": [
                  {"match": {"prefix": "/w"}, "route": {"weighted_clusters": {"clusters": [
                      {"name": "b", "weight": 1, "typed_per_filter_config": {"envoy.cors": CORS_POLICY}}]}}},
                  {"match": {"prefix": "/"}, "route": {"cluster": "b"}}]}]}
    table = compile_route_config(json_format.ParseDict(rc, route_pb2.RouteConfiguration()))
    (ra,), (rw, rb) = [vh.routes for vh in table.virtual_hosts]
    assert ra.filter_names == {"envoy.filters.http.fault", "envoy.filters.http.cors"}
    assert rw.filter_names == {"envoy.filters.http.fault", "envoy.cors"}
    assert rb.filter_names == {"envoy.filters.http.fault"}
    rc.pop("typed_per_filter_config")
    table = compile_route_config(json_format.ParseDict(rc, route_pb2.RouteConfiguration()))
    assert table.virtual_hosts[1].routes[1].filter_names == frozenset()
