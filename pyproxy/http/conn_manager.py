"""HTTP connection manager runtime: one ``HttpConnection`` per downstream connection (the codec,
the connection's timers, draining, watermarks); one stream per request (``stream.ActiveStream``),
whatever the codec. Both codecs hand a request head to one entry, ``HttpConnection.on_request``:
request preparation and route lookup, then a stream; for a complete, bodiless request whose
plans leave the filter chain nothing to do, one made without the generic entry points (no
StreamInfo until read, no timers) that runs the router's first attempt itself."""

from __future__ import annotations

import logging
import random
import socket
import time

from .filter import CONTINUE, STOP
from .first_attempt import H2_RELAY, chain_is_inert, pick_cluster
from .http1 import Http1ServerCodec
from .http1_common import HTTP11, REASONS
from .decorator import decorate
from .local_reply import _date
from .request_prep import WATCH_BYTES, Prepared, prepare
from .stream import ActiveStream
from .streamless import streamless_request

log = logging.getLogger("pyproxy.http")

# request headers the HTTP/1.1 codec notes for ``on_request`` (``quiet``): those the request
# preparation acts on (request_prep.WATCH_BYTES) or adds, the timeout header the stream appends
# and the attempt count it sets (appends, on a ``quiet`` request)
H1_NOTE = WATCH_BYTES | {b"x-forwarded-proto", b"x-request-id", b"x-envoy-expected-rq-timeout-ms",
                         b"x-envoy-attempt-count"}
H2_NOTE = frozenset(n.decode() for n in H1_NOTE)  # (the HTTP/2 codec's names are str)

# draining: how long an idle HTTP/1 connection is left open for a request already on its way
DRAIN_IDLE_GRACE_S = 0.5
_INF = float("inf")


class _Health:
    """The server's health check state (admin POST /healthcheck/fail, /healthcheck/ok). While it
    fails, Envoy's drain decision is true: every connection drains at its next response (HTTP/1.1:
    ``connection: close``; HTTP/2: GOAWAY). Marked on the connections when it flips
    (``HttpConnection.health_check_failed``) and on new ones as they open: no per-request check."""
    __slots__ = ("failed",)

    def __init__(self):
        self.failed = False

    def set(self, failed: bool) -> None:
        self.failed = failed


HEALTH = _Health()


def _bytes_waiting(sock) -> bool:
    """Whether the kernel holds unread bytes for ``sock`` (a request the loop has not read yet)."""
    if sock is None:
        return False
    try:
        fd = sock.fileno()
        if fd < 0:
            return False
        # the transport's socket object may not offer recv (uvloop): peek through the fd
        s = socket.socket(fileno=fd)
    except (OSError, ValueError):
        return False
    try:
        return bool(s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except OSError:        # BlockingIOError: nothing waiting
        return False
    finally:
        s.detach()

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_monotonic = time.monotonic
_rand = random.getrandbits
_new_stream = object.__new__


class HttpConnection:
    """The HCM as a network filter on one downstream connection."""

    streamless = streamless_request  # (a request refused before it has a stream: counted, logged)
    __slots__ = ("cfg", "conn", "codec", "stats", "streams", "idle_handle", "last_activity",
                 "draining", "closed", "is_h2", "protocol", "live", "tick", "dl_handle", "dl_at",
                 "rebound", "prepped", "rq_left", "dur_handle")

    def __init__(self, cfg, conn):
        self.cfg = cfg
        self.conn = conn
        self.codec = None
        self.stats = cfg.stats
        self.streams = 0
        self.idle_handle = None
        self.draining = False
        self.closed = False
        self.is_h2 = False
        self.protocol = "HTTP/1.1"
        self.live = set()  # active streams (for the idle tick and watermarks)
        self.dl_handle = None  # one timer for the streams' deadlines (see arm_deadline)
        self.dl_at = 0.0
        self.last_activity = 0.0
        self.rebound = False
        self.prepped = None  # on_request's request preparation, for the stream it leaves a request to
        # requests this connection may still start (max_requests_per_connection; 0: no limit)
        self.rq_left = cfg.max_requests_per_connection
        self.dur_handle = None  # max_connection_duration's timer
        it, sit = cfg.idle_timeout, cfg.stream_idle_timeout
        # one timer per connection checks both timeouts; per-request timers would cost every request
        self.tick = min(x for x in (it, sit / 4 if sit else 0) if x) if (it or sit) else 0

    # -- network filter API -------------------------------------------------------------------------
    def on_new_connection(self):
        st = self.stats
        st.cx_total.value += 1
        st.cx_active.inc()
        if HEALTH.failed:
            self.draining = None  # (drain with the first request: health_check_failed)
            self.rq_left = 1
        ct = self.cfg.codec_type
        if ct == 2:
            self._make_h2()
        elif ct == 1:
            self._make_h1()
        # AUTO: decided on the first bytes
        cfg = self.cfg
        self.last_activity = cfg.loop.time()
        self.conn.add_watermark_callbacks(self)
        if self.tick:
            self.idle_handle = cfg.loop.call_later(self.tick, self._on_tick)
        if cfg.max_connection_duration:
            self.dur_handle = cfg.loop.call_later(cfg.max_connection_duration, self._on_max_duration)
        return CONTINUE

    def _make_h1(self):
        st = self.stats
        st.cx_http1_total.value += 1
        st.cx_http1_active.inc()
        codec = self.codec = Http1ServerCodec(self.conn, self, max_header_bytes=self.cfg.max_request_headers_kb * 1024,
                                              max_headers=self.cfg.max_headers_count, note=H1_NOTE)
        codec.drain_close = self.draining  # (start_drain sets it on a codec made before it)

    def _make_h2(self):
        from .http2 import Http2ServerCodec
        st = self.stats
        st.cx_http2_total.value += 1
        st.cx_http2_active.inc()
        self.is_h2 = True
        self.protocol = "HTTP/2"
        # (the request preparation's watched names and what the stream appends: H1_NOTE's reading)
        self.codec = Http2ServerCodec(self.conn, self, self.cfg, H2_NOTE | self.cfg.prep.watch)

    def on_data(self, data, end_stream):
        codec = self.codec
        if codec is None:
            if not data and end_stream:
                self.conn.close(flush=True)
                return STOP
            tls = self.conn.ssl
            if tls is not None and tls.alpn:
                # AUTO over TLS: the negotiated ALPN decides
                self._make_h2() if tls.alpn == "h2" else self._make_h1()
            elif len(data) < len(H2_PREFACE) and H2_PREFACE.startswith(data):
                # not enough bytes to tell yet
                self._pending_detect(data)
                return STOP
            elif data.startswith(H2_PREFACE):
                self._make_h2()
            else:
                self._make_h1()
            codec = self.codec
        if data:
            codec.feed(data)
        if end_stream and not self.closed:
            codec.on_eof()
        if not self.rebound:
            # an HTTP/1.1 codec that is the connection's only reader takes the bytes directly
            self.rebound = True
            conn = self.conn
            if not self.is_h2 and codec is self.codec:
                if conn.on_data_cb == self.on_data:
                    conn.on_data_cb = codec.on_data
                elif conn.ssl is not None and getattr(conn.ssl, "sink", None) == self.on_data:
                    conn.ssl.sink = codec.on_data  # (over TLS: the layer's plaintext reader)
        return STOP

    def _pending_detect(self, data):
        # rare: the preface arrived split; keep the prefix and decide on the next bytes
        self.codec = _Detect(self, data)

    def on_close(self, exc):
        self.closed = True
        if self.idle_handle is not None:
            self.idle_handle.cancel()
            self.idle_handle = None
        if self.dl_handle is not None:
            self.dl_handle.cancel()
            self.dl_handle = None
        if self.dur_handle is not None:
            self.dur_handle.cancel()
            self.dur_handle = None
        st = self.stats
        st.cx_active.dec()
        st.cx_destroy.value += 1
        # (who closed it, and whether requests were still active: Envoy's destroy counters)
        remote = getattr(self.conn, "remote_closed", False)
        (st.cx_destroy_remote if remote else st.cx_destroy_local).value += 1
        if self.streams:
            st.cx_destroy_active_rq.value += 1
            (st.cx_destroy_remote_active_rq if remote else st.cx_destroy_local_active_rq).value += 1
        if self.is_h2:
            st.cx_http2_active.dec()
        elif isinstance(self.codec, Http1ServerCodec):
            st.cx_http1_active.dec()
        if self.codec is not None:
            self.codec.on_close()

    def start_drain(self, graceful: bool = False):
        """The listener is draining: close when idle, ask clients to go away otherwise. ``graceful``
        (/drain_listeners?graceful, pod shutdown): Envoy's drain sequence, the drain time ends it."""
        if self.draining:
            return
        codec = self.codec
        if graceful and (codec is None or self.streams == 0):
            # (no request yet, or idle) Envoy decides per request: the next one drains it (HTTP/1.1:
            # connection: close; HTTP/2: shutdown notice with its response), as /healthcheck/fail
            self.health_check_failed()
            return
        self.draining = True
        self.stats.cx_drain_close.value += 1
        if codec is not None:
            codec.drain_close = True
        if self.is_h2:
            # (graceful: the shutdown notice, the final GOAWAY after drain_timeout)
            self._h2_drain_sequence() if graceful else codec.go_away()
        elif self.streams == 0:
            # an idle HTTP/1 connection: closed once idle a moment with nothing unread (a request on
            # its way would be lost by closing at once); one that comes meanwhile: connection: close
            self.cfg.loop.call_later(DRAIN_IDLE_GRACE_S, self._drain_idle)

    def health_check_failed(self) -> None:
        """The server fails health checks (HEALTH): Envoy's drain decision is true, so the next
        response drains the connection (``downstream_cx_drain_close``): on HTTP/1.1 it carries
        ``connection: close`` and the connection closes after it; on HTTP/2 a GOAWAY goes out. An
        idle connection stays open until then, as in Envoy."""
        if self.draining or self.closed:
            return
        if self.streams:
            self._hc_drain()
        else:
            # the next request drains it: count_request, already called per request while rq_left
            # counts, calls _hc_drain (None: falsy, "marked")
            self.draining = None
            self.rq_left = 1

    def _hc_drain(self) -> None:
        if self.draining or self.closed:
            return
        self.draining = True
        self.stats.cx_drain_close.value += 1
        codec = self.codec
        if self.is_h2:
            self.cfg.loop.call_soon(self._h2_drain_sequence)  # (after the codec registered its stream)
        elif codec is not None:
            codec.drain_close = True

    # -- max_requests_per_connection, max_connection_duration (Envoy's HCM) ------------------------------
    def count_request(self) -> None:
        """A request starts while ``rq_left`` (max_requests_per_connection) is counting: the last
        one allowed drains the connection as Envoy does: on HTTP/1.1 its response carries
        ``connection: close`` and the connection closes after it; on HTTP/2 a GOAWAY."""
        n = self.rq_left - 1
        self.rq_left = n
        if n:
            return
        if self.draining is None:  # (marked by health_check_failed)
            self._hc_drain()
            return
        self.stats.cx_max_requests_reached.value += 1
        if self.is_h2:
            if not self.draining:
                self.draining = True
                self.cfg.loop.call_soon(self._go_away)  # (after the codec registered this stream)
        else:
            codec = self.codec
            if isinstance(codec, Http1ServerCodec):
                codec.drain_close = True

    def _go_away(self):
        if not self.closed:
            self.codec.go_away()

    def _h2_drain_sequence(self) -> None:
        """Envoy's HTTP/2 drain: shutdown notice, final GOAWAY after drain_timeout, close when idle."""
        from .h2_common import shutdown_notice  # (h2 is loaded with the first HTTP/2 codec)
        shutdown_notice(self.codec)
        self.cfg.loop.call_later(self.cfg.drain_timeout, self._go_away)

    def _on_max_duration(self) -> None:
        """max_connection_duration passed: Envoy's drain sequence (HTTP/2: GOAWAY; HTTP/1.1: the
        next response carries ``connection: close``, an idle connection closes after drain_timeout)."""
        self.dur_handle = None
        if self.closed:
            return
        self.stats.cx_max_duration_reached.value += 1
        codec = self.codec
        if self.is_h2:
            self.draining = True
            codec.go_away()
            return
        if not isinstance(codec, Http1ServerCodec):  # (no request yet: nothing to drain)
            self.conn.close(flush=True)
            return
        if self.draining:
            return
        self.draining = True
        codec.drain_close = True
        if self.streams == 0:
            self.cfg.loop.call_later(self.cfg.drain_timeout, self._drain_timeout)

    def _drain_timeout(self):
        # (a stream still running closes the connection when it ends: stream_done)
        if not self.closed and self.streams == 0:
            self.conn.close(flush=True)

    def _drain_idle(self):
        if self.closed:
            return
        if self.streams == 0 and not _bytes_waiting(self.conn.sock):
            self.conn.close(flush=True)
        else:
            self.cfg.loop.call_later(DRAIN_IDLE_GRACE_S, self._drain_idle)

    # -- stream deadlines --------------------------------------------------------------------------------
    def arm_deadline(self, at: float) -> None:
        """A stream's deadline (``stream.deadline``, loop time). One timer serves every stream of
        the connection: it is armed for the earliest deadline and, when it fires, times out the
        streams that are due and re-arms for the next. Requests that finish in time only clear
        their ``deadline``; a timer per request would cost every request a timer set and cancel."""
        h = self.dl_handle
        if h is not None:
            if self.dl_at <= at:
                return
            h.cancel()
        self.dl_at = at
        self.dl_handle = self.cfg.loop.call_at(at, self._on_deadline)

    def _on_deadline(self) -> None:
        self.dl_handle = None
        if self.closed:
            return
        now = self.cfg.loop.time()
        nxt = None
        for s in list(self.live):
            d = s.deadline
            if d is None:
                continue
            if d <= now:
                s.deadline = None
                s.on_deadline()
            elif nxt is None or d < nxt:
                nxt = d
        if nxt is not None and not self.closed:
            self.arm_deadline(nxt)

    # -- codec callbacks ------------------------------------------------------------------------------
    def on_request(self, encoder, headers, end_stream: bool, version, direct: bool = False, quiet: bool = False,
                   plain: bool = False, ct: bool = True) -> None:
        """The one entry of a request, from either codec: ``encoder`` is where its response goes
        (the HTTP/1.1 codec, or the HTTP/2 codec's stream), and gets the stream as its ``stream``.

        What the codec knows of the request as it parsed it: ``direct``, the headers start
        ``:method, :scheme, :path, :authority`` and the flags describe them (False: nothing
        known); ``quiet``, none of the names the codec notes for this manager (``H1_NOTE``,
        ``H2_NOTE``) and no fragment in the path; ``plain``, no framing or hop-by-hop header;
        ``ct``, a ``content-type`` may be present.

        The request preparation and the route lookup run here, once. When the HCM's chain plan
        allows it (``cfg.serve_inline``), a complete, bodiless request whose route plan and
        filters need nothing of the filter chain (``RouteEntry.inline``, ``chain_is_inert``) is
        served by a stream made here without a ``StreamInfo`` or timers (made when read: stream.py
        ``_make_stream_info``), which runs the router's first attempt
        (``FirstAttempt.begin_first_attempt``) and, on HTTP/1.1, relays the response head as bytes
        when the plans allow (``raw_head``, h1_relay.py). Any other request goes to a stream made
        by ``new_stream`` (``ActiveStream.__init__``) and its ``decode_headers``, which takes the
        preparation's result and the route found here (``prepped``) instead of running them again.

        (The inline stream is not made by ``new_stream``, ``__init__`` and ``decode_headers``
        with flags: those calls and their per-request work (a ``StreamInfo``, timers, the upgrade
        and route-cache handling, ``_guarded``'s frame) are what the inline case leaves out; made
        here, it is their few lines, at the cost of the duplicated counting below.)"""
        cfg = self.cfg
        if not (direct and end_stream and cfg.serve_inline):
            s = encoder.stream = self.new_stream(encoder, version)
            if quiet:
                s.quiet = True
            s.decode_headers(headers, end_stream)
            return
        h = headers._h
        # the connection manager's request preparation (request_prep.py), the one every stream runs;
        # when the request then goes to the stream's own entry, its result goes with it (never run twice)
        table = cfg.routes.table
        r = prepare(cfg.prep, self.conn, headers, table, quiet)
        if type(r) is not str and (r.reply is not None or r.upgrade is not None or r.ctl is not None):
            self.prepped = r
            return self.on_request(encoder, headers, True, version, False, quiet)
        if table is None:
            return _fall_back(self, encoder, headers, version, quiet, r)
        route = table.find_for_path(headers, h[3][1], h[2][1], _rand(32) if table.needs_random else 0)
        if route is None:
            return _fall_back(self, encoder, headers, version, quiet, r)
        if not route.inline:  # (the route's plan, routing/plan.py)
            return _fall_back(self, encoder, headers, version, quiet, r, table, route)
        if (cfg.chain_checks or route.grpc_router) and not chain_is_inert(
                cfg, route, headers if ct else None):  # (None: no content-type, the codec saw)
            # a filter before the router has work: the generic chain
            return _fall_back(self, encoder, headers, version, quiet, r, table, route)
        picked = pick_cluster(route, headers, cfg.cluster_manager)
        if picked is None:
            return _fall_back(self, encoder, headers, version, quiet, r, table, route)

        # from here on the request is this stream's
        s = _new_stream(ActiveStream)
        s.hc = self
        s.cfg = cfg
        s.encoder = encoder
        encoder.stream = s
        s.t0 = _monotonic()
        s.request_headers = headers
        s.route = route
        s.quiet = quiet
        s.remote_complete = True
        st = self.stats
        if version is HTTP11:
            s.plain = plain
            # (not when a telemetry hook reads a header the route's mutations write; most chains
            # have no such hook: take_raw empty)
            tr = cfg.response_take_raw
            s.raw_head = not tr or (mut := route.resp_raw) is None or tr.isdisjoint(mut[2])
            st.rq_http1_total.value += 1
        else:
            s.plain = False
            s.raw_head = H2_RELAY  # (the response relayed to the HTTP/2 client: relay_h2.py)
            s.version = version
            st.rq_http2_total.value += 1
        if type(r) is str:
            s.rid = r
        else:
            s.rid = r.rid
            if r.remote is not None:
                s.remote = r.remote
        # new_stream and ActiveStream.__init__'s counting
        loop_now = cfg.loop.time()  # (no request or stream duration timer: hcm_serves_inline)
        self.streams += 1
        if self.rq_left:
            self.count_request()
        self.last_activity = s.last_activity = loop_now
        self.live.add(s)
        st.rq_total.value += 1
        g = st.rq_active
        g.value += 1
        g.used = True
        d = cfg.prep.decorate
        if d:
            # (no tracer here: the caller's operation names no span)
            s.caller_op = decorate(d, route, headers, quiet)
        s.begin_first_attempt(route, headers, picked[2], picked[1])

    def new_stream(self, encoder, version):
        self.streams += 1
        if self.rq_left:
            self.count_request()
        self.last_activity = self.cfg.loop.time()
        s = ActiveStream(self, encoder, version)
        p = self.prepped
        if p is not None:  # (what on_request did before it left the request to a stream)
            self.prepped = None
            s.prepped = p
        self.live.add(s)
        return s

    def stream_done(self, stream):
        self.streams -= 1
        self.live.discard(stream)
        self.last_activity = self.cfg.loop.time()
        if self.draining and self.streams == 0 and not self.is_h2:
            self.conn.close(flush=True)

    def on_codec_error(self, codec, status: int, details: str, text: str | None = None):
        """Malformed request bytes: Envoy's local reply (if nothing was sent yet), then close."""
        st = self.stats
        if text is None:
            st.cx_protocol_error.value += 1
        s = codec.stream
        # Envoy answers a missing Host with an empty 400, other codec errors with the reason phrase
        if text is None:
            text = "" if details == "missing_host_header" else REASONS.get(status, "Bad Request")
        if s is not None and not s.response_started:
            s.send_local_reply(status, text, details, close=True)
        elif s is None and not codec.closed:
            codec.write_error(status, text, _date(), self.cfg.server_name)  # (no stream to answer it)
            st.rq_class[status // 100].value += 1
            self.streamless("HTTP/1.1", status, details, status != 408, len(text))  # (as Envoy's stream)
        codec.closed = True
        self.conn.close(flush=True)

    def on_request_headers_timeout(self, codec):
        """request_headers_timeout passed before a request's headers were complete (HTTP/1.1)."""
        self.stats.rq_header_timeout.value += 1
        self.on_codec_error(codec, 408, "request_header_timeout", "request header timeout")

    def _on_tick(self):
        self.idle_handle = None
        if self.closed:
            return
        cfg = self.cfg
        now = cfg.loop.time()
        sit = cfg.stream_idle_timeout
        if sit and self.live:
            for s in list(self.live):
                if now - s.last_activity >= sit:
                    s.on_idle_timeout()
        if cfg.idle_timeout and not self.streams and now - self.last_activity >= cfg.idle_timeout:
            self.stats.cx_idle_timeout.value += 1
            self.last_activity = _INF  # (counted again only after another stream, as Envoy's timer)
            codec = self.codec
            if codec is None:
                self.conn.close(flush=True)
                return
            if not self.draining:  # Envoy's drain sequence (HTTP/1.1: close after drain_timeout)
                self.draining = codec.drain_close = True
                self._h2_drain_sequence() if self.is_h2 else cfg.loop.call_later(cfg.drain_timeout, self._drain_timeout)
        self.idle_handle = cfg.loop.call_later(self.tick, self._on_tick)

    # -- downstream write watermarks: stop/resume reading the upstream responses ---------------
    def on_above_write_buffer_high_watermark(self):
        for s in self.live:
            r = s.router
            if r is not None:
                r.on_downstream_watermark(True)

    def on_below_write_buffer_low_watermark(self):
        for s in self.live:
            r = s.router
            if r is not None:
                r.on_downstream_watermark(False)


class _Detect:
    """Holds the first bytes of an AUTO connection until HTTP/1 vs HTTP/2 can be told apart."""

    __slots__ = ("hc", "buf", "stream", "closed")

    def __init__(self, hc, buf):
        self.hc = hc
        self.buf = buf
        self.stream = None
        self.closed = False

    def feed(self, data):
        buf = self.buf + data
        hc = self.hc
        if len(buf) < len(H2_PREFACE) and H2_PREFACE.startswith(buf):
            self.buf = buf
            return
        if buf.startswith(H2_PREFACE):
            hc._make_h2()
        else:
            hc._make_h1()
        hc.codec.feed(buf)

    def on_eof(self):
        self.hc.conn.close(flush=True)

    def on_close(self):
        self.closed = True


def hcm_serves_inline(cfg) -> bool:
    """Whether an HTTP connection manager's complete, bodiless requests may be served by a stream
    made in ``HttpConnection.on_request`` (``cfg.serve_inline``): a router-only chain (or one whose
    other filters the chain plan may show inert per request, ``on_request`` checks) and none of
    the per-request features it leaves to the stream's own
    entry (access logs, the request id in the response, request and stream duration timers)."""
    # (the request preparation, XFF, XFCC, paths and all, is the shared request_prep step)
    return bool(
        cfg.fast_router and not cfg.access_logs and not cfg.always_set_request_id_in_response
        and not cfg.request_timeout and not cfg.max_stream_duration)


def _fall_back(hc, encoder, headers, version, quiet, r, table=None, route=None) -> None:
    """Leave the request to the stream's own entry, with the request preparation's result (and
    the route, when one was found: the stream does not look it up again)."""
    if route is not None:
        hc.prepped = Prepared(rid=r, table=table, route=route) if type(r) is str else \
            Prepared(r.rid, r.remote, r.reply, r.upgrade, table, route, r.ctl)
    else:
        hc.prepped = Prepared(rid=r) if type(r) is str else r
    hc.on_request(encoder, headers, True, version, False, quiet)
