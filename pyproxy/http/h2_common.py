"""What both HTTP/2 codecs (server: ``http2``, client: ``h2_client``) share: Envoy's
``Http2ProtocolOptions`` compiled once, the ``http2.*`` counters, the events of either protocol
engine mapped to small ints, and the engine factory (``new_h2``: the lean ``h2engine`` by
default, the ``h2`` library with ``PYPROXY_H2_ENGINE=h2``), both with our HPACK.
"""

from __future__ import annotations

import os

import h2.config
import h2.connection
import h2.events
import h2.stream
from h2.settings import SettingCodes, Settings

from ..config import ConfigError, duration_s, u32
from . import h2engine_events
from .h2_hpack import FastDecoder, FastEncoder
from .h2engine import H2Engine
from .h2engine_frames import WU_BASE, WU_NO_BOUND, WindowUpdateFlood

# Envoy 1.40's defaults (what it advertises with an empty http2_protocol_options)
DEFAULT_MAX_CONCURRENT_STREAMS = 1024
DEFAULT_STREAM_WINDOW = 16 * 1024 * 1024
DEFAULT_CONNECTION_WINDOW = 24 * 1024 * 1024
DEFAULT_MAX_OUTBOUND_CONTROL_FRAMES = 1000
DEFAULT_MAX_PRIORITY_PER_STREAM = 100
DEFAULT_MAX_EMPTY_FRAMES = 1
DEFAULT_MAX_WINDOW_UPDATES_PER_DATA_FRAME = 10
# CVE-2023-44487: a connection whose streams are mostly reset by the client within this many
# seconds of their start is closed once it has opened PREMATURE_RESET_STREAMS streams.
PREMATURE_RESET_SECONDS = 1.0
PREMATURE_RESET_STREAMS = 500
SPEC_WINDOW = 65535
MAX_WINDOW = 2 ** 31 - 1


# Events of either engine (``h2.events`` or ``h2engine_events``) mapped to one small int each
# (defined in ``h2engine_events``; the lean engine's hot events are tuples led by them)
from .h2engine_events import (EV_DATA, EV_ENDED, EV_GOAWAY, EV_INFO, EV_PING, EV_PING_ACK,  # noqa: E402,F401
                              EV_PRIORITY, EV_REQUEST, EV_RESET, EV_RESPONSE, EV_SETTINGS, EV_SETTINGS_ACK,
                              EV_TRAILERS, EV_WINDOW)
EVENT_KIND = {}
for _mod in (h2.events, h2engine_events):
    for _name, _k in (("RequestReceived", EV_REQUEST), ("ResponseReceived", EV_RESPONSE), ("DataReceived", EV_DATA),
                      ("TrailersReceived", EV_TRAILERS), ("StreamEnded", EV_ENDED), ("StreamReset", EV_RESET),
                      ("WindowUpdated", EV_WINDOW), ("RemoteSettingsChanged", EV_SETTINGS),
                      ("PingReceived", EV_PING), ("PingAckReceived", EV_PING_ACK),
                      ("ConnectionTerminated", EV_GOAWAY), ("PriorityUpdated", EV_PRIORITY),
                      ("SettingsAcknowledged", EV_SETTINGS_ACK), ("InformationalResponseReceived", EV_INFO)):
        EVENT_KIND[getattr(_mod, _name)] = _k


class H2Options:
    """``config.core.v3.Http2ProtocolOptions`` compiled once (validated like Envoy does)."""

    __slots__ = ("max_concurrent_streams", "stream_window", "connection_window", "keepalive_interval",
                 "keepalive_timeout", "max_outbound_control_frames", "max_priority_per_stream",
                 "max_empty_frames", "max_header_list_size", "max_headers", "stats", "premature_counter",
                 "allow_connect", "max_wu_per_data_frame")

    def __init__(self, proto=None, max_header_list_size: int = 60 * 1024, max_headers: int = 100):
        self.max_concurrent_streams = DEFAULT_MAX_CONCURRENT_STREAMS
        self.stream_window = DEFAULT_STREAM_WINDOW
        self.connection_window = DEFAULT_CONNECTION_WINDOW
        self.keepalive_interval = 0.0
        self.keepalive_timeout = 0.0
        self.max_outbound_control_frames = DEFAULT_MAX_OUTBOUND_CONTROL_FRAMES
        self.max_priority_per_stream = DEFAULT_MAX_PRIORITY_PER_STREAM
        self.max_empty_frames = DEFAULT_MAX_EMPTY_FRAMES
        # Envoy's bound on inbound WINDOW_UPDATE frames: more than
        # 5 + 2 * (streams opened + this * DATA frames sent) close the connection
        self.max_wu_per_data_frame = DEFAULT_MAX_WINDOW_UPDATES_PER_DATA_FRAME
        self.max_header_list_size = max_header_list_size
        self.max_headers = max_headers
        self.stats = None
        self.premature_counter = None
        self.allow_connect = False  # RFC 8441 extended CONNECT (SETTINGS_ENABLE_CONNECT_PROTOCOL)
        if proto is None:
            return
        mcs = u32(proto, "max_concurrent_streams", DEFAULT_MAX_CONCURRENT_STREAMS)
        if not 1 <= mcs <= MAX_WINDOW:
            raise ConfigError("max_concurrent_streams must be in [1, 2147483647]", field="max_concurrent_streams")
        self.max_concurrent_streams = mcs
        for attr, field, default in (("stream_window", "initial_stream_window_size", DEFAULT_STREAM_WINDOW),
                                     ("connection_window", "initial_connection_window_size",
                                      DEFAULT_CONNECTION_WINDOW)):
            v = u32(proto, field, default)
            if not SPEC_WINDOW <= v <= MAX_WINDOW:
                raise ConfigError("%s must be in [65535, 2147483647]" % field, field=field)
            setattr(self, attr, v)
        self.max_outbound_control_frames = u32(proto, "max_outbound_control_frames",
                                               DEFAULT_MAX_OUTBOUND_CONTROL_FRAMES) or 1
        self.max_priority_per_stream = u32(proto, "max_inbound_priority_frames_per_stream",
                                           DEFAULT_MAX_PRIORITY_PER_STREAM)
        self.max_empty_frames = u32(proto, "max_consecutive_inbound_frames_with_empty_payload",
                                    DEFAULT_MAX_EMPTY_FRAMES)
        wu = u32(proto, "max_inbound_window_update_frames_per_data_frame_sent",
                 DEFAULT_MAX_WINDOW_UPDATES_PER_DATA_FRAME)
        if wu < 1:
            raise ConfigError("max_inbound_window_update_frames_per_data_frame_sent must be >= 1",
                              field="max_inbound_window_update_frames_per_data_frame_sent")
        self.max_wu_per_data_frame = wu
        if proto.HasField("connection_keepalive"):
            ka = proto.connection_keepalive
            self.keepalive_interval = duration_s(ka, "interval", 0.0)
            self.keepalive_timeout = duration_s(ka, "timeout", 0.0)
            if self.keepalive_interval and not self.keepalive_timeout:
                raise ConfigError("connection_keepalive.timeout is required", field="connection_keepalive.timeout")
        self.allow_connect = bool(proto.allow_connect)


class H2Stats:
    """Envoy's ``http2.*`` codec counters (shared scope, as Envoy's are per codec type)."""

    __slots__ = ("rx_reset", "tx_reset", "header_overflow", "goaway_sent", "outbound_control_flood",
                 "inbound_priority_frames_flood", "inbound_empty_frames_flood", "inbound_window_update_frames_flood",
                 "rx_messaging_error",
                 "keepalive_timeout", "streams_refused", "trailers", "header_list_size_too_large")

    def __init__(self, store):
        s = store.scope("http2.")
        for name in self.__slots__:
            setattr(self, name, s.counter(name))



class _H2Connection(h2.connection.H2Connection):
    """``H2Connection`` whose stream counts are not recomputed on every new stream.

    ``h2`` walks every stream it knows (and forgets closed ones) each time a stream opens, to
    enforce SETTINGS_MAX_CONCURRENT_STREAMS. We enforce both limits ourselves (REFUSED_STREAM
    downstream, pool capacity upstream), so the walk only runs every 64th stream, to prune."""

    _prune = 0
    # the WINDOW_UPDATE flood bound, as ``H2Engine``'s: DATA frames sent, WINDOW_UPDATE frames
    # received, the count past which ``wu_over(n)`` (the server codec's) is asked
    data_sent = 0
    wu_in = 0
    wu_cap = WU_NO_BOUND
    wu_over = None

    def _receive_window_update_frame(self, frame):
        k = self.wu_in = self.wu_in + 1
        if k > self.wu_cap:
            self.wu_cap = self.wu_over(k)  # (raises WindowUpdateFlood past the bound)
        return super()._receive_window_update_frame(frame)

    goaway_received = False  # (as H2Engine's: set as the frame is parsed)

    def _receive_goaway_frame(self, frame):
        self.goaway_received = True
        return super()._receive_goaway_frame(frame)

    def send_data(self, stream_id, data, end_stream=False, pad_length=None):
        self.data_sent += 1
        super().send_data(stream_id, data, end_stream=end_stream, pad_length=pad_length)

    def end_stream(self, stream_id):
        self.data_sent += 1  # (an empty DATA frame with END_STREAM)
        super().end_stream(stream_id)

    @property
    def open_outbound_streams(self) -> int:
        self._prune += 1
        if self._prune & 63 == 0:
            self._open_streams(self.config.client_side)
        return 0

    @property
    def open_inbound_streams(self) -> int:
        self._prune += 1
        if self._prune & 63 == 0:
            self._open_streams(not self.config.client_side)
        return 0


def bound_window_updates(codec) -> None:
    """Bound the WINDOW_UPDATE frames the server codec ``codec`` receives, as Envoy does: at most
    5 + 2 * (streams opened + ``max_inbound_window_update_frames_per_data_frame_sent`` * DATA
    frames sent); past it ``http2.inbound_window_update_frames_flood`` and GOAWAY
    ENHANCE_YOUR_CALM (the engine raises WindowUpdateFlood). Either engine counts the frames and
    asks only when its last bound is passed (the bound only grows)."""
    h = codec.h2
    per_data = codec.opts.max_wu_per_data_frame

    def over(n: int) -> int:
        cap = WU_BASE + 2 * (codec.total_streams + per_data * h.data_sent)
        if n > cap:
            st = codec.stats
            if st is not None:
                st.inbound_window_update_frames_flood.value += 1
                st.goaway_sent.value += 1
            raise WindowUpdateFlood("more than %d WINDOW_UPDATE frames" % cap)
        return cap
    h.wu_over = over
    h.wu_cap = WU_BASE


# Which protocol engine carries HTTP/2: "lean" (``h2engine``, the default) or "h2" (the ``h2``
# library, kept as the reference). Read per connection, so tests can switch it.
ENGINES = ("lean", "h2")


def engine_name() -> str:
    e = os.environ.get("PYPROXY_H2_ENGINE", "lean")
    return e if e in ENGINES else "lean"


def new_h2(client_side: bool, opts: H2Options, engine: str | None = None):
    """A protocol engine with our settings and the preface queued; our own stream limit is
    enforced by the caller (REFUSED_STREAM). Header validation and decoding are ours
    (``inbound_headers``), cached per distinct field."""
    values = {SettingCodes.MAX_CONCURRENT_STREAMS: opts.max_concurrent_streams,
              SettingCodes.INITIAL_WINDOW_SIZE: opts.stream_window,
              SettingCodes.MAX_HEADER_LIST_SIZE: opts.max_header_list_size,
              # said explicitly (the default): nginx then shrinks its encoder's table to zero
              # instead of inserting every response field into ours
              SettingCodes.HEADER_TABLE_SIZE: 4096}
    if opts.allow_connect and not client_side:
        values[SettingCodes.ENABLE_CONNECT_PROTOCOL] = 1
    if (engine or engine_name()) == "h2":
        return _new_h2_library(client_side, opts, values)
    c = H2Engine(client_side, values)
    # codec mode: ends are marked on the DATA/HEADERS events (no separate StreamEnded), and the hot
    # ones come as tuples (``h2engine_events``: kind, stream id, data or fields, length, end?)
    c.split_ends = False
    c.encoder = FastEncoder()
    c.decoder = FastDecoder(opts.max_header_list_size)
    c.initiate_connection()
    if opts.connection_window > SPEC_WINDOW:
        c.increment_flow_control_window(opts.connection_window - SPEC_WINDOW)
    return c


def _new_h2_library(client_side: bool, opts: H2Options, values: dict) -> h2.connection.H2Connection:
    """The ``h2`` library's ``H2Connection``, given a looser stream limit than announced (we
    answer REFUSED_STREAM per stream ourselves)."""
    config = h2.config.H2Configuration(client_side=client_side, header_encoding=None,
                                       validate_outbound_headers=False, normalize_outbound_headers=False,
                                       validate_inbound_headers=False, normalize_inbound_headers=False)
    c = _H2Connection(config)
    c.encoder = FastEncoder()
    c.decoder = FastDecoder(opts.max_header_list_size)
    if client_side:
        values[SettingCodes.ENABLE_PUSH] = 0
    c.local_settings = Settings(client=client_side, initial_values=values)
    c.initiate_connection()
    if not client_side:
        values[SettingCodes.MAX_CONCURRENT_STREAMS] = MAX_WINDOW
        c.local_settings = Settings(client=client_side, initial_values=values)
    if opts.connection_window > SPEC_WINDOW:
        c.increment_flow_control_window(opts.connection_window - SPEC_WINDOW)
    return c


def _utf8_encode_headers(headers):
    # h2.stream's own version does isinstance() per field; ours are (bytes, bytes) already
    return [kv if kv[0].__class__ is bytes and kv[1].__class__ is bytes else
            (kv[0].encode("utf-8") if kv[0].__class__ is str else kv[0],
             kv[1].encode("utf-8") if kv[1].__class__ is str else kv[1]) for kv in headers]


h2.stream.utf8_encode_headers = _utf8_encode_headers


def server_options(cfg) -> H2Options:
    """The compiled options for an HCM config (built on first use, then kept on the config)."""
    o = getattr(cfg, "h2_compiled_options", None)
    if o is None:
        o = H2Options(getattr(cfg, "http2_options", None), cfg.max_request_headers_kb * 1024,
                      cfg.max_headers_count)
        ctx = getattr(cfg, "ctx", None)
        store = getattr(ctx, "stats", None)
        if store is not None:
            o.stats = H2Stats(store)
            o.premature_counter = store.scope("http.%s." % cfg.stat_prefix).counter(
                "downstream_rq_too_many_premature_resets")
        try:
            cfg.h2_compiled_options = o
        except AttributeError:
            pass
    return o


# GOAWAY (type 7) on stream 0, last_stream_id 2^31-1, NO_ERROR: Envoy's shutdown notice
_SHUTDOWN_NOTICE = b"\x00\x00\x08\x07\x00\x00\x00\x00\x00\x7f\xff\xff\xff\x00\x00\x00\x00"


def shutdown_notice(codec) -> None:
    """The first step of Envoy's HTTP/2 drain sequence on a server codec: a GOAWAY with the
    highest stream id (2^31-1, NO_ERROR) that tells the client to move on while new streams are
    still served (raw bytes after what the engine has queued: its own GOAWAY would refuse new
    streams). The final ``codec.go_away()`` follows after the HCM's drain_timeout."""
    if not (codec.goaway_sent or codec.closed):
        codec.conn.write(codec.h2.data_to_send() + _SHUTDOWN_NOTICE)


def header_list_too_large(codec, sid: int) -> None:
    """An HTTP/2 request whose header list was over ``max_request_headers_kb``: the engine reset
    its stream (``H2Engine.oversized``) and the connection goes on; counted as Envoy's codec and
    connection manager count it (``http2.header_list_size_too_large``, ``tx_reset``; a request
    reset before its headers were complete)."""
    st = codec.stats
    if st is not None:
        st.header_list_size_too_large.value += 1
        st.tx_reset.value += 1
    codec.hc.streamless("HTTP/2", 0, "http2.header_list_size_too_large", False, 0, "DR")
