"""HPACK (RFC 7541) for both HTTP/2 engines: a stateless encoder and a memoizing decoder, the
costly part of HTTP/2 in Python.

``FastEncoder`` never inserts into the dynamic table (static-table hits indexed, everything else a
literal without indexing), so a field's encoding is the same for every connection and is memoized
process-wide. ``FastDecoder`` parses a block into operations once (memoized per connection) and
replays them against its dynamic table. Every memo is bounded in bytes (``ByteMemo``).
"""

from __future__ import annotations

import collections

from hpack import NeverIndexedHeaderTuple
from hpack.exceptions import HPACKDecodingError, InvalidTableIndexError, InvalidTableSizeError, OversizedHeaderListError
from hpack.huffman_table import decode_huffman
from hpack.table import HeaderTable

# connection-specific header fields never sent on HTTP/2 (RFC 9113 8.2.2)
CONNECTION_HEADERS = frozenset(("connection", "keep-alive", "proxy-connection", "transfer-encoding",
                                "upgrade", "host"))

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
        if headers.__class__ is not list:
            headers = tuple(headers)
        # every field's encoding looked up in C; the Python loop runs only over the misses
        # (a new request id, a field seen for the first time)
        out = list(map(self.memo.get, headers))
        if None in out:
            _fill(headers, out)
        if self.pending_size_update is not None:
            out.insert(0, _hp_int(self.pending_size_update, 5, 0x20))
            self.pending_size_update = None
        return b"".join(out)


def _fill(headers, out: list) -> None:
    """The fields ``FastEncoder.encode`` found no memoized encoding for (``None`` in ``out``)."""
    i = out.index(None)
    names = _NAMES.d
    while True:
        kv = headers[i]
        k = kv[0]
        if k in _UNIQUE_FIELDS:  # ids never repeat: they would only flush the memo
            v = kv[1]
            try:
                # (a request id: a known name, a new short ASCII str value; anything else, e.g. a
                # bytes value or a NeverIndexedHeaderTuple, the general way)
                out[i] = names[k] + _LEN7[len(v)] + v.encode("ascii") if kv.__class__ is tuple else _encode_one(kv)
            except (KeyError, IndexError, AttributeError, UnicodeError):
                out[i] = _encode_one(kv)
        else:
            b = out[i] = _encode_one(kv)
            _ENC.put(kv, b, 2 * len(b) + _FIELD_OVERHEAD)
        if None not in out:
            return
        i = out.index(None, i + 1)


_LEN7 = tuple(bytes((n,)) for n in range(127))  # a short string's length prefix (no Huffman)


# literal field names (no static-table entry, not connection-specific, not ``te``) -> their
# encoding, so a new value of a known name (a request id) costs one lookup
_NAMES = ByteMemo(256 << 10, 1024)


def _encode_one(kv) -> bytes:
    """One field; ``Headers``' own (str, str) pairs are taken as ``to_h2`` would send them
    (connection-specific fields dropped, values byte for byte), so the lean engine is
    handed ``Headers._h`` directly."""
    n, v = kv[0], kv[1]
    if v.__class__ is str:
        try:
            v = v.encode("latin-1")
        except UnicodeEncodeError:
            v = v.encode("utf-8")
    pre = _NAMES.d.get(n)
    if pre is not None and not isinstance(kv, NeverIndexedHeaderTuple):
        ln = len(v)
        return pre + (bytes((ln,)) if ln < 127 else _hp_int(ln, 7, 0)) + v
    if n.__class__ is str:
        if n in CONNECTION_HEADERS or (n == "te" and v.lower() != b"trailers"):
            if n != "te" or b"trailers" not in [t.strip() for t in v.lower().split(b",")]:
                return b""
            v = b"trailers"  # (a TE listing trailers among other codings: only that, as Envoy)
        n = n.encode("latin-1")
    i = _STATIC_FULL.get((n, v))
    if i is not None:
        return bytes((0x80 | i,))
    sensitive = isinstance(kv, NeverIndexedHeaderTuple)
    i = _STATIC_NAME.get(n)
    first = 0x10 if sensitive else 0x00
    if i is not None:
        return _hp_int(i, 4, first) + _hp_str(v)
    pre = bytes((first,)) + _hp_str(n)
    if not sensitive and n != b"te":
        _NAMES.put(kv[0], pre, 2 * len(pre) + 120)
    return pre + _hp_str(v)


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

    __slots__ = ("dyn", "dyn_n", "dyn_size", "run_ins", "run_left", "max_table", "max_allowed_table_size", "max_header_list_size", "memo",
                 "version", "memo_used", "memo_limit")

    OP_COST = 128  # bytes one parsed operation and its decoded field hold in the memo, roughly

    def __init__(self, max_header_list_size: int):
        self.dyn = collections.deque()  # newest first: (name, value)
        self.dyn_n = collections.deque()  # each entry's size (RFC 7541 4.1), in step with ``dyn``
        self.dyn_size = 0
        # the inserts of the block replayed last (``_inserts``) and the table bytes their run of
        # replays has still to fill: below 0, the table holds only that block's fields, repeated
        # (anything else that changes the table ends the run: ``_add``, ``_resize``)
        self.run_ins = None
        self.run_left = 0
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
            #  list size, its inserts (``_inserts``)]: a block that references no dynamic-table entry (nginx's responses: static
            # names, literal values, each inserted) has the same fields whatever the table holds
            m = [ops, any(op[0] == 2 or (op[0] == 1 and op[4]) for op in ops), -1, None,
                 all(op[0] == 2 or op[1] <= 61 for op in ops), 0, _inserts(ops)]
            cost = len(data) + self.OP_COST * len(ops) + 200 + (96 * len(m[6][0]) if m[6] is not None else 0)
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
            ins = m[6]
            if ins is not None and ins is self.run_ins and self.run_left < 0:
                pass  # the table is this block's fields over and over: inserting them again and
                # evicting as many leaves it as it is (the newest whole copies that fit)
            elif ins is not None:
                # (only inserts: nginx's responses) all at once, then the oldest entries evicted:
                # the same table as inserting and evicting one by one, since either way the table
                # ends with the newest entries that fit (an entry larger than the table empties
                # it, and it goes with all older ones here too)
                dyn = self.dyn
                dyn_n = self.dyn_n
                dyn.extendleft(ins[0])
                dyn_n.extendleft(ins[2])
                size = self.dyn_size + ins[1]
                mx = self.max_table
                if size > mx:
                    pop = dyn.pop
                    pop_n = dyn_n.pop
                    while size > mx:
                        pop()
                        size -= pop_n()
                self.dyn_size = size
                self.version += 1
                if ins is self.run_ins:
                    self.run_left -= ins[1]
                else:
                    self.run_ins = ins
                    self.run_left = self.max_table - ins[1]
            else:
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
        self.run_ins = None
        self._evict()

    def _add(self, kv) -> None:
        n = len(kv[0]) + len(kv[1]) + 32
        self.version += 1
        self.run_ins = None
        if n > self.max_table:
            self.dyn.clear()  # RFC 7541 4.4: an entry larger than the table empties it
            self.dyn_n.clear()
            self.dyn_size = 0
            return
        self.dyn.appendleft(kv)
        self.dyn_n.appendleft(n)
        self.dyn_size += n
        if self.dyn_size > self.max_table:
            self._evict()

    def _evict(self) -> None:
        dyn = self.dyn
        mx = self.max_table
        pop_n = self.dyn_n.pop
        while self.dyn_size > mx and dyn:
            dyn.pop()
            self.dyn_size -= pop_n()


_HUFFMAN_MEMO = _HUFF.d


def _inserts(ops):
    """For a block whose only table effects are inserts of fields with a literal or static name
    (no size update, no dynamic-table reference): (the inserted fields, oldest first; their total
    table size; their sizes, oldest first), else None."""
    kvs = []
    sizes = []
    total = 0
    for op in ops:
        k = op[0]
        if k == 2 or (k == 0 and op[1] > 61) or (k == 1 and op[1] > 61):
            return None
        if k == 1 and op[4]:
            i = op[1]
            kv = (op[2] if i == 0 else _STATIC[i - 1][0], op[3])
            n = len(kv[0]) + len(kv[1]) + 32
            kvs.append(kv)
            sizes.append(n)
            total += n
    return (tuple(kvs), total, tuple(sizes)) if kvs else None


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
