"""The upstream response head relayed as bytes: when both sides are HTTP/1.1 and nothing between
them edits the response through ``Headers`` (the route's plan, ``RouteEntry.express``, and the
HCM's chain plan), the upstream HTTP/1.1 codec hands the head over as raw ``(name, value)`` bytes
(``raw_head``) and the stream writes the downstream head from them directly: no ``Headers``
object, no encoder chain. The bytes are those the ``Headers`` path writes (the route's response
header mutations, compiled to bytes as ``RouteEntry.resp_raw``; the telemetry hooks' lines; date,
server and decorator as ``ActiveStream._send_headers``; framing as ``Http1ServerCodec``).

The functions here are methods of the stream (``first_attempt.FirstAttempt``), used when the
stream's ``raw_head`` is set (``conn_manager.serve_inline``).
"""

from __future__ import annotations

import time

from ..cluster.pool import UpstreamConnection
from .decorator import DECORATE_EGRESS, response_operation
from .headers import Headers
from .http1_common import _STATUS_LINES, HOP_BY_HOP, status_line
from .local_reply import date_line

_DECORATOR = b"x-envoy-decorator-operation"
_NEEDS_LENGTH = frozenset(("POST", "PUT", "PATCH"))  # (a bodiless one gets content-length: 0)
_monotonic = time.monotonic
_JOIN = ": ".join  # (name, value) -> "name: value"

# response header names the head writer handles itself: framing, hop-by-hop and ``server``
_SPECIAL = frozenset(n.encode() for n in HOP_BY_HOP) | {b"content-length", b"server", b"date", _DECORATOR}


def relay_names(take) -> frozenset:
    """The response header names the head writer handles itself, for an HCM whose telemetry hooks
    hold back the names ``take`` (``HcmConfig.relay_special``)."""
    return _SPECIAL | take


def send_request(s, encoder) -> None:
    """The request head upstream (``FirstAttempt.on_pool_ready``)."""
    if type(encoder) is not UpstreamConnection or not s.plain:
        s.up_local = getattr(encoder, "local_address", "")
        si = s.__dict__.get("stream_info")
        if si is not None:
            si.upstream_local_address = s.up_local
        encoder.encode_headers(s.request_headers, True)
        return
    # an HTTP/1.1 upstream and a request with no framing or hop-by-hop headers: its head is
    # the pseudo-headers and the regular headers as they are (Http1ClientCodec.encode_headers'
    # result for such a request, without its per-header checks)
    s.up_local = encoder.local_address
    up = encoder.codec
    h = s.request_headers._h
    method = h[0][1]
    if method in _NEEDS_LENGTH:
        encoder.encode_headers(s.request_headers, True)
        return
    up.head_request = method == "HEAD"
    if len(h) > 4:
        head = (method + " " + h[2][1] + " HTTP/1.1\r\nhost: " + h[3][1] + "\r\n" +
                "\r\n".join(map(_JOIN, h[4:])) + "\r\n\r\n").encode("latin-1")
    else:
        head = (method + " " + h[2][1] + " HTTP/1.1\r\nhost: " + h[3][1] + "\r\n\r\n").encode("latin-1")
    s.up_head = head
    encoder.write(head)  # (up_head: istio.stats sizes the request head from it)


def on_upstream_head(s, status: int, raw: list, end_stream: bool) -> None:
    """The upstream response head (from ``Http1ClientCodec``): written downstream at once."""
    if s.up_done:
        return
    route = s.route
    rc = route.retry_codes
    if status < 200 or rc is not None and status in rc:
        # (a 101 to a request that asked for no upgrade): the generic encoder decides;
        # (a status the route's retry policy may retry): the router decides
        h = [(":status", str(status))]
        h += [(n.lower().decode("latin-1"), v.decode("latin-1")) for n, v in raw]
        s.on_upstream_headers(Headers(h), end_stream)
        return
    s.cluster.count_response(status, s.host)
    s.status = status
    cfg = s.cfg
    codec = s.encoder
    parts = [_STATUS_LINES.get(status) or status_line(status)]
    add = parts.append
    cl = None
    server = False
    date = False
    taken = None
    take = cfg.response_take_raw  # (telemetry hooks' names: ChainPlan)
    special = cfg.relay_special  # (relay_names(take), made with the HCM's config)
    mut = route.resp_raw  # the route's response header mutations (routing/plan.py)
    if mut is not None:
        drop = mut[0]
        if drop:
            special = special | drop
    transform = cfg.server_transform  # 0 OVERWRITE, 1 APPEND_IF_ABSENT, 2 PASS_THROUGH
    # the decorator (http/decorator.py decorate_response): False on egress (an upstream's header is
    # consumed), the route's operation on ingress, None: the upstream's passes through
    dec = None
    d = cfg.prep.decorate
    if d:
        if d == DECORATE_EGRESS:
            dec = False
        else:
            dec = response_operation(d, route, s.caller_op)
            if dec is not None:
                dec = b"x-envoy-decorator-operation: " + dec.encode("latin-1") + b"\r\n"
    for n, v in raw:
        n = n.lower()
        if n in special:
            if n in take:
                if taken is None:
                    taken = []
                taken.append((n.decode("latin-1"), v.decode("latin-1")))
            elif n == b"content-length":
                if cl is None:
                    cl = v
                    add(b"content-length: " + v + b"\r\n")  # (in place, as Envoy writes it)
            elif n == b"date":
                date = True
                add(b"date: " + v + b"\r\n")
            elif n == b"server":
                if transform:
                    add(b"server: " + v + b"\r\n")
                elif not server:
                    add(cfg.server_line)
                server = True
            elif n == _DECORATOR:
                if dec is None:
                    add(n + b": " + v + b"\r\n")
                elif dec:
                    add(dec)  # (in place of the upstream's, once)
                    dec = False
            # (else a name the route's mutations remove or overwrite)
            continue
        add(n + b": " + v + b"\r\n")
    if not cfg.router_suppress_envoy_headers:
        add(b"x-envoy-upstream-service-time: %d\r\n" % int((_monotonic() - s.start) * 1000))
    if mut is not None:
        add(mut[1])
    for hook in cfg.response_hooks:  # telemetry filters' response work (ChainPlan)
        extra = hook.on_response_raw(s, taken)
        if extra:
            add(extra)
    if not date:
        add(date_line())  # (ActiveStream._send_headers' rule)
    if not server and transform != 2:
        add(cfg.server_line)
    if dec:
        add(dec)
    # framing, as Http1ServerCodec.encode_headers
    method = codec.method
    if cl is not None:
        pass
    elif end_stream:
        if status not in (204, 304) and method != "HEAD":
            add(b"content-length: 0\r\n")
    elif method != "HEAD" and status not in (204, 304):
        codec.response_chunked = True
        add(b"transfer-encoding: chunked\r\n")
    if s.hc.draining:
        codec.drain_close = True
    if codec.drain_close or codec.response_close:
        codec.response_close = True
        add(b"connection: close\r\n")
    add(b"\r\n")
    codec.response_head_done = True
    s.response_started = True
    head = b"".join(parts)
    s.tx_head = len(head) - len(parts[0])  # (the header lines, not the status line)
    codec.conn.write(head)
    if end_stream:
        relay_done(s)


def relay_done(s) -> None:
    """The relayed response is complete: the stream's ``_complete`` and ``_finish``, for a stream
    whose head went as bytes (made by ``serve_inline``: no timers, no filters, no access logs)."""
    now = _monotonic()
    c = s.cluster
    c.st_rq_time.record((now - s.start) * 1000.0)
    s.up_done = True
    s.encoder_up = None
    s.deadline = None
    if s.counted:
        s.counted = False
        c.rq_active_total -= 1
        c.st_rq_active.value -= 1  # (gauges that serve_inline() raised: no need to mark them used)
    s.local_complete = True
    codec = s.encoder
    if codec.response_close or codec.pending or codec.tunnel or not codec.request_complete:
        codec._response_complete()
    else:
        codec.stream = None  # (Http1ServerCodec._response_complete's common case)
    s.done = True
    hc = s.hc
    st = hc.stats
    st.rq_active.value -= 1
    try:
        st.rq_class[s.status // 100].value += 1
    except IndexError:
        pass  # (a status over 599, e.g. 999: no class counter, as ActiveStream._finish)
    st.rq_completed.value += 1
    st.rq_time.record((now - s.t0) * 1000.0)
    # (HttpConnection.stream_done, inlined)
    hc.streams -= 1
    hc.live.discard(s)
    hc.last_activity = s.cfg.loop.time()
    if hc.draining and hc.streams == 0:
        hc.conn.close(flush=True)
    s.router = None
    s.encoder = None
    obs = s.cfg.observers
    if obs:  # telemetry filters' completion work (ChainPlan)
        si = s.__dict__.get("stream_info")  # (made only if something needed it; the observers read the stream)
        if si is not None:
            si.end_monotonic = now
            si.response_code = s.status
        for o in obs:
            o(s)
