"""The request headers Envoy keeps "inline" (its header map's fixed slots), and their coalescing.

Envoy 1.40 stores these request headers in fixed slots of its header map: a repeated one is not a
second entry but the first one's value with the next appended after a comma (``a,b``), whichever
codec parsed it; every other header keeps one entry per line (``cookie`` included). The list is
Envoy 1.40's own (its startup "HTTP header map info" log line for the request header map: the core
headers plus those its built-in extensions register), less the pseudo-headers and the framing
headers the codecs check line by line (``content-length``, ``transfer-encoding``).

The codecs call ``coalesce`` only when a head has a repeated name (HTTP/1.1: a set of the head's
names is shorter than its list; HTTP/2: once per distinct header block, memoized), so a request
without repeated names pays nothing here.
"""

from __future__ import annotations

INLINE_REQUEST = frozenset((
    "accept", "accept-encoding", "access-control-request-headers", "access-control-request-method",
    "access-control-request-private-network", "authentication", "authorization", "cache-control", "cdn-loop",
    "connection", "content-encoding", "content-type", "expect", "grpc-accept-encoding", "grpc-timeout",
    "if-match", "if-modified-since", "if-none-match", "if-range", "if-unmodified-since", "keep-alive", "origin",
    "pragma", "proxy-connection", "proxy-status", "referer", "te", "upgrade", "user-agent", "via",
    "x-client-trace-id", "x-envoy-attempt-count", "x-envoy-decorator-operation",
    "x-envoy-downstream-service-cluster", "x-envoy-downstream-service-node", "x-envoy-expected-rq-timeout-ms",
    "x-envoy-external-address", "x-envoy-force-trace", "x-envoy-hedge-on-per-try-timeout", "x-envoy-internal",
    "x-envoy-ip-tags", "x-envoy-is-timeout-retry", "x-envoy-max-retries", "x-envoy-original-host",
    "x-envoy-original-path", "x-envoy-original-url", "x-envoy-retriable-header-names",
    "x-envoy-retriable-status-codes", "x-envoy-retry-grpc-on", "x-envoy-retry-on", "x-envoy-upstream-alt-stat-name",
    "x-envoy-upstream-rq-per-try-timeout-ms", "x-envoy-upstream-rq-timeout-alt-response",
    "x-envoy-upstream-rq-timeout-ms", "x-envoy-upstream-stream-duration-ms", "x-forwarded-client-cert",
    "x-forwarded-for", "x-forwarded-host", "x-forwarded-port", "x-forwarded-proto", "x-request-id",
))


def coalesce(names: list, values: list) -> tuple:
    """A head's parallel name and value lists with each repeated inline header folded into its
    first entry (values joined by ``,``, in arrival order). Returns new ``(names, values)``."""
    first: dict = {}
    out_n: list = []
    out_v: list = []
    for n, v in zip(names, values):
        if n in INLINE_REQUEST:
            i = first.get(n)
            if i is not None:
                out_v[i] = out_v[i] + "," + v
                continue
            first[n] = len(out_n)
        out_n.append(n)
        out_v.append(v)
    return out_n, out_v


def coalesce_fields(fields: list) -> list:
    """``coalesce`` for a list of ``(name, value)`` pairs (an HTTP/2 header block)."""
    n, v = coalesce([kv[0] for kv in fields], [kv[1] for kv in fields])
    return list(zip(n, v))
