"""HTTP/1.1 through the real proxy (subprocess) to real backends: keep-alive, chunked both ways,
pipelining, Expect: 100-continue, Upgrade/WebSocket, HEAD, 204/304, HTTP/1.0, large bodies
byte-exact, and a slow client against a fast large response (memory stays bounded)."""

from __future__ import annotations

import hashlib
import http.client
import random
import socket
import subprocess
import time

import pytest

from proxy_util import (ENVOY, Envoy, HttpBackend, Pyproxy, exchange, one_route_bootstrap, parse_responses,
                        proxies, read_head, request, simple_response)

BIG = random.Random(7).randbytes(12 * 1024 * 1024)


def handler(req, sock):
    path = req.path
    if req.header("upgrade", "").lower() == "websocket":
        sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Accept: x\r\n\r\n")
        return "websocket"
    if path.startswith("/sha"):
        body = ("%d %s" % (len(req.body), hashlib.sha256(req.body).hexdigest())).encode()
        return simple_response(200, body)
    if path.startswith("/echo"):
        return simple_response(200, req.body, [("x-te", req.header("transfer-encoding", "")),
                                               ("x-cl", req.header("content-length", "")),
                                               ("x-expect", req.header("expect", ""))])
    if path.startswith("/chunked"):
        parts = [b"hello ", b"chunked ", b"world"]
        out = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        out += b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"
        return out
    if path.startswith("/status/"):
        code = int(path.split("/")[2])
        return ("HTTP/1.1 %d X\r\netag: \"e\"\r\n\r\n" % code).encode()
    if path.startswith("/head"):
        return b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\nContent-Type: text/plain\r\n\r\n" + (
            b"" if req.method == "HEAD" else b"x" * 1234)
    if path.startswith("/big"):
        n = int(path.split("/")[2])
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % n)
        view = memoryview(BIG)
        sent = 0
        while sent < n:
            k = min(len(BIG), n - sent)
            sock.sendall(view[:k])
            sent += k
            SENT[0] = sent
        return None
    if path.startswith("/close-delimited"):
        sock.sendall(b"HTTP/1.1 200 OK\r\n\r\nuntil-close")
        return "close"
    return simple_response(200, ("%s %s %s" % (req.method, path, req.version)).encode())


SENT = [0]

# Bugs in files owned by the lead (exact fixes in the coretests report):
# stream.ActiveStream.decode_data/decode_trailers buffer the request body forever once the
# router returned STOP from decode_headers (Envoy delivers data to the stopped filter itself).
BODY_HELD = lambda f: f  # fixed on main
# router.Router.decode_data drops body bytes that arrive before the pool has bound a connection.
BODY_BEFORE_POOL = lambda f: f  # fixed on main


@pytest.fixture(scope="module")
def backend():
    with HttpBackend(handler) as be:
        yield be


def _bs(backend, **hcm_extra):
    return one_route_bootstrap([backend.port], hcm_extra=hcm_extra)[0]


@pytest.fixture(scope="module")
def px(backend):
    bs = _bs(backend, upgrade_configs=[{"upgrade_type": "websocket"}],
             http_protocol_options={"accept_http_10": True})
    with Pyproxy(bs) as p:
        yield p


@pytest.fixture(scope="module")
def envoy(backend):
    if not ENVOY:
        pytest.skip("envoy not on PATH")
    bs = _bs(backend, upgrade_configs=[{"upgrade_type": "websocket"}],
             http_protocol_options={"accept_http_10": True})
    with Envoy(bs) as e:
        yield e


def test_keep_alive_reuses_both_connections(px, backend):
    c = http.client.HTTPConnection("127.0.0.1", px.port, timeout=5)
    c0 = backend.connections
    try:
        for i in range(20):
            c.request("GET", "/k%d" % i, headers={"Host": "a"})
            r = c.getresponse()
            assert r.status == 200 and r.read() == b"GET /k%d 1.1" % i
            assert r.getheader("connection") is None
        # one downstream connection, and the pool kept one upstream connection
        assert backend.connections - c0 <= 1
    finally:
        c.close()


@BODY_HELD
def test_chunked_request_and_response(px, backend):
    parts = [b"a" * 1000, b"b" * 70000, b"c"]
    data = b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    data += b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"
    data += b"GET /chunked HTTP/1.1\r\nHost: a\r\n\r\n"
    rs, closed, raw = exchange(px.port, data, n=2, timeout=2)
    assert [r.status for r in rs] == [200, 200]
    assert rs[0].body == b"".join(parts)
    assert rs[0].header("x-te") == "chunked"  # forwarded chunked (no length known up front)
    assert rs[1].body == b"hello chunked world"
    assert rs[1].header("transfer-encoding") == "chunked" and rs[1].header("content-length") is None
    assert not closed


@BODY_BEFORE_POOL
def test_request_body_arriving_before_the_upstream_connection_is_forwarded(px, backend):
    """A body in the same write as the head, on a cold pool (the upstream connect is in flight)."""
    # a fresh proxy: nothing pooled yet
    with Pyproxy(_bs(backend)) as p:
        rs, _, raw = exchange(p.port, b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
                              timeout=3)
        assert rs and rs[0].status == 200 and rs[0].body == b"hello", raw


@BODY_HELD
def test_pipelined_requests_answered_in_order(px, backend):
    reqs = []
    methods = []
    for i in range(8):
        if i == 3:
            reqs.append(b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\nbody")
            methods.append("POST")
        elif i == 5:
            reqs.append(b"HEAD /head HTTP/1.1\r\nHost: a\r\n\r\n")
            methods.append("HEAD")
        else:
            reqs.append(b"GET /p%d HTTP/1.1\r\nHost: a\r\n\r\n" % i)
            methods.append("GET")
    rs, closed, raw = exchange(px.port, b"".join(reqs), n=8, timeout=2, methods=methods)
    assert len(rs) == 8, raw
    for i, r in enumerate(rs):
        assert r.status == 200
        if i == 3:
            assert r.body == b"body"
        elif i == 5:
            assert r.body == b"" and r.header("content-length") == "1234"
        else:
            assert r.body == b"GET /p%d 1.1" % i
    assert not closed
    # still usable after the pipeline (reading was resumed)
    rs, _, _ = exchange(px.port, b"GET /after HTTP/1.1\r\nHost: a\r\n\r\n")
    assert rs[0].status == 200


def test_many_pipelined_then_more_on_same_connection(px):
    s = socket.create_connection(("127.0.0.1", px.port), timeout=5)
    try:
        s.sendall(b"".join(b"GET /q%d HTTP/1.1\r\nHost: a\r\n\r\n" % i for i in range(4)))
        buf = b""
        deadline = time.monotonic() + 5
        while buf.count(b"HTTP/1.1 200") < 4 and time.monotonic() < deadline:
            buf += s.recv(65536)
        s.sendall(b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n")
        while b"GET /next" not in buf and time.monotonic() < deadline:
            d = s.recv(65536)
            if not d:
                break
            buf += d
        assert b"GET /next 1.1" in buf, "the connection stopped reading after a pipeline"
    finally:
        s.close()


def _expect_continue(port):
    s = socket.create_connection(("127.0.0.1", port), timeout=2)
    try:
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        first = s.recv(65536)
        s.sendall(b"hello")
        buf = first
        deadline = time.monotonic() + 5
        while b"hello" not in buf[len(first):] and time.monotonic() < deadline:
            d = s.recv(65536)
            if not d:
                break
            buf += d
        return first, parse_responses(buf)
    finally:
        s.close()


@BODY_HELD
def test_expect_100_continue(px):
    first, rs = _expect_continue(px.port)
    assert first.startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert rs[0].status == 100 and rs[1].status == 200 and rs[1].body == b"hello"
    assert rs[1].header("x-expect") == ""  # Expect is consumed by the proxy, as Envoy does


@BODY_HELD
def test_expect_100_continue_matches_envoy(px, envoy):
    a = _expect_continue(px.port)
    b = _expect_continue(envoy.port)
    assert a[0].split(b"\r\n")[0] == b[0].split(b"\r\n")[0]
    assert [r.status for r in a[1]] == [r.status for r in b[1]]
    assert a[1][-1].header("x-expect") == b[1][-1].header("x-expect")


def _websocket(port):
    s = socket.create_connection(("127.0.0.1", port), timeout=2)
    try:
        s.sendall(b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        head, rest = read_head(s) or (b"", b"")
        status = int(head.split(b" ")[1]) if head else 0
        echoed = b""
        if status == 101:
            payload = random.Random(1).randbytes(300000)
            s.sendall(payload)
            echoed = rest
            deadline = time.monotonic() + 5
            while len(echoed) < len(payload) and time.monotonic() < deadline:
                d = s.recv(65536)
                if not d:
                    break
                echoed += d
            assert echoed == payload
            # half-close: the echo backend closes its side, the proxy passes it on
            s.shutdown(socket.SHUT_WR)
            s.settimeout(3)
            tail = s.recv(100)
            assert tail == b""
        return status, head
    finally:
        s.close()


@BODY_HELD
def test_websocket_upgrade_bytes_both_ways(px):
    status, head = _websocket(px.port)
    assert status == 101, head
    h = head.lower()
    assert b"upgrade: websocket" in h and b"connection: upgrade" in h


def test_websocket_not_enabled_is_403_like_envoy(backend):
    bs = _bs(backend)
    got = {}
    for P in proxies():
        with P(bs) as p:
            status, head = _websocket(p.port)
            got[P.kind] = status
    assert got["pyproxy"] == 403
    if "envoy" in got:
        assert got["envoy"] == got["pyproxy"]


@BODY_HELD
def test_websocket_matches_envoy(px, envoy):
    assert _websocket(px.port)[0] == _websocket(envoy.port)[0] == 101


def test_head_204_304_keep_the_connection(px):
    data = (b"HEAD /head HTTP/1.1\r\nHost: a\r\n\r\n"
            b"GET /status/204 HTTP/1.1\r\nHost: a\r\n\r\n"
            b"GET /status/304 HTTP/1.1\r\nHost: a\r\n\r\n"
            b"GET /last HTTP/1.1\r\nHost: a\r\n\r\n")
    rs, closed, raw = exchange(px.port, data, n=4, methods=["HEAD", "GET", "GET", "GET"])
    assert [r.status for r in rs] == [200, 204, 304, 200], raw
    assert rs[0].header("content-length") == "1234" and rs[0].body == b""
    assert rs[1].header("content-length") is None and rs[1].header("transfer-encoding") is None
    assert rs[2].header("etag") == '"e"'
    assert rs[3].body == b"GET /last 1.1"
    assert not closed


def test_http10(px, envoy):
    for p in (px, envoy):
        rs, closed, raw = exchange(p.port, b"GET /ten HTTP/1.0\r\nHost: a\r\n\r\n")
        assert rs[0].status == 200, raw
        assert rs[0].body.startswith(b"GET /ten")
        assert closed  # HTTP/1.0 without keep-alive: the proxy closes after the response


def test_http10_refused_by_default(backend):
    with Pyproxy(_bs(backend)) as p:
        rs, closed, raw = exchange(p.port, b"GET / HTTP/1.0\r\nHost: a\r\n\r\n")
        assert rs[0].status == 426 and closed


def test_close_delimited_upstream_response(px):
    rs, closed, raw = exchange(px.port, b"GET /close-delimited HTTP/1.1\r\nHost: a\r\n\r\n")
    assert rs[0].status == 200 and rs[0].body == b"until-close", raw


@BODY_HELD
def test_large_bodies_byte_exact_both_ways(px):
    # upload 12 MB with a content-length and chunked (curl), download 12 MB
    assert request(px.port, "POST", "/sha", body=b"x", timeout=2)[0] == 200
    st, _, body = request(px.port, "POST", "/sha", body=BIG, timeout=20)
    assert st == 200 and body == ("%d %s" % (len(BIG), hashlib.sha256(BIG).hexdigest())).encode()
    p = subprocess.run(["curl", "-s", "-S", "--max-time", "20", "-H", "Transfer-Encoding: chunked",
                        "--data-binary", "@-", "http://127.0.0.1:%d/sha" % px.port],
                       input=BIG, capture_output=True, timeout=30)
    assert p.stdout == ("%d %s" % (len(BIG), hashlib.sha256(BIG).hexdigest())).encode(), p.stderr
    st, _, body = request(px.port, "GET", "/big/%d" % len(BIG), timeout=20)
    assert st == 200 and hashlib.sha256(body).digest() == hashlib.sha256(BIG).digest()


def test_slow_client_memory_bounded(px):
    """A 200 MB response to a client that does not read: the proxy's memory stays bounded and the
    backend is held back (backpressure), then everything arrives when the client reads."""
    n = 200 * 1024 * 1024
    rss0 = px.rss_kb()
    SENT[0] = 0
    s = socket.create_connection(("127.0.0.1", px.port), timeout=10)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    try:
        s.sendall(b"GET /big/%d HTTP/1.1\r\nHost: a\r\n\r\n" % n)
        time.sleep(1.5)
        rss1 = px.rss_kb()
        sent_while_stalled = SENT[0]
        assert rss1 - rss0 < 40 * 1024, "proxy grew %d kB while the client did not read" % (rss1 - rss0)
        assert sent_while_stalled < n // 2, "no backpressure: backend sent %d bytes" % sent_while_stalled
        got = 0
        deadline = time.monotonic() + 30
        while got < n + 30 and time.monotonic() < deadline:
            d = s.recv(1 << 20)
            if not d:
                break
            got += len(d)
        assert got > n
    finally:
        s.close()


def test_wrk_smoke(px):
    """A short wrk run: no socket errors, no non-2xx, the proxy still answers after."""
    import shutil
    if not shutil.which("wrk"):
        pytest.skip("wrk not installed")
    p = subprocess.run(["wrk", "-t1", "-c20", "-d1s", "http://127.0.0.1:%d/wrk" % px.port],
                       capture_output=True, text=True, timeout=20)
    out = p.stdout
    assert "Requests/sec" in out, out
    assert "Non-2xx" not in out and "Socket errors" not in out, out
    assert request(px.port, "GET", "/after-wrk")[0] == 200


def test_idle_upstream_connections_are_closed_after_the_cluster_idle_timeout():
    """HttpProtocolOptions idle_timeout: parked upstream connections close; busy ones are reused."""
    be = HttpBackend()
    try:
        opts = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "common_http_protocol_options": {"idle_timeout": "0.6s"},
            "explicit_http_config": {"http_protocol_options": {}}}}
        bs, port = one_route_bootstrap([be.port], cluster_extra={"typed_extension_protocol_options": opts})
        with Pyproxy(bs) as px:
            for _ in range(3):  # keep-alive reuse within the idle window
                assert request(port, "GET", "/")[0] == 200
            st = px.stats()
            assert st["cluster.b.upstream_cx_total"] == 1
            deadline = time.time() + 5
            while time.time() < deadline and px.stats()["cluster.b.upstream_cx_active"] != 0:
                time.sleep(0.1)
            st = px.stats()
            assert st["cluster.b.upstream_cx_active"] == 0 and st["cluster.b.upstream_cx_destroy"] == 1
            assert request(port, "GET", "/")[0] == 200  # a fresh connection after the idle close
            assert px.stats()["cluster.b.upstream_cx_total"] == 2
    finally:
        be.close()


@pytest.mark.parametrize("split", [False, True], ids=["one-write", "many-writes"])
def test_oversized_upstream_response_head_is_refused(split):
    """An upstream response head over 80 KiB is an upstream protocol error (502 UPE as Envoy's
    header overflow, never forwarded), whether it arrives in one read or spread over many."""
    big = b"".join(b"x-h%d: %s\r\n" % (i, b"v" * 1000) for i in range(100))

    def handler(req, sock):
        if req.path == "/ok":
            return b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
        head = b"HTTP/1.1 200 OK\r\n" + big + b"content-length: 2\r\n\r\nhi"
        if split:
            for i in range(0, len(head), 1000):
                sock.sendall(head[i:i + 1000])
                time.sleep(0.001)
            return None
        sock.sendall(head)
        return None

    be = HttpBackend(handler)
    try:
        bs, port = one_route_bootstrap([be.port])
        with Pyproxy(bs):
            rs, closed, raw = exchange(port, b"GET /big HTTP/1.1\r\nHost: a\r\n\r\n", timeout=5)
            assert rs and rs[0].status == 502, raw[:300]
            assert b"x-h1:" not in raw
            rs, _, raw = exchange(port, b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\n")
            assert rs[0].status == 200 and rs[0].body == b"ok", raw
    finally:
        be.close()
