"""Istio's special clusters on a real in-process pyproxy: BlackHoleCluster, PassthroughCluster /
InboundPassthroughCluster (ORIGINAL_DST) and the inbound source address 127.0.0.6
(``upstream_bind_config``). ORIGINAL_DST by the connection's real original destination (iptables)
is covered in tests/test_sidecar_e2e.py; here it is driven by ``x-envoy-original-dst-host``
(``use_http_header``), which exercises the same cluster code without NAT.
"""

import asyncio
import json

from tests.test_listener_filters import (Upstream, bootstrap, cluster, exchange, listener_port, run,
                                         start_server, tcp_chain)

HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"


def http_listener(name, routes):
    return {
        "name": name, "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": {
            "@type": HCM, "stat_prefix": name,
            "route_config": {"name": name, "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes}]},
            "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}}]}}]}],
    }


def tcp_listener(name, cluster_name):
    return {"name": name, "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
            "filter_chains": [tcp_chain(cluster_name)]}


BLACKHOLE = {"name": "BlackHoleCluster", "type": "STATIC", "connect_timeout": "10s"}  # as Istio sends it


def passthrough(name, source=None, use_header=False):
    c = {"name": name, "type": "ORIGINAL_DST", "connect_timeout": "10s", "lb_policy": "CLUSTER_PROVIDED",
         "circuit_breakers": {"thresholds": [{"max_connections": 4294967295, "max_pending_requests": 4294967295,
                                              "max_requests": 4294967295, "max_retries": 4294967295}]}}
    if source:
        c["upstream_bind_config"] = {"source_address": {"address": source, "port_value": 0}}
    if use_header:
        c["original_dst_lb_config"] = {"use_http_header": True}
    return c


class HttpEcho:
    """HTTP/1.1 server answering every request with JSON {peer, path, host}."""

    def __init__(self):
        self.peers = []

    async def start(self, host="127.0.0.1"):
        async def handle(r, w):
            peer = w.get_extra_info("peername")
            try:
                while True:
                    head = await r.readuntil(b"\r\n\r\n")
                    line, *hdrs = head.decode("latin-1").split("\r\n")
                    h = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in hdrs if x)}
                    n = int(h.get("content-length", "0") or 0)
                    if n:
                        await r.readexactly(n)
                    self.peers.append(peer[0])
                    body = json.dumps({"peer": peer[0], "path": line.split(" ")[1], "host": h.get("host")}).encode()
                    w.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
                            % len(body) + body)
                    await w.drain()
            except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
                pass
            finally:
                w.close()
        self.server = await asyncio.start_server(handle, host, 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def close(self):
        self.server.close()


async def http_get(port, path="/", headers=()):
    r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 2)
    req = "GET %s HTTP/1.1\r\nhost: svc\r\n%s\r\n" % (path, "".join("%s: %s\r\n" % kv for kv in headers))
    w.write(req.encode())
    try:
        head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)
        status = int(head.split(b" ", 2)[1])
        h = {k.lower(): v.strip() for k, _, v in
             (x.partition(b":") for x in head.split(b"\r\n")[1:] if x)}
        n = int(h.get(b"content-length", b"0"))
        body = await asyncio.wait_for(r.readexactly(n), 5)
        return status, body
    finally:
        w.close()


def test_blackhole_cluster_tcp_closes_and_http_503_uh():
    async def main():
        bs = bootstrap([tcp_listener("tcp_bh", "BlackHoleCluster"),
                        http_listener("http_bh", [{"match": {"prefix": "/"}, "route": {"cluster": "BlackHoleCluster"}}])],
                       [BLACKHOLE])
        srv = await start_server(bs)
        try:
            got = await exchange(listener_port(srv, "tcp_bh"), b"hello", read_timeout=2)
            assert got == b""
            st = srv.stats
            assert st.counter("cluster.BlackHoleCluster.upstream_cx_none_healthy").value >= 1
            status, body = await http_get(listener_port(srv, "http_bh"))
            assert status == 503 and body == b"no healthy upstream"
            assert st.counter("cluster.BlackHoleCluster.upstream_cx_total").value == 0
        finally:
            await srv.close()
    run(main())


def test_inbound_source_address_127_0_0_6_tcp_and_http():
    async def main():
        tcp_up = await Upstream("app").start()
        http_up = await HttpEcho().start()
        bs = bootstrap(
            [tcp_listener("in_tcp", "inbound|9000||"),
             http_listener("in_http", [{"match": {"prefix": "/"}, "route": {"cluster": "inbound|8080||"}}])],
            [cluster("inbound|9000||", tcp_up.port,
                     upstream_bind_config={"source_address": {"address": "127.0.0.6", "port_value": 0}}),
             cluster("inbound|8080||", http_up.port,
                     upstream_bind_config={"source_address": {"address": "127.0.0.6", "port_value": 0}})])
        srv = await start_server(bs)
        try:
            got = await exchange(listener_port(srv, "in_tcp"), b"ping", expect=len(b"app:ping"))
            assert got == b"app:ping"
            assert tcp_up.peers[-1][0] == "127.0.0.6"
            status, body = await http_get(listener_port(srv, "in_http"), "/who")
            assert status == 200 and json.loads(body)["peer"] == "127.0.0.6"
        finally:
            await srv.close()
            tcp_up.close()
            http_up.close()
    run(main())


def test_original_dst_cluster_by_header_with_inbound_passthrough_source():
    async def main():
        a, b = await HttpEcho().start(), await HttpEcho().start()
        bs = bootstrap(
            [http_listener("pt", [{"match": {"prefix": "/"}, "route": {"cluster": "InboundPassthroughClusterIpv4"}}])],
            [passthrough("InboundPassthroughClusterIpv4", source="127.0.0.6", use_header=True)])
        srv = await start_server(bs)
        try:
            port = listener_port(srv, "pt")
            for up in (a, b, a):
                status, body = await http_get(port, "/x", [("x-envoy-original-dst-host", "127.0.0.1:%d" % up.port)])
                assert status == 200, body
                assert json.loads(body) == {"peer": "127.0.0.6", "path": "/x", "host": "svc"}
            assert (len(a.peers), len(b.peers)) == (2, 1)
            # no header and no original destination of its own: the listener's address would loop
            # back into the proxy; a bad header is a clean 503, never a crash
            status, _ = await http_get(port, "/x", [("x-envoy-original-dst-host", "not-an-address")])
            assert status == 503
        finally:
            await srv.close()
            a.close()
            b.close()
    run(main())
