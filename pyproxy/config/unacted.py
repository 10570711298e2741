"""The one table of config fields pyproxy accepts but does not act on yet.

"Accepted" must mean "acted on": a field in this table is accepted (Istio sends it, and refusing the
whole resource would break the mesh), but pyproxy does not implement it yet, so it is named by
``pyproxy validate`` and ``--mode validate`` and logged once at WARNING level (pilot-agent runs the
proxy at ``-l warning``) for each resource that sets it.

When a feature lands, delete its row here (and its test in tests/test_unacted.py): nothing else
refers to the rows. Each row is (resource kind, field path, what is not done). A path walks message
fields with dots; ``[]`` after a repeated field means "in any of its elements"; the field counts as
set when it is a message or oneof member that is present, a non-empty repeated field, or a scalar
other than its default.

The compile paths call ``warn(kind, msg, name)``; ``notes(kind, msg)`` returns the texts without
logging (for validate). Kinds: ``cluster`` (Cluster), ``route_configuration`` (RouteConfiguration),
``tcp_proxy`` (its typed_config), ``http_connection_manager`` (its typed_config), ``bootstrap`` (Bootstrap),
``upstream_http_protocol_options`` (a cluster's ``envoy.extensions.upstreams.http.v3.HttpProtocolOptions``),
``sds_validation_context``
(CertificateValidationContext delivered in an SDS Secret).
"""

from __future__ import annotations

import logging

log = logging.getLogger("pyproxy.config")

NOT_ACTED_ON: tuple = (
    ("cluster", "upstream_connection_options.set_local_interface_name_on_upstream_connections",
     "the local interface name is not recorded for upstream connections"),
    ("cluster", "upstream_connection_options.happy_eyeballs_config",
     "happy eyeballs is not implemented: an endpoint's one address is connected to"),
    ("cluster", "health_checks[].event_log_path", "health check event logging is not implemented"),
    ("cluster", "health_checks[].event_logger[]", "health check event logging is not implemented"),
    ("cluster", "health_checks[].always_log_health_check_failures",
     "health check event logging is not implemented"),
    ("cluster", "common_http_protocol_options.max_connection_duration",
     "max_connection_duration is not implemented for upstream connections: they are not closed for age"),
    ("cluster", "common_http_protocol_options.max_stream_duration",
     "max_stream_duration is not implemented for upstream streams: only the route timeouts apply"),
    ("upstream_http_protocol_options", "common_http_protocol_options.max_connection_duration",
     "max_connection_duration is not implemented for upstream connections: they are not closed for age"),
    ("upstream_http_protocol_options", "common_http_protocol_options.max_stream_duration",
     "max_stream_duration is not implemented for upstream streams: only the route timeouts apply"),
    ("cluster", "common_http_protocol_options.max_response_headers_kb",
     "max_response_headers_kb is not implemented yet: upstream response heads are limited to 80 KiB"),
    ("upstream_http_protocol_options", "common_http_protocol_options.max_response_headers_kb",
     "max_response_headers_kb is not implemented yet: upstream response heads are limited to 80 KiB"),
    ("upstream_http_protocol_options", "explicit_http_config.http_protocol_options.send_fully_qualified_url",
     "send_fully_qualified_url is not implemented yet: requests go upstream in origin form"),
    ("cluster", "lb_subset_config", "subset load balancing is not implemented yet: every host is a candidate"),
    ("route_configuration", "virtual_hosts[].routes[].route.metadata_match",
     "metadata_match (subset selection) is not implemented yet: every host of the cluster is a candidate"),
    ("route_configuration", "virtual_hosts[].routes[].route.weighted_clusters.clusters[].metadata_match",
     "metadata_match (subset selection) is not implemented yet: every host of the cluster is a candidate"),
    ("route_configuration", "virtual_hosts[].routes[].route.upgrade_configs[].connect_config.proxy_protocol_config",
     "proxy_protocol_config is not implemented yet: a terminated CONNECT's upstream gets no PROXY protocol header"),
    ("route_configuration", "virtual_hosts[].routes[].route.upgrade_configs[].connect_config.allow_post",
     "allow_post is not implemented yet: only a CONNECT request is terminated, a POST is proxied as a request"),
    ("route_configuration", "virtual_hosts[].routes[].route.internal_redirect_policy",
     "internal redirects are not implemented yet: the redirect goes to the client"),
    ("route_configuration", "virtual_hosts[].routes[].route.internal_redirect_action",
     "internal redirects are not implemented yet: the redirect goes to the client"),
    ("route_configuration", "virtual_hosts[].routes[].route.max_internal_redirects",
     "internal redirects are not implemented yet: the redirect goes to the client"),
    ("route_configuration", "virtual_hosts[].routes[].route.flush_timeout",
     "the per-route flush timeout is not implemented yet (as the HCM's stream_flush_timeout)"),
    ("route_configuration", "virtual_hosts[].routes[].route.early_data_policy",
     "early_data_policy is not implemented: requests are never sent upstream as TLS early data"),
    ("route_configuration", "virtual_hosts[].routes[].route.priority",
     "routing priority is not implemented yet: the DEFAULT priority's circuit breaker thresholds apply"),
    ("route_configuration", "virtual_hosts[].routes[].stat_prefix",
     "per-route stats (vhost.<name>.route.<stat_prefix>.*) are not emitted yet"),
    ("route_configuration", "virtual_hosts[].routes[].route.idle_timeout",
     "the per-route stream idle timeout is not implemented yet: the HCM's stream_idle_timeout applies"),
    ("route_configuration", "virtual_hosts[].routes[].route.weighted_clusters.clusters[].typed_per_filter_config[]",
     "per-filter configs of a weighted cluster are not applied yet: the route's (or its virtual host's) apply"),
    ("route_configuration", "virtual_hosts[].virtual_clusters[]",
     "virtual cluster stats (vhost.<name>.vcluster.<name>.*) are not emitted yet"),
    ("route_configuration", "virtual_hosts[].request_body_buffer_limit",
     "request_body_buffer_limit is not implemented yet: per_request_buffer_limit_bytes (or the listener's "
     "buffer limit) bounds what is kept for retries and mirrors"),
    ("route_configuration", "virtual_hosts[].routes[].request_body_buffer_limit",
     "request_body_buffer_limit is not implemented yet: per_request_buffer_limit_bytes (or the listener's "
     "buffer limit) bounds what is kept for retries and mirrors"),
    ("tcp_proxy", "tunneling_config", "tunneling_config is not implemented yet: bytes go upstream unwrapped"),
    ("tcp_proxy", "metadata_match", "metadata_match (subset selection) is not implemented yet"),
    ("tcp_proxy", "access_log_options", "access_log_options is not implemented yet: one access log entry at "
     "the connection's end (no periodic flush, no entry when the upstream connects)"),
    ("tcp_proxy", "backoff_options", "backoff_options is not implemented yet: connect attempts are retried at once"),
    ("tcp_proxy", "proxy_protocol_tlvs[]", "proxy_protocol_tlvs is not implemented yet: no PROXY protocol TLVs are sent"),
    ("tcp_proxy", "max_early_data_bytes", "max_early_data_bytes is not implemented yet: the client's bytes are "
     "read before the upstream connection is up, bounded by the listener's buffer limit"),
    ("bootstrap", "stats_config.histogram_bucket_settings[].bins",
     "bins (the initial bins of Envoy's internal histogram per series) has no equivalent: the exported "
     "buckets are the same"),
    ("http_connection_manager", "add_user_agent",
     "add_user_agent is not implemented yet: no x-envoy-downstream-service-cluster/-node, user-agent unchanged"),
    ("http_connection_manager", "scheme_header_transformation",
     "scheme_header_transformation is not implemented yet: :scheme is not rewritten"),
    ("http_connection_manager", "local_reply_config",
     "local_reply_config is not implemented yet: local replies are neither mapped nor reformatted"),
    ("http_connection_manager", "early_header_mutation_extensions[]",
     "early header mutations are not implemented yet: not applied"),
    ("http_connection_manager", "proxy_100_continue",
     "proxy_100_continue is not implemented yet: the proxy answers Expect: 100-continue itself"),
    ("http_connection_manager", "stream_error_on_invalid_http_message",
     "stream_error_on_invalid_http_message is not implemented yet: an invalid message closes the connection"),
    ("http_connection_manager", "stream_flush_timeout", "stream_flush_timeout is not implemented yet"),
    ("http_connection_manager", "delayed_close_timeout", "delayed_close_timeout is not implemented yet"),
    ("http_connection_manager", "access_log_flush_interval",
     "periodic access logging is not implemented yet: one entry at the end of each stream"),
    ("http_connection_manager", "flush_access_log_on_new_request",
     "flush_access_log_on_new_request is not implemented yet: one entry at the end of each stream"),
    ("http_connection_manager", "access_log_options",
     "access_log_options are not implemented yet: one entry at the end of each stream"),
    ("http_connection_manager", "proxy_status_config", "proxy_status_config is not implemented yet: no Proxy-Status"),
    ("http_connection_manager", "append_local_overload",
     "append_local_overload is not implemented yet: no x-envoy-local-overloaded"),
    ("http_connection_manager", "represent_ipv4_remote_address_as_ipv4_mapped_ipv6",
     "represent_ipv4_remote_address_as_ipv4_mapped_ipv6 is not implemented yet: IPv4 addresses stay IPv4"),
    ("http_connection_manager", "http_protocol_options.header_key_format",
     "header_key_format is not implemented yet: HTTP/1.1 header names are sent lower-case"),
    ("http_connection_manager", "http_protocol_options.enable_trailers",
     "enable_trailers: response trailers are sent to HTTP/1.1 clients, but request trailers from them are "
     "still dropped"),
    ("http_connection_manager", "http_protocol_options.allow_chunked_length",
     "allow_chunked_length is not implemented yet: a request with both content-length and chunked is refused"),
    ("http_connection_manager", "http_protocol_options.allow_custom_methods",
     "allow_custom_methods is not implemented yet"),
    ("http_connection_manager", "http_protocol_options.ignore_http_11_upgrade[]",
     "ignore_http_11_upgrade is not implemented yet: upgrade requests are handled as configured"),
    ("http_connection_manager", "http_protocol_options.override_stream_error_on_invalid_http_message",
     "override_stream_error_on_invalid_http_message is not implemented yet: an invalid message closes the "
     "connection"),
    ("http_connection_manager", "common_http_protocol_options.max_response_headers_kb",
     "max_response_headers_kb is not implemented yet: upstream response heads are limited to 80 KiB"),
    ("http_connection_manager", "http_protocol_options.allow_absolute_url",
     "allow_absolute_url is not implemented: absolute-form request targets are always accepted"),
    ("http_connection_manager", "http1_safe_max_connection_duration",
     "http1_safe_max_connection_duration is not implemented yet"),
)

_BY_KIND: dict = {}
for _kind, _path, _why in NOT_ACTED_ON:
    _BY_KIND.setdefault(_kind, []).append((_path, tuple(_path.split(".")), _why))

_warned: dict = {}  # (kind, name, text) -> the line logged; bounded
_WARNED_MAX = 10000


def _repeated(fd) -> bool:
    r = getattr(fd, "is_repeated", None)
    return r if r is not None else fd.label == fd.LABEL_REPEATED


def _is_set(msg, name: str, repeated: bool) -> list:
    """The values of field ``name`` to walk on ([] when unset)."""
    fd = msg.DESCRIPTOR.fields_by_name.get(name)
    if fd is None:
        return []
    v = getattr(msg, name)
    if _repeated(fd):
        return list(v) if repeated else ([v] if len(v) else [])
    if fd.message_type is not None or fd.containing_oneof is not None:
        return [v] if msg.HasField(name) else []
    return [v] if v != fd.default_value else []


def _present(msg, parts: tuple) -> bool:
    cur = [msg]
    for i, p in enumerate(parts):
        repeated = p.endswith("[]")
        name = p[:-2] if repeated else p
        last = i == len(parts) - 1
        nxt = []
        for m in cur:
            vals = _is_set(m, name, repeated and not last)
            if last and vals:
                return True
            nxt.extend(vals)
        if not nxt:
            return False
        cur = nxt
    return False


def notes(kind: str, msg) -> list:
    """The 'path: reason' texts of the table's rows that ``msg`` (a ``kind`` resource) sets."""
    out = []
    for path, parts, why in _BY_KIND.get(kind, ()):
        if _present(msg, parts):
            text = "%s: %s" % (path.replace("[]", ""), why)
            if text not in out:
                out.append(text)
    return out


def reset() -> None:
    """Forget what was logged (``pyproxy validate`` reports every resource it checks)."""
    _warned.clear()


def warn(kind: str, msg, name: str = "") -> list:
    """``notes`` and, the first time for this resource and field, a WARNING log line naming them."""
    found = notes(kind, msg)
    for text in found:
        key = (kind, name, text)
        if key in _warned:
            continue
        if len(_warned) >= _WARNED_MAX:
            _warned.clear()
        line = "%s%s: %s; ignored" % (kind, " '%s'" % name if name else "", text)
        _warned[key] = line
        log.warning("%s", line)
    return found


def warned() -> list:
    """Every line ``warn`` logged since the last ``reset`` (``--mode validate`` prints them)."""
    return list(_warned.values())
