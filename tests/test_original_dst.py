"""SO_ORIGINAL_DST / IP6T_SO_ORIGINAL_DST recovery (connection.original_dst) on real NAT, IPv4 and IPv6.

In a fresh namespace, iptables/ip6tables REDIRECT loopback connections for port 7777 to a listener;
the listener recovers the pre-NAT destination for: IPv4 on an IPv4 socket, IPv6 on an IPv6 socket,
and IPv4 on a dual-stack IPv6 socket (tracked as IPv4: the v4 option answers, address unmapped).
"""

import json
import sys

from tests.netns import netns_env  # noqa: F401 (fixture)

PROBE = r"""
import json, socket, sys, threading
sys.path.insert(0, sys.argv[1])
from pyproxy.listeners.connection import original_dst
out = {}
def serve(fam, addr, v6only=None):
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if v6only is not None:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, v6only)
    s.bind((addr, 15001)); s.listen(8)
    return s
def one(srv, dst):
    c = socket.create_connection(dst, timeout=5)
    a, _ = srv.accept()
    r = original_dst(a)
    a.close(); c.close()
    return r
v4 = serve(socket.AF_INET, "127.0.0.1")
out["v4"] = one(v4, ("127.0.0.1", 7777))
v4.close()
dual = serve(socket.AF_INET6, "::", v6only=0)
out["v6"] = one(dual, ("::1", 7777))
out["v4_on_dual"] = one(dual, ("127.0.0.1", 7777))
out["direct"] = one(dual, ("::1", 15001))
print(json.dumps(out))
"""


def test_original_dst_ipv4_ipv6_and_dual_stack(netns_env):
    ns = netns_env.netns("odst")
    ns.run(["iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "--dport", "7777", "-j", "REDIRECT",
            "--to-ports", "15001"])
    ns.run(["ip6tables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "--dport", "7777", "-j", "REDIRECT",
            "--to-ports", "15001"])
    import os
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = json.loads(ns.run([sys.executable, "-c", PROBE, repo], timeout=30).stdout)
    assert out["v4"] == ["127.0.0.1", 7777]
    assert out["v6"] == ["::1", 7777]
    assert out["v4_on_dual"] == ["127.0.0.1", 7777]
    # not NATed: conntrack's original tuple is the socket's own address (or nothing)
    assert out["direct"] in (["::1", 15001], None)
