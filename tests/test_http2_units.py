"""HTTP/2 pieces without processes: pool selection by cluster protocol, option validation, header
translation, and the gRPC message counter across chunk boundaries."""

import asyncio

import pytest
from google.protobuf import json_format

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import protocol_pb2
import pyproxy.extensions  # noqa: F401 (registers the upstream protocol options)
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2  # noqa: F401
from pyproxy.cluster.cluster import Cluster
from pyproxy.cluster.host import Host
from pyproxy.cluster.manager import ClusterManager
from pyproxy.cluster.pool import Http1Pool
from pyproxy.cluster.pool_h2 import Http2Pool, cluster_options
from pyproxy.config import ConfigError
from pyproxy.filters.http.grpc_stats import _FrameCounter
from pyproxy.http import h2_common, h2_headers, h2_hpack
from pyproxy.http.headers import Headers
from pyproxy.stats import Store

HPO = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def _cluster(extra):
    d = {"name": "c", "type": "STATIC", "connect_timeout": "1s"}
    d.update(extra)
    proto = json_format.ParseDict(d, cluster_pb2.Cluster())
    loop = asyncio.new_event_loop()
    try:
        return Cluster(proto, ClusterManager(loop, Store()))
    finally:
        loop.close()


def _hpo(cfg):
    return {"typed_extension_protocol_options": {HPO: dict({"@type": "type.googleapis.com/" + HPO}, **cfg)}}


def test_pool_by_protocol():
    h = Host("127.0.0.1", 1)
    assert isinstance(_cluster({}).http_pool(h), Http1Pool)
    c = _cluster(_hpo({"explicit_http_config": {"http2_protocol_options": {"max_concurrent_streams": 7}}}))
    assert isinstance(c.http_pool(h), Http2Pool)
    assert cluster_options(c).max_concurrent_streams == 7
    legacy = _cluster({"http2_protocol_options": {}})
    assert isinstance(legacy.http_pool(h), Http2Pool)
    ud = _cluster(_hpo({"use_downstream_protocol_config": {"http2_protocol_options": {}}}))
    assert isinstance(ud.http_pool(h, True), Http2Pool)
    assert isinstance(ud.http_pool(h, False), Http1Pool)
    assert ud.http_pool(h, True) is ud.http_pool(h, True)


def test_options_defaults_and_validation():
    o = h2_common.H2Options()
    assert (o.max_concurrent_streams, o.stream_window, o.connection_window) == (1024, 16 << 20, 24 << 20)
    p = json_format.ParseDict({"initial_stream_window_size": 1000}, protocol_pb2.Http2ProtocolOptions())
    with pytest.raises(ConfigError, match="initial_stream_window_size"):
        h2_common.H2Options(p)
    p = json_format.ParseDict({"connection_keepalive": {"interval": "1s"}}, protocol_pb2.Http2ProtocolOptions())
    with pytest.raises(ConfigError, match="timeout"):
        h2_common.H2Options(p)
    p = json_format.ParseDict({"max_concurrent_streams": 5, "initial_connection_window_size": 1 << 20,
                               "connection_keepalive": {"interval": "2s", "timeout": "1s"}},
                              protocol_pb2.Http2ProtocolOptions())
    o = h2_common.H2Options(p)
    assert (o.max_concurrent_streams, o.connection_window, o.keepalive_interval, o.keepalive_timeout) == \
        (5, 1 << 20, 2.0, 1.0)


def test_to_h2_strips_connection_specific_headers():
    h = Headers([(":method", "GET"), (":path", "/"), (":authority", "a"), ("connection", "keep-alive"),
                 ("keep-alive", "5"), ("te", "gzip"), ("transfer-encoding", "chunked"), ("upgrade", "x"),
                 ("x-ok", "caf\u00e9"), ("host", "a")])
    out = h2_headers.to_h2(h)
    assert out == [(b":method", b"GET"), (b":path", b"/"), (b":authority", b"a"), (b"x-ok", b"caf\xe9")]
    assert h2_headers.to_h2(Headers([("te", "trailers")])) == [(b"te", b"trailers")]


def _req(*extra, pseudo=((b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"a"))):
    return list(pseudo) + list(extra)


def test_inbound_headers_validation():
    ok = h2_headers.inbound_headers(_req((b"cookie", b"a=1"), (b"x", b"caf\xe9"), (b"cookie", b"b=2")), h2_headers.REQUEST)
    assert ok == [(":method", "GET"), (":scheme", "http"), (":path", "/"), (":authority", "a"),
                  ("cookie", "a=1; b=2"), ("x", "caf\u00e9")]
    bad = [
        _req((b"X-Upper", b"v")), _req((b"x", b"a\r\nb")), _req((b"x", b" lead")), _req((b"connection", b"close")),
        _req((b"te", b"gzip")), _req((b":path", b"/again")), _req((b"x", b"v")) + [(b":method", b"GET")],
        _req(pseudo=((b":method", b"GET"), (b":path", b"/"))), _req(pseudo=((b":method", b"GET"), (b":scheme", b"http"),
                                                                         (b":path", b""))),
        _req(pseudo=((b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":status", b"200"))),
        _req((b"bad name", b"v")),
    ]
    for b in bad:
        with pytest.raises(h2_headers.BadHeaders):
            h2_headers.inbound_headers(b, h2_headers.REQUEST)
    assert h2_headers.inbound_headers([(b":method", b"CONNECT"), (b":authority", b"h:443")], h2_headers.REQUEST)
    with pytest.raises(h2_headers.BadHeaders):
        h2_headers.inbound_headers([(b":status", b"200"), (b":path", b"/")], h2_headers.RESPONSE)
    with pytest.raises(h2_headers.BadHeaders):
        h2_headers.inbound_headers([(b":status", b"200")], h2_headers.TRAILERS)
    assert h2_headers.inbound_headers([(b"grpc-status", b"0")], h2_headers.TRAILERS) == [("grpc-status", "0")]


def test_fast_hpack_round_trip():
    import hpack
    enc = h2_hpack.FastEncoder()
    dec = hpack.Decoder()
    h = [(b":status", b"200"), (b"content-type", b"application/grpc"), (b"x-long", b"v" * 300), (b"server", b"envoy")]
    assert dec.decode(enc.encode(h), raw=True) == h
    enc.header_table_size = 0  # the peer shrank its table: a size update leads the next block
    block = enc.encode(h)
    assert block[:1] == b"\x20" and dec.decode(block, raw=True) == h
    cd = h2_hpack.FastDecoder(65536)
    he = hpack.Encoder()
    blocks = [he.encode([(":method", "GET"), (":path", "/x"), ("x-a", "b")]) for _ in range(3)]
    assert blocks[1] == blocks[2]  # fully indexed repeats: parsed once
    outs = [cd.decode(b, raw=True) for b in blocks]
    assert list(outs[0]) == list(outs[1]) == list(outs[2]) == [(b":method", b"GET"), (b":path", b"/x"), (b"x-a", b"b")]
    assert len(cd.memo) == 2


def test_fast_encoder_new_values_of_known_names():
    """A field the memo has not seen (a request id) reuses its name's encoding; what goes out is
    what hpack decodes, connection-specific fields and ``te`` other than trailers stay out, and
    never-indexed fields keep their representation."""
    import uuid
    import hpack
    from hpack import NeverIndexedHeaderTuple
    enc = h2_hpack.FastEncoder()
    dec = hpack.Decoder()
    for i in range(3):
        rid = str(uuid.UUID(int=i + 1))
        h = [(":status", "200"), ("x-request-id", rid), ("te", "trailers"), ("x-v", "w" * (150 + i)),
             ("connection", "close"), ("content-type", "caf\xe9"), ("x-big", "b" * i)]
        assert dec.decode(enc.encode(h), raw=True) == [
            (b":status", b"200"), (b"x-request-id", rid.encode()), (b"te", b"trailers"),
            (b"x-v", b"w" * (150 + i)), (b"content-type", b"caf\xe9"), (b"x-big", b"b" * i)]
        assert dec.decode(enc.encode([("te", "gzip"), ("x-request-id", rid)]), raw=True) == [
            (b"x-request-id", rid.encode())]
    secret = NeverIndexedHeaderTuple(b"x-request-id", b"s")
    block = enc.encode([secret])
    assert block[:1] == b"\x10"  # literal never indexed, literal name
    assert dec.decode(block, raw=True) == [(b"x-request-id", b"s")]


def test_fast_decoder_matches_hpack_on_a_moving_dynamic_table():
    """nginx-like responses that insert a changing field each time, Huffman on and off, table
    size updates and evictions: FastDecoder decodes exactly what hpack's own decoder does."""
    import random
    import hpack
    from hpack.exceptions import HPACKError, OversizedHeaderListError
    rnd = random.Random(3)
    he = hpack.Encoder()
    ref = hpack.Decoder()
    fd = h2_hpack.FastDecoder(1 << 20)
    for i in range(400):
        h = [(":status", "200"), ("server", "nginx"), ("date", "d%d" % (i // 7)),
             ("x-r", "v" * rnd.randrange(0, 300)), ("content-length", str(rnd.randrange(1000)))]
        if i % 50 == 25:
            he.header_table_size = rnd.choice((0, 256, 4096))
        block = he.encode(h, huffman=bool(i & 1))
        assert list(fd.decode(block, raw=True)) == ref.decode(block, raw=True)
    # nginx inserts the same fields into the table with every response: one parse, many uses
    nginx = b"\x88\x61\x03abc\x76\x05nginx"  # :status 200, date: abc and server: nginx with indexing
    fd = h2_hpack.FastDecoder(1 << 20)
    ref = hpack.Decoder()
    for _ in range(200):
        assert list(fd.decode(nginx, raw=True)) == ref.decode(nginx, raw=True) == [
            (b":status", b"200"), (b"date", b"abc"), (b"server", b"nginx")]
    assert len(fd.memo) == 1 and fd.dyn_size <= 4096 and list(fd.dyn)[:2] == [(b"server", b"nginx"), (b"date", b"abc")]
    assert list(fd.decode(b"\xbe\xbf", raw=True)) == [(b"server", b"nginx"), (b"date", b"abc")]  # dynamic indices 62, 63
    # malformed blocks raise hpack's errors (the engines turn them into COMPRESSION_ERROR)
    for bad in (b"\x80", b"\xff", b"\xfe\x7f", b"\x40\x85ab", b"\x82\x3f\xe1\x1f", b"\x3f\xff\xff\xff\xff\x0f"):
        with pytest.raises(HPACKError):
            h2_hpack.FastDecoder(1 << 20).decode(bad, raw=True)
    small = h2_hpack.FastDecoder(100)
    with pytest.raises(OversizedHeaderListError):
        small.decode(hpack.Encoder().encode([("x-big", "v" * 200)]), raw=True)


@pytest.mark.parametrize("engine", h2_common.ENGINES)
def test_server_settings_advertised_and_enforced_by_us(engine):
    o = h2_common.H2Options(json_format.ParseDict({"max_concurrent_streams": 3}, protocol_pb2.Http2ProtocolOptions()))
    c = h2_common.new_h2(False, o, engine=engine)
    data = c.data_to_send()
    # SETTINGS_MAX_CONCURRENT_STREAMS (0x3) = 3 is on the wire...
    assert b"\x00\x03\x00\x00\x00\x03" in data
    # ...while the engine lets more streams through, so we can answer REFUSED_STREAM per stream
    import hpack
    block = hpack.Encoder().encode([(":method", "GET"), (":path", "/"), (":scheme", "http"), (":authority", "a")])
    wire = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes(9)[:3] + b"\x04" + bytes(5)  # preface, empty SETTINGS
    for i in range(5):
        wire += len(block).to_bytes(3, "big") + b"\x01\x05" + (1 + 2 * i).to_bytes(4, "big") + block
    events = c.receive_data(wire)
    # (the lean engine in codec mode reports requests as (EV_REQUEST, stream id, fields, 0, end?))
    ids = [e[1] if type(e) is tuple else e.stream_id for e in events
           if (type(e) is tuple and e[0] == h2_common.EV_REQUEST) or type(e).__name__ == "RequestReceived"]
    assert sorted(ids) == [1, 3, 5, 7, 9]


@pytest.mark.parametrize("split", [1, 2, 3, 5, 7, 64])
def test_grpc_frame_counter(split):
    msgs = [b"", b"a", b"b" * 300, b"c" * 70000]
    wire = b"".join(b"\x00" + len(m).to_bytes(4, "big") + m for m in msgs)
    fc = _FrameCounter()
    for i in range(0, len(wire), split):
        fc.feed(wire[i:i + split])
    assert fc.count == 4 and fc.skip == 0 and fc.head == b""
