"""The HTTP/2 codecs' HPACK decoder memo (pyproxy/http/h2_hpack.py FastDecoder): a block's fields are
reused only while the decoder's dynamic table is what it was when the block was decoded.
The blocks below are nginx 1.22 responses as captured on the wire (nginx shrinks its table to zero
when the client states SETTINGS_HEADER_TABLE_SIZE, and then sends every field as a literal with
incremental indexing)."""

from __future__ import annotations

import hpack

from pyproxy.http.h2_common import H2Options, new_h2
from pyproxy.http.h2_hpack import FastDecoder

NGINX_FIRST = bytes.fromhex("20887689aa6355e580ae212e1f6196dc34fd2820a9a4fdd41004e28266e08371b6d4c5a37f"
                            "5f87497ca58ae819aa5c0431303234")
NGINX_NEXT = NGINX_FIRST[1:]  # the same fields, without the table size update
FIELDS = [(b":status", b"200"), (b"server", b"nginx/1.22.1"), (b"date", b"Sat, 21 Nov 2026 23:21:55 GMT"),
          (b"content-type", b"text/plain"), (b"content-length", b"1024")]


def test_zero_size_table_blocks_are_memoized():
    d = FastDecoder(65536)
    assert list(d.decode(NGINX_FIRST, raw=True)) == FIELDS
    assert d.header_table_size == 0
    first = d.decode(NGINX_NEXT, raw=True)
    for _ in range(3):
        assert d.decode(NGINX_NEXT, raw=True) is first  # the table stayed empty: same fields
    assert list(first) == FIELDS


def test_blocks_that_fill_the_table_decode_right_every_time():
    d = FastDecoder(65536)
    for _ in range(3):
        assert list(d.decode(NGINX_NEXT, raw=True)) == FIELDS  # 4096-byte table: fields are inserted
    assert d.version > 0 and NGINX_NEXT in d.memo


def test_cached_block_never_outlives_a_table_change():
    """An indexed reference to the dynamic table decodes to whatever the table holds now."""
    enc = hpack.Encoder()
    d = FastDecoder(65536)
    first = enc.encode([(b"x-a", b"1")])            # inserted at index 62
    assert list(d.decode(first, raw=True)) == [(b"x-a", b"1")]
    ref = b"\xbe"                                   # indexed field 62
    assert list(d.decode(ref, raw=True)) == [(b"x-a", b"1")]
    assert list(d.decode(ref, raw=True)) == [(b"x-a", b"1")]  # memoized
    d.decode(enc.encode([(b"x-b", b"2")]), raw=True)   # x-b is now 62, x-a 63
    assert list(d.decode(ref, raw=True)) == [(b"x-b", b"2")]


def test_upstream_settings_state_the_header_table_size():
    """What makes nginx shrink its table: SETTINGS_HEADER_TABLE_SIZE in our first SETTINGS."""
    from h2.settings import SettingCodes
    for engine in ("lean", "h2"):
        c = new_h2(True, H2Options(), engine=engine)
        data = c.data_to_send()
        i = data.index(b"\x04\x00\x00\x00\x00\x00", 24)  # the SETTINGS frame after the preface
        n = int.from_bytes(data[i - 3:i], "big")
        payload = data[i + 6:i + 6 + n]
        settings = {int.from_bytes(payload[j:j + 2], "big"): int.from_bytes(payload[j + 2:j + 6], "big")
                    for j in range(0, n, 6)}
        assert settings.get(SettingCodes.HEADER_TABLE_SIZE) == 4096, (engine, settings)


def _literal_indexed(static_index: int, value: bytes) -> bytes:
    """A literal field with incremental indexing, name from the static table, raw value."""
    assert static_index < 63 and len(value) < 127
    return bytes([0x40 | static_index, len(value)]) + value


def test_memoized_blocks_match_hpack_under_a_moving_table():
    """Blocks that insert into the table (and size updates) repeated while other blocks move the
    table: every decode equals the reference ``hpack`` decoder's, and the table stays in step."""
    import random
    rnd = random.Random(7)
    ref = hpack.Decoder()
    enc = hpack.Encoder()
    d = FastDecoder(1 << 20)
    fixed = [_literal_indexed(54, b"nginx"), _literal_indexed(33, b"Sat, 21 Nov 2026 23:21:55 GMT"),
             _literal_indexed(31, b"text/plain") + _literal_indexed(28, b"1024"),
             b"\x88" + _literal_indexed(54, b"nginx"), b"\x3f\xe1\x1f" + _literal_indexed(31, b"a/b")]
    for step in range(600):
        r = rnd.random()
        if r < 0.5:
            block = rnd.choice(fixed)
        else:
            fields = [(b"x-%d" % rnd.randrange(8), b"v%d" % rnd.randrange(4)) for _ in range(rnd.randrange(1, 4))]
            block = enc.encode(fields)  # references the table once the fields are in it
        want = [(bytes(k), bytes(v)) for k, v in ref.decode(block, raw=True)]
        got = list(d.decode(block, raw=True))
        assert got == want, (step, block.hex())
        assert [tuple(x) for x in d.dyn] == [tuple(x) for x in ref.header_table.dynamic_entries], step


def _size_update(n: int) -> bytes:
    """A dynamic table size update to ``n`` (RFC 7541 6.3)."""
    if n < 31:
        return bytes([0x20 | n])
    out, n = bytearray([0x3F]), n - 31
    while n >= 128:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def test_repeated_insert_only_blocks_match_hpack_whatever_the_table_size():
    """nginx's responses (only inserts under static names) repeated while the table size moves
    (down to less than one field, so that an insert empties the table), with blocks that
    reference the table in between, in runs long enough to fill the table with one block's fields
    (which the decoder then leaves as they are): the fields and the table stay those of ``hpack``'s decoder,
    and so do the entry sizes the decoder keeps beside the table."""
    import random
    rnd = random.Random(11)
    ref = hpack.Decoder()
    d = FastDecoder(1 << 20)
    nginx = [b"\x88" + _literal_indexed(54, b"nginx/1.22.1") + _literal_indexed(33, b"Sat, 21 Nov 2026 2%d:00:00 GMT" % i)
             + _literal_indexed(31, b"text/plain") + _literal_indexed(28, b"1024") for i in range(3)]
    cur = nginx[0]
    for step in range(3000):
        r = rnd.random()
        if r < 0.7:  # mostly long runs of one block (the table then holds only its fields)
            if rnd.random() < 0.03:
                cur = rnd.choice(nginx)
            block = cur
        elif r < 0.8:
            block = _size_update(rnd.choice((0, 30, 60, 100, 200, 1000, 4096))) + rnd.choice(nginx)
        else:  # the newest entries by index, when the table has them
            n = len(ref.header_table.dynamic_entries)
            block = bytes(0x80 | (62 + i) for i in range(min(n, 3))) + _literal_indexed(58, b"curl/%d" % step)
        want = [(bytes(k), bytes(v)) for k, v in ref.decode(block, raw=True)]
        got = list(d.decode(block, raw=True))
        assert got == want, (step, block.hex())
        assert [tuple(x) for x in d.dyn] == [tuple(x) for x in ref.header_table.dynamic_entries], step
        assert list(d.dyn_n) == [len(k) + len(v) + 32 for k, v in d.dyn], step
        assert d.dyn_size == sum(d.dyn_n) <= d.max_table, step
