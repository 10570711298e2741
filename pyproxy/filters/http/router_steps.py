"""The router's per-request steps, defined once: the router filter (``router.py``) and the stream's
own first attempt (``http/first_attempt.py``, for a request whose filters the plans show inert)
both call them.

- ``finalize_request``: what the router does to the request headers, in Envoy's order
  (``x-envoy-expected-rq-timeout-ms``, ``x-envoy-attempt-count``, the route's header mutations,
  its host and path rewrites);
- ``finalize_response``: what it does to the upstream's response headers
  (``x-envoy-upstream-service-time``, the route's response header mutations); the byte relay
  (``http/h1_relay.py``) writes the same from the route's compiled ``resp_raw``;
- the local replies for upstream failures (503 UH/UF/UO/UR, 504 UT: ``NO_HEALTHY``,
  ``connect_failure``, ``reset_failure``, ``TIMEOUT``) and ``charge_failure``, what such a reply
  counts (Envoy's ``chargeUpstreamAbort``) and how a retried request's reply reads;
- ``count_rx_reset``, ``upstream_timeout``, ``retries_reset``: the counters and the retry
  policy's reading of resets.
"""

from __future__ import annotations

import time
from operator import itemgetter

from ...cluster.code_stats import charge_internal

_monotonic = time.monotonic
_first = itemgetter(0)

RESET_BODY = "upstream connect error or disconnect/reset before headers. "
# a local reply for an upstream failure (a reset, a failed connection, a timeout) is charged to
# the cluster's upstream_rq_<code>, as Envoy's chargeUpstreamAbort does
CHARGED = frozenset(("UF", "UR", "UC", "UT", "UO", "UPE"))
# (status, body, response code details, response flag)
NO_HEALTHY = (503, "no healthy upstream", "no_healthy_upstream", "UH")
TIMEOUT = (504, "upstream request timeout", "response_timeout", "UT")  # (the route timeout)
OVERFLOW = (503, RESET_BODY + "reset reason: overflow", "upstream_reset_before_response_started{overflow}", "UO")
# the header of a reply for a request the circuit breakers dropped (flag UO), unless the router's
# suppress_envoy_headers (Envoy's onUpstreamAbort with ``dropped``)
OVERLOADED = {"x-envoy-overloaded": "true"}


def finalize_request(route, headers, timeout: float, suppress: bool, si, choice, fresh: bool = False,
                     quiet: bool = False) -> None:
    """The router's request headers for a first attempt. ``timeout``: the request's timeout (the
    route's, or from ``grpc-timeout``), announced in ``x-envoy-expected-rq-timeout-ms`` unless
    the router's ``suppress_envoy_headers``; ``fresh``: no filter has touched the headers since
    the request preparation removed any such header the client sent (it is appended); ``quiet``:
    the request carries no ``x-envoy-attempt-count`` either (the HTTP/1.1 codec noted none)."""
    if timeout and not suppress:
        ms = route.timeout_ms if timeout == route.timeout else str(int(timeout * 1000))
        if fresh:
            headers._h.append(("x-envoy-expected-rq-timeout-ms", ms))
        else:
            headers.set("x-envoy-expected-rq-timeout-ms", ms)
    if route.include_request_attempt_count:  # (every attempt carries its number)
        if quiet:
            headers._h.append(("x-envoy-attempt-count", "1"))  # (none to replace)
        else:
            headers.set("x-envoy-attempt-count", "1")
    if route._req_mutations or choice is not None:
        lit = route.req_lit  # (literal mutations, compiled: routing/header_mutation.py literal_tail)
        if lit is not None and choice is None and (not lit[0] or lit[0].isdisjoint(map(_first, headers._h))):
            headers._h += lit[1]
        else:
            route.finalize_request_headers(headers, si, choice)
    if choice is not None or route.fast_rewrites:
        route.rewrite_request(headers, choice)


def finalize_response(route, headers, start: float, suppress: bool, si, choice, request_headers) -> None:
    """The router's response headers (the upstream's answer is going downstream)."""
    if not suppress:
        headers._h.append(("x-envoy-upstream-service-time", str(int((_monotonic() - start) * 1000))))
    if route._resp_mutations or choice is not None:
        if si is not None:
            # %RESPONSE_CODE% in the route's response mutations is the status going downstream
            # (the stream records the same value again when it sends the head)
            h = headers._h
            if h and h[0][0] == ":status" and h[0][1].isdigit():
                si.response_code = int(h[0][1])
        route.finalize_response_headers(headers, si, choice, request_headers)


def connect_failure(reason: str, flag: str):
    """The local reply for a connection the pool could not give (``flag`` UO: overflow, else UF)."""
    if flag == "UO":
        return OVERFLOW
    why = "connection timeout" if reason.startswith("connection timeout") else "remote connection failure"
    # (Envoy's details name the transport failure reason of a failed connect after the reset's)
    tfr = "|" + reason if reason.startswith("delayed connect error") else ""
    return (503, RESET_BODY + "reset reason: " + why,
            "upstream_reset_before_response_started{%s}" % (why + tfr).replace(" ", "_"), "UF")


def reset_failure(reason: str):
    """The local reply for an upstream reset before the response started: a 503, but a 502 with
    flag UPE for an upstream that broke the protocol (Envoy's ``onUpstreamReset``)."""
    if reason == "protocol error":
        return (502, RESET_BODY + "reset reason: protocol error",
                "upstream_reset_before_response_started{protocol_error}", "UPE")
    return (503, RESET_BODY + "reset reason: %s" % reason,
            "upstream_reset_before_response_started{%s}" % reason.replace(" ", "_"),
            "UO" if "overflow" in reason else reset_flag(reason))


def reset_flag(reason: str) -> str:
    """The response flag of an upstream reset: UC for a connection termination (the upstream
    closed its connection), UPE for a protocol error, else UR (Envoy's
    ``streamResetReasonToResponseFlag``)."""
    if reason == "connection termination":
        return "UC"
    return "UPE" if reason == "protocol error" else "UR"


def charge_failure(cluster, status: int, body: str, flag: str, si, attempts: int, internal=None) -> str:
    """What a local reply for an upstream failure counts; returns its body (a retried request's
    names the latest attempt, and its flags gain URX)."""
    if attempts > 1:
        if flag in ("UF", "UR", "UC", "UT", "UPE"):
            si.response_flags.add("URX")
        if body.startswith(RESET_BODY):
            body = RESET_BODY + "retried and the latest " + body[len(RESET_BODY):]
    if flag in CHARGED:
        cluster.count_response(status)
        if internal is not None:  # (an internal request's ctl: cluster/code_stats.py)
            charge_internal(cluster, status, internal)
    return body


def count_rx_reset(cluster, reason: str) -> None:
    """An upstream reset, as Envoy counts it (not a connection termination, a refused stream or
    a protocol error: the proxy's own codec ended that one, counted upstream_cx_protocol_error)."""
    if reason != "connection termination" and reason != "remote refused stream reset" and reason != "protocol error":
        cluster.st_rq_rx_reset.value += 1


def upstream_timeout(cluster, host) -> None:
    """The route timeout passed with an attempt on ``host`` (None: none bound)."""
    cluster.st_rq_timeout.value += 1
    if host is not None:
        host.rq_timeout += 1
        host.rq_error += 1  # (Envoy charges the 504 to the host)
        cluster.report_timeout(host)


def retries_reset(retry_on, what: str = "reset") -> bool:
    """Whether a retry policy's ``retry_on`` retries a reset, a connect failure or a refused
    stream (``what``): by its own name, or by 5xx, gateway-error or reset; a connect failure (the
    request never went out) also by reset-before-request."""
    return what in retry_on or "5xx" in retry_on or "gateway-error" in retry_on or "reset" in retry_on or (
        what == "connect-failure" and "reset-before-request" in retry_on)
