"""Istio's own extension protos, which no installed package defines.

istiod sends ``stats.PluginConfig``, ``io.istio.http.peer_metadata.Config`` and
``envoy.tcp.metadataexchange.config.MetadataExchange`` as directly typed ``Any``s (binary over
xDS, ``@type`` in config dumps) or wrapped in a TypedStruct. Their descriptors are built here from
the field numbers of istio/proxy's ``.proto`` files and added to the default pool, so an ``Any``
of these types unpacks like any other message.
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, duration_pb2  # noqa: F401 (duration in the pool)

try:
    from google.protobuf import message_factory as _mf
    _get_class = getattr(_mf, "GetMessageClass", None)
except ImportError:  # pragma: no cover
    _get_class = None

F = descriptor_pb2.FieldDescriptorProto
_OPT, _REP = F.LABEL_OPTIONAL, F.LABEL_REPEATED
_STR, _BOOL, _MSG, _ENUM = F.TYPE_STRING, F.TYPE_BOOL, F.TYPE_MESSAGE, F.TYPE_ENUM


def _field(msg, name, number, ftype, label=_OPT, type_name="", oneof=None):
    f = msg.field.add(name=name, number=number, type=ftype, label=label)
    if type_name:
        f.type_name = type_name
    if oneof is not None:
        f.oneof_index = oneof
    return f


def _stats_file():
    fd = descriptor_pb2.FileDescriptorProto(name="pyproxy/istio/stats/config.proto", package="stats",
                                            syntax="proto3")
    fd.dependency.append("google/protobuf/duration.proto")
    mc = fd.message_type.add(name="MetricConfig")
    entry = mc.nested_type.add(name="DimensionsEntry")
    entry.options.map_entry = True
    _field(entry, "key", 1, _STR)
    _field(entry, "value", 2, _STR)
    _field(mc, "dimensions", 1, _MSG, _REP, ".stats.MetricConfig.DimensionsEntry")
    _field(mc, "name", 2, _STR)
    _field(mc, "tags_to_remove", 3, _STR, _REP)
    _field(mc, "match", 4, _STR)
    _field(mc, "drop", 5, _BOOL)
    mt = fd.enum_type.add(name="MetricType")
    for i, n in enumerate(("COUNTER", "GAUGE", "HISTOGRAM")):
        mt.value.add(name=n, number=i)
    rp = fd.enum_type.add(name="Reporter")
    for i, n in enumerate(("UNSPECIFIED", "SERVER_GATEWAY")):
        rp.value.add(name=n, number=i)
    md = fd.message_type.add(name="MetricDefinition")
    _field(md, "name", 1, _STR)
    _field(md, "value", 2, _STR)
    _field(md, "type", 3, _ENUM, type_name=".stats.MetricType")
    pc = fd.message_type.add(name="PluginConfig")
    for n in (1, 2, 3, 4, 5):
        pc.reserved_range.add(start=n, end=n + 1)
    _field(pc, "disable_host_header_fallback", 6, _BOOL)
    _field(pc, "tcp_reporting_duration", 7, _MSG, type_name=".google.protobuf.Duration")
    _field(pc, "metrics", 8, _MSG, _REP, ".stats.MetricConfig")
    _field(pc, "definitions", 9, _MSG, _REP, ".stats.MetricDefinition")
    _field(pc, "reporter", 10, _ENUM, type_name=".stats.Reporter")
    _field(pc, "rotation_interval", 11, _MSG, type_name=".google.protobuf.Duration")
    _field(pc, "graceful_deletion_interval", 12, _MSG, type_name=".google.protobuf.Duration")
    return fd


def _peer_metadata_file():
    p = ".io.istio.http.peer_metadata.Config."
    fd = descriptor_pb2.FileDescriptorProto(name="pyproxy/istio/http/peer_metadata/config.proto",
                                            package="io.istio.http.peer_metadata", syntax="proto3")
    c = fd.message_type.add(name="Config")
    c.nested_type.add(name="Baggage")
    c.nested_type.add(name="WorkloadDiscovery")
    ih = c.nested_type.add(name="IstioHeaders")
    _field(ih, "skip_external_clusters", 1, _BOOL)
    ufs = c.nested_type.add(name="UpstreamFilterState")
    _field(ufs, "peer_metadata_key", 1, _STR)
    dm = c.nested_type.add(name="DiscoveryMethod")
    dm.oneof_decl.add(name="method_specifier")
    _field(dm, "baggage", 1, _MSG, type_name=p + "Baggage", oneof=0)
    _field(dm, "workload_discovery", 2, _MSG, type_name=p + "WorkloadDiscovery", oneof=0)
    _field(dm, "istio_headers", 3, _MSG, type_name=p + "IstioHeaders", oneof=0)
    _field(dm, "upstream_filter_state", 4, _MSG, type_name=p + "UpstreamFilterState", oneof=0)
    pm = c.nested_type.add(name="PropagationMethod")
    pm.oneof_decl.add(name="method_specifier")
    _field(pm, "istio_headers", 1, _MSG, type_name=p + "IstioHeaders", oneof=0)
    _field(pm, "baggage", 2, _MSG, type_name=p + "Baggage", oneof=0)
    _field(c, "downstream_discovery", 1, _MSG, _REP, p + "DiscoveryMethod")
    _field(c, "upstream_discovery", 2, _MSG, _REP, p + "DiscoveryMethod")
    _field(c, "downstream_propagation", 3, _MSG, _REP, p + "PropagationMethod")
    _field(c, "upstream_propagation", 4, _MSG, _REP, p + "PropagationMethod")
    _field(c, "shared_with_upstream", 5, _BOOL)
    _field(c, "additional_labels", 6, _STR, _REP)
    return fd


def _tcp_mx_file():
    fd = descriptor_pb2.FileDescriptorProto(name="pyproxy/istio/tcp/metadataexchange/config.proto",
                                            package="envoy.tcp.metadataexchange.config", syntax="proto3")
    m = fd.message_type.add(name="MetadataExchange")
    _field(m, "protocol", 1, _STR)
    _field(m, "enable_discovery", 2, _BOOL)
    _field(m, "additional_labels", 3, _STR, _REP)
    return fd


def _alpn_file():
    # istio/proxy source/extensions/filters/http/alpn/config.proto
    p = ".istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig."
    fd = descriptor_pb2.FileDescriptorProto(name="pyproxy/istio/http/alpn/config.proto",
                                            package="istio.envoy.config.filter.http.alpn.v2alpha1",
                                            syntax="proto3")
    c = fd.message_type.add(name="FilterConfig")
    e = c.enum_type.add(name="Protocol")
    for i, n in enumerate(("HTTP10", "HTTP11", "HTTP2")):
        e.value.add(name=n, number=i)
    ao = c.nested_type.add(name="AlpnOverride")
    _field(ao, "upstream_protocol", 1, _ENUM, type_name=p + "Protocol")
    _field(ao, "alpn_override", 2, _STR, _REP)
    _field(c, "alpn_override", 1, _MSG, _REP, p + "AlpnOverride")
    return fd


def _authn_file():
    # the legacy istio_authn network filter (istio/proxy c0655e150^): {"shared": bool}
    fd = descriptor_pb2.FileDescriptorProto(name="pyproxy/istio/network/authn/config.proto",
                                            package="io.istio.network.authn", syntax="proto3")
    c = fd.message_type.add(name="Config")
    _field(c, "shared", 1, _BOOL)
    return fd


TYPES = ("stats.PluginConfig", "io.istio.http.peer_metadata.Config",
         "envoy.tcp.metadataexchange.config.MetadataExchange",
         "istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig", "io.istio.network.authn.Config")
CLASSES: dict = {}


def _register() -> None:
    pool = descriptor_pool.Default()
    for build in (_stats_file, _peer_metadata_file, _tcp_mx_file, _alpn_file, _authn_file):
        fd = build()
        try:
            pool.FindFileByName(fd.name)
        except KeyError:
            pool.Add(fd)
    for t in TYPES:
        d = pool.FindMessageTypeByName(t)
        if _get_class is not None:
            CLASSES[t] = _get_class(d)
        else:  # pragma: no cover - older protobuf
            from google.protobuf import reflection
            CLASSES[t] = reflection.message_factory.MessageFactory(pool).GetPrototype(d)


_register()
