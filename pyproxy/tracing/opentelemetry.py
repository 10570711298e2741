"""``envoy.tracers.opentelemetry`` (``config.trace.v3.OpenTelemetryConfig``): W3C trace context
propagation and spans exported with OTLP over gRPC (``TraceService/Export``) to the cluster of
``grpc_service.envoy_grpc``.

Per stream, as the Zipkin tracer (``pyproxy/tracing/zipkin.py``) but with ``traceparent``
(``00-<trace id>-<parent id>-<flags>``, sampled when flag bit 0 is set) and ``tracestate``
(passed on as received); a request without a valid ``traceparent`` starts a trace, sampled as
decided in ``x-request-id``. The upstream gets ``traceparent`` with this proxy's span id. A
sampled stream's span (kind CLIENT on an OUTBOUND listener, SERVER otherwise; Envoy's HTTP tags
as attributes; status ERROR on 5xx) is queued (bounded, drops counted) and exported in batches
every second by one task over a grpc.aio channel, off the hot path; a failed export drops its
batch, is counted in ``tracing.opentelemetry.reports_failed`` and logged once. ``http_service``
(OTLP over HTTP), samplers and resource detectors are rejected with a message.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
from envoy.config.trace.v3 import opentelemetry_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2  # (shipped by xds-protos)
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from .. import __version__ as _SDK_VERSION
from ..config import ConfigError
from .export import BatchExporter
from .zipkin import SpanFilter, _hex, custom_tags, decorate, span_facts

log = logging.getLogger("pyproxy.tracing")

EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
# ResourceSpans field 2: ``scope_spans`` in current OTLP, ``instrumentation_library_spans`` in the
# older copy xds-protos ships (the same field number and layout on the wire)
_SCOPE_SPANS = "scope_spans" if "scope_spans" in trace_pb2.ResourceSpans.DESCRIPTOR.fields_by_name \
    else "instrumentation_library_spans"


def _unnamed_ingress(authority: str) -> str:
    return "ingress"


def _unnamed_egress(authority: str) -> str:
    return "egress " + authority


class OtelTracer(BatchExporter):
    verb = "exported"

    def __init__(self, cfg, ctx, hcm_proto):
        if cfg.HasField("http_service"):
            raise ConfigError("OTLP over HTTP (http_service) is not supported; use grpc_service", field="http_service")
        if not cfg.HasField("grpc_service") or cfg.grpc_service.WhichOneof("target_specifier") != "envoy_grpc":
            raise ConfigError("grpc_service.envoy_grpc (a cluster) is required", field="grpc_service")
        if cfg.HasField("sampler") or len(cfg.resource_detectors):
            raise ConfigError("OpenTelemetry samplers and resource detectors are not supported",
                              field="sampler" if cfg.HasField("sampler") else "resource_detectors")
        self._init_export(ctx, "opentelemetry", cfg.grpc_service.envoy_grpc.cluster_name)
        self.authority = cfg.grpc_service.envoy_grpc.authority or self.cluster
        self.timeout = (cfg.grpc_service.timeout.seconds + cfg.grpc_service.timeout.nanos / 1e9) or 5.0
        server = getattr(ctx, "server", None)
        node = getattr(server, "node", None)
        self.service = cfg.service_name or "unknown_service:envoy"
        self.node_id = node.id if node is not None else ""
        self.zone = node.locality.zone if node is not None else ""
        lp = getattr(getattr(ctx, "listener", None), "proto", None)
        self.kind = trace_pb2.Span.SPAN_KIND_CLIENT if lp is not None and lp.traffic_direction == 2 \
            else trace_pb2.Span.SPAN_KIND_SERVER
        self.custom = custom_tags(hcm_proto)
        # a span no decorator names: Envoy's operation name, "ingress", or "egress <host>"
        self.unnamed = _unnamed_ingress if self.kind == trace_pb2.Span.SPAN_KIND_SERVER else _unnamed_egress
        self.channel = None
        self.channel_target = None

    def create(self, stream):
        return OtelFilter(stream, self)

    async def _send(self, batch, host) -> bool:
        target = "%s:%d" % (host.address, host.port)
        if self.channel_target != target:
            if self.channel is not None:
                await self.channel.close()
            self.channel = grpc.aio.insecure_channel(target, options=[("grpc.default_authority", self.authority)])
            self.channel_target = target
        req = trace_service_pb2.ExportTraceServiceRequest()
        rs = req.resource_spans.add()
        for k, v in (("service.name", self.service), ("telemetry.sdk.name", "pyproxy"),
                     ("telemetry.sdk.language", "python"), ("telemetry.sdk.version", _SDK_VERSION)):
            a = rs.resource.attributes.add()
            a.key = k
            a.value.string_value = v
        getattr(rs, _SCOPE_SPANS).add().spans.extend(batch)
        call = self.channel.unary_unary(
            EXPORT, request_serializer=trace_service_pb2.ExportTraceServiceRequest.SerializeToString,
            response_deserializer=trace_service_pb2.ExportTraceServiceResponse.FromString)
        try:
            await call(req, timeout=self.timeout)
            return True
        except (grpc.RpcError, asyncio.TimeoutError, OSError):
            return False


def _parse_traceparent(v: str):
    """(trace id, parent id, sampled) of a valid version-00 ``traceparent``, else None."""
    parts = v.strip().split("-")
    if len(parts) < 4 or len(parts[0]) != 2 or len(parts[1]) != 32 or len(parts[2]) != 16 or len(parts[3]) != 2:
        return None
    try:
        ver = int(parts[0], 16)
        int(parts[1], 16)
        int(parts[2], 16)
        flags = int(parts[3], 16)
    except ValueError:
        return None
    if ver == 0xff or (ver == 0 and len(parts) != 4):
        return None
    tid, pid = parts[1].lower(), parts[2].lower()
    if tid == "0" * 32 or pid == "0" * 16:
        return None
    return tid, pid, bool(flags & 1)


class OtelFilter(SpanFilter):
    """W3C traceparent in and out, an OTLP span at the end."""

    __slots__ = ()

    def decode_headers(self, headers, end_stream):
        tp = headers.get("traceparent")
        ctx = _parse_traceparent(tp) if tp else None
        if ctx is not None:
            self.trace_id, self.parent, self.sampled = ctx
        else:
            rid = headers.get("x-request-id") or ""
            self.sampled = len(rid) == 36 and rid[14] in "9ab"
            self.trace_id = _hex(128)
            self.parent = None
        self.span_id = _hex(64)
        self.start = time.time()
        headers.set("traceparent", "00-%s-%s-%s" % (self.trace_id, self.span_id, "01" if self.sampled else "00"))
        self.op = decorate(self.t, self.callbacks, headers)
        return 0

    def on_destroy(self):
        if not self.sampled or self.trace_id is None:
            return
        t = self.t
        tags, name, start_us, dur_us, error = span_facts(t, self.callbacks, self.start, self.op,
                                                         t.unnamed)
        tags["zone"] = t.zone  # (Envoy's OpenTelemetry spans carry it even when empty)
        sp = trace_pb2.Span(trace_id=bytes.fromhex(self.trace_id), span_id=bytes.fromhex(self.span_id),
                            name=name, kind=t.kind, start_time_unix_nano=start_us * 1000,
                            end_time_unix_nano=(start_us + dur_us) * 1000)
        if self.parent is not None:
            sp.parent_span_id = bytes.fromhex(self.parent)
        for k, v in tags.items():
            sp.attributes.append(common_pb2.KeyValue(key=k, value=common_pb2.AnyValue(string_value=str(v))))
        if error:
            sp.status.code = trace_pb2.Status.STATUS_CODE_ERROR
        t.report(sp)


def tracer(cfg_any, ctx, hcm_proto):
    c = opentelemetry_pb2.OpenTelemetryConfig()
    cfg_any.Unpack(c)
    return OtelTracer(c, ctx, hcm_proto)
