"""Which tracer an HCM gets: its ``tracing.provider`` (or the bootstrap's ``tracing.http``) mapped to
the Zipkin or OpenTelemetry tracer."""

from __future__ import annotations

from envoy.config.trace.v3 import zipkin_pb2

from ..config import ConfigError
from .zipkin import ZipkinTracer


def tracing_provider(cfg, ctx):
    """The ``config.trace.v3.Tracing.Http`` an HCM traces with, or None (no ``tracing`` block, or
    neither a provider of its own nor the bootstrap's ``tracing.http``)."""
    if not cfg.HasField("tracing"):
        return None
    if cfg.tracing.HasField("provider"):
        return cfg.tracing.provider
    server = getattr(ctx, "server", None)
    bs = getattr(server, "bootstrap", None)
    if bs is not None and bs.HasField("tracing") and bs.tracing.HasField("http"):
        return bs.tracing.http
    return None


def tracer_for_hcm(cfg, ctx, stat_prefix: str):
    """The HCM's tracing filter factory (Zipkin, OpenTelemetry), or None: no provider, or one not
    implemented (the HCM logs it as such).

    The provider is the HCM's ``tracing.provider``; an HCM with a ``tracing`` block and no
    provider uses the bootstrap's (deprecated) ``tracing.http``, as Envoy does."""
    p = tracing_provider(cfg, ctx)
    if p is None:
        return None
    t = p.typed_config.type_url.rpartition("/")[2] if p.HasField("typed_config") else ""
    if t == "envoy.config.trace.v3.ZipkinConfig":
        z = zipkin_pb2.ZipkinConfig()
        p.typed_config.Unpack(z)
        try:
            return ZipkinTracer(z, ctx, cfg, stat_prefix)
        except ConfigError as e:
            raise e.within(field="tracing.provider")
    if t == "envoy.config.trace.v3.OpenTelemetryConfig":
        from . import opentelemetry  # (imports grpc and the OTLP protos only when configured)
        try:
            return opentelemetry.tracer(p.typed_config, ctx, cfg)
        except ConfigError as e:
            raise e.within(field="tracing.provider")
    return None
