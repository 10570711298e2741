"""Python cost of one proxied HTTP/2 request, without sockets (for profiling the h2 hot path).

The same routed stack as ``micro_h1.py`` (20 routes, the 18th matches and adds a header), with an
HTTP/2 cluster: an h2c client's frames go in downstream (as h2load sends them: a batch of
HEADERS frames per read, fully indexed HPACK after the first), the request frames come out
upstream, the backend's response frames (HEADERS + 1 KB DATA, as nginx sends them: literals
with incremental indexing, ``NginxPeer``) go in upstream, and the response frames come out
downstream (the codecs flush through ``writebatch`` at the end of each read). Prints microseconds per request; ``--profile`` prints the top cProfile
entries. Under h2load -c10 -m10 a read carries only a few requests: compare ``--batch 1``.

    python3 benchmarks/micro_h2.py [-n 20000] [--batch 10] [--profile | --opcodes [TOP]]
                                   [--chain router|istio|istio-telemetry|istio-nostats]

``--chain`` builds the stack from the benchmark's bootstrap for that chain (benchmarks/bench/
configs.py, with the HTTP/2 cluster run.py's h2 mode uses) and sends run.py's request (the Istio
chains: ``:authority`` ``reviews.shop``); ``--opcodes`` counts the Python opcodes and calls per
request (deterministic, unlike timings on a shared machine).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import struct
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from micro_h1 import BOOTSTRAP as H1_BOOTSTRAP, FakeTransport as _FakeTransport, build_stack, count_opcodes  # noqa: E402


class FakeTransport(_FakeTransport):
    def get_write_buffer_size(self):
        return 0

BOOTSTRAP = H1_BOOTSTRAP.replace(
    "    connect_timeout: 1s\n",
    "    connect_timeout: 1s\n"
    "    typed_extension_protocol_options:\n"
    "      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n"
    "        \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n"
    "        explicit_http_config: {http2_protocol_options: {}}\n")

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
BODY = b"x" * 1024


def frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return struct.pack(">BHBBL", n >> 16, n & 0xFFFF, ftype, flags, sid) + payload


def settings(*pairs) -> bytes:
    return frame(4, 0, 0, b"".join(struct.pack(">HL", k, v) for k, v in pairs))


def window_update(sid: int, n: int) -> bytes:
    return frame(8, 0, sid, struct.pack(">L", n))


class Peer:
    """HPACK state of one simulated peer (``hpack.Encoder``, as a real peer keeps)."""

    def __init__(self):
        import hpack
        self.enc = hpack.Encoder()
        self.last = None

    def block(self, headers) -> bytes:
        # once the fields are in the dynamic table the block repeats byte for byte: reuse it so
        # the simulated peer's own cost stays out of the figures
        last = self.last
        if last is not None and last[0] is headers:
            return last[1]
        b = self.enc.encode(headers)
        if b == self.enc.encode(headers):
            self.last = (headers, b)
        return b


class NginxPeer:
    """The HPACK blocks nginx sends as an HTTP/2 backend: every field the static table does not
    hold whole goes as a literal with incremental indexing under its static name index (one
    dynamic-table insert per field per response, nothing ever referenced), so the receiver's
    table moves with every response although the bytes repeat."""

    def __init__(self):
        from hpack.table import HeaderTable
        self.full = {kv: i for i, kv in reversed(list(enumerate(HeaderTable.STATIC_TABLE, 1)))}
        self.name = {kv[0]: i for i, kv in reversed(list(enumerate(HeaderTable.STATIC_TABLE, 1)))}
        self.memo = {}

    def block(self, headers) -> bytes:
        b = self.memo.get(id(headers))
        if b is None:
            out = bytearray()
            for k, v in headers:
                i = self.full.get((k, v))
                if i is not None:
                    out.append(0x80 | i)
                    continue
                i = self.name[k]  # (nginx's response fields all have a static name)
                assert i < 63 and len(v) < 127
                out += bytes((0x40 | i, len(v))) + v
            b = self.memo[id(headers)] = bytes(out)
        return b


def _decode_headers(data: bytes):
    """The header blocks of the HEADERS frames in ``data`` (one HPACK decoder, in order)."""
    import hpack
    dec = hpack.Decoder()
    dec.max_allowed_table_size = 1 << 16
    out, i = [], 0
    if data.startswith(PREFACE):
        i = len(PREFACE)
    while i + 9 <= len(data):
        n = int.from_bytes(data[i:i + 3], "big")
        ftype, flags = data[i + 3], data[i + 4]
        payload = data[i + 9:i + 9 + n]
        i += 9 + n
        if ftype != 1:
            continue
        if flags & 0x8:  # PADDED
            payload = payload[1:len(payload) - payload[0]]
        if flags & 0x20:  # PRIORITY
            payload = payload[5:]
        out.append([(bytes(k), bytes(v)) for k, v in dec.decode(payload, raw=True)])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=20000)
    ap.add_argument("--batch", type=int, default=10, help="requests per downstream read")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--opcodes", type=int, nargs="?", const=15, default=None, metavar="TOP",
                    help="count the Python opcodes and calls per request and list the TOP functions")
    ap.add_argument("--chain", choices=("router", "istio", "istio-telemetry", "istio-nostats"),
                    help="the benchmark's bootstrap for this chain (benchmarks/bench/configs.py)")
    a = ap.parse_args(argv)
    from pyproxy.listeners.connection import DownstreamConnection
    path, authority, up_must = b"/r18/bench", b"127.0.0.1:8080", b"x-bench-route"
    if a.chain:
        import json
        from bench import configs
        boot = json.dumps(configs.envoy_bootstrap(0, 9, upstream_h2=True, chain=a.chain,
                                                  response_headers=True, misroute_port=10))
        if a.chain == "router":
            cname = "backend"
        else:
            cname = configs.istio_cluster_name(configs.ISTIO_TARGET)
            path, authority = configs.ISTIO_PATH.encode(), configs.ISTIO_HOST.encode()
            up_must = configs.ATTEMPT_HEADER.encode()
        loop, lm, al, cluster, host, pool = build_stack(boot, cname)
    else:
        loop, lm, al, cluster, host, pool = build_stack(BOOTSTRAP)

    # upstream connection, as the pool's connect would make it, with nginx's SETTINGS
    pool.connecting += 1
    cluster.cx_total_active += 1
    up = pool._new_connection()
    ut = FakeTransport(("127.0.0.1", 9), ("127.0.0.1", 40000))
    up.connection_made(ut)
    up.data_received(settings((3, 128), (4, 65536), (5, 16777215)) + window_update(0, 2 ** 31 - 1 - 65535)
                     + frame(4, 1, 0))
    assert up.ready

    # downstream connection with h2load's preface (windows 2^30-1)
    down = DownstreamConnection(lm, al)
    dt = FakeTransport(("127.0.0.1", 50000), ("127.0.0.1", 8080))
    down.connection_made(dt)
    down.data_received(PREFACE + settings((3, 100), (4, 2 ** 30 - 1)) + window_update(0, 2 ** 30 - 1 - 65535))
    down.data_received(frame(4, 1, 0))
    loop.run_until_complete(asyncio.sleep(0))

    client = Peer()
    backend = NginxPeer()
    req = [(b":method", b"GET"), (b":path", path), (b":scheme", b"http"),
           (b":authority", authority), (b"user-agent", b"h2load nghttp2/1.52.0")]
    resp = [(b":status", b"200"), (b"server", b"nginx/1.22.1"), (b"date", b"Sat, 21 Nov 2026 21:00:00 GMT"),
            (b"content-type", b"text/plain"), (b"content-length", b"1024")]
    state = {"dsid": 1, "usid": 1, "sent": 0}

    def batch(k: int):
        d = state["dsid"]
        out = []
        for i in range(k):
            out.append(frame(1, 0x5, d + 2 * i, client.block(req)))
        state["dsid"] = d + 2 * k
        down.data_received(b"".join(out))  # the upstream codec's requests leave at its end (writebatch)
        u = state["usid"]
        out = []
        for i in range(k):
            out.append(frame(1, 0x4, u + 2 * i, backend.block(resp)))
            out.append(frame(0, 0x1, u + 2 * i, BODY))
        state["usid"] = u + 2 * k
        state["sent"] += k
        if state["sent"] >= 30000:
            state["sent"] = 0  # (the downstream client returns connection-window credit below)
        up.data_received(b"".join(out))
        if state["sent"] == 0:
            down.data_received(window_update(0, 30000 * 1024))

    for _ in range(20):
        batch(a.batch)
    loop.run_until_complete(asyncio.sleep(0))
    got = b"".join(dt.out)
    assert got.endswith(BODY) and got.count(BODY) == 20 * a.batch, (len(got), got[-200:])
    up_headers = _decode_headers(b"".join(ut.out))
    assert any(k == up_must for blk in up_headers for k, _ in blk), (up_must, up_headers[:1])
    if a.chain == "router":
        assert any(k == b"x-bench-matched" for blk in _decode_headers(got) for k, _ in blk)
    dt.out.clear()
    ut.out.clear()
    import gc
    gc.collect()
    gc.freeze()
    nb = max(1, a.n // a.batch)
    if a.opcodes is not None:
        count_opcodes(lambda: batch(a.batch), max(1, 200 // a.batch), a.batch, a.opcodes, "HTTP/2 ")
        return 0
    if a.profile:
        import cProfile
        import pstats
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(nb):
            batch(a.batch)
        pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(35)
        return 0
    best = None
    for _ in range(5):
        dt.out.clear()
        ut.out.clear()
        t = time.perf_counter()
        for i in range(nb):
            batch(a.batch)
            if i % 100 == 99:
                got = b"".join(dt.out)
                # every request answered by the backend's body (a broken run must not look fast)
                assert got.count(BODY) == 100 * a.batch, (got.count(BODY), got[-300:])
                dt.out.clear()
                ut.out.clear()
                loop.run_until_complete(asyncio.sleep(0))  # whatever was left to call_soon
        el = (time.perf_counter() - t) / (nb * a.batch) * 1e6
        best = el if best is None else min(best, el)
    loop.run_until_complete(asyncio.sleep(0))
    print("python cost per proxied HTTP/2 request: %.1f us (best of 5 x %d, %d per read)" % (best, nb * a.batch, a.batch))
    return 0


if __name__ == "__main__":
    sys.exit(main())
