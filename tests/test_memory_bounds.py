"""Memory that traffic can grow is bounded in bytes: header-block floods on HTTP/2 (HPACK memo per
connection, process-wide field memos) and HTTP/1.1 leave the proxy's RSS (read from /proc) within
a few MB; an oversized header block is a connection error (GOAWAY)."""

from __future__ import annotations

import os
import random
import socket
import struct
import time

import pytest

from proxy_util import Pyproxy, bootstrap, free_port, http_listener, route_config
from pyproxy.http.h2_hpack import ByteMemo, FastDecoder

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def _frame(t, flags, sid, payload):
    return struct.pack(">I", len(payload))[1:] + bytes((t, flags)) + struct.pack(">I", sid) + payload


def _bs():
    port = free_port()
    rc = route_config([{"match": {"prefix": "/"}, "direct_response": {"status": 200}}])
    return bootstrap([http_listener(port, rc)], []), port


def _drain(s):
    s.setblocking(False)
    try:
        while s.recv(1 << 20):
            pass
    except (BlockingIOError, OSError):
        pass
    s.setblocking(True)


def _h2_flood(port, n, seed, blen=1000):
    """``n`` distinct ~1 KiB header blocks of indexed static fields on one connection (each a
    thousand fields: parsing it is the worst case for the decoder memo)."""
    rnd = random.Random(seed)
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(PREFACE + _frame(4, 0, 0, b""))
    head = bytes((0x82, 0x86, 0x84, 0x41, 1, ord("x")))
    sid, batch = 1, []
    for i in range(n):
        batch.append(_frame(1, 0x5, sid, head + bytes(0x80 | rnd.randint(16, 61) for _ in range(blen))))
        sid += 2
        if len(batch) == 50:
            try:
                s.sendall(b"".join(batch))
            except OSError:
                break
            batch = []
            _drain(s)
    s.close()


def _h2_distinct_values(port, n, seed):
    """Valid requests whose header values are all different (2 KiB each): the process-wide field
    and block memos see ``n`` distinct entries."""
    rnd = random.Random(seed)
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(PREFACE + _frame(4, 0, 0, b""))
    sid, batch = 1, []
    for i in range(n):
        v = ("%x" % rnd.getrandbits(64)).encode() * 128
        block = bytes((0x82, 0x86, 0x84, 0x41, 1, ord("x"))) + b"\x00\x05x-val" + _hp_len(len(v)) + v
        batch.append(_frame(1, 0x5, sid, block))
        sid += 2
        if len(batch) == 20 or i == n - 1:
            s.sendall(b"".join(batch))
            batch = []
            _drain(s)
        if sid > 1999:  # stay under max_concurrent_streams worth of unanswered streams: new connection
            s.close()
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(PREFACE + _frame(4, 0, 0, b""))
            sid = 1
    s.close()


def _hp_len(n):
    if n < 127:
        return bytes((n,))
    out = [127]
    n -= 127
    while n >= 128:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _settle(px, port):
    time.sleep(0.3)
    return px.rss_kb()


def test_hpack_memo_is_bounded_per_connection():
    d = FastDecoder(61440)
    rnd = random.Random(1)
    for _ in range(300):
        block = bytes(0x80 | rnd.randint(1, 61) for _ in range(100))  # 100 ops each
        try:
            d.decode(block)
        except Exception:
            pass
    assert d.memo_used <= d.memo_limit == 61440
    assert 0 < len(d.memo) < 300
    big = bytes(0x80 | rnd.randint(1, 61) for _ in range(1000))
    d.memo.clear()
    d.memo_used = 0
    try:
        d.decode(big)
    except Exception:
        pass
    assert big not in d.memo  # a thousand-op block is not kept at all


def test_byte_memo():
    m = ByteMemo(1000, 400)
    m.put("a", 1, 300)
    m.put("b", 2, 300)
    m.put("big", 3, 500)
    assert m.d == {"a": 1, "b": 2} and m.used == 600
    m.put("c", 4, 300)
    m.put("d", 5, 300)
    assert m.d == {"d": 5} and m.used == 300  # emptied when the total would pass the limit


@pytest.mark.parametrize("engine", ["lean", "h2"])
def test_rss_bounded_under_http2_header_block_floods(engine):
    bs, port = _bs()
    env = dict(os.environ, PYPROXY_H2_ENGINE=engine) if engine == "h2" else None
    with Pyproxy(bs, env=env) as px:
        _h2_flood(port, 200, seed=99)  # warm up: imports, first allocations
        base = _settle(px, port)
        for c in range(3):
            _h2_flood(port, 2000, seed=c)  # ~6 MB of header blocks
        _h2_distinct_values(port, 3000, seed=7)  # ~6 MB of distinct field values
        grown = _settle(px, port) - base
        assert px.proc.poll() is None
        # before the byte bounds, the first flood alone held ~80 MB per connection
        assert grown < 25 * 1024, "RSS grew by %d KiB" % grown


def test_rss_bounded_under_http1_header_floods():
    bs, port = _bs()
    with Pyproxy(bs) as px:
        def flood(n, seed):
            rnd = random.Random(seed)
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            for i in range(n):
                hdrs = "".join("x-%d: %s\r\n" % (j, "%x" % rnd.getrandbits(64) * 40) for j in range(8))
                s.sendall(("GET /%d HTTP/1.1\r\nhost: x\r\n%s\r\n" % (i, hdrs)).encode())
                got = b""
                while b"\r\n\r\n" not in got:  # one at a time: a response each
                    d = s.recv(4096)
                    assert d, "closed"
                    got += d
            s.close()
        flood(100, 99)
        base = _settle(px, port)
        for c in range(4):
            flood(1000, c)  # ~20 MB of distinct header values
        # heads over the limit, many connections at once, left open
        socks = []
        for _ in range(50):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(b"GET / HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 200000)
            socks.append(s)
        time.sleep(0.3)
        for s in socks:
            s.close()
        grown = _settle(px, port) - base
        assert px.proc.poll() is None
        assert grown < 25 * 1024, "RSS grew by %d KiB" % grown


@pytest.mark.parametrize("engine", ["lean", "h2"])
def test_oversized_header_block_is_refused(engine):
    """A header list over max_request_headers_kb is refused without being kept: its stream is reset
    (RST_STREAM, as Envoy: http2.header_list_size_too_large) or the connection ends with a GOAWAY."""
    bs, port = _bs()
    env = dict(os.environ, PYPROXY_H2_ENGINE=engine) if engine == "h2" else None
    with Pyproxy(bs, env=env) as px:
        for fields in ([(b"x-big", b"a" * 70000)], [(b"x-%d" % i, b"v" * 700) for i in range(100)]):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            block = bytes((0x82, 0x86, 0x84, 0x41, 1, ord("x")))
            for k, v in fields:
                block += b"\x00" + _hp_len(len(k)) + k + _hp_len(len(v)) + v
            # HEADERS (END_STREAM) and CONTINUATION frames of 16 KiB, END_HEADERS on the last
            chunks = [block[i:i + 16384] for i in range(0, len(block), 16384)]
            frames = [_frame(1 if i == 0 else 9, (0x1 if i == 0 else 0) | (0x4 if i == len(chunks) - 1 else 0),
                             1, c) for i, c in enumerate(chunks)]
            try:
                s.sendall(PREFACE + _frame(4, 0, 0, b"") + b"".join(frames))
            except OSError:
                pass
            got = b""
            types = []
            p = 0
            deadline = time.monotonic() + 3
            s.settimeout(0.5)
            while time.monotonic() < deadline and not (3 in types or 7 in types):
                try:
                    d = s.recv(65536)
                except socket.timeout:
                    continue
                except ConnectionResetError:
                    break
                if not d:
                    break
                got += d
                while p + 9 <= len(got) and p + 9 + int.from_bytes(got[p:p + 3], "big") <= len(got):
                    types.append(got[p + 3])
                    p += 9 + int.from_bytes(got[p:p + 3], "big")
            s.close()
            assert 3 in types or 7 in types, types  # RST_STREAM or GOAWAY
        assert px.proc.poll() is None
