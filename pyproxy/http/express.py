"""The HTTP/1.1 express lane: the router-only fast lane with the per-request layers fused.

``FastStream`` (fast_stream.py) already makes one object the stream, the router and the upstream
request. On an HTTP/1.1 connection whose connection manager needs nothing per request beyond that
(see ``hcm_is_express``), the express lane also fuses what is around it:

- the server codec hands the parsed request straight to ``start()``: the connection manager's
  request preparation (``x-forwarded-proto``, ``x-request-id``), the route lookup and the router's
  work run in one function, without the ``_guarded`` entry points;
- the upstream HTTP/1.1 codec hands the response head over as raw ``(name, value)`` bytes, and
  ``ExpressStream.on_upstream_head`` writes the downstream response head from them directly (no
  ``Headers`` object, no encoder chain);
- the ``StreamInfo`` is only made when something reads it (a local reply, a reset, a timeout).

Anything the lane does not do falls back before any side effect: ``start()`` returns False and the
codec starts an ordinary stream (whose request preparation is idempotent over what ``start()`` has
already added). Everything after the route is chosen that is not the plain path (pool failures,
timeouts, resets, watermarks, unusual responses) is ``FastStream``'s own code, inherited.

The bytes a client sees are the same as from the generic lanes; the test suite runs its HTTP/1.1
proxying tests through all three (``PYPROXY_FAST_LANE=0`` turns both fast lanes off,
``PYPROXY_EXPRESS=0`` this one).
"""

from __future__ import annotations

import os
import random
import time

from ..cluster.lb import LbContext
from ..cluster.pool import UpstreamConnection
from .local_reply import _date
from .stream import new_stream_info
from .fast_stream import FastStream, chain_is_inert, close_tunnel, pick_cluster
from .headers import Headers
from .http1 import _STATUS_LINES, HOP_BY_HOP, HTTP11, status_line
from .decorator import DECORATE_EGRESS, decorate, response_operation
from .request_prep import Prepared, prepare

_NO_CTX = LbContext()
_DECORATOR = b"x-envoy-decorator-operation"
_NEEDS_LENGTH = frozenset(("POST", "PUT", "PATCH"))  # (a bodiless one gets content-length: 0)
_monotonic = time.monotonic
_time = time.time
_rand = random.getrandbits
_new_stream = object.__new__

ENABLED = os.environ.get("PYPROXY_EXPRESS", "1") != "0"

# response header names the head writer handles itself: framing, hop-by-hop and ``server``
_SPECIAL = frozenset(n.encode() for n in HOP_BY_HOP) | {b"content-length", b"server", b"date", _DECORATOR}


def hcm_is_express(cfg) -> bool:
    """Whether an HTTP connection manager's requests may take the express lane: a router-only
    chain (or one whose other filters the chain plan may show inert per request, ``start()``
    checks) and none of the per-request features the lane leaves to the generic stream."""
    # (the request preparation, XFF, XFCC, paths and all, is the shared request_prep step)
    return bool(
        ENABLED and cfg.fast_router and not cfg.access_logs and not cfg.always_set_request_id_in_response
        and not cfg.request_timeout and not cfg.max_stream_duration)


def start(hc, codec, headers, end_stream, version, direct=False) -> None:
    """The HTTP/1.1 codec's ``on_request`` when the HCM allows this lane: serve a complete, bodiless
    HTTP/1.1 request here, or leave it (having changed nothing the generic stream would not do the
    same way) to a stream (``HttpConnection.on_request``).

    ``headers`` is what the server codec built: ``:method, :scheme, :path, :authority`` first."""
    h = headers._h
    if not (direct and end_stream and version is HTTP11) or len(h) < 4:
        return hc.on_request(codec, headers, end_stream, version)
    cfg = hc.cfg
    # the connection manager's request preparation (request_prep.py), the one every lane runs;
    # when the request then leaves this lane, its result goes with it (it is never run twice)
    table = cfg.routes.table
    r = prepare(cfg.prep, hc.conn, headers, table, not (codec.noted or codec.hop_seen))
    remote = None
    if type(r) is not str:
        if r.reply is not None:
            hc.prepped = r
            return hc.on_request(codec, headers, True, version)
        remote = r.remote
    if table is None:
        return _fall_back(hc, codec, headers, r)
    route = table.find_for_path(headers, h[3][1], h[2][1], _rand(32) if table.needs_random else 0)
    if route is None:
        return _fall_back(hc, codec, headers, r)
    rq_timeout = route.express  # (the route's plan, routing/plan.py)
    if rq_timeout is False:
        return _fall_back(hc, codec, headers, r, table, route)
    if (cfg.chain_checks or route.grpc_router) and not chain_is_inert(cfg, route, headers):
        return _fall_back(hc, codec, headers, r, table, route)  # a filter before the router has work: the generic chain
    picked = pick_cluster(route, headers, cfg.cluster_manager)
    if picked is None:
        return _fall_back(hc, codec, headers, r, table, route)
    name, choice, cluster = picked

    # from here on the request is the express lane's
    s = _new_stream(ExpressStream)
    s.hc = hc
    s.cfg = cfg
    s.encoder = codec
    codec.stream = s
    s.t0 = s.start = _monotonic()
    s.request_headers = headers
    s.route = route
    s.router = s
    s.cluster = cluster
    s.choice = choice
    s.plain = not codec.hop_seen
    if remote is not None:
        s.remote = remote
    s.rid = r if type(r) is str else r.rid
    # HttpConnection.new_stream and ActiveStream.__init__'s counting
    loop_now = cfg.loop.time()
    hc.streams += 1
    hc.last_activity = s.last_activity = loop_now
    hc.live.add(s)
    st = hc.stats
    st.rq_total.value += 1
    g = st.rq_active
    g.value += 1
    g.used = True
    st.rq_http1_total.value += 1
    d = cfg.prep.decorate
    if d:
        # (no tracer on this lane: the caller's operation names no span)
        s.caller_op = decorate(d, route, headers, not (codec.noted or codec.hop_seen))
    for hook in cfg.request_hooks:  # telemetry filters' request work (ChainPlan)
        hook(s, headers, cluster)
    # the router's work (FastStream.decode_headers)
    if rq_timeout and not cfg.router_suppress_envoy_headers:
        # (the request preparation removed any the client sent, internal or not: append)
        headers._h.append(("x-envoy-expected-rq-timeout-ms", rq_timeout))  # (prepare may have replaced h)
    if route.include_request_attempt_count:
        headers.set("x-envoy-attempt-count", "1")
    if route._req_mutations or choice is not None:
        route.finalize_request_headers(headers, None, choice)
    if choice is not None or route.fast_rewrites:
        route.rewrite_request(headers, choice)
    cluster.rq_active_total += 1
    g = cluster.st_rq_active
    g.value += 1
    g.used = True
    s.counted = True
    timeout = route.timeout
    if timeout:
        at = s.deadline = loop_now + timeout
        if hc.dl_handle is None or at < hc.dl_at:  # (the connection's timer already fires in time)
            hc.arm_deadline(at)
    host = s.host = cluster.choose_host(_NO_CTX)
    if host is None:
        cluster.st_cx_none_healthy.value += 1
        s._fail(503, "no healthy upstream", "no_healthy_upstream", "UH")
        return
    s.pending = cluster.http_pool(host, False, s.alpn).new_stream(s)


def _fall_back(hc, codec, headers, r, table=None, route=None) -> None:
    """Leave the request to the generic stream, with the request preparation's result (and the
    route, when one was found: the stream does not look it up again)."""
    if route is not None:
        hc.prepped = Prepared(rid=r, table=table, route=route) if type(r) is str else \
            Prepared(r.rid, r.remote, r.reply, r.upgrade, table, route)
    else:
        hc.prepped = Prepared(rid=r) if type(r) is str else r
    hc.on_request(codec, headers, True, HTTP11)


class ExpressStream(FastStream):
    """A ``FastStream`` made by ``start()``; see the module docstring."""

    raw_head = True   # the upstream HTTP/1.1 codec calls on_upstream_head with raw header bytes
    version = "HTTP/1.1"
    _si = None
    t0 = 0.0

    status = 0            # set when on_upstream_head wrote the response head itself
    remote = None         # the downstream address derived from the headers (request_prep)
    rid = ""              # the request id (request_prep)
    up_local = ""
    plain = False          # the request has no framing or hop-by-hop headers
    remote_complete = True
    tx_head = 0            # bytes of the response header lines written here (istio.stats)
    tx_body = 0            # response body bytes written here

    # -- the StreamInfo, made on first use ------------------------------------------------------
    @property
    def stream_info(self):
        si = self._si
        if si is None:
            si = self._si = self._make_stream_info()
        return si

    @stream_info.setter
    def stream_info(self, si):
        self._si = si

    def _make_stream_info(self):
        """What ``ActiveStream.__init__`` and the fast lane would have recorded by now."""
        si = new_stream_info(self.hc.conn, self.version, _time() - (_monotonic() - self.t0), self.t0)
        si.request_id = self.rid  # (the request preparation's, as ActiveStream records it)
        if self.remote is not None:
            si.downstream_remote_address = self.remote
        r = self.route
        si.route_name = r.name if r is not None else ""
        si.upstream_cluster = self.cluster.name
        si.attempt_count = 1
        if self.host is not None:
            si.upstream_host = self.host.key
        si.upstream_local_address = self.up_local
        si.response_code = self.status
        return si

    # -- the upstream exchange ----------------------------------------------------------------------
    def _send_request(self, encoder):
        """(called by FastStream.on_pool_ready)"""
        if type(encoder) is not UpstreamConnection or not self.plain:
            self.up_local = getattr(encoder, "local_address", "")
            encoder.encode_headers(self.request_headers, True)
            return
        # an HTTP/1.1 upstream and a request with no framing or hop-by-hop headers: its head is
        # the pseudo-headers and the regular headers as they are (Http1ClientCodec.encode_headers'
        # result for such a request, without its per-header checks)
        self.up_local = encoder.local_address
        up = encoder.codec
        h = self.request_headers._h
        method = h[0][1]
        if method in _NEEDS_LENGTH:
            encoder.encode_headers(self.request_headers, True)
            return
        up.head_request = method == "HEAD"
        encoder.write((method + " " + h[2][1] + " HTTP/1.1\r\nhost: " + h[3][1] + "\r\n" +
                       "".join([f"{k}: {v}\r\n" for k, v in h[4:]]) + "\r\n").encode("latin-1"))

    def on_upstream_head(self, status: int, raw: list, end_stream: bool) -> None:
        """The upstream response head (from ``Http1ClientCodec``): written downstream at once."""
        if self.up_done:
            return
        rc = self.route.retry_codes
        if status < 200 or rc is not None and status in rc:
            # (a 101 to a request that asked for no upgrade): the generic encoder decides;
            # (a status the route's retry policy may retry): the router decides
            h = [(":status", str(status))]
            h += [(n.lower().decode("latin-1"), v.decode("latin-1")) for n, v in raw]
            self.on_upstream_headers(Headers(h), end_stream)
            return
        self.cluster.count_response(status, self.host)
        self.status = status
        cfg = self.cfg
        codec = self.encoder
        parts = [_STATUS_LINES.get(status) or status_line(status)]
        add = parts.append
        cl = None
        server = False
        date = False
        taken = None
        take = cfg.response_take_raw  # (telemetry hooks' names: ChainPlan)
        special = _SPECIAL | take if take else _SPECIAL
        transform = cfg.server_transform  # 0 OVERWRITE, 1 APPEND_IF_ABSENT, 2 PASS_THROUGH
        # the decorator (http/decorator.py decorate_response): False on egress (an upstream's header is
        # consumed), the route's operation on ingress, None: the upstream's passes through
        dec = None
        d = cfg.prep.decorate
        if d:
            if d == DECORATE_EGRESS:
                dec = False
            else:
                dec = response_operation(d, self.route, self.caller_op)
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
                continue
            add(n + b": " + v + b"\r\n")
        if not cfg.router_suppress_envoy_headers:
            add(b"x-envoy-upstream-service-time: %d\r\n" % int((_monotonic() - self.start) * 1000))
        for hook in cfg.response_hooks:  # telemetry filters' response work (ChainPlan)
            extra = hook.on_response_raw(self, taken)
            if extra:
                add(extra)
        if not date:
            add(b"date: " + _date().encode() + b"\r\n")  # (ActiveStream._send_headers' rule)
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
        if self.hc.draining:
            codec.drain_close = True
        if codec.drain_close or codec.response_close:
            codec.response_close = True
            add(b"connection: close\r\n")
        add(b"\r\n")
        codec.response_head_done = True
        self.response_started = True
        head = b"".join(parts)
        self.tx_head = len(head) - len(parts[0])  # (the header lines, not the status line)
        codec.conn.write(head)
        if end_stream:
            self._express_done()

    def on_upstream_data(self, data, end_stream: bool):
        if not self.status:
            # the head went the generic way (an HTTP/2 upstream, an interim status): so does the body
            FastStream.on_upstream_data(self, data, end_stream)
            return
        if self.up_done:
            return
        self.tx_body += len(data)
        self.encoder.write_body(data, end_stream)
        if end_stream:
            enc = self.encoder_up
            self._express_done()
            close_tunnel(enc)
        else:
            self.last_activity = self.cfg.loop.time()

    def _express_done(self) -> None:
        """The response is complete: the fast lane's ``_complete`` and the stream's ``_finish``."""
        now = _monotonic()
        c = self.cluster
        c.st_rq_time.record((now - self.start) * 1000.0)
        self.up_done = True
        self.encoder_up = None
        self.deadline = None
        if self.counted:
            self.counted = False
            c.rq_active_total -= 1
            c.st_rq_active.value -= 1  # (gauges that start() raised: no need to mark them used)
        self.local_complete = True
        codec = self.encoder
        if codec.response_close or codec.pending or codec.tunnel or not codec.request_complete:
            codec._response_complete()
        else:
            codec.stream = None  # (Http1ServerCodec._response_complete's common case)
        self.done = True
        hc = self.hc
        st = hc.stats
        st.rq_active.value -= 1
        try:
            st.rq_class[self.status // 100].value += 1
        except IndexError:
            pass  # (a status over 599, e.g. 999: no class counter, as ActiveStream._finish)
        st.rq_completed.value += 1
        st.rq_time.record((now - self.t0) * 1000.0)
        # (HttpConnection.stream_done, inlined)
        hc.streams -= 1
        hc.live.discard(self)
        hc.last_activity = self.cfg.loop.time()
        if hc.draining and hc.streams == 0:
            hc.conn.close(flush=True)
        self.router = None
        self.encoder = None
        obs = self.cfg.observers
        if obs:  # telemetry filters' completion work (ChainPlan)
            si = self._si  # (made only if something needed it; the observers read the stream)
            if si is not None:
                si.end_monotonic = now
                si.response_code = self.status
            for o in obs:
                o(self)

