"""``RouteConfiguration`` → ``RouteTable``: virtual-host index plus compiled routes.

Virtual host selection follows Envoy (``RouteMatcher::findVirtualHost``): the ``:authority`` value
(or ``vhost_header``) is lower-cased and, only with ``ignore_port_in_host_matching``, stripped of its
port; then

1. exact domain (dict lookup);
2. suffix wildcards ``*.example.com`` / ``*-bar.com``, longest first; the ``*`` must stand for at
   least one character;
3. prefix wildcards ``foo.*``, longest first, same rule;
4. the ``*`` virtual host.

Wildcards are kept in one dict per suffix/prefix length, so a lookup costs one dict probe per
distinct length, never a scan over virtual hosts. A Host with a port therefore matches only domains
written with that port (``foo.com:8080``) or wildcards (Istio lists both spellings).
"""

from __future__ import annotations

from ..config import unacted
from ..config.errors import ConfigError
from ..config.util import u32
from .header_mutation import compile_header_mutation
from .policies import compile_hedge_policy, compile_rate_limit, compile_retry_policy
from .route import P_PATH, P_PREFIX
from .route_compile import (_compile_mirror, check_fields, check_filter_configs, compile_route,
                            tls_redirect_entry)

_RC_FIELDS = frozenset({
    "name", "virtual_hosts", "internal_only_headers", "response_headers_to_add",
    "response_headers_to_remove", "request_headers_to_add", "request_headers_to_remove",
    "most_specific_header_mutations_wins", "validate_clusters", "max_direct_response_body_size_bytes",
    "request_mirror_policies", "ignore_port_in_host_matching", "vhost_header",
    "ignore_path_parameters_in_path_matching", "typed_per_filter_config", "metadata",
})
_VH_FIELDS = frozenset({
    "name", "domains", "routes", "require_tls", "virtual_clusters", "rate_limits",
    "request_headers_to_add", "request_headers_to_remove", "response_headers_to_add",
    "response_headers_to_remove", "cors", "typed_per_filter_config", "include_request_attempt_count",
    "include_attempt_count_in_response", "retry_policy", "hedge_policy",
    "include_is_timeout_retry_header", "per_request_buffer_limit_bytes", "request_body_buffer_limit",
    "request_mirror_policies", "metadata",
})

TLS_NONE, TLS_EXTERNAL_ONLY, TLS_ALL = 0, 1, 2


class VirtualHost:
    __slots__ = ("name", "domains", "routes", "require_tls", "request_mutation",
                 "response_mutation", "typed_per_filter_config", "retry", "mirror_policies", "hedge", "rate_limits",
                 "include_request_attempt_count", "include_attempt_count_in_response",
                 "per_request_buffer_limit_bytes", "tls_redirect", "strip_params", "pmap",
                 "plens", "complex", "any_ci", "emap", "nroutes", "nomatch", "first", "cors",
                 "include_is_timeout_retry_header")

    def route(self, headers, random_value: int = 0):
        if self.require_tls:
            xfp = headers.get("x-forwarded-proto")
            if xfp != "https" and (self.require_tls == TLS_ALL
                                   or headers.get("x-envoy-internal") != "true"):
                return self.tls_redirect
        return self.match(headers, headers.get(":path"),
                          headers.get(":method") == "CONNECT" and ":protocol" not in headers, random_value)

    def match(self, headers, path, is_connect: bool, random_value: int = 0):
        """The first route matching (``require_tls`` already checked by ``route()``)."""
        if path is not None and not is_connect:
            return self.match_path(headers, path, random_value)
        # no path, or a CONNECT: only the routes that are not indexed by path may match
        nq = "" if path is None else _path_part(path, self.strip_params)
        return self._first_of(headers, path, nq, is_connect, random_value, self.complex, self.nroutes)

    def match_path(self, headers, path: str, random_value: int = 0):
        """``match()`` for a request that is not a CONNECT and has a ``:path``."""
        return RouteTable.find_for_path(None, headers, None, path, random_value, self)

    def _first_of(self, headers, path, nq, is_connect, random_value, cands, best):
        """The first of ``cands`` (``(index, route)`` in order) before route ``best`` that
        matches, else route ``best`` (None when there is no such route)."""
        if cands:
            lnq = nq.lower() if self.any_ci else nq
            qcache = [None]
            for i, r in cands:
                if i >= best:
                    break
                if r.matches(headers, path, nq, lnq, is_connect, random_value, qcache):
                    return r
        return self.routes[best] if best < self.nroutes else None

    def __repr__(self):
        return "VirtualHost(%r)" % self.name


def _path_part(path: str, strip_params: bool) -> str:
    """The path without its query and fragment (and with ``strip_params``, its parameters)."""
    nq = path
    if "?" in nq:
        nq = nq[:nq.find("?")]
    if "#" in nq:
        nq = nq[:nq.find("#")]
    if strip_params and ";" in nq:
        nq = _strip_path_params(nq)
    return nq


def _strip_path_params(p: str) -> str:
    return "/".join(seg.partition(";")[0] for seg in p.split("/"))


class _Ctx:
    __slots__ = ("request_mutation", "response_mutation", "most_specific_wins",
                 "typed_per_filter_config", "max_direct_body", "mirror_policies")


def strip_host_port(host: str) -> str:
    if host.startswith("["):
        end = host.rfind("]:")
        return host[:end + 1] if end >= 0 and host[end + 2:].isdigit() else host
    i = host.rfind(":")
    if i >= 0 and host.count(":") == 1 and host[i + 1:].isdigit():
        return host[:i]
    return host


class RouteTable:
    """Immutable compiled route configuration. ``find()`` is safe to call from any thread."""

    __slots__ = ("name", "virtual_hosts", "internal_only_headers", "validate_clusters", "needs_random",
                 "trace_routes",                 "_exact", "_suffix", "_prefix", "_default", "_only_default", "_host_header",
                 "_ignore_port", "_by_authority")

    def find(self, headers, stream_info=None, random_value: int = 0):
        """The route for a request, or None (Envoy's 404 ``route_not_found``)."""
        vh = self._default if self._only_default else None
        if vh is None:
            host = headers.get(self._host_header) or ""
            vh = None if self._ignore_port else self._exact.get(host.lower())
            if vh is None:
                vh = self.find_virtual_host(host)
                if vh is None:
                    return None
        return vh.route(headers, random_value)

    def find_for_path(self, headers, authority: str, path: str, random_value: int = 0, vh=None):
        """``find()`` for a request that is not a CONNECT and whose ``:authority`` and ``:path``
        the caller already has (the manager's entry, conn_manager.HttpConnection.on_request);
        with ``vh``, the route in that virtual host (``VirtualHost.match_path``: ``self`` is not
        used, and ``require_tls`` was checked)."""
        if vh is None:
            vh = self._default if self._only_default else None
            if vh is None:
                host = authority if self._by_authority else headers.get(self._host_header) or ""
                # (find_virtual_host's exact step, inlined)
                vh = None if self._ignore_port else self._exact.get(host.lower())
                if vh is None:
                    vh = self.find_virtual_host(host)
                    if vh is None:
                        return None
            if vh.require_tls:
                return vh.route(headers, random_value)
        f = vh.first
        if f is not None and path.startswith(f):
            # the first route is a plain prefix without '?', '#' or ';': a path that starts
            # with it has a path part that does too, and nothing comes before route 0 (Istio's
            # one "/" route per service)
            return vh.routes[0]
        # the path without its query and fragment (and, if asked, its parameters)
        nq = path if "?" not in path and "#" not in path and not vh.strip_params else \
            _path_part(path, vh.strip_params)
        # the exact path's entry, else the longest indexed prefix's (each already merged with
        # every shorter indexed prefix of its key, at config load): (the best plain route or None,
        # its index, the gated routes before it)
        e = vh.emap.get(nq)
        if e is None:
            n = len(nq)
            pmap = vh.pmap
            for ln in vh.plens:  # longest first
                if ln <= n:
                    e = pmap.get(nq[:ln])
                    if e is not None:
                        break
            else:
                e = vh.nomatch
        route, best, cands = e
        if vh.complex:
            cands = sorted(cands + vh.complex) if cands else vh.complex
        elif not cands:
            return route
        return vh._first_of(headers, path, nq, False, random_value, cands, best)

    def find_virtual_host(self, host: str):
        if self._ignore_port:
            host = strip_host_port(host)
        host = host.lower()
        vh = self._exact.get(host)
        if vh is not None:
            return vh
        n = len(host)
        for length, table in self._suffix:
            if length < n:
                vh = table.get(host[n - length:])
                if vh is not None:
                    return vh
        for length, table in self._prefix:
            if length < n:
                vh = table.get(host[:length])
                if vh is not None:
                    return vh
        return self._default

    def all_routes(self):
        for vh in self.virtual_hosts:
            yield from vh.routes

    def __repr__(self):
        return "RouteTable(%r, %d virtual hosts)" % (self.name, len(self.virtual_hosts))


def _compile_vhost(v, ctx: _Ctx, strip_params: bool) -> VirtualHost:
    check_fields(v, _VH_FIELDS, "virtual_host")
    if v.HasField("retry_policy_typed_config"):
        raise ConfigError("retry_policy_typed_config is not supported", "retry_policy_typed_config")
    vh = VirtualHost()
    vh.name = v.name
    if not vh.name:
        raise ConfigError("name is required", "name")
    vh.domains = tuple(v.domains)
    if not vh.domains:
        raise ConfigError("at least one domain is required", "domains")
    vh.require_tls = v.require_tls
    vh.request_mutation = compile_header_mutation(v.request_headers_to_add,
                                                  v.request_headers_to_remove, "request")
    vh.response_mutation = compile_header_mutation(v.response_headers_to_add,
                                                   v.response_headers_to_remove, "response")
    vh.typed_per_filter_config = dict(v.typed_per_filter_config)
    check_filter_configs(vh.typed_per_filter_config)
    vh.cors = v.cors if v.HasField("cors") else None  # (deprecated; compiled per route: compile_route)
    vh.retry = compile_retry_policy(v.retry_policy) if v.HasField("retry_policy") else None
    vh.hedge = compile_hedge_policy(v.hedge_policy) if v.HasField("hedge_policy") else False
    vh.rate_limits = tuple(compile_rate_limit(r, "rate_limits[%d]" % i, strict=False)
                           for i, r in enumerate(v.rate_limits))
    vh.mirror_policies = tuple(_compile_mirror(p, "request_mirror_policies[%d]" % i)
                               for i, p in enumerate(v.request_mirror_policies)) \
        or ctx.mirror_policies
    vh.include_request_attempt_count = v.include_request_attempt_count
    vh.include_attempt_count_in_response = v.include_attempt_count_in_response
    vh.include_is_timeout_retry_header = v.include_is_timeout_retry_header
    vh.per_request_buffer_limit_bytes = u32(v, "per_request_buffer_limit_bytes", None)
    vh.strip_params = strip_params
    vh.routes = tuple(compile_route(r, vh, i, ctx) for i, r in enumerate(v.routes))
    # Routes that check only a case-sensitive path prefix are found with a few dict lookups (one
    # per distinct prefix length) instead of a scan; the others are tried in order before the best
    # prefix hit, so the first matching route still wins.
    # Exact-path routes likewise (one dict lookup). Routes with a case-sensitive prefix or path and
    # further conditions (headers, query, runtime, gRPC) are kept under their path too, and tried
    # only when the request's path fits it.
    pmap = {}  # prefix -> (first plain route's index or None, gated routes)
    emap = {}  # exact path -> the same
    complex_ = []
    for i, r in enumerate(vh.routes):
        plain = r.runtime is None and not r.grpc_only and not r.header_matchers and not r.query_matchers
        if r.p_kind in (P_PREFIX, P_PATH) and not r.p_ci:
            m = pmap if r.p_kind == P_PREFIX else emap
            first, gated = m.get(r.p_value, (None, ()))
            if plain:
                if first is None:
                    first = i
            else:
                gated += ((i, r),)
            m[r.p_value] = (first, gated)
        else:
            complex_.append((i, r))
    n = vh.nroutes = len(vh.routes)
    plens = sorted({len(p) for p in pmap}, reverse=True)

    def merged(key, own):
        """(best plain route index, the gated routes before it, in order) for a path whose
        longest indexed prefix (or exact path) is ``key``: its own entry and those of every
        shorter indexed prefix of ``key`` (so one lookup answers the request)."""
        best, gated = n, []
        for e in ([own] if own is not None else []) + [pmap[key[:ln]] for ln in plens
                                                        if ln <= len(key) and key[:ln] in pmap]:
            if e[0] is not None and e[0] < best:
                best = e[0]
            gated += e[1]
        return vh.routes[best] if best < n else None, best, tuple(sorted(g for g in gated if g[0] < best))

    vh.pmap = {k: merged(k, None) for k in pmap}
    vh.emap = {k: merged(k, e) for k, e in emap.items()}
    vh.plens = tuple(plens)
    vh.nomatch = (None, n, ())
    vh.complex = tuple(complex_)
    r0 = vh.routes[0] if vh.routes else None
    vh.first = r0.p_value if (
        r0 is not None and r0.p_kind == P_PREFIX and not r0.p_ci and r0.runtime is None
        and not r0.grpc_only and not r0.header_matchers and not r0.query_matchers
        and not any(c in r0.p_value for c in "?#;")) else None
    vh.any_ci = any(r.p_ci for r in vh.routes)
    vh.tls_redirect = tls_redirect_entry(vh, ctx) if vh.require_tls else None
    return vh


def compile_route_config(rc) -> RouteTable:
    """Compile a ``route.v3.RouteConfiguration``; raises ``ConfigError`` naming the bad field."""
    res = "route configuration '%s'" % rc.name
    try:
        check_fields(rc, _RC_FIELDS, "route_configuration")
        unacted.warn("route_configuration", rc, rc.name)
        ctx = _Ctx()
        ctx.request_mutation = compile_header_mutation(rc.request_headers_to_add,
                                                       rc.request_headers_to_remove, "request")
        ctx.response_mutation = compile_header_mutation(rc.response_headers_to_add,
                                                        rc.response_headers_to_remove, "response")
        ctx.most_specific_wins = rc.most_specific_header_mutations_wins
        ctx.typed_per_filter_config = dict(rc.typed_per_filter_config)
        check_filter_configs(ctx.typed_per_filter_config)
        ctx.max_direct_body = u32(rc, "max_direct_response_body_size_bytes", 4096)
        t = RouteTable()
        t.name = rc.name
        t.internal_only_headers = frozenset(h.lower() for h in rc.internal_only_headers)
        t.validate_clusters = rc.validate_clusters.value if rc.HasField("validate_clusters") \
            else None
        t._host_header = rc.vhost_header.lower() or ":authority"
        t._ignore_port = rc.ignore_port_in_host_matching
        t._by_authority = t._host_header == ":authority"
        ctx.mirror_policies = tuple(_compile_mirror(p, "request_mirror_policies[%d]" % i)
                                    for i, p in enumerate(rc.request_mirror_policies))
        exact: dict = {}
        suffix: dict = {}
        prefix: dict = {}
        default = None
        vhosts = []
        seen: set = set()
        for i, v in enumerate(rc.virtual_hosts):
            try:
                vh = _compile_vhost(v, ctx, rc.ignore_path_parameters_in_path_matching)
            except ConfigError as e:
                raise e.within(field="virtual_hosts[%d]" % i)
            vhosts.append(vh)
            for d in vh.domains:
                dl = d.lower()
                if dl in seen:
                    raise ConfigError(
                        "Only unique values for domains are permitted. Duplicate entry of domain "
                        "%s in route %s" % (dl, rc.name), "virtual_hosts[%d].domains" % i)
                seen.add(dl)
                if dl == "*":
                    default = vh
                elif dl.startswith("*"):
                    suffix.setdefault(len(dl) - 1, {})[dl[1:]] = vh
                elif dl.endswith("*"):
                    prefix.setdefault(len(dl) - 1, {})[dl[:-1]] = vh
                else:
                    exact[dl] = vh
        t.virtual_hosts = tuple(vhosts)
        t._exact = exact
        t._suffix = tuple(sorted(suffix.items(), key=lambda kv: -kv[0]))
        t._prefix = tuple(sorted(prefix.items(), key=lambda kv: -kv[0]))
        t._default = default
        t._only_default = default is not None and not exact and not suffix and not prefix
        # whether any route draws a random value (runtime_fraction): callers may skip drawing one
        t.needs_random = any(r.runtime is not None for vh in vhosts for r in vh.routes)
        # a route with its own tracing rates: the x-request-id trace decision looks the route up
        # (pyproxy/tracing/request_id.py)
        t.trace_routes = any(r.trace is not None for vh in vhosts for r in vh.routes)
        return t
    except ConfigError as e:
        raise e.within(resource=res)
