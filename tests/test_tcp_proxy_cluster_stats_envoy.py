"""tcp_proxy and its cluster's request counters, side by side with Envoy (review finding F57): each
TCP connection is a request of the cluster (``upstream_rq_total``, ``upstream_rq_pending_total``) and
its upstream connection's end is counted by side (``upstream_cx_destroy_local`` / ``_remote``, with
an active request). One echo connection the client closes, one the upstream closes."""

from __future__ import annotations

import socket
import time

import pytest

from proxy_util import (ENVOY, Envoy, Pyproxy, TcpBackend, bootstrap, cluster, free_port, tcp_listener,
                        wait_until, with_fresh_ports)

pytestmark = pytest.mark.skipif(not ENVOY, reason="envoy not installed")
KEYS = ("upstream_rq_total", "upstream_rq_pending_total", "upstream_cx_total", "upstream_cx_destroy",
        "upstream_cx_destroy_local", "upstream_cx_destroy_remote", "upstream_cx_destroy_with_active_rq",
        "upstream_cx_destroy_local_with_active_rq", "upstream_cx_destroy_remote_with_active_rq",
        "upstream_rq_active", "upstream_cx_active")


def _handler(sock):
    data = sock.recv(100)
    if data.startswith(b"bye"):
        sock.close()  # (the upstream closes)
        return
    sock.sendall(data)
    while sock.recv(100):
        pass
    sock.close()


def _run(cls):
    be = TcpBackend(_handler)
    try:
        bs = bootstrap([tcp_listener(free_port(), "t")], [cluster("t", [be.port])])
        with cls(with_fresh_ports(bs)) as p:
            s = socket.create_connection(("127.0.0.1", p.port), timeout=5)
            s.sendall(b"hello")
            assert s.recv(100) == b"hello"
            s.close()
            wait_until(lambda: p.stat("cluster.t.upstream_cx_destroy") >= 1, 3)
            s = socket.create_connection(("127.0.0.1", p.port), timeout=5)
            s.sendall(b"bye")
            assert s.recv(100) == b""
            s.close()
            wait_until(lambda: p.stat("cluster.t.upstream_cx_destroy") >= 2, 3)
            time.sleep(0.2)
            st = p.stats()
    finally:
        be.close()
    return {k: st.get("cluster.t." + k, 0) for k in KEYS}


def test_tcp_connections_counted_as_cluster_requests_like_envoy():
    px, env = _run(Pyproxy), _run(Envoy)
    assert env["upstream_rq_total"] == 2, env  # (the reference itself)
    assert px == env, (px, env)
