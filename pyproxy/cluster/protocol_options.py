"""``envoy.extensions.upstreams.http.v3.HttpProtocolOptions``: which HTTP version upstream, and
connection limits (idle timeout, max requests per connection)."""

from __future__ import annotations

from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2  # noqa: F401 (registers type)

from ..config import ConfigError, duration_s, u32


def factory(cfg, po) -> None:
    """Apply ``cfg`` onto the cluster's ``ProtocolOptions`` ``po``."""
    from .cluster import AUTO, HTTP1, HTTP2, USE_DOWNSTREAM
    from ..config import unacted
    unacted.warn("upstream_http_protocol_options", cfg)  # (fields accepted, not acted on)
    which = cfg.WhichOneof("upstream_protocol_options")
    if which == "explicit_http_config":
        e = cfg.explicit_http_config
        if e.HasField("http2_protocol_options"):
            po.protocol = HTTP2
            po.http2_options = e.http2_protocol_options
        elif e.HasField("http3_protocol_options"):
            raise ConfigError("HTTP/3 upstreams are not supported", field="explicit_http_config")
        else:
            po.protocol = HTTP1
            po.trailers = e.http_protocol_options.enable_trailers
    elif which == "use_downstream_protocol_config":
        po.protocol = USE_DOWNSTREAM
        po.trailers = cfg.use_downstream_protocol_config.http_protocol_options.enable_trailers
        if cfg.use_downstream_protocol_config.HasField("http2_protocol_options"):
            po.http2_options = cfg.use_downstream_protocol_config.http2_protocol_options
    elif which == "auto_config":
        # ALPN-negotiated (cluster/pool_auto.py); without TLS, HTTP/1.1 as in Envoy
        po.protocol = AUTO
        po.trailers = cfg.auto_config.http_protocol_options.enable_trailers
        if cfg.auto_config.HasField("http2_protocol_options"):
            po.http2_options = cfg.auto_config.http2_protocol_options
    if cfg.HasField("common_http_protocol_options"):
        c = cfg.common_http_protocol_options
        po.idle_timeout = duration_s(c, "idle_timeout", po.idle_timeout)
        po.max_requests_per_connection = u32(c, "max_requests_per_connection", po.max_requests_per_connection)
        po.max_stream_duration = duration_s(c, "max_stream_duration", None)
        po.max_headers_count = u32(c, "max_headers_count", 0) or 100
