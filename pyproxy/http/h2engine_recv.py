"""The receiving half of the lean HTTP/2 engine (``h2engine.H2Engine`` derives from it): bytes
in, frames parsed with one ``struct.unpack_from`` per header, checked against the rules listed in
``h2engine``'s docstring, events out."""

from __future__ import annotations

from h2.errors import ErrorCodes
from h2.exceptions import DenialOfServiceError, ProtocolError, StreamClosedError
from h2.settings import ChangedSetting
from hpack.exceptions import OversizedHeaderListError

from .h2engine_events import (EV_DATA, EV_REQUEST, EV_RESPONSE, EV_TRAILERS,
                              ConnectionTerminated, DataReceived, InformationalResponseReceived, PingAckReceived,
                              PingReceived, PriorityUpdated, RemoteSettingsChanged, RequestReceived, ResponseReceived,
                              SettingsAcknowledged, StreamEnded, StreamReset, TrailersReceived, WindowUpdated)
from .h2engine_frames import (CONTINUATION, DATA, DEFAULT_MAX_FRAME, ENDED, F_ACK, F_END_HEADERS, F_END_STREAM,
                              F_PADDED, F_PRIORITY, GOAWAY, HEADERS, MAX_CONTINUATIONS, MAX_FRAME_LIMIT, MAX_WINDOW,
                              PING, PREFACE, PRIORITY, PUSH_PROMISE, RESET_LOCAL, RESET_REMOTE, RST_STREAM, SETTINGS,
                              Settings, WINDOW_UPDATE, _END, _GOAWAY, _HPACK_ERRORS, _SETTING, _SETTING_CODES,
                              _Stream, _U32, _code, _conn_error, _pack_hdr, _unpack_hdr, _unpack_u32)


_new = object.__new__


class FrameReceiver:
    """``receive_data`` and the per-frame-type handlers; the state lives on ``H2Engine``."""

    __slots__ = ()

    # -- bytes in -----------------------------------------------------------------------------------
    def receive_data(self, data: bytes) -> list:
        """Parse what arrived; return the events. A connection error queues GOAWAY and raises."""
        if self.dead:
            return []
        self.rst_seen = False
        if self.inbuf:
            data = self.inbuf + data
            self.inbuf = b""
        events = []
        try:
            if self.need_preface:
                if len(data) < 24:
                    if not PREFACE.startswith(data):
                        raise ProtocolError("invalid HTTP/2 preface")
                    self.inbuf = data
                    return events
                if data[:24] != PREFACE:
                    raise ProtocolError("invalid HTTP/2 preface")
                self.need_preface = False
                data = data[24:]
            self._frames(data, events)
        except ProtocolError as e:
            self.dead = True
            self.inbuf = b""
            self.close_connection(e.error_code, last_stream_id=self.highest_inbound_stream_id)
            raise
        return events

    def _frames(self, data: bytes, events: list) -> None:
        pos = 0
        end = len(data)
        last = end - 9  # a frame header fits while pos <= last
        max_in = self.max_in_frame
        streams = self.streams
        cont = self.cont  # (re-read after the calls that may open or finish a header block)
        settled = self.seen_settings
        split = self.split_ends  # (fixed for the connection's life before any frame arrives)
        while pos <= last:
            lt, flags, sid = _unpack_hdr(data, pos)
            n = lt >> 8
            if n > max_in:
                raise _conn_error(ErrorCodes.FRAME_SIZE_ERROR, "frame of %d bytes over the limit %d" % (n, max_in))
            p = pos + 9
            pos = p + n
            if pos > end:
                pos = p - 9  # incomplete: kept for the next read
                break
            t = lt & 0xFF
            sid &= 0x7FFFFFFF
            if cont is not None:
                self._continuation(data, p, n, t, flags, sid, events)
                cont = self.cont
                continue
            if t == DATA:
                if not settled:
                    raise ProtocolError("the first frame must be SETTINGS")
                s = streams.get(sid)
                if (s is not None and s.ropen and not flags & F_PADDED and n <= self.in_window
                        and n <= s.in_window and not split):
                    # (the common case: DATA within the windows on an open stream)
                    self.in_window -= n
                    s.in_window -= n
                    if flags & F_END_STREAM:
                        events.append((EV_DATA, sid, data[p:pos], n, True))
                        s.ropen = False
                        if not s.lopen:
                            self._close(s, ENDED)
                    else:
                        events.append((EV_DATA, sid, data[p:pos], n, False))
                    continue
                self._data(data, p, n, flags, sid, events)
            elif t == HEADERS:
                if not settled:
                    raise ProtocolError("the first frame must be SETTINGS")
                if (flags & 0x2C) == 0x4 and sid:  # END_HEADERS, neither PADDED nor PRIORITY (the common case)
                    self._header_block(sid, flags, data[p:pos], False, events)
                else:
                    self._headers(data, p, n, flags, sid, events)
                    cont = self.cont
            elif not settled:
                if t != SETTINGS or flags & F_ACK:
                    raise ProtocolError("the first frame must be SETTINGS")
                self.seen_settings = settled = True
                self._settings(data, p, n, flags, sid, events)
            elif t == WINDOW_UPDATE:
                self._window_update(data, p, n, sid, events)
            elif t == RST_STREAM:
                self._rst_stream(data, p, n, sid, events)
            elif t == SETTINGS:
                self._settings(data, p, n, flags, sid, events)
            elif t == PING:
                if sid:
                    raise ProtocolError("PING on stream %d" % sid)
                if n != 8:
                    raise _conn_error(ErrorCodes.FRAME_SIZE_ERROR, "PING of %d bytes" % n)
                opaque = data[p:p + 8]
                if flags & F_ACK:
                    events.append(PingAckReceived(opaque))
                else:
                    self.out.append(_pack_hdr(8 << 8 | PING, F_ACK, 0) + opaque)
                    events.append(PingReceived(opaque))
            elif t == GOAWAY:
                if sid:
                    raise ProtocolError("GOAWAY on stream %d" % sid)
                if n < 8:
                    raise _conn_error(ErrorCodes.FRAME_SIZE_ERROR, "GOAWAY of %d bytes" % n)
                last, code = _GOAWAY.unpack_from(data, p)
                self.goaway_received = True
                events.append(ConnectionTerminated(_code(code), last & 0x7FFFFFFF, data[p + 8:p + n] or None))
            elif t == PRIORITY:
                self._priority(data, p, n, sid, events)
            elif t == CONTINUATION:
                raise ProtocolError("CONTINUATION without HEADERS")
            elif t == PUSH_PROMISE:
                raise ProtocolError("PUSH_PROMISE received (push is disabled)" if self.client_side
                                    else "PUSH_PROMISE sent by a client")
            # unknown frame types are ignored (RFC 9113 4.1)
        self.inbuf = data[pos:] if pos < end else b""

    def _stream_error(self, sid: int, code, events: list) -> None:
        """Reset one stream (RST_STREAM with ``code``); the application hears a StreamReset."""
        self.out.append(_pack_hdr(4 << 8 | RST_STREAM, 0, sid) + _U32.pack(int(code)))
        s = self.streams.get(sid)
        if s is not None:
            self._close(s, RESET_LOCAL)
            events.append(StreamReset(sid, code, False))

    def _closed_frame(self, sid: int, what: str) -> bool:
        """A DATA/HEADERS frame for a stream not open for receiving. True: ignore it (we reset
        the stream); otherwise a connection error is raised."""
        if sid == 0:
            raise ProtocolError("%s on stream 0" % what)
        s = self.streams.get(sid)
        if s is None:
            if self._idle(sid):
                raise ProtocolError("%s on idle stream %d" % (what, sid))
            how = self.closed.get(sid)
            if how is None:
                if sid > self.closed_floor:
                    # skipped over by a higher stream id: closed without ever being opened
                    raise ProtocolError("%s on stream %d, which was never opened" % (what, sid))
                return True  # closed long ago: we no longer know how, let it pass
            if how == RESET_LOCAL:
                return True
        e = StreamClosedError(sid)
        e.args = ("%s on closed stream %d" % (what, sid),)
        e.error_code = ErrorCodes.STREAM_CLOSED
        raise e

    def _data(self, data: bytes, p: int, n: int, flags: int, sid: int, events: list) -> None:
        if flags & F_PADDED:
            if n == 0 or data[p] >= n:
                raise ProtocolError("DATA padding too long")
            body = data[p + 1:p + n - data[p]]
        else:
            body = data[p:p + n]
        if n > self.in_window:
            raise _conn_error(ErrorCodes.FLOW_CONTROL_ERROR, "DATA of %d bytes beyond the connection window %d"
                              % (n, self.in_window))
        self.in_window -= n
        s = self.streams.get(sid)
        if s is None or not s.ropen:
            self._closed_frame(sid, "DATA")
            if n:
                self.acknowledge_received_data(n, sid)  # nobody takes these bytes
            return
        if n > s.in_window:
            raise _conn_error(ErrorCodes.FLOW_CONTROL_ERROR, "DATA of %d bytes beyond stream %d's window %d"
                              % (n, sid, s.in_window))
        s.in_window -= n
        ev = DataReceived(sid, body, n)
        events.append(ev)
        if flags & F_END_STREAM:
            self._remote_end(s, ev, events)

    def _remote_end(self, s, ev, events: list) -> None:
        """``ev``'s frame carried END_STREAM: the peer is done sending on the stream."""
        if self.split_ends:
            events.append(StreamEnded(s.sid))
        ev.stream_ended = _END
        s.ropen = False
        if not s.lopen:
            self._close(s, ENDED)

    def _headers(self, data: bytes, p: int, n: int, flags: int, sid: int, events: list) -> None:
        if sid == 0:
            raise ProtocolError("HEADERS on stream 0")
        e = p + n
        if flags & F_PADDED:
            if n == 0 or data[p] >= n:
                raise ProtocolError("HEADERS padding too long")
            e -= data[p]
            p += 1
        self_dep = False
        if flags & F_PRIORITY:
            if e - p < 5:
                raise _conn_error(ErrorCodes.FRAME_SIZE_ERROR, "HEADERS too short for its priority")
            self_dep = (_unpack_u32(data, p)[0] & 0x7FFFFFFF) == sid
            p += 5
        if flags & F_END_HEADERS:
            self._header_block(sid, flags, data[p:e], self_dep, events)
        else:
            self.cont = [sid, flags, [data[p:e]], e - p, 0, self_dep]

    def open_unfinished_inbound(self) -> bool:
        """Server side: open the stream whose first header block is still unfinished, so that it
        can be answered and reset (request_headers_timeout). Its block, if it ever completes, is
        still decoded (the HPACK table stays in step) and then dropped as for a reset stream."""
        c = self.cont
        if c is None or self.client_side:
            return False
        sid = c[0]
        if (sid & 1) != self.peer_odd or sid <= self.highest_inbound_stream_id:
            return False
        self.highest_inbound_stream_id = sid
        s = self.streams[sid] = _Stream(sid, self.remote_settings.initial_window_size,
                                        self.local_settings.initial_window_size)
        s.got_headers = True
        self.n_in += 1
        return True

    def _continuation(self, data, p: int, n: int, t: int, flags: int, sid: int, events: list) -> None:
        c = self.cont
        if t != CONTINUATION or sid != c[0]:
            raise ProtocolError("expected CONTINUATION on stream %d" % c[0])
        c[2].append(data[p:p + n])
        c[3] += n
        c[4] += 1
        if c[3] > self.max_block:
            raise DenialOfServiceError("header block over %d bytes" % self.max_block)
        if c[4] > MAX_CONTINUATIONS:
            raise ProtocolError("more than %d CONTINUATION frames" % MAX_CONTINUATIONS)
        if flags & F_END_HEADERS:
            self.cont = None
            self._header_block(sid, c[1], b"".join(c[2]), c[5], events)

    @staticmethod
    def _decode_error(e) -> ProtocolError:
        if isinstance(e, OversizedHeaderListError):
            return DenialOfServiceError("oversized header list: %s" % e)
        return _conn_error(ErrorCodes.COMPRESSION_ERROR, "HPACK decoding failed: %s" % e)

    def _refuse_oversized(self, sid: int) -> bool:
        """A new request whose header list is over the limit (the HPACK table took the whole
        block, so it stays in step): its stream is reset (INTERNAL_ERROR) and the codec told
        (``oversized.header_list_too_large``); the connection goes on, as Envoy's does. False: not such a request."""
        if self.oversized is None or self.client_side or sid in self.streams or (sid & 1) != self.peer_odd \
                or sid <= self.highest_inbound_stream_id:
            return False
        self.highest_inbound_stream_id = sid
        self.out.append(_pack_hdr(4 << 8 | RST_STREAM, 0, sid) + _U32.pack(int(ErrorCodes.INTERNAL_ERROR)))
        self.closed[sid] = RESET_LOCAL
        self.oversized.header_list_too_large(sid)
        return True

    def _header_block(self, sid: int, flags: int, block: bytes, self_dep: bool, events: list) -> None:
        # decoded whatever becomes of the stream: the HPACK table must stay in step with the peer's
        try:
            headers = self.decoder.decode(block, True)
        except _HPACK_ERRORS as e:
            if e.__class__ is OversizedHeaderListError and self._refuse_oversized(sid):
                return
            raise self._decode_error(e) from None
        end = flags & F_END_STREAM
        s = self.streams.get(sid)
        if s is None:
            if (sid & 1) != self.peer_odd or sid <= self.highest_inbound_stream_id:
                self._closed_frame(sid, "HEADERS")  # raises, or True: ignored
                return
            # a new stream: the request
            if self.client_side:
                raise ProtocolError("HEADERS on stream %d the server cannot open" % sid)
            self.highest_inbound_stream_id = sid
            if self_dep:
                self.out.append(_pack_hdr(4 << 8 | RST_STREAM, 0, sid) + _U32.pack(1))
                self.closed[sid] = RESET_LOCAL
                return
            # (``_Stream.__init__``, inlined, on an object of the codec's stream class)
            s = self.streams[sid] = _new(self.stream_cls)
            s.sid = sid
            s.lopen = s.ropen = True
            s.out_window = self.remote_settings.initial_window_size
            s.in_window = s.in_max = self.local_settings.initial_window_size
            s.wu_due = 0
            s.got_headers = True
            self.n_in += 1
            if not self.split_ends:
                events.append((EV_REQUEST, sid, headers, s, bool(end)))
                if end:
                    s.ropen = False
                return
            ev = RequestReceived(sid, headers)
        elif not s.ropen:
            self._closed_frame(sid, "HEADERS")  # raises, or True: ignored
            return
        elif self_dep:
            self._stream_error(sid, ErrorCodes.PROTOCOL_ERROR, events)
            return
        elif not s.got_headers:
            # client side: the response (or a 1xx before it)
            if headers and headers[0][1] < b"2" and headers[0][0] == b":status" and headers[0][1][:1] == b"1":
                if end:
                    self._stream_error(sid, ErrorCodes.PROTOCOL_ERROR, events)
                    return
                events.append(InformationalResponseReceived(sid, headers))
                return
            s.got_headers = True
            if not self.split_ends:
                events.append((EV_RESPONSE, sid, headers, 0, bool(end)))
                if end:
                    s.ropen = False
                    if not s.lopen:
                        self._close(s, ENDED)
                return
            ev = ResponseReceived(sid, headers)
        elif not end:
            self._stream_error(sid, ErrorCodes.PROTOCOL_ERROR, events)
            return
        elif not self.split_ends:
            events.append((EV_TRAILERS, sid, headers, 0, True))
            s.ropen = False
            if not s.lopen:
                self._close(s, ENDED)
            return
        else:
            ev = TrailersReceived(sid, headers)
        events.append(ev)
        if end:
            self._remote_end(s, ev, events)

    def _window_update(self, data: bytes, p: int, n: int, sid: int, events: list) -> None:
        k = self.wu_in = self.wu_in + 1
        if k > self.wu_cap:
            self.wu_cap = self.wu_over(k)  # (raises WindowUpdateFlood past the bound)
        if n != 4:
            raise _conn_error(ErrorCodes.FRAME_SIZE_ERROR, "WINDOW_UPDATE of %d bytes" % n)
        inc = _unpack_u32(data, p)[0] & 0x7FFFFFFF
        if sid == 0:
            if inc == 0:
                raise ProtocolError("WINDOW_UPDATE of 0 on the connection")
            w = self.out_window + inc
            if w > MAX_WINDOW:
                raise _conn_error(ErrorCodes.FLOW_CONTROL_ERROR, "connection window over 2^31-1")
            self.out_window = w
            events.append(WindowUpdated(0, inc))
            return
        s = self.streams.get(sid)
        if s is None:
            if self._idle(sid):
                raise ProtocolError("WINDOW_UPDATE on idle stream %d" % sid)
            return
        if inc == 0:
            self._stream_error(sid, ErrorCodes.PROTOCOL_ERROR, events)
            return
        w = s.out_window + inc
        if w > MAX_WINDOW:
            self._stream_error(sid, ErrorCodes.FLOW_CONTROL_ERROR, events)
            return
        s.out_window = w
        events.append(WindowUpdated(sid, inc))

    def _rst_stream(self, data: bytes, p: int, n: int, sid: int, events: list) -> None:
        if n != 4:
            raise _conn_error(ErrorCodes.FRAME_SIZE_ERROR, "RST_STREAM of %d bytes" % n)
        if sid == 0:
            raise ProtocolError("RST_STREAM on stream 0")
        s = self.streams.get(sid)
        if s is None:
            if self._idle(sid):
                raise ProtocolError("RST_STREAM on idle stream %d" % sid)
            return
        self._close(s, RESET_REMOTE)
        self.rst_seen = True
        events.append(StreamReset(sid, _code(_unpack_u32(data, p)[0]), True))

    def _priority(self, data: bytes, p: int, n: int, sid: int, events: list) -> None:
        if sid == 0:
            raise ProtocolError("PRIORITY on stream 0")
        if n != 5:
            self._stream_error(sid, ErrorCodes.FRAME_SIZE_ERROR, events)
            return
        dep = _unpack_u32(data, p)[0]
        if dep & 0x7FFFFFFF == sid:
            self._stream_error(sid, ErrorCodes.PROTOCOL_ERROR, events)
            return
        events.append(PriorityUpdated(sid, data[p + 4] + 1, dep & 0x7FFFFFFF, bool(dep >> 31)))

    def _settings(self, data: bytes, p: int, n: int, flags: int, sid: int, events: list) -> None:
        if sid:
            raise ProtocolError("SETTINGS on stream %d" % sid)
        if flags & F_ACK:
            if n:
                raise _conn_error(ErrorCodes.FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            if not self.pending_settings:
                raise ProtocolError("SETTINGS ACK without SETTINGS sent")
            values = self.pending_settings.pop(0)
            events.append(SettingsAcknowledged(self._apply_local(values) if values else {}))
            return
        if n % 6:
            raise _conn_error(ErrorCodes.FRAME_SIZE_ERROR, "SETTINGS of %d bytes" % n)
        rs = self.remote_settings
        changed = {}
        for off in range(p, p + n, 6):
            k, v = _SETTING.unpack_from(data, off)
            if k == 4:
                if v > MAX_WINDOW:
                    raise _conn_error(ErrorCodes.FLOW_CONTROL_ERROR, "INITIAL_WINDOW_SIZE %d over 2^31-1" % v)
                delta = v - rs.initial_window_size
                if delta:
                    for s in self.streams.values():
                        w = s.out_window + delta
                        if w > MAX_WINDOW:
                            raise _conn_error(ErrorCodes.FLOW_CONTROL_ERROR, "stream window over 2^31-1")
                        s.out_window = w
            elif k == 5:
                if not DEFAULT_MAX_FRAME <= v <= MAX_FRAME_LIMIT:
                    raise ProtocolError("invalid MAX_FRAME_SIZE %d" % v)
            elif k == 2:
                if v > 1:
                    raise ProtocolError("invalid ENABLE_PUSH %d" % v)
                if v and self.client_side:
                    raise ProtocolError("a server cannot enable push")
            elif k == 8:
                if v > 1:
                    raise ProtocolError("invalid ENABLE_CONNECT_PROTOCOL %d" % v)
            elif k == 1:
                self.encoder.header_table_size = v
            elif k not in Settings._ATTR:
                continue  # unknown settings are ignored
            code = _SETTING_CODES.get(k, k)
            changed[code] = ChangedSetting(code, rs[k], v)
            rs[k] = v
        self.out.append(_pack_hdr(SETTINGS, F_ACK, 0))
        events.append(RemoteSettingsChanged(changed))
