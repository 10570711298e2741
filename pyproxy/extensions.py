"""The table of built-in extensions: proto type -> implementing module.

One module per extension, imported only when a configuration names its type. Istio's own filters
that pyproxy does not implement yet are registered as *known and ignored* with the reason it is safe
to run without them: they never cause a rejection, the reason is logged once per type, and
``pyproxy validate`` prints it next to every resource that uses them.
"""

import logging

from .config.registry import REGISTRY, Ignored

log = logging.getLogger("pyproxy.config")

_R = REGISTRY.register


class LoggedIgnored(Ignored):
    """An ``Ignored`` whose reason is logged (once per process) the first time a config uses it."""

    __slots__ = ("_text", "_logged", "_type")

    def __init__(self, type_name: str, text: str):  # noqa: super().__init__ would set the slot
        self._type = type_name
        self._text = text
        self._logged = False

    @property
    def reason(self) -> str:
        if not self._logged:
            self._logged = True
            log.info("extension %s is known and skipped: %s", self._type, self._text)
        return self._text


def _I(category, type_name, reason, names=()):
    REGISTRY.register(category, type_name, LoggedIgnored(type_name, reason), names)


# -- network filters ---------------------------------------------------------------------------
_R("network_filter", "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
   "pyproxy.filters.network.tcp_proxy:factory", names=("envoy.filters.network.tcp_proxy", "envoy.tcp_proxy"))
_R("network_filter", "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
   "pyproxy.filters.network.http_connection_manager:factory",
   names=("envoy.filters.network.http_connection_manager", "envoy.http_connection_manager"))
_R("network_filter", "envoy.extensions.filters.network.rbac.v3.RBAC",
   "pyproxy.filters.network.rbac:factory", names=("envoy.filters.network.rbac",))
_R("network_filter", "envoy.extensions.filters.network.set_filter_state.v3.Config",
   "pyproxy.filters.network.set_filter_state:factory", names=("envoy.filters.network.set_filter_state",))
_R("network_filter", "envoy.extensions.filters.network.local_ratelimit.v3.LocalRateLimit",
   "pyproxy.filters.network.local_ratelimit:factory", names=("envoy.filters.network.local_ratelimit",))
_R("network_filter", "envoy.extensions.filters.network.wasm.v3.Wasm",
   "pyproxy.filters.network.wasm:factory", names=("envoy.filters.network.wasm",))

# Istio's network filters (types no installed proto defines; they arrive as TypedStruct or a marked
# Struct, which ``type_name_of`` sees through).
_R("network_filter", "envoy.tcp.metadataexchange.config.MetadataExchange",
   "pyproxy.filters.network.metadata_exchange:factory")
# a cluster's ``filters`` (upstream network filters): only Istio's metadata exchange
_R("upstream_network_filter", "envoy.tcp.metadataexchange.config.MetadataExchange",
   "pyproxy.filters.network.metadata_exchange:upstream_factory")
_R("network_filter", "stats.PluginConfig", "pyproxy.filters.network.istio_stats:factory")
_R("network_filter", "io.istio.network.authn.Config", "pyproxy.filters.network.istio_authn:factory",
   names=("istio_authn",))

# -- HTTP filters --------------------------------------------------------------------------------
_R("http_filter", "envoy.extensions.filters.http.router.v3.Router", "pyproxy.filters.http.router:factory",
   names=("envoy.filters.http.router", "envoy.router"))
_R("http_filter", "envoy.extensions.filters.http.fault.v3.HTTPFault", "pyproxy.filters.http.fault:factory",
   names=("envoy.filters.http.fault", "envoy.fault"))
_R("http_filter", "envoy.extensions.filters.http.cors.v3.Cors", "pyproxy.filters.http.cors:factory",
   names=("envoy.filters.http.cors", "envoy.cors"))
_R("route_policy", "cors", "pyproxy.filters.http.cors:compile_route_cors")
_R("http_filter", "envoy.extensions.filters.http.rbac.v3.RBAC", "pyproxy.filters.http.rbac:factory",
   names=("envoy.filters.http.rbac",))
_R("http_filter", "envoy.extensions.filters.http.ext_authz.v3.ExtAuthz", "pyproxy.filters.http.ext_authz:factory",
   names=("envoy.filters.http.ext_authz", "envoy.ext_authz"))
_R("http_filter", "envoy.extensions.filters.http.compressor.v3.Compressor",
   "pyproxy.filters.http.compressor:factory", names=("envoy.filters.http.compressor",))
_R("http_filter", "envoy.extensions.filters.http.wasm.v3.Wasm", "pyproxy.filters.http.wasm:factory",
   names=("envoy.filters.http.wasm",))
_R("http_filter", "envoy.extensions.filters.http.set_filter_state.v3.Config",
   "pyproxy.filters.http.set_filter_state:factory", names=("envoy.filters.http.set_filter_state",))
_R("http_filter", "envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
   "pyproxy.filters.http.local_ratelimit:factory", names=("envoy.filters.http.local_ratelimit",))
_R("route_filter_config", "envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
   "pyproxy.filters.http.local_ratelimit:check_per_route")
_R("http_filter", "envoy.extensions.filters.http.grpc_stats.v3.FilterConfig",
   "pyproxy.filters.http.grpc_stats:factory", names=("envoy.filters.http.grpc_stats",))

_R("http_filter", "stats.PluginConfig", "pyproxy.filters.http.istio_stats:factory")
_R("http_filter", "istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig",
   "pyproxy.filters.http.istio_alpn:factory", names=("istio.alpn",))
_R("http_filter", "io.istio.http.peer_metadata.Config", "pyproxy.filters.http.peer_metadata:factory")
_I("http_filter", "io.istio.http.connect_authority.Config",
   "connect_authority: passes the CONNECT authority to HBONE internal listeners, which are not "
   "supported (no traffic reaches them)")
_I("http_filter", "io.istio.http.connect_baggage.Config",
   "connect_baggage: propagates workload baggage over HBONE CONNECT, which is not supported")

# -- listener filters ----------------------------------------------------------------------------
_R("listener_filter", "envoy.extensions.filters.listener.original_dst.v3.OriginalDst",
   "pyproxy.filters.listener.original_dst:factory", names=("envoy.filters.listener.original_dst",))
_R("listener_filter", "envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector",
   "pyproxy.filters.listener.tls_inspector:factory", names=("envoy.filters.listener.tls_inspector",))
_R("listener_filter", "envoy.extensions.filters.listener.http_inspector.v3.HttpInspector",
   "pyproxy.filters.listener.http_inspector:factory", names=("envoy.filters.listener.http_inspector",))
_I("listener_filter", "istio.set_internal_dst_address.v1.Config",
   "set_dst_address: restores the destination address on HBONE internal listeners, which are not "
   "supported (no traffic reaches them)")

# -- transport sockets -----------------------------------------------------------------------------
_R("transport_socket", "envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer",
   "pyproxy.transport:raw_buffer_factory", names=("envoy.transport_sockets.raw_buffer", "raw_buffer"))
_R("transport_socket", "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
   "pyproxy.tls.context:downstream_factory")
_R("transport_socket", "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
   "pyproxy.tls.context:upstream_factory", names=("envoy.transport_sockets.tls", "tls"))
_R("transport_socket", "envoy.extensions.transport_sockets.internal_upstream.v3.InternalUpstreamTransport",
   "pyproxy.tls.internal_upstream:factory", names=("envoy.transport_sockets.internal_upstream",))

# -- compression libraries (used by the compressor HTTP filter) -------------------------------------
_R("compressor", "envoy.extensions.compression.gzip.compressor.v3.Gzip",
   "pyproxy.filters.http.compressor:gzip_library", names=("envoy.compression.gzip.compressor",))
_R("compressor", "envoy.extensions.compression.brotli.compressor.v3.Brotli",
   "pyproxy.filters.http.compressor:brotli_library", names=("envoy.compression.brotli.compressor",))
_R("compressor", "envoy.extensions.compression.zstd.compressor.v3.Zstd",
   "pyproxy.filters.http.compressor:zstd_library", names=("envoy.compression.zstd.compressor",))

# -- load-balancing policies (a cluster's load_balancing_policy; its legacy lb_policy enum maps onto
# these same entries) ------------------------------------------------------------------------------
_LBP = "envoy.extensions.load_balancing_policies."
for _mod, _msg in (("round_robin", "RoundRobin"), ("least_request", "LeastRequest"), ("random", "Random"),
                   ("ring_hash", "RingHash"), ("maglev", "Maglev"), ("cluster_provided", "ClusterProvided")):
    _R("lb_policy", "%s%s.v3.%s" % (_LBP, _mod, _msg), "pyproxy.cluster.lb.%s:factory" % _mod,
       names=("envoy.load_balancing_policies." + _mod,))

# -- upstream protocol options ---------------------------------------------------------------------
_R("upstream_protocol_options", "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
   "pyproxy.cluster.protocol_options:factory")

# -- bootstrap-level things that have no effect on a single-process Python proxy ------------------
_I("bootstrap", "envoy.extensions.bootstrap.internal_listener.v3.InternalListener",
   "internal listeners are not supported; ignored (Istio registers it unconditionally)")
_R("resource_monitor", "envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig",
   "pyproxy.listeners.overload:downstream_connections",
   names=("envoy.resource_monitors.global_downstream_max_connections",))
