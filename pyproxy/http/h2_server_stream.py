"""One downstream HTTP/2 request stream: the encoder the HCM's ``ActiveStream`` writes its response
through (``encode_headers/data/trailers``, ``reset_stream``), with its flow-control credit.
"""

from __future__ import annotations

import logging

import h2.exceptions
from h2.errors import ErrorCodes

from .h2_headers import to_h2
from .h2_stream import _NO_PENDING, OutStream
from .h2engine_frames import STREAM_SLOTS
from .headers import Headers

log = logging.getLogger("pyproxy.http2")


class H2ServerStream(OutStream):
    """One request stream: the encoder ``ActiveStream`` writes its response through."""

    # (with the lean engine's own state of the stream: ``STREAM_SLOTS``, set by the engine)
    __slots__ = ("conn", "stream", "remote_ended", "local_ended", "closed", "pending",
                 "pending_bytes", "pending_end", "pending_trailers", "above", "read_off", "unacked",
                 "start", "drain_close", "response_close", "tunnel", "body_left") + STREAM_SLOTS

    def __init__(self, conn, sid, now, remote_ended: bool, tunnel: int):
        """The codec's state; with the lean engine, set on the object the engine made for the
        stream (``Http2ServerCodec._on_request``)."""
        self.conn = conn
        self.sid = sid
        self.stream = None
        self.remote_ended = remote_ended
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
        self.start = now
        # (``drain_close`` / ``response_close`` are only ever set on this encoder, never read)
        self.tunnel = tunnel  # 1: CONNECT / extended CONNECT asked; 2: answered 2xx; 3: its TCP upstream failed
        self.body_left = None  # request body bytes its content-length still announces

    # -- encoder API (ActiveStream -> codec) ---------------------------------------------------------
    def encode_headers(self, headers: Headers, end_stream: bool) -> None:
        if self.closed or self.local_ended:
            return
        h = headers._h
        if self.tunnel or (h and h[0][1] < "2"):  # (a 1xx, checked below; "" and "0..." fall through)
            if h and h[0][0] == ":status" and h[0][1][:1] == "1":
                if h[0][1] != "101":
                    return  # 1xx are answered by the proxy itself (100-continue)
                if self.tunnel:
                    # the upgrade succeeded upstream: RFC 8441's answer is a 200 (upgrade and
                    # connection fields are dropped by the encoders)
                    headers._h = h = [(":status", "200")] + h[1:]
                    self.tunnel = 2
            elif self.tunnel and not end_stream and h and h[0][1][:1] == "2":
                self.tunnel = 2
        conn = self.conn
        try:
            conn.h2.send_headers(self.sid, h if conn.lean else to_h2(headers), end_stream)
        except h2.exceptions.StreamClosedError:
            self._gone()
            return
        except h2.exceptions.ProtocolError as e:
            log.debug("h2 stream %d: cannot send headers: %s", self.sid, e)
            self.reset_stream("protocol_error")
            return
        if end_stream:
            self._ended()
        if conn.flush_handle is None:  # (else queued already: no call)
            conn.want_flush()

    def encode_data(self, data: bytes, end_stream: bool) -> None:
        if self.closed or self.local_ended:
            return
        conn = self.conn
        try:
            if conn.lean and not self.pending and not conn.write_paused and conn.h2.try_send_data(
                    self.sid, data, end_stream):
                # (the common case: the window takes it at once)
                if end_stream:
                    self.local_ended = True
                    if self.remote_ended and not self.unacked:
                        # the whole exchange is over (``_gone``; nothing waits, so not blocked)
                        self.closed = True
                        streams = conn.streams
                        streams.pop(self.sid, None)
                        if conn.goaway_sent and not streams:
                            conn.want_close()
                    else:
                        self._ended()
            else:
                self._send_data(data, end_stream)
        except h2.exceptions.ProtocolError:
            self._gone()
            return
        if conn.flush_handle is None:  # (else queued already: no call)
            conn.want_flush()

    write_body = encode_data  # (a response the stream relays, http/relay_h2.py: its body)

    def relay_done(self, data: bytes) -> None:
        """A relayed response (http/relay_h2.py) is complete, ``data`` its last body bytes."""
        self.encode_data(data, True)

    def encode_trailers(self, trailers: Headers) -> None:
        if self.closed or self.local_ended:
            return
        try:
            self._send_trailers(trailers)
        except h2.exceptions.ProtocolError:
            self._gone()
            return
        self.conn.want_flush()

    def reset_stream(self, reason: str = "") -> None:
        if self.closed:
            return
        conn = self.conn
        st = conn.stats
        if st is not None:
            st.tx_reset.value += 1
        code = ErrorCodes.REFUSED_STREAM if "refused" in reason else (
            ErrorCodes.CONNECT_ERROR if self.tunnel else  # RFC 9113 8.5
            # (Envoy: the upstream's response broke off, however it did)
            ErrorCodes.INTERNAL_ERROR if reason.startswith("upstream_reset_after_response_started") else
            ErrorCodes.NO_ERROR)
        try:
            conn.h2.reset_stream(self.sid, code)
        except h2.exceptions.ProtocolError:
            pass
        self._gone()
        conn.want_flush()

    def stream_read_disable(self, _stream, disable: bool) -> None:
        self.read_disable(disable)

    # -- internals -----------------------------------------------------------------------------------
    def _ended(self) -> None:
        self.local_ended = True
        if self.pending:
            self.pending.clear()
        if self.remote_ended:
            self._gone()
        else:
            # the response is complete: the rest of the request is not needed (RFC 9113 8.1); a
            # tunnel's too (Envoy); a CONNECT whose tunnel could not connect: CONNECT_ERROR (Envoy's code)
            try:
                self.conn.h2.reset_stream(self.sid, ErrorCodes.CONNECT_ERROR if self.tunnel == 3 else ErrorCodes.NO_ERROR)
            except h2.exceptions.ProtocolError:
                pass
            self._gone()

    def _gone(self) -> None:
        if not self._close_out():
            return
        conn = self.conn
        conn.blocked.discard(self)
        conn.streams.pop(self.sid, None)
        if self.unacked:
            # give the connection window back; the stream's own window no longer matters
            n, self.unacked = self.unacked, 0
            try:
                conn.h2.acknowledge_received_data(n, self.sid)
            except (h2.exceptions.ProtocolError, ValueError):
                pass
        if conn.goaway_sent and not conn.streams:
            conn.want_close()

    def _watermark(self, above: bool) -> None:
        s = self.stream
        r = s.router if s is not None else None
        up = r.upstream if r is not None else None
        if up is None:
            return
        if above:
            up.on_above_write_buffer_high_watermark()
        else:
            up.on_below_write_buffer_low_watermark()
