"""Compiling a ``Route`` proto into a ``RouteEntry``: field checks, match, action (cluster or
weighted clusters, rewrites, timeouts, retry / hash / hedge / rate-limit policies, mirrors),
redirect and direct response, and the synthetic TLS redirect of a ``require_tls`` virtual host."""

from __future__ import annotations

from ..config.errors import ConfigError
from ..config.registry import REGISTRY, type_name_of, unpack_any
from ..config.util import data_source_bytes, duration_s, u32
from .header_mutation import compile_header_mutation, literal_tail
from .plan import plan_route
from .matchers import compile_header_matcher, compile_query_matcher, compile_string_matcher
from .policies import (compile_hash_policy, compile_hedge_policy, compile_rate_limit,
                       compile_retry_policy)
from .regex import compile_re2, re2_substitution
from .route import (DEFAULT_TIMEOUT, DIRECT_RESPONSE, P_CONNECT,
                    P_PATH, P_PREFIX, P_REGEX, P_SEP_PREFIX, REDIRECT, ROUTE, ClusterChoice,
                    MirrorPolicy, RouteEntry)
from ..tracing.request_id import compile_route_trace

_DENOMINATORS = (100, 10000, 1000000)
_REDIRECT_CODES = (301, 302, 303, 307, 308)


def check_fields(msg, allowed: frozenset, what: str) -> None:
    """``ConfigError`` naming the first set field of ``msg`` not in ``allowed``."""
    for fd, _ in msg.ListFields():
        if fd.name not in allowed:
            raise ConfigError("%s.%s is not supported" % (what, fd.name), fd.name)


_ROUTE_FIELDS = frozenset({
    "name", "match", "route", "redirect", "direct_response", "metadata", "decorator",
    "typed_per_filter_config", "request_headers_to_add", "request_headers_to_remove",
    "response_headers_to_add", "response_headers_to_remove", "tracing",
    "per_request_buffer_limit_bytes", "stat_prefix", "request_body_buffer_limit",
})
_MATCH_FIELDS = frozenset({
    "prefix", "path", "safe_regex", "connect_matcher", "path_separated_prefix", "case_sensitive",
    "runtime_fraction", "headers", "query_parameters", "grpc",
})
_ACTION_FIELDS = frozenset({
    "cluster", "cluster_header", "weighted_clusters", "cluster_not_found_response_code",
    "metadata_match", "prefix_rewrite", "regex_rewrite", "host_rewrite_literal",
    "auto_host_rewrite", "host_rewrite_header", "host_rewrite_path_regex",
    "append_x_forwarded_host", "timeout", "idle_timeout", "flush_timeout", "early_data_policy",
    "retry_policy", "request_mirror_policies", "priority", "rate_limits", "include_vh_rate_limits",
    "hash_policy", "cors", "max_grpc_timeout", "grpc_timeout_offset", "upgrade_configs",
    "internal_redirect_policy", "internal_redirect_action", "max_internal_redirects",
    "hedge_policy", "max_stream_duration",
})
_CW_FIELDS = frozenset({
    "name", "cluster_header", "weight", "metadata_match", "request_headers_to_add",
    "request_headers_to_remove", "response_headers_to_add", "response_headers_to_remove",
    "typed_per_filter_config", "host_rewrite_literal",
})


def _metadata_dict(md) -> dict:
    from google.protobuf import json_format
    return json_format.MessageToDict(md)


def check_filter_configs(tpfc, field: str = "typed_per_filter_config") -> None:
    """Per-route HTTP filter configs whose filter registered a check (``route_filter_config``)
    are checked as the routes load, so that a bad one rejects the route configuration (as
    Envoy does) instead of surfacing at the first request."""
    for name, a in tpfc.items():
        tname = type_name_of(a)
        inner = a
        if tname == "envoy.config.route.v3.FilterConfig":
            from envoy.config.route.v3 import route_components_pb2
            fc = route_components_pb2.FilterConfig()
            a.Unpack(fc)
            inner = fc.config
            tname = type_name_of(inner)
        check = REGISTRY.lookup("route_filter_config", tname)
        if check is None:
            continue
        try:
            check(unpack_any(inner))
        except ConfigError as e:
            raise e.within(field="%s[%s]" % (field, name))


def _compile_match(e: RouteEntry, m, field: str) -> None:
    check_fields(m, _MATCH_FIELDS, "route.match")
    e.p_ci = m.case_sensitive.value is False if m.HasField("case_sensitive") else False
    which = m.WhichOneof("path_specifier")
    if which == "prefix":
        e.p_kind = P_PREFIX
        e.p_value = m.prefix.lower() if e.p_ci else m.prefix
    elif which == "path":
        e.p_kind = P_PATH
        e.p_value = m.path.lower() if e.p_ci else m.path
    elif which == "safe_regex":
        e.p_kind = P_REGEX
        e.p_ci = False
        e.p_value = compile_re2(m.safe_regex.regex, field + ".safe_regex.regex")
    elif which == "path_separated_prefix":
        v = m.path_separated_prefix
        if not v.startswith("/") or v.endswith("/") or "?" in v or "#" in v:
            raise ConfigError("path_separated_prefix must start with '/', not end with '/' and "
                              "contain no '?' or '#'", field + ".path_separated_prefix")
        e.p_kind = P_SEP_PREFIX
        e.p_value = v.lower() if e.p_ci else v
    elif which == "connect_matcher":
        e.p_kind = P_CONNECT
        e.p_value = None
    elif which is None:
        raise ConfigError("a path specifier is required", field)
    else:
        raise ConfigError("route match '%s' is not supported" % which, field + "." + which)
    e.header_matchers = tuple(compile_header_matcher(h, "%s.headers[%d]" % (field, i))
                              for i, h in enumerate(m.headers))
    e.query_matchers = tuple(compile_query_matcher(q, "%s.query_parameters[%d]" % (field, i))
                             for i, q in enumerate(m.query_parameters))
    e.runtime = None
    if m.HasField("runtime_fraction"):
        dv = m.runtime_fraction.default_value
        e.runtime = (dv.numerator, _DENOMINATORS[dv.denominator])
    e.grpc_only = m.HasField("grpc")


def _compile_weighted(e: RouteEntry, wc, field: str, max_body, parent_tpfc) -> None:
    choices = []
    total = 0
    for i, c in enumerate(wc.clusters):
        f = "%s.clusters[%d]" % (field, i)
        check_fields(c, _CW_FIELDS, "weighted_clusters.clusters")
        cw = ClusterChoice()
        cw.name = c.name
        cw.cluster_header = c.cluster_header.lower()
        if not cw.name and not cw.cluster_header:
            raise ConfigError("name or cluster_header is required", f)
        cw.weight = u32(c, "weight", 0)
        total += cw.weight
        cw.request_mutation = compile_header_mutation(
            c.request_headers_to_add, c.request_headers_to_remove, f + ".request")
        cw.response_mutation = compile_header_mutation(
            c.response_headers_to_add, c.response_headers_to_remove, f + ".response")
        cw.typed_per_filter_config = dict(c.typed_per_filter_config)
        check_filter_configs(cw.typed_per_filter_config, f + ".typed_per_filter_config")
        cw.host_rewrite_literal = c.host_rewrite_literal
        cw.metadata_match = _metadata_dict(c.metadata_match) if c.HasField("metadata_match") else None
        choices.append(cw)
    if not choices:
        raise ConfigError("at least one cluster is required", field + ".clusters")
    if wc.HasField("total_weight"):
        if wc.total_weight.value != total:
            raise ConfigError("Sum of weights in the weighted_cluster must be equal to "
                              "total_weight (%d != %d)" % (total, wc.total_weight.value),
                              field + ".total_weight")
    if total == 0:
        raise ConfigError("Sum of weights in the weighted_cluster must be greater than 0", field)
    if wc.runtime_key_prefix:
        pass  # runtime overrides are not supported; configured weights apply
    e.weighted = tuple(choices)
    e.total_weight = total
    e.weight_header = wc.header_name.lower()
    e.weight_by_hash = wc.HasField("use_hash_policy") and wc.use_hash_policy.value


def _compile_action(e: RouteEntry, a, vh_retry, field: str, parent_tpfc) -> None:
    check_fields(a, _ACTION_FIELDS, "route.route")
    e.kind = ROUTE
    which = a.WhichOneof("cluster_specifier")
    if which == "cluster":
        e.cluster = a.cluster
    elif which == "cluster_header":
        e.cluster_header = a.cluster_header.lower()
        if not e.cluster_header:
            raise ConfigError("cluster_header must not be empty", field + ".cluster_header")
    elif which == "weighted_clusters":
        _compile_weighted(e, a.weighted_clusters, field + ".weighted_clusters", 0, parent_tpfc)
    elif which is None:
        raise ConfigError("a cluster specifier is required", field)
    else:
        raise ConfigError("cluster specifier '%s' is not supported" % which, field + "." + which)
    # SERVICE_UNAVAILABLE (0), NOT_FOUND (1), INTERNAL_SERVER_ERROR (2)
    e.cluster_not_found_response_code = {1: 404, 2: 500}.get(a.cluster_not_found_response_code, 503)
    e.metadata_match = _metadata_dict(a.metadata_match) if a.HasField("metadata_match") else None
    # rewrites
    if a.prefix_rewrite and a.HasField("regex_rewrite"):
        raise ConfigError("Specify only one of prefix_rewrite, regex_rewrite or "
                          "path_rewrite_policy", field)
    if a.prefix_rewrite:
        if e.p_kind == P_CONNECT:
            raise ConfigError("prefix_rewrite cannot be used with connect_matcher",
                              field + ".prefix_rewrite")
        e.prefix_rewrite = a.prefix_rewrite
    if a.HasField("regex_rewrite"):
        rr = a.regex_rewrite
        e.regex_rewrite = (compile_re2(rr.pattern.regex, field + ".regex_rewrite.pattern.regex"),
                           re2_substitution(rr.substitution))
    hw = a.WhichOneof("host_rewrite_specifier")
    if hw == "host_rewrite_literal":
        e.host_rewrite_literal = a.host_rewrite_literal
    elif hw == "auto_host_rewrite":
        e.auto_host_rewrite = a.auto_host_rewrite.value
    elif hw == "host_rewrite_header":
        e.host_rewrite_header = a.host_rewrite_header.lower()
    elif hw == "host_rewrite_path_regex":
        hr = a.host_rewrite_path_regex
        e.host_rewrite_path_regex = (
            compile_re2(hr.pattern.regex, field + ".host_rewrite_path_regex.pattern.regex"),
            re2_substitution(hr.substitution))
    elif hw is not None:
        raise ConfigError("host rewrite '%s' is not supported" % hw, field + "." + hw)
    e.append_x_forwarded_host = a.append_x_forwarded_host
    # timeouts
    e.idle_timeout = duration_s(a, "idle_timeout", None)
    # Two timeout models, as Envoy's (``usingNewTimeouts``): with a ``max_stream_duration`` block
    # the route has no router timeout (``timeout``, ``max_grpc_timeout`` and
    # ``grpc_timeout_offset`` are not read) and ``grpc-timeout`` sets the stream's duration timer
    # (stream_parts.py route_duration: 504 / DEADLINE_EXCEEDED, max_duration_timeout); without
    # it, ``max_grpc_timeout`` makes ``grpc-timeout`` the router's timeout (504 / UNAVAILABLE, UT)
    e.max_stream_duration = None
    e.grpc_timeout_header_max = e.grpc_timeout_header_offset = None
    e.max_grpc_timeout = e.grpc_timeout_offset = None
    if a.HasField("max_stream_duration"):
        e.timeout = 0.0
        msd = a.max_stream_duration
        e.max_stream_duration = duration_s(msd, "max_stream_duration", None)
        e.grpc_timeout_header_max = _ms(msd, "grpc_timeout_header_max")
        e.grpc_timeout_header_offset = _ms(msd, "grpc_timeout_header_offset")
        e.new_timeouts = True
    else:
        e.timeout = duration_s(a, "timeout", DEFAULT_TIMEOUT)
        e.max_grpc_timeout = _ms(a, "max_grpc_timeout")
        e.grpc_timeout_offset = _ms(a, "grpc_timeout_offset")
        e.new_timeouts = False
    # whether the stream's duration timer depends on the route (besides the HCM's)
    e.duration = bool(e.max_stream_duration) or e.grpc_timeout_header_max is not None
    # policies
    if a.HasField("retry_policy"):
        e.retry = compile_retry_policy(a.retry_policy, field + ".retry_policy")
    else:
        e.retry = vh_retry
    e.rate_limits = tuple(compile_rate_limit(r, "%s.rate_limits[%d]" % (field, i), strict=False)
                          for i, r in enumerate(a.rate_limits))
    e.include_vh_rate_limits = a.include_vh_rate_limits.value if a.HasField("include_vh_rate_limits") \
        else False
    if a.HasField("hedge_policy"):
        e.hedge_on_per_try_timeout = compile_hedge_policy(a.hedge_policy, field + ".hedge_policy")
    e.hash_policies = tuple(compile_hash_policy(h, "%s.hash_policy[%d]" % (field, i))
                            for i, h in enumerate(a.hash_policy))
    e.upgrade_configs = {}
    for i, u in enumerate(a.upgrade_configs):
        enabled = u.enabled.value if u.HasField("enabled") else True
        e.upgrade_configs[u.upgrade_type.lower()] = (enabled, u.HasField("connect_config"))
    if len(a.request_mirror_policies):
        e.mirror_policies = tuple(
            _compile_mirror(p, "%s.request_mirror_policies[%d]" % (field, i))
            for i, p in enumerate(a.request_mirror_policies))
    e.priority = a.priority


def _ms(msg, field: str) -> int | None:
    """A Duration field in whole milliseconds (Envoy's ``PROTOBUF_GET_MS``), None when unset."""
    if not msg.HasField(field):
        return None
    d = getattr(msg, field)
    return d.seconds * 1000 + d.nanos // 1000000


def _compile_mirror(p, field: str) -> MirrorPolicy:
    m = MirrorPolicy()
    m.cluster = p.cluster
    m.cluster_header = p.cluster_header.lower()
    if not m.cluster and not m.cluster_header:
        raise ConfigError("cluster or cluster_header is required", field)
    if m.cluster and m.cluster_header:
        raise ConfigError("only one of cluster or cluster_header can be specified", field)
    m.numerator, m.denominator = 1, 1
    if p.HasField("runtime_fraction"):
        dv = p.runtime_fraction.default_value
        m.numerator, m.denominator = dv.numerator, _DENOMINATORS[dv.denominator]
    m.host_rewrite_literal = p.host_rewrite_literal
    m.suffix = not p.disable_shadow_host_suffix_append
    m.mutations = tuple(_compile_mirror_mutation(mu, "%s.request_headers_mutations[%d]" % (field, i))
                        for i, mu in enumerate(p.request_headers_mutations))
    return m


def _compile_mirror_mutation(mu, field: str):
    """One ``mutation_rules.v3.HeaderMutation`` as ``op(headers, stream_info)``."""
    which = mu.WhichOneof("action")
    if which == "remove":
        name = mu.remove.lower()
        if not name or name[0] == ":" or name == "host":
            raise ConfigError(":-prefixed, host or empty headers may not be removed",
                              field + ".remove")
        return lambda h, si: h.remove(name)
    if which == "append":
        try:
            hm = compile_header_mutation([mu.append], (), "append")
        except ConfigError as e:
            raise e.within(field=field)
        return lambda h, si: hm.apply(h, si, h)
    if which == "remove_on_match":
        km = mu.remove_on_match.key_matcher
        sm = compile_string_matcher(km, field + ".remove_on_match.key_matcher")

        def remove_matching(h, si):
            h._h = [kv for kv in h._h if kv[0][0] == ":" or kv[0] == "host" or not sm.match(kv[0])]
        return remove_matching
    raise ConfigError("a header mutation action is required", field)


def _compile_redirect(e: RouteEntry, r, field: str) -> None:
    e.kind = REDIRECT
    e.redirect_status = _REDIRECT_CODES[r.response_code]
    scheme = r.scheme_redirect.lower() if r.WhichOneof("scheme_rewrite_specifier") == \
        "scheme_redirect" else ""
    https = r.https_redirect
    path_redirect = None
    path_has_query = False
    prefix_rewrite = None
    regex_rewrite = None
    pw = r.WhichOneof("path_rewrite_specifier")
    if pw == "path_redirect":
        path_redirect = r.path_redirect
        path_has_query = "?" in path_redirect
    elif pw == "prefix_rewrite":
        if e.p_kind == P_CONNECT:
            raise ConfigError("prefix_rewrite cannot be used with connect_matcher",
                              field + ".prefix_rewrite")
        prefix_rewrite = r.prefix_rewrite
    elif pw == "regex_rewrite":
        rr = r.regex_rewrite
        regex_rewrite = (compile_re2(rr.pattern.regex, field + ".regex_rewrite.pattern.regex"),
                         re2_substitution(rr.substitution))
    e._redirect = (https, scheme, r.host_redirect, r.port_redirect, path_redirect,
                   path_has_query, prefix_rewrite, regex_rewrite, r.strip_query)


def _data_source_bytes(ds, field: str, max_size: int) -> bytes:
    b = data_source_bytes(ds, field, max_size) or b""
    if len(b) > max_size:
        raise ConfigError("response body size is %d bytes; maximum is %d" % (len(b), max_size),
                          field)
    return b


def compile_route(r, vh, index: int, ctx) -> RouteEntry:
    """``ctx``: the route-config compile context (see table.py)."""
    field = "routes[%d]" % index
    check_fields(r, _ROUTE_FIELDS, "route")
    e = RouteEntry()
    e.name = r.name
    e.vhost_name = vh.name
    e.vhost = vh
    e.stat_prefix = r.stat_prefix
    # defaults for every slot
    e.cluster = ""
    e.cluster_header = ""
    e.weighted = ()
    e.total_weight = 0
    e.weight_header = ""
    e.weight_by_hash = False
    e.cluster_not_found_response_code = 503
    e.metadata_match = None
    e.timeout = DEFAULT_TIMEOUT
    e.idle_timeout = None
    e.retry = None
    e.hedge_on_per_try_timeout = vh.hedge
    e.rate_limits = ()
    e.include_vh_rate_limits = False
    e.hash_policies = ()
    e.max_stream_duration = None
    e.grpc_timeout_header_max = e.grpc_timeout_header_offset = None
    e.max_grpc_timeout = e.grpc_timeout_offset = None
    e.new_timeouts = e.duration = False
    e.prefix_rewrite = None
    e.regex_rewrite = None
    e.host_rewrite_literal = ""
    e.host_rewrite_header = ""
    e.host_rewrite_path_regex = None
    e.auto_host_rewrite = False
    e.append_x_forwarded_host = False
    e.upgrade_configs = {}
    e.mirror_policies = vh.mirror_policies
    e.priority = 0
    e.direct_status = 0
    e._direct_body = b""
    e.redirect_status = 0
    e._redirect = None
    e.include_request_attempt_count = vh.include_request_attempt_count
    e.include_attempt_count_in_response = vh.include_attempt_count_in_response
    e.include_is_timeout_retry_header = vh.include_is_timeout_retry_header
    e.per_request_buffer_limit_bytes = u32(r, "per_request_buffer_limit_bytes",
                                           vh.per_request_buffer_limit_bytes)
    e.metadata = _metadata_dict(r.metadata) if r.HasField("metadata") else None
    try:
        e.trace = None
        # the decorator: the span's name (and x-envoy-decorator-operation upstream), tracing only
        e.decorator_operation = r.decorator.operation if r.HasField("decorator") else ""
        e.decorator_propagate = not r.HasField("decorator") or not r.decorator.HasField("propagate") \
            or r.decorator.propagate.value
        if r.HasField("decorator") and not e.decorator_operation:
            raise ConfigError("decorator.operation must not be empty", "decorator.operation")
        if r.HasField("tracing"):
            try:
                e.trace = compile_route_trace(r.tracing)
            except ConfigError as err:
                raise err.within(field="tracing")
        if not r.HasField("match"):
            raise ConfigError("match is required", "match")
        _compile_match(e, r.match, "match")
        action = r.WhichOneof("action")
        if action == "route":
            _compile_action(e, r.route, vh.retry, "route", None)
        elif action == "redirect":
            _compile_redirect(e, r.redirect, "redirect")
        elif action == "direct_response":
            d = r.direct_response
            e.kind = DIRECT_RESPONSE
            if not 200 <= d.status < 600:
                raise ConfigError("status must be in [200, 600)", "direct_response.status")
            if d.HasField("body_format"):
                raise ConfigError("body_format is not supported", "direct_response.body_format")
            e.direct_status = d.status
            if d.HasField("body"):
                e._direct_body = _data_source_bytes(d.body, "direct_response.body",
                                                    ctx.max_direct_body)
        elif action is None:
            raise ConfigError("an action (route, redirect or direct_response) is required",
                              "action")
        else:
            raise ConfigError("route action '%s' is not supported" % action, action)
        check_filter_configs(r.typed_per_filter_config)
        rq = compile_header_mutation(r.request_headers_to_add, r.request_headers_to_remove,
                                     "request")
        rs = compile_header_mutation(r.response_headers_to_add, r.response_headers_to_remove,
                                     "response")
    except ConfigError as err:
        raise err.within(field=field)
    levels_req = [rq, vh.request_mutation, ctx.request_mutation]
    levels_resp = [rs, vh.response_mutation, ctx.response_mutation]
    if ctx.most_specific_wins:
        levels_req.reverse()
        levels_resp.reverse()
    e._req_mutations = tuple(m for m in levels_req if not m.empty)
    e._resp_mutations = tuple(m for m in levels_resp if not m.empty)
    e.req_lit = literal_tail(e._req_mutations) if e._req_mutations else None
    tpfc = dict(ctx.typed_per_filter_config)
    tpfc.update(vh.typed_per_filter_config)
    tpfc.update(r.typed_per_filter_config)
    e.typed_per_filter_config = tpfc
    # every filter name with a per-route config on this route (its own, its vhost's, its table's,
    # its weighted clusters'): the HCM's chain plan reads it to know whether a filter that is
    # inert by its own config has something to do on this route (filters/network/http_connection_manager.py)
    names = set(tpfc)
    for cw in e.weighted or ():
        names.update(cw.typed_per_filter_config)
    _compile_cors(e, r, vh, ctx, names, field)
    e.filter_names = frozenset(names)
    plan_route(e)  # what the compiled stream path does on this route (routing/plan.py)
    return e


_CORS_KEYS = frozenset(("envoy.filters.http.cors", "envoy.cors"))


def _compile_cors(e, r, vh, ctx, names, field) -> None:
    """The cors filter's policy on the route (``e.cors``, filters/http/cors.py compile_route_cors,
    registry category ``route_policy``): from the per-filter configs, else the deprecated ``cors``
    of the RouteAction and VirtualHost. A route with one names the cors filter in ``names``."""
    e.cors = None
    if e.kind != ROUTE:
        return  # (Envoy: no route entry, no CORS, for redirects and direct responses)
    action_cors = r.route.cors if r.route.HasField("cors") else None
    if action_cors is None and vh.cors is None and _CORS_KEYS.isdisjoint(names):
        return
    try:
        e.cors = REGISTRY.lookup("route_policy", "cors")(
            ctx.typed_per_filter_config, vh.typed_per_filter_config, r.typed_per_filter_config,
            action_cors, vh.cors)
    except ConfigError as err:
        raise err.within(field=field)
    if e.cors is not None:
        names.add("envoy.filters.http.cors")


def tls_redirect_entry(vh, ctx) -> RouteEntry:
    """The synthetic redirect Envoy answers with when a vhost's ``require_tls`` is not met."""
    e = RouteEntry.__new__(RouteEntry)
    for s in RouteEntry.__slots__:
        setattr(e, s, None)
    e.name = ""
    e.vhost_name = vh.name
    e.vhost = vh
    e.kind = REDIRECT
    e.redirect_status = 301
    e.p_kind = P_PREFIX
    e.p_value = ""
    e._redirect = (True, "", "", 0, None, False, None, None, False)
    e._req_mutations = ()
    e._resp_mutations = ()
    e.req_lit = None
    e.typed_per_filter_config = {}
    e.filter_names = frozenset()
    e.cors = None
    e.hash_policies = ()
    e.timeout = DEFAULT_TIMEOUT
    e.weighted = ()
    e.cluster = ""
    e.cluster_header = ""
    e.auto_host_rewrite = False
    e.direct_status = 0
    e._direct_body = b""
    e.mirror_policies = ()
    e.hedge_on_per_try_timeout = False
    e.rate_limits = ()
    e.include_vh_rate_limits = False
    e.upgrade_configs = {}
    e.retry = None
    plan_route(e)
    return e
