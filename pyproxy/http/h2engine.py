"""A lean sans-IO HTTP/2 endpoint (RFC 9113), client or server side.

It implements the part of ``h2.connection.H2Connection``'s API that pyproxy's codecs use, with
the same semantics: ``receive_data(bytes) -> [events]`` (``h2engine_events``, twins of
``h2.events``), ``send_headers / send_data / end_stream / reset_stream``, flow control
(``acknowledge_received_data``, ``increment_flow_control_window``,
``local_flow_control_window``), ``update_settings``, ``ping``, ``close_connection``,
``data_to_send``. Errors are ``h2.exceptions`` with ``error_code`` set; a connection error found
while receiving queues a GOAWAY with that code (as ``h2`` does) and is raised.

Why: ``h2``'s generic per-frame state machine (frame objects, flag sets, enum lookups, a stream
state machine per frame) costs ~60 us per request per side. Here frames are parsed with one
``struct.unpack_from`` per header on the received bytes, dispatched on the type byte, and a
stream is a slotted record with two open flags and four window counters.

Rules kept (connection error -> GOAWAY code, unless "stream error" -> RST_STREAM):
- frame longer than our SETTINGS_MAX_FRAME_SIZE: FRAME_SIZE_ERROR; fixed-size frames (PING 8,
  RST_STREAM 4, WINDOW_UPDATE 4, SETTINGS multiple of 6, SETTINGS ACK empty, GOAWAY >= 8):
  FRAME_SIZE_ERROR; PRIORITY not 5 bytes: stream error FRAME_SIZE_ERROR;
- connection-level frames on a stream or stream frames on stream 0, padding not shorter than the
  payload, frames on idle streams (other than HEADERS/PRIORITY), a stream id of the wrong parity
  or lower than one already used, CONTINUATION out of sequence or anything between HEADERS and
  its last CONTINUATION, PUSH_PROMISE (push is never enabled), first frame not SETTINGS, bad
  ENABLE_PUSH / MAX_FRAME_SIZE values, WINDOW_UPDATE of 0 on the connection: PROTOCOL_ERROR;
  WINDOW_UPDATE of 0 on a stream, self-dependency, HEADERS after the final headers without
  END_STREAM, 1xx with END_STREAM: stream error PROTOCOL_ERROR;
- DATA beyond a window: FLOW_CONTROL_ERROR; windows growing past 2^31-1 (WINDOW_UPDATE or
  INITIAL_WINDOW_SIZE): FLOW_CONTROL_ERROR (stream error for a stream's WINDOW_UPDATE);
- DATA/HEADERS after the peer ended or reset the stream: STREAM_CLOSED; anything on a stream we
  reset is ignored (its DATA still credited back to the connection window); PRIORITY, RST_STREAM
  and WINDOW_UPDATE on closed streams are ignored;
- HPACK decoding errors: COMPRESSION_ERROR; a header list over the limit, a header block over
  ``max_block`` or more than ``MAX_CONTINUATIONS`` CONTINUATION frames: ENHANCE_YOUR_CALM /
  PROTOCOL_ERROR (``DenialOfServiceError`` for the former).
PRIORITY is parsed and reported (``PriorityUpdated``) but not acted on. SETTINGS_MAX_CONCURRENT_
STREAMS is announced; streams beyond it are refused by the caller (REFUSED_STREAM), outbound
streams beyond the peer's raise ``TooManyStreamsError``. Received DATA is credited back only
through ``acknowledge_received_data`` (batched: a WINDOW_UPDATE once half a window is consumed).
"""

from __future__ import annotations

import struct

import hpack
from h2.errors import ErrorCodes
from h2.exceptions import (DenialOfServiceError, FlowControlError, FrameTooLargeError, NoAvailableStreamIDError,
                           ProtocolError, StreamClosedError, StreamIDTooLowError, TooManyStreamsError)
from h2.settings import ChangedSetting, SettingCodes
from hpack.exceptions import HPACKError, OversizedHeaderListError

from .h2engine_events import (ConnectionTerminated, DataReceived, InformationalResponseReceived, PingAckReceived,
                              PingReceived, PriorityUpdated, RemoteSettingsChanged, RequestReceived, ResponseReceived,
                              SettingsAcknowledged, StreamEnded, StreamReset, TrailersReceived, WindowUpdated)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
MAX_WINDOW = 2 ** 31 - 1
MAX_STREAM_ID = 2 ** 31 - 1
DEFAULT_WINDOW = 65535
DEFAULT_MAX_FRAME = 16384
MAX_FRAME_LIMIT = 2 ** 24 - 1
MAX_CONTINUATIONS = 128
CLOSED_MEMORY = 2048  # closed streams remembered (how they closed), for late frames

# frame types / flags
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
F_END_STREAM = 0x1
F_ACK = 0x1
F_END_HEADERS = 0x4
F_PADDED = 0x8
F_PRIORITY = 0x20

# how a stream closed
ENDED, RESET_LOCAL, RESET_REMOTE = 0, 1, 2

_HDR = struct.Struct(">IBI")  # (length << 8 | type), flags, stream id
_pack_hdr = _HDR.pack
_unpack_hdr = _HDR.unpack_from
_U32 = struct.Struct(">I")
_unpack_u32 = _U32.unpack_from
_SETTING = struct.Struct(">HI")
_GOAWAY = struct.Struct(">II")

_ERROR_CODES = {int(c): c for c in ErrorCodes}
_SETTING_CODES = {int(c): c for c in SettingCodes}

_HPACK_ERRORS = (HPACKError, IndexError, TypeError, UnicodeDecodeError, ValueError)


def _code(n: int):
    """An error code as ``ErrorCodes`` member when known (as ``h2`` reports them)."""
    return _ERROR_CODES.get(n, n)


def _conn_error(code, msg: str) -> ProtocolError:
    cls = FrameTooLargeError if code == ErrorCodes.FRAME_SIZE_ERROR else (
        FlowControlError if code == ErrorCodes.FLOW_CONTROL_ERROR else ProtocolError)
    e = cls(msg)
    e.error_code = code
    return e


_END = StreamEnded(0)  # ``stream_ended`` mark when ends are not split (see ``H2Engine.split_ends``)


class Settings:
    """One side's settings, by attribute (``max_concurrent_streams``...) or by ``SettingCodes``."""

    __slots__ = ("header_table_size", "enable_push", "max_concurrent_streams", "initial_window_size",
                 "max_frame_size", "max_header_list_size", "enable_connect_protocol")

    _ATTR = {1: "header_table_size", 2: "enable_push", 3: "max_concurrent_streams", 4: "initial_window_size",
             5: "max_frame_size", 6: "max_header_list_size", 8: "enable_connect_protocol"}

    def __init__(self, values=None):
        self.header_table_size = 4096
        self.enable_push = 1
        self.max_concurrent_streams = 2 ** 32 + 1  # not announced: unlimited
        self.initial_window_size = DEFAULT_WINDOW
        self.max_frame_size = DEFAULT_MAX_FRAME
        self.max_header_list_size = None
        self.enable_connect_protocol = 0
        for k, v in (values or {}).items():
            self[k] = v

    def __getitem__(self, code):
        a = self._ATTR.get(int(code))
        if a is None:
            raise KeyError(code)
        return getattr(self, a)

    def __setitem__(self, code, value) -> None:
        a = self._ATTR.get(int(code))
        if a is not None:
            setattr(self, a, value)

    def __contains__(self, code) -> bool:
        return int(code) in self._ATTR


class _Stream:
    __slots__ = ("sid", "lopen", "ropen", "out_window", "in_window", "in_max", "unacked", "got_headers")

    def __init__(self, sid, out_window, in_window):
        self.sid = sid
        self.lopen = True  # we may still send (no END_STREAM / RST_STREAM sent)
        self.ropen = True  # the peer may still send
        self.out_window = out_window
        self.in_window = in_window
        self.in_max = in_window
        self.unacked = 0  # bytes the application consumed, not yet credited back
        self.got_headers = False  # the request (server) / final response (client) arrived


class H2Engine:
    """One HTTP/2 connection's protocol state; see the module docstring."""

    __slots__ = ("client_side", "encoder", "decoder", "local_settings", "remote_settings", "streams", "closed",
                 "highest_inbound_stream_id", "highest_outbound_stream_id", "out", "inbuf", "need_preface",
                 "seen_settings", "out_window", "in_window", "in_max", "unacked", "cont", "pending_settings",
                 "max_in_frame", "goaway_sent", "goaway_received", "dead", "n_out", "n_in", "max_block",
                 "peer_odd", "initial", "closed_floor", "split_ends",
                 "rst_seen")

    def __init__(self, client_side: bool, settings=None, max_block: int = 0):
        self.client_side = client_side
        self.initial = {int(k): v for k, v in (settings or {}).items()}
        if client_side:
            self.initial[2] = 0
        self.local_settings = Settings(self.initial)
        self.remote_settings = Settings()
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder(max_header_list_size=self.local_settings.max_header_list_size or 2 ** 32)
        self.streams: dict = {}
        self.closed: dict = {}  # sid -> ENDED / RESET_LOCAL / RESET_REMOTE (the last CLOSED_MEMORY)
        self.closed_floor = 0  # highest stream id forgotten from ``closed``
        self.highest_inbound_stream_id = 0
        self.highest_outbound_stream_id = 0
        self.peer_odd = 0 if client_side else 1  # parity of the stream ids the peer opens
        self.out: list = []
        self.inbuf = b""
        self.need_preface = not client_side
        self.seen_settings = False
        self.out_window = DEFAULT_WINDOW  # what we may still send on the connection
        self.in_window = DEFAULT_WINDOW  # what the peer may still send on the connection
        self.in_max = DEFAULT_WINDOW
        self.unacked = 0
        self.cont = None  # [sid, flags, fragments, size, count] while a header block is unfinished
        self.pending_settings: list = []  # SETTINGS sent, waiting for their ACK
        self.max_in_frame = DEFAULT_MAX_FRAME
        self.goaway_sent = False
        self.goaway_received = False
        self.dead = False
        self.n_out = 0
        self.n_in = 0
        # False: the end of a stream is only marked on the DATA/HEADERS event (``stream_ended``),
        # without the separate StreamEnded event ``h2`` also emits (pyproxy's codecs need only the mark)
        self.split_ends = True
        self.rst_seen = False  # the last receive_data() call carried a RST_STREAM
        self.max_block = max_block or max(64 * 1024, 2 * (self.local_settings.max_header_list_size or 0))

    # -- h2-compatible read-only views ------------------------------------------------------------
    @property
    def max_outbound_frame_size(self) -> int:
        return self.remote_settings.max_frame_size

    @property
    def max_inbound_frame_size(self) -> int:
        return self.max_in_frame

    @property
    def open_outbound_streams(self) -> int:
        return self.n_out

    @property
    def open_inbound_streams(self) -> int:
        return self.n_in

    @property
    def outbound_flow_control_window(self) -> int:
        return self.out_window

    @property
    def inbound_flow_control_window(self) -> int:
        return self.in_window

    # -- connection set-up --------------------------------------------------------------------------
    def initiate_connection(self) -> None:
        if self.client_side:
            self.out.append(PREFACE)
        self._send_settings(self.initial, apply_now=True)

    def update_settings(self, new_settings) -> None:
        self._send_settings({int(k): v for k, v in new_settings.items()}, apply_now=False)

    def _send_settings(self, values: dict, apply_now: bool) -> None:
        payload = b"".join(_SETTING.pack(k, v) for k, v in values.items())
        self.out.append(_pack_hdr(len(payload) << 8 | SETTINGS, 0, 0) + payload)
        if apply_now:
            # the initial SETTINGS hold from the start: what a peer sends before reading them
            # stays within the protocol defaults, which ours only raise (windows >= 65535)
            self.pending_settings.append({})
            self._apply_local(values)
        else:
            self.pending_settings.append(values)

    def _apply_local(self, values: dict) -> dict:
        ls = self.local_settings
        changed = {}
        for k, v in values.items():
            try:
                old = ls[k]
            except KeyError:
                continue
            ls[k] = v
            changed[_SETTING_CODES.get(k, k)] = ChangedSetting(_SETTING_CODES.get(k, k), old, v)
            if k == 4:
                delta = v - (old if old is not None else DEFAULT_WINDOW)
                for s in self.streams.values():
                    s.in_window += delta
                    s.in_max += delta
            elif k == 5:
                self.max_in_frame = v
            elif k == 6:
                self.decoder.max_header_list_size = v
                self.max_block = max(self.max_block, 2 * v)
            elif k == 1:
                self.decoder.max_allowed_table_size = v
        return changed

    # -- bytes out ----------------------------------------------------------------------------------
    def data_to_send(self, amount=None) -> bytes:
        out = self.out
        if not out:
            return b""
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        if amount is not None and len(data) > amount:
            out.append(data[amount:])
            data = data[:amount]
        return data

    def clear_outbound_data_buffer(self) -> None:
        self.out.clear()

    def get_next_available_stream_id(self) -> int:
        if self.highest_outbound_stream_id:
            sid = self.highest_outbound_stream_id + 2
        else:
            sid = 1 if self.client_side else 2
        if sid > MAX_STREAM_ID:
            raise NoAvailableStreamIDError("Exhausted allowed stream IDs")
        return sid

    def send_headers(self, stream_id: int, headers, end_stream: bool = False, priority_weight=None,
                     priority_depends_on=None, priority_exclusive=None) -> None:
        s = self.streams.get(stream_id)
        if s is None:
            s = self._open_outbound(stream_id)
        elif not s.lopen:
            raise StreamClosedError(stream_id)
        block = self.encoder.encode(headers)
        flags = F_END_STREAM if end_stream else 0
        mf = self.remote_settings.max_frame_size
        n = len(block)
        if n <= mf:
            self.out.append(_pack_hdr(n << 8 | HEADERS, flags | F_END_HEADERS, stream_id) + block)
        else:
            out = self.out
            out.append(_pack_hdr(mf << 8 | HEADERS, flags, stream_id) + block[:mf])
            off = mf
            while off < n:
                chunk = block[off:off + mf]
                off += mf
                out.append(_pack_hdr(len(chunk) << 8 | CONTINUATION, F_END_HEADERS if off >= n else 0, stream_id)
                           + chunk)
        if end_stream:
            self._local_end(s)

    def _open_outbound(self, sid: int) -> _Stream:
        if (sid & 1) == self.peer_odd or sid <= 0:
            if sid <= self.highest_inbound_stream_id or (sid & 1) == self.peer_odd:
                raise StreamClosedError(sid)
            raise ProtocolError("invalid stream id %d" % sid)
        if sid <= self.highest_outbound_stream_id:
            raise StreamIDTooLowError(sid, self.highest_outbound_stream_id)
        if not self.client_side:
            raise ProtocolError("a server cannot open streams (push is not supported)")
        if self.goaway_received or self.goaway_sent:
            raise ProtocolError("the connection is closing (GOAWAY)")
        if self.n_out >= self.remote_settings.max_concurrent_streams:
            raise TooManyStreamsError("max outbound streams is %d" % self.remote_settings.max_concurrent_streams)
        self.highest_outbound_stream_id = sid
        win = self.local_settings.initial_window_size
        s = self.streams[sid] = _Stream(sid, self.remote_settings.initial_window_size, win)
        self.n_out += 1
        return s

    def send_data(self, stream_id: int, data, end_stream: bool = False, pad_length=None) -> None:
        s = self.streams.get(stream_id)
        if s is None or not s.lopen:
            raise StreamClosedError(stream_id)
        n = len(data)
        if n > self.remote_settings.max_frame_size:
            raise FrameTooLargeError("cannot send %d bytes in one frame (max %d)"
                                     % (n, self.remote_settings.max_frame_size))
        if n > s.out_window or n > self.out_window:
            raise FlowControlError("cannot send %d bytes, flow control window is %d"
                                   % (n, min(s.out_window, self.out_window)))
        s.out_window -= n
        self.out_window -= n
        out = self.out
        out.append(_pack_hdr(n << 8, F_END_STREAM if end_stream else 0, stream_id))
        if n:
            out.append(data)
        if end_stream:
            self._local_end(s)

    def end_stream(self, stream_id: int) -> None:
        s = self.streams.get(stream_id)
        if s is None or not s.lopen:
            raise StreamClosedError(stream_id)
        self.out.append(_pack_hdr(0, F_END_STREAM, stream_id))
        self._local_end(s)

    def reset_stream(self, stream_id: int, error_code=0) -> None:
        s = self.streams.get(stream_id)
        if s is None:
            if self._idle(stream_id):
                raise ProtocolError("cannot reset idle stream %d" % stream_id)
            raise StreamClosedError(stream_id)
        self.out.append(_pack_hdr(4 << 8 | RST_STREAM, 0, stream_id) + _U32.pack(int(error_code)))
        self._close(s, RESET_LOCAL)

    def ping(self, opaque_data: bytes) -> None:
        if len(opaque_data) != 8:
            raise ValueError("PING data must be 8 bytes")
        self.out.append(_pack_hdr(8 << 8 | PING, 0, 0) + bytes(opaque_data))

    def close_connection(self, error_code=0, additional_data=None, last_stream_id=None) -> None:
        if last_stream_id is None:
            last_stream_id = self.highest_inbound_stream_id
        extra = additional_data or b""
        self.out.append(_pack_hdr((8 + len(extra)) << 8 | GOAWAY, 0, 0)
                        + _GOAWAY.pack(last_stream_id, int(error_code)) + extra)
        self.goaway_sent = True

    # -- flow control -------------------------------------------------------------------------------
    def local_flow_control_window(self, stream_id: int) -> int:
        """How much DATA we may send on the stream now."""
        s = self.streams.get(stream_id)
        if s is None or not s.lopen:
            raise StreamClosedError(stream_id)
        w = self.out_window
        return w if w < s.out_window else s.out_window

    def remote_flow_control_window(self, stream_id: int) -> int:
        """How much DATA the peer may still send us on the stream."""
        s = self.streams.get(stream_id)
        if s is None:
            raise StreamClosedError(stream_id)
        w = self.in_window
        return w if w < s.in_window else s.in_window

    def acknowledge_received_data(self, acknowledged_size: int, stream_id: int) -> None:
        """``acknowledged_size`` bytes of the stream's DATA were consumed: credit them back
        (connection and stream), with a WINDOW_UPDATE once half a window is due."""
        if acknowledged_size < 0:
            raise ValueError("cannot acknowledge negative data")
        u = self.unacked + acknowledged_size
        w = self.in_window
        m = self.in_max
        if u >= m >> 1 or (w == 0 and u > 1024):
            inc = u if w + u <= m else m - w
            self.unacked = 0
            if inc > 0:
                self.in_window = w + inc
                self.out.append(_pack_hdr(4 << 8 | WINDOW_UPDATE, 0, 0) + _U32.pack(inc))
        else:
            self.unacked = u
        s = self.streams.get(stream_id)
        if s is not None and s.ropen:
            u = s.unacked + acknowledged_size
            w = s.in_window
            m = s.in_max
            if u >= m >> 1 or (w == 0 and u > 1024):
                inc = u if w + u <= m else m - w
                s.unacked = 0
                if inc > 0:
                    s.in_window = w + inc
                    self.out.append(_pack_hdr(4 << 8 | WINDOW_UPDATE, 0, stream_id) + _U32.pack(inc))
            else:
                s.unacked = u

    def increment_flow_control_window(self, increment: int, stream_id=None) -> None:
        """Grant the peer ``increment`` more bytes at once (and raise the window's size)."""
        if not 1 <= increment <= MAX_WINDOW:
            raise ValueError("flow control increment must be in [1, 2^31-1]")
        if not stream_id:
            if self.in_window + increment > MAX_WINDOW:
                raise FlowControlError("window would exceed 2^31-1")
            self.in_window += increment
            self.in_max += increment
            sid = 0
        else:
            s = self.streams.get(stream_id)
            if s is None or not s.ropen:
                raise StreamClosedError(stream_id)
            if s.in_window + increment > MAX_WINDOW:
                raise FlowControlError("window would exceed 2^31-1")
            s.in_window += increment
            s.in_max += increment
            sid = stream_id
        self.out.append(_pack_hdr(4 << 8 | WINDOW_UPDATE, 0, sid) + _U32.pack(increment))

    # -- stream bookkeeping -------------------------------------------------------------------------
    def _idle(self, sid: int) -> bool:
        if (sid & 1) == self.peer_odd:
            return sid > self.highest_inbound_stream_id
        return sid > self.highest_outbound_stream_id

    def _local_end(self, s) -> None:
        s.lopen = False
        if not s.ropen:
            self._close(s, ENDED)

    def _close(self, s, how: int) -> None:
        sid = s.sid
        s.lopen = s.ropen = False
        del self.streams[sid]
        if (sid & 1) == self.peer_odd:
            self.n_in -= 1
        else:
            self.n_out -= 1
        closed = self.closed
        closed[sid] = how
        if len(closed) > CLOSED_MEMORY:
            for k in list(closed)[:CLOSED_MEMORY // 2]:
                del closed[k]
                if k > self.closed_floor:
                    self.closed_floor = k

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
        max_in = self.max_in_frame
        while end - pos >= 9:
            lt, flags, sid = _unpack_hdr(data, pos)
            n = lt >> 8
            if n > max_in:
                raise _conn_error(ErrorCodes.FRAME_SIZE_ERROR, "frame of %d bytes over the limit %d" % (n, max_in))
            p = pos + 9
            if end - p < n:
                break
            pos = p + n
            t = lt & 0xFF
            sid &= 0x7FFFFFFF
            if self.cont is not None:
                self._continuation(data, p, n, t, flags, sid, events)
                continue
            if not self.seen_settings:
                if t != SETTINGS or flags & F_ACK:
                    raise ProtocolError("the first frame must be SETTINGS")
                self.seen_settings = True
            if t == DATA:
                self._data(data, p, n, flags, sid, events)
            elif t == HEADERS:
                self._headers(data, p, n, flags, sid, events)
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
            if self.split_ends:
                events.append(StreamEnded(sid))
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

    def _decode(self, block: bytes) -> list:
        try:
            return self.decoder.decode(block, raw=True)
        except OversizedHeaderListError as e:
            raise DenialOfServiceError("oversized header list: %s" % e) from None
        except _HPACK_ERRORS as e:
            raise _conn_error(ErrorCodes.COMPRESSION_ERROR, "HPACK decoding failed: %s" % e) from None

    def _header_block(self, sid: int, flags: int, block: bytes, self_dep: bool, events: list) -> None:
        # decoded whatever becomes of the stream: the HPACK table must stay in step with the peer's
        headers = self._decode(block)
        end = flags & F_END_STREAM
        s = self.streams.get(sid)
        if s is None:
            if (sid & 1) == self.peer_odd and sid > self.highest_inbound_stream_id:
                if self.client_side:
                    raise ProtocolError("HEADERS on stream %d the server cannot open" % sid)
                self.highest_inbound_stream_id = sid
                if self_dep:
                    self.out.append(_pack_hdr(4 << 8 | RST_STREAM, 0, sid) + _U32.pack(1))
                    self.closed[sid] = RESET_LOCAL
                    return
                s = self.streams[sid] = _Stream(sid, self.remote_settings.initial_window_size,
                                                self.local_settings.initial_window_size)
                self.n_in += 1
                s.got_headers = True
                ev = RequestReceived(sid, headers)
                events.append(ev)
                if end:
                    if self.split_ends:
                        events.append(StreamEnded(sid))
                    ev.stream_ended = _END
                    s.ropen = False
                return
            if self._closed_frame(sid, "HEADERS"):
                return
        if not s.ropen:
            self._closed_frame(sid, "HEADERS")
        if self_dep:
            self._stream_error(sid, ErrorCodes.PROTOCOL_ERROR, events)
            return
        if not s.got_headers:
            # client side: the response (or a 1xx before it)
            if headers and headers[0][0] == b":status" and headers[0][1][:1] == b"1":
                if end:
                    self._stream_error(sid, ErrorCodes.PROTOCOL_ERROR, events)
                    return
                events.append(InformationalResponseReceived(sid, headers))
                return
            s.got_headers = True
            ev = ResponseReceived(sid, headers)
        else:
            if not end:
                self._stream_error(sid, ErrorCodes.PROTOCOL_ERROR, events)
                return
            ev = TrailersReceived(sid, headers)
        events.append(ev)
        if end:
            if self.split_ends:
                events.append(StreamEnded(sid))
            ev.stream_ended = _END
            s.ropen = False
            if not s.lopen:
                self._close(s, ENDED)

    def _window_update(self, data: bytes, p: int, n: int, sid: int, events: list) -> None:
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
