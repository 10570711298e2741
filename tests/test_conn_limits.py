"""The HCM's common_http_protocol_options.max_requests_per_connection and max_connection_duration
(downstream connections), side by side with Envoy: the last allowed request's response carries
``connection: close`` and the connection closes (HTTP/2: GOAWAY); once the duration passes the
connection drains (the next HTTP/1.1 response carries ``connection: close``; HTTP/2: GOAWAY).
Also the cluster-side max_requests_per_connection (upstream connections). Real sockets."""

from __future__ import annotations

import socket
import time

import pytest

from grpc_util import H2Raw
from proxy_util import (Envoy, HttpBackend, Pyproxy, bootstrap, cluster, free_port, http_listener, recv_until,
                        route, route_config, with_fresh_ports)

GET = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"


def _both(bs):
    """(name, proxy, port) for pyproxy and Envoy on the same bootstrap (fresh ports each)."""
    out = []
    for name, cls in (("pyproxy", Pyproxy), ("envoy", Envoy)):
        b = with_fresh_ports(bs)
        out.append((name, cls(b), b["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"]))
    return out


def _bs(be_port, cho, cluster_extra=None):
    rc = route_config([route("/", "b", timeout="5s")])
    return bootstrap([http_listener(free_port(), rc, common_http_protocol_options=cho)],
                     [cluster("b", [be_port], **(cluster_extra or {}))])


def _read(s, until_closed_s: float):
    """Everything the peer sends until it closes (-> (bytes, True)) or ``until_closed_s`` passes."""
    out, how = recv_until(s, until_closed_s, resets=True)
    return out, how is not None


def _answers(s, n: int, timeout: float = 4.0):
    """Read until ``n`` complete answers of the backend came (or the peer closed): (bytes, closed)."""
    out, how = recv_until(s, timeout, lambda out: out.count(b"b GET /a 0") >= n, resets=True)
    return out, how is not None


@pytest.fixture(scope="module")
def backend():
    be = HttpBackend()
    try:
        yield be
    finally:
        be.close()


def test_max_requests_per_connection_http1(backend):
    procs = _both(_bs(backend.port, {"max_requests_per_connection": 2}))
    try:
        for name, p, port in procs:
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            try:
                s.sendall(GET * 3)  # pipelined: the third is never answered
                out, closed = _read(s, 4.0)
            finally:
                s.close()
            heads = [h for h in out.split(b"HTTP/1.1 ")[1:]]
            assert len(heads) == 2, (name, out)
            assert b"connection: close" not in heads[0].lower(), (name, out)
            assert b"connection: close" in heads[1].lower(), (name, out)
            assert closed, (name, out)
            if name == "pyproxy":
                assert p.stat("http.ingress.downstream_cx_max_requests_reached") == 1
        # a keep-alive connection under the limit stays open (for both)
        for name, p, port in procs:
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            try:
                s.sendall(GET)
                out, closed = _answers(s, 1)
                more, closed = _read(s, 0.5)
            finally:
                s.close()
            assert out.startswith(b"HTTP/1.1 200") and not closed, (name, out)
    finally:
        for _, p, _ in procs:
            p.stop()


def _frames(sock, seconds: float):
    """The HTTP/2 frames the peer sends within ``seconds`` (or until it closes): [(type, flags, sid)]
    (read raw: the h2 library refuses frames after a GOAWAY, Envoy's first one included)."""
    buf = recv_until(sock, seconds, resets=True)[0]
    out = []
    while len(buf) >= 9:
        n = int.from_bytes(buf[:3], "big")
        out.append((buf[3], buf[4], int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF, buf[9:9 + n]))
        buf = buf[9 + n:]
    return out


def _ended(frames, sid):
    return any(t in (0, 1) and f & 1 and s == sid for t, f, s, _ in frames)  # DATA/HEADERS + END_STREAM


def test_max_requests_per_connection_http2(backend):
    procs = _both(_bs(backend.port, {"max_requests_per_connection": 2}))
    try:
        for name, p, port in procs:
            c = H2Raw(port)
            try:
                c.request("/a")
                fr = _frames(c.sock, 0.5)
                assert _ended(fr, 1) and not any(t == 7 for t, *_ in fr), (name, fr)
                c.request("/a")
                fr = _frames(c.sock, 1.5)
                assert _ended(fr, 3), (name, fr)
                goaway = [pl for t, _, _, pl in fr if t == 7]
                assert goaway and goaway[0][4:8] == b"\0\0\0\0", (name, fr)  # NO_ERROR
            finally:
                c.sock.close()
            if name == "pyproxy":
                assert p.stat("http.ingress.downstream_cx_max_requests_reached") == 1
    finally:
        for _, p, _ in procs:
            p.stop()


def test_max_connection_duration_http1_drains(backend):
    procs = _both(_bs(backend.port, {"max_connection_duration": "0.5s"}))
    try:
        for name, p, port in procs:
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            try:
                s.sendall(GET)
                out, closed = _answers(s, 1)
                assert out.startswith(b"HTTP/1.1 200") and b"connection: close" not in out.lower(), (name, out)
                assert not closed, name
                time.sleep(0.8)  # the duration (0.5 s) passes; the drain timeout (5 s) has not
                s.sendall(GET)
                out, closed = _read(s, 3.0)
            finally:
                s.close()
            assert out.startswith(b"HTTP/1.1 200") and b"connection: close" in out.lower(), (name, out)
            if name == "pyproxy":
                # (Envoy leaves the socket to its drain timeout, 5 s here; pyproxy closes once the
                # response that said connection: close is out)
                assert closed, (name, out)
                assert p.stat("http.ingress.downstream_cx_max_duration_reached") == 1
    finally:
        for _, p, _ in procs:
            p.stop()


def test_max_connection_duration_idle_http1_closes_after_drain_timeout(backend):
    bs = _bs(backend.port, {"max_connection_duration": "0.3s"})
    bs["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]["drain_timeout"] = "0.5s"
    procs = _both(bs)
    try:
        for name, p, port in procs:
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            try:
                t0 = time.monotonic()
                s.sendall(GET)
                out, closed = _read(s, 4.0)
                took = time.monotonic() - t0
            finally:
                s.close()
            assert out.startswith(b"HTTP/1.1 200") and closed, (name, out)
            assert 0.6 <= took < 3.5, (name, took)  # 0.3 s duration + 0.5 s drain timeout
    finally:
        for _, p, _ in procs:
            p.stop()


def test_max_connection_duration_http2_goaway(backend):
    procs = _both(_bs(backend.port, {"max_connection_duration": "0.5s"}))
    try:
        for name, p, port in procs:
            c = H2Raw(port)
            try:
                c.request("/a")
                fr = _frames(c.sock, 2.5)
                assert _ended(fr, 1), (name, fr)
                goaway = [pl for t, _, _, pl in fr if t == 7]
                assert goaway and goaway[0][4:8] == b"\0\0\0\0", (name, fr)  # NO_ERROR
            finally:
                c.sock.close()
    finally:
        for _, p, _ in procs:
            p.stop()


def test_cluster_max_requests_per_connection(backend):
    """The cluster side (upstream connections): a new upstream connection after two requests."""
    cx = {"typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "common_http_protocol_options": {"max_requests_per_connection": 2},
        "explicit_http_config": {"http_protocol_options": {}}}}}
    procs = _both(_bs(backend.port, {}, cx))
    try:
        for name, p, port in procs:
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            try:
                for _ in range(5):
                    s.sendall(GET)
                    out, _ = _answers(s, 1)
                    assert out.startswith(b"HTTP/1.1 200"), (name, out)
            finally:
                s.close()
            assert p.stat("cluster.b.upstream_cx_total") == 3, name
    finally:
        for _, p, _ in procs:
            p.stop()
