"""Compile an ``envoy.config.listener.v3.Listener`` into an immutable runtime listener.

A ``CompiledListener`` holds its filter chains (each with network filter factories built once) and
listener filter factories. Connections keep a reference to the compiled listener and chain they were
accepted with, so an update never changes a live connection's behaviour.
"""

from __future__ import annotations

import ipaddress
import logging
import time

from envoy.config.listener.v3 import listener_pb2

from ..config import ConfigError, duration_s, u32
from ..config.registry import REGISTRY
from ..netaddr import cidr_range
from ..transport import build_transport_socket

log = logging.getLogger("pyproxy.config")

# The sidecar's listener filters. pyproxy/extensions.py is the table of record; these entries are
# added only if it does not list them (yet), so both places always point at the same modules.
_LISTENER_FILTERS = (
    ("envoy.extensions.filters.listener.original_dst.v3.OriginalDst",
     "pyproxy.filters.listener.original_dst:factory", ("envoy.filters.listener.original_dst",)),
    ("envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector",
     "pyproxy.filters.listener.tls_inspector:factory", ("envoy.filters.listener.tls_inspector",)),
    ("envoy.extensions.filters.listener.http_inspector.v3.HttpInspector",
     "pyproxy.filters.listener.http_inspector:factory", ("envoy.filters.listener.http_inspector",)),
)
for _t, _f, _n in _LISTENER_FILTERS:
    if REGISTRY.type_for_name("listener_filter", _n[0]) is None:
        REGISTRY.register("listener_filter", _t, _f, names=_n)


class ChainMatch:
    """A FilterChainMatch with networks parsed once."""

    __slots__ = ("destination_port", "prefix_ranges", "direct_source_prefix_ranges", "source_type",
                 "source_prefix_ranges", "source_ports", "server_names", "transport_protocol",
                 "application_protocols")

    def __init__(self, m):
        self.destination_port = u32(m, "destination_port", None)
        self.prefix_ranges = tuple(cidr_range(r, "prefix_ranges") for r in m.prefix_ranges)
        self.direct_source_prefix_ranges = tuple(
            cidr_range(r, "direct_source_prefix_ranges") for r in m.direct_source_prefix_ranges)
        self.source_type = m.source_type
        self.source_prefix_ranges = tuple(cidr_range(r, "source_prefix_ranges") for r in m.source_prefix_ranges)
        self.source_ports = frozenset(m.source_ports)
        self.server_names = tuple(s.lower() for s in m.server_names)
        self.transport_protocol = m.transport_protocol
        self.application_protocols = tuple(m.application_protocols)

    def key(self):
        return (self.destination_port, self.prefix_ranges, self.direct_source_prefix_ranges,
                self.source_type, self.source_prefix_ranges, tuple(sorted(self.source_ports)),
                self.server_names, self.transport_protocol, self.application_protocols)


class FilterChain:
    __slots__ = ("name", "match", "filter_factories", "transport_socket", "proto", "is_default",
                 "skipped")

    def __init__(self, proto, ctx, listener_name: str, is_default: bool = False):
        self.proto = proto
        self.name = proto.name
        self.is_default = is_default
        self.match = ChainMatch(proto.filter_chain_match)
        self.skipped = []
        self.transport_socket = build_transport_socket(
            proto.transport_socket if proto.HasField("transport_socket") else None, "transport_socket")
        factories = []
        n = len(proto.filters)
        for i, f in enumerate(proto.filters):
            tc = f.typed_config if f.HasField("typed_config") else None
            try:
                factory, cfg = REGISTRY.resolve("network_filter", f.name, tc, what="network filter")
            except ConfigError as e:
                raise e.within(field="filters[%d]" % i)
            if factory is None:
                self.skipped.append((f.name, cfg))
                continue
            try:
                built = factory(cfg, ctx, terminal=(i == n - 1))
            except ConfigError as e:
                raise e.within(field="filters[%d](%s)" % (i, f.name))
            skip = getattr(built, "skip_reason", None)
            if skip:
                self.skipped.append((f.name, skip))
                continue
            factories.append(built)
        if not factories:
            raise ConfigError("filter chain '%s' has no usable network filter" % self.name, field="filters")
        self.filter_factories = tuple(factories)


class ListenerFilter:
    __slots__ = ("name", "factory", "disabled")

    def __init__(self, name, factory, disabled=None):
        self.name = name
        self.factory = factory
        self.disabled = disabled  # None, or (ConnInfo) -> bool: skip this filter for the connection


def compile_predicate(p, field="filter_disabled"):
    """A ``ListenerFilterChainMatchPredicate`` as a function of the connection's ConnInfo."""
    which = p.WhichOneof("rule")
    if which == "any_match":
        if not p.any_match:
            raise ConfigError("any_match must be true", field=field)
        return lambda info: True
    if which == "destination_port_range":
        lo, hi = p.destination_port_range.start, p.destination_port_range.end
        if hi <= lo:
            raise ConfigError("destination_port_range: end must be greater than start", field=field)
        return lambda info: lo <= info.dst_port < hi
    if which == "not_match":
        inner = compile_predicate(p.not_match, field + ".not_match")
        return lambda info: not inner(info)
    if which in ("or_match", "and_match"):
        rules = getattr(p, which).rules
        if len(rules) < 2:
            raise ConfigError("%s needs at least 2 rules" % which, field=field)
        fs = tuple(compile_predicate(r, "%s.%s.rules[%d]" % (field, which, i)) for i, r in enumerate(rules))
        if which == "or_match":
            return lambda info: any(f(info) for f in fs)
        return lambda info: all(f(info) for f in fs)
    raise ConfigError("empty listener filter match predicate", field=field)


class CompiledListener:
    def __init__(self, proto: listener_pb2.Listener, ctx, *, added_via_api: bool = False,
                 version_info: str = ""):
        self.proto = proto
        self.name = proto.name
        self.added_via_api = added_via_api
        self.version_info = version_info
        self.last_updated = time.time()
        if not self.name:
            if added_via_api:
                raise ConfigError("listener name must not be empty", field="name")
            # Envoy names unnamed static listeners itself
            import uuid
            self.name = str(uuid.uuid4())
        addr = proto.address
        if addr.HasField("pipe"):
            self.family = "unix"
            self.host, self.port = addr.pipe.path, 0
        elif addr.HasField("socket_address"):
            sa = addr.socket_address
            if sa.protocol != 0:
                raise ConfigError("only TCP listeners are supported", field="address.socket_address.protocol")
            if sa.named_port or sa.resolver_name:
                raise ConfigError("named ports and custom resolvers are not supported", field="address")
            try:
                ipaddress.ip_address(sa.address)
            except ValueError:
                raise ConfigError("malformed IP address: %s" % sa.address, field="address.socket_address.address") from None
            self.family = "ip"
            self.host, self.port = sa.address, sa.port_value
        elif addr.HasField("envoy_internal_address"):
            self.family = "internal"
            self.host, self.port = addr.envoy_internal_address.server_listener_name, 0
        elif proto.HasField("internal_listener"):
            # Envoy internal listeners (HBONE) are reachable only from inside the proxy; pyproxy
            # compiles them but does not route to them yet
            self.family = "internal"
            self.host, self.port = self.name, 0
        else:
            raise ConfigError("listener has no address", field="address")
        self.bind_to_port = proto.bind_to_port.value if proto.HasField("bind_to_port") else True
        self.use_original_dst = proto.use_original_dst.value if proto.HasField("use_original_dst") else False
        self.buffer_limit = u32(proto, "per_connection_buffer_limit_bytes", 1024 * 1024) or 1024 * 1024
        self.inbound = proto.traffic_direction == 1  # core.v3.TrafficDirection.INBOUND
        self.filters_timeout = duration_s(proto, "listener_filters_timeout", 15.0)
        self.continue_on_filters_timeout = proto.continue_on_listener_filters_timeout
        self.reuse_port = proto.enable_reuse_port.value if proto.HasField("enable_reuse_port") else True
        self.stat_prefix = proto.stat_prefix or _listener_stat_name(self)
        ctx.listener = self
        self.listener_filters = []
        self.skipped = []
        for i, lf in enumerate(proto.listener_filters):
            tc = lf.typed_config if lf.HasField("typed_config") else None
            try:
                factory, cfg = REGISTRY.resolve("listener_filter", lf.name, tc,
                                                is_optional=False, what="listener filter")
            except ConfigError as e:
                raise e.within(field="listener_filters[%d]" % i)
            if factory is None:
                self.skipped.append((lf.name, cfg))
                continue
            disabled = None
            if lf.HasField("filter_disabled"):
                disabled = compile_predicate(lf.filter_disabled, "listener_filters[%d].filter_disabled" % i)
            self.listener_filters.append(ListenerFilter(lf.name, factory(cfg, ctx), disabled))
        # use_original_dst hands connections to the listener of their original destination (Envoy
        # adds an implicit original_dst filter first). An explicit original_dst listener filter only
        # restores the destination for chain matching (virtualInbound): no hand-off.
        self.chains = []
        seen = {}
        for i, fc in enumerate(proto.filter_chains):
            try:
                chain = FilterChain(fc, ctx, self.name)
            except ConfigError as e:
                raise e.within(field="filter_chains[%d]%s" % (i, "(%s)" % fc.name if fc.name else ""))
            k = chain.match.key()
            if k in seen and not proto.HasField("filter_chain_matcher"):
                raise ConfigError("multiple filter chains with the same matching rules are defined",
                                  field="filter_chains[%d]" % i)
            seen[k] = chain
            self.chains.append(chain)
        if proto.HasField("filter_chain_matcher"):
            from .matcher import compile_chain_matcher
            self.chain_matcher = compile_chain_matcher(proto.filter_chain_matcher,
                                                       {c.name: c for c in self.chains}, self.name)
        else:
            self.chain_matcher = None
        self.default_chain = None
        if proto.HasField("default_filter_chain"):
            try:
                self.default_chain = FilterChain(proto.default_filter_chain, ctx, self.name, is_default=True)
            except ConfigError as e:
                raise e.within(field="default_filter_chain")
        if not self.chains and self.default_chain is None and self.family != "internal":
            raise ConfigError("no filter chains specified", field="filter_chains")
        self.access_logs = []
        if proto.access_log:
            from ..access_log import build_access_logs
            self.access_logs = build_access_logs(proto.access_log)
        self.needs_inspection = any(getattr(lf.factory, "needs_data", False) for lf in self.listener_filters)

    def address_str(self) -> str:
        if self.family == "ip":
            return ("[%s]:%d" % (self.host, self.port)) if ":" in self.host else ("%s:%d" % (self.host, self.port))
        return self.host


def _listener_stat_name(l) -> str:
    if l.family == "ip":
        if ":" in l.host:
            return "[%s]_%d" % (l.host, l.port)
        return "%s_%d" % (l.host, l.port)
    return l.host
