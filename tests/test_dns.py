"""DNS clusters: a real UDP DNS server on 127.0.0.1 (started by each test) and /etc/hosts.

System-resolver tests only use IPv4 lookups of ``localhost`` (answered from /etc/hosts, so no query
leaves the machine) and IP literals.
"""

import asyncio
import socket
import struct
import time

import pytest
from google.protobuf import json_format
from envoy.config.cluster.v3 import cluster_pb2

from pyproxy.cluster import dns as D
from pyproxy.config.errors import ConfigError


class TinyDns(asyncio.DatagramProtocol):
    """Answers A/AAAA from ``records[name][qtype]``; ``mode`` may be 'ok', 'servfail', 'drop'."""

    def __init__(self):
        self.records = {}
        self.mode = "ok"
        self.queries = []

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        qid, _flags = struct.unpack_from("!HH", data)
        off, labels = 12, []
        while data[off]:
            n = data[off]
            labels.append(data[off + 1:off + 1 + n].decode())
            off += 1 + n
        qend = off + 5
        name = ".".join(labels)
        qtype = struct.unpack_from("!H", data, off + 1)[0]
        self.queries.append((name, qtype))
        if self.mode == "drop":
            return
        rcode, answers = 0, []
        if self.mode == "servfail":
            rcode = 2
        elif name not in self.records:
            rcode = 3
        else:
            answers = self.records[name].get(qtype, [])
        out = bytearray(struct.pack("!HHHHHH", qid, 0x8180 | rcode, 1, len(answers), 0, 0))
        out += data[12:qend]
        fam = socket.AF_INET if qtype == 1 else socket.AF_INET6
        for a in answers:
            rd = socket.inet_pton(fam, a)
            out += struct.pack("!HHHIH", 0xC00C, qtype, 1, 30, len(rd)) + rd
        self.transport.sendto(bytes(out), addr)


@pytest.fixture
def dns_server():
    loop = asyncio.new_event_loop()
    proto = TinyDns()
    transport, _ = loop.run_until_complete(loop.create_datagram_endpoint(
        lambda: proto, local_addr=("127.0.0.1", 0)))
    proto.port = transport.get_extra_info("sockname")[1]
    try:
        yield loop, proto
    finally:
        transport.close()
        loop.run_until_complete(asyncio.sleep(0))
        loop.close()


def run(loop, coro, timeout=5):
    return loop.run_until_complete(asyncio.wait_for(coro, timeout))


def test_system_resolver_etc_hosts_and_literals():
    async def main():
        r = D.DnsResolver(timeout=3)
        assert await r.resolve("localhost", D.V4_ONLY) == ["127.0.0.1"]
        assert await r.resolve("10.1.2.3", D.AUTO) == ["10.1.2.3"]
        assert await r.resolve("10.1.2.3", D.V6_ONLY) == []
        assert await r.resolve("::1", D.ALL) == ["::1"]
        with pytest.raises(ConfigError):
            await r.resolve("localhost", 9)
    asyncio.run(asyncio.wait_for(main(), 10))


def test_udp_resolver_families(dns_server):
    loop, srv = dns_server
    srv.records = {"both.test": {1: ["10.0.0.1", "10.0.0.2"], 28: ["2001:db8::1"]},
                   "v4.test": {1: ["10.0.0.9"]}, "v6.test": {28: ["2001:db8::9"]}}
    r = D.DnsResolver([("127.0.0.1", srv.port)], timeout=1)
    assert run(loop, r.resolve("both.test", D.V4_ONLY)) == ["10.0.0.1", "10.0.0.2"]
    assert run(loop, r.resolve("both.test", D.V6_ONLY)) == ["2001:db8::1"]
    assert run(loop, r.resolve("both.test", D.AUTO)) == ["2001:db8::1"]
    assert run(loop, r.resolve("v4.test", D.AUTO)) == ["10.0.0.9"]
    assert run(loop, r.resolve("both.test", D.V4_PREFERRED)) == ["10.0.0.1", "10.0.0.2"]
    assert run(loop, r.resolve("v6.test", D.V4_PREFERRED)) == ["2001:db8::9"]
    assert run(loop, r.resolve("both.test", D.ALL)) == ["10.0.0.1", "10.0.0.2", "2001:db8::1"]
    assert run(loop, r.resolve("missing.test", D.V4_ONLY)) == []  # NXDOMAIN: no addresses
    assert ("both.test", 28) in srv.queries and ("both.test", 1) in srv.queries
    srv.mode = "servfail"
    with pytest.raises(D.DnsError, match="rcode 2"):
        run(loop, r.resolve("both.test", D.V4_ONLY))


def test_udp_resolver_timeout_does_not_block_loop(dns_server):
    loop, srv = dns_server
    srv.mode = "drop"
    srv.records = {"a.test": {1: ["10.0.0.1"]}}
    r = D.DnsResolver([("127.0.0.1", srv.port)], timeout=0.2, attempts=2)
    ticks = []

    async def ticker():
        while True:
            ticks.append(time.monotonic())
            await asyncio.sleep(0.02)

    async def main():
        t = asyncio.ensure_future(ticker())
        try:
            t0 = time.monotonic()
            with pytest.raises(D.DnsError, match="timed out"):
                await r.resolve("a.test", D.V4_ONLY)
            return time.monotonic() - t0
        finally:
            t.cancel()
    took = run(loop, main())
    assert 0.35 < took < 1.5
    assert len(ticks) >= 10  # the loop kept running while waiting
    assert len(srv.queries) == 2


def cluster(d):
    return json_format.ParseDict(dict({"name": "dnsc", "connect_timeout": "1s"}, **d),
                                 cluster_pb2.Cluster())


def ep(addr, port=80):
    return {"endpoint": {"address": {"socket_address": {"address": addr, "port_value": port}}}}


def test_strict_dns_refresher_updates_only_on_change(dns_server):
    loop, srv = dns_server
    srv.records = {"a.test": {1: ["10.0.0.1", "10.0.0.2"]}, "b.test": {1: ["10.0.1.1"]}}
    c = cluster({"type": "STRICT_DNS", "dns_lookup_family": "V4_ONLY",
                 "dns_refresh_rate": "0.05s",
                 "dns_resolvers": [{"socket_address": {"address": "127.0.0.1",
                                                       "port_value": srv.port}}],
                 "load_assignment": {"cluster_name": "dnsc", "endpoints": [
                     {"lb_endpoints": [ep("a.test", 8080), ep("b.test", 9090)]}]}})
    seen = []
    ref = D.DnsRefresher(c, seen.append)

    async def wait_for(pred):
        while not pred():
            await asyncio.sleep(0.01)

    async def main():
        ref.start()
        try:
            await wait_for(lambda: len(seen) == 1)
            ps = seen[0]
            assert [h.key for h in ps.all_hosts] == ["10.0.0.1:8080", "10.0.0.2:8080",
                                                      "10.0.1.1:9090"]
            assert ps.all_hosts[0].hostname == "a.test"
            n = ref.resolutions
            await wait_for(lambda: ref.resolutions >= n + 3)
            assert len(seen) == 1  # nothing changed: no callback
            srv.records["a.test"] = {1: ["10.0.0.3"]}
            await wait_for(lambda: len(seen) == 2)
            assert [h.key for h in seen[1].all_hosts] == ["10.0.0.3:8080", "10.0.1.1:9090"]
            # Failures keep the last addresses and back off.
            srv.mode = "servfail"
            n = ref.resolutions
            await wait_for(lambda: ref.resolutions >= n + 2)
            assert len(seen) == 2 and ref._failures >= 1
            srv.mode = "ok"
            del srv.records["b.test"]  # NXDOMAIN now: its hosts go away
            await wait_for(lambda: len(seen) == 3)
            assert [h.key for h in seen[2].all_hosts] == ["10.0.0.3:8080"]
        finally:
            ref.stop()
        assert not ref.running
        n = ref.resolutions
        await asyncio.sleep(0.2)
        assert ref.resolutions == n  # stopped for good
    run(loop, main(), timeout=10)


def test_logical_dns_and_validation(dns_server):
    loop, srv = dns_server
    srv.records = {"l.test": {1: ["10.2.0.1", "10.2.0.2"]}}
    res = D.DnsResolver([("127.0.0.1", srv.port)], timeout=1)
    c = cluster({"type": "LOGICAL_DNS", "dns_lookup_family": "V4_ONLY",
                 "load_assignment": {"endpoints": [{"lb_endpoints": [ep("l.test", 443)]}]}})
    ref = D.DnsRefresher(c, lambda ps: None, resolver=res)
    ps, ok, changed = run(loop, ref.resolve_once())
    assert ok and changed and [h.key for h in ps.all_hosts] == ["10.2.0.1:443"]
    assert ps.all_hosts[0].hostname == "l.test"
    ps, ok, changed = run(loop, ref.resolve_once())
    assert ok and not changed

    two = cluster({"type": "LOGICAL_DNS", "load_assignment": {"endpoints": [
        {"lb_endpoints": [ep("l.test"), ep("m.test")]}]}})
    with pytest.raises(ConfigError, match="LOGICAL_DNS clusters must have a single "
                                          "locality_lb_endpoint and a single lb_endpoint"):
        D.DnsRefresher(two, lambda ps: None)
    pipe = cluster({"type": "STRICT_DNS", "load_assignment": {"endpoints": [{"lb_endpoints": [
        {"endpoint": {"address": {"pipe": {"path": "/tmp/x"}}}}]}]}})
    with pytest.raises(ConfigError, match="not pipes"):
        D.DnsRefresher(pipe, lambda ps: None)
    noport = cluster({"type": "STRICT_DNS", "load_assignment": {"endpoints": [{"lb_endpoints": [
        {"endpoint": {"address": {"socket_address": {"address": "x.test"}}}}]}]}})
    with pytest.raises(ConfigError) as ei:
        D.DnsRefresher(noport, lambda ps: None)
    assert ei.value.field.endswith("socket_address.port_value")
    with pytest.raises(ConfigError):
        D.DnsRefresher(cluster({"type": "EDS"}), lambda ps: None)


def test_failure_backoff_intervals():
    c = cluster({"type": "STRICT_DNS", "dns_refresh_rate": "5s",
                 "dns_failure_refresh_rate": {"base_interval": "1s", "max_interval": "3s"},
                 "load_assignment": {"endpoints": [{"lb_endpoints": [ep("localhost")]}]}})
    ref = D.DnsRefresher(c, lambda ps: None)
    assert [ref.next_interval(False) for _ in range(4)] == [1, 2, 3, 3]
    assert ref.next_interval(True) == 5 and ref.next_interval(False) == 1
    bad = cluster({"type": "STRICT_DNS", "dns_failure_refresh_rate": {
        "base_interval": "2s", "max_interval": "1s"}})
    with pytest.raises(ConfigError, match="max_interval"):
        D.DnsRefresher(bad, lambda ps: None)


def test_refresher_system_resolver_localhost():
    c = cluster({"type": "STRICT_DNS", "dns_lookup_family": "V4_ONLY",
                 "load_assignment": {"endpoints": [{"lb_endpoints": [ep("localhost", 1234),
                                                                     ep("127.0.0.5", 80)]}]}})
    got = []

    async def main():
        ref = D.DnsRefresher(c, got.append)
        ref.start()
        try:
            while not got:
                await asyncio.sleep(0.01)
        finally:
            ref.stop()
    asyncio.run(asyncio.wait_for(main(), 10))
    assert [h.key for h in got[0].all_hosts] == ["127.0.0.1:1234", "127.0.0.5:80"]
    assert got[0].all_hosts[0].hostname == "localhost"
