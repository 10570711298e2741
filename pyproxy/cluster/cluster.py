"""A compiled upstream cluster: hosts, load balancer, pools, circuit breakers and stats.

Built from an ``envoy.config.cluster.v3.Cluster`` proto. The host set changes (DNS, EDS) by building
a new ``PrioritySet`` and load balancer and swapping them in; ``Host`` objects whose address did not
change are kept, so their pools and counters survive.
"""

from __future__ import annotations

import logging
import time
import weakref

from envoy.config.cluster.v3 import cluster_pb2

from ..config import ConfigError, duration_s, u32
from ..config import unacted
from ..config.registry import REGISTRY
from ..transport import build_transport_socket
from .breaker_stats import breaker_gauges
from .code_stats import make_external, rq_class
from .endpoints import build_priority_set, diff_hosts
from .host import FAILED_ACTIVE_HC, FAILED_EDS_HEALTH, PENDING_DYNAMIC_REMOVAL, Host, PrioritySet, membership_counts
from .lb import create_lb
from .health_check import HealthChecker
from .outlier import CONNECT_FAILED, CONNECT_SUCCESS, TIMEOUT, Detector, put_response
from .pool import Http1Pool, tcp_keepalive
from .status import cluster_status

log = logging.getLogger("pyproxy.upstream")
cfglog = logging.getLogger("pyproxy.config")

_DT = cluster_pb2.Cluster.DiscoveryType
STATIC, STRICT_DNS, LOGICAL_DNS, EDS, ORIGINAL_DST = (
    _DT.STATIC, _DT.STRICT_DNS, _DT.LOGICAL_DNS, _DT.EDS, _DT.ORIGINAL_DST)
TYPE_NAMES = {v: k for k, v in _DT.items()}

HTTP1, HTTP2, USE_DOWNSTREAM, AUTO = "http1", "http2", "downstream", "auto"


class ProtocolOptions:
    """What ``HttpProtocolOptions`` (or the legacy cluster fields) say about upstream HTTP."""

    __slots__ = ("protocol", "idle_timeout", "max_requests_per_connection", "http2_options",
                 "max_stream_duration", "max_headers_count", "trailers")

    def __init__(self):
        self.protocol = HTTP1
        self.idle_timeout = 3600.0
        self.max_requests_per_connection = 0
        self.http2_options = None
        self.max_stream_duration = None
        self.max_headers_count = 100  # (Envoy's default, for upstream response heads too)


def _protocol_options(proto) -> ProtocolOptions:
    po = ProtocolOptions()
    po.trailers = proto.http_protocol_options.enable_trailers  # (HTTP/1.1 upstream, both ways; legacy field first)
    if proto.HasField("http2_protocol_options"):
        po.protocol = HTTP2
        po.http2_options = proto.http2_protocol_options
    if proto.protocol_selection == cluster_pb2.Cluster.USE_DOWNSTREAM_PROTOCOL:
        po.protocol = USE_DOWNSTREAM
    if proto.HasField("common_http_protocol_options"):
        c = proto.common_http_protocol_options
        po.idle_timeout = duration_s(c, "idle_timeout", po.idle_timeout)
        po.max_requests_per_connection = u32(c, "max_requests_per_connection", 0)
        po.max_headers_count = u32(c, "max_headers_count", 0) or 100
    mr = u32(proto, "max_requests_per_connection", None)
    if mr is not None:
        po.max_requests_per_connection = mr
    for key, anyv in proto.typed_extension_protocol_options.items():
        factory, cfg = REGISTRY.resolve("upstream_protocol_options", key, anyv,
                                        what="typed_extension_protocol_options")
        if factory is not None:
            try:
                factory(cfg, po)
            except ConfigError as e:
                raise e.within(field="typed_extension_protocol_options[%s]" % key)
    return po


def _upstream_filters(proto, manager) -> tuple:
    """``filters``: upstream network filters, run by tcp_proxy on its upstream connections. Only
    Istio's metadata exchange exists (registry category ``upstream_network_filter``)."""
    out = []
    for i, f in enumerate(proto.filters):
        tc = f.typed_config if f.HasField("typed_config") else None
        try:
            factory, cfg = REGISTRY.resolve("upstream_network_filter", f.name, tc,
                                            what="upstream network filter")
            if factory is not None:
                out.append(factory(cfg, manager))
        except ConfigError as e:
            raise e.within(field="filters[%d](%s)" % (i, f.name))
    return tuple(out)


class Cluster:
    def __init__(self, proto: cluster_pb2.Cluster, manager, *, added_via_api: bool = False,
                 version_info: str = ""):
        self.proto = proto
        self.name = proto.name
        self.manager = manager
        self.loop = manager.loop
        self.added_via_api = added_via_api
        self.version_info = version_info
        self.last_updated = time.time()
        if not self.name:
            raise ConfigError("cluster name must not be empty", field="name")
        if proto.HasField("cluster_type"):
            raise ConfigError("custom cluster type '%s' is not supported" % proto.cluster_type.name,
                              field="cluster_type")
        self.type = proto.type
        if self.type not in (STATIC, STRICT_DNS, LOGICAL_DNS, EDS, ORIGINAL_DST):
            raise ConfigError("unsupported cluster type %s" % self.type, field="type")
        self.stat_name = proto.alt_stat_name or self.name
        unacted.warn("cluster", proto, self.name)  # fields accepted but not acted on: one table
        self.upstream_filters = _upstream_filters(proto, manager)
        self.connect_timeout = duration_s(proto, "connect_timeout", 5.0)
        self.buffer_limit = u32(proto, "per_connection_buffer_limit_bytes", 1024 * 1024) or 1024 * 1024
        po = _protocol_options(proto)
        self.protocol = po.protocol
        self.protocol_options = po
        self.idle_timeout = po.idle_timeout
        self.max_requests_per_connection = po.max_requests_per_connection
        self.transport_socket = build_transport_socket(
            proto.transport_socket if proto.HasField("transport_socket") else None, "transport_socket")
        # (criteria, factory): an endpoint whose transport_socket_match metadata has them uses it (Istio: mTLS)
        self.transport_socket_matches = []
        for i, m in enumerate(proto.transport_socket_matches):
            try:
                f = build_transport_socket(m.transport_socket, "transport_socket_matches")
            except ConfigError as e:
                raise e.within(field="transport_socket_matches[%d]" % i)
            from google.protobuf import json_format
            crit = json_format.MessageToDict(m.match) if m.HasField("match") else {}
            self.transport_socket_matches.append((crit, f))
        if self.protocol == AUTO:
            self._auto_alpn(proto)
        self.source_address = None
        if proto.HasField("upstream_bind_config"):
            self.source_address = proto.upstream_bind_config.source_address.address or None
        self.tcp_keepalive = tcp_keepalive(proto)
        self.max_connections = self.max_pending_requests = self.max_requests = 1024  # (breakers: DEFAULT's)
        self.max_retries = 3
        self.retry_budget = None  # (budget_percent, min_retry_concurrency): replaces max_retries
        # both priorities' thresholds as configured, for /clusters (requests use DEFAULT's)
        self.thresholds = {"default": (1024, 1024, 1024, 3), "high": (1024, 1024, 1024, 3)}
        for t in proto.circuit_breakers.thresholds:
            self.thresholds["high" if t.priority else "default"] = (
                u32(t, "max_connections", 1024), u32(t, "max_pending_requests", 1024),
                u32(t, "max_requests", 1024), u32(t, "max_retries", 3))
            if t.priority == 0:
                self.max_connections = u32(t, "max_connections", 1024)
                self.max_pending_requests = u32(t, "max_pending_requests", 1024)
                self.max_requests = u32(t, "max_requests", 1024)
                self.max_retries = u32(t, "max_retries", 3)
                if t.HasField("retry_budget"):
                    rb = t.retry_budget
                    pct = rb.budget_percent.value if rb.HasField("budget_percent") else 20.0
                    if not 0.0 <= pct <= 100.0:
                        raise ConfigError("budget_percent must be in [0, 100]",
                                          field="circuit_breakers.thresholds.retry_budget.budget_percent")
                    self.retry_budget = (pct, u32(rb, "min_retry_concurrency", 3))
        self.cx_total_active = 0
        self.pending_total = 0
        self.rq_active_total = 0  # the router's requests (pending, attached, in a retry's backoff)
        self.rq_attached = 0  # requests attached to a connection (Envoy's requests resource: max_requests)
        self.retries_active = 0
        self.retries_in_backoff = 0  # (not active requests, for the retry budget)
        self._init_stats()
        self.outlier = Detector(self, proto.outlier_detection) \
            if proto.HasField("outlier_detection") else None
        self.hc = HealthChecker(self, proto.health_checks) if len(proto.health_checks) else None
        self.merge_window = duration_s(proto.common_lb_config, "update_merge_window", 1.0) \
            if proto.HasField("common_lb_config") else 1.0
        self._last_lb_update = float("-inf")
        self._merge_timer = None
        self._started = False
        self.pools: dict = {}
        self.original_dst = self.type == ORIGINAL_DST
        # ORIGINAL_DST hosts (and their pools) not used for a cleanup_interval are dropped
        self.cleanup_interval = duration_s(proto, "cleanup_interval", 5.0) or 5.0
        self._odst_used: set = set()
        self._odst_timer = None
        self.original_dst_use_header = False
        if self.original_dst and proto.HasField("original_dst_lb_config"):
            self.original_dst_use_header = proto.original_dst_lb_config.use_http_header
        self._dns = None
        # (a health-checked cluster initializes once every host has had its first check)
        self.initialized = self.type == ORIGINAL_DST or (self.type == STATIC and self.hc is None)
        self.priority_set = PrioritySet([[]])
        self.lb = None
        if self.type == STATIC or (self.type in (STRICT_DNS, LOGICAL_DNS)):
            if proto.HasField("load_assignment"):
                try:
                    ps = build_priority_set(proto.load_assignment,
                                            resolve_hostnames=self.type != STATIC)
                except ConfigError as e:
                    raise e.within(field="load_assignment")
            else:
                ps = PrioritySet([[]])
            if self.type == STATIC:
                self._set_priority_set(ps)
            else:
                self._dns_template = proto.load_assignment
        elif self.type == EDS:
            cfg = proto.eds_cluster_config
            self.eds_service_name = cfg.service_name or self.name
        if self.lb is None:
            # validate the policy now even without hosts
            try:
                self.lb = create_lb(proto, self.priority_set)
            except ConfigError as e:
                raise e.within(field="lb_policy")
        self.on_initialized = []
        # SDS secrets of its TLS sockets are init targets too (Envoy: the cluster warms on them)
        self.secret_providers = tuple({id(p): p for f in [self.transport_socket] + [
            f for _, f in self.transport_socket_matches] for p in getattr(f, "secret_providers", ())}.values())
        if self.initialized and self.secret_providers:
            self.initialized = False
            self._mark_initialized()

    def _init_stats(self):
        s = self.manager.cluster_scope(self.stat_name)
        self.scope = s
        self.st_cx_total = s.counter("upstream_cx_total")
        self.st_cx_http1_total = s.counter("upstream_cx_http1_total")
        self.st_cx_http2_total = s.counter("upstream_cx_http2_total")
        self.st_cx_active = s.gauge("upstream_cx_active")
        self.st_cx_connect_fail = s.counter("upstream_cx_connect_fail")
        self.st_cx_connect_timeout = s.counter("upstream_cx_connect_timeout")
        self.st_cx_destroy = s.counter("upstream_cx_destroy")
        self.st_cx_destroy_local = s.counter("upstream_cx_destroy_local")
        self.st_cx_destroy_remote = s.counter("upstream_cx_destroy_remote")
        self.st_cx_destroy_active = s.counter("upstream_cx_destroy_with_active_rq")
        self.st_cx_destroy_local_active = s.counter("upstream_cx_destroy_local_with_active_rq")
        self.st_cx_destroy_remote_active = s.counter("upstream_cx_destroy_remote_with_active_rq")
        self.st_cx_overflow = s.counter("upstream_cx_overflow")
        self.st_cx_max_rq = s.counter("upstream_cx_max_requests")
        self.st_cx_idle = s.counter("upstream_cx_idle_timeout")
        self.st_cx_none_healthy = s.counter("upstream_cx_none_healthy")
        self.st_cx_protocol_error = s.counter("upstream_cx_protocol_error")
        self.st_cx_rx_bytes = s.counter("upstream_cx_rx_bytes_total")
        self.st_cx_tx_bytes = s.counter("upstream_cx_tx_bytes_total")
        self.st_rq_total = s.counter("upstream_rq_total")
        self.st_rq_active = s.gauge("upstream_rq_active")
        self.st_rq_pending_total = s.counter("upstream_rq_pending_total")
        self.st_rq_pending_active = s.gauge("upstream_rq_pending_active")
        self.st_pending_overflow = s.counter("upstream_rq_pending_overflow")
        self.st_rq_active_overflow = s.counter("upstream_rq_active_overflow")
        self.st_pending_failure_eject = s.counter("upstream_rq_pending_failure_eject")
        self.st_rq_completed = s.counter("upstream_rq_completed")
        self.st_rq_timeout = s.counter("upstream_rq_timeout")
        self.st_rq_per_try_timeout = s.counter("upstream_rq_per_try_timeout")
        self.st_rq_per_try_idle_timeout = s.counter("upstream_rq_per_try_idle_timeout")
        self.st_rq_retry = s.counter("upstream_rq_retry")
        self.st_rq_retry_success = s.counter("upstream_rq_retry_success")
        self.st_rq_retry_overflow = s.counter("upstream_rq_retry_overflow")
        self.st_rq_retry_limit_exceeded = s.counter("upstream_rq_retry_limit_exceeded")
        self.st_rq_retry_backoff_exponential = s.counter("upstream_rq_retry_backoff_exponential")
        self.st_rq_retry_backoff_ratelimited = s.counter("upstream_rq_retry_backoff_ratelimited")
        self.st_retry_or_shadow_abandoned = s.counter("retry_or_shadow_abandoned")
        self.st_rq_rx_reset = s.counter("upstream_rq_rx_reset")
        self.st_rq_tx_reset = s.counter("upstream_rq_tx_reset")
        self.st_rq_time = s.histogram("upstream_rq_time")
        self.st_membership_total = s.gauge("membership_total", accumulate=False)
        self.st_membership = [s.gauge("membership_" + n, accumulate=False) for n in ("healthy", "degraded", "excluded")]
        self.st_membership_change = s.counter("membership_change")
        self.st_lb_healthy_panic = s.counter("lb_healthy_panic")
        self.st_rq_class = {}  # (upstream_rq_<N>xx, made with the first response of that class, as Envoy's)
        self.st_rq_codes: dict = {}  # status -> (upstream_rq_<status>, its class counter or None)
        breaker_gauges(self, s)  # (circuit_breakers.<priority>.*_open, read when shown)

    def count_cx_destroy(self, remote: bool, active: bool) -> None:
        """An upstream connection is gone (``remote``: the upstream closed it; ``active``: with
        requests on it), as Envoy's pool reports it."""
        self.st_cx_destroy.value += 1
        (self.st_cx_destroy_remote if remote else self.st_cx_destroy_local).value += 1
        if active:
            self.st_cx_destroy_active.value += 1
            (self.st_cx_destroy_remote_active if remote else self.st_cx_destroy_local_active).value += 1

    def count_response(self, status: int, host=None, headers=None) -> None:
        """An upstream response head (``host``: where it came from, for outlier detection;
        ``headers``: its headers, so that a gRPC trailers-only answer counts as its
        ``grpc-status`` mapped to HTTP, as Envoy's router reports it)."""
        if host is not None:
            if status >= 500:  # (Envoy's chargeUpstreamCode: the host's rq_error / rq_success)
                host.rq_error += 1
            else:
                host.rq_success += 1
            if host.outlier is not None:
                put_response(host, status, headers)
        cs = self.st_rq_codes.get(status)
        if cs is None:
            # (upstream_rq_<code> and its class's upstream_rq_<N>xx, if any: made at the first such response)
            cs = self.st_rq_codes[status] = (self.scope.counter("upstream_rq_%d" % status),
                                            rq_class(self, status // 100))
            make_external(self, status, cs)  # (cluster/code_stats.py)
        cs[0].value += 1
        k = cs[1]
        if k is not None:
            k.value += 1
        self.st_rq_completed.value += 1

    # -- results of requests (outlier detection) -------------------------------------------------
    @staticmethod
    def report_timeout(host) -> None:
        """A per-try or route timeout of a request sent to ``host`` (router)."""
        m = host.outlier if host is not None else None
        if m is not None:
            m.put_result(TIMEOUT, 504)

    @staticmethod
    def report_connect_failure(host) -> None:
        """A request's connection attempt failed, or its connection was lost (pools)."""
        m = host.outlier
        if m is not None:
            m.put_result(CONNECT_FAILED)

    @staticmethod
    def report_connect_success(host) -> None:
        m = host.outlier
        if m is not None:
            m.put_result(CONNECT_SUCCESS)

    def hosts_health_changed(self) -> None:
        """A host's health flags changed (outlier ejection, active health check): the balancer
        is rebuilt from the same hosts. As Envoy's cluster manager does with such updates, one
        that comes within ``common_lb_config.update_merge_window`` (default 1 s, 0 = never merge)
        of the last applied update waits for the window (changes meanwhile merge into it)."""
        if not self.initialized:  # (Envoy: no host-set updates while the cluster initializes)
            self.lb.update()  # (the initial round's results count in membership_healthy, as Envoy's)
            self._membership_gauges(self.priority_set.all_hosts)
            return
        w = self.merge_window
        if w and self.loop.time() - self._last_lb_update < w:
            if self._merge_timer is None:
                self._merge_timer = self.loop.call_later(w, self._apply_health)
            return
        self._apply_health()

    def _apply_health(self) -> None:
        if self._merge_timer is not None:
            self._merge_timer.cancel()
            self._merge_timer = None
        self._last_lb_update = self.loop.time()
        self.lb.update()
        self._membership_gauges(self.priority_set.all_hosts)

    def _membership_gauges(self, hosts) -> None:
        for g, n in zip(self.st_membership, membership_counts(hosts)):
            g.set(n)

    # -- hosts ---------------------------------------------------------------------------------
    def _set_priority_set(self, ps: PrioritySet, from_eds: bool = True) -> None:
        upd = diff_hosts(self.priority_set if self.priority_set.all_hosts else None, ps)
        ps = upd.priority_set
        removed = upd.removed
        if self.hc is not None and self.type == EDS and from_eds:
            ps, removed = self._keep_pending_removal(ps, removed)
        self.priority_set = ps
        od = self.outlier
        if od is not None:
            od.add_hosts(upd.added)
            od.remove_hosts(removed)
        if self.hc is not None:
            self.hc.add_hosts(upd.added)
            self.hc.remove_hosts(removed)
        self.lb = create_lb(self.proto, ps, self.st_lb_healthy_panic, self.scope)
        if self._merge_timer is not None:  # (the new balancer has every flag as it is now)
            self._merge_timer.cancel()
            self._merge_timer = None
        if self.initialized and self._started:  # (the initial hosts are no update)
            self._last_lb_update = self.loop.time()
        keys = {h.key for h in ps.all_hosts}
        for h in removed:
            if h.key not in keys:
                p = self.pools.pop(h.key, None)
                if p is not None:
                    p.drain()
        ap = self.__dict__.get("alpn_pools")
        if ap and removed:  # (istio.alpn's pools of removed hosts go too)
            for k in [k for k in ap if k[0] not in keys]:
                ap.pop(k).drain()
        self.st_membership_total.set(len(ps.all_hosts))
        self._membership_gauges(ps.all_hosts)
        self.st_membership_change.inc()
        self._mark_initialized()

    def _keep_pending_removal(self, ps: PrioritySet, removed: list):
        """Envoy's rule for health-checked EDS clusters: a host EDS no longer lists stays, flagged
        ``pending_dynamic_removal``, while it passes its health checks (unless the cluster sets
        ``ignore_health_on_host_removal``); it goes when a check fails
        (``health_check_failed_pending_removal``). A host EDS lists again loses the flag."""
        for h in ps.all_hosts:
            if h.flags & PENDING_DYNAMIC_REMOVAL:
                h.clear_flag(PENDING_DYNAMIC_REMOVAL)
        if self.proto.ignore_health_on_host_removal or not removed:
            return ps, removed
        keep = [h for h in removed if not h.flags & (FAILED_ACTIVE_HC | FAILED_EDS_HEALTH)]
        if not keep:
            return ps, removed
        prios = [list(p) for p in ps.priorities]
        locs = [dict(d) for d in ps.localities]
        for h in keep:
            h.set_flag(PENDING_DYNAMIC_REMOVAL)
            while len(prios) <= h.priority:
                prios.append([])
                locs.append({})
            prios[h.priority].append(h)
            locs[h.priority].setdefault(h.locality, 0)
        kept = set(keep)
        return (PrioritySet(prios, locs, ps.overprovisioning_factor),
                [h for h in removed if h not in kept])

    def health_check_failed(self, host) -> None:
        """Active health checking marked ``host`` unhealthy: a host pending removal goes now."""
        if not host.flags & PENDING_DYNAMIC_REMOVAL:
            return
        ps = self.priority_set
        prios = [[h for h in p if h is not host] for p in ps.priorities]
        self._set_priority_set(PrioritySet(prios, [dict(d) for d in ps.localities],
                                           ps.overprovisioning_factor), from_eds=False)

    def _mark_initialized(self):
        hc = self.hc
        if hc is not None and not hc.initial_round_done():
            hc.on_initial_round = self._mark_initialized  # (when every host had its first check)
            return
        if not self.initialized:
            sp = getattr(self, "secret_providers", ())
            waiting = [p for p in sp if not p.ready] if sp else ()
            if waiting:
                if not getattr(self, "_secret_wait", False):
                    self._secret_wait = True
                    ref = weakref.ref(self)
                    for p in waiting:
                        p.waiters.append(lambda: (ref() is not None and ref()._mark_initialized()))
                return
            self.initialized = True
            cbs, self.on_initialized = self.on_initialized, []
            for cb in cbs:
                cb(self)

    def update_load_assignment(self, cla, ps: PrioritySet | None = None) -> None:
        """EDS: a new ClusterLoadAssignment for this cluster (validated before anything changes);
        ``ps``: its priority set, when the caller built it already."""
        if ps is None:
            ps = build_priority_set(cla)
        self._set_priority_set(ps)

    def initial_fetch_timed_out(self) -> None:
        self._mark_initialized()

    def start(self) -> None:
        """Begin background work (DNS resolution, outlier detection's interval timer)."""
        self._started = True
        if self.outlier is not None:
            self.outlier.start()
        if self.hc is not None:
            self.hc.start()
        if self.type in (STRICT_DNS, LOGICAL_DNS):
            from .dns import DnsRefresher
            self._dns = DnsRefresher(self.proto, self._on_dns_hosts)
            self._dns.start()
        if self.original_dst and self._odst_timer is None:
            self._odst_timer = self.loop.call_later(self.cleanup_interval, self._odst_cleanup)

    def _odst_cleanup(self) -> None:
        """Envoy's ORIGINAL_DST cleanup: a host no request used since the last pass goes, and its
        pool drains (idle connections close now, busy ones when their request ends)."""
        used, self._odst_used = self._odst_used, set()
        for key in [k for k in self.pools if k not in used]:
            self.pools.pop(key).drain()
        self._odst_timer = self.loop.call_later(self.cleanup_interval, self._odst_cleanup)

    def _on_dns_hosts(self, ps: PrioritySet) -> None:
        self._set_priority_set(ps)

    def choose_host(self, ctx) -> Host | None:
        return self.lb.choose(ctx)

    def original_dst_host(self, address: str, port: int) -> Host:
        key = ("[%s]:%d" % (address, port)) if ":" in address else ("%s:%d" % (address, port))
        self._odst_used.add(key)
        pool = self.pools.get(key)
        if pool is not None:
            return pool.host
        return Host(address, port)

    def transport_for(self, host: Host):
        """The transport socket factory for a host (``transport_socket_matches`` first)."""
        if self.transport_socket_matches:
            md = host.metadata.get("envoy.transport_socket_match") or {}
            for crit, f in self.transport_socket_matches:
                if all(md.get(k) == v for k, v in crit.items()):
                    return f
        return self.transport_socket

    def _auto_alpn(self, proto) -> None:
        """``auto_config``: with no TLS anywhere it is plain HTTP/1.1; TLS transport sockets that
        name no ALPN protocols offer ``h2, http/1.1`` (as Envoy sets them for auto clusters)."""
        factories = [self.transport_socket] + [f for _, f in self.transport_socket_matches]
        if not any(f.is_tls for f in factories):
            self.protocol = HTTP1
            return
        if self.transport_socket.is_tls and not getattr(self.transport_socket, "alpn", ()):
            self.transport_socket = _with_auto_alpn(proto.transport_socket, "transport_socket")
        for i, (crit, f) in enumerate(self.transport_socket_matches):
            if f.is_tls and not getattr(f, "alpn", ()):
                self.transport_socket_matches[i] = (crit, _with_auto_alpn(
                    proto.transport_socket_matches[i].transport_socket, "transport_socket_matches"))

    def http_pool(self, host: Host, downstream_h2: bool = False, alpn=None):
        if alpn:  # istio.alpn: TLS connections offering this list, in pools of their own
            return self._alpn_pool(host, downstream_h2, alpn)
        p = self.pools.get(host.key)
        if p is None:
            proto = self.protocol
            if proto == HTTP1:
                p = Http1Pool(self, host, self.loop)
            elif proto == AUTO:
                from .pool_auto import AutoProtocolPools
                p = AutoProtocolPools(self, host, self.loop)
            else:
                from .pool_h2 import DownstreamProtocolPools, Http2Pool
                cls = Http2Pool if proto == HTTP2 else DownstreamProtocolPools
                p = cls(self, host, self.loop)
            self.pools[host.key] = p
        if self.protocol == USE_DOWNSTREAM:
            return p.h2 if downstream_h2 else p.h1
        return p

    def _alpn_pool(self, host: Host, downstream_h2: bool, alpn: tuple):
        ts = self.transport_for(host)
        if not ts.is_tls or self.protocol not in (HTTP1, HTTP2, USE_DOWNSTREAM):
            return self.http_pool(host, downstream_h2)
        pools = self.__dict__.setdefault("alpn_pools", {})
        key = (host.key, alpn)
        p = pools.get(key)
        if p is None:
            h2 = self.protocol == HTTP2 or (self.protocol == USE_DOWNSTREAM and downstream_h2)
            if h2:
                from .pool_h2 import Http2Pool
                p = Http2Pool(self, host, self.loop)
            else:
                p = Http1Pool(self, host, self.loop)
            p.transport = ts.with_alpn(alpn)
            pools[key] = p
        return p

    def close(self) -> None:
        if self._odst_timer is not None:
            self._odst_timer.cancel()
            self._odst_timer = None
        if self._merge_timer is not None:
            self._merge_timer.cancel()
            self._merge_timer = None
        if self.outlier is not None:
            self.outlier.close()
        if self.hc is not None:
            self.hc.close()
        if self._dns is not None:
            self._dns.stop()
            self._dns = None
        for p in self.pools.values():
            p.drain()
        self.pools.clear()
        for p in self.__dict__.pop("alpn_pools", {}).values():  # (istio.alpn's pools)
            p.drain()

    # -- admin ---------------------------------------------------------------------------------
    def status(self) -> dict:
        """This cluster for the admin's ``/clusters`` (cluster/status.py)."""
        return cluster_status(self)



def _with_auto_alpn(ts_proto, what: str):
    """The TLS transport socket of an ``auto_config`` cluster, offering ``h2`` and ``http/1.1``."""
    from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
    ctx = tls_pb2.UpstreamTlsContext()
    if not ts_proto.typed_config.Unpack(ctx):
        return build_transport_socket(ts_proto, what)  # (a wrapped config: left as it is)
    ctx.common_tls_context.alpn_protocols[:] = ["h2", "http/1.1"]
    ts = type(ts_proto)()
    ts.CopyFrom(ts_proto)
    ts.typed_config.Pack(ctx)
    return build_transport_socket(ts, what)
