"""``envoy.filters.http.cors``: answer CORS preflights and decorate cross-origin responses.

The filter config (``Cors``) is empty; policies come from ``typed_per_filter_config
["envoy.filters.http.cors"]`` (a ``CorsPolicy``) on the route, virtual host or route configuration —
the most specific one applies (how Istio renders a VirtualService ``corsPolicy``).

Request with an ``Origin`` matched by ``allow_origin_string_match``:
- preflight (``OPTIONS`` with ``Access-Control-Request-Method``): answered here with 200 and
  ``access-control-allow-origin|methods|headers|max-age|credentials`` (and private network access
  when allowed and asked for);
- otherwise forwarded; the response gets ``access-control-allow-origin`` (+ ``-credentials``,
  ``-expose-headers``).
An origin that does not match gets no CORS headers (a non-matching preflight is forwarded unless
``forward_not_matching_preflights`` is false). Stats: ``http.<prefix>.cors.origin_valid|origin_invalid``.
"""

from __future__ import annotations

from envoy.extensions.filters.http.cors.v3 import cors_pb2  # noqa: F401 (registers the types)

from ...config import ConfigError
from ...http.filter import CONTINUE, STOP, HttpFilter
from ...http.headers import Headers
from .util import HcmStats, PerRoute, fraction, hit


class CorsPolicy:
    __slots__ = ("origins", "allow_methods", "allow_headers", "expose_headers", "max_age",
                 "allow_credentials", "enabled", "shadow", "private_network", "forward_not_matching")

    def __init__(self, p, field: str = "CorsPolicy"):
        from ...routing import compile_string_matcher
        self.origins = tuple(compile_string_matcher(m, "%s.allow_origin_string_match[%d]" % (field, i))
                             for i, m in enumerate(p.allow_origin_string_match))
        self.allow_methods = p.allow_methods
        self.allow_headers = p.allow_headers
        self.expose_headers = p.expose_headers
        self.max_age = p.max_age
        self.allow_credentials = p.allow_credentials.value if p.HasField("allow_credentials") else False
        self.enabled = fraction(p.filter_enabled.default_value, field + ".filter_enabled", 1.0) \
            if p.HasField("filter_enabled") else 1.0
        self.shadow = p.HasField("shadow_enabled")
        self.private_network = p.allow_private_network_access.value \
            if p.HasField("allow_private_network_access") else False
        self.forward_not_matching = p.forward_not_matching_preflights.value \
            if p.HasField("forward_not_matching_preflights") else True

    def origin_allowed(self, origin: str) -> bool:
        for m in self.origins:
            if m.kind == "exact" and m.value == "*":
                return True
            if m.match(origin):
                return True
        return False


def _compile_per_route(msg):
    if msg.DESCRIPTOR.full_name != "envoy.extensions.filters.http.cors.v3.CorsPolicy":
        raise ConfigError("per-route CORS config must be CorsPolicy, got %s" % msg.DESCRIPTOR.full_name)
    return CorsPolicy(msg, "typed_per_filter_config")


class CorsFactory:
    def __init__(self, cfg, ctx):
        self.per_route = PerRoute(("envoy.filters.http.cors", "envoy.cors"), _compile_per_route)
        # the HCM's chain plan: without a policy on the route (or its vhost or table), nothing to do
        self.inert_unless_route_config = self.per_route.filter_names
        self.stats = HcmStats(ctx.stats, "cors.", ("origin_valid", "origin_invalid"))

    def create(self, stream):
        return CorsFilter(stream, self)


class CorsFilter(HttpFilter):
    __slots__ = ("f", "policy", "origin")

    def __init__(self, callbacks, f):
        self.callbacks = callbacks
        self.f = f
        self.policy = None
        self.origin = None

    def decode_headers(self, headers, end_stream):
        origin = headers.get("origin")
        if not origin:
            return CONTINUE
        cb = self.callbacks
        p = self.f.per_route.lookup(cb)
        if p is None or not hit(p.enabled):
            return CONTINUE
        st = self.f.stats.get(cb)
        if not p.origin_allowed(origin):
            st["origin_invalid"].inc()
            if headers.get(":method") == "OPTIONS" and headers.get("access-control-request-method") \
                    and not p.forward_not_matching:
                cb.encode_headers(Headers([(":status", "200")]), True)
                return STOP
            return CONTINUE
        st["origin_valid"].inc()
        if headers.get(":method") == "OPTIONS" and headers.get("access-control-request-method"):
            h = Headers([(":status", "200"), ("access-control-allow-origin", origin)])
            if p.allow_credentials:
                h.add("access-control-allow-credentials", "true")
            if p.allow_methods:
                h.add("access-control-allow-methods", p.allow_methods)
            if p.allow_headers:
                h.add("access-control-allow-headers", p.allow_headers)
            if p.max_age:
                h.add("access-control-max-age", p.max_age)
            if p.private_network and headers.get("access-control-request-private-network") == "true":
                h.add("access-control-allow-private-network", "true")
            cb.stream_info.response_code_details = "cors_response"
            cb.encode_headers(h, True)
            return STOP
        self.policy = p
        self.origin = origin
        return CONTINUE

    def encode_headers(self, headers, end_stream):
        p = self.policy
        if p is None:
            return CONTINUE
        headers.set("access-control-allow-origin", self.origin)
        if p.allow_credentials:
            headers.set("access-control-allow-credentials", "true")
        if p.expose_headers:
            headers.set("access-control-expose-headers", p.expose_headers)
        return CONTINUE


def factory(cfg, ctx):
    return CorsFactory(cfg, ctx)
