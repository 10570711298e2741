"""A cluster's ``upstream_connection_options.tcp_keepalive`` (Istio's bootstrap sets it on xds-grpc;
DestinationRule ``connectionPool.tcp.tcpKeepalive`` on service clusters), side by side with Envoy
(review finding F48): the upstream socket has SO_KEEPALIVE with the configured idle time (``ss -o``
shows its keepalive timer); without the option, none."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess

import pytest

from proxy_util import (ENVOY, Envoy, HttpBackend, Pyproxy, bootstrap, cluster, free_port, http_listener, route,
                        route_config, with_fresh_ports)

pytestmark = [pytest.mark.skipif(not ENVOY, reason="envoy not installed"),
              pytest.mark.skipif(not shutil.which("ss"), reason="ss not installed")]


def _timer(cluster_extra):
    """For pyproxy and Envoy: the ``ss -o`` timer of the idle upstream connection after one request."""
    out = {}
    for name, cls in (("pyproxy", Pyproxy), ("envoy", Envoy)):
        be = HttpBackend()
        try:
            bs = bootstrap([http_listener(free_port(), route_config([route("/", "b")]))],
                           [cluster("b", [be.port], **cluster_extra)])
            with cls(with_fresh_ports(bs)) as p:
                s = socket.create_connection(("127.0.0.1", p.port), timeout=5)
                try:
                    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                    assert s.recv(65536).startswith(b"HTTP/1.1 200")
                finally:
                    s.close()
                ss = subprocess.run(["ss", "-tnoH", "state", "established", "( dport = :%d )" % be.port],
                                    capture_output=True, text=True, timeout=10).stdout
                m = re.search(r"timer:\((\w+),(?:(\d+)min)?(?:(\d+)sec)?", ss)
                out[name] = (m.group(1), int(m.group(2) or 0) * 60 + int(m.group(3) or 0)) if m else None
        finally:
            be.close()
    return out


def test_tcp_keepalive_sets_the_keepalive_timer():
    res = _timer({"upstream_connection_options": {"tcp_keepalive": {
        "keepalive_time": 300, "keepalive_interval": 75, "keepalive_probes": 9}}})
    # (300 s idle: ss shows what is left of it, 5min or 4minNNsec depending on when it looks; the
    # kernel's default would be 7200 s)
    for name in ("pyproxy", "envoy"):
        assert res[name] is not None and res[name][0] == "keepalive" and 240 <= res[name][1] <= 300, res


def test_no_tcp_keepalive_no_timer():
    res = _timer({})
    assert res["pyproxy"] == res["envoy"] == None, res  # noqa: E711
