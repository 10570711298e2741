"""HTTP/2 codec on the sans-IO ``h2`` library: downstream (server) side, plus pieces shared with the
upstream HTTP/2 pool (``cluster/pool_h2.py``).

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
that the client does not read), PRIORITY floods, empty-frame floods, streams beyond
``max_concurrent_streams`` (REFUSED_STREAM), protocol errors -> GOAWAY with ``h2``'s error code.
"""

from __future__ import annotations

import collections
import logging
import os
from email.utils import formatdate

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.stream
from hpack import NeverIndexedHeaderTuple
from hpack.exceptions import HPACKDecodingError, InvalidTableIndexError, InvalidTableSizeError, OversizedHeaderListError
from hpack.huffman_table import decode_huffman
from hpack.table import HeaderTable
from h2.errors import ErrorCodes
from h2.settings import SettingCodes, Settings

from .. import writebatch
from ..config import ConfigError, duration_s, u32
from . import h2engine_events
from .h2engine import H2Engine
from .headers import Headers

log = logging.getLogger("pyproxy.http2")

# Envoy 1.40's defaults (what it advertises with an empty http2_protocol_options)
DEFAULT_MAX_CONCURRENT_STREAMS = 1024
DEFAULT_STREAM_WINDOW = 16 * 1024 * 1024
DEFAULT_CONNECTION_WINDOW = 24 * 1024 * 1024
DEFAULT_MAX_OUTBOUND_CONTROL_FRAMES = 1000
DEFAULT_MAX_PRIORITY_PER_STREAM = 100
DEFAULT_MAX_EMPTY_FRAMES = 1
# CVE-2023-44487: a connection whose streams are mostly reset by the client within this many
# seconds of their start is closed once it has opened PREMATURE_RESET_STREAMS streams.
PREMATURE_RESET_SECONDS = 1.0
PREMATURE_RESET_STREAMS = 500
SPEC_WINDOW = 65535
MAX_WINDOW = 2 ** 31 - 1

# connection-specific header fields never sent on HTTP/2 (RFC 9113 8.2.2)
CONNECTION_HEADERS = frozenset(("connection", "keep-alive", "proxy-connection", "transfer-encoding",
                                "upgrade", "host"))

# Events of either engine (``h2.events`` or ``h2engine_events``) mapped to one small int each
(EV_REQUEST, EV_RESPONSE, EV_DATA, EV_TRAILERS, EV_ENDED, EV_RESET, EV_WINDOW, EV_SETTINGS, EV_PING, EV_PING_ACK,
 EV_GOAWAY, EV_PRIORITY, EV_SETTINGS_ACK, EV_INFO) = range(14)
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
                 "allow_connect")

    def __init__(self, proto=None, max_header_list_size: int = 60 * 1024, max_headers: int = 100):
        self.max_concurrent_streams = DEFAULT_MAX_CONCURRENT_STREAMS
        self.stream_window = DEFAULT_STREAM_WINDOW
        self.connection_window = DEFAULT_CONNECTION_WINDOW
        self.keepalive_interval = 0.0
        self.keepalive_timeout = 0.0
        self.max_outbound_control_frames = DEFAULT_MAX_OUTBOUND_CONTROL_FRAMES
        self.max_priority_per_stream = DEFAULT_MAX_PRIORITY_PER_STREAM
        self.max_empty_frames = DEFAULT_MAX_EMPTY_FRAMES
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
                 "inbound_priority_frames_flood", "inbound_empty_frames_flood", "rx_messaging_error",
                 "keepalive_timeout", "streams_refused", "trailers")

    def __init__(self, store):
        s = store.scope("http2.")
        for name in self.__slots__:
            setattr(self, name, s.counter(name))


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


# -- HPACK, the costly part of h2: a stateless encoder and a memoizing decoder ---------------

_STATIC = HeaderTable.STATIC_TABLE
_STATIC_FULL = {}
_STATIC_NAME = {}
for _i, (_n, _v) in enumerate(_STATIC, 1):
    _STATIC_FULL.setdefault((_n, _v), _i)
    _STATIC_NAME.setdefault(_n, _i)


def _hp_int(n: int, prefix_bits: int, first: int) -> bytes:
    mx = (1 << prefix_bits) - 1
    if n < mx:
        return bytes((first | n,))
    out = bytearray((first | mx,))
    n -= mx
    while n >= 128:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _hp_str(b: bytes) -> bytes:
    return _hp_int(len(b), 7, 0) + b


# fields whose value is new with every request (request and trace ids)
_UNIQUE_FIELDS = frozenset(n2 for n in ("x-request-id", "x-client-trace-id", "traceparent", "tracestate",
                                        "x-b3-traceid", "x-b3-spanid", "x-b3-parentspanid", "x-ot-span-context",
                                        "x-datadog-trace-id", "x-datadog-parent-id", "x-amzn-trace-id")
                           for n2 in (n, n.encode()))


class ByteMemo:
    """A memo dict bounded in bytes, not entries: every entry is charged an estimate of what it
    holds (its key and value bytes plus object overhead); an entry over ``item_limit`` is not kept,
    and the dict is emptied when the total would pass ``limit``. Lookups use ``.d`` directly."""

    __slots__ = ("d", "used", "limit", "item_limit")

    def __init__(self, limit: int, item_limit: int):
        self.d: dict = {}
        self.used = 0
        self.limit = limit
        self.item_limit = item_limit

    def put(self, key, value, cost: int) -> None:
        if cost > self.item_limit:
            return
        used = self.used + cost
        if used > self.limit:
            self.d.clear()
            used = cost
        self.d[key] = value
        self.used = used


# Process-wide memos (they hold only what traffic sent, so each is bounded in bytes): encoded
# fields (no dynamic table, so the same for every connection), Huffman strings, field
# translations and whole request/response blocks.
_ENC = ByteMemo(2 << 20, 2048)
_HUFF = ByteMemo(1 << 20, 1024)
_FIELD_OVERHEAD = 250  # two tuples, two str/bytes objects and a dict slot, roughly


class FastEncoder:
    """HPACK without the dynamic table: static-table hits are indexed, everything else is a
    literal without indexing (no Huffman). Valid for any decoder, much cheaper to produce than
    ``hpack.Encoder``'s output; each distinct field's encoding is memoized (process-wide, bounded in bytes)."""

    __slots__ = ("memo", "pending_size_update", "_size")

    def __init__(self):
        self.memo = _ENC.d
        self.pending_size_update = None
        self._size = 4096

    @property
    def header_table_size(self) -> int:
        return self._size

    @header_table_size.setter
    def header_table_size(self, value: int) -> None:
        # we never insert into the dynamic table; a peer shrinking it still gets the update it
        # expects at the start of the next block
        self._size = value
        self.pending_size_update = min(value, 4096)

    def encode(self, headers, huffman: bool = True) -> bytes:
        memo = self.memo
        out = []
        if self.pending_size_update is not None:
            out.append(_hp_int(self.pending_size_update, 5, 0x20))
            self.pending_size_update = None
        for kv in headers:
            b = memo.get(kv)
            if b is None:
                b = self._encode_one(kv)
                if kv[0] not in _UNIQUE_FIELDS:  # ids never repeat: they would only flush the memo
                    _ENC.put(kv, b, 2 * len(b) + _FIELD_OVERHEAD)
            out.append(b)
        return b"".join(out)

    @staticmethod
    def _encode_one(kv) -> bytes:
        """One field; ``Headers``' own (str, str) pairs are taken as ``to_h2`` would send them
        (connection-specific fields dropped, values byte for byte), so the lean engine is
        handed ``Headers._h`` directly."""
        n, v = kv[0], kv[1]
        if n.__class__ is str:
            if n in CONNECTION_HEADERS or (n == "te" and v.lower() != "trailers"):
                return b""
            n = n.encode("latin-1")
        if v.__class__ is str:
            try:
                v = v.encode("latin-1")
            except UnicodeEncodeError:
                v = v.encode("utf-8")
        i = _STATIC_FULL.get((n, v))
        if i is not None:
            return bytes((0x80 | i,))
        sensitive = isinstance(kv, NeverIndexedHeaderTuple)
        i = _STATIC_NAME.get(n)
        first = 0x10 if sensitive else 0x00
        if i is not None:
            return _hp_int(i, 4, first) + _hp_str(v)
        return bytes((first,)) + _hp_str(n) + _hp_str(v)


class FastDecoder:
    """HPACK decoder (RFC 7541) for both engines (``decode(block, raw=True)`` like ``hpack``'s).

    A header block's bytes are parsed once into operations (indexed field, literal with or
    without indexing, table size update) kept in a bounded memo: parsing does not depend on the
    dynamic table, so a peer repeating a block (fully indexed requests, or nginx's responses that
    insert the same fields each time) costs one table lookup per field, however its dynamic table
    moves. Huffman strings are decoded once (memoized). The fields come back as a tuple (a
    repeated block as the same tuple), which the codecs' own memos key on. Errors are ``hpack``'s exceptions:
    ``HPACKDecodingError``/``InvalidTableIndexError``/``InvalidTableSizeError`` (COMPRESSION_ERROR)
    and ``OversizedHeaderListError`` (over ``max_header_list_size``, RFC 9113 field sizes)."""

    __slots__ = ("dyn", "dyn_size", "max_table", "max_allowed_table_size", "max_header_list_size", "memo",
                 "version", "memo_used", "memo_limit")

    OP_COST = 128  # bytes one parsed operation and its decoded field hold in the memo, roughly

    def __init__(self, max_header_list_size: int):
        self.dyn = collections.deque()  # newest first: (name, value)
        self.dyn_size = 0
        self.max_table = 4096  # the size the peer's encoder uses (its last size update)
        self.max_allowed_table_size = 4096  # our SETTINGS_HEADER_TABLE_SIZE
        self.max_header_list_size = max_header_list_size
        self.memo = {}  # block -> [ops, changes the table?, table version of result, result]
        self.version = 0  # bumped whenever the dynamic table changes
        # the memo is bounded in bytes by the header-list limit (16 KiB..256 KiB per connection),
        # and a block whose ops would take more than a quarter of it is not kept
        self.memo_limit = min(max(max_header_list_size, 16384), 262144)
        self.memo_used = 0

    @property
    def header_table_size(self) -> int:
        return self.max_table

    def decode(self, data, raw: bool = True) -> tuple:
        if data.__class__ is not bytes:
            data = bytes(data)
        m = self.memo.get(data)
        if m is None:
            ops = _hpack_parse(data)
            # [ops, changes the table?, table version of result, result, independent of the table?,
            #  list size]: a block that references no dynamic-table entry (nginx's responses: static
            # names, literal values, each inserted) has the same fields whatever the table holds
            m = [ops, any(op[0] == 2 or (op[0] == 1 and op[4]) for op in ops), -1, None,
                 all(op[0] == 2 or op[1] <= 61 for op in ops), 0]
            cost = len(data) + self.OP_COST * len(ops) + 200
            if cost <= self.memo_limit >> 2:
                used = self.memo_used + cost
                if used > self.memo_limit:
                    self.memo.clear()
                    used = cost
                self.memo[data] = m
                self.memo_used = used
        elif m[2] == self.version:
            return m[3]  # same block, same table: same fields (already size-checked)
        elif m[4] and m[3] is not None:
            # same fields; only the table effects (inserts, size updates) are applied again
            self._replay(m[0])
            if m[5] > self.max_header_list_size:
                raise OversizedHeaderListError("header list of %d bytes over %d" % (m[5], self.max_header_list_size))
            return m[3]
        else:
            ops = m[0]
        dyn = self.dyn
        static = _STATIC
        out = []
        total = 0
        for op in ops:
            k = op[0]
            if k == 0:
                i = op[1]
                if i <= 61:
                    kv = static[i - 1]
                else:
                    try:
                        kv = dyn[i - 62]
                    except IndexError:
                        raise InvalidTableIndexError("invalid table index %d" % i) from None
            elif k == 1:
                i = op[1]
                if i == 0:
                    name = op[2]
                elif i <= 61:
                    name = static[i - 1][0]
                else:
                    try:
                        name = dyn[i - 62][0]
                    except IndexError:
                        raise InvalidTableIndexError("invalid table index %d" % i) from None
                kv = (name, op[3])
                if op[4]:
                    self._add(kv)
            else:
                self._resize(op[1])
                continue
            total += len(kv[0]) + len(kv[1]) + 32
            out.append(kv)
        if total > self.max_header_list_size:
            raise OversizedHeaderListError("header list of %d bytes over %d" % (total, self.max_header_list_size))
        out = tuple(out)
        if not m[1]:
            m[2] = self.version
            m[3] = out
        elif m[4]:
            m[3] = out
            m[5] = total
        return out

    def _replay(self, ops) -> None:
        """A table-independent block's effects on the dynamic table (its fields are known)."""
        for op in ops:
            k = op[0]
            if k == 1:
                if op[4]:
                    i = op[1]
                    self._add((op[2] if i == 0 else _STATIC[i - 1][0], op[3]))
            elif k == 2:
                self._resize(op[1])

    def _resize(self, size: int) -> None:
        """A dynamic table size update (bounded by what we announced)."""
        if size > self.max_allowed_table_size:
            raise InvalidTableSizeError("table size update %d over %d" % (size, self.max_allowed_table_size))
        self.max_table = size
        self.version += 1
        self._evict()

    def _add(self, kv) -> None:
        n = len(kv[0]) + len(kv[1]) + 32
        self.version += 1
        if n > self.max_table:
            self.dyn.clear()  # RFC 7541 4.4: an entry larger than the table empties it
            self.dyn_size = 0
            return
        self.dyn.appendleft(kv)
        self.dyn_size += n
        if self.dyn_size > self.max_table:
            self._evict()

    def _evict(self) -> None:
        dyn = self.dyn
        mx = self.max_table
        while self.dyn_size > mx and dyn:
            kv = dyn.pop()
            self.dyn_size -= len(kv[0]) + len(kv[1]) + 32


_HUFFMAN_MEMO = _HUFF.d


def _hp_read_int(data: bytes, pos: int, bits: int):
    mask = (1 << bits) - 1
    v = data[pos] & mask
    pos += 1
    if v < mask:
        return v, pos
    shift = 0
    n = len(data)
    while True:
        if pos >= n:
            raise HPACKDecodingError("truncated integer")
        b = data[pos]
        pos += 1
        v += (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return v, pos
        if shift > 28:
            raise HPACKDecodingError("integer too large")


def _hp_read_str(data: bytes, pos: int):
    if pos >= len(data):
        raise HPACKDecodingError("truncated string")
    huff = data[pos] & 0x80
    n, pos = _hp_read_int(data, pos, 7)
    e = pos + n
    if e > len(data):
        raise HPACKDecodingError("truncated string")
    raw = data[pos:e]
    if huff:
        s = _HUFFMAN_MEMO.get(raw)
        if s is None:
            s = decode_huffman(raw)
            _HUFF.put(raw, s, len(raw) + len(s) + 120)
        return s, e
    return raw, e


def _hpack_parse(data: bytes) -> tuple:
    """A header block -> operations: (0, index) | (1, name index or 0, name, value, indexing) |
    (2, table size)."""
    ops = []
    pos = 0
    n = len(data)
    fields = False
    while pos < n:
        b = data[pos]
        if b & 0x80:
            i, pos = _hp_read_int(data, pos, 7)
            if i == 0:
                raise HPACKDecodingError("index 0")
            ops.append((0, i))
            fields = True
            continue
        if b & 0x40:
            i, pos = _hp_read_int(data, pos, 6)
            indexing = True
        elif b & 0x20:
            if fields:
                raise HPACKDecodingError("table size update after a header field")
            size, pos = _hp_read_int(data, pos, 5)
            ops.append((2, size))
            continue
        else:
            i, pos = _hp_read_int(data, pos, 4)
            indexing = False
        if i == 0:
            name, pos = _hp_read_str(data, pos)
        else:
            name = None
        value, pos = _hp_read_str(data, pos)
        ops.append((1, i, name, value, indexing))
        fields = True
    return tuple(ops)


class _H2Connection(h2.connection.H2Connection):
    """``H2Connection`` whose stream counts are not recomputed on every new stream.

    ``h2`` walks every stream it knows (and forgets closed ones) each time a stream opens, to
    enforce SETTINGS_MAX_CONCURRENT_STREAMS. We enforce both limits ourselves (REFUSED_STREAM
    downstream, pool capacity upstream), so the walk only runs every 64th stream, to prune."""

    _prune = 0

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
    c.split_ends = False  # our handlers read ``stream_ended`` on the DATA/HEADERS events
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

# -- header translation --------------------------------------------------------------------------

_OUT = ByteMemo(4 << 20, 8192)
_IN = ByteMemo(4 << 20, 8192)
_OUT_MEMO = _OUT.d
_IN_MEMO = _IN.d
REQUEST, RESPONSE, TRAILERS = 0, 1, 2
_REQUEST_PSEUDO = frozenset((":method", ":scheme", ":authority", ":path", ":protocol"))
_TOKEN_CHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz"  # RFC 9110 tchar, lower case


def _is_token(s: str) -> bool:
    """A non-empty lower-case token (no regex engine sees header names)."""
    return bool(s) and not s.strip(_TOKEN_CHARS)


class BadHeaders(Exception):
    """A malformed header block (RFC 9113 8.2/8.3): the stream is reset with PROTOCOL_ERROR."""


def _out(kv):
    k, v = kv
    r = (k.encode("latin-1"), v.encode("latin-1"))
    _OUT.put(kv, r, 2 * (len(k) + len(v)) + _FIELD_OVERHEAD)
    return r


def to_h2(headers: Headers) -> list:
    """``Headers`` -> ``h2`` (bytes) header tuples: connection-specific fields dropped, ``te``
    only as ``trailers``, values kept byte-for-byte."""
    memo = _OUT_MEMO
    out = []
    for kv in headers._h:
        b = memo.get(kv)
        if b is None:
            k = kv[0]
            if k in CONNECTION_HEADERS or (k == "te" and kv[1].lower() != "trailers"):
                continue
            b = _out(kv)
        out.append(b)
    return out


def trailers_to_h2(trailers: Headers) -> list:
    return [_OUT_MEMO.get(kv) or _out(kv) for kv in trailers._h
            if kv[0][0] != ":" and kv[0] not in CONNECTION_HEADERS]


def _in(kv):
    """One received field, validated and decoded (memoized)."""
    n, v = kv
    try:
        name = n.decode("ascii")
    except UnicodeDecodeError:
        raise BadHeaders("invalid header name") from None
    if not name:
        raise BadHeaders("empty header name")
    if name[0] == ":":
        if not _is_token(name[1:]):
            raise BadHeaders("invalid pseudo-header %r" % name)
    elif not _is_token(name):
        raise BadHeaders("invalid header name %r" % name)
    if b"\x00" in v or b"\r" in v or b"\n" in v:
        raise BadHeaders("invalid header value for %s" % name)
    if v[:1] in (b" ", b"\t") or v[-1:] in (b" ", b"\t"):
        raise BadHeaders("surrounding whitespace in %s" % name)
    if name in CONNECTION_HEADERS and name != "host":
        raise BadHeaders("connection-specific header %s" % name)
    value = v.decode("latin-1")
    if name == "te" and value != "trailers":
        raise BadHeaders("te other than trailers")
    r = (name, value)
    _IN.put(kv, r, 2 * (len(n) + len(v)) + _FIELD_OVERHEAD)
    return r


def inbound_headers(raw, kind: int) -> list:
    """A received header block as ``Headers`` pairs, checked as h2's validation would (names
    lower-case tokens, no CR/LF/NUL, pseudo-headers first, once, and the required ones present;
    no connection-specific fields); cookies joined (RFC 9113 8.2.3). Raises ``BadHeaders``."""
    memo = _IN_MEMO
    out = []
    regular = False
    pseudo = None
    cookies = None
    for kv in raw:
        r = memo.get(kv)
        if r is None:
            r = _in(kv)
        name = r[0]
        if name[0] == ":":
            if regular:
                raise BadHeaders("pseudo-header after regular header")
            if pseudo is None:
                pseudo = set()
            if name in pseudo:
                raise BadHeaders("duplicate %s" % name)
            pseudo.add(name)
        else:
            regular = True
            if name == "cookie" and kind == REQUEST:
                if cookies is None:
                    cookies = [len(out), r[1]]
                    out.append(r)
                else:
                    cookies.append(r[1])
                continue
        out.append(r)
    if cookies is not None and len(cookies) > 2:
        out[cookies[0]] = ("cookie", "; ".join(cookies[1:]))
    if kind == REQUEST:
        if pseudo is None or not pseudo <= _REQUEST_PSEUDO or ":method" not in pseudo:
            raise BadHeaders("missing or unknown request pseudo-headers")
        method = path = None
        for k, v in out:
            if k == ":method":
                method = v
            elif k == ":path":
                path = v
            elif k[0] != ":":
                break
        if method == "CONNECT" and ":protocol" not in pseudo:
            if ":authority" not in pseudo or ":path" in pseudo or ":scheme" in pseudo:
                raise BadHeaders("malformed CONNECT")
        elif ":scheme" not in pseudo or not path:
            raise BadHeaders("missing :scheme or :path")
    elif kind == RESPONSE:
        if pseudo != _STATUS_ONLY:
            raise BadHeaders("response needs exactly :status")
    elif pseudo is not None:
        raise BadHeaders("pseudo-header in trailers")
    return out


_STATUS_ONLY = {":status"}
_REQ = ByteMemo(4 << 20, 16384)
_RESP = ByteMemo(4 << 20, 16384)
_REQ_MEMO = _REQ.d
_RESP_MEMO = _RESP.d


def request_fields(raw) -> tuple:
    """A received request header block -> (fields tuple for ``Headers``, expect 100-continue?,
    :protocol or None, CONNECT?): validated (``inbound_headers``), ``host`` folded into
    ``:authority``, ``expect: 100-continue`` and ``:protocol`` taken out. Memoized per distinct
    block (the decoder hands repeated blocks over as equal tuples). Raises ``BadHeaders``."""
    key = raw if raw.__class__ is tuple else tuple(raw)
    r = _REQ_MEMO.get(key)
    if r is not None:
        return r
    authority = None
    host = None
    expect = False
    protocol = None
    h = []
    for kv in inbound_headers(key, REQUEST):
        k = kv[0]
        if k == ":authority":
            authority = kv[1]
        elif k == ":protocol":
            protocol = kv[1]
            continue
        elif k == "host":
            host = kv[1]
            continue
        elif k == "expect":
            if kv[1].lower() == "100-continue":
                expect = True
                continue
        h.append(kv)
    if authority is None and host is not None:
        i = 0
        while i < len(h) and h[i][0][0] == ":":
            i += 1
        h.insert(i, (":authority", host))
    r = (tuple(h), expect, protocol, protocol is not None or fields_method(h) == "CONNECT")
    _REQ.put(key, r, _block_cost(key))
    return r


def _block_cost(fields) -> int:
    """What a memoized block holds: its fields (key and translated result) and the tuples."""
    n = 300
    for kv in fields:
        n += 2 * (len(kv[0]) + len(kv[1])) + 180
    return n


def response_fields(raw) -> list:
    """``inbound_headers(raw, RESPONSE)`` memoized per distinct block (a fresh list each time)."""
    key = raw if raw.__class__ is tuple else tuple(raw)
    r = _RESP_MEMO.get(key)
    if r is None:
        r = tuple(inbound_headers(key, RESPONSE))
        _RESP.put(key, r, _block_cost(key))
    return list(r)


def fields_method(fields) -> str | None:
    for k, v in fields:
        if k == ":method":
            return v
    return None


class _NoPending(tuple):
    """The shared empty outbound buffer of streams that never had to wait (most of them)."""

    __slots__ = ()

    def clear(self) -> None:
        pass


_NO_PENDING = _NoPending()


class OutStream:
    """Outbound DATA of one stream: what the peer's window (or our transport) cannot take yet.

    Subclasses provide ``conn`` (with ``h2``, ``write_paused``, ``blocked``), ``sid`` and
    ``_ended()``/``_watermark(above)``.
    """

    __slots__ = ()

    def _init_out(self) -> None:
        """Empty outbound buffer and flow-control state (at creation, and when re-bound)."""
        self.pending = _NO_PENDING  # a deque once something has to wait
        self.pending_bytes = 0
        self.pending_end = False
        self.pending_trailers = None
        self.above = False
        self.read_off = 0
        self.unacked = 0

    def _send_data(self, data, end: bool) -> None:
        conn = self.conn
        h = conn.h2
        n = len(data)
        if not self.pending and not conn.write_paused and n <= conn.max_frame:
            if n <= h.local_flow_control_window(self.sid):
                h.send_data(self.sid, data, end_stream=end)
                if end:
                    self._ended()
                return
        if n:
            p = self.pending
            if p is _NO_PENDING:
                p = self.pending = collections.deque()
            p.append(data)
            self.pending_bytes += n
        if end:
            self.pending_end = True
        self.flush_pending()
        if not self.above and self.pending_bytes > conn.stream_high:
            self.above = True
            self._watermark(True)

    def _send_trailers(self, trailers: Headers) -> None:
        if self.pending:
            self.pending_trailers = trailers
            self.flush_pending()
            return
        self.conn.h2.send_headers(self.sid, trailers_to_h2(trailers), end_stream=True)
        self._ended()

    def flush_pending(self) -> None:
        """Send what the window allows; finish the stream once the buffer is empty."""
        conn = self.conn
        h = conn.h2
        sid = self.sid
        pending = self.pending
        try:
            while pending and not conn.write_paused:
                w = h.local_flow_control_window(sid)
                if w <= 0:
                    break
                if w > conn.max_frame:
                    w = conn.max_frame
                chunk = pending[0]
                if len(chunk) <= w:
                    pending.popleft()
                    h.send_data(sid, chunk)
                    self.pending_bytes -= len(chunk)
                else:
                    h.send_data(sid, chunk[:w])
                    pending[0] = chunk[w:]
                    self.pending_bytes -= w
        except h2.exceptions.StreamClosedError:
            pending.clear()
            self.pending_bytes = 0
            conn.blocked.discard(self)
            return
        if pending:
            conn.blocked.add(self)
        else:
            conn.blocked.discard(self)
            if self.pending_trailers is not None:
                t, self.pending_trailers = self.pending_trailers, None
                h.send_headers(sid, trailers_to_h2(t), end_stream=True)
                self._ended()
            elif self.pending_end:
                self.pending_end = False
                h.end_stream(sid)
                self._ended()
        if self.above and self.pending_bytes <= conn.stream_high // 2:
            self.above = False
            self._watermark(False)
        conn.want_flush()


def flush_blocked(conn) -> None:
    for s in list(conn.blocked):
        if conn.write_paused:
            return
        s.flush_pending()


# -- downstream ---------------------------------------------------------------------------------


class H2ServerStream(OutStream):
    """One request stream: the encoder ``ActiveStream`` writes its response through."""

    __slots__ = ("conn", "sid", "stream", "remote_ended", "local_ended", "closed", "pending",
                 "pending_bytes", "pending_end", "pending_trailers", "above", "read_off", "unacked",
                 "start", "drain_close", "response_close", "tunnel")

    def __init__(self, conn, sid, now):
        self.conn = conn
        self.sid = sid
        self.stream = None
        self.remote_ended = False
        self.local_ended = False
        self.closed = False
        self._init_out()
        self.start = now
        self.drain_close = False
        self.response_close = False
        self.tunnel = 0  # 1: CONNECT / extended CONNECT asked; 2: answered 2xx, END_STREAM is a half-close

    # -- encoder API (ActiveStream -> codec) ---------------------------------------------------------
    def encode_headers(self, headers: Headers, end_stream: bool) -> None:
        if self.closed or self.local_ended:
            return
        h = headers._h
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
            conn.h2.send_headers(self.sid, h if conn.lean else to_h2(headers), end_stream=end_stream)
        except h2.exceptions.StreamClosedError:
            self._gone()
            return
        except h2.exceptions.ProtocolError as e:
            log.debug("h2 stream %d: cannot send headers: %s", self.sid, e)
            self.reset_stream("protocol_error")
            return
        if end_stream:
            self._ended()
        conn.want_flush()

    def encode_data(self, data: bytes, end_stream: bool) -> None:
        if self.closed or self.local_ended:
            return
        try:
            self._send_data(data, end_stream)
        except h2.exceptions.ProtocolError:
            self._gone()
            return
        self.conn.want_flush()

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
            ErrorCodes.CONNECT_ERROR if self.tunnel else ErrorCodes.NO_ERROR)  # RFC 9113 8.5
        try:
            conn.h2.reset_stream(self.sid, code)
        except h2.exceptions.ProtocolError:
            pass
        self._gone()
        conn.want_flush()

    def stream_read_disable(self, _stream, disable: bool) -> None:
        if disable:
            self.read_off += 1
            return
        if self.read_off:
            self.read_off -= 1
            if not self.read_off and self.unacked and not self.closed:
                n, self.unacked = self.unacked, 0
                conn = self.conn
                try:
                    conn.h2.acknowledge_received_data(n, self.sid)
                except h2.exceptions.ProtocolError:
                    pass
                conn.want_flush()

    # -- internals -----------------------------------------------------------------------------------
    def _ended(self) -> None:
        self.local_ended = True
        self.pending.clear()
        if self.remote_ended:
            self._gone()
        elif self.tunnel == 2:
            pass  # half-closed: the client's END_STREAM (or reset) finishes the stream
        else:
            # the response is complete: the rest of the request is not needed (RFC 9113 8.1)
            try:
                self.conn.h2.reset_stream(self.sid, ErrorCodes.NO_ERROR)
            except h2.exceptions.ProtocolError:
                pass
            self._gone()

    def _gone(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.pending.clear()
        self.pending_bytes = 0
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


class Http2ServerCodec:
    """Downstream HTTP/2 (h2c prior knowledge or ALPN h2) for one connection."""

    __slots__ = ("conn", "hc", "cfg", "opts", "h2", "streams", "closed", "drain_close", "goaway_sent",
                 "in_feed", "flush_handle", "loop", "blocked", "write_paused", "max_frame", "stream_high",
                 "stats", "total_streams", "premature", "ctrl_out", "priority_frames", "empty_frames",
                 "ka_handle", "ka_timeout_handle", "close_pending", "stream", "lean", "rht", "rht_handle",
                 "rht_sid")

    def __init__(self, conn, hc, cfg):
        self.conn = conn
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
        self.h2 = new_h2(False, opts)
        self.lean = self.h2.__class__ is H2Engine  # takes Headers' pairs as they are
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
        hc = self.hc
        hc.stats.rq_header_timeout.value += 1
        hc.stats.rq_class[4].value += 1
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
            t = kinds.get(e.__class__, -1)
            if t == EV_DATA:
                self._on_data(e)
            elif t == EV_REQUEST:
                self.empty_frames = 0
                self._on_request(e, resets)
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
                s = streams.get(e.stream_id)
                if s is not None:
                    try:
                        trailers = Headers(inbound_headers(e.headers, TRAILERS))
                    except BadHeaders:
                        if self.stats is not None:
                            self.stats.rx_messaging_error.value += 1
                        s.reset_stream("protocol_error")
                        if s.stream is not None:
                            s.stream.on_reset("http2.invalid_trailers")
                        continue
                    s.remote_ended = True
                    if s.stream is not None:
                        s.stream.decode_trailers(trailers)
                    if s.local_ended:
                        s._gone()
            elif t == EV_RESET:
                self._on_reset(e)
                if self.closed:
                    return
            elif t == EV_WINDOW:
                if self.blocked:
                    if e.stream_id == 0:
                        flush_blocked(self)
                    else:
                        s = streams.get(e.stream_id)
                        if s is not None and s.pending:
                            s.flush_pending()
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

    def _on_request(self, e, resets) -> None:
        sid = e.stream_id
        self.total_streams += 1
        if resets is not None and sid in resets:
            # opened and reset in the same read: never start it (rapid reset)
            self.premature += 1
            self._check_premature()
            return
        st = self.stats
        if self.goaway_sent or len(self.streams) >= self.opts.max_concurrent_streams:
            if st is not None:
                st.streams_refused.value += 1
            self.h2.reset_stream(sid, ErrorCodes.REFUSED_STREAM)
            return
        raw = e.headers
        if len(raw) > self.opts.max_headers + 4:
            if st is not None:
                st.header_overflow.value += 1
            self.hc.stats.rq_too_large.value += 1
            self.h2.reset_stream(sid, ErrorCodes.INTERNAL_ERROR)  # as Envoy
            return
        try:
            h, expect, protocol, tunnel = request_fields(raw)
        except BadHeaders as err:
            log.debug("h2 stream %d: %s", sid, err)
            if st is not None:
                st.rx_messaging_error.value += 1
            self.h2.reset_stream(sid, ErrorCodes.PROTOCOL_ERROR)
            return
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
        else:
            h = list(h)
        s = H2ServerStream(self, sid, self.loop.time())
        s.tunnel = 1 if tunnel else 0
        end = e.stream_ended is not None
        s.remote_ended = end
        self.streams[sid] = s
        as_ = s.stream = self.hc.new_stream(s, "HTTP/2")
        if expect and not end:
            self.h2.send_headers(sid, [(":status", "100")])
        as_.decode_headers(Headers(h), end)

    def _on_data(self, e) -> None:
        sid = e.stream_id
        n = e.flow_controlled_length
        s = self.streams.get(sid)
        data = e.data
        end = e.stream_ended is not None
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
                try:
                    self.h2.acknowledge_received_data(n, sid)
                except h2.exceptions.ProtocolError:
                    pass
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
                try:
                    self.h2.acknowledge_received_data(n, sid)
                except h2.exceptions.ProtocolError:
                    pass
        if end and s.local_ended:
            s._gone()

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
