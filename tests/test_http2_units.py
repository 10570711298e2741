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
from pyproxy.http import http2
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
    o = http2.H2Options()
    assert (o.max_concurrent_streams, o.stream_window, o.connection_window) == (1024, 16 << 20, 24 << 20)
    p = json_format.ParseDict({"initial_stream_window_size": 1000}, protocol_pb2.Http2ProtocolOptions())
    with pytest.raises(ConfigError, match="initial_stream_window_size"):
        http2.H2Options(p)
    p = json_format.ParseDict({"connection_keepalive": {"interval": "1s"}}, protocol_pb2.Http2ProtocolOptions())
    with pytest.raises(ConfigError, match="timeout"):
        http2.H2Options(p)
    p = json_format.ParseDict({"max_concurrent_streams": 5, "initial_connection_window_size": 1 << 20,
                               "connection_keepalive": {"interval": "2s", "timeout": "1s"}},
                              protocol_pb2.Http2ProtocolOptions())
    o = http2.H2Options(p)
    assert (o.max_concurrent_streams, o.connection_window, o.keepalive_interval, o.keepalive_timeout) == \
        (5, 1 << 20, 2.0, 1.0)


def test_to_h2_strips_connection_specific_headers():
    h = Headers([(":method", "GET"), (":path", "/"), (":authority", "a"), ("connection", "keep-alive"),
                 ("keep-alive", "5"), ("te", "gzip"), ("transfer-encoding", "chunked"), ("upgrade", "x"),
                 ("x-ok", "caf\u00e9"), ("host", "a")])
    out = http2.to_h2(h)
    assert out == [(":method", "GET"), (":path", "/"), (":authority", "a"), ("x-ok", "caf\u00e9".encode("latin-1"))]
    assert http2.to_h2(Headers([("te", "trailers")])) == [("te", "trailers")]


def test_server_settings_advertised_and_enforced_by_us():
    o = http2.H2Options(json_format.ParseDict({"max_concurrent_streams": 3}, protocol_pb2.Http2ProtocolOptions()))
    c = http2.new_h2(False, o)
    data = c.data_to_send()
    # SETTINGS_MAX_CONCURRENT_STREAMS (0x3) = 3 is on the wire...
    assert b"\x00\x03\x00\x00\x00\x03" in data
    # ...while h2 itself is given a looser limit so we can answer REFUSED_STREAM per stream
    assert c.local_settings.max_concurrent_streams == 2 ** 31 - 1


@pytest.mark.parametrize("split", [1, 2, 3, 5, 7, 64])
def test_grpc_frame_counter(split):
    msgs = [b"", b"a", b"b" * 300, b"c" * 70000]
    wire = b"".join(b"\x00" + len(m).to_bytes(4, "big") + m for m in msgs)
    fc = _FrameCounter()
    for i in range(0, len(wire), split):
        fc.feed(wire[i:i + split])
    assert fc.count == 4 and fc.skip == 0 and fc.head == b""
