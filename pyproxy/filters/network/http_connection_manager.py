"""``envoy.filters.network.http_connection_manager``: config compiled once per listener update.

The runtime (codecs, streams, filter chain iteration) is in ``pyproxy.http.conn_manager``.
"""

from __future__ import annotations

import logging
import os

from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2

from ...config import ConfigError, duration_s, u32
from ...config.registry import REGISTRY
from ...tracing.provider import tracer_for_hcm, tracing_provider

log = logging.getLogger("pyproxy.config")
_warned: set = set()  # warning texts already logged

HCM = hcm_pb2.HttpConnectionManager
AUTO, HTTP1, HTTP2 = HCM.CodecType.AUTO, HCM.CodecType.HTTP1, HCM.CodecType.HTTP2


class StaticRoutes:
    """An inline ``route_config``: compiled once, never changes."""

    __slots__ = ("table", "name")

    def __init__(self, table):
        self.table = table
        self.name = table.name


class HttpFilterEntry:
    __slots__ = ("name", "factory", "is_router")

    def __init__(self, name, factory, is_router):
        self.name = name
        self.factory = factory
        self.is_router = is_router


class ChainPlan:
    """Which HTTP filters have anything to do, decided when the HCM's config loads.

    A filter factory may declare itself inert for a config:
    - ``inert_unless_route_config``: the per-route config names (``typed_per_filter_config`` keys)
      that would give it work; with none of them on the matched route (its own, its virtual host's,
      its route table's, its weighted clusters', all compiled into ``RouteEntry.filter_names``), it
      does nothing (an empty ``fault``, ``cors`` without a policy);
    - ``inert_unless_grpc``: it acts on gRPC requests only (``grpc_stats``).
    When the router (``RouterConfig``) is last and every other filter is inert in one of these
    ways, ``plannable`` is true: a request whose route and content type leave them all inert takes
    no filter object: the stream runs the router's first attempt (``http/first_attempt.py
    chain_is_inert``); any other request runs the whole configured chain filter by filter. Immutable; RDS tables need no re-planning, since the
    per-route part is read from the route the request matched.

    A filter factory may also carry ``compiled_hooks`` (telemetry: ``peer_metadata``,
    ``istio.alpn``, ``istio.stats``): the same work as its filter, done by the stream at fixed
    points of its first attempt instead of through a filter object, so it never makes a request
    run the filter chain. The hooks object has (each None or empty when unused):
    - ``on_request(stream, headers, cluster)``: once the route's cluster is chosen, before the
      route's request header mutations (it may edit ``headers``, write filter state, set
      ``stream.alpn``, the upstream ALPN list the stream passes to ``Cluster.http_pool``);
    - ``on_response(stream, headers)``: the response ``Headers``, after the route's response
      mutations, before the connection manager sends them;
    - ``response_take`` and ``on_response_raw(stream, taken)``: for a stream that writes the
      response head from the upstream's raw lines (http/h1_relay.py): the header names it holds back and
      hands over as ``(name, value)`` str pairs (``taken`` is None when there were none), called
      after ``x-envoy-upstream-service-time``; returns header lines to add (bytes) or None;
    - ``on_complete(stream)``: once, when a stream that ran its first attempt ends (after the filters'
      ``on_destroy`` and the access logs), with ``stream_info.end_monotonic`` set.
    The plan gathers them in chain order (``request_hooks``, ``response_hooks``, ``observers``,
    ``response_take``). On the filter chain (a request whose filters are not all inert, or
    ``PYPROXY_REFERENCE=1``) the filters run as filters and the hooks are not called."""

    __slots__ = ("plannable", "live_on_route", "live_on_grpc", "request_hooks", "response_hooks", "observers",
                 "response_take")

    def __init__(self, filters):
        route_keys = set()
        grpc = False
        hooks = []
        ok = bool(filters) and filters[-1].is_router and \
            type(filters[-1].factory).__name__ == "RouterConfig"
        for e in filters[:-1]:
            f = e.factory
            names = getattr(f, "inert_unless_route_config", None)
            if names is not None:
                route_keys.update(names)
            elif getattr(f, "inert_unless_grpc", False):
                grpc = True
            elif getattr(f, "compiled_hooks", None) is not None:
                hooks.append(f.compiled_hooks)
            else:
                ok = False
        self.plannable = ok
        self.live_on_route = frozenset(route_keys)
        self.live_on_grpc = grpc
        self.request_hooks = tuple(h.on_request for h in hooks if h.on_request is not None)
        self.response_hooks = tuple(h for h in hooks if h.on_response is not None)
        self.observers = tuple(h.on_complete for h in hooks if h.on_complete is not None)
        self.response_take = frozenset().union(*[h.response_take for h in hooks])


class HcmConfig:
    def __init__(self, cfg, ctx):
        from ...http.hcm_stats import HcmStats
        self.ctx = ctx
        self.loop = ctx.loop
        self.cluster_manager = ctx.cluster_manager
        self.proto = cfg
        if not cfg.stat_prefix:
            raise ConfigError("stat_prefix must not be empty", field="stat_prefix")
        self.stat_prefix = cfg.stat_prefix
        from ...config import unacted
        unacted.warn("http_connection_manager", cfg, cfg.stat_prefix)  # fields accepted, not acted on
        self.codec_type = cfg.codec_type
        if self.codec_type not in (AUTO, HTTP1, HTTP2):
            raise ConfigError("codec_type HTTP3 is not supported", field="codec_type")
        which = cfg.WhichOneof("route_specifier")
        if which == "route_config":
            from ...routing import compile_route_config
            try:
                self.routes = StaticRoutes(compile_route_config(cfg.route_config))
            except ConfigError as e:
                raise e.within(field="route_config")
            # validate_clusters (true by default for a static route_config): every cluster the
            # table names must exist now, as Envoy refuses the config otherwise
            if self.routes.table.validate_clusters is not False:
                missing = _unknown_cluster(self.routes.table, ctx.cluster_manager)
                if missing is not None:
                    raise ConfigError("route: unknown cluster '%s'" % missing, field="route_config")
        elif which == "rds":
            self.routes = ctx.route_provider(cfg.rds, cfg.stat_prefix)
        else:
            raise ConfigError("%s is not supported" % (which or "a route specifier"),
                              field="route_specifier")
        self.use_remote_address = cfg.use_remote_address.value if cfg.HasField("use_remote_address") else False
        self.xff_num_trusted_hops = cfg.xff_num_trusted_hops
        self.skip_xff_append = cfg.skip_xff_append
        self.via = cfg.via
        self.server_name = cfg.server_name or "envoy"
        self.server_transform = cfg.server_header_transformation  # 0 OVERWRITE, 1 APPEND_IF_ABSENT, 2 PASS_THROUGH
        self.generate_request_id = cfg.generate_request_id.value if cfg.HasField("generate_request_id") else True
        self.preserve_external_request_id = cfg.preserve_external_request_id
        self.always_set_request_id_in_response = cfg.always_set_request_id_in_response
        self.stream_idle_timeout = duration_s(cfg, "stream_idle_timeout", 300.0)
        self.request_timeout = duration_s(cfg, "request_timeout", 0.0)
        self.request_headers_timeout = duration_s(cfg, "request_headers_timeout", 0.0)
        self.drain_timeout = duration_s(cfg, "drain_timeout", 5.0)
        self.max_request_headers_kb = u32(cfg, "max_request_headers_kb", 60) or 60
        if self.max_request_headers_kb > 8192:
            raise ConfigError("max_request_headers_kb must be <= 8192", field="max_request_headers_kb")
        cho = cfg.common_http_protocol_options
        self.idle_timeout = duration_s(cho, "idle_timeout", 3600.0) if cfg.HasField("common_http_protocol_options") else 3600.0
        self.max_headers_count = u32(cho, "max_headers_count", 100) or 100
        self.max_stream_duration = duration_s(cho, "max_stream_duration", None)
        self.headers_with_underscores_action = cho.headers_with_underscores_action  # 0 ALLOW, 1 REJECT, 2 DROP
        # per downstream connection (http/conn_manager.py): after this many requests the last one's
        # response closes it (HTTP/1.1 connection: close; HTTP/2 GOAWAY); after this long it drains
        self.max_requests_per_connection = u32(cho, "max_requests_per_connection", 0) or 0
        self.max_connection_duration = duration_s(cho, "max_connection_duration", 0.0) or 0.0
        self.normalize_path = cfg.normalize_path.value if cfg.HasField("normalize_path") else False
        self.merge_slashes = cfg.merge_slashes
        self.path_with_escaped_slashes_action = cfg.path_with_escaped_slashes_action
        self.strip_any_host_port = cfg.strip_any_host_port
        self.strip_matching_host_port = cfg.strip_matching_host_port
        hpo = cfg.http_protocol_options
        self.accept_http_10 = hpo.accept_http_10
        # response trailers to an HTTP/1.1 client (else dropped, as Envoy's codec does); request trailers
        # from one are dropped either way (config/unacted.py)
        self.enable_trailers = hpo.enable_trailers
        self.default_host_for_http_10 = hpo.default_host_for_http_10
        self.http2_options = cfg.http2_protocol_options if cfg.HasField("http2_protocol_options") else None
        self.upgrades = {}
        for i, u in enumerate(cfg.upgrade_configs):
            if u.filters:
                raise ConfigError("upgrade filter chains are not supported", field="upgrade_configs[%d].filters" % i)
            self.upgrades[u.upgrade_type.lower()] = u.enabled.value if u.HasField("enabled") else True
        self.access_logs = []
        if cfg.access_log:
            from ...access_log import build_access_logs
            try:
                self.access_logs = build_access_logs(cfg.access_log)
            except ConfigError as e:
                raise e.within(field="access_log")
        # a Zipkin provider: B3 propagation and spans (pyproxy/tracing/zipkin.py), a filter in front
        self.tracer = tracer_for_hcm(cfg, ctx, self.stat_prefix)
        provider = tracing_provider(cfg, ctx)
        if provider is not None and self.tracer is None:
            # (a provider-less block, as Istio sends by default, is acted on: the x-request-id trace
            # decision in request_prep, pyproxy/tracing/request_id.py; without a tracer, no spans)
            msg = ("http_connection_manager '%s': tracing provider '%s' is not implemented: no spans are "
                   "produced (the x-request-id sampling decision is made)" % (self.stat_prefix, provider.name))
            if msg not in _warned and len(_warned) < 1000:  # once per HCM and provider (pushes repeat)
                _warned.add(msg)
                log.warning("%s", msg)
            else:
                log.info("%s", msg)  # (still seen by `pyproxy validate`)
        self.filters = []
        self.skipped_filters = []
        n = len(cfg.http_filters)
        if n == 0:
            raise ConfigError("http_filters must not be empty (the router filter is required)", field="http_filters")
        for i, f in enumerate(cfg.http_filters):
            tc = f.typed_config if f.HasField("typed_config") else None
            try:
                if f.HasField("config_discovery"):
                    if f.is_optional:
                        self.skipped_filters.append((f.name, "extension config discovery (ECDS) not supported"))
                        continue
                    raise ConfigError("extension config discovery (ECDS) is not supported")
                factory, fcfg = REGISTRY.resolve("http_filter", f.name, tc, is_optional=f.is_optional,
                                                 what="HTTP filter")
                if factory is None:
                    self.skipped_filters.append((f.name, fcfg))
                    continue
                built = factory(fcfg, ctx)
            except ConfigError as e:
                if f.is_optional:
                    log.warning("optional HTTP filter '%s' skipped: %s", f.name, e)
                    self.skipped_filters.append((f.name, str(e)))
                    continue
                raise e.within(field="http_filters[%d](%s)" % (i, f.name))
            skip = getattr(built, "skip_reason", None)
            if skip:
                self.skipped_filters.append((f.name, skip))
                continue
            is_router = getattr(built, "is_router", False)
            if is_router and i != n - 1:
                raise ConfigError("the router filter must be the last HTTP filter", field="http_filters[%d]" % i)
            if i == n - 1 and not is_router and not getattr(built, "is_terminal", False):
                raise ConfigError("the last HTTP filter must be a terminal filter (envoy.filters.http.router)",
                                  field="http_filters[%d](%s)" % (i, f.name))
            self.filters.append(HttpFilterEntry(f.name, built, is_router))
        if self.tracer is not None:
            self.filters.insert(0, HttpFilterEntry("envoy.tracers.zipkin", self.tracer, False))
        self.filters = tuple(self.filters)
        self.decoder_factories = tuple(e.factory for e in self.filters)
        # the chain plan: which filters have anything to do (see ChainPlan); a request whose
        # filters are all inert runs the router's first attempt in the stream (http/first_attempt.py)
        plan = self.plan = ChainPlan(self.filters)
        self.live_on_route = plan.live_on_route
        self.live_on_grpc = plan.live_on_grpc
        # telemetry filters' hooks on the compiled path (see ChainPlan)
        self.request_hooks = plan.request_hooks
        self.response_hooks = plan.response_hooks
        self.observers = plan.observers
        self.response_take_raw = frozenset(n.encode() for n in plan.response_take)
        self.chain_checks = bool(plan.live_on_route or plan.live_on_grpc)
        # PYPROXY_REFERENCE=1 is the plain filter-by-filter reference mode the differential
        # tests compare the compiled path with (no chain plan shortcuts, no byte relays)
        self.fast_router = plan.plannable and os.environ.get("PYPROXY_REFERENCE", "0") != "1"
        self.router_suppress_envoy_headers = bool(getattr(self.filters[-1].factory, "suppress_envoy_headers", False))
        # complete, bodiless requests of such a chain: a stream made by the manager's entry (http/conn_manager.py on_request)
        from ...http.conn_manager import hcm_serves_inline
        self.serve_inline = hcm_serves_inline(self)
        self.stats = HcmStats(ctx.stats, self.stat_prefix)
        # the request preparation every stream runs (XFF, XFCC, paths, internal headers...)
        from ...http.request_prep import PrepPlan
        try:
            self.prep = PrepPlan(cfg, self)
        except ConfigError as e:
            raise e
        from ...http.h1_relay import relay_edits
        self.relay_edits = relay_edits(self)  # (how the byte relay edits response heads)
        if self.http2_options is not None and self.codec_type != HTTP1:
            # validate explicit HTTP/2 options now (the h2 codec is imported only when configured)
            from ...http.http2 import server_options
            try:
                server_options(self)
            except ConfigError as e:
                raise e.within(field="http2_protocol_options")
        if self.routes is not None and hasattr(self.routes, "register_stats"):
            self.routes.register_stats(ctx.stats, self.stat_prefix)

    def create(self, conn):
        from ...http.conn_manager import HttpConnection
        return HttpConnection(self, conn)


def _unknown_cluster(table, cm):
    """The first cluster a route table names that the cluster manager does not have, or None."""
    if cm is None:
        return None
    validated = getattr(cm, "validated", None)  # (pyproxy validate: the clusters of the file)
    if validated is not None and not validated:
        return None
    for vh in table.virtual_hosts:
        for r in vh.routes:
            names = [r.cluster] if getattr(r, "cluster", "") else []
            names += [c.name for c in (getattr(r, "weighted", None) or ()) if c.name]
            names += [m.cluster for m in (getattr(r, "mirror_policies", None) or ()) if m.cluster]
            warming = getattr(cm, "warming", None) or {}
            for n in names:
                # (Envoy counts warming clusters too)
                if cm.get(n) is None and n not in warming and n not in (validated or ()):
                    return n
    return None


def factory(cfg, ctx, terminal=True):
    if not terminal:
        raise ConfigError("http_connection_manager must be the last network filter")
    return HcmConfig(cfg, ctx)
