"""Downstream (server) HTTP/2 codec for one connection, on a sans-IO protocol engine
(``h2_common.new_h2``). HPACK is in ``h2_hpack``, header translation in ``h2_headers``, the
outbound stream shared with the client codec (``h2_client``) in ``h2_stream``.

Bytes in -> ``h2`` events -> the same stream events the HTTP/1 codec produces
(``hc.new_stream(encoder, "HTTP/2")``, ``decode_headers/data/trailers``, ``on_reset``); the HCM
answers through the per-stream encoder (``encode_headers/data/trailers``, ``reset_stream``).

Flow control (both sides):
- received DATA is acknowledged (window credit returned) only while the stream is not
  read-disabled, i.e. while whoever takes the bytes (the upstream connection) is below its high
  watermark; credit held back is returned when reading is enabled again;
- outbound DATA goes to the peer only as far as its flow-control window allows and while the
  transport is not above its high watermark; the rest waits in a bounded per-stream buffer whose
  high watermark read-disables the producer (the upstream request) until it drains to half.

Hardening (Envoy's defaults): premature ("rapid") resets, CONTINUATION/HPACK bombs (``h2``'s
limits plus ``max_request_headers_kb``), outbound control-frame floods (PING/SETTINGS acks
that the client does not read), PRIORITY, WINDOW_UPDATE and empty-frame floods, streams beyond
``max_concurrent_streams`` (REFUSED_STREAM), protocol errors -> GOAWAY with ``h2``'s error code.
"""

from __future__ import annotations

import logging
from email.utils import formatdate

import h2.exceptions
from h2.errors import ErrorCodes
from h2.settings import SettingCodes

from .. import writebatch
from .h2_common import (EV_DATA, EV_ENDED, EV_GOAWAY, EV_PING, EV_PING_ACK, EV_PRIORITY, EV_REQUEST, EV_RESET,
                        EV_SETTINGS, EV_TRAILERS, EV_WINDOW, EVENT_KIND, PREMATURE_RESET_SECONDS,
                        PREMATURE_RESET_STREAMS, bound_window_updates, header_list_too_large, new_h2, server_options)
from .h2_headers import TRAILERS, BadAuthority, BadHeaders, BadLength, inbound_headers, request_fields
from .h2_server_stream import H2ServerStream
from .h2_stream import flush_blocked, window_opened
from .h2engine import H2Engine
from .h2engine_frames import WindowUpdateFlood
from .headers import Headers

log = logging.getLogger("pyproxy.http2")


class Http2ServerCodec:
    """Downstream HTTP/2 (h2c prior knowledge or ALPN h2) for one connection."""

    __slots__ = ("conn", "hc", "cfg", "opts", "h2", "streams", "closed", "drain_close", "goaway_sent",
                 "in_feed", "flush_handle", "loop", "blocked", "write_paused", "max_frame", "stream_high",
                 "stats", "total_streams", "premature", "ctrl_out", "priority_frames", "empty_frames",
                 "ka_handle", "ka_timeout_handle", "close_pending", "stream", "lean", "rht", "rht_handle",
                 "rht_sid", "max_streams", "max_fields", "note")
    header_list_too_large = header_list_too_large  # (h2_common.py)

    def __init__(self, conn, hc, cfg, note=None):
        self.conn = conn
        # header names whose presence in a request the manager wants to know of (``quiet``: the
        # request has none of them and no fragment in its path), as the HTTP/1.1 codec's ``note``
        self.note = note
        self.hc = hc
        self.cfg = cfg
        opts = self.opts = server_options(cfg)
        self.stats = opts.stats
        self.loop = cfg.loop
        self.streams: dict = {}
        self.blocked: set = set()
        self.closed = False
        self.drain_close = False
        self.goaway_sent = False
        self.close_pending = False
        self.in_feed = False
        self.flush_handle = None
        self.write_paused = bool(getattr(conn, "write_paused", False))
        self.total_streams = 0
        self.premature = 0
        self.ctrl_out = 0
        self.priority_frames = 0
        self.empty_frames = 0
        self.stream = None  # HCM's on_codec_error looks at it (HTTP/1 only)
        lim = getattr(getattr(conn, "listener", None), "buffer_limit", 0) or 1024 * 1024
        self.stream_high = lim
        self.max_streams = opts.max_concurrent_streams
        self.max_fields = opts.max_headers  # (pseudo-headers counted too, as Envoy)
        self.h2 = new_h2(False, opts)
        self.lean = self.h2.__class__ is H2Engine  # takes Headers' pairs as they are
        if self.lean:
            self.h2.stream_cls = H2ServerStream  # (the engine's stream state on our stream objects)
            self.h2.oversized = self  # (its header_list_too_large(sid): a request reset for its size)
        bound_window_updates(self)
        self.max_frame = self.h2.max_outbound_frame_size
        self.ka_handle = self.ka_timeout_handle = None
        # request_headers_timeout (0: none): a stream whose header block (HEADERS + CONTINUATION)
        # is still unfinished after it gets Envoy's 408 and a RST_STREAM (lean engine only: the
        # ``h2`` library does not say that a block has begun)
        self.rht = float(getattr(cfg, "request_headers_timeout", 0.0) or 0.0) if self.lean else 0.0
        self.rht_handle = None
        self.rht_sid = 0
        if opts.keepalive_interval:
            self.ka_handle = self.loop.call_later(opts.keepalive_interval, self._keepalive)
        conn.add_watermark_callbacks(self)
        conn.write(self.h2.data_to_send())

    # -- bytes in ---------------------------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as e:
            self._protocol_error(e)
            return
        except Exception:  # a bug in h2 or here must not take down the loop
            log.exception("h2 receive failed")
            self._fatal(ErrorCodes.INTERNAL_ERROR)
            return
        self.in_feed = True
        try:
            self._handle(events)
        except h2.exceptions.ProtocolError as e:
            self._protocol_error(e)
            return
        except Exception:
            log.exception("h2 event handling failed")
            self._fatal(ErrorCodes.INTERNAL_ERROR)
            return
        finally:
            self.in_feed = False
        if self.rht:
            self._watch_header_block()
        self._flush()

    def _watch_header_block(self) -> None:
        """Arm the request_headers_timeout for a new stream whose header block is unfinished."""
        c = self.h2.cont
        if c is None or c[0] == self.rht_sid or c[0] <= self.h2.highest_inbound_stream_id:
            return  # none, already watched, or trailers of a stream whose request has begun
        if self.rht_handle is not None:
            self.rht_handle.cancel()
        self.rht_sid = c[0]
        self.rht_handle = self.loop.call_later(self.rht, self._header_block_timeout)

    def _header_block_timeout(self) -> None:
        self.rht_handle = None
        sid = self.rht_sid
        self.rht_sid = 0
        c = self.h2.cont
        if self.closed or c is None or c[0] != sid:
            return  # the block finished (or the connection ended) in time
        if not self.h2.open_unfinished_inbound():
            return
        st = self.hc.stats
        # what Envoy counts for that stream (it exists there from its first HEADERS frame)
        for c in (st.rq_total, st.rq_http2_total, st.rq_header_timeout, st.rq_class[4], st.rq_completed,
                  st.rq_response_before_rq_complete, st.rq_rx_reset):
            c.value += 1
        body = b"request header timeout"
        h = self.h2
        try:
            h.send_headers(sid, [(":status", "408"), ("content-length", str(len(body))),
                                 ("content-type", "text/plain"), ("date", formatdate(usegmt=True)),
                                 ("server", self.cfg.server_name)])
            h.send_data(sid, body, end_stream=True)
            h.reset_stream(sid, ErrorCodes.NO_ERROR)  # the request never finished (as Envoy)
        except h2.exceptions.ProtocolError as e:
            log.debug("h2 stream %d: cannot answer the header timeout: %s", sid, e)
        self._flush()

    def _handle(self, events) -> None:
        resets = None
        if len(events) > 1 and (not self.lean or self.h2.rst_seen):
            for e in events:
                if EVENT_KIND.get(e.__class__) == EV_RESET:
                    if resets is None:
                        resets = set()
                    resets.add(e.stream_id)
        streams = self.streams
        opts = self.opts
        kinds = EVENT_KIND
        for e in events:
            if self.closed:
                return
            if e.__class__ is tuple:
                # the lean engine's hot events: (kind, stream id, data or fields, length, end?)
                t, sid, x, n, end = e
                if t == EV_DATA:
                    self._on_data(sid, x, n, end)
                elif t == EV_REQUEST:
                    self.empty_frames = 0
                    self._on_request(sid, x, end, resets, n)
                else:
                    self.empty_frames = 0
                    self._on_trailers(sid, x)
                continue
            t = kinds.get(e.__class__, -1)
            if t == EV_DATA:
                self._on_data(e.stream_id, e.data, e.flow_controlled_length, e.stream_ended is not None)
            elif t == EV_REQUEST:
                self.empty_frames = 0
                self._on_request(e.stream_id, e.headers, e.stream_ended is not None, resets)
            elif t == EV_ENDED:
                s = streams.get(e.stream_id)
                if s is not None and not s.remote_ended:
                    s.remote_ended = True
                    if s.stream is not None:
                        s.stream.decode_data(b"", True)
                    if s.local_ended:
                        s._gone()
            elif t == EV_TRAILERS:
                self.empty_frames = 0
                self._on_trailers(e.stream_id, e.headers)
            elif t == EV_RESET:
                self._on_reset(e)
                if self.closed:
                    return
            elif t == EV_WINDOW:
                window_opened(self, e.stream_id)
            elif t == EV_PING:
                self.ctrl_out += 1
            elif t == EV_PING_ACK:
                if self.ka_timeout_handle is not None:
                    self.ka_timeout_handle.cancel()
                    self.ka_timeout_handle = None
            elif t == EV_SETTINGS:
                self.ctrl_out += 1
                self.max_frame = self.h2.max_outbound_frame_size
                if SettingCodes.INITIAL_WINDOW_SIZE in e.changed_settings and self.blocked:
                    flush_blocked(self)
            elif t == EV_PRIORITY:
                self.priority_frames += 1
                if self.priority_frames > opts.max_priority_per_stream * (1 + self.total_streams):
                    if self.stats is not None:
                        self.stats.inbound_priority_frames_flood.value += 1
                    self._fatal(ErrorCodes.ENHANCE_YOUR_CALM)
                    return
            elif t == EV_GOAWAY:
                # the client is going away: finish what is in flight, then close
                self.goaway_sent = True
                if not streams:
                    self.want_close()
        if self.ctrl_out > opts.max_outbound_control_frames:
            self._check_control_flood()

    def _on_trailers(self, sid: int, raw) -> None:
        s = self.streams.get(sid)
        if s is None:
            return
        try:
            trailers = Headers(inbound_headers(raw, TRAILERS))
        except BadHeaders:
            if self.stats is not None:
                self.stats.rx_messaging_error.value += 1
            s.reset_stream("protocol_error")
            if s.stream is not None:
                s.stream.on_reset("http2.invalid_trailers")
            return
        if s.body_left:  # trailers end a body shorter than its content-length
            self._malformed(sid, s)
            return
        s.remote_ended = True
        if s.stream is not None:
            s.stream.decode_trailers(trailers)
        if s.local_ended:
            s._gone()

    def _on_request(self, sid: int, raw, end: bool, resets, rec=None) -> None:
        """A request on a new stream; ``rec``: the lean engine's object for it (of our stream
        class, with the engine's state: ``H2Engine.stream_cls``), which becomes the stream."""
        self.total_streams += 1
        if resets is not None and sid in resets:
            # opened and reset in the same read: never start it (rapid reset)
            self.premature += 1
            self._check_premature()
            return
        if self.goaway_sent or len(self.streams) >= self.max_streams or len(raw) > self.max_fields:
            self._refuse(sid, raw)
            return
        try:
            h, expect, protocol, tunnel, length, names = request_fields(raw)
        except BadHeaders as err:
            log.debug("h2 stream %d: %s", sid, err)
            if err.__class__ is BadAuthority or err.__class__ is BadLength:
                raise h2.exceptions.ProtocolError(str(err)) from None  # (Envoy: the connection ends)
            if self.stats is not None:
                self.stats.rx_messaging_error.value += 1
            self.h2.reset_stream(sid, ErrorCodes.PROTOCOL_ERROR)
            # (Envoy has a stream for it: counted and logged, F22)
            self.hc.streamless("HTTP/2", 0, "http2.invalid.header.field", True, 0)
            return
        if length is None and not tunnel and not expect:
            # (the common case: no body announced, no CONNECT, no 100-continue)
            if rec is not None:
                s = self.streams[sid] = rec
                rec.__init__(self, sid, self.loop.time(), end, 0)  # (the codec's half of the state)
            else:
                s = self.streams[sid] = H2ServerStream(self, sid, self.loop.time(), end, 0)
            if names is None:  # (a fragment in the path)
                self.hc.on_request(s, Headers(h), end, "HTTP/2")
                return
            # the manager's one entry: the pseudo-headers come in the HTTP/1.1 codec's order when
            # :authority is there (request_fields); quiet: none of the headers the manager acts on
            # or adds (appended, not set)
            self.hc.on_request(s, Headers(h), end, "HTTP/2", ":authority" in names,
                               self.note is not None and self.note.isdisjoint(names), False, "content-type" in names)
            return
        st = self.stats
        if protocol is not None:
            if not self.opts.allow_connect:
                # :protocol without our SETTINGS_ENABLE_CONNECT_PROTOCOL: Envoy drops the connection
                log.debug("h2 stream %d: extended CONNECT without allow_connect", sid)
                if st is not None:
                    st.rx_messaging_error.value += 1
                self._fatal(ErrorCodes.PROTOCOL_ERROR)
                return
            # RFC 8441 -> the HTTP/1.1 upgrade form the rest of the proxy knows (as Envoy's codec
            # does): GET + upgrade: <protocol>; the 101 that answers it goes out as a 200
            h = [(":method", "GET") if kv[0] == ":method" else kv for kv in h]
            h.append(("upgrade", protocol))
            h.append(("connection", "upgrade"))  # (Envoy's transformUpgradeRequestFromH2toH1)
        if length and end:
            # a declared body that can never come (RFC 9113 8.1.1): Envoy's codec drops the
            # connection for it, not only the stream
            if st is not None:
                st.rx_messaging_error.value += 1
            self._fatal(ErrorCodes.PROTOCOL_ERROR)
            return
        if rec is not None:
            s = self.streams[sid] = rec
            rec.__init__(self, sid, self.loop.time(), end, 1 if tunnel else 0)
        else:
            s = self.streams[sid] = H2ServerStream(self, sid, self.loop.time(), end, 1 if tunnel else 0)
        if length is not None and not end:
            s.body_left = length  # DATA is counted against it (see _on_data)
        if expect and not end:
            self.h2.send_headers(sid, [(":status", "100")])
        self.hc.on_request(s, Headers(h), end, "HTTP/2")

    def _refuse(self, sid: int, raw) -> None:
        """A request over the stream limit (or after GOAWAY), or with too many fields."""
        st = self.stats
        if self.goaway_sent or len(self.streams) >= self.max_streams:
            if st is not None:
                st.streams_refused.value += 1
            self.h2.reset_stream(sid, ErrorCodes.REFUSED_STREAM)
            return
        if st is not None:
            st.header_overflow.value += 1
        self.h2.reset_stream(sid, ErrorCodes.INTERNAL_ERROR)  # as Envoy (no downstream_rq_too_large)

    def _on_data(self, sid: int, data, n: int, end: bool) -> None:
        s = self.streams.get(sid)
        if not data and not end:
            self.empty_frames += 1
            if self.empty_frames > self.opts.max_empty_frames:
                if self.stats is not None:
                    self.stats.inbound_empty_frames_flood.value += 1
                self._fatal(ErrorCodes.ENHANCE_YOUR_CALM)
                return
        else:
            self.empty_frames = 0
        if s is None or s.closed:
            if n:
                self._ack_dropped(n, sid)
            return
        left = s.body_left
        if left is not None:
            left = s.body_left = left - len(data)
            if left < 0 or (end and left):
                # more or less DATA than the request's content-length: a malformed request, reset
                # before a byte past the declared length goes anywhere (RFC 9113 8.1.1, as Envoy)
                self._malformed(sid, s)
                if n:
                    self._ack_dropped(n, sid)
                return
        if end:
            s.remote_ended = True
        stream = s.stream
        stream.decode_data(data, end)
        if n:
            if s.read_off:
                s.unacked += n
            elif not s.closed:
                self.h2.acknowledge_received_data(n, sid)
            else:
                self._ack_dropped(n, sid)
        if end and s.local_ended:
            s._gone()

    def _ack_dropped(self, n: int, sid: int) -> None:
        """Give back the connection window of DATA nobody takes (a closed or reset stream)."""
        try:
            self.h2.acknowledge_received_data(n, sid)
        except h2.exceptions.ProtocolError:
            pass

    def _malformed(self, sid: int, s) -> None:
        """A request whose DATA disagrees with its content-length: reset with PROTOCOL_ERROR and
        counted as a messaging error, as Envoy's codec does; its stream ends reset."""
        st = self.stats
        if st is not None:
            st.rx_messaging_error.value += 1
            st.tx_reset.value += 1
        try:
            self.h2.reset_stream(sid, ErrorCodes.PROTOCOL_ERROR)
        except h2.exceptions.ProtocolError:
            pass
        self.want_flush()
        if not s.closed:
            s._gone()
            if s.stream is not None:
                s.stream.on_reset("http2.violation.of.messaging.rule")

    def _on_reset(self, e) -> None:
        st = self.stats
        if st is not None:
            st.rx_reset.value += 1
        s = self.streams.get(e.stream_id)
        if s is None:
            return
        if not s.local_ended and self.loop.time() - s.start < PREMATURE_RESET_SECONDS:
            self.premature += 1
        s._gone()
        stream = s.stream
        if stream is not None:
            stream.on_reset("http2.remote_reset")
        self._check_premature()

    def _check_premature(self) -> None:
        if self.total_streams >= PREMATURE_RESET_STREAMS and self.premature * 2 >= self.total_streams:
            if self.opts.premature_counter is not None:
                self.opts.premature_counter.value += 1
            log.debug("h2: closing connection with %d/%d premature resets", self.premature, self.total_streams)
            self._fatal(ErrorCodes.ENHANCE_YOUR_CALM)

    def _check_control_flood(self) -> None:
        # Envoy's max_outbound_control_frames: more acks (PING/SETTINGS) queued than allowed since
        # the output last drained to the socket -> the client floods or does not read.
        if self.stats is not None:
            self.stats.outbound_control_flood.value += 1
        self._fatal(ErrorCodes.ENHANCE_YOUR_CALM, abort=True)

    # -- bytes out --------------------------------------------------------------------------------
    def want_flush(self) -> None:
        if self.in_feed or self.flush_handle is not None or self.closed:
            return
        # flushed when the read being dispatched (e.g. an upstream response) is done, or on the
        # next loop iteration outside a read
        self.flush_handle = True
        writebatch.queue(self, self.loop)

    def flush(self) -> None:
        """``writebatch``'s callback: our frames go out with the connection's other writes."""
        if self.flush_handle is None:
            return
        writebatch.enter()
        try:
            self._flush()
        finally:
            writebatch.leave()

    def _flush(self) -> None:
        self.flush_handle = None
        if self.closed:
            return
        data = self.h2.data_to_send()
        if data:
            self.conn.write(data)
            if self.ctrl_out:
                t = getattr(self.conn, "transport", None)
                if t is not None and t.get_write_buffer_size() == 0:
                    self.ctrl_out = 0
        if self.close_pending and not self.streams:
            self.closed = True
            self.conn.close(flush=True)

    def want_close(self) -> None:
        self.close_pending = True
        self.want_flush()

    # -- watermarks of the downstream transport ------------------------------------------------------
    def on_above_write_buffer_high_watermark(self) -> None:
        self.write_paused = True

    def on_below_write_buffer_low_watermark(self) -> None:
        self.write_paused = False
        if self.blocked and not self.closed:
            flush_blocked(self)
            self._flush()

    # -- connection events (from the HCM) ------------------------------------------------------------
    def on_eof(self) -> None:
        """The client half-closed: nothing more can arrive; streams in flight are reset."""
        self._reset_all("downstream_remote_disconnect")
        self._flush()
        self.closed = True
        self.conn.close(flush=True)

    def on_close(self) -> None:
        self.closed = True
        self._cancel_timers()
        self.flush_handle = None
        self._reset_all("downstream_remote_disconnect")
        try:
            self.conn.remove_watermark_callbacks(self)
        except Exception:
            pass

    def go_away(self) -> None:
        """Graceful: no new streams; close once the streams in flight are done."""
        if self.goaway_sent or self.closed:
            return
        self.goaway_sent = True
        if self.stats is not None:
            self.stats.goaway_sent.value += 1
        self.h2.close_connection(ErrorCodes.NO_ERROR, last_stream_id=self.h2.highest_inbound_stream_id)
        if not self.streams:
            self.close_pending = True
        self._flush() if not self.in_feed else None

    # -- failures ---------------------------------------------------------------------------------
    def _protocol_error(self, e) -> None:
        if e.__class__ is WindowUpdateFlood:  # (counted by window_update_bound; the engine queued GOAWAY)
            self._reset_all("http2.connection_error")
            self._close_now(abort=False)
            return
        st = self.stats
        if st is not None:
            st.rx_messaging_error.value += 1
            if isinstance(e, h2.exceptions.DenialOfServiceError):
                st.header_overflow.value += 1
        self.hc.stats.cx_protocol_error.value += 1
        log.debug("h2 protocol error: %s", e)
        # h2 queued a GOAWAY carrying the error code
        self._reset_all("http2.protocol_error")
        self._close_now(abort=False)

    def _fatal(self, code, abort: bool = False) -> None:
        if self.closed:
            return
        if self.stats is not None:
            self.stats.goaway_sent.value += 1
        try:
            self.h2.close_connection(code, last_stream_id=self.h2.highest_inbound_stream_id)
        except h2.exceptions.ProtocolError:
            pass
        self._reset_all("http2.connection_error")
        self._close_now(abort=abort)

    def _close_now(self, abort: bool) -> None:
        if self.closed:
            return
        if not abort:
            data = self.h2.data_to_send()
            if data:
                self.conn.write(data)
        self.closed = True
        self._cancel_timers()
        self.conn.close(flush=not abort)

    def _reset_all(self, reason: str) -> None:
        streams = list(self.streams.values())
        self.streams.clear()
        self.blocked.clear()
        for s in streams:
            s.closed = True
            if s.pending:
                s.pending.clear()
            stream = s.stream
            if stream is not None and not stream.done:
                try:
                    stream.on_reset(reason)
                except Exception:
                    log.exception("stream reset failed")

    def _cancel_timers(self) -> None:
        for h in (self.ka_handle, self.ka_timeout_handle, self.rht_handle):
            if h is not None:
                h.cancel()
        self.ka_handle = self.ka_timeout_handle = self.rht_handle = None

    # -- keepalive --------------------------------------------------------------------------------
    def _keepalive(self) -> None:
        self.ka_handle = None
        if self.closed:
            return
        opts = self.opts
        self.h2.ping(b"pyproxy!")
        self._flush()
        if self.ka_timeout_handle is None:
            self.ka_timeout_handle = self.loop.call_later(opts.keepalive_timeout, self._keepalive_timeout)
        self.ka_handle = self.loop.call_later(opts.keepalive_interval, self._keepalive)

    def _keepalive_timeout(self) -> None:
        self.ka_timeout_handle = None
        if self.closed:
            return
        if self.stats is not None:
            self.stats.keepalive_timeout.value += 1
        self._reset_all("http2.keepalive_timeout")
        self._close_now(abort=True)
