"""A ``HealthCheck`` proto validated into what the health checker reads (see ``health_check``)."""

from __future__ import annotations

from ..config import ConfigError, duration_s

HTTP, TCP, GRPC = "http", "tcp", "grpc"


def _payload(p, field: str) -> bytes:
    which = p.WhichOneof("payload")
    if which == "text":
        try:
            return bytes.fromhex(p.text)
        except ValueError:
            raise ConfigError("payload text must be hex", field + ".text") from None
    if which == "binary":
        return bytes(p.binary)
    raise ConfigError("payload must be set", field)


def _ranges(rs, field: str) -> list:
    out = []
    for i, r in enumerate(rs):
        if not (100 <= r.start < r.end <= 600):
            raise ConfigError("status range [%d, %d) must be within [100, 600)" % (r.start, r.end),
                              "%s[%d]" % (field, i))
        out.append((r.start, r.end))
    return out


class HealthCheckConfig:
    def __init__(self, hc, cluster_name: str):
        if not hc.HasField("timeout"):
            raise ConfigError("timeout is required", "timeout")
        if not hc.HasField("interval"):
            raise ConfigError("interval is required", "interval")
        self.timeout = duration_s(hc, "timeout", 1.0)
        self.interval = duration_s(hc, "interval", 1.0)
        if self.timeout <= 0 or self.interval <= 0:
            raise ConfigError("value must be greater than 0", "interval" if self.interval <= 0
                              else "timeout")
        self.initial_jitter = duration_s(hc, "initial_jitter", 0.0)
        self.interval_jitter = duration_s(hc, "interval_jitter", 0.0)
        self.interval_jitter_percent = hc.interval_jitter_percent
        if not hc.HasField("unhealthy_threshold") or not hc.HasField("healthy_threshold"):
            raise ConfigError("unhealthy_threshold and healthy_threshold are required",
                              "unhealthy_threshold" if not hc.HasField("unhealthy_threshold")
                              else "healthy_threshold")
        self.unhealthy_threshold = max(1, hc.unhealthy_threshold.value)
        self.healthy_threshold = max(1, hc.healthy_threshold.value)
        self.reuse_connection = hc.reuse_connection.value if hc.HasField("reuse_connection") \
            else True
        self.no_traffic_interval = duration_s(hc, "no_traffic_interval", 60.0)
        self.no_traffic_healthy_interval = duration_s(hc, "no_traffic_healthy_interval",
                                                      self.no_traffic_interval)
        self.unhealthy_interval = duration_s(hc, "unhealthy_interval", self.interval)
        self.unhealthy_edge_interval = duration_s(hc, "unhealthy_edge_interval",
                                                  self.unhealthy_interval)
        self.healthy_edge_interval = duration_s(hc, "healthy_edge_interval", self.interval)
        for f in ("custom_health_check", "tls_options"):
            if hc.HasField(f):
                raise ConfigError("%s is not supported" % f, f)
        if hc.HasField("alt_port"):
            raise ConfigError("alt_port is not supported", "alt_port")
        if hc.HasField("transport_socket_match_criteria"):
            raise ConfigError("transport_socket_match_criteria is not supported",
                              "transport_socket_match_criteria")
        which = hc.WhichOneof("health_checker")
        if which == "http_health_check":
            self.kind = HTTP
            h = hc.http_health_check
            if h.codec_client_type not in (0,):  # HTTP1
                raise ConfigError("only HTTP/1.1 health checks are supported",
                                  "http_health_check.codec_client_type")
            if h.HasField("send") or len(h.receive):
                raise ConfigError("send/receive payloads of HTTP health checks are not supported",
                                  "http_health_check.receive")
            if not h.path:
                raise ConfigError("path is required", "http_health_check.path")
            if h.HasField("service_name_matcher"):
                raise ConfigError("service_name_matcher is not supported (the check would pass "
                                  "hosts it should fail)", "http_health_check.service_name_matcher")
            self.path = h.path
            self.host = h.host or cluster_name
            self.method = {0: "GET", 1: "GET", 2: "HEAD", 3: "POST", 4: "PUT", 5: "DELETE",
                           6: "CONNECT", 7: "OPTIONS", 8: "TRACE", 9: "PATCH"}.get(h.method, "GET")
            if self.method == "CONNECT":
                raise ConfigError("method CONNECT is not allowed", "http_health_check.method")
            self.expected = _ranges(h.expected_statuses, "http_health_check.expected_statuses") \
                or [(200, 201)]
            self.retriable = _ranges(h.retriable_statuses, "http_health_check.retriable_statuses")
            remove = {n.lower() for n in h.request_headers_to_remove}
            self.headers = [(hv.header.key.lower(), hv.header.value)
                            for hv in h.request_headers_to_add
                            if hv.header.key.lower() not in remove]
            for k, v in self.headers:
                if any(c in k + v for c in "\r\n\0"):
                    raise ConfigError("invalid header in request_headers_to_add",
                                      "http_health_check.request_headers_to_add")
        elif which == "tcp_health_check":
            self.kind = TCP
            t = hc.tcp_health_check
            if t.HasField("proxy_protocol_config"):
                raise ConfigError("proxy_protocol_config is not supported",
                                  "tcp_health_check.proxy_protocol_config")
            self.send = _payload(t.send, "tcp_health_check.send") if t.HasField("send") else b""
            self.receive = [_payload(p, "tcp_health_check.receive[%d]" % i)
                            for i, p in enumerate(t.receive)]
        elif which == "grpc_health_check":
            self.kind = GRPC
            g = hc.grpc_health_check
            self.service_name = g.service_name
            self.authority = g.authority or cluster_name
            self.metadata = [(m.header.key.lower(), m.header.value) for m in g.initial_metadata]
        else:
            raise ConfigError("health checker type '%s' is not supported" % which,
                              which or "health_checker")
