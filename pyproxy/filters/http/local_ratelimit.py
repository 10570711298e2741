"""``envoy.filters.http.local_ratelimit``: a token bucket per filter config (or per route, or per
downstream connection) that answers over-limit requests locally; Istio users add it with an
EnvoyFilter.

As Envoy does it:

- a route's ``typed_per_filter_config`` entry (a ``LocalRateLimit``, which must have a
  ``token_bucket``) replaces the filter's config for that route, with its own bucket and stats; a
  virtual host's entry is one bucket for all its routes. Such entries are checked when the routes
  load (``check_per_route``: a bad one rejects the route configuration, as in Envoy); the bucket
  itself is made when the first request uses it (the filter, not the route table, owns it);
- ``filter_enabled`` decides (as a fraction of requests) whether the filter looks at a request at
  all, ``filter_enforced`` whether an over-limit request is refused; unset means 0 %;
- refused: ``status`` (429 unless a code >= 400 is set), body ``local_rate_limited``, response
  flag ``RL``, ``response_headers_to_add`` on the reply; gRPC requests get grpc-status 14, or 8 with
  ``rate_limited_as_resource_exhausted``;
- over limit but not enforced: ``request_headers_to_add_when_not_enforced`` go upstream;
- ``enable_x_ratelimit_headers: DRAFT_VERSION_03`` adds ``x-ratelimit-limit|remaining|reset``;
- ``local_rate_limit_per_downstream_connection``: one bucket per downstream connection;
- stats ``<stat_prefix>.http_local_rate_limit.enabled|ok|rate_limited|enforced|shadow_mode``.

- ``descriptors``: the request's descriptors come from the filter's own ``rate_limits`` or else
  the route's (``stage`` as configured; the virtual host's by ``vh_rate_limits`` or the route's
  ``include_vh_rate_limits``); each descriptor that equals a configured one takes a token from its
  bucket, tightest bucket first; a configured value left empty is a wildcard with one bucket per
  distinct value (the ``max_dynamic_descriptors`` most recent, default 20); the filter's bucket is
  used when none matched, or also (``always_consume_default_token_bucket``, default true).
  Actions: ``destination_cluster``, ``request_headers``, ``query_parameters``,
  ``remote_address``, ``generic_key``, ``header_value_match``; any other is rejected in the
  filter's ``rate_limits``, and a route's policy with one makes no descriptor (logged once).

The bucket refills continuously (``filters/token_bucket.py``). ``local_cluster_rate_limit`` and
per-connection buckets together with descriptors are rejected. The runtime keys of the fractions
are not read (pyproxy's runtime is static): their ``default_value`` applies.
"""

from __future__ import annotations

import collections
import logging
import random

from envoy.extensions.filters.http.local_ratelimit.v3 import local_rate_limit_pb2

from ...config import ConfigError
from ...routing import compile_header_mutation
from ...routing.policies import compile_rate_limit
from ...http.filter import CONTINUE, STOP, HttpFilter
from ..token_bucket import compile_token_bucket
from .util import _unwrap_config

log = logging.getLogger("pyproxy.filter")

FILTER_NAMES = ("envoy.filters.http.local_ratelimit",)
_TYPE = "envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit"
_DENOMS = {0: 100, 1: 10000, 2: 1000000}
_DRAFT_VERSION_03 = 1
_PER_CONN_KEY = "envoy.filters.http.local_ratelimit.per_connection"
VH_OVERRIDE, VH_INCLUDE, VH_IGNORE = 0, 1, 2
_warned_routes: set = set()


def _fraction(msg, field: str):
    """``RuntimeFractionalPercent`` -> (numerator, denominator), or None when unset (= never)."""
    if not msg.HasField(field):
        return None
    dv = getattr(msg, field).default_value
    d = _DENOMS.get(dv.denominator)
    if d is None:
        raise ConfigError("unknown denominator %d" % dv.denominator, field=field + ".default_value")
    return (min(dv.numerator, d), d)


def _hit(frac) -> bool:
    if frac is None:
        return False
    n, d = frac
    return n >= d or (n > 0 and random.randrange(d) < n)


class LocalRateLimitConfig:
    """One compiled ``LocalRateLimit`` with its bucket and stats (the filter's or a route's)."""

    __slots__ = ("bucket", "per_connection", "enabled", "enforced", "status", "grpc_status",
                 "response_mutation", "request_mutation", "x_headers", "st_enabled", "st_ok",
                 "st_rate_limited", "st_enforced", "tb_proto", "exact", "wildcards", "rate_limits",
                 "stage", "vh_rate_limits", "always_default", "max_dynamic", "has_descriptors")

    def __init__(self, cfg, stats, per_route: bool, field: str = "LocalRateLimit"):
        if cfg.HasField("local_cluster_rate_limit"):
            raise ConfigError("local_cluster_rate_limit is not supported",
                              field=field + ".local_cluster_rate_limit")
        if not cfg.stat_prefix:
            raise ConfigError("stat_prefix must not be empty", field=field + ".stat_prefix")
        if per_route and not cfg.HasField("token_bucket"):
            raise ConfigError("local rate limit token bucket must be set for per filter configs",
                              field=field + ".token_bucket")
        self.tb_proto = None
        self.bucket = None
        if cfg.HasField("token_bucket"):
            self.bucket = compile_token_bucket(cfg.token_bucket, field + ".token_bucket")
            self.tb_proto = cfg.token_bucket
        self.per_connection = cfg.local_rate_limit_per_downstream_connection
        self._compile_descriptors(cfg, field)
        self.enabled = _fraction(cfg, "filter_enabled")
        self.enforced = _fraction(cfg, "filter_enforced")
        code = cfg.status.code if cfg.HasField("status") else 0
        self.status = code if code >= 400 else 429
        self.grpc_status = 8 if cfg.rate_limited_as_resource_exhausted else None
        self.response_mutation = compile_header_mutation(cfg.response_headers_to_add, (),
                                                         field + ".response")
        self.request_mutation = compile_header_mutation(
            cfg.request_headers_to_add_when_not_enforced, (), field + ".request")
        self.x_headers = cfg.enable_x_ratelimit_headers == _DRAFT_VERSION_03
        p = cfg.stat_prefix + ".http_local_rate_limit."
        self.st_enabled = stats.counter(p + "enabled")
        self.st_ok = stats.counter(p + "ok")
        self.st_rate_limited = stats.counter(p + "rate_limited")
        self.st_enforced = stats.counter(p + "enforced")
        stats.counter(p + "shadow_mode")  # (descriptors' shadow mode: always 0 here, as in Envoy without them)

    def _compile_descriptors(self, cfg, field):
        self.exact = {}
        self.wildcards = []  # [(entries with "" as any value, token bucket proto, LRU of buckets)]
        self.has_descriptors = bool(len(cfg.descriptors))
        if self.has_descriptors and self.per_connection:
            raise ConfigError("descriptors with local_rate_limit_per_downstream_connection are not "
                              "supported", field=field + ".local_rate_limit_per_downstream_connection")
        for i, d in enumerate(cfg.descriptors):
            f = "%s.descriptors[%d]" % (field, i)
            entries = tuple((e.key, e.value) for e in d.entries)
            if not entries or any(not k for k, _ in entries):
                raise ConfigError("a descriptor needs entries with keys", field=f + ".entries")
            if not d.HasField("token_bucket"):
                raise ConfigError("token_bucket is required", field=f + ".token_bucket")
            b = compile_token_bucket(d.token_bucket, f + ".token_bucket")
            if any(v == "" for _, v in entries):
                if any(w[0] == entries for w in self.wildcards):
                    raise ConfigError("duplicate descriptor in the local rate descriptor", field=f)
                self.wildcards.append((entries, d.token_bucket, collections.OrderedDict()))
            else:
                if entries in self.exact:
                    raise ConfigError("duplicate descriptor in the local rate descriptor", field=f)
                self.exact[entries] = b
        self.rate_limits = tuple(compile_rate_limit(r, "%s.rate_limits[%d]" % (field, i), strict=True)
                                 for i, r in enumerate(cfg.rate_limits))
        self.stage = cfg.stage
        self.vh_rate_limits = cfg.vh_rate_limits
        self.always_default = cfg.always_consume_default_token_bucket.value \
            if cfg.HasField("always_consume_default_token_bucket") else True
        self.max_dynamic = cfg.max_dynamic_descriptors.value \
            if cfg.HasField("max_dynamic_descriptors") else 20

    def request_descriptors(self, stream, headers) -> list:
        """The descriptors the request makes (Envoy's populateDescriptors)."""
        route = stream.route
        cluster = getattr(route, "cluster", "") or ""
        si = stream.stream_info
        ip = si.downstream_remote_address or stream.hc.conn.info.src_ip
        out = []
        if self.rate_limits:
            policies = self.rate_limits
        else:
            if route is None or getattr(route, "rate_limits", None) is None:
                return out
            policies = [p for p in route.rate_limits if p.stage == self.stage and not p.disable_key]
            vh = route.vhost
            vh_rl = getattr(vh, "rate_limits", ()) or ()
            if route.include_vh_rate_limits or self.vh_rate_limits == VH_INCLUDE:
                policies += [p for p in vh_rl if p.stage == self.stage and not p.disable_key]
            elif self.vh_rate_limits == VH_OVERRIDE and not route.rate_limits:
                policies += [p for p in vh_rl if p.stage == self.stage and not p.disable_key]
        for p in policies:
            if p.unsupported:
                key = (id(p), p.unsupported)
                if key not in _warned_routes and len(_warned_routes) < 10000:
                    _warned_routes.add(key)
                    log.warning("local_ratelimit: route '%s': %s; that rate limit makes no descriptor",
                                getattr(route, "name", ""), p.unsupported)
                continue
            d = p.descriptor(headers, cluster, ip)
            if d is not None:
                out.append(d)
        return out

    def _dynamic(self, d):
        for pattern, tb, lru in self.wildcards:
            if len(pattern) != len(d):
                continue
            for (pk, pv), (k, v) in zip(pattern, d):
                if pk != k or (pv and pv != v):
                    break
            else:
                b = lru.get(d)
                if b is None:
                    b = lru[d] = compile_token_bucket(tb, "token_bucket")
                    if len(lru) > self.max_dynamic:
                        lru.popitem(last=False)
                else:
                    lru.move_to_end(d)
                return b
        return None

    def allowed(self, default_bucket, descriptors):
        """(allowed, the bucket that decided or None): Envoy's LocalRateLimiterImpl."""
        matched = []
        for d in descriptors:
            b = self.exact.get(d)
            if b is None and self.wildcards:
                b = self._dynamic(d)
            if b is not None:
                matched.append(b)
        if len(matched) > 1:
            matched.sort(key=lambda b: b.rate)
        for b in matched:
            if not b.consume():
                return False, b
        if not matched or self.always_default:
            if default_bucket is None:
                return True, (matched[0] if matched else None)
            if not default_bucket.consume():
                return False, default_bucket
            return True, (matched[0] if matched else default_bucket)
        return True, matched[0]

    def bucket_for(self, stream):
        if not self.per_connection or self.tb_proto is None:
            return self.bucket
        conn = stream.hc.conn
        fs = conn.filter_state
        mine = fs.get(_PER_CONN_KEY)
        if mine is None:
            mine = fs[_PER_CONN_KEY] = {}
        entry = mine.get(id(self))
        if entry is None or entry[0] is not self:
            entry = mine[id(self)] = (self, compile_token_bucket(self.tb_proto, "token_bucket"))
        return entry[1]


class LocalRateLimitFactory:
    def __init__(self, cfg, ctx):
        self.stats = ctx.stats
        self.config = LocalRateLimitConfig(cfg, ctx.stats, per_route=False)
        # per-route configs: one compiled config (and bucket) per route's ``Any`` object, which
        # the compiled route keeps (a virtual host's entry is shared by its routes, as in Envoy)
        self._routes: dict = {}

    def create(self, stream):
        return LocalRateLimitFilter(stream, self)

    def config_for(self, stream):
        route = stream.route
        if route is None:
            return self.config
        get = getattr(route, "per_filter_config", None)
        a = get(FILTER_NAMES[0]) if get is not None else None
        if a is None:
            return self.config
        entry = self._routes.get(id(a))
        if entry is not None and entry[0] is a:
            return entry[1]
        try:
            msg = _unwrap_config(a)
            if msg.DESCRIPTOR.full_name != _TYPE:
                raise ConfigError("per-route config must be %s, got %s" % (_TYPE, msg.DESCRIPTOR.full_name))
            c = LocalRateLimitConfig(msg, self.stats, per_route=True, field="typed_per_filter_config")
        except ConfigError as e:
            log.warning("invalid per-route config for %s on route '%s' ignored: %s",
                        FILTER_NAMES[0], getattr(route, "name", ""), e)
            c = self.config
        if len(self._routes) > 4096:
            self._routes.clear()  # bounded: configs of replaced route tables go
        self._routes[id(a)] = (a, c)
        return c


class LocalRateLimitFilter(HttpFilter):
    __slots__ = ("f", "cfg", "bucket", "limited")

    def __init__(self, callbacks, f):
        self.callbacks = callbacks
        self.f = f
        self.cfg = None
        self.bucket = None
        self.limited = False

    def decode_headers(self, headers, end_stream):
        cb = self.callbacks
        c = self.cfg = self.f.config_for(cb)
        if not _hit(c.enabled):
            return CONTINUE
        c.st_enabled.value += 1
        b = c.bucket_for(cb)
        if c.has_descriptors:
            ok, b = c.allowed(b, c.request_descriptors(cb, headers))
        else:
            ok = b is None or b.consume()
        self.bucket = b
        if ok:
            c.st_ok.value += 1
            return CONTINUE
        c.st_rate_limited.value += 1
        if not _hit(c.enforced):
            if not c.request_mutation.empty:
                c.request_mutation.apply(headers, cb.stream_info, headers)
            return CONTINUE
        c.st_enforced.value += 1
        self.limited = True
        cb.send_local_reply(c.status, "local_rate_limited", "local_rate_limited", flag="RL",
                            grpc_status=c.grpc_status)
        return STOP

    def encode_headers(self, headers, end_stream):
        c = self.cfg
        if c is None:
            return CONTINUE
        if self.limited and not c.response_mutation.empty:
            cb = self.callbacks
            c.response_mutation.apply(headers, cb.stream_info, cb.request_headers, headers)
        b = self.bucket
        if c.x_headers and b is not None:
            headers.add("x-ratelimit-limit", str(int(b.max_tokens)))
            headers.add("x-ratelimit-remaining", str(b.remaining()))
            headers.add("x-ratelimit-reset", str(b.reset_seconds()))
        return CONTINUE


class _NoStats:
    """Counters for a config that is only checked (never used)."""

    class _C:
        value = 0

    def counter(self, name):
        return self._C()


def check_per_route(msg) -> None:
    """A route's ``typed_per_filter_config`` entry, checked as the routes load (a bad one rejects
    the route configuration, as in Envoy)."""
    if msg.DESCRIPTOR.full_name != _TYPE:
        raise ConfigError("per-route config must be %s, got %s" % (_TYPE, msg.DESCRIPTOR.full_name))
    LocalRateLimitConfig(msg, _NoStats(), per_route=True, field="LocalRateLimit")


def factory(cfg, ctx):
    if not isinstance(cfg, local_rate_limit_pb2.LocalRateLimit):
        raise ConfigError("expected %s" % _TYPE)
    return LocalRateLimitFactory(cfg, ctx)
