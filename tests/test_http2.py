"""HTTP/2 through pyproxy with real peers: curl, nghttp, h2load as clients; nghttpd and a small
h2-library server as upstreams; an HTTP/1.1 upstream for the HTTP/2 <-> HTTP/1.1 translation.

Listener ``main`` (codec AUTO): ``/h1/...`` -> HTTP/1.1 echo upstream, ``/mini/...`` -> the
scriptable h2 upstream, the rest -> nghttpd (HTTP/2, with a response trailer).
"""

import hashlib
import http.server
import json
import os
import shutil
import socket
import subprocess
import threading
import time

import h2.events as E
import pytest
from h2.errors import ErrorCodes
from h2.settings import SettingCodes
from hyperframe.frame import ContinuationFrame, DataFrame, HeadersFrame, PingFrame, RstStreamFrame

from grpc_util import h2_engines  # noqa: F401  (autouse: every test on both HTTP/2 engines)
from grpc_util import (H2Raw, Proxy, RawH2, bootstrap, cluster, free_port, hcm_listener, kill, rss_kb,
                       wait_port)
from h2_upstream_util import ThreadedH2Upstream

pytestmark = pytest.mark.skipif(not (shutil.which("nghttpd") and shutil.which("h2load") and shutil.which("curl")),
                                reason="nghttp2 tools / curl missing")
MiB = 1024 * 1024


# -- upstreams ---------------------------------------------------------------------------------------


class EchoH1(http.server.BaseHTTPRequestHandler):
    """HTTP/1.1 upstream: GET -> JSON of what it received; POST -> echoes the body (chunked bodies
    are read by hand so request trailers are seen); /h1/file -> the big file."""
    protocol_version = "HTTP/1.1"
    big = b""

    def log_message(self, *a):
        pass

    def _read_body(self):
        trailers = {}
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            body = b""
            while True:
                n = int(self.rfile.readline().split(b";")[0], 16)
                if n == 0:
                    while True:
                        line = self.rfile.readline().strip()
                        if not line:
                            break
                        k, _, v = line.decode().partition(":")
                        trailers[k.strip().lower()] = v.strip()
                    return body, trailers
                body += self.rfile.read(n)
                self.rfile.readline()
        n = int(self.headers.get("content-length", 0))
        return self.rfile.read(n), trailers

    def do_GET(self):
        if self.path.endswith("/file"):
            self.send_response(200)
            self.send_header("content-length", str(len(self.big)))
            self.end_headers()
            self.wfile.write(self.big)
            return
        b = json.dumps({"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}}).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(b)))
        self.send_header("connection", "keep-alive")
        self.send_header("keep-alive", "timeout=5")
        self.end_headers()
        self.wfile.write(b)

    def do_POST(self):
        body, trailers = self._read_body()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.send_header("x-request-trailers", json.dumps(trailers))
        self.end_headers()
        self.wfile.write(body)


class MiniH2(ThreadedH2Upstream):
    """A scriptable HTTP/2 upstream on the h2 library (one thread per connection).

    ``max_streams``: its SETTINGS_MAX_CONCURRENT_STREAMS; ``delay``: seconds before answering;
    ``goaway_on``: on the N-th request of the first connection, send GOAWAY with the previous
    stream as last-stream-id (that request is not processed); ``refuse_first``: REFUSED_STREAM the
    first request of every connection; ``reset_after_headers``: answer headers, then RST_STREAM.
    """

    poll = 0.1

    def __init__(self, max_streams=100, delay=0.0, goaway_on=0, refuse_first=False, reset_after_headers=False):
        self.max_streams = max_streams
        self.settings = {SettingCodes.MAX_CONCURRENT_STREAMS: max_streams}
        self.delay = delay
        self.goaway_on = goaway_on
        self.refuse_first = refuse_first
        self.reset_after_headers = reset_after_headers
        self.conns = 0
        self.max_seen = 0
        self.served = 0
        super().__init__(backlog=64)

    def on_connect(self, state):
        with self.lock:
            self.conns += 1
            state["n"] = self.conns
        state["open"] = {}
        state["due"] = []  # (time, sid)
        state["requests"] = 0
        state["refused"] = False

    def on_request(self, conn, e, state):
        n, due, open_streams = state["n"], state["due"], state["open"]
        state["requests"] += 1
        if self.refuse_first and not state["refused"]:
            state["refused"] = True
            conn.reset_stream(e.stream_id, ErrorCodes.REFUSED_STREAM)
            return True
        if n == 1 and self.goaway_on and state["requests"] == self.goaway_on:
            # answer what was accepted, then GOAWAY: later streams are not processed
            for _, sid in due:
                body = ("conn=%d sid=%d" % (n, sid)).encode()
                conn.send_headers(sid, [(":status", "200"), ("content-length", str(len(body)))])
                conn.send_data(sid, body, end_stream=True)
            conn.close_connection(ErrorCodes.NO_ERROR, last_stream_id=e.stream_id - 2)
            state["sock"].sendall(conn.data_to_send())
            time.sleep(0.5)  # (the h2 library cannot go on after GOAWAY)
            return False
        open_streams[e.stream_id] = dict(e.headers)
        with self.lock:
            self.max_seen = max(self.max_seen, len(open_streams))
        due.append((time.monotonic() + self.delay, e.stream_id))
        return True

    def on_event(self, conn, e, state):
        if isinstance(e, E.DataReceived):
            conn.acknowledge_received_data(e.flow_controlled_length, e.stream_id)

    def on_tick(self, conn, state):
        n, due, open_streams = state["n"], state["due"], state["open"]
        now = time.monotonic()
        for t, sid in list(due):
            if t <= now:
                due.remove((t, sid))
                body = ("conn=%d sid=%d" % (n, sid)).encode()
                if self.reset_after_headers:
                    conn.send_headers(sid, [(":status", "200")])
                    conn.send_data(sid, b"partial")
                    conn.reset_stream(sid, ErrorCodes.INTERNAL_ERROR)
                else:
                    conn.send_headers(sid, [(":status", "200"), ("content-length", str(len(body)))])
                    conn.send_data(sid, body, end_stream=True)
                open_streams.pop(sid, None)
                with self.lock:
                    self.served += 1


# -- fixture -----------------------------------------------------------------------------------------


# the HTTP/1.1 upstream keeps request trailers (test_trailers_both_ways) only with enable_trailers, as in Envoy
_H1_TRAILERS = {"typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
    "explicit_http_config": {"http_protocol_options": {"enable_trailers": True}}}}}


@pytest.fixture(scope="module")
def env(tmp_path_factory, h2_engines):
    tmp = tmp_path_factory.mktemp("h2")
    docroot = tmp / "docroot"
    docroot.mkdir()
    (docroot / "index.html").write_bytes(b"hello h2\n")
    big = os.urandom(4 * MiB)
    (docroot / "big").write_bytes(big)
    EchoH1.big = big
    ng_port = free_port()
    ng = subprocess.Popen(["nghttpd", "--no-tls", "--trailer", "x-upstream-trailer: yes", "-d", str(docroot),
                           str(ng_port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    h1 = http.server.ThreadingHTTPServer(("127.0.0.1", 0), EchoH1)
    h1.daemon_threads = True
    threading.Thread(target=h1.serve_forever, daemon=True).start()
    mini = MiniH2(max_streams=2, delay=0.15)
    lp, ka_port, ap = free_port(), free_port(), free_port()
    routes = [{"match": {"prefix": "/h1/"}, "route": {"cluster": "h1"}},
              {"match": {"prefix": "/mini/"}, "route": {"cluster": "mini"}},
              {"match": {"prefix": "/"}, "route": {"cluster": "ng"}}]
    bs = bootstrap(ap, [hcm_listener("main", lp, routes),
                        hcm_listener("ka", ka_port, routes, codec="HTTP2", http2_opts={
                            "connection_keepalive": {"interval": "0.2s", "timeout": "0.3s"}})],
                   [cluster("ng", ng_port, h2=True), cluster("h1", h1.server_address[1], extra=_H1_TRAILERS),
                    cluster("mini", mini.port, h2=True)])
    px = None
    try:
        wait_port(ng_port, 5, ng)
        px = Proxy(bs, str(tmp), wait_ports=[lp, ka_port])
        yield {"px": px, "port": lp, "ka_port": ka_port, "big": big, "mini": mini, "tmp": tmp}
    finally:
        if px is not None:
            px.stop()
        kill(ng)
        h1.shutdown()
        mini.close()


def curl(*args, timeout=10):
    cp = subprocess.run(["curl", "-sS", "--max-time", str(timeout)] + list(args), capture_output=True,
                        timeout=timeout + 5)
    assert cp.returncode == 0, cp.stderr
    return cp.stdout


# -- basic proxying ---------------------------------------------------------------------------------


def test_curl_prior_knowledge_to_h2_upstream(env):
    out = curl("--http2-prior-knowledge", "-D", "-", "http://127.0.0.1:%d/index.html" % env["port"])
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/2 200")
    assert body == b"hello h2\n"
    big = curl("--http2-prior-knowledge", "http://127.0.0.1:%d/big" % env["port"])
    assert hashlib.md5(big).digest() == hashlib.md5(env["big"]).digest()


def test_h1_client_to_h2_upstream_strips_connection_headers(env):
    # an HTTP/1.1 client's keep-alive/connection headers must not reach the HTTP/2 upstream
    # (nghttpd would reset the stream with PROTOCOL_ERROR)
    out = curl("--http1.1", "-H", "Connection: keep-alive", "-H", "Keep-Alive: timeout=5",
               "-H", "TE: gzip", "-D", "-", "http://127.0.0.1:%d/big" % env["port"])
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert body == env["big"]


def test_h2_client_to_h1_upstream(env):
    out = curl("--http2-prior-knowledge", "http://127.0.0.1:%d/h1/x?q=1" % env["port"])
    seen = json.loads(out)
    assert seen["path"] == "/h1/x?q=1"
    assert seen["headers"]["host"] == "127.0.0.1:%d" % env["port"]
    assert seen["headers"]["x-forwarded-proto"] == "http"
    # h1 response hop-by-hop headers were dropped on the HTTP/2 side
    out = curl("--http2-prior-knowledge", "-D", "-", "-o", "/dev/null", "http://127.0.0.1:%d/h1/x" % env["port"])
    assert b"keep-alive" not in out.lower()
    body = os.urandom(300 * 1024)
    p = env["tmp"] / "post.bin"
    p.write_bytes(body)
    assert curl("--http2-prior-knowledge", "--data-binary", "@%s" % p, "http://127.0.0.1:%d/h1/echo" % env["port"]) == body


def test_expect_100_continue(env):
    p = env["tmp"] / "post2.bin"
    body = os.urandom(64 * 1024)
    p.write_bytes(body)
    out = curl("--http2-prior-knowledge", "-H", "Expect: 100-continue", "--data-binary", "@%s" % p,
               "http://127.0.0.1:%d/h1/echo" % env["port"])
    assert out == body


def test_trailers_both_ways(env):
    # HTTP/2 client request trailers -> HTTP/1.1 upstream (chunked trailers)
    c = H2Raw(env["port"])
    try:
        sid = c.request("/h1/echo", "POST", [("te", "trailers")], body=b"abc", end=False)
        c.h2.send_headers(sid, [("x-req-trailer", "rt")], end_stream=True)
        c.flush()
        headers, body, _, reset = c.response(sid)
        assert reset is None and body == b"abc"
        assert json.loads(headers["x-request-trailers"]) == {"x-req-trailer": "rt"}
        # HTTP/2 upstream response trailers -> HTTP/2 client
        sid = c.request("/index.html")
        headers, body, trailers, reset = c.response(sid)
        assert body == b"hello h2\n" and trailers == {"x-upstream-trailer": "yes"}
    finally:
        c.close()
    # (to an HTTP/1.1 client Envoy drops response trailers unless http_protocol_options.enable_trailers;
    # that is the HTTP/1 codec's business)


def test_nghttp_multiplexed_and_h2load(env):
    urls = ["http://127.0.0.1:%d/index.html" % env["port"], "http://127.0.0.1:%d/big" % env["port"],
            "http://127.0.0.1:%d/h1/a" % env["port"]]
    cp = subprocess.run(["nghttp", "-ns", "-t", "10"] + urls, capture_output=True, text=True, timeout=20)
    assert cp.returncode == 0, cp.stderr + cp.stdout
    cp = subprocess.run(["h2load", "-n", "2000", "-c", "4", "-m", "10", "-T", "10",
                         "http://127.0.0.1:%d/index.html" % env["port"]], capture_output=True, text=True, timeout=40)
    assert "2000 succeeded" in cp.stdout and "2000 2xx" in cp.stdout, cp.stdout[-800:]


# -- upstream pool: SETTINGS, GOAWAY, REFUSED_STREAM, resets --------------------------------------


def _concurrent(port, paths, timeout=8):
    c = H2Raw(port)
    try:
        sids = [c.request(p) for p in paths]
        return [c.response(s, timeout) for s in sids]
    finally:
        c.close()


def test_upstream_max_concurrent_streams_respected(env):
    mini = env["mini"]
    mini.max_seen = 0
    res = _concurrent(env["port"], ["/mini/%d" % i for i in range(6)])
    assert all(r[0][":status"] == "200" and r[3] is None for r in res), res
    assert 1 <= mini.max_seen <= 2  # never more streams than the peer's SETTINGS allow


def test_upstream_goaway_unprocessed_streams_retried_by_policy(env, tmp_path):
    """Streams beyond the GOAWAY's last stream id are refused streams for the router, which retries
    them on a new connection under ``retry_on: refused-stream`` (as Envoy's; without a policy they
    are 503s: tests/test_h2_goaway_upstream_envoy.py)."""
    mini = MiniH2(delay=0.2, goaway_on=2)
    lp, ap = free_port(), free_port()
    bs = bootstrap(ap, [hcm_listener("g", lp, [{"match": {"prefix": "/"}, "route": {
        "cluster": "m", "retry_policy": {"retry_on": "refused-stream", "num_retries": 2}}}])],
        [cluster("m", mini.port, h2=True)])
    px = Proxy(bs, str(tmp_path), wait_ports=[lp])
    try:
        res = _concurrent(lp, ["/a", "/b", "/c"])
        assert [r[0][":status"] for r in res] == ["200"] * 3, res
        bodies = [r[1].decode() for r in res]
        assert bodies[0].startswith("conn=1 ")  # processed before the GOAWAY
        assert any(b.startswith("conn=2 ") for b in bodies[1:])  # retried on a new connection
        assert mini.conns == 2
    finally:
        px.stop()
        mini.close()


def test_upstream_refused_stream_is_retried_by_policy(env, tmp_path):
    """A REFUSED_STREAM is the router's to retry (retry_on refused-stream), as Envoy's; without a
    retry policy it is a 503 (tests/test_h2_refused_stream.py)."""
    mini = MiniH2(refuse_first=True)
    lp, ap = free_port(), free_port()
    bs = bootstrap(ap, [hcm_listener("r", lp, [{"match": {"prefix": "/"}, "route": {
        "cluster": "m", "retry_policy": {"retry_on": "refused-stream", "num_retries": 1}}}])],
        [cluster("m", mini.port, h2=True)])
    px = Proxy(bs, str(tmp_path), wait_ports=[lp])
    try:
        h, body, _, reset = _concurrent(lp, ["/x"])[0]
        assert h[":status"] == "200" and reset is None
        assert mini.served == 1
    finally:
        px.stop()
        mini.close()


def test_upstream_reset_propagates(env, tmp_path):
    mini = MiniH2(reset_after_headers=True)
    lp, ap = free_port(), free_port()
    bs = bootstrap(ap, [hcm_listener("u", lp, [{"match": {"prefix": "/"}, "route": {"cluster": "m"}}])],
                   [cluster("m", mini.port, h2=True)])
    px = Proxy(bs, str(tmp_path), wait_ports=[lp])
    try:
        h, body, trailers, reset = _concurrent(lp, ["/x"])[0]
        assert h[":status"] == "200"
        assert reset is not None  # the client sees a reset, never a clean end
    finally:
        px.stop()
        mini.close()


def test_downstream_reset_propagates_upstream(env):
    """(If the whole response already passed the filter chain the HCM stream is complete; the
    codec still drops what it buffered. The gRPC cancel test covers a reset mid-stream.)"""
    px = env["px"]
    before = px.stats().get("http2.rx_reset", 0)
    c = H2Raw(env["port"], window=65535)
    try:
        sid = c.request("/big")
        c.read_events(lambda evs: any(isinstance(e, E.DataReceived) for e in evs), ack=False)
        c.h2.reset_stream(sid, ErrorCodes.CANCEL)
        c.flush()
        end = time.monotonic() + 5
        while time.monotonic() < end:
            st = px.stats()
            # (the HCM stream may be complete before the reset arrives: wait for the reset too)
            if st.get("cluster.ng.upstream_rq_active") == 0 and st.get("http.main.downstream_rq_active") == 0 \
                    and st.get("http2.rx_reset", 0) > before:
                break
            time.sleep(0.05)
        st = px.stats()
        assert st.get("cluster.ng.upstream_rq_active") == 0
        assert st.get("http.main.downstream_rq_active") == 0
        assert st.get("http2.rx_reset", 0) == before + 1
    finally:
        c.close()


# -- flow control ----------------------------------------------------------------------------------


def test_slow_reader_keeps_memory_bounded(tmp_path):
    """A client that reads a 48 MiB response slowly: the proxy's RSS must not grow with it. Both
    an HTTP/2 upstream (window credit held back) and an HTTP/1.1 upstream (reading paused)."""
    docroot = tmp_path / "d"
    docroot.mkdir()
    data = os.urandom(1 * MiB) * 48
    (docroot / "huge").write_bytes(data)
    ng_port = free_port()
    ng = subprocess.Popen(["nghttpd", "--no-tls", "-d", str(docroot), str(ng_port)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    EchoH1.big = data
    h1 = http.server.ThreadingHTTPServer(("127.0.0.1", 0), EchoH1)
    h1.daemon_threads = True
    threading.Thread(target=h1.serve_forever, daemon=True).start()
    lp, ap = free_port(), free_port()
    bs = bootstrap(ap, [hcm_listener("fc", lp, [{"match": {"prefix": "/h1/"}, "route": {"cluster": "h1"}},
                                                {"match": {"prefix": "/"}, "route": {"cluster": "ng"}}])],
                   [cluster("ng", ng_port, h2=True, h2_opts={"initial_stream_window_size": 1048576,
                                                            "initial_connection_window_size": 1048576}),
                    cluster("h1", h1.server_address[1])])
    px = None
    try:
        wait_port(ng_port, 5, ng)
        px = Proxy(bs, str(tmp_path), wait_ports=[lp])
        for path in ("/huge", "/h1/file"):
            base = rss_kb(px.pid)
            c = H2Raw(lp)
            try:
                sid = c.request(path)
                got = 0
                t0 = time.monotonic()
                peak = base
                # slow phase: ~2 MiB/s for 1.5 s while the upstream could send 48 MiB
                while time.monotonic() - t0 < 1.5:
                    evs = c.read_events(lambda evs: False, timeout=0.05, ack=False, quiet=True)
                    for e in evs:
                        if isinstance(e, E.DataReceived):
                            got += len(e.data)
                            c.h2.acknowledge_received_data(e.flow_controlled_length, sid)
                    c.events.clear()
                    c.flush()
                    time.sleep(0.03)
                    peak = max(peak, rss_kb(px.pid))
                assert got < 16 * MiB, got  # the reader really was slow
                assert peak - base < 24 * 1024, (path, base, peak)  # not the 48 MiB behind it
                # then read the rest at full speed: everything arrives intact
                h = hashlib.md5()
                total = 0
                done = False
                end = time.monotonic() + 20
                c.events.clear()
                while not done and time.monotonic() < end:
                    evs = c.read_events(lambda evs: len(evs) > 0, timeout=2)
                    for e in evs:
                        if isinstance(e, E.DataReceived):
                            total += len(e.data)
                        if isinstance(e, (E.StreamEnded, E.StreamReset)):
                            done = True
                    c.events.clear()
                assert done and got + total == len(data)
            finally:
                c.close()
    finally:
        if px is not None:
            px.stop()
        kill(ng)
        h1.shutdown()


# -- keepalive -------------------------------------------------------------------------------------


def test_keepalive_ping_closes_dead_peer(env):
    # a peer that never answers PINGs is closed after interval + timeout
    dead = RawH2(env["ka_port"])
    alive = H2Raw(env["ka_port"])  # the h2 library answers PINGs
    try:
        t0 = time.monotonic()
        while not dead.closed and time.monotonic() - t0 < 2.0:
            dead.read(lambda fs: False, timeout=0.05)
            alive.read_events(lambda evs: False, timeout=0.05, quiet=True)  # answers the PINGs
        assert dead.closed and time.monotonic() - t0 < 1.5
        assert any(f.type == 6 for f in dead.frames)  # it was pinged
        sid = alive.request("/index.html")
        alive.read_events(lambda evs: False, timeout=0.8, quiet=True)
        assert not alive.closed
        h, body, _, _ = alive.response(sid)
        assert body == b"hello h2\n"
    finally:
        dead.close()
        alive.close()


# -- bad input ---------------------------------------------------------------------------------------


class Bystander:
    """Another client making requests through the proxy while an attack runs."""

    def __init__(self, port):
        self.port = port
        self.ok = 0
        self.errors = []
        self.stop = False
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self):
        while not self.stop:
            try:
                c = H2Raw(self.port)
                sid = c.request("/index.html")
                h, body, _, _ = c.response(sid, timeout=5)
                c.close()
                if h and h[":status"] == "200" and body == b"hello h2\n":
                    self.ok += 1
                else:
                    self.errors.append((h, body))
            except Exception as e:  # noqa: BLE001 - reported below
                self.errors.append(repr(e))
            time.sleep(0.02)

    def finish(self):
        self.stop = True
        self.t.join(10)
        assert not self.errors, self.errors[:3]
        assert self.ok >= 1


def _goaway_code(c, timeout=3.0):
    c.read(lambda fs: any(f.type == 7 for f in fs), timeout)
    g = c.goaway()
    return g.error_code if g is not None else None


def test_rapid_reset_closes_connection(env):
    by = Bystander(env["port"])
    c = RawH2(env["port"])
    try:
        buf = b""
        for i in range(1000):
            r = RstStreamFrame(1 + 2 * i)
            r.error_code = ErrorCodes.CANCEL
            buf += c.headers(1 + 2 * i) + r.serialize()
        c.send(buf)
        assert _goaway_code(c) == ErrorCodes.ENHANCE_YOUR_CALM
        c.read(lambda fs: False, 2)
        assert c.closed
    finally:
        c.close()
        by.finish()
    assert env["px"].stats().get("http.main.downstream_rq_too_many_premature_resets", 0) >= 1


def test_continuation_flood(env):
    by = Bystander(env["port"])
    c = RawH2(env["port"])
    try:
        f = HeadersFrame(1)
        f.data = c.headers_block()
        f.flags = {"END_STREAM"}
        buf = f.serialize()
        for i in range(3000):
            cf = ContinuationFrame(1)
            cf.data = b""
            buf += cf.serialize()
        c.send(buf)
        assert _goaway_code(c) == ErrorCodes.PROTOCOL_ERROR
    finally:
        c.close()
        by.finish()


def test_header_list_too_large(env, h2_engines):
    """70 KiB of headers (over max_request_headers_kb 60) split over CONTINUATION frames: with
    pyproxy's engine the stream is reset (INTERNAL_ERROR) and the connection stays usable, as
    Envoy's (tests/test_streamless_reject_envoy.py compares them); the h2 library ends the
    connection."""
    by = Bystander(env["port"])
    c = RawH2(env["port"])
    try:
        block = c.headers_block(extra=[("x-big%d" % i, "v" * 1000) for i in range(70)])
        frames = []
        for off in range(0, len(block), 16384):
            f = HeadersFrame(1) if off == 0 else ContinuationFrame(1)
            f.data = block[off:off + 16384]
            f.flags = set(["END_STREAM"] if off == 0 else [])
            if off + 16384 >= len(block):
                f.flags.add("END_HEADERS")
            frames.append(f.serialize())
        c.send(b"".join(frames))
        if h2_engines == "lean":
            c.read(lambda fs: any(f.type == 3 for f in fs), 3)
            assert c.resets() == [(1, ErrorCodes.INTERNAL_ERROR)]
            c.send(c.headers(3))  # the connection is still usable
            c.read(lambda fs: any(f.type == 1 and f.stream_id == 3 for f in fs), 3)
            assert any(f.type == 1 and f.stream_id == 3 for f in c.frames)
        else:
            assert _goaway_code(c) in (ErrorCodes.ENHANCE_YOUR_CALM, ErrorCodes.COMPRESSION_ERROR)
    finally:
        c.close()
        by.finish()
    st = env["px"].stats()
    if h2_engines == "lean":
        assert st.get("http2.header_list_size_too_large", 0) >= 1
    else:
        assert st.get("http2.header_overflow", 0) >= 1


def test_too_many_headers_resets_stream(env):
    c = RawH2(env["port"])
    try:
        c.send(c.headers(1, extra=[("x-h%d" % i, "v") for i in range(150)]))
        c.read(lambda fs: any(f.type == 3 for f in fs), 3)
        assert c.resets() == [(1, ErrorCodes.INTERNAL_ERROR)]  # as Envoy
        c.send(c.headers(3))  # the connection is still usable
        c.read(lambda fs: any(f.type == 1 and f.stream_id == 3 for f in fs), 3)
        assert any(f.type == 1 and f.stream_id == 3 for f in c.frames)
    finally:
        c.close()


def test_malformed_request_headers_reset_stream(env):
    c = RawH2(env["port"])
    try:
        c.send(c.headers(1, extra=[("Upper-Case", "v")]) + c.headers(3, extra=[("connection", "close")]))
        c.read(lambda fs: len([f for f in fs if f.type == 3]) >= 2, 3)
        assert sorted(c.resets()) == [(1, ErrorCodes.PROTOCOL_ERROR), (3, ErrorCodes.PROTOCOL_ERROR)]
        c.send(c.headers(5))
        c.read(lambda fs: any(f.type == 1 and f.stream_id == 5 for f in fs), 3)
        assert any(f.type == 1 and f.stream_id == 5 for f in c.frames)
    finally:
        c.close()


def test_streams_beyond_max_concurrent_are_refused(env, tmp_path):
    lp, ap = free_port(), free_port()
    bs = bootstrap(ap, [hcm_listener("m", lp, [{"match": {"prefix": "/"}, "route": {"cluster": "mini"}}],
                                     http2_opts={"max_concurrent_streams": 5})],
                   [cluster("mini", env["mini"].port, h2=True)])
    px = Proxy(bs, str(tmp_path), wait_ports=[lp])
    c = RawH2(lp)
    try:
        c.read(lambda fs: any(f.type == 4 for f in fs), 2)
        settings = [f for f in c.frames if f.type == 4 and "ACK" not in f.flags][0].settings
        assert settings[SettingCodes.MAX_CONCURRENT_STREAMS] == 5
        c.send(b"".join(c.headers(1 + 2 * i, end_stream=False) for i in range(8)))
        c.read(lambda fs: len([f for f in fs if f.type == 3]) >= 3, 3)
        assert sorted(c.resets()) == [(11, ErrorCodes.REFUSED_STREAM), (13, ErrorCodes.REFUSED_STREAM),
                                      (15, ErrorCodes.REFUSED_STREAM)]
        assert c.goaway() is None
    finally:
        c.close()
        px.stop()


def test_invalid_frame_goaway_protocol_error(env):
    c = RawH2(env["port"])
    try:
        df = DataFrame(1)
        df.data = b"x"
        raw = bytearray(df.serialize())
        raw[5:9] = b"\0\0\0\0"  # DATA on stream 0
        c.send(bytes(raw))
        assert _goaway_code(c) == ErrorCodes.PROTOCOL_ERROR
    finally:
        c.close()


def test_empty_frame_flood(env):
    c = RawH2(env["port"])
    try:
        buf = c.headers(1, end_stream=False)
        for _ in range(100):
            df = DataFrame(1)
            df.data = b""
            buf += df.serialize()
        c.send(buf)
        assert _goaway_code(c) == ErrorCodes.ENHANCE_YOUR_CALM
    finally:
        c.close()


@pytest.mark.parametrize("kind", ["ping", "settings"])
def test_control_frame_flood_from_non_reader(env, kind):
    """PINGs/SETTINGS whose acks the client never reads: the connection is closed (Envoy's
    max_outbound_control_frames), others are served meanwhile."""
    by = Bystander(env["port"])
    c = RawH2(env["port"], rcvbuf=4096)
    try:
        if kind == "ping":
            p = PingFrame(0)
            p.opaque_data = b"12345678"
            one = p.serialize() * 1000
        else:
            from hyperframe.frame import SettingsFrame
            one = SettingsFrame(0).serialize() * 1000
        c.sock.settimeout(0.5)
        t0 = time.monotonic()
        sent = 0
        while sent < 400000 and time.monotonic() - t0 < 10 and c.send(one):
            sent += 1000
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        c.read(lambda fs: False, 3)
        assert c.closed
    finally:
        c.close()
        by.finish()
    assert env["px"].stats().get("http2.outbound_control_flood", 0) >= 1
