"""Listener filters (tls_inspector, http_inspector, original_dst), their timeouts and filter_disabled,
and filter-chain precedence with Istio's real virtualInbound chains.

Unit tests feed bytes (real ClientHellos produced by Python's ssl module); integration tests run a
pyproxy Server in-process on 127.0.0.1 with tcp_proxy chains towards recording upstreams, so the
bytes each upstream receives prove that inspection consumed nothing.
"""

import asyncio
import json
import os
import socket
import ssl
import time

import pytest
from envoy.config.listener.v3 import listener_components_pb2
from google.protobuf import json_format

from pyproxy.config import ConfigError
from pyproxy.config.bootstrap import to_message
from pyproxy.filters.listener import http_inspector as hi
from pyproxy.filters.listener import tls_inspector as ti
from pyproxy.listeners.chain_match import ConnInfo, select_chain
from pyproxy.listeners.listener import ChainMatch, compile_predicate

TESTDATA = "/work/shared/testdata/istio"
if not os.path.isdir(TESTDATA):
    TESTDATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "testdata", "istio")

needs_istio_testdata = pytest.mark.skipif(not os.path.isdir(TESTDATA), reason="Istio testdata not available")

TLS = "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"
HTTPI = "type.googleapis.com/envoy.extensions.filters.listener.http_inspector.v3.HttpInspector"
TCP = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"


# -------------------------------------------------------------------------------------------
# helpers shared with the other sidecar tests

def client_hello(server_name=None, alpn=None) -> bytes:
    """The real first flight of a Python TLS client (a ClientHello record)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


def refragment(record: bytes, cut: int) -> bytes:
    """Split one handshake record into two records at ``cut`` bytes of its body."""
    body = record[5:5 + int.from_bytes(record[3:5], "big")]
    hdr = record[:3]
    a, b = body[:cut], body[cut:]
    return hdr + len(a).to_bytes(2, "big") + a + hdr + len(b).to_bytes(2, "big") + b


def cluster(name, port, host="127.0.0.1", **extra):
    c = {"name": name, "type": "STATIC", "connect_timeout": "1s",
         "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
             {"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}]}]}}
    c.update(extra)
    return c


def tcp_chain(cluster_name, match=None, name=None):
    fc = {"filters": [{"name": "envoy.filters.network.tcp_proxy",
                       "typed_config": {"@type": TCP, "stat_prefix": cluster_name, "cluster": cluster_name}}]}
    if match is not None:
        fc["filter_chain_match"] = match
    if name:
        fc["name"] = name
    return fc


def bootstrap(listeners, clusters, admin=False):
    from envoy.config.bootstrap.v3 import bootstrap_pb2
    d = {"static_resources": {"listeners": listeners, "clusters": clusters}}
    if admin:
        d["admin"] = {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}}
    bs = bootstrap_pb2.Bootstrap()
    to_message(d, bs, allow_unknown=False, what="test bootstrap")
    return bs


class Upstream:
    """A TCP server that records what each connection sent; replies ``<name>:`` + the bytes,
    or speaks first with ``greeting``."""

    def __init__(self, name, greeting=None):
        self.name = name
        self.greeting = greeting
        self.received = []  # per connection: bytearray
        self.peers = []
        self.server = None
        self.port = 0

    async def start(self):
        async def handle(r, w):
            buf = bytearray()
            self.received.append(buf)
            self.peers.append(w.get_extra_info("peername"))
            if self.greeting:
                w.write(self.greeting)
            first = True
            try:
                while True:
                    d = await r.read(65536)
                    if not d:
                        break
                    buf += d
                    w.write((self.name.encode() + b":" if first else b"") + d)
                    first = False
                    await w.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                w.close()
        self.server = await asyncio.start_server(handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def close(self):
        if self.server is not None:
            self.server.close()


async def start_server(bs, drain_time_s=1):
    from pyproxy import extensions, access_log  # noqa: F401
    from pyproxy.server import Options, Server
    srv = Server(bs, Options(drain_time_s=drain_time_s), asyncio.get_running_loop())
    await srv.start()
    return srv


def listener_port(srv, name):
    al = srv.listener_manager.active[name]
    return al.sock.getsockname()[1] if al.sock is not None else al.config.port


async def exchange(port, payload, *, read_timeout=2.0, half_close=False, expect=None):
    """Connect, send payload, read until EOF/timeout (or until ``expect`` bytes arrived)."""
    r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 2)
    if payload:
        w.write(payload)
    if half_close:
        w.write_eof()
    got = bytearray()
    deadline = time.monotonic() + read_timeout
    try:
        while time.monotonic() < deadline:
            try:
                d = await asyncio.wait_for(r.read(65536), deadline - time.monotonic())
            except asyncio.TimeoutError:
                break
            if not d:
                break
            got += d
            if expect is not None and len(got) >= expect:
                break
    except ConnectionError:
        pass
    finally:
        w.close()
    return bytes(got)


def run(coro, timeout=20):
    async def bounded():
        return await asyncio.wait_for(coro, timeout)
    return asyncio.run(bounded())


# -------------------------------------------------------------------------------------------
# tls_inspector: parsing

def test_client_hello_sni_and_alpn_from_real_handshake():
    rec = client_hello("Foo.Example.COM", ["istio-peer-exchange", "istio"])
    ch = ti.parse_client_hello(rec)
    assert isinstance(ch, ti.ClientHello)
    assert ch.server_name == "foo.example.com"
    assert ch.alpn == ("istio-peer-exchange", "istio")


def test_client_hello_without_sni_or_alpn():
    ch = ti.parse_client_hello(client_hello())
    assert isinstance(ch, ti.ClientHello) and ch.server_name == "" and ch.alpn == ()


def test_client_hello_needs_more_until_complete_and_spans_records():
    rec = client_hello("a.b", ["h2", "http/1.1"])
    for n in (1, 3, 5, 9, len(rec) - 1):
        assert ti.parse_client_hello(rec[:n]) is ti.NEED_MORE, n
    two = refragment(rec, 40)
    assert ti.parse_client_hello(two[:60]) is ti.NEED_MORE
    ch = ti.parse_client_hello(two)
    assert ch.server_name == "a.b" and ch.alpn == ("h2", "http/1.1")


@pytest.mark.parametrize("data", [b"GET / HTTP/1.1\r\n", b"\x16\x02\x00", b"\x17\x03\x03\x00\x10",
                                  b"SSH-2.0-OpenSSH\r\n", b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00"])
def test_not_tls(data):
    assert ti.parse_client_hello(data) is ti.NOT_TLS


def test_client_hello_larger_than_limit_is_not_parsed():
    rec = client_hello("x.y")
    assert ti.parse_client_hello(rec, max_size=64) is ti.NOT_TLS


def test_max_client_hello_size_above_64k_rejected():
    from envoy.extensions.filters.listener.tls_inspector.v3 import tls_inspector_pb2
    cfg = tls_inspector_pb2.TlsInspector()
    cfg.max_client_hello_size.value = 65537
    with pytest.raises(ConfigError, match="greater than maximum"):
        ti.TlsInspector(cfg, None)


# -------------------------------------------------------------------------------------------
# http_inspector: detection

@pytest.mark.parametrize("data,want", [
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "http/1.1"),
    (b"POST /a?b HTTP/1.0\r\n", "http/1.0"),
    (b"M-SEARCH * HTTP/1.1\r\n", "http/1.1"),
    (hi.H2_PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00", "h2c"),
    (b"GET / HTTP/2.0\r\n", None),
    (b"GET /\r\n", None),
    (b"HELLO / HTTP/1.1\r\n", None),
    (b"\x16\x03\x01\x02\x00", None),
    (b"get / HTTP/1.1\r\n", None),
    (b"SSH-2.0-OpenSSH_9.6\r\n", None),
])
def test_http_detect(data, want):
    assert hi.detect(data) == want


@pytest.mark.parametrize("data", [b"G", b"GE", b"GET", b"GET ", b"GET /index.html HT", b"PRI * HTTP/2",
                                  b"P", b"PO", b"M-SEA"])
def test_http_detect_needs_more(data):
    assert hi.detect(data) is hi.NEED_MORE


def test_http_detect_gives_up_on_endless_line():
    assert hi.detect(b"GET /" + b"a" * hi.MAX_INSPECT) is None


# -------------------------------------------------------------------------------------------
# filter_disabled predicates

def _pred(d):
    m = listener_components_pb2.ListenerFilter()
    json_format.ParseDict({"name": "x", "filter_disabled": d}, m)
    return compile_predicate(m.filter_disabled)


def test_filter_disabled_predicates_as_istio_writes_them():
    tls = _pred({"destination_port_range": {"start": 15006, "end": 15007}})
    http = _pred({"or_match": {"rules": [{"destination_port_range": {"start": 80, "end": 81}},
                                         {"destination_port_range": {"start": 15006, "end": 15007}}]}})
    assert tls(ConnInfo(dst_port=15006)) and not tls(ConnInfo(dst_port=15007))
    assert http(ConnInfo(dst_port=80)) and http(ConnInfo(dst_port=15006)) and not http(ConnInfo(dst_port=8080))
    assert _pred({"not_match": {"any_match": True}})(ConnInfo()) is False
    both = _pred({"and_match": {"rules": [{"destination_port_range": {"start": 1, "end": 100}},
                                          {"not_match": {"destination_port_range": {"start": 80, "end": 81}}}]}})
    assert both(ConnInfo(dst_port=79)) and not both(ConnInfo(dst_port=80))
    with pytest.raises(ConfigError):
        _pred({"destination_port_range": {"start": 10, "end": 10}})
    with pytest.raises(ConfigError):
        _pred({"or_match": {"rules": [{"any_match": True}]}})


# -------------------------------------------------------------------------------------------
# filter-chain precedence with Istio's virtualInbound

def _istio_listener(name):
    with open(os.path.join(TESTDATA, "sidecar-listeners-configdump.json")) as f:
        dump = json.load(f)
    for c in dump["configs"]:
        for dl in c.get("dynamic_listeners", []):
            l = dl["active_state"]["listener"]
            if l["name"] == name:
                return l
    raise AssertionError(name)


class _Chain:
    def __init__(self, i, fc):
        m = listener_components_pb2.FilterChain()
        json_format.ParseDict({"filter_chain_match": fc.get("filter_chain_match", {})}, m,
                              ignore_unknown_fields=True)
        self.match = ChainMatch(m.filter_chain_match)
        self.index = i
        self.name = fc.get("name", "")
        self.filters = [f["name"] for f in fc["filters"]]


def _chains(name):
    l = _istio_listener(name)
    return [_Chain(i, fc) for i, fc in enumerate(l["filter_chains"])]


@needs_istio_testdata
@pytest.mark.parametrize("dst_port,tp,alpn,want_index", [
    # destination port first: 15006 is the blackhole whatever the protocol
    (15006, "raw_buffer", ("http/1.1",), 0),
    (15006, "tls", ("istio",), 0),
    # then transport protocol, then ALPN
    (8080, "tls", ("istio-http/1.1",), 1),
    (8080, "tls", ("istio-h2", "istio-http/1.1"), 1),
    (8080, "raw_buffer", ("http/1.1",), 2),
    (8080, "raw_buffer", ("h2c",), 2),
    (8080, "tls", ("istio-peer-exchange", "istio"), 3),
    (8080, "raw_buffer", (), 4),
    (8080, "raw_buffer", ("http/1.0",), 4),   # http/1.0 is not in Istio's catch-all http chain
    (8080, "tls", ("h2",), 5),
    (8080, "tls", (), 5),
    # port 80 has its own chains (destination_port beats prefix_ranges)
    (80, "tls", ("istio-http/1.1",), 6),
    (80, "tls", ("istio",), 6),
    (80, "raw_buffer", ("http/1.1",), 7),
    (80, "raw_buffer", (), 7),
])
def test_virtual_inbound_precedence(dst_port, tp, alpn, want_index):
    chains = _chains("virtualInbound")
    info = ConnInfo(dst_ip="10.244.0.17", dst_port=dst_port, src_ip="10.244.0.9", src_port=41000,
                    transport_protocol=tp, application_protocols=alpn)
    c = select_chain(chains, info)
    assert c is not None and c.index == want_index, (c and c.name, c and c.index)


@needs_istio_testdata
def test_virtual_inbound_tls_to_port_80_without_istio_alpn_matches_nothing():
    # Envoy does not fall back to the port-less chains once the destination port matched
    chains = _chains("virtualInbound")
    info = ConnInfo(dst_ip="10.244.0.17", dst_port=80, transport_protocol="tls", application_protocols=("h2",))
    assert select_chain(chains, info) is None


@needs_istio_testdata
def test_virtual_outbound_15001_goes_to_blackhole_chain():
    l = _istio_listener("virtualOutbound")
    chains = _chains("virtualOutbound")
    bh = [fc for fc in l["filter_chains"] if fc.get("name") == "virtualOutbound-blackhole"][0]
    assert bh["filter_chain_match"] == {"destination_port": 15001}
    tcp = [f for f in bh["filters"] if f["name"] == "envoy.filters.network.tcp_proxy"][0]
    assert tcp["typed_config"]["cluster"] == "BlackHoleCluster"
    c = select_chain(chains, ConnInfo(dst_ip="10.1.2.3", dst_port=15001))
    assert c.name == "virtualOutbound-blackhole"
    c = select_chain(chains, ConnInfo(dst_ip="10.1.2.3", dst_port=3306))
    assert c.name == "virtualOutbound-catchall-tcp"


def test_precedence_server_names_before_transport_and_source():
    def ch(i, m):
        return _Chain(i, {"filter_chain_match": m, "filters": [{"name": "x"}]})
    chains = [ch(0, {"server_names": ["*.example.com"]}),
              ch(1, {"server_names": ["api.example.com"]}),
              ch(2, {"transport_protocol": "tls"}),
              ch(3, {"source_prefix_ranges": [{"address_prefix": "10.0.0.0", "prefix_len": 8}]}),
              ch(4, {"server_names": ["*.b.example.com"]}),
              ch(5, {"source_ports": [1234]}),
              ch(6, {"prefix_ranges": [{"address_prefix": "192.168.1.0", "prefix_len": 24}]}),
              ch(7, {"prefix_ranges": [{"address_prefix": "192.168.0.0", "prefix_len": 16}],
                     "source_type": "SAME_IP_OR_LOOPBACK"})]
    sel = lambda **kw: select_chain(chains, ConnInfo(**kw)).index  # noqa: E731
    assert sel(server_name="api.example.com", transport_protocol="tls") == 1
    assert sel(server_name="x.example.com", transport_protocol="tls") == 0
    assert sel(server_name="x.b.example.com") == 4                    # longest wildcard
    assert sel(server_name="other.org", transport_protocol="tls") == 2  # SNI chains don't match
    assert sel(src_ip="10.1.1.1", src_port=1234) == 3                 # source IP before port
    assert sel(src_ip="11.1.1.1", src_port=1234) == 5
    assert sel(dst_ip="192.168.1.9", src_ip="1.1.1.1") == 6           # longest destination prefix
    assert sel(dst_ip="192.168.2.9", src_ip="127.0.0.1") == 7
    assert select_chain(chains, ConnInfo(dst_ip="192.168.2.9", src_ip="1.1.1.1")) is None


# -------------------------------------------------------------------------------------------
# integration: a real listener with inspectors

def _inspecting_listener(port=0, timeout="2s", cont=True, disabled=None):
    lfs = [{"name": "envoy.filters.listener.tls_inspector", "typed_config": {"@type": TLS}},
           {"name": "envoy.filters.listener.http_inspector", "typed_config": {"@type": HTTPI}}]
    if disabled:
        for lf in lfs:
            lf["filter_disabled"] = disabled
    return {
        "name": "inspect",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "listener_filters": lfs,
        "listener_filters_timeout": timeout,
        "continue_on_listener_filters_timeout": cont,
        "filter_chains": [
            tcp_chain("tls_h2", {"transport_protocol": "tls", "application_protocols": ["h2"]}),
            tcp_chain("tls_sni", {"transport_protocol": "tls", "server_names": ["svc.example.com"]}),
            tcp_chain("tls_any", {"transport_protocol": "tls"}),
            tcp_chain("http1", {"transport_protocol": "raw_buffer", "application_protocols": ["http/1.1", "http/1.0"]}),
            tcp_chain("h2c", {"transport_protocol": "raw_buffer", "application_protocols": ["h2c"]}),
        ],
        "default_filter_chain": tcp_chain("raw"),
    }


NAMES = ("tls_h2", "tls_sni", "tls_any", "http1", "h2c", "raw")


async def _with_inspecting_proxy(body, **lkw):
    ups = {n: await Upstream(n).start() for n in NAMES}
    bs = bootstrap([_inspecting_listener(**lkw)], [cluster(n, u.port) for n, u in ups.items()])
    srv = await start_server(bs)
    try:
        return await body(srv, listener_port(srv, "inspect"), ups)
    finally:
        await srv.close()
        for u in ups.values():
            u.close()


def test_inspectors_route_by_protocol_and_consume_nothing():
    hello_h2 = client_hello("h2.example.org", ["h2", "http/1.1"])
    # (server_names is matched before ALPN: an SNI of svc.example.com would pick tls_sni)
    hello_sni = refragment(client_hello("svc.example.com"), 30)
    hello_plain = client_hello("other.example.com", ["istio"])
    req = b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n"
    req10 = b"HEAD / HTTP/1.0\r\n\r\n"
    h2 = hi.H2_PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
    opaque = b"\x00\x01binary\xffstuff\r\n"

    async def body(srv, port, ups):
        cases = [(hello_h2, "tls_h2"), (hello_sni, "tls_sni"), (hello_plain, "tls_any"),
                 (req, "http1"), (req10, "http1"), (h2, "h2c"), (opaque, "raw")]
        for payload, want in cases:
            got = await exchange(port, payload, expect=len(want) + 1 + len(payload))
            assert got == want.encode() + b":" + payload, (want, got[:40])
            assert bytes(ups[want].received[-1]) == payload
        # the request line arriving one byte at a time is still recognised
        r, w = await asyncio.open_connection("127.0.0.1", port)
        for b in req[:20]:
            w.write(bytes([b]))
            await w.drain()
            await asyncio.sleep(0.005)
        w.write(req[20:])
        got = await asyncio.wait_for(r.readexactly(len(b"http1:") + len(req)), 3)
        w.close()
        assert got.startswith(b"http1:")
        st = srv.stats
        assert st.counter("tls_inspector.tls_found").value == 3
        assert st.counter("tls_inspector.sni_found").value == 3
        assert st.counter("tls_inspector.alpn_found").value == 2
        assert st.counter("http_inspector.http11_found").value == 2
        assert st.counter("http_inspector.http10_found").value == 1
        assert st.counter("http_inspector.http2_found").value == 1
    run(_with_inspecting_proxy(body))


def test_short_request_with_half_close_passes_through():
    async def body(srv, port, ups):
        got = await exchange(port, b"GE", half_close=True)
        assert got == b"raw:GE"
        assert bytes(ups["raw"].received[-1]) == b"GE"
    run(_with_inspecting_proxy(body))


def test_filter_disabled_skips_inspectors():
    async def body(srv, port, ups):
        got = await exchange(port, b"GET / HTTP/1.1\r\n\r\n", expect=6)
        assert got.startswith(b"raw:"), got
    # both inspectors disabled for every port: nothing detected, default chain
    run(_with_inspecting_proxy(body, disabled={"destination_port_range": {"start": 1, "end": 65536}}))


def _server_first(timeout, cont):
    async def main():
        up = await Upstream("mysql", greeting=b"J\x00\x00\x00\x0a8.0.36\x00").start()
        lst = {
            "name": "db", "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
            "listener_filters": [
                {"name": "envoy.filters.listener.tls_inspector", "typed_config": {"@type": TLS}},
                {"name": "envoy.filters.listener.http_inspector", "typed_config": {"@type": HTTPI}}],
            "listener_filters_timeout": timeout, "continue_on_listener_filters_timeout": cont,
            "filter_chains": [tcp_chain("mysql", {"application_protocols": ["http/1.1"]})],
            "default_filter_chain": tcp_chain("mysql"),
        }
        srv = await start_server(bootstrap([lst], [cluster("mysql", up.port)]))
        try:
            port = listener_port(srv, "db")
            t0 = time.monotonic()
            r, w = await asyncio.open_connection("127.0.0.1", port)
            try:
                greeting = await asyncio.wait_for(r.read(100), 2.0)
            except asyncio.TimeoutError:
                greeting = None
            elapsed = time.monotonic() - t0
            w.close()
            return greeting, elapsed, srv.stats.counter("listener.127.0.0.1_%d.downstream_pre_cx_timeout" % port).value
        finally:
            await srv.close()
            up.close()
    return run(main())


def test_server_first_protocol_continues_after_listener_filters_timeout():
    greeting, elapsed, timeouts = _server_first("0.2s", True)
    assert greeting == b"J\x00\x00\x00\x0a8.0.36\x00"
    assert 0.15 < elapsed < 1.5
    assert timeouts == 1


def test_server_first_protocol_closed_when_timeout_without_continue():
    greeting, elapsed, timeouts = _server_first("0.2s", False)
    assert greeting == b""  # closed by the proxy, nothing from the server
    assert elapsed < 1.5 and timeouts == 1


def test_listener_filters_timeout_zero_waits_for_the_client():
    # Istio sends listener_filters_timeout: 0s (no timeout): a server-first protocol waits, as in Envoy
    greeting, elapsed, timeouts = _server_first("0s", True)
    assert greeting is None and timeouts == 0


def test_original_dst_factory_and_ipv6_getsockopt_fallback():
    from pyproxy.filters.listener import original_dst
    from pyproxy.listeners.connection import original_dst as od
    f = original_dst.factory(None, None)
    assert f.needs_data is False
    # not redirected: no conntrack entry (or not NATed) -> None or the socket's own address
    for fam, addr in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        try:
            srv = socket.socket(fam, socket.SOCK_STREAM)
        except OSError:
            continue
        try:
            srv.bind((addr, 0))
            srv.listen(1)
            c = socket.create_connection((addr, srv.getsockname()[1]), timeout=2)
            s, _ = srv.accept()
            got = od(s)
            assert got is None or got == (addr, srv.getsockname()[1])
            s.close()
            c.close()
        finally:
            srv.close()
