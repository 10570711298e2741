"""The lean HTTP/2 engine's wire vocabulary (RFC 9113): frame types and flags, the frame header
struct, limits, error-code helpers, one side's ``Settings`` and the per-stream record."""

from __future__ import annotations

import struct

from h2.errors import ErrorCodes
from h2.exceptions import FlowControlError, FrameTooLargeError, ProtocolError
from h2.settings import SettingCodes
from hpack.exceptions import HPACKError

from .h2engine_events import StreamEnded

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


class WindowUpdateFlood(ProtocolError):
    """More WINDOW_UPDATE frames than the server codec's bound (``Http2ServerCodec._wu_over``)."""

    error_code = ErrorCodes.ENHANCE_YOUR_CALM


# the WINDOW_UPDATE frames a connection may receive before it opened a stream or sent DATA
# (Envoy's constant in its bound); with no ``wu_over`` hook (client side), no bound
WU_BASE = 5
WU_NO_BOUND = 1 << 62


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


# The engine's state of one stream. The codecs' own stream classes declare these slots too, so
# that the engine keeps its state on their objects (``H2Engine.stream_cls``, ``send_request``'s
# ``s``): one object per stream and side instead of two. Where a stream is opened on the hot
# path, ``_Stream.__init__`` is written out inline (see ``h2engine.send_request`` and
# ``h2engine_recv._header_block``). Such an object serves one engine for its life: a stream
# never moves to another connection (a request beyond a GOAWAY is refused to its router).
STREAM_SLOTS = ("sid", "lopen", "ropen", "out_window", "in_window", "in_max", "wu_due", "got_headers")


class _Stream:
    __slots__ = STREAM_SLOTS

    def __init__(self, sid, out_window, in_window):
        self.sid = sid
        self.lopen = True  # we may still send (no END_STREAM / RST_STREAM sent)
        self.ropen = True  # the peer may still send
        self.out_window = out_window
        self.in_window = in_window
        self.in_max = in_window
        self.wu_due = 0  # bytes the application consumed, not yet credited back (WINDOW_UPDATE)
        self.got_headers = False  # the request (server) / final response (client) arrived

