"""One compiled route at traffic time: its match and its action (forward, direct response or
redirect). Built from the proto by ``route_compile.compile_route``."""

from __future__ import annotations

from .matchers import parse_query, path_only
from .policies import combine_hashes

ROUTE = 0
DIRECT_RESPONSE = 1
REDIRECT = 2

DEFAULT_TIMEOUT = 15.0

# path match kinds
P_PREFIX, P_PATH, P_REGEX, P_SEP_PREFIX, P_CONNECT = range(5)


def _is_grpc(headers) -> bool:
    ct = headers.get("content-type")
    if not ct or not ct.startswith("application/grpc"):
        return False
    return len(ct) == 16 or ct[16] in "+;"


def _metadata_dict(md) -> dict:
    from google.protobuf import json_format
    return json_format.MessageToDict(md)


class ClusterChoice:
    """One entry of ``weighted_clusters`` with its own header mutations and filter configs."""

    __slots__ = ("name", "cluster_header", "weight", "request_mutation", "response_mutation",
                 "typed_per_filter_config", "host_rewrite_literal", "metadata_match")

    def __repr__(self):
        return "ClusterChoice(%s, %d)" % (self.name or self.cluster_header, self.weight)


class MirrorPolicy:
    """One ``request_mirror_policies`` entry, compiled. ``shadow_headers`` makes the mirror's
    request head from the routed request's (Envoy's shadow writer: ``-shadow`` appended to the host
    before its port, unless ``disable_shadow_host_suffix_append`` or ``host_rewrite_literal``, which
    replaces the host; then ``request_headers_mutations`` in order; ``x-envoy-internal`` set).
    ``trace_sampled`` only steers a tracing span, and pyproxy has no tracer: nothing to do."""

    __slots__ = ("cluster", "cluster_header", "numerator", "denominator", "host_rewrite_literal",
                 "suffix", "mutations")

    def sampled(self, random_value: int) -> bool:
        return random_value % self.denominator < self.numerator

    def cluster_name(self, headers) -> str:
        """The mirror's cluster ("" when ``cluster_header`` is missing or empty)."""
        if self.cluster:
            return self.cluster
        return headers.get(self.cluster_header) or ""

    def shadow_headers(self, headers, stream_info=None):
        h = headers.copy()
        if self.host_rewrite_literal:
            h.set(":authority", self.host_rewrite_literal)
        elif self.suffix:
            host = h.get(":authority")
            if host:
                h.set(":authority", shadow_host(host))
        for op in self.mutations:
            op(h, stream_info)
        h.set("x-envoy-internal", "true")
        return h


def shadow_host(host: str) -> str:
    """``svc:8080`` -> ``svc-shadow:8080``, ``svc`` -> ``svc-shadow`` (Envoy: the suffix goes before
    the port, which is after the last ':' unless that is inside an IPv6 literal)."""
    i = host.rfind(":")
    if i < 0 or host.rfind("]") > i:
        return host + "-shadow"
    return host[:i] + "-shadow" + host[i:]


class RouteEntry:
    """A compiled route. Immutable after ``compile_route``; read by the router per request."""

    __slots__ = (
        # identity
        "name", "vhost_name", "vhost", "kind", "stat_prefix",
        # the route's plan (routing/plan.py, decided when the route compiles)
        "fast", "inline", "resp_raw", "timeout_ms", "fast_rewrites", "retry_codes", "grpc_router",
        "req_tail",
        # match
        "p_kind", "p_value", "p_ci", "header_matchers", "query_matchers", "runtime", "grpc_only",
        # forward
        "cluster", "cluster_header", "weighted", "total_weight", "weight_header", "weight_by_hash",
        "cluster_not_found_response_code", "metadata_match", "timeout", "idle_timeout",
        "retry", "hedge_on_per_try_timeout", "hash_policies", "max_stream_duration",
        "rate_limits", "include_vh_rate_limits", "grpc_timeout_header_max",
        "grpc_timeout_header_offset", "max_grpc_timeout", "grpc_timeout_offset", "new_timeouts", "duration",
        "prefix_rewrite", "regex_rewrite", "host_rewrite_literal",
        "host_rewrite_header", "host_rewrite_path_regex", "auto_host_rewrite",
        "append_x_forwarded_host", "upgrade_configs", "mirror_policies", "priority",
        "include_request_attempt_count", "include_attempt_count_in_response", "include_is_timeout_retry_header",
        "per_request_buffer_limit_bytes", "typed_per_filter_config", "filter_names", "metadata",
        # the cors filter's policy on this route (filters/http/cors.py CorsPolicy) or None
        "cors",
        # tracing: the route's tracing block (tracing/request_id.py RouteTrace), or None
        "trace", "decorator_operation", "decorator_propagate",
        # header mutations (ordered, non-empty only); ``req_lit``: the request ones as
        # header_mutation.literal_tail compiles them, or None
        "_req_mutations", "_resp_mutations", "req_lit",
        # direct response / redirect
        "direct_status", "_direct_body", "redirect_status", "_redirect",
    )

    # -- matching (hot path) -------------------------------------------------------------------
    def matches(self, headers, path, path_nq, lpath_nq, is_connect, random_value, qcache) -> bool:
        k = self.p_kind
        if k == P_CONNECT:
            if not is_connect:
                return False
        elif is_connect or path is None:
            return False
        elif k == P_PREFIX:
            if not (lpath_nq if self.p_ci else path_nq).startswith(self.p_value):
                return False
        elif k == P_PATH:
            if (lpath_nq if self.p_ci else path_nq) != self.p_value:
                return False
        elif k == P_REGEX:
            if self.p_value.fullmatch(path_nq) is None:
                return False
        else:
            p = lpath_nq if self.p_ci else path_nq
            v = self.p_value
            if not (p == v or (p.startswith(v) and p[len(v)] == "/")):
                return False
        if self.runtime is not None:
            if random_value % self.runtime[1] >= self.runtime[0]:
                return False
        if self.grpc_only and not _is_grpc(headers):
            return False
        if self.header_matchers:
            for m in self.header_matchers:
                if not m.match(headers):
                    return False
        if self.query_matchers:
            q = qcache[0]
            if q is None:
                q = qcache[0] = parse_query(path or "")
            for m in self.query_matchers:
                if not m.match(q):
                    return False
        return True

    # -- cluster selection ---------------------------------------------------------------------
    def select_cluster(self, headers, random_value: int = 0, source_ip=None, stream_info=None):
        """``(cluster name, ClusterChoice | None)``; the name is "" when ``cluster_header`` is
        missing from the request."""
        if self.cluster:
            return self.cluster, None
        if self.cluster_header:
            return headers.get(self.cluster_header) or "", None
        if not self.weighted:
            return "", None
        value = random_value
        if self.weight_header:
            hv = headers.get(self.weight_header)
            if hv is not None:
                try:
                    value = int(hv)
                except ValueError:
                    pass
        elif self.weight_by_hash:
            h = self.hash_key(headers, source_ip, stream_info)
            if h is not None:
                value = h
        selected = value % self.total_weight
        end = 0
        for cw in self.weighted:
            end += cw.weight
            if selected < end:
                if cw.name:
                    return cw.name, cw
                return headers.get(cw.cluster_header) or "", cw
        cw = self.weighted[-1]
        return (cw.name or headers.get(cw.cluster_header) or ""), cw

    def hash_key(self, headers, source_ip=None, stream_info=None):
        """The request's hash for ring-hash/maglev, or None (no policy produced one)."""
        if not self.hash_policies:
            return None
        return combine_hashes(self.hash_policies, headers, source_ip, stream_info)

    # -- request / response rewriting ----------------------------------------------------------
    def rewrite_request(self, headers, choice=None, insert_original_path: bool = True) -> None:
        """Host and path rewrites. Call after ``finalize_request_headers`` (Envoy's order). Sets
        ``x-envoy-original-path`` when the path is rewritten (as Envoy's router does unless
        ``suppress_envoy_headers``)."""
        host = None
        if choice is not None and choice.host_rewrite_literal:
            host = choice.host_rewrite_literal
        elif self.host_rewrite_literal:
            host = self.host_rewrite_literal
        elif self.host_rewrite_header:
            host = headers.get(self.host_rewrite_header) or None
        elif self.host_rewrite_path_regex is not None:
            rx, sub = self.host_rewrite_path_regex
            host = rx.sub(sub, path_only(headers.get(":path", "")))
        if host:
            if self.append_x_forwarded_host:
                orig = headers.get(":authority")
                if orig and orig != host:
                    headers.add("x-forwarded-host", orig)
            headers.set(":authority", host)
        if self.prefix_rewrite is None and self.regex_rewrite is None:
            return
        path = headers.get(":path")
        if path is None:
            return
        new = self._rewritten_path(path, self.prefix_rewrite, self.regex_rewrite)
        if new is not None and new != path:
            if insert_original_path:
                headers.set("x-envoy-original-path", path)
            headers.set(":path", new)

    def _rewritten_path(self, path, prefix_rewrite, regex_rewrite):
        cut = len(path)
        for ch in "?#":
            i = path.find(ch)
            if 0 <= i < cut:
                cut = i
        nq, rest = path[:cut], path[cut:]
        if prefix_rewrite is not None:
            k = self.p_kind
            if k in (P_PREFIX, P_SEP_PREFIX):
                return prefix_rewrite + nq[len(self.p_value):] + rest
            if k in (P_PATH, P_REGEX):
                return prefix_rewrite + rest
            return None
        rx, sub = regex_rewrite
        return rx.sub(sub, nq) + rest

    def finalize_request_headers(self, headers, stream_info=None, choice=None) -> None:
        """``request_headers_to_add/remove``: weighted cluster, then route, virtual host and route
        configuration (reversed with ``most_specific_header_mutations_wins``)."""
        if choice is not None and not choice.request_mutation.empty:
            choice.request_mutation.apply(headers, stream_info, headers)
        for m in self._req_mutations:
            m.apply(headers, stream_info, headers)

    def finalize_response_headers(self, headers, stream_info=None, choice=None,
                                  request_headers=None) -> None:
        if choice is not None and not choice.response_mutation.empty:
            choice.response_mutation.apply(headers, stream_info, request_headers, headers)
        for m in self._resp_mutations:
            m.apply(headers, stream_info, request_headers, headers)

    # -- direct response / redirect ------------------------------------------------------------
    def direct_body(self, stream_info=None, request_headers=None) -> bytes:
        return self._direct_body

    def redirect_location(self, headers) -> str:
        (https, scheme, host, port, path_redirect, path_has_query, prefix_rewrite, regex_rewrite,
         strip_query) = self._redirect
        xfp = headers.get("x-forwarded-proto") or headers.get(":scheme") or "http"
        if scheme:
            new_scheme = scheme
        elif https:
            new_scheme = "https"
        else:
            new_scheme = xfp
        new_port = ":%d" % port if port else ""
        if host:
            new_host = host
        else:
            new_host = headers.get(":authority") or ""
            if new_host:
                if new_host[0] == "[":
                    end = new_host.rfind("]:")
                    end = end + 1 if end >= 0 else -1
                else:
                    end = new_host.rfind(":")
                if end >= 0:
                    req_port = new_host[end:]
                    remove = bool(new_port)
                    if new_scheme != xfp:
                        remove = remove or (xfp == "https" and req_port == ":443")
                        remove = remove or (xfp == "http" and req_port == ":80")
                    if remove:
                        new_host = new_host[:end]
        cur = headers.get(":path") or "/"
        if path_redirect is not None:
            if path_has_query:
                return "%s://%s%s%s" % (new_scheme, new_host, new_port, path_redirect)
            q = cur.find("?")
            new_path = path_redirect + (cur[q:] if q >= 0 else "")
        elif prefix_rewrite is not None or regex_rewrite is not None:
            new_path = self._rewritten_path(cur, prefix_rewrite, regex_rewrite) or cur
        else:
            new_path = cur
        if strip_query:
            q = new_path.find("?")
            if q >= 0:
                new_path = new_path[:q]
        return "%s://%s%s%s" % (new_scheme, new_host, new_port, new_path)

    def per_filter_config(self, filter_name: str, choice=None):
        """The raw ``Any`` for ``filter_name`` (weighted cluster > route > vhost > route config)."""
        if choice is not None and filter_name in choice.typed_per_filter_config:
            return choice.typed_per_filter_config[filter_name]
        return self.typed_per_filter_config.get(filter_name)

    def __repr__(self):
        return "RouteEntry(%r, vhost=%r)" % (self.name, self.vhost_name)
