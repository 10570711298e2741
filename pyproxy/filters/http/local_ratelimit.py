"""``envoy.filters.http.local_ratelimit``: a token bucket per filter config (or per route, or per
downstream connection) that answers over-limit requests locally; Istio users add it with an
EnvoyFilter.

As Envoy does it:

- a route's ``typed_per_filter_config`` entry (a ``LocalRateLimit``, which must have a
  ``token_bucket``) replaces the filter's config for that route, with its own bucket and stats; a
  virtual host's entry is one bucket for all its routes;
- ``filter_enabled`` decides (as a fraction of requests) whether the filter looks at a request at
  all, ``filter_enforced`` whether an over-limit request is refused; unset means 0 %;
- refused: ``status`` (429 unless a code >= 400 is set), body ``local_rate_limited``, response
  flag ``RL``, ``response_headers_to_add`` on the reply; gRPC requests get grpc-status 14, or 8 with
  ``rate_limited_as_resource_exhausted``;
- over limit but not enforced: ``request_headers_to_add_when_not_enforced`` go upstream;
- ``enable_x_ratelimit_headers: DRAFT_VERSION_03`` adds ``x-ratelimit-limit|remaining|reset``;
- ``local_rate_limit_per_downstream_connection``: one bucket per downstream connection;
- stats ``<stat_prefix>.http_local_rate_limit.enabled|ok|rate_limited|enforced|shadow_mode``.

The bucket refills continuously (``filters/token_bucket.py``). ``descriptors``, ``rate_limits``,
``local_cluster_rate_limit`` and ``vh_rate_limits`` other than the default are rejected: pyproxy
does not build rate limit descriptors. The runtime keys of the fractions are not read (pyproxy's
runtime is static): their ``default_value`` applies.
"""

from __future__ import annotations

import logging
import random

from envoy.extensions.filters.http.local_ratelimit.v3 import local_rate_limit_pb2

from ...config import ConfigError
from ...routing import compile_header_mutation
from ...http.filter import CONTINUE, STOP, HttpFilter
from ..token_bucket import compile_token_bucket
from .util import _unwrap_config

log = logging.getLogger("pyproxy.filter")

FILTER_NAMES = ("envoy.filters.http.local_ratelimit",)
_TYPE = "envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit"
_DENOMS = {0: 100, 1: 10000, 2: 1000000}
_DRAFT_VERSION_03 = 1
_PER_CONN_KEY = "envoy.filters.http.local_ratelimit.per_connection"


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
                 "st_rate_limited", "st_enforced", "tb_proto")

    def __init__(self, cfg, stats, per_route: bool, field: str = "LocalRateLimit"):
        for name in ("descriptors", "rate_limits"):
            if len(getattr(cfg, name)):
                raise ConfigError("%s are not supported: pyproxy does not build rate limit "
                                  "descriptors; use a token_bucket per route instead" % name,
                                  field="%s.%s" % (field, name))
        if cfg.HasField("local_cluster_rate_limit"):
            raise ConfigError("local_cluster_rate_limit is not supported",
                              field=field + ".local_cluster_rate_limit")
        if cfg.vh_rate_limits:
            raise ConfigError("vh_rate_limits only matters with descriptors, which are not "
                              "supported", field=field + ".vh_rate_limits")
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
        b = self.bucket = c.bucket_for(cb)
        if b is None or b.consume():
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


def factory(cfg, ctx):
    if not isinstance(cfg, local_rate_limit_pb2.LocalRateLimit):
        raise ConfigError("expected %s" % _TYPE)
    return LocalRateLimitFactory(cfg, ctx)
