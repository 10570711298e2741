"""``envoy.filters.http.cors``: answer CORS preflights and decorate cross-origin responses.

The filter config (``Cors``) is empty; the policy of a route is compiled with the route
(``compile_route_cors``, called by routing/route_compile.py as routes load, registry category
``route_policy``) from, as Envoy 1.40 does:
- the ``CorsPolicy`` in ``typed_per_filter_config["envoy.filters.http.cors"]`` of the route, its
  virtual host and its route configuration (how Istio renders a VirtualService ``corsPolicy``);
- when none of them has one, the (deprecated) ``cors`` field of the RouteAction and of the
  VirtualHost.
The levels merge field by field, the most specific first (Envoy's ``CorsFilter`` accessors: the
first level with allowed origins gives the origins, the first with allow_methods the methods...);
``filter_enabled`` / ``shadow_enabled`` come from the most specific level. A route whose levels
hold no policy has none, and the HCM's chain plan leaves the filter out for it.

Request with an ``Origin``:
- a preflight (``OPTIONS`` with ``Access-Control-Request-Method``) whose origin matches
  ``allow_origin_string_match`` is answered here with 200 and ``access-control-allow-origin|
  methods|headers|max-age|credentials`` ("*" for methods or headers echoes the request's
  ``access-control-request-method|headers``), and private network access when allowed and asked;
  a non-matching preflight is forwarded, unless ``forward_not_matching_preflights`` is false (then
  answered the same way without ``access-control-allow-origin``);
- otherwise the request is forwarded; when its origin matched, the response gets
  ``access-control-allow-origin`` (+ ``-credentials``, ``-expose-headers``).
Shadow mode (``shadow_enabled`` without ``filter_enabled`` hitting) only counts.
Stats: ``http.<prefix>.cors.origin_valid|origin_invalid``.
"""

from __future__ import annotations

from envoy.extensions.filters.http.cors.v3 import cors_pb2  # noqa: F401 (registers the types)

from ...config import ConfigError
from ...http.filter import CONTINUE, STOP, HttpFilter
from ...http.headers import Headers
from ...routing.matchers import compile_string_matcher
from .util import HcmStats, _unwrap_config, fraction, hit

FILTER_NAMES = ("envoy.filters.http.cors", "envoy.cors")  # (typed_per_filter_config keys)
_POLICY_TYPES = ("envoy.extensions.filters.http.cors.v3.CorsPolicy", "envoy.config.route.v3.CorsPolicy")


class _Level:
    """One level's ``CorsPolicy`` (the extension's, or the route API's deprecated one: same fields);
    unset fields are None."""

    __slots__ = ("origins", "allow_methods", "allow_headers", "expose_headers", "max_age",
                 "allow_credentials", "enabled", "shadow", "private_network", "forward_not_matching")

    def __init__(self, p, field: str):
        if p.DESCRIPTOR.full_name not in _POLICY_TYPES:
            raise ConfigError("per-route CORS config must be CorsPolicy, got %s" % p.DESCRIPTOR.full_name,
                              field=field)
        self.origins = tuple(compile_string_matcher(m, "%s.allow_origin_string_match[%d]" % (field, i))
                             for i, m in enumerate(p.allow_origin_string_match))
        self.allow_methods = p.allow_methods
        self.allow_headers = p.allow_headers
        self.expose_headers = p.expose_headers
        self.max_age = p.max_age
        self.allow_credentials = p.allow_credentials.value if p.HasField("allow_credentials") else None
        self.enabled = fraction(p.filter_enabled.default_value, field + ".filter_enabled", 1.0) \
            if p.HasField("filter_enabled") else 1.0
        self.shadow = fraction(p.shadow_enabled.default_value, field + ".shadow_enabled", 0.0) \
            if p.HasField("shadow_enabled") else 0.0
        self.private_network = p.allow_private_network_access.value \
            if p.HasField("allow_private_network_access") else None
        self.forward_not_matching = p.forward_not_matching_preflights.value \
            if p.HasField("forward_not_matching_preflights") else None


def _first(levels, attr, default):
    for lv in levels:
        v = getattr(lv, attr)
        if v:
            return v
    return default


def _first_set(levels, attr, default):
    for lv in levels:
        v = getattr(lv, attr)
        if v is not None:
            return v
    return default


class CorsPolicy:
    """The policy the filter applies on one route: its levels merged (most specific first)."""

    __slots__ = ("origins", "allow_methods", "allow_headers", "expose_headers", "max_age",
                 "allow_credentials", "enabled", "shadow", "private_network", "forward_not_matching")

    def __init__(self, levels):
        self.origins = _first(levels, "origins", ())
        self.allow_methods = _first(levels, "allow_methods", "")
        self.allow_headers = _first(levels, "allow_headers", "")
        self.expose_headers = _first(levels, "expose_headers", "")
        self.max_age = _first(levels, "max_age", "")
        self.allow_credentials = _first_set(levels, "allow_credentials", False)
        self.private_network = _first_set(levels, "private_network", False)
        self.forward_not_matching = _first_set(levels, "forward_not_matching", True)
        self.enabled = levels[0].enabled
        self.shadow = levels[0].shadow

    def origin_allowed(self, origin: str) -> bool:
        for m in self.origins:
            if m.match("*") or m.match(origin):
                return True
        return False


_cache: dict = {}  # serialized levels -> CorsPolicy (routes of a table share equal policies)


def _level_msgs(tpfc, action_cors, vh_cors, field):
    out = []
    for key in ("rc", "vh", "route"):  # least specific first, as Envoy collects them
        for n in FILTER_NAMES:
            a = tpfc.get((key, n))
            if a is not None:
                out.append((_unwrap_config(a), "%s.typed_per_filter_config[%s]" % (field[key], n)))
                break
    if out:
        out.reverse()
        return out
    if action_cors is not None:
        out.append((action_cors, field["route"] + ".route.cors"))
    if vh_cors is not None:
        out.append((vh_cors, field["vh"] + ".cors"))
    return out


def compile_route_cors(rc_tpfc, vh_tpfc, route_tpfc, action_cors, vh_cors):
    """The ``CorsPolicy`` a route's cors filter applies (None: no policy), from the per-filter
    configs of the route configuration, virtual host and route (dicts of name -> Any) and, when
    they hold none, the deprecated ``cors`` of the RouteAction and VirtualHost (messages or None).
    Raises ``ConfigError`` for an invalid policy (the route configuration is refused, as Envoy)."""
    tpfc = {}
    for key, d in (("rc", rc_tpfc), ("vh", vh_tpfc), ("route", route_tpfc)):
        for n in FILTER_NAMES:
            if n in d:
                tpfc[(key, n)] = d[n]
    fields = {"rc": "route_configuration", "vh": "virtual_host", "route": "route"}
    msgs = _level_msgs(tpfc, action_cors, vh_cors, fields)
    if not msgs:
        return None
    key = tuple((m.DESCRIPTOR.full_name, m.SerializeToString(deterministic=True)) for m, _ in msgs)
    p = _cache.get(key)
    if p is None:
        p = CorsPolicy([_Level(m, f) for m, f in msgs])
        if len(_cache) > 4096:
            _cache.clear()
        _cache[key] = p
    return p


class CorsFactory:
    def __init__(self, cfg, ctx):
        # the HCM's chain plan: a route with no policy (RouteEntry.cors None) leaves out the filter
        # (route_compile adds "envoy.filters.http.cors" to the filter names of a route with one)
        self.inert_unless_route_config = FILTER_NAMES
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
        cb = self.callbacks
        p = getattr(cb.route, "cors", None)
        if p is None:
            return CONTINUE
        enabled = hit(p.enabled)
        shadow = hit(p.shadow) if p.shadow else False
        if not enabled and not shadow:
            return CONTINUE
        origin = headers.get("origin")
        if not origin:
            return CONTINUE
        st = self.f.stats.get(cb)
        allowed = p.origin_allowed(origin)
        st["origin_valid" if allowed else "origin_invalid"].inc()
        if not enabled:
            return CONTINUE  # shadow mode: counted only
        if allowed:
            self.policy = p
            self.origin = origin
        if headers.get(":method") != "OPTIONS":
            return CONTINUE
        acrm = headers.get("access-control-request-method")
        if not acrm:
            return CONTINUE
        # a preflight
        if not allowed and p.forward_not_matching:
            return CONTINUE
        h = Headers([(":status", "200")])
        if allowed:
            h.add("access-control-allow-origin", origin)
        if p.allow_credentials:
            h.add("access-control-allow-credentials", "true")
        if p.allow_methods:
            h.add("access-control-allow-methods", acrm if p.allow_methods == "*" else p.allow_methods)
        if p.allow_headers:
            h.add("access-control-allow-headers", headers.get("access-control-request-headers", "")
                  if p.allow_headers == "*" else p.allow_headers)
        if p.max_age:
            h.add("access-control-max-age", p.max_age)
        if p.private_network and headers.get("access-control-request-private-network") == "true":
            h.add("access-control-allow-private-network", "true")
        cb.stream_info.response_code_details = "cors_response"
        cb.encode_headers(h, True)  # (through this filter's encode_headers too, as in Envoy)
        return STOP

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
