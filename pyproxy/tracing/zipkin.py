"""``envoy.tracers.zipkin`` (``config.trace.v3.ZipkinConfig``), the tracer Istio configures for
Zipkin-compatible backends: B3 propagation and spans in Zipkin's JSON v2 (``HTTP_JSON``) posted
to ``collector_endpoint`` on ``collector_cluster``.

An HCM whose ``tracing.provider`` is Zipkin gets a tracing filter in front of its HTTP filters
(so its streams take the generic path). Per stream:

- the context comes from the request's B3 headers (``x-b3-traceid``, ``x-b3-spanid``,
  ``x-b3-sampled``, or the single ``b3`` header); a request without one starts a trace (64-bit
  ids, or a 128-bit trace id with ``trace_id_128bit``);
- sampled when the incoming context says so, else as decided in ``x-request-id`` (character 14,
  ``pyproxy/tracing/request_id.py``); an unsampled stream still propagates ``x-b3-sampled: 0``;
- the request goes upstream with ``x-b3-traceid``, ``x-b3-spanid`` (this proxy's span),
  ``x-b3-parentspanid`` (the incoming span, if any) and ``x-b3-sampled``;
- at the end of a sampled stream one span is queued: ``kind`` CLIENT on an OUTBOUND listener,
  SERVER otherwise, named as Envoy names it (the route's decorator operation, on ingress the
  caller's ``x-envoy-decorator-operation``, else the host; on egress a decorator with
  ``propagate`` goes upstream in ``x-envoy-decorator-operation``), Envoy's HTTP tags
  (``http.method``, ``http.url``, ``http.protocol``, ``http.status_code``, ``upstream_cluster``,
  ``response_flags``, ``user_agent``, ``guid:x-request-id``, ``node_id``, ``component``,
  ``downstream_cluster``, ``peer.address``, ``request_size``, ``response_size``, ``error`` for
  5xx), Envoy's ``localEndpoint`` (service, local IPv4, port 0) and closing annotation (``cr``
  or ``ss``); a new trace's root span id is the trace id's low 64 bits, as Envoy's and the HCM's custom tags (literal, environment, request header, and
  metadata of kind request (dynamic metadata), route, cluster or host), then the route's.

Export is off the hot path: spans wait in a bounded queue (1000; a full queue drops and counts
``tracing.zipkin.spans_dropped``) and are posted in batches every second by one task, to a host of
the collector cluster, plain HTTP/1.1, one connection per post; the request is written and the
answer read by the HTTP/1.1 client codec (``http/http1_client.py``). A failed post drops its batch, counts
``tracing.zipkin.reports_failed`` and is logged once; a request is never slowed or failed by it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time

from envoy.config.trace.v3 import zipkin_pb2

from ..config import ConfigError
from ..http.filter import HttpFilter
from ..http.headers import Headers
from ..http.http1_client import Http1ClientCodec
from ..netaddr import local_ip
from .custom_tags import apply_tags as _apply_tags, custom_tags
from .export import BatchExporter

log = logging.getLogger("pyproxy.tracing")

HTTP_JSON = zipkin_pb2.ZipkinConfig.CollectorEndpointVersion.HTTP_JSON


def _hex(bits: int) -> str:
    return "%0*x" % (bits // 4, random.getrandbits(bits) or 1)


class ZipkinTracer(BatchExporter):
    """Config-time state of one HCM's Zipkin provider, and its span reporter."""
    verb = "posted"


    def __init__(self, cfg, ctx, hcm_proto, stat_prefix: str):
        if cfg.collector_endpoint_version != HTTP_JSON:
            raise ConfigError("only collector_endpoint_version HTTP_JSON is supported",
                              field="collector_endpoint_version")
        if not cfg.collector_cluster:
            raise ConfigError("collector_cluster is required", field="collector_cluster")
        self._init_export(ctx, "zipkin", cfg.collector_cluster)
        self.endpoint = cfg.collector_endpoint or "/api/v2/spans"
        self.host_header = cfg.collector_hostname or cfg.collector_cluster
        self.bits = 128 if cfg.trace_id_128bit else 64
        server = getattr(ctx, "server", None)
        node = getattr(server, "node", None)
        self.service = (node.cluster if node is not None and node.cluster else "") or "unknown"
        self.node_id = node.id if node is not None else ""
        listener = getattr(ctx, "listener", None)
        # Envoy: an OUTBOUND listener's HCM traces egress (CLIENT spans), any other ingress (SERVER)
        lp = getattr(listener, "proto", None)
        self.kind = "CLIENT" if lp is not None and lp.traffic_direction == 2 else "SERVER"
        self.custom = custom_tags(hcm_proto)
        # Envoy's localEndpoint: the service, the local address (first non-loopback interface), port 0
        ip = local_ip("v4")
        self.local = {"serviceName": self.service, "ipv4": ip, "port": 0}

    # -- per stream -----------------------------------------------------------------------------
    def create(self, stream):
        return ZipkinFilter(stream, self)

    # -- export (off the hot path; the queue and batching are BatchExporter's) -------------------
    async def _send(self, batch, host) -> bool:
        body = json.dumps(batch, separators=(",", ":")).encode()
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        try:
            tr, post = await asyncio.wait_for(
                loop.create_connection(lambda: _Post(done), host.address, host.port), 5)
            try:
                # (Envoy's collector request: POST, host, content-type, the body's length)
                post.send(Headers([(":method", "POST"), (":scheme", "http"), (":path", self.endpoint),
                                   (":authority", self.host_header), ("content-type", "application/json"),
                                   ("content-length", str(len(body)))]), body)
                return await asyncio.wait_for(done, 5)
            finally:
                tr.close()
        except (OSError, asyncio.TimeoutError, ValueError):
            return False


class _Post(asyncio.Protocol):
    """One post to the collector on its own connection: the HTTP/1.1 client codec writes the
    request and reads the answer (this is the codec's connection and its decoder). ``done`` gets
    True for a 2xx answer (known at its head; the rest is not read), False for anything else."""

    def __init__(self, done):
        self.done = done
        self.transport = None
        self.codec = Http1ClientCodec(self)

    def send(self, headers: Headers, body: bytes) -> None:
        codec = self.codec
        codec.start(self)
        codec.encode_headers(headers, False)
        codec.encode_data(body, True)

    def _end(self, ok: bool) -> None:
        if not self.done.done():
            self.done.set_result(ok)

    # -- the connection --------------------------------------------------------------------------
    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.codec.feed(data)

    def eof_received(self):
        return False

    def connection_lost(self, exc):
        self.codec.on_close("connection closed", exc is not None)
        self._end(False)

    def write(self, data: bytes) -> None:
        self.transport.write(data)

    def write_eof(self) -> None:  # (the codec half-closes only a tunnel)
        pass

    def close(self) -> None:
        self.transport.abort()

    def on_response_complete(self, keep_alive: bool) -> None:
        self._end(False)  # (not reached for a 2xx: decided at its head)

    def on_protocol_error(self, reason: str) -> None:
        self._end(False)

    # -- the decoder -----------------------------------------------------------------------------
    def on_upstream_headers(self, headers: Headers, end_stream: bool) -> None:
        self._end(headers.get(":status", "")[:1] == "2")

    def on_upstream_data(self, data: bytes, end_stream: bool) -> None:
        pass

    def on_upstream_trailers(self, trailers) -> None:
        pass

    def on_upstream_reset(self, reason: str) -> None:
        self._end(False)


class SpanFilter(HttpFilter):
    """A tracer's HTTP filter, first of a traced HCM: the trace context in, the propagated
    headers out, a span when the stream ends (the Zipkin and OpenTelemetry tracers)."""

    __slots__ = ("t", "trace_id", "span_id", "parent", "sampled", "start", "op")

    def __init__(self, callbacks, tracer):
        self.callbacks = callbacks
        self.t = tracer
        self.trace_id = None
        self.sampled = False
        self.op = None


class ZipkinFilter(SpanFilter):
    """B3 context in, B3 headers out, a Zipkin span at the end."""

    __slots__ = ()

    def decode_headers(self, headers, end_stream):
        t = self.t
        tid = sid = sampled = None
        b3 = None
        for k, v in headers._h:
            if k == "x-b3-traceid":
                tid = v
            elif k == "x-b3-spanid":
                sid = v
            elif k == "x-b3-sampled":
                sampled = v
            elif k == "b3":
                b3 = v
        if tid is None and b3:
            parts = b3.split("-")
            if len(parts) >= 2:
                tid, sid = parts[0], parts[1]
                if len(parts) >= 3:
                    sampled = parts[2]
            elif parts and parts[0] in ("0", "1", "d"):
                sampled = parts[0]
        if tid is not None and not _is_hex_id(tid, (16, 32)):
            tid = sid = None
        if sid is not None and not _is_hex_id(sid, (16,)):
            sid = None
        if sampled is not None:
            self.sampled = sampled in ("1", "d", "true")
        else:
            rid = headers.get("x-request-id") or ""
            self.sampled = len(rid) == 36 and rid[14] in "9ab"
        if tid is not None:
            self.trace_id = tid.lower()
            self.parent = sid.lower() if sid is not None else None
            self.span_id = _hex(64)
        else:  # a new trace: the root span's id is the trace id's low 64 bits (as Envoy)
            self.span_id = _hex(64)
            self.trace_id = (_hex(64) + self.span_id) if t.bits == 128 else self.span_id
            self.parent = None
        self.start = time.time()
        h = [kv for kv in headers._h if kv[0] not in _B3]
        h.append(("x-b3-traceid", self.trace_id))
        h.append(("x-b3-spanid", self.span_id))
        if self.parent is not None:
            h.append(("x-b3-parentspanid", self.parent))
        h.append(("x-b3-sampled", "1" if self.sampled else "0"))
        headers._h = h
        self.op = decorate(t, self.callbacks, headers)
        return 0

    def on_destroy(self):
        if not self.sampled or self.trace_id is None:
            return
        t = self.t
        s = self.callbacks
        tags, name, start_us, dur_us, _ = span_facts(t, s, self.start, self.op)
        # (Envoy's JSON v2: the closing annotation, cr for a client span, ss for a server span)
        span = {"traceId": self.trace_id, "id": self.span_id, "name": name, "kind": t.kind,
                "timestamp": start_us, "duration": dur_us, "localEndpoint": t.local,
                "annotations": [{"timestamp": start_us + dur_us, "value": "cr" if t.kind == "CLIENT" else "ss"}],
                "tags": tags}
        if self.parent is not None:
            span["parentId"] = self.parent
        t.report(span)


def span_facts(t, s, start: float, op=None, unnamed=None):
    """(tags, name, start µs, duration µs, error) of a finished stream, as Envoy's HTTP tracer
    decorates its span; ``t`` has ``node_id`` and ``custom`` (the HCM's custom tags).
    ``unnamed(authority)`` names a span that no decorator names (Zipkin's driver: the host)."""
    si = s.stream_info
    rq = s.request_headers
    get = rq.get if rq is not None else (lambda k, d=None: d)
    authority = get(":authority") or ""
    path = get(":path") or ""
    code = si.response_code or 0
    rf = si.response_flags
    tags = {
        "component": "proxy", "node_id": t.node_id, "guid:x-request-id": si.request_id or "",
        "http.method": get(":method") or "", "http.protocol": si.protocol or "",
        "http.url": "%s://%s%s" % (get("x-forwarded-proto") or "http", authority, path),
        "http.status_code": str(code), "upstream_cluster": si.upstream_cluster or "-",
        "upstream_cluster.name": si.upstream_cluster or "-",
        "response_flags": ",".join(rf) if rf else "-", "user_agent": get("user-agent") or "-",
        "request_size": str(si.bytes_received), "response_size": str(si.bytes_sent),
        "downstream_cluster": get("x-envoy-downstream-service-cluster") or "-",
    }
    ra = si.downstream_remote_address
    if ra:
        tags["peer.address"] = ra[1:ra.index("]")] if ra[0] == "[" else ra.rpartition(":")[0] or ra
    error = code >= 500 or code == 0
    if error:
        tags["error"] = "true"
    route = s.route
    _apply_tags(tags, t.custom, get, si, route, t.cm)
    rt = getattr(route, "trace", None)
    if rt is not None and rt.tags:
        _apply_tags(tags, rt.tags, get, si, route, t.cm)
    # Envoy's span name: the route's decorator (or, on ingress, the caller's
    # x-envoy-decorator-operation), else the request's host
    name = op or getattr(route, "decorator_operation", None) or (unnamed(authority) if unnamed else authority)
    end = si.end_monotonic
    dur = int(((end - si.start_monotonic) if end is not None else (time.time() - start)) * 1e6)
    return tags, name[:256], int(start * 1e6), max(dur, 1), error


_B3 = frozenset(("x-b3-traceid", "x-b3-spanid", "x-b3-parentspanid", "x-b3-sampled", "x-b3-flags", "b3"))


def decorate(t, stream, headers):
    """The operation that names a server span: the caller's ``x-envoy-decorator-operation``,
    which the connection manager's decorator step (http/request_prep.py ``decorate``, run for
    every request of an HCM with a tracing block) removed and kept on the stream; on egress that
    step already sent the route's decorator upstream."""
    if t.kind == "CLIENT" or t.kind == 3:  # (3: OTLP's SPAN_KIND_CLIENT)
        return None
    return getattr(stream, "caller_op", None)


def _is_hex_id(v: str, lengths) -> bool:
    if len(v) not in lengths:
        return False
    try:
        int(v, 16)
    except ValueError:
        return False
    return True
