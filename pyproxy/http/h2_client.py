"""Upstream (client) HTTP/2 codec: requests out, responses in, on a sans-IO protocol engine
(``h2_common.new_h2``).

``Http2ClientCodec`` is the protocol half of one upstream connection: it parses the peer's frames
into the request callbacks (``cb.on_upstream_headers/data/trailers/reset``), drives flow control
and sends what the streams wrote. What a pool decides (which requests a connection takes, replaying a
refused request elsewhere, closing, counting failures) is left to the connection class that
derives from it (``cluster/pool_h2.py``), through these hooks:

- ``_stream_failed()``: the peer reset a stream, or the connection ended under it (Envoy counts
  it against the host);
- ``_peer_ready()`` / ``_peer_capacity()``: the peer's first SETTINGS / a new stream limit;
- ``_goaway_received()``: after the streams beyond the GOAWAY were dealt with;
- ``stream_done(s)``: a stream finished and frees its slot; ``close(reason)``: end the connection;
- ``st_tx_reset`` / ``st_rx_reset``: the counters of RST_STREAM frames sent / received (the
  cluster's ``http2.tx_reset`` / ``rx_reset``).

A REFUSED_STREAM reset, and a stream beyond a GOAWAY's last stream id (the peer did not process
it), go to the request as a refused stream, as Envoy's: its router retries it when the retry policy
says so (``retry_on`` refused-stream, counted as a retry), else answers 503.
"""

from __future__ import annotations

import logging

import h2.exceptions
from h2.errors import ErrorCodes
from h2.settings import SettingCodes

from .. import writebatch
from .h2_common import (EV_DATA, EV_ENDED, EV_GOAWAY, EV_RESET, EV_RESPONSE, EV_SETTINGS, EV_TRAILERS, EV_WINDOW,
                        EVENT_KIND, new_h2)
from .h2_headers import TRAILERS, BadHeaders, inbound_headers, response_fields, to_h2
from .h2_stream import _NO_PENDING, OutStream, flush_blocked, window_opened
from .h2engine import H2Engine
from .h2engine_frames import STREAM_SLOTS
from .headers import Headers

log = logging.getLogger("pyproxy.pool")

REPLAY_LIMIT = 64 * 1024
_BODY_RULES = {(":method", "HEAD"): 1, (":method", "CONNECT"): 2}
REFUSED = "remote refused stream reset"
REMOTE_RESET = "remote reset"
TERMINATED = "connection termination"


class H2ClientStream(OutStream):
    """One request on an upstream HTTP/2 connection: the encoder the router writes to."""

    # (with the lean engine's own state of the stream, ``STREAM_SLOTS``: ``send_request`` keeps it here)
    __slots__ = ("conn", "cb", "pending", "pending_bytes", "pending_end", "pending_trailers",
                 "above", "read_off", "unacked", "replay", "replay_bytes", "response_started",
                 "remote_ended", "local_ended", "closed", "cancelled", "headers_sent", "upgrade", "rule",
                 "body_left", "is_tls") + STREAM_SLOTS

    def __init__(self, cb):
        self.conn = None
        self.sid = 0
        self.cb = cb
        # (``_init_out``, inlined: one call less per request)
        self.pending = _NO_PENDING
        self.pending_bytes = 0
        self.pending_end = False
        self.pending_trailers = None
        self.above = False
        self.read_off = 0
        self.unacked = 0
        self.local_ended = False
        self.closed = False
        self.replay = []
        self.replay_bytes = 0
        self.response_started = False
        self.remote_ended = False
        self.cancelled = False
        self.headers_sent = False
        self.upgrade = None  # the protocol of an HTTP/1.1 upgrade sent as extended CONNECT
        self.body_left = None  # response body bytes its framing still allows (None: any)
        self.is_tls = True  # over TLS (the router reads its peer's SANs): the connection's, once bound

    @property
    def local_address(self) -> str:
        c = self.conn
        return c.local_address if c is not None else ""

    # -- encoder API (router -> upstream) -----------------------------------------------------------
    def encode_headers(self, headers: Headers, end_stream: bool) -> None:
        if self.closed:
            return
        r = self.replay
        if r is not None:
            r.append(("h", headers, end_stream))  # (``_log`` of a bodiless event)
        if self.conn is None:
            return  # waiting for a connection to replay on
        self._send_headers(headers, end_stream)

    def _send_headers(self, headers, end_stream):
        c = self.conn
        h = c.h2
        fields = headers._h
        if c.extended_connect and "upgrade" in headers:
            fields = self._extended_connect(fields)
        self.rule = _BODY_RULES.get(fields[0])  # (a HEAD's response has no body, a CONNECT's is a tunnel)
        if c.lean:
            sid = self.sid = h.send_request(fields, end_stream, self)
            c.streams[sid] = self
        else:
            sid = self.sid = h.get_next_available_stream_id()
            c.streams[sid] = self
            h.send_headers(sid, to_h2(Headers(fields)), end_stream)
        self.headers_sent = True
        if end_stream:
            self.local_ended = True
        if c.flush_handle is None:  # (else queued already: no call)
            c.want_flush()

    def _extended_connect(self, fields) -> list:
        """An HTTP/1.1 upgrade (websocket) as RFC 8441 extended CONNECT, as Envoy sends it to an
        upstream that announced SETTINGS_ENABLE_CONNECT_PROTOCOL; its 200 comes back as a 101."""
        out = []
        for kv in fields:
            k = kv[0]
            if k == ":method":
                out.append((":method", "CONNECT"))
            elif k == "upgrade":
                self.upgrade = kv[1]
            elif k != "connection":
                out.append(kv)
        i = 0
        while i < len(out) and out[i][0][0] == ":":
            i += 1
        out.insert(i, (":protocol", self.upgrade))
        return out

    def encode_data(self, data: bytes, end_stream: bool) -> None:
        if self.closed:
            return
        self._log(("d", data, end_stream), len(data))
        if self.conn is None or not self.headers_sent:
            return
        try:
            self._send_data(data, end_stream)
        except h2.exceptions.ProtocolError as e:
            self._local_failure(e)
            return
        self.conn.want_flush()

    def encode_trailers(self, trailers: Headers) -> None:
        if self.closed:
            return
        self._log(("t", trailers), 0)
        if self.conn is None or not self.headers_sent:
            return
        try:
            self._send_trailers(trailers)
        except h2.exceptions.ProtocolError as e:
            self._local_failure(e)
            return
        self.conn.want_flush()

    def reset(self) -> None:
        """The router abandons the request: RST_STREAM(INTERNAL_ERROR), as Envoy's local reset, and
        free the slot."""
        if self.closed:
            return
        self.cancelled = True
        c = self.conn
        if c is not None and self.headers_sent and not c.closed:
            try:
                c.h2.reset_stream(self.sid, ErrorCodes.INTERNAL_ERROR)
                c.st_tx_reset.value += 1
            except h2.exceptions.ProtocolError:
                pass
            c.want_flush()
        self._finish()

    # -- internals ----------------------------------------------------------------------------------
    def _log(self, ev, n):
        r = self.replay
        if r is not None:
            self.replay_bytes += n
            if self.replay_bytes > REPLAY_LIMIT:
                self.replay = None
            else:
                r.append(ev)

    def replay_on(self, conn) -> None:
        """Bound to a (new) connection: send what the router already gave us."""
        self.conn = conn
        self.headers_sent = False
        self.local_ended = False
        if self.pending:
            self.pending.clear()
        self.pending_bytes = 0
        self.pending_end = False
        self.pending_trailers = None
        for ev in self.replay or ():
            if self.closed:
                return
            k = ev[0]
            if k == "h":
                self._send_headers(ev[1], ev[2])
            elif k == "d":
                self._send_data(ev[1], ev[2])
            else:
                self._send_trailers(ev[1])
        conn.want_flush()

    def _ended(self) -> None:
        self.local_ended = True

    def _watermark(self, above: bool) -> None:
        if not self.closed:
            self.cb.on_upstream_watermark(above)

    def _local_failure(self, e) -> None:
        log.debug("upstream h2 stream failed: %s", e)
        cb = self.cb
        self.reset()
        cb.on_upstream_reset("local reset")

    def _finish(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.pending:
            self.pending.clear()
        self.pending_bytes = 0
        self.replay = None
        c = self.conn
        if c is not None:
            if c.blocked:
                c.blocked.discard(self)
            if self.headers_sent and not c.closed:
                h = c.h2
                try:
                    if not self.local_ended and not self.cancelled:
                        # the response is complete: stop sending the request
                        h.reset_stream(self.sid, ErrorCodes.CANCEL)
                        c.st_tx_reset.value += 1
                        c.want_flush()
                    if self.unacked:
                        h.acknowledge_received_data(self.unacked, self.sid)
                        self.unacked = 0
                        c.want_flush()
                except (h2.exceptions.ProtocolError, ValueError):
                    pass
            c.stream_done(self)

    def _release_watermark(self) -> None:
        if self.above:
            self.above = False
            self.cb.on_upstream_watermark(False)

    def can_replay(self) -> bool:
        return self.replay is not None and not self.response_started and not self.cancelled



class Http2ClientCodec:
    """The protocol half of one upstream HTTP/2 connection (see the module docstring for the hooks
    a deriving connection class provides). ``transport`` is set by the connection class."""

    __slots__ = ()  # the deriving connection class declares every attribute

    def _init_codec(self, opts, stream_high: int, tx_counter) -> None:
        self.transport = None
        self.h2 = new_h2(True, opts)
        self.lean = self.h2.__class__ is H2Engine  # takes Headers' pairs as they are
        self.max_frame = self.h2.max_outbound_frame_size
        self.max_fields = opts.max_headers + 1  # (the cluster's max_headers_count; :status not counted)
        self.streams: dict = {}  # sid -> stream with headers sent
        self.closed = False
        self.write_paused = False
        self.blocked: set = set()
        self.stream_high = stream_high
        self.flush_handle = None
        self.goaway = False
        self.ready = False  # the peer's SETTINGS (its stream limit) arrived
        self.extended_connect = False  # the peer announced SETTINGS_ENABLE_CONNECT_PROTOCOL
        self.tx_counter = tx_counter

    # -- bytes in -----------------------------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        """The peer's bytes: events dispatched to the streams, then our frames go out."""
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as e:
            log.debug("upstream h2 protocol error: %s", e)
            self._flush()
            self.close(TERMINATED)
            return
        writebatch.enter()
        try:
            self._handle(events)
        except Exception:
            log.exception("upstream h2 event handling failed")
            self.close(TERMINATED)
            return
        finally:
            writebatch.leave()
        self._flush()

    def _handle(self, events):
        streams = self.streams
        h = self.h2
        kinds = EVENT_KIND
        credit = 0  # DATA that ended its stream: only the connection window takes it back
        for e in events:
            if e.__class__ is tuple:
                # the lean engine's hot events: (kind, stream id, data or fields, length, end?)
                t, sid, x, n, end = e
            else:
                t = kinds.get(e.__class__, -1)
                if t == EV_DATA:
                    sid, x, n, end = e.stream_id, e.data, e.flow_controlled_length, e.stream_ended is not None
                elif t == EV_RESPONSE or t == EV_TRAILERS:
                    sid, x, end = e.stream_id, e.headers, e.stream_ended is not None
            if t == EV_DATA:
                s = streams.get(sid)
                if s is None:
                    if n:
                        try:
                            h.acknowledge_received_data(n, sid)
                        except h2.exceptions.ProtocolError:
                            pass
                    continue
                # more or fewer bytes than the head announced (content-length; none after a 1xx,
                # 204, 304 or to a HEAD): the stream is malformed (RFC 9113 8.1.1)
                left = s.body_left
                if end:
                    if left is not None and len(x) != left:
                        self._bad_response(s, "response body does not match its framing")
                        credit += n
                        credit_sid = sid
                        continue
                    s.remote_ended = True
                    if s.above:
                        s._release_watermark()
                    s._finish()
                    s.cb.on_upstream_data(x, True)
                    if n:
                        credit += n  # (acknowledged once for the whole read, below)
                        credit_sid = sid
                    continue
                if left is not None:
                    left -= len(x)
                    if left < 0:
                        self._bad_response(s, "response body does not match its framing")
                        credit += n
                        credit_sid = sid
                        continue
                    s.body_left = left
                s.cb.on_upstream_data(x, False)
                if n:
                    if s.read_off and not s.closed:
                        s.unacked += n
                    else:
                        try:
                            h.acknowledge_received_data(n, sid)
                        except h2.exceptions.ProtocolError:
                            pass
            elif t == EV_RESPONSE:
                s = streams.get(sid)
                if s is None:
                    continue
                s.response_started = True
                s.replay = None
                if len(x) > self.max_fields:
                    # (Envoy resets such a stream and reports it as "remote reset": a 503 UR)
                    self._bad_response(s, "more than %d headers" % (self.max_fields - 1), "remote reset")
                    continue
                try:
                    fields, left = response_fields(x)
                except BadHeaders as err:
                    self._bad_response(s, err)
                    continue
                if s.rule:
                    if s.rule == 2:
                        left = None  # (a tunnel)
                    elif fields[0][1][:1] != "1":
                        left = 0  # (HEAD)
                if left and end:
                    self._bad_response(s, "response ended before its content-length")
                    continue
                s.body_left = left  # (a 1xx: 0 until the final head sets it again)
                headers = Headers(fields)
                if s.upgrade is not None and not end and headers._h[0][1][:1] == "2":
                    # the extended CONNECT was accepted: the HTTP/1.1 side expects a 101
                    headers._h[0] = (":status", "101")
                    headers._h.append(("upgrade", s.upgrade))
                    headers._h.append(("connection", "upgrade"))
                if end:
                    s.remote_ended = True
                    if s.above:
                        s._release_watermark()
                    s._finish()
                s.cb.on_upstream_headers(headers, end)
            elif t == EV_TRAILERS:
                s = streams.get(sid)
                if s is None:
                    continue
                try:
                    trailers = Headers(inbound_headers(x, TRAILERS))
                except BadHeaders as err:
                    self._bad_response(s, err)
                    continue
                if s.body_left:
                    self._bad_response(s, "response ended before its content-length")
                    continue
                s.remote_ended = True
                s._release_watermark()
                s._finish()
                s.cb.on_upstream_trailers(trailers)
            elif t == EV_ENDED:
                s = streams.get(e.stream_id)
                if s is not None and not s.remote_ended:
                    if s.body_left:
                        self._bad_response(s, "response ended before its content-length")
                        continue
                    s.remote_ended = True
                    s._release_watermark()
                    s._finish()
                    s.cb.on_upstream_data(b"", True)
            elif t == EV_RESET:
                s = streams.get(e.stream_id)
                if s is None:
                    continue
                s._release_watermark()
                s._finish()
                self.st_rx_reset.value += 1
                self._stream_failed()  # (Envoy: any reset)
                s.cb.on_upstream_reset(REFUSED if e.error_code == ErrorCodes.REFUSED_STREAM else REMOTE_RESET)
            elif t == EV_WINDOW:
                window_opened(self, e.stream_id)
            elif t == EV_SETTINGS:
                self.max_frame = h.max_outbound_frame_size
                ch = e.changed_settings
                if SettingCodes.ENABLE_CONNECT_PROTOCOL in ch:
                    self.extended_connect = bool(ch[SettingCodes.ENABLE_CONNECT_PROTOCOL].new_value)
                if SettingCodes.INITIAL_WINDOW_SIZE in ch and self.blocked:
                    flush_blocked(self)
                if not self.ready:
                    self.ready = True
                    self._peer_ready()
                elif SettingCodes.MAX_CONCURRENT_STREAMS in ch:
                    self._peer_capacity()
            elif t == EV_GOAWAY:
                self._on_goaway(e)
        if credit:
            try:
                # (a stream that ended: its own window no longer counts, the connection's does)
                h.acknowledge_received_data(credit, credit_sid)
            except (h2.exceptions.ProtocolError, ValueError):
                pass

    def _bad_response(self, s, err, reason: str = "protocol error"):
        log.debug("upstream h2 stream %d: malformed response headers: %s", s.sid, err)
        try:
            self.h2.reset_stream(s.sid, ErrorCodes.PROTOCOL_ERROR)
            self.st_tx_reset.value += 1
        except h2.exceptions.ProtocolError:
            pass
        s.cancelled = True
        s._release_watermark()
        s._finish()
        s.cb.on_upstream_reset(reason)

    def _on_goaway(self, e):
        self.goaway = True
        last = e.last_stream_id if e.last_stream_id is not None else 0
        for sid, s in sorted(self.streams.items()):
            if sid > last:
                # not processed by the peer: a refused stream for the request's router, which
                # retries it when its policy says so (refused-stream), as Envoy's (nghttp2 closes
                # such streams with REFUSED_STREAM); never replayed behind the router's back
                s._release_watermark()
                s._finish()
                s.cb.on_upstream_reset(REFUSED)
        self._goaway_received()

    def _fail_streams(self, reason) -> None:
        """The connection ended: every stream on it gets a reset (``reason`` or a termination)."""
        streams = list(self.streams.values())
        self.streams.clear()
        self.blocked.clear()
        for s in streams:
            if s.closed:
                continue
            s.closed = True
            s.replay = None
            self._stream_failed()
            s.cb.on_upstream_reset(reason or TERMINATED)

    def pause_writing(self):
        self.write_paused = True
        for s in list(self.streams.values()):
            if not s.above:
                s.above = True
                s._watermark(True)

    def resume_writing(self):
        self.write_paused = False
        if self.blocked:
            flush_blocked(self)
        for s in list(self.streams.values()):
            if s.above and s.pending_bytes <= self.stream_high // 2:
                s.above = False
                s._watermark(False)
        self._flush()

    # -- output -------------------------------------------------------------------------------------
    def want_flush(self) -> None:
        if self.flush_handle is None and not self.closed:
            # sent when the read being dispatched (e.g. a downstream request) is done, or on the
            # next loop iteration outside a read
            self.flush_handle = True
            writebatch.queue(self, self.loop)

    def flush(self) -> None:
        """``writebatch``'s callback."""
        if self.flush_handle is not None:
            self._flush()

    def _flush(self) -> None:
        self.flush_handle = None
        if self.closed or self.transport is None:
            return
        data = self.h2.data_to_send()
        if data:
            self.tx_counter.value += len(data)
            self.transport.write(data)
