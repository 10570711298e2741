"""The upstream response head relayed as bytes: when both sides are HTTP/1.1 and nothing between
them edits the response through ``Headers`` (the route's plan, ``RouteEntry.inline``, and the
HCM's chain plan), the upstream HTTP/1.1 codec hands the head over as raw ``(name, value)`` bytes
(``raw_head``) and the downstream HTTP/1.1 codec writes the head from them
(``Http1ServerCodec.relay_head``): no ``Headers`` object, no encoder chain. The stream decides the
edits, the codecs write the bytes; the result is what the ``Headers`` path writes (the route's
response header mutations, compiled as ``RouteEntry.resp_raw``; the telemetry hooks' lines; date,
server and decorator as ``ActiveStream._send_headers``; framing as ``Http1ServerCodec``).

The functions here are methods of the stream (``first_attempt.FirstAttempt``), used when the
stream's ``raw_head`` is set (``conn_manager.HttpConnection.on_request``).
"""

from __future__ import annotations

import time
from functools import partial

from .decorator import DECORATE_EGRESS, DECORATE_INGRESS, response_operation
from .headers import Headers
from .http1_common import ProtocolError, header_line, int_header_template
from .http1_response import RelayEdits

_DECORATOR = "x-envoy-decorator-operation"
_SERVICE_TIME = int_header_template("x-envoy-upstream-service-time")
# its lines for the first milliseconds, made once (most answers take a few: no formatting per request)
_SERVICE_TIMES = tuple(_SERVICE_TIME % ms for ms in range(128))
_monotonic = time.monotonic


def relay_edits(hcm) -> RelayEdits:
    """How HCM ``hcm`` edits the heads it relays (``HcmConfig.relay_edits``): its server header,
    the decorator (http/decorator.py decorate_response: on egress an upstream's is consumed, on
    ingress the route's operation may replace it, ``on_upstream_head``), and the names its
    telemetry hooks take (``response_take_raw``)."""
    d = hcm.prep.decorate
    hooks = tuple(h.on_response_raw for h in hcm.response_hooks if h.on_response_raw is not None)
    return RelayEdits(header_line("server", hcm.server_name), hcm.server_transform,
                      replace=_DECORATOR.encode() if d == DECORATE_INGRESS else b"",
                      drop=frozenset((_DECORATOR.encode(),)) if d == DECORATE_EGRESS else frozenset(),
                      take=hcm.response_take_raw,
                      more=(hooks[0] if len(hooks) == 1 else partial(_hook_lines, hooks)) if hooks else None)


def on_upstream_head(s, status: int, raw: list, end_stream: bool) -> None:
    """The upstream response head (from ``Http1ClientCodec``: ``raw`` is its ``(name, value)``
    bytes, names lower-cased): written downstream at once."""
    if s.up_done:
        return
    route = s.route
    rc = route.retry_codes
    if status < 200 or rc is not None and status in rc:
        # (a 101 to a request that asked for no upgrade): the generic encoder decides;
        # (a status the route's retry policy may retry): the router decides
        h = [(":status", str(status))]
        h += [(n.decode("latin-1"), v.decode("latin-1")) for n, v in raw]
        s.on_upstream_headers(Headers(h), end_stream)
        return
    c = s.cluster
    cs = c.st_rq_codes.get(status)  # (Cluster.count_response, inline for a host without outlier detection)
    h = s.host
    if cs is None or h is None or h.outlier is not None:
        c.count_response(status, h)
    else:
        if status < 500:  # (the host's rq_success / rq_error, as count_response)
            h.rq_success += 1
        else:
            h.rq_error += 1
        cs[0].value += 1
        cs = cs[1]
        if cs is not None:
            cs.value += 1
        c.st_rq_completed.value += 1
    s.status = status
    cfg = s.cfg
    edits = cfg.relay_edits
    dec = None
    if edits.replace:  # (ingress: the route's decorator operation, if any, replaces the upstream's)
        dec = response_operation(DECORATE_INGRESS, route, s.caller_op)
        if dec is not None:
            dec = header_line(_DECORATOR, dec)
    s.response_started = True
    if cfg.router_suppress_envoy_headers:
        lead = b""
    else:
        ms = int((_monotonic() - s.start) * 1000)
        lead = _SERVICE_TIMES[ms] if ms < 128 else _SERVICE_TIME % ms
    try:
        s.tx_head = s.encoder.relay_head(
            status, raw, end_stream, edits, route.resp_raw, lead,  # (mutations: the route's response header ones)
            dec, s)
    except ProtocolError:
        s.response_started = False  # (nothing written: the upstream's protocol error becomes a 502)
        s.status = 0
        raise
    if end_stream:
        s.on_upstream_data(b"", True)  # (the relayed response's end: FirstAttempt.on_upstream_data)


def _hook_lines(hooks, s, taken):
    """The telemetry hooks' response work on a relayed head (``ChainPlan``, more than one hook):
    the header lines they add, given the ``(name, value)`` pairs of the names they take
    (``taken``, None for none)."""
    out = None
    for on_response_raw in hooks:
        extra = on_response_raw(s, taken)
        if extra:
            out = extra if out is None else out + extra
    return out
