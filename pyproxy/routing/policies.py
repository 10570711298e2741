"""Retry and hash policies of a route, compiled once."""

from __future__ import annotations

import time

from ..config.errors import ConfigError
from ..config.util import duration_s, request_header_name, u32
from ..formatter import strip_port
from .hashing import xxh64_str
from .matchers import compile_header_matcher, parse_query
from .regex import compile_re2, re2_substitution

_M64 = 0xFFFFFFFFFFFFFFFF

HTTP_RETRY_ON = frozenset({
    "5xx", "gateway-error", "reset", "reset-before-request", "connect-failure",
    "envoy-ratelimited", "retriable-4xx", "refused-stream", "retriable-status-codes",
    "retriable-headers", "http3-post-connect-failure",
})
GRPC_RETRY_ON = {
    "cancelled": 1, "deadline-exceeded": 4, "resource-exhausted": 8, "internal": 13,
    "unavailable": 14,
}


def parse_retry_on(value: str) -> frozenset:
    """The known policies in a comma-separated ``retry_on`` (or ``x-envoy-retry-on`` /
    ``x-envoy-retry-grpc-on`` header) value; unknown tokens are ignored, as Envoy does."""
    out = set()
    for tok in value.split(","):
        tok = tok.strip()
        if tok in HTTP_RETRY_ON or tok in GRPC_RETRY_ON:
            out.add(tok)
    return frozenset(out)


class RetryPolicy:
    """``route.v3.RetryPolicy``. Times are seconds (0 = not set)."""

    __slots__ = ("retry_on", "num_retries", "per_try_timeout", "per_try_idle_timeout",
                 "retriable_status_codes", "previous_hosts", "host_selection_max_attempts",
                 "backoff_base", "backoff_max", "retriable_headers", "retriable_request_headers",
                 "grpc_codes", "rate_limited_backoff", "unmatched")

    def should_retry_status(self, status: int, headers=None) -> bool:
        """Whether an upstream response with ``status`` (and response ``headers``) is retriable by
        the HTTP policies (the router also checks ``should_retry_grpc`` for gRPC responses)."""
        ro = self.retry_on
        if headers is not None and "x-envoy-ratelimited" in headers:
            return "envoy-ratelimited" in ro
        if status >= 500 and "5xx" in ro:
            return True
        if status in (502, 503, 504) and "gateway-error" in ro:
            return True
        if status == 409 and "retriable-4xx" in ro:
            return True
        if status in self.retriable_status_codes and "retriable-status-codes" in ro:
            return True
        if headers is not None and self.retriable_headers and "retriable-headers" in ro:
            for m in self.retriable_headers:
                if m.match(headers):
                    return True
        return False

    def should_retry_grpc(self, grpc_status: int) -> bool:
        return grpc_status in self.grpc_codes

    def excluded(self, request_headers):
        """The policy for a request ``retriable_request_headers`` excludes (Envoy's retry state
        with ``retry_on_ = 0``: never retried; the per-try timeout still applies), else None."""
        if not self.retriable_request_headers or \
                any(m.match(request_headers) for m in self.retriable_request_headers):
            return None
        return self.unmatched if self.unmatched is not None else self.with_retry_on(frozenset())

    def reset_interval(self, response_headers):
        """``rate_limited_retry_back_off``: the back-off a rate-limited response announces (its
        first reset header that parses, in seconds, up to ``max_interval``), else None."""
        rl = self.rate_limited_backoff
        if rl is None:
            return None
        heads, mx = rl
        for name, fmt in heads:
            v = response_headers.get(name)
            if v is None:
                continue
            v = v.strip()
            if not v.isdigit() or not v.isascii() or len(v) > 19:
                continue
            n = int(v)
            if fmt == 1:  # UNIX_TIMESTAMP
                now = int(time.time())
                if n < now:
                    continue
                n -= now
            if n <= mx:
                return float(n)
        return None

    def with_retry_on(self, retry_on: frozenset) -> "RetryPolicy":
        """A copy with another ``retry_on`` set (for ``x-envoy-retry-on`` overrides)."""
        p = RetryPolicy.__new__(RetryPolicy)
        for s in RetryPolicy.__slots__:
            setattr(p, s, getattr(self, s))
        p.retry_on = retry_on
        p.grpc_codes = frozenset(GRPC_RETRY_ON[t] for t in retry_on if t in GRPC_RETRY_ON)
        return p

    def __repr__(self):
        return "RetryPolicy(%s, num_retries=%d)" % (",".join(sorted(self.retry_on)),
                                                    self.num_retries)


_KNOWN_HOST_PREDICATES = {
    "envoy.retry_host_predicates.previous_hosts":
        "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate",
    "envoy.retry_host_predicates.omit_canary_hosts":
        "envoy.extensions.retry.host.omit_canary_hosts.v3.OmitCanaryHostsPredicate",
}


def compile_retry_policy(rp, field: str = "retry_policy") -> RetryPolicy:
    p = RetryPolicy()
    for f in ("retry_priority", "retry_options_predicates"):
        if (f == "retry_priority" and rp.HasField(f)) or (f != "retry_priority" and len(getattr(rp, f))):
            raise ConfigError("%s is not supported" % f, field + "." + f)
    p.retry_on = parse_retry_on(rp.retry_on)
    p.grpc_codes = frozenset(GRPC_RETRY_ON[t] for t in p.retry_on if t in GRPC_RETRY_ON)
    p.num_retries = u32(rp, "num_retries", 1)
    p.per_try_timeout = duration_s(rp, "per_try_timeout", 0.0)
    p.per_try_idle_timeout = duration_s(rp, "per_try_idle_timeout", 0.0)
    p.retriable_status_codes = frozenset(rp.retriable_status_codes)
    p.previous_hosts = False
    for i, pred in enumerate(rp.retry_host_predicate):
        tname = pred.typed_config.type_url.rpartition("/")[2] if pred.HasField("typed_config") else ""
        if pred.name == "envoy.retry_host_predicates.previous_hosts" or \
                tname == _KNOWN_HOST_PREDICATES["envoy.retry_host_predicates.previous_hosts"]:
            p.previous_hosts = True
        elif pred.name == "envoy.retry_host_predicates.omit_canary_hosts" or \
                tname == _KNOWN_HOST_PREDICATES["envoy.retry_host_predicates.omit_canary_hosts"]:
            pass  # pyproxy has no canary hosts: nothing to omit
        else:
            raise ConfigError("retry host predicate '%s' is not supported" % (pred.name or tname),
                              "%s.retry_host_predicate[%d]" % (field, i))
    p.host_selection_max_attempts = rp.host_selection_retry_max_attempts or 1
    p.backoff_base, p.backoff_max = 0.025, 0.25
    if rp.HasField("retry_back_off"):
        bo = rp.retry_back_off
        base = duration_s(bo, "base_interval", 0.0)
        if base <= 0:
            raise ConfigError("base_interval must be greater than 0",
                              field + ".retry_back_off.base_interval")
        mx = duration_s(bo, "max_interval", base * 10)
        if mx < base:
            raise ConfigError("max_interval must be greater than or equal to the base_interval",
                              field + ".retry_back_off.max_interval")
        p.backoff_base, p.backoff_max = base, mx
    p.retriable_headers = tuple(compile_header_matcher(h, "%s.retriable_headers[%d]" % (field, i), response=True)
                                for i, h in enumerate(rp.retriable_headers))
    p.retriable_request_headers = tuple(
        compile_header_matcher(h, "%s.retriable_request_headers[%d]" % (field, i))
        for i, h in enumerate(rp.retriable_request_headers))
    p.rate_limited_backoff = None
    if rp.HasField("rate_limited_retry_back_off"):
        rl = rp.rate_limited_retry_back_off
        p.rate_limited_backoff = (
            tuple((h.name.lower(), h.format) for h in rl.reset_headers),
            duration_s(rl, "max_interval", 300.0))
    p.unmatched = None
    if p.retriable_request_headers:
        p.unmatched = p.with_retry_on(frozenset())
    return p


def compile_hedge_policy(hp, field: str = "hedge_policy") -> bool:
    """``route.v3.HedgePolicy`` -> whether to hedge on a per-try timeout. Envoy implements only
    ``hedge_on_per_try_timeout``; its router never reads ``initial_requests`` or
    ``additional_request_chance``, so pyproxy rejects them rather than accept them silently."""
    if hp.HasField("initial_requests") and hp.initial_requests.value != 1:
        raise ConfigError("initial_requests other than 1 is not supported (Envoy does not "
                          "implement it either)", field + ".initial_requests")
    if hp.HasField("additional_request_chance") and hp.additional_request_chance.numerator:
        raise ConfigError("additional_request_chance is not supported (Envoy does not implement "
                          "it either)", field + ".additional_request_chance")
    return hp.hedge_on_per_try_timeout


# --------------------------------------------------------------------------------------------
# rate limit actions (route.v3.RateLimit): request -> descriptor entries, for local_ratelimit

_SKIP = object()  # an action that adds nothing but lets the descriptor go on
RL_ACTIONS = ("destination_cluster", "request_headers", "query_parameters", "remote_address",
              "generic_key", "header_value_match")


class RateLimitPolicy:
    """One ``RateLimit``: its actions make one descriptor (a tuple of (key, value)), or none."""

    __slots__ = ("stage", "disable_key", "actions", "unsupported")

    def descriptor(self, headers, cluster_name: str, remote_ip: str):
        if self.unsupported:
            return None
        out = []
        for a in self.actions:
            e = a(headers, cluster_name, remote_ip)
            if e is None:
                return None
            if e is not _SKIP:
                out.append(e)
        return tuple(out) if out else None


def _rl_action(a, field: str):
    which = a.WhichOneof("action_specifier")
    if which == "destination_cluster":
        return lambda h, c, ip: ("destination_cluster", c) if c else None
    if which == "generic_key":
        g = a.generic_key
        if not g.descriptor_value:
            raise ConfigError("descriptor_value must not be empty", field + ".generic_key.descriptor_value")
        entry = (g.descriptor_key or "generic_key", g.descriptor_value)
        return lambda h, c, ip: entry
    if which == "request_headers":
        rh = a.request_headers
        name = request_header_name(rh.header_name)
        key = rh.descriptor_key
        if not name or not key:
            raise ConfigError("header_name and descriptor_key are required", field + ".request_headers")
        skip = rh.skip_if_absent

        def request_headers(h, c, ip):
            v = h.get(name)
            if not v:
                return _SKIP if skip else None
            return (key, v)
        return request_headers
    if which == "query_parameters":
        qp = a.query_parameters
        name, key, skip = qp.query_parameter_name, qp.descriptor_key, qp.skip_if_absent
        if not name or not key:
            raise ConfigError("query_parameter_name and descriptor_key are required",
                              field + ".query_parameters")

        def query_parameters(h, c, ip):
            v = parse_query(h.get(":path", "")).get(name)
            if not v:
                return _SKIP if skip else None
            return (key, v)
        return query_parameters
    if which == "remote_address":
        return lambda h, c, ip: ("remote_address", strip_port(ip)) if ip else None
    if which == "header_value_match":
        hv = a.header_value_match
        if not hv.descriptor_value:
            raise ConfigError("descriptor_value must not be empty",
                              field + ".header_value_match.descriptor_value")
        matchers = tuple(compile_header_matcher(m, "%s.header_value_match.headers[%d]" % (field, i))
                         for i, m in enumerate(hv.headers))
        expect = hv.expect_match.value if hv.HasField("expect_match") else True
        entry = (hv.descriptor_key or "header_match", hv.descriptor_value)

        def header_value_match(h, c, ip):
            ok = all(m.match(h) for m in matchers)
            return entry if ok == expect else None
        return header_value_match
    return which or "an empty action"


def compile_rate_limit(rl, field: str, strict: bool) -> RateLimitPolicy:
    """``strict``: an action pyproxy cannot evaluate is a ConfigError (the local_ratelimit filter's
    own ``rate_limits``); otherwise (a route's, which a global rate limit service may be meant to
    read) the policy is kept and never produces a descriptor, and ``unsupported`` names why."""
    p = RateLimitPolicy()
    p.stage = rl.stage.value if rl.HasField("stage") else 0
    p.disable_key = rl.disable_key
    p.unsupported = ""
    acts = []
    for i, a in enumerate(rl.actions):
        f = "%s.actions[%d]" % (field, i)
        fn = _rl_action(a, f)
        if isinstance(fn, str):
            why = "rate limit action '%s' is not supported (supported: %s)" % (fn, ", ".join(RL_ACTIONS))
            if strict:
                raise ConfigError(why, f)
            p.unsupported = why
            continue
        acts.append(fn)
    if not len(rl.actions):
        raise ConfigError("at least one action is required", field + ".actions")
    for name in ("limit", "hits_addend"):
        if rl.HasField(name) and strict:
            raise ConfigError("%s is not supported for local rate limits" % name, field + "." + name)
    if rl.apply_on_stream_done and strict:
        raise ConfigError("apply_on_stream_done is not supported", field + ".apply_on_stream_done")
    p.actions = tuple(acts)
    return p


# --------------------------------------------------------------------------------------------
# hash policies

class HashPolicy:
    __slots__ = ("kind", "name", "terminal", "regex", "substitution")

    def compute(self, headers, source_ip, stream_info):
        kind = self.kind
        if kind == "header":
            vals = [v for k, v in headers.items() if k == self.name]
            if not vals:
                return None
            if self.regex is not None:
                vals = [self.regex.sub(self.substitution, v) for v in vals]
            if len(vals) > 1:
                vals.sort()
            return xxh64_str("".join(vals))
        if kind == "cookie":
            for k, v in headers.items():
                if k != "cookie":
                    continue
                for part in v.split(";"):
                    name, sep, val = part.strip().partition("=")
                    if sep and name == self.name:
                        if len(val) >= 2 and val[0] == '"' and val[-1] == '"':
                            val = val[1:-1]
                        return xxh64_str(val)
            return None
        if kind == "source_ip":
            if not source_ip:
                return None
            return xxh64_str(strip_port(source_ip))
        if kind == "query":
            v = parse_query(headers.get(":path", "")).get(self.name)
            return None if v is None else xxh64_str(v)
        # filter_state
        fs = getattr(stream_info, "filter_state", None) if stream_info is not None else None
        if not fs or self.name not in fs:
            return None
        obj = fs[self.name]
        h = getattr(obj, "hash", None)
        if callable(h):
            r = h()
            return None if r is None else r & _M64
        return xxh64_str(obj if isinstance(obj, str) else str(obj))


def compile_hash_policy(hp, field: str) -> HashPolicy:
    p = HashPolicy()
    p.terminal = hp.terminal
    p.regex = None
    p.substitution = ""
    which = hp.WhichOneof("policy_specifier")
    if which == "header":
        p.kind = "header"
        p.name = request_header_name(hp.header.header_name)
        if not p.name:
            raise ConfigError("header_name is required", field + ".header.header_name")
        if hp.header.HasField("regex_rewrite"):
            rr = hp.header.regex_rewrite
            p.regex = compile_re2(rr.pattern.regex, field + ".header.regex_rewrite.pattern.regex")
            p.substitution = re2_substitution(rr.substitution)
    elif which == "cookie":
        p.kind = "cookie"
        p.name = hp.cookie.name
        if not p.name:
            raise ConfigError("cookie name is required", field + ".cookie.name")
    elif which == "connection_properties":
        if not hp.connection_properties.source_ip:
            raise ConfigError("connection_properties without source_ip hashes nothing", field)
        p.kind = "source_ip"
        p.name = ""
    elif which == "query_parameter":
        p.kind = "query"
        p.name = hp.query_parameter.name
        if not p.name:
            raise ConfigError("query parameter name is required", field + ".query_parameter.name")
    elif which == "filter_state":
        p.kind = "filter_state"
        p.name = hp.filter_state.key
    else:
        raise ConfigError("hash policy '%s' is not supported" % which, field)
    return p


def combine_hashes(policies, headers, source_ip, stream_info):
    """Envoy's rule: rotate the running hash left by one and xor each new one; a terminal policy
    that produced a hash ends the list."""
    h = None
    for p in policies:
        v = p.compute(headers, source_ip, stream_info)
        if v is not None:
            h = v if h is None else (((h << 1) | (h >> 63)) & _M64) ^ v
        if p.terminal and h is not None:
            break
    return h
