"""The table of built-in extensions: proto type -> implementing module.

One module per extension, imported only when a configuration names its type. Istio's own filters
that pyproxy does not implement yet are registered as *ignored* with the reason it is safe to run
without them; they never cause a rejection.
"""

from .config.registry import REGISTRY

_R = REGISTRY.register
_I = REGISTRY.ignore

# -- network filters ---------------------------------------------------------------------------
_R("network_filter", "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
   "pyproxy.filters.network.tcp_proxy:factory", names=("envoy.filters.network.tcp_proxy", "envoy.tcp_proxy"))
_R("network_filter", "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
   "pyproxy.filters.network.http_connection_manager:factory",
   names=("envoy.filters.network.http_connection_manager", "envoy.http_connection_manager"))

# -- HTTP filters --------------------------------------------------------------------------------
_R("http_filter", "envoy.extensions.filters.http.router.v3.Router", "pyproxy.filters.http.router:factory",
   names=("envoy.filters.http.router", "envoy.router"))
_R("http_filter", "envoy.extensions.filters.http.grpc_stats.v3.FilterConfig", "pyproxy.filters.http.grpc_stats:factory", names=("envoy.filters.http.grpc_stats",))

# -- listener filters ----------------------------------------------------------------------------
_R("listener_filter", "envoy.extensions.filters.listener.original_dst.v3.OriginalDst",
   "pyproxy.filters.listener.original_dst:factory", names=("envoy.filters.listener.original_dst",))

# -- transport sockets -----------------------------------------------------------------------------
_R("transport_socket", "envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer",
   "pyproxy.transport:raw_buffer_factory", names=("envoy.transport_sockets.raw_buffer", "raw_buffer"))

# -- upstream protocol options ---------------------------------------------------------------------
_R("upstream_protocol_options", "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
   "pyproxy.cluster.protocol_options:factory")

# -- bootstrap-level things that have no effect on a single-process Python proxy ------------------
_I("bootstrap", "envoy.extensions.bootstrap.internal_listener.v3.InternalListener",
   "internal listeners are not supported; ignored (Istio registers it unconditionally)")
_I("resource_monitor", "envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig",
   "global downstream connection limit not enforced")
