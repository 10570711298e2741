"""A route's plan: what the compiled stream path does for a request on it, decided when the route
compiles (``compile_route`` calls ``plan_route`` last), never at the first request.

- ``fast``: a cluster route whose first attempt the stream itself can run (the HCM's compiled
  path, ``http/first_attempt.py``), without the router filter's objects: no hash policy, host
  rewrite from the host, gRPC timeout header, cluster header, hashed or header-weighted
  clusters, mirror, hedge or ``include_attempt_count_in_response``. A retry policy does not keep a route off it: its retry state is
  made only when an attempt fails (``retry_codes`` below; the router filter's ``adopt`` takes the
  request over at that point).
- ``inline``: a complete, bodiless request on it may be served by the connection manager's inline
  stream (``http/conn_manager.py HttpConnection.on_request``: no ``StreamInfo`` made unless read,
  no timers), and on HTTP/1.1 have its response head relayed as bytes (``http/h1_relay.py``): a
  ``fast`` route whose header mutations need no ``StreamInfo`` (literal request values that are
  not hop-by-hop, response mutations that ``resp_raw`` compiles), without a
  ``max_stream_duration`` of its own (that needs the stream's timer).
- ``resp_raw``: the route's response header mutations (route, virtual host, route table) as the
  byte relay applies them: ``(drop, lines, names)``, the upstream header names (bytes) they remove
  or overwrite, the header lines (bytes) they add at the mutation's place (after
  ``x-envoy-upstream-service-time``), and every name they touch; None when the route has none.
  Compiled when every value is a literal and every action is decided without the response
  (remove, append, overwrite-or-add); any other mutation keeps the route's responses on the
  ``Headers`` path (``inline`` False).
- ``timeout_ms``: the route timeout as ``x-envoy-expected-rq-timeout-ms`` announces it.
- ``fast_rewrites``: whether ``rewrite_request`` has anything to do (path, host rewrites).
- ``req_tail``: the router's request headers for a first attempt, compiled (``request_tail``).
- ``retry_codes``: None without a retry policy; else the upstream response statuses the policy
  may retry (``ALL`` when the decision needs the response headers: ``retriable-headers``,
  ``envoy-ratelimited``). A response with any other status goes downstream as it is, with no
  retry state made.
- ``grpc_router``: a gRPC request on the route takes the router filter from the start
  (``http/first_attempt.py chain_is_inert``): the retry policy retries gRPC statuses, or the route
  reads the ``grpc-timeout`` header (``max_grpc_timeout``, the router's timeout; Istio sets
  ``max_grpc_timeout: 0s`` on its outbound routes; or ``max_stream_duration.grpc_timeout_header_max``,
  the stream's duration timer, on its inbound routes). Other requests on such a route stay on the
  compiled path.
"""

from __future__ import annotations

from ..http.http1_common import header_lines
from .header_mutation import literal_clear

# request headers a compiled route may not add (the HTTP/1.1 hop-by-hop and framing headers, and
# the timeout header the stream appends itself)
_NOT_ADDED = frozenset(("connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade",
                        "te", "content-length", "x-envoy-expected-rq-timeout-ms"))
_NOT_REMOVED = _NOT_ADDED - {"x-envoy-expected-rq-timeout-ms"}
# response headers the byte relay writes itself (framing, hop-by-hop, server, date, the decorator,
# the upstream service time): a route mutation of one of them stays on the Headers path
_RESP_OWN = frozenset(("connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade",
                       "te", "content-length", "server", "date", "x-envoy-decorator-operation",
                       "x-envoy-upstream-service-time"))
_APPEND, _OVERWRITE = 0, 2  # (header_mutation's APPEND_IF_EXISTS_OR_ADD, OVERWRITE_IF_EXISTS_OR_ADD)


class _All:
    """Every status (``status in ALL`` is always true)."""

    __slots__ = ()

    def __contains__(self, status) -> bool:
        return True

    def __repr__(self):
        return "ALL"


ALL = _All()


def retry_codes(retry):
    """The statuses ``retry`` may retry (see the module docstring), or None without a policy."""
    if retry is None:
        return None
    ro = retry.retry_on
    if ("retriable-headers" in ro and retry.retriable_headers) or "envoy-ratelimited" in ro:
        return ALL
    codes = set()
    if "5xx" in ro:
        codes.update(range(500, 600))
    if "gateway-error" in ro:
        codes.update((502, 503, 504))
    if "retriable-4xx" in ro:
        codes.add(409)
    if "retriable-status-codes" in ro:
        codes.update(retry.retriable_status_codes)
    return frozenset(codes)


def plan_route(e) -> None:
    """Set ``e.fast``, ``e.inline``, ``e.resp_raw``, ``e.timeout_ms``, ``e.req_tail``, ``e.fast_rewrites``,
    ``e.retry_codes`` and ``e.grpc_router``
    (a compiled ``RouteEntry``)."""
    retry = e.retry
    e.retry_codes = retry_codes(retry) if e.kind == 0 else None
    e.grpc_router = bool(e.retry_codes is not None and retry.grpc_codes) or (
        e.kind == 0 and (e.max_grpc_timeout is not None or e.grpc_timeout_header_max is not None))
    e.fast_rewrites = bool(
        e.prefix_rewrite is not None or e.regex_rewrite is not None or e.host_rewrite_literal
        or e.host_rewrite_header or e.host_rewrite_path_regex is not None)
    fast = (e.kind == 0 and not e.hash_policies and not e.auto_host_rewrite and not e.cluster_header
            and not (e.weighted and (e.weight_by_hash or e.weight_header))
            and not e.mirror_policies and not e.hedge_on_per_try_timeout
            # (x-envoy-attempt-count on the response: the router filter writes it)
            and not e.include_attempt_count_in_response
            # (a per-try timeout would run on the first attempt too)
            and (retry is None or not (retry.per_try_timeout or retry.per_try_idle_timeout))
            # (the router decides per request whether the policy applies)
            and (retry is None or not retry.retriable_request_headers))
    e.fast = fast
    e.timeout_ms = str(int(e.timeout * 1000)) if e.kind == 0 and e.timeout else ""
    e.req_tail = request_tail(e)
    e.resp_raw = raw = compile_response_raw(e._resp_mutations)
    inline = False
    # (a route max_stream_duration needs the stream's timer: not the connection manager's inline stream)
    if fast and not e.max_stream_duration and (raw is not None or not e._resp_mutations):
        adds = [a for m in e._req_mutations for a in m.add]
        rms = [r for m in e._req_mutations for r in m.remove]
        for cw in e.weighted or ():
            if not cw.response_mutation.empty:
                adds = None
                break
            adds += cw.request_mutation.add
            rms += cw.request_mutation.remove
        if adds is not None and all(a[1] is None and a[0] not in _NOT_ADDED for a in adds) and \
                not any(r in _NOT_REMOVED for r in rms):
            inline = True
    e.inline = inline


_ROUTER_REQUEST_HEADERS = frozenset(("x-envoy-expected-rq-timeout-ms", "x-envoy-attempt-count"))


def request_tail(e):
    """``req_tail``: what the router appends to the request headers of a first attempt on this
    route (filters/http/router_steps.py finalize_request, for a request no filter touched, on the
    route's own cluster, with the route's timeout), compiled, or None: ``(names, tail, tail when
    the router suppresses its envoy headers, needs quiet, clear)``. It applies to a request that
    has none of ``names`` (None: no condition) and, when ``needs quiet``, no x-envoy-attempt-count
    (the HTTP/1.1 codec's ``quiet``): the request's lines of the names in ``clear`` (None: none),
    which the mutations overwrite or remove whatever the request has (header_mutation.py
    ``literal_clear``), are taken out (``take_out``), then the tail is appended."""
    if e.kind != 0 or not e.cluster or e.fast_rewrites:
        return None
    names = frozenset()
    lit = ()
    clear = frozenset()
    if e._req_mutations:
        if e.req_lit is None:
            return None
        names, lit = e.req_lit
        if not names.isdisjoint(_ROUTER_REQUEST_HEADERS):
            return None  # (finalize_request's check sees the router's own headers)
        clear = literal_clear(e._req_mutations)
        names = names - clear
    base = ((("x-envoy-attempt-count", "1"),) if e.include_request_attempt_count else ()) + tuple(lit)
    full = ((("x-envoy-expected-rq-timeout-ms", e.timeout_ms),) if e.timeout else ()) + base
    return names or None, full, base, bool(e.include_request_attempt_count), clear or None


def compile_response_raw(mutations):
    """The byte relay's form of a route's response header mutations (``resp_raw``, see the module
    docstring), or None: none, or one the relay cannot apply without the response."""
    if not mutations:
        return None
    drop = set()
    lines = []  # (name, value), in the order the Headers path leaves them
    for m in mutations:  # (header_mutation.HeaderMutation.apply's order: removals, overwrites, appends)
        for name in m.remove:
            if name in _RESP_OWN:
                return None
            drop.add(name)
            lines = [kv for kv in lines if kv[0] != name]
        over = []
        app = []
        for name, fmt, lit, action, keep_empty in m.add:
            if fmt is not None or name in _RESP_OWN or action not in (_APPEND, _OVERWRITE):
                return None
            if not lit and not keep_empty:
                continue
            (over if action == _OVERWRITE else app).append((name, lit))
        for name, value in over:
            drop.add(name)
            lines = [kv for kv in lines if kv[0] != name]
            lines.append((name, value))
        lines += app
    try:
        raw = header_lines(lines)
    except UnicodeEncodeError:
        return None  # (the Headers path encodes it as the codec does)
    names = frozenset(n.encode() for n in drop) | frozenset(kv[0].encode() for kv in lines)
    return frozenset(n.encode() for n in drop), raw, names
