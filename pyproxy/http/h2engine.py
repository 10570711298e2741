"""A lean sans-IO HTTP/2 endpoint (RFC 9113), client or server side.

It implements the part of ``h2.connection.H2Connection``'s API that pyproxy's codecs use, with
the same semantics: ``receive_data(bytes) -> [events]`` (``h2engine_events``, twins of
``h2.events``), ``send_headers / send_data / end_stream / reset_stream``, flow control
(``acknowledge_received_data``, ``increment_flow_control_window``,
``local_flow_control_window``), ``update_settings``, ``ping``, ``close_connection``,
``data_to_send`` (with ``split_ends`` False, the codecs' mode, requests, responses, trailers and
DATA come as plain tuples instead: see ``h2engine_events``). Errors are ``h2.exceptions`` with ``error_code`` set; a connection error found
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

from itertools import islice

import hpack
from h2.exceptions import (FlowControlError, FrameTooLargeError, NoAvailableStreamIDError, ProtocolError,
                           StreamClosedError, StreamIDTooLowError, TooManyStreamsError)
from h2.settings import ChangedSetting

from .h2engine_frames import (CLOSED_MEMORY, CONTINUATION, DEFAULT_MAX_FRAME, DEFAULT_WINDOW, ENDED, F_END_HEADERS,
                              F_END_STREAM, GOAWAY, HEADERS, MAX_STREAM_ID, MAX_WINDOW, PING, PREFACE, RESET_LOCAL,
                              RST_STREAM, SETTINGS, Settings, WINDOW_UPDATE, WU_NO_BOUND, _GOAWAY, _SETTING,
                              _SETTING_CODES, _Stream, _U32, _pack_hdr)
from .h2engine_recv import FrameReceiver


class H2Engine(FrameReceiver):
    """One HTTP/2 connection's protocol state; see the module docstring."""

    __slots__ = ("client_side", "encoder", "decoder", "local_settings", "remote_settings", "streams", "closed",
                 "highest_inbound_stream_id", "highest_outbound_stream_id", "out", "inbuf", "need_preface",
                 "seen_settings", "out_window", "in_window", "in_max", "unacked", "cont", "pending_settings",
                 "max_in_frame", "goaway_sent", "goaway_received", "dead", "n_out", "n_in", "max_block",
                 "peer_odd", "initial", "closed_floor", "split_ends",
                 "rst_seen", "data_sent", "wu_in", "wu_cap", "wu_over", "stream_cls", "oversized")

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
        self.oversized = None  # server side: the codec told of a request reset for its header list size
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
        # the WINDOW_UPDATE flood bound: frames received; past ``wu_cap`` the server codec's
        # ``wu_over(n)`` gives the next cap or raises (counts DATA frames sent for it)
        self.data_sent = 0
        self.wu_in = 0
        self.wu_cap = WU_NO_BOUND
        self.wu_over = None
        self.max_block = max_block or max(64 * 1024, 2 * (self.local_settings.max_header_list_size or 0))
        # the class of the streams the peer opens (``_header_block``): the server codec sets its
        # own stream class (which declares ``STREAM_SLOTS``) and takes the object over with the
        # request event (its fourth item)
        self.stream_cls = _Stream

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
        n = len(block)
        if n <= self.remote_settings.max_frame_size:
            # (HEADERS = 1; END_STREAM | END_HEADERS = 5, END_HEADERS = 4: literals, no global loads)
            self.out.append(_pack_hdr(n << 8 | 1, 5 if end_stream else 4, stream_id) + block)
        else:
            self._send_block(stream_id, block, end_stream)
        if end_stream:
            self._local_end(s)

    def send_request(self, headers, end_stream: bool, s=None) -> int:
        """Client side: open the next stream with ``headers`` (``get_next_available_stream_id`` +
        ``send_headers`` in one step); returns its id. ``s``: the caller's stream object, which
        declares ``STREAM_SLOTS``, to keep the stream's state on (else a ``_Stream``). Not in
        ``h2``'s API."""
        sid = self.highest_outbound_stream_id + 2 if self.highest_outbound_stream_id else 1
        if (sid > MAX_STREAM_ID or not self.client_side or self.goaway_received or self.goaway_sent
                or self.n_out >= self.remote_settings.max_concurrent_streams):
            sid = self.get_next_available_stream_id()
            self.send_headers(sid, headers, end_stream)  # raises what h2 would
            return sid
        self.highest_outbound_stream_id = sid
        if s is None:
            s = _Stream(sid, self.remote_settings.initial_window_size, self.local_settings.initial_window_size)
        else:
            # (``_Stream.__init__`` on the caller's object)
            s.sid = sid
            s.lopen = s.ropen = True
            s.out_window = self.remote_settings.initial_window_size
            s.in_window = s.in_max = self.local_settings.initial_window_size
            s.wu_due = 0
            s.got_headers = False
        self.streams[sid] = s
        self.n_out += 1
        block = self.encoder.encode(headers)
        n = len(block)
        if n <= self.remote_settings.max_frame_size:
            # (HEADERS = 1; END_STREAM | END_HEADERS = 5, END_HEADERS = 4: literals, no global loads)
            self.out.append(_pack_hdr(n << 8 | 1, 5 if end_stream else 4, sid) + block)
            if end_stream:
                s.lopen = False
            return sid
        self._send_block(sid, block, end_stream)
        if end_stream:
            s.lopen = False
        return sid

    def _send_block(self, stream_id: int, block: bytes, end_stream: bool) -> None:
        """A header block over the peer's frame size: HEADERS and CONTINUATION frames."""
        mf = self.remote_settings.max_frame_size
        n = len(block)
        out = self.out
        out.append(_pack_hdr(mf << 8 | HEADERS, F_END_STREAM if end_stream else 0, stream_id) + block[:mf])
        off = mf
        while off < n:
            chunk = block[off:off + mf]
            off += mf
            out.append(_pack_hdr(len(chunk) << 8 | CONTINUATION, F_END_HEADERS if off >= n else 0, stream_id) + chunk)

    def _open_outbound(self, sid: int) -> _Stream:
        if (self.client_side and sid > self.highest_outbound_stream_id and sid & 1 and not self.goaway_received
                and not self.goaway_sent and self.n_out < self.remote_settings.max_concurrent_streams):
            # (the common case: the next request on a live connection)
            self.highest_outbound_stream_id = sid
            s = self.streams[sid] = _Stream(sid, self.remote_settings.initial_window_size,
                                            self.local_settings.initial_window_size)
            self.n_out += 1
            return s
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
        if not self.try_send_data(stream_id, data, end_stream):
            n = len(data)
            if n > self.remote_settings.max_frame_size:
                raise FrameTooLargeError("cannot send %d bytes in one frame (max %d)"
                                         % (n, self.remote_settings.max_frame_size))
            s = self.streams[stream_id]
            raise FlowControlError("cannot send %d bytes, flow control window is %d"
                                   % (n, min(s.out_window, self.out_window)))

    def try_send_data(self, stream_id: int, data, end_stream: bool) -> bool:
        """``send_data`` when one frame within the flow-control windows can carry ``data`` now;
        otherwise False and nothing sent (the caller buffers it). Not in ``h2``'s API."""
        s = self.streams.get(stream_id)
        if s is None or not s.lopen:
            raise StreamClosedError(stream_id)
        n = len(data)
        w = s.out_window - n
        if w < 0 or n > self.out_window or n > self.remote_settings.max_frame_size:
            return False
        s.out_window = w
        self.out_window -= n
        self.data_sent += 1
        out = self.out
        if end_stream:
            out.append(_pack_hdr(n << 8, F_END_STREAM, stream_id))
            if n:
                out.append(data)
            s.lopen = False
            if not s.ropen:
                self._close(s, ENDED)
            return True
        out.append(_pack_hdr(n << 8, 0, stream_id))
        if n:
            out.append(data)
        return True

    def end_stream(self, stream_id: int) -> None:
        s = self.streams.get(stream_id)
        if s is None or not s.lopen:
            raise StreamClosedError(stream_id)
        self.out.append(_pack_hdr(0, F_END_STREAM, stream_id))
        self.data_sent += 1
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
            u = s.wu_due + acknowledged_size
            w = s.in_window
            m = s.in_max
            if u >= m >> 1 or (w == 0 and u > 1024):
                inc = u if w + u <= m else m - w
                s.wu_due = 0
                if inc > 0:
                    s.in_window = w + inc
                    self.out.append(_pack_hdr(4 << 8 | WINDOW_UPDATE, 0, stream_id) + _U32.pack(inc))
            else:
                s.wu_due = u

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
        del self.streams[sid]  # (and the object with it: nothing reads its lopen/ropen again)
        if (sid & 1) == self.peer_odd:
            self.n_in -= 1
        else:
            self.n_out -= 1
        closed = self.closed
        closed[sid] = how
        if len(closed) > CLOSED_MEMORY:
            # forget the older half (in C: no Python loop over a thousand entries)
            half = CLOSED_MEMORY // 2
            floor = max(islice(closed, half))
            if floor > self.closed_floor:
                self.closed_floor = floor
            self.closed = dict(islice(closed.items(), half, None))
