"""The router's control headers on an internal request (Envoy's ``finalHedgingParams``,
``finalTimeout``/``setTimeoutHeaders``, the timeout alt-response and ``RetryStateImpl``'s header
merge), a part of ``router.Router``.

The request preparation (http/request_prep.py) takes them out of an internal request's headers
(``Prepared.ctl``: name -> value; Envoy strips them from any other request), and such a request goes
to the router rather than the stream's own first attempt. Here, once per such request:

- ``x-envoy-hedge-on-per-try-timeout``: ``true``/``false`` replaces the route's hedging;
- ``x-envoy-upstream-rq-timeout-ms`` replaces the route timeout; with the router's
  ``respect_expected_rq_timeout``, a ``x-envoy-expected-rq-timeout-ms`` (set by an egress proxy)
  does instead and the former is ignored; ``x-envoy-upstream-rq-per-try-timeout-ms`` replaces the
  per-try timeout (dropped when not shorter than the route timeout); a value that is not a number
  changes nothing;
- ``x-envoy-expected-rq-timeout-ms`` is then written from those (the per-try timeout, else the
  route's; unless hedging), unless ``suppress_envoy_headers`` or no timeout: then the client's
  value goes on as it came;
- ``x-envoy-upstream-rq-timeout-alt-response`` (any value): a timeout answers 204 with no body
  instead of 504 (``timeout_reply``);
- ``x-envoy-retry-on`` / ``x-envoy-retry-grpc-on`` add their (HTTP / gRPC) policies to the route's;
  with any policy, ``x-envoy-max-retries`` replaces the number of retries (1 without a route
  policy), ``x-envoy-retriable-status-codes`` adds status codes and
  ``x-envoy-retriable-header-names`` adds response headers (present) for the retriable-* policies.

``x-envoy-upstream-alt-stat-name`` is consumed without effect (pyproxy keeps no per-request stat
namespace).
"""

from __future__ import annotations

from envoy.config.route.v3 import route_components_pb2

from ...http.grpc_timeout import to_grpc_timeout
from ...routing.matchers import compile_header_matcher
from ...routing.policies import GRPC_RETRY_ON, HTTP_RETRY_ON, RetryPolicy, compile_retry_policy, parse_retry_on
from .router_steps import finalize_request

EXPECTED = "x-envoy-expected-rq-timeout-ms"
ALT_RESPONSE = "x-envoy-upstream-rq-timeout-alt-response"
# the retry state of a route without a retry policy (Envoy's defaults: one retry, 25 ms backoff)
_DEFAULT_POLICY = compile_retry_policy(route_components_pb2.RetryPolicy())
_NO_RETRY = _DEFAULT_POLICY.with_retry_on(frozenset())
_NO_RETRY.num_retries = 0


def _ms(value):
    """A header's milliseconds (Envoy's SimpleAtoi on an unsigned number), or None."""
    v = value.strip()
    if v[:1] == "+":
        v = v[1:]
    if not v.isdigit() or not v.isascii() or len(v) > 19:
        return None
    return int(v)


def _copy(p: RetryPolicy) -> RetryPolicy:
    return p.with_retry_on(p.retry_on)


def apply(router, route, headers, timeout: float, ctl: dict, si, choice):
    """Set the router's ``timeout``, ``retry``, ``retries_left`` and ``hedge`` for an internal
    request carrying control headers, and its first attempt's headers (``finalize_request``).
    Returns the retry policy (None: no retry state)."""
    cfg = router.cfg
    rp = route.retry
    # hedging
    hedge = route.hedge_on_per_try_timeout
    v = ctl.get("x-envoy-hedge-on-per-try-timeout")
    if v == "true":
        hedge = True
    elif v == "false":
        hedge = False
    # timeouts, in milliseconds
    glob = int(round(timeout * 1000)) if timeout else 0
    per_try = int(round(rp.per_try_timeout * 1000)) if rp is not None and rp.per_try_timeout else 0
    client_expected = ctl.get(EXPECTED)
    v = None
    if cfg.respect_expected_rq_timeout and client_expected is not None:
        v = client_expected
    elif "x-envoy-upstream-rq-timeout-ms" in ctl:
        v = ctl["x-envoy-upstream-rq-timeout-ms"]
    if v is not None:
        n = _ms(v)
        if n is not None:
            glob = n
    v = ctl.get("x-envoy-upstream-rq-per-try-timeout-ms")
    if v is not None:
        n = _ms(v)
        if n is not None:
            per_try = n
    if glob and per_try >= glob:
        per_try = 0
    expected = per_try if per_try and not hedge else glob
    if expected and glob:
        expected = min(expected, glob)
    if expected and not cfg.suppress_envoy_headers:
        headers.set(EXPECTED, str(expected))
    elif client_expected is not None:
        headers.set(EXPECTED, client_expected)  # (Envoy leaves the client's in place)
    if expected and router.grpc and route.max_grpc_timeout is not None:
        headers.set("grpc-timeout", to_grpc_timeout(expected))  # (as setTimeoutHeaders)
    router.timeout = timeout = glob / 1000.0
    finalize_request(route, headers, 0, cfg.suppress_envoy_headers, si, choice)
    # the retry state
    ro = ctl.get("x-envoy-retry-on")
    gro = ctl.get("x-envoy-retry-grpc-on")
    if ro is not None or gro is not None or (rp is not None and rp.retry_on):
        base = rp if rp is not None else _DEFAULT_POLICY
        retry_on = base.retry_on
        if ro is not None:
            retry_on = retry_on | (parse_retry_on(ro) & HTTP_RETRY_ON)
        if gro is not None:
            retry_on = retry_on | frozenset(t for t in parse_retry_on(gro) if t in GRPC_RETRY_ON)
        retry = base.with_retry_on(retry_on)
        v = ctl.get("x-envoy-max-retries")
        if retry_on and v is not None:
            n = _ms(v)
            if n is not None:
                retry.num_retries = n
        v = ctl.get("x-envoy-retriable-status-codes")
        if v is not None:
            codes = {int(c) for c in (t.strip() for t in v.split(",")) if c.isdigit() and c.isascii() and len(c) < 10}
            retry.retriable_status_codes = retry.retriable_status_codes | codes
        v = ctl.get("x-envoy-retriable-header-names")
        if v is not None:
            extra = []
            for name in v.split(","):
                name = name.strip()
                if name:
                    extra.append(compile_header_matcher(route_components_pb2.HeaderMatcher(
                        name=name, present_match=True)))
            retry.retriable_headers = tuple(retry.retriable_headers) + tuple(extra)
    else:
        retry = rp
    pt = per_try / 1000.0
    if (retry.per_try_timeout if retry is not None else 0.0) != pt:
        retry = _copy(retry if retry is not None else _NO_RETRY)
        retry.per_try_timeout = pt
    router.retry = retry
    router.retries_left = retry.num_retries if retry is not None else 0
    router.hedge = hedge and retry is not None
    return retry


def timeout_reply(router, details: str) -> tuple:
    """The local reply for a timeout: 504, or 204 with no body when the internal request carried
    ``x-envoy-upstream-rq-timeout-alt-response``."""
    ctl = router.s.ctl
    if ctl is not None and ALT_RESPONSE in ctl:
        return 204, "", details, "UT"
    return 504, "upstream request timeout", details, "UT"
