"""``config.accesslog.v3.AccessLogFilter`` compiled into predicates ``f(si, req, resp, trailers)``."""

from __future__ import annotations

import random

from ..config.errors import ConfigError
from ..stream_info import RESPONSE_FLAGS

_DENOMINATORS = (100, 10000, 1000000)


def _grpc_status(si, rs, rt):
    for h in (rt, rs):
        if h is not None:
            v = h.get("grpc-status")
            if v is not None:
                try:
                    return int(v)
                except ValueError:
                    return 2
    code = si.response_code or 0
    if not code:
        return None
    # Envoy's HTTP → gRPC status mapping for responses without grpc-status
    return {400: 13, 401: 16, 403: 7, 404: 12, 429: 14, 502: 14, 503: 14, 504: 14}.get(code, 2)


def _duration_ms(si):
    end = getattr(si, "last_downstream_tx_byte", None) or si.end_monotonic
    if end is None:
        return None
    return int((end - si.start_monotonic) * 1000)


def _comparison(cmp, field):
    op = cmp.op
    value = cmp.value.default_value
    if op == 0:
        return lambda x: x == value
    if op == 1:
        return lambda x: x >= value
    if op == 2:
        return lambda x: x <= value
    if op == 3:
        return lambda x: x != value
    raise ConfigError("unknown comparison op %d" % op, field)


def compile_filter(f, field: str = "filter"):
    """A predicate for one AccessLogFilter; ``ConfigError`` for kinds pyproxy can't evaluate."""
    which = f.WhichOneof("filter_specifier")
    if which == "status_code_filter":
        c = _comparison(f.status_code_filter.comparison, field + ".status_code_filter")
        return lambda si, rq, rs, rt: c(si.response_code or 0)
    if which == "duration_filter":
        c = _comparison(f.duration_filter.comparison, field + ".duration_filter")

        def duration(si, rq, rs, rt):
            d = _duration_ms(si)
            return d is not None and c(d)
        return duration
    if which == "not_health_check_filter":
        return lambda si, rq, rs, rt: not getattr(si, "health_check", False)
    if which == "traceable_filter":
        # pyproxy does not trace: no request is traceable
        return lambda si, rq, rs, rt: bool(getattr(si, "traceable", False))
    if which == "runtime_filter":
        rf = f.runtime_filter
        if rf.HasField("percent_sampled"):
            num = rf.percent_sampled.numerator
            den = _DENOMINATORS[rf.percent_sampled.denominator]
        else:
            num, den = 0, 100
        rnd = random.Random()
        return lambda si, rq, rs, rt: rnd.randrange(den) < num
    if which in ("and_filter", "or_filter"):
        subs = tuple(compile_filter(x, "%s.%s.filters[%d]" % (field, which, i))
                     for i, x in enumerate(getattr(f, which).filters))
        if len(subs) < 2:
            raise ConfigError("at least two filters are required", field + "." + which)
        if which == "and_filter":
            return lambda si, rq, rs, rt: all(s(si, rq, rs, rt) for s in subs)
        return lambda si, rq, rs, rt: any(s(si, rq, rs, rt) for s in subs)
    if which == "header_filter":
        from ..routing.matchers import compile_header_matcher
        m = compile_header_matcher(f.header_filter.header, field + ".header_filter.header")
        return lambda si, rq, rs, rt: rq is not None and m.match(rq)
    if which == "response_flag_filter":
        flags = tuple(f.response_flag_filter.flags)
        for fl in flags:
            if fl not in RESPONSE_FLAGS:
                raise ConfigError("unknown response flag '%s'" % fl,
                                  field + ".response_flag_filter.flags")
        if not flags:
            return lambda si, rq, rs, rt: bool(si.response_flags)
        fs = frozenset(flags)
        return lambda si, rq, rs, rt: not fs.isdisjoint(si.response_flags)
    if which == "grpc_status_filter":
        statuses = frozenset(f.grpc_status_filter.statuses)
        exclude = f.grpc_status_filter.exclude

        def grpc(si, rq, rs, rt):
            s = _grpc_status(si, rs, rt)
            found = (s if s is not None else 2) in statuses
            return not found if exclude else found
        return grpc
    if which is None:
        raise ConfigError("empty access log filter", field)
    raise ConfigError("access log filter '%s' is not supported" % which, field + "." + which)
