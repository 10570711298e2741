"""tcp_proxy through the real proxy: byte-exact both ways, half-close both ways, backpressure both
ways (bounded memory), weighted clusters, idle timeout, connect failure."""

from __future__ import annotations

import collections
import hashlib
import random
import socket
import threading
import time

import pytest

from proxy_util import Pyproxy, TcpBackend, bootstrap, cluster, free_port, tcp_listener

DATA = random.Random(5).randbytes(5 * 1024 * 1024)


def _recv_all(s, n=None, timeout=10):
    s.settimeout(timeout)
    out = bytearray()
    while n is None or len(out) < n:
        d = s.recv(1 << 20)
        if not d:
            break
        out += d
    return bytes(out)


def _bs(port, cluster_ports, **extra):
    return bootstrap([tcp_listener(port, "t", **extra)], [cluster("t", cluster_ports)])


def test_byte_exact_both_ways_with_half_close():
    """Client sends 5 MB and shuts down its write side; the backend reads to EOF, then answers with
    a digest and 5 MB of its own: the client still reads all of it after its half-close."""
    def backend(s):
        got = _recv_all(s)
        s.sendall(hashlib.sha256(got).digest())
        s.sendall(DATA[::-1])
        s.shutdown(socket.SHUT_WR)
        return len(got)

    with TcpBackend(backend) as be:
        port = free_port()
        with Pyproxy(_bs(port, [be.port])) as px:
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            try:
                t = threading.Thread(target=s.sendall, args=(DATA,))
                t.start()
                t.join(20)
                s.shutdown(socket.SHUT_WR)
                out = _recv_all(s)
            finally:
                s.close()
            assert out[:32] == hashlib.sha256(DATA).digest()
            assert out[32:] == DATA[::-1]
            assert be.results == [len(DATA)]
            st = px.stats()
            assert st["tcp.tcp.downstream_cx_rx_bytes_total"] == len(DATA)
            assert st["tcp.tcp.downstream_cx_tx_bytes_total"] == len(DATA) + 32


def test_server_half_close_first():
    """The backend half-closes first; the client can still send and the backend still reads."""
    def backend(s):
        s.sendall(b"banner\n")
        s.shutdown(socket.SHUT_WR)
        got = _recv_all(s)
        return got

    with TcpBackend(backend) as be:
        port = free_port()
        with Pyproxy(_bs(port, [be.port])) as px:
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            try:
                assert _recv_all(s, timeout=5) == b"banner\n"  # EOF seen after the banner
                s.sendall(b"after the server's half-close")
                s.shutdown(socket.SHUT_WR)
                s.settimeout(5)
                assert s.recv(10) == b""
            finally:
                s.close()
            deadline = time.monotonic() + 5
            while not be.results and time.monotonic() < deadline:
                time.sleep(0.02)
            assert be.results == [b"after the server's half-close"]


def test_backpressure_slow_reader_both_directions():
    """100 MB each way against a side that does not read for a while: the proxy's memory stays
    bounded and the writer is held back."""
    n = 100 * 1024 * 1024
    progress = {"backend_sent": 0}
    release = threading.Event()

    def backend(s):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        # downstream -> upstream: do not read until released
        release.wait(10)
        got = 0
        while got < n:
            d = s.recv(1 << 20)
            if not d:
                break
            got += len(d)
        # upstream -> downstream: the client does not read for a while
        chunk = b"x" * (1 << 20)
        for _ in range(n // len(chunk)):
            s.sendall(chunk)
            progress["backend_sent"] += len(chunk)
        return got

    with TcpBackend(backend) as be:
        port = free_port()
        with Pyproxy(_bs(port, [be.port])) as px:
            rss0 = px.rss_kb()
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            try:
                sent = [0]
                s.settimeout(0.2)
                chunk = b"y" * (1 << 20)
                deadline = time.monotonic() + 1.5
                while time.monotonic() < deadline:
                    try:
                        sent[0] += s.send(chunk)
                    except socket.timeout:
                        pass
                assert sent[0] < n // 2, "no backpressure towards the client: sent %d" % sent[0]
                assert px.rss_kb() - rss0 < 40 * 1024
                release.set()
                s.settimeout(20)
                rest = memoryview(b"y" * (n - sent[0]))
                s.sendall(rest)
                time.sleep(1.0)  # backend now writes 100 MB; the client is not reading
                assert progress["backend_sent"] < n // 2, "no backpressure towards the backend"
                assert px.rss_kb() - rss0 < 40 * 1024
                got = 0
                while got < n:
                    d = s.recv(1 << 20)
                    if not d:
                        break
                    got += len(d)
                assert got == n
            finally:
                s.close()
            deadline = time.monotonic() + 5
            while not be.results and time.monotonic() < deadline:
                time.sleep(0.02)
            assert be.results == [n]


def test_weighted_clusters():
    names = {}

    def mk(name):
        def h(s):
            s.sendall(name)
        be = TcpBackend(h)
        names[name] = be
        return be

    a, b = mk(b"A"), mk(b"B")
    try:
        port = free_port()
        bs = bootstrap([tcp_listener(port, weighted=[("ca", 80), ("cb", 20)])],
                       [cluster("ca", [a.port]), cluster("cb", [b.port])])
        with Pyproxy(bs):
            c = collections.Counter()
            for _ in range(150):
                s = socket.create_connection(("127.0.0.1", port), timeout=5)
                c[_recv_all(s, timeout=5)] += 1
                s.close()
            assert set(c) == {b"A", b"B"}
            assert 0.1 < c[b"B"] / 150 < 0.33, c
    finally:
        a.close()
        b.close()


def test_idle_timeout_closes_both_sides():
    closed_at = []

    def backend(s):
        s.settimeout(5)
        try:
            while s.recv(100):
                pass
        except OSError:
            pass
        closed_at.append(time.monotonic())

    with TcpBackend(backend) as be:
        port = free_port()
        with Pyproxy(_bs(port, [be.port], idle_timeout="0.5s")) as px:
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            try:
                t0 = time.monotonic()
                s.sendall(b"hi")
                time.sleep(0.3)
                s.sendall(b"activity keeps it open")
                assert _recv_all(s, timeout=3) == b""
                elapsed = time.monotonic() - t0
                assert 0.7 < elapsed < 2.0, elapsed
            finally:
                s.close()
            deadline = time.monotonic() + 3
            while not closed_at and time.monotonic() < deadline:
                time.sleep(0.02)
            assert closed_at, "the upstream side was not closed"
            assert px.stat("tcp.tcp.idle_timeout") == 1


def test_connect_failure_closes_downstream():
    port = free_port()
    with Pyproxy(_bs(port, [free_port()])) as px:
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        try:
            s.sendall(b"anyone?")
            t = time.monotonic()
            assert _recv_all(s, timeout=3) == b""
            assert time.monotonic() - t < 2
        finally:
            s.close()
        assert px.stat("cluster.t.upstream_cx_connect_fail") == 1


def test_unknown_cluster_closes_downstream():
    port = free_port()
    bs = bootstrap([tcp_listener(port, "missing")], [cluster("t", [free_port()])])
    with Pyproxy(bs) as px:
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        try:
            assert _recv_all(s, timeout=3) == b""
        finally:
            s.close()
        assert px.stat("tcp.tcp.downstream_cx_no_route") == 1
