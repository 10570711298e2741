"""``envoy.filters.http.fault``: inject delays and aborts (Istio's VirtualService ``fault``).

The filter-level ``HTTPFault`` applies unless the route carries its own under
``typed_per_filter_config["envoy.filters.http.fault"]`` (how Istio configures faults), which replaces
it. Order as in Envoy: match (``headers``, ``upstream_cluster``, ``downstream_nodes``) → delay (fixed or
from ``x-envoy-fault-delay-request`` when ``header_delay``) → abort (HTTP or gRPC status, or from
``x-envoy-fault-abort-request`` / ``-grpc-request`` when ``header_abort``). Percentages come from
``percentage`` (or the ``...-percentage`` request headers for header faults). Stats under
``http.<prefix>.fault.``: ``delays_injected``, ``aborts_injected``, ``faults_overflow``.
``response_rate_limit`` is accepted but not applied (reported as an ignored part).
"""

from __future__ import annotations

import logging

from envoy.extensions.filters.http.fault.v3 import fault_pb2  # noqa: F401 (registers the type)

from ...config import ConfigError, duration_s
from ...http.filter import CONTINUE, STOP, HttpFilter
from .util import HcmStats, PerRoute, fraction, hit

log = logging.getLogger("pyproxy.filter")

H_DELAY = "x-envoy-fault-delay-request"
H_DELAY_PCT = "x-envoy-fault-delay-request-percentage"
H_ABORT = "x-envoy-fault-abort-request"
H_ABORT_GRPC = "x-envoy-fault-abort-grpc-request"
H_ABORT_PCT = "x-envoy-fault-abort-request-percentage"
H_NODE = "x-envoy-downstream-service-node"


class FaultPolicy:
    """One compiled ``HTTPFault``."""

    __slots__ = ("delay_s", "delay_from_header", "delay_pct", "delay_denom", "abort_status",
                 "abort_grpc", "abort_from_header", "abort_pct", "abort_denom", "headers",
                 "upstream_cluster", "downstream_nodes", "max_active", "notes")

    def __init__(self, cfg, field: str = "HTTPFault"):
        from ...routing import compile_header_matcher
        self.notes = []
        self.delay_s = None
        self.delay_from_header = False
        self.delay_pct = 0.0
        self.delay_denom = 100
        if cfg.HasField("delay"):
            d = cfg.delay
            which = d.WhichOneof("fault_delay_secifier")
            if which == "fixed_delay":
                self.delay_s = duration_s(d, "fixed_delay", 0.0)
            elif which == "header_delay":
                self.delay_from_header = True
            else:
                raise ConfigError("delay needs fixed_delay or header_delay", field=field + ".delay")
            self.delay_pct = fraction(d.percentage, field + ".delay.percentage", 0.0) \
                if d.HasField("percentage") else 0.0
            self.delay_denom = _denom(d.percentage)
        self.abort_status = None
        self.abort_grpc = None
        self.abort_from_header = False
        self.abort_pct = 0.0
        self.abort_denom = 100
        if cfg.HasField("abort"):
            a = cfg.abort
            which = a.WhichOneof("error_type")
            if which == "http_status":
                if not 200 <= a.http_status < 600:
                    raise ConfigError("http_status must be in [200, 600)", field=field + ".abort.http_status")
                self.abort_status = a.http_status
            elif which == "grpc_status":
                self.abort_grpc = a.grpc_status
            elif which == "header_abort":
                self.abort_from_header = True
            else:
                raise ConfigError("abort needs http_status, grpc_status or header_abort", field=field + ".abort")
            self.abort_pct = fraction(a.percentage, field + ".abort.percentage", 0.0) \
                if a.HasField("percentage") else 0.0
            self.abort_denom = _denom(a.percentage)
        self.headers = tuple(compile_header_matcher(h, "%s.headers[%d]" % (field, i))
                             for i, h in enumerate(cfg.headers))
        self.upstream_cluster = cfg.upstream_cluster
        self.downstream_nodes = frozenset(cfg.downstream_nodes)
        self.max_active = cfg.max_active_faults.value if cfg.HasField("max_active_faults") else None
        if cfg.HasField("response_rate_limit"):
            self.notes.append("response_rate_limit is not applied")

    @property
    def empty(self) -> bool:
        return self.delay_s is None and not self.delay_from_header and self.abort_status is None \
            and self.abort_grpc is None and not self.abort_from_header


def _denom(fp) -> int:
    return {0: 100, 1: 10000, 2: 1000000}.get(fp.denominator, 100)


def _header_pct(headers, name, base_pct, denom):
    """Envoy: the header gives a numerator over the configured denominator, capped by the config."""
    v = headers.get(name)
    if v is None:
        return base_pct
    try:
        n = int(v)
    except ValueError:
        return base_pct
    return min(base_pct, max(0, n) / denom)


class FaultFactory:
    def __init__(self, cfg, ctx):
        self.policy = FaultPolicy(cfg)
        self.notes = list(self.policy.notes)
        self.per_route = PerRoute(("envoy.filters.http.fault", "envoy.fault"), _compile_per_route)
        # the HCM's chain plan: an empty filter-level fault does nothing unless a route configures one
        self.inert_unless_route_config = self.per_route.filter_names if self.policy.empty else None
        self.stats = HcmStats(ctx.stats, "fault.", ("delays_injected", "aborts_injected", "faults_overflow"))
        self.gauges = {}
        self.store = ctx.stats
        self.active = 0
        self.loop = ctx.loop

    def create(self, stream):
        return FaultFilter(stream, self)

    def active_gauge(self, stream):
        prefix = getattr(getattr(stream, "cfg", None), "stat_prefix", "") or "unknown"
        g = self.gauges.get(prefix)
        if g is None:
            g = self.gauges[prefix] = self.store.gauge("http.%s.fault.active_faults" % prefix)
        return g


def _compile_per_route(msg):
    if msg.DESCRIPTOR.full_name != "envoy.extensions.filters.http.fault.v3.HTTPFault":
        raise ConfigError("per-route fault config must be HTTPFault, got %s" % msg.DESCRIPTOR.full_name)
    return FaultPolicy(msg, "typed_per_filter_config")


class FaultFilter(HttpFilter):
    __slots__ = ("f", "timer", "policy", "counted", "pending_abort")

    def __init__(self, callbacks, f):
        self.callbacks = callbacks
        self.f = f
        self.timer = None
        self.policy = None
        self.counted = False
        self.pending_abort = None

    def decode_headers(self, headers, end_stream):
        f = self.f
        cb = self.callbacks
        p = f.per_route.lookup(cb) or f.policy
        if p.empty:
            return CONTINUE
        for m in p.headers:
            if not m.match(headers):
                return CONTINUE
        if p.upstream_cluster:
            r = cb.route
            if r is None or getattr(r, "cluster", None) != p.upstream_cluster:
                return CONTINUE
        if p.downstream_nodes and headers.get(H_NODE) not in p.downstream_nodes:
            return CONTINUE
        delay = None
        if p.delay_s is not None or p.delay_from_header:
            pct = p.delay_pct
            d = p.delay_s
            if p.delay_from_header:
                pct = _header_pct(headers, H_DELAY_PCT, pct, p.delay_denom)
                v = headers.get(H_DELAY)
                try:
                    d = int(v) / 1000.0 if v is not None else None
                except ValueError:
                    d = None
            if d is not None and d > 0 and hit(pct):
                delay = d
        abort = self._abort_decision(p, headers)
        if delay is None and abort is None:
            return CONTINUE
        if p.max_active is not None and f.active >= p.max_active:
            f.stats.get(cb)["faults_overflow"].inc()
            return CONTINUE
        self._count_active(True)
        if delay is not None:
            f.stats.get(cb)["delays_injected"].inc()
            cb.stream_info.response_flags.add("DI")
            self.pending_abort = abort
            self.timer = f.loop.call_later(delay, self._delay_done)
            return STOP
        self._abort(abort)
        return STOP

    def _abort_decision(self, p, headers):
        if p.abort_status is None and p.abort_grpc is None and not p.abort_from_header:
            return None
        pct = p.abort_pct
        status, grpc = p.abort_status, p.abort_grpc
        if p.abort_from_header:
            pct = _header_pct(headers, H_ABORT_PCT, pct, p.abort_denom)
            status = grpc = None
            v = headers.get(H_ABORT)
            if v is not None:
                try:
                    n = int(v)
                    if 200 <= n < 600:
                        status = n
                except ValueError:
                    pass
            g = headers.get(H_ABORT_GRPC)
            if status is None and g is not None:
                try:
                    grpc = int(g)
                except ValueError:
                    pass
            if status is None and grpc is None:
                return None
        if not hit(pct):
            return None
        return (status, grpc)

    def _delay_done(self):
        self.timer = None
        if self.pending_abort is not None:
            self._abort(self.pending_abort)
            return
        self._count_active(False)
        self.callbacks.continue_decoding()

    def _abort(self, abort):
        status, grpc = abort
        cb = self.callbacks
        self.f.stats.get(cb)["aborts_injected"].inc()
        self._count_active(False)
        if grpc is not None and status is None:
            cb.send_local_reply(200, "fault filter abort", "fault_filter_abort", flag="FI", grpc_status=grpc)
        else:
            cb.send_local_reply(status, "fault filter abort", "fault_filter_abort", flag="FI")

    def _count_active(self, up: bool):
        f = self.f
        if up and not self.counted:
            self.counted = True
            f.active += 1
            f.active_gauge(self.callbacks).inc()
        elif not up and self.counted:
            self.counted = False
            f.active -= 1
            f.active_gauge(self.callbacks).dec()

    def on_destroy(self):
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self._count_active(False)


def factory(cfg, ctx):
    return FaultFactory(cfg, ctx)
