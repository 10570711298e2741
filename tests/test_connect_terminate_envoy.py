"""CONNECT termination side by side with Envoy (review finding F25): a route with
``upgrade_configs: [{upgrade_type: CONNECT, connect_config: {}}]`` (Istio's ``connect_terminate``
listener shape: h2c with ``allow_connect``, the HCM's ``upgrade_configs: [CONNECT]``, a
``connect_matcher`` route) answers the CONNECT with 200 and tunnels the bytes to the route's
cluster as raw TCP. Compared: what an HTTP/2 client sees (status, headers, the bytes, END_STREAM
or RST_STREAM and its code), what an HTTP/1.1 client sees, what the TCP upstream receives, the
access log line and the counters."""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
import threading
import time

import h2.config
import h2.connection
import h2.events
import pytest

from proxy_util import (ENVOY, Envoy, Pyproxy, TcpBackend, bootstrap, cluster, free_port, http_listener,
                        route_config, wait_until, with_fresh_ports)

pytestmark = pytest.mark.skipif(not ENVOY, reason="envoy not installed")

AL = ("%REQ(:METHOD)% %REQ(:AUTHORITY)% %PROTOCOL% %RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% "
      "%BYTES_RECEIVED% %BYTES_SENT% %UPSTREAM_CLUSTER% %UPSTREAM_HOST%\n")
TERMINATE = [{"upgrade_type": "CONNECT", "connect_config": {}}]


class _Echo:
    """The TCP upstream: echoes; "CLOSE-FIRST" is answered "bye" and a close; at the client's FIN
    it sends "after-fin" and half-closes. Records every connection's bytes."""

    def __init__(self):
        self.got = []
        self.lock = threading.Lock()

    def __call__(self, s):
        buf = b""
        try:
            d = s.recv(65536)
            buf += d
            if d == b"CLOSE-FIRST":
                s.sendall(b"bye")
                return
            if not d:
                return
            s.sendall(d)
            while True:
                d = s.recv(65536)
                if not d:
                    s.sendall(b"after-fin")
                    s.shutdown(socket.SHUT_WR)
                    return
                buf += d
                s.sendall(d)
        except OSError:
            return
        finally:
            with self.lock:
                self.got.append(buf)


def _bs(tport, dead, log):
    rc = route_config([{"match": {"connect_matcher": {}}, "route": {"cluster": "t", "upgrade_configs": TERMINATE}},
                       {"match": {"prefix": "/"}, "route": {"cluster": "t"}}])
    rcd = route_config([{"match": {"connect_matcher": {}}, "route": {"cluster": "dead", "upgrade_configs": TERMINATE}}])
    kw = dict(http2_protocol_options={"max_concurrent_streams": 100, "allow_connect": True},
              upgrade_configs=[{"upgrade_type": "CONNECT"}], stream_idle_timeout="0s")
    lns = [http_listener(free_port(), rc, stat_prefix="ct", **kw),
           http_listener(free_port(), rcd, name="d", stat_prefix="cd", **kw),
           http_listener(free_port(), rc, name="noc", stat_prefix="noc")]
    for ln in lns:
        ln["filter_chains"][0]["filters"][0]["typed_config"]["access_log"] = [{
            "name": "envoy.access_loggers.file", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog", "path": log,
                "log_format": {"text_format_source": {"inline_string": AL}}}}]
    return bootstrap(lns, [cluster("t", [tport]), cluster("dead", [dead])])


def _h2(port, steps, authority="x:80", method="CONNECT"):
    """One stream; ``steps``: (data, end_stream) sent, each followed by reading until the events
    settle (every wait bounded). -> the stream's events, data joined."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    c.initiate_connection()
    s.sendall(c.data_to_send())
    hdrs = [(":method", method), (":authority", authority)]
    if method != "CONNECT":
        hdrs += [(":scheme", "http"), (":path", "/")]
    c.send_headers(1, hdrs)
    s.sendall(c.data_to_send())
    ev = []

    def pump(want, limit=3.0):
        """Read until ``want()`` or ``limit`` seconds."""
        end = time.monotonic() + limit
        while time.monotonic() < end and not want():
            s.settimeout(max(0.01, min(0.2, end - time.monotonic())))
            try:
                d = s.recv(65536)
            except socket.timeout:
                continue
            except ConnectionResetError:
                ev.append("TCP-RST")
                return
            if not d:
                ev.append("TCP-EOF")
                return
            for e in c.receive_data(d):
                if isinstance(e, h2.events.ResponseReceived):
                    ev.append(("HEADERS", [kv for kv in e.headers if kv[0] not in ("date", "x-request-id")]))
                elif isinstance(e, h2.events.DataReceived) and e.stream_id == 1:
                    if ev and ev[-1][0] == "DATA":
                        ev[-1] = ("DATA", ev[-1][1] + e.data)
                    else:
                        ev.append(("DATA", e.data))
                    c.acknowledge_received_data(e.flow_controlled_length, 1)
                elif isinstance(e, h2.events.StreamEnded):
                    ev.append(("END_STREAM",))
                elif isinstance(e, h2.events.StreamReset):
                    ev.append(("RST", int(e.error_code)))
            try:
                s.sendall(c.data_to_send())
            except OSError:
                pass

    def settled():
        return ev and ev[-1][0] in ("RST",)

    try:
        pump(lambda: any(e[0] == "HEADERS" for e in ev))
        for data, end, expect in steps:
            try:
                c.send_data(1, data, end_stream=end)
                s.sendall(c.data_to_send())
            except Exception as e:  # (the stream is already closed)
                ev.append(("send-fail", type(e).__name__))
            pump(lambda: expect(ev) or settled())
        pump(lambda: settled() or any(e[0] == "END_STREAM" for e in ev) and _after_end(ev, 0.3), 1.0)
    finally:
        s.close()
    return ev


_END_SEEN = {}


def _after_end(ev, wait):
    """True once ``wait`` seconds passed since the END_STREAM was first seen (a RST may follow)."""
    k = id(ev)
    t = _END_SEEN.setdefault(k, time.monotonic())
    return time.monotonic() - t >= wait


def _data(want):
    return lambda e: b"".join(x[1] for x in e if x[0] == "DATA").endswith(want)


def _h1(port, req, want):
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    out = b""
    how = "open"
    try:
        s.sendall(req)
        end = time.monotonic() + 3
        while not out.endswith(want) and time.monotonic() < end:
            s.settimeout(max(0.01, end - time.monotonic()))
            try:
                d = s.recv(65536)
            except socket.timeout:
                break
            if not d:
                how = "eof"
                break
            out += d
    finally:
        s.close()
    return re.sub(rb"date: [^\r]+\r\n", b"", out), how


def _run(cls, tmp):
    log = os.path.join(tmp, cls.__name__ + ".log")
    open(log, "w").close()
    echo = _Echo()
    out = {}
    with TcpBackend(echo) as tb:
        dead = free_port()
        with cls(with_fresh_ports(_bs(tb.port, dead, log)), extra_args=["--file-flush-interval-msec", "100"]) as p:
            s0 = p.stats()
            cases = [
                ("echo+fin", 0, [(b"hello", False, b"hello"), (b"world", True, b"after-fin")], {}),
                ("upstream-closes", 0, [(b"CLOSE-FIRST", False, b"bye")], {}),
                ("dead", 1, [], {}),
                ("route-only", 2, [(b"hello", False, b"hello")], {}),
                ("no-port", 0, [(b"hello", False, b"hello")], {"authority": "x"}),
            ]
            for name, i, steps, kw in cases:
                n0 = len(open(log).read().splitlines())
                steps = [(d, e, _data(x)) for d, e, x in steps]
                out[name] = _h2(p.ports[i], steps, **kw)
                assert wait_until(lambda: len(open(log).read().splitlines()) > n0, 5), name
                out[name + " log"] = open(log).read().splitlines()[n0].replace(str(tb.port), "T").replace(
                    str(dead), "DEAD")
            n0 = len(open(log).read().splitlines())
            out["h1"] = _h1(p.ports[0], b"CONNECT x:80 HTTP/1.1\r\nHost: x:80\r\n\r\nhello", b"hello")
            assert wait_until(lambda: len(open(log).read().splitlines()) > n0, 5)
            out["h1 log"] = open(log).read().splitlines()[n0].replace(str(tb.port), "T")
            s1 = p.stats()
            pat = re.compile(r"^http\.(ct|cd|noc)\.downstream_(rq_[1-5]xx|rq_total|cx_upgrades_total)$|"
                             r"^cluster\.(t|dead)\.upstream_(rq_\d+|rq_[1-5]xx|cx_total|cx_connect_fail|rq_total)$")
            out["stats"] = {k: v - s0.get(k, 0) for k, v in s1.items() if pat.match(k) and v - s0.get(k, 0)}
            out["active"] = {k: v for k, v in s1.items() if k.endswith("downstream_cx_upgrades_active")
                             and not k.startswith("http.admin.")}
    out["upstream"] = sorted(echo.got)
    return out


@pytest.fixture(scope="module")
def both():
    tmp = tempfile.mkdtemp(prefix="ct-")
    try:
        yield _run(Pyproxy, tmp), _run(Envoy, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


KEYS = ["echo+fin", "upstream-closes", "dead", "route-only", "no-port", "h1"]


@pytest.mark.parametrize("key", KEYS + [k + " log" for k in KEYS] + ["stats", "active", "upstream"])
def test_connect_terminate_as_envoy(both, key):
    px, ev = both
    assert px[key] == ev[key]


def test_connect_terminate_expectations_hold_on_envoy(both):
    _, ev = both
    assert ev["echo+fin"] == [("HEADERS", [(":status", "200"), ("server", "envoy")]), ("DATA", b"helloworldafter-fin"),
                              ("END_STREAM",)]
    assert ev["h1"] == (b"HTTP/1.1 200 OK\r\nserver: envoy\r\n\r\nhello", "open")
    assert ev["stats"]["cluster.t.upstream_rq_200"] == 5


# -- bulk bytes and back-pressure through the terminated tunnel (pyproxy; byte-exact) ------------------

def _echo_bye(s):
    """Echo until the FIN, then "bye" and a half-close."""
    while True:
        d = s.recv(65536)
        if not d:
            s.sendall(b"bye")
            s.shutdown(socket.SHUT_WR)
            return
        s.sendall(d)


@pytest.fixture(params=["lean", "h2"])
def engine(request, monkeypatch):
    monkeypatch.setenv("PYPROXY_H2_ENGINE", request.param)
    return request.param


def test_terminated_tunnel_carries_bulk_bytes_both_protocols(tmp_path, engine):
    import random

    from h2connect_util import H2ConnectClient
    from test_http2_connect import _pump

    payload = random.Random(7).randbytes(3 * 1024 * 1024 + 5)
    with TcpBackend(_echo_bye) as tb:
        bs = _bs(tb.port, free_port(), str(tmp_path / "al.log"))
        with Pyproxy(with_fresh_ports(bs)) as p:
            c = H2ConnectClient(p.ports[0])
            try:
                sid = c.open("x:80")
                assert c.response(sid)[0] == 200
                _pump(c, sid, payload)  # (the echo, then "bye" and END_STREAM after the client's)
            finally:
                c.close()
            # HTTP/1.1: the same bytes back, the client reading slowly at first (back-pressure)
            s = socket.create_connection(("127.0.0.1", p.ports[0]), timeout=10)
            try:
                s.sendall(b"CONNECT x:80 HTTP/1.1\r\nHost: x:80\r\n\r\n")
                got = b""
                while b"\r\n\r\n" not in got:
                    got += s.recv(65536)
                head, got = got.split(b"\r\n\r\n", 1)
                assert head.startswith(b"HTTP/1.1 200 "), head
                done = threading.Event()

                def send():
                    try:
                        s.sendall(payload)
                    finally:
                        done.set()
                threading.Thread(target=send, daemon=True).start()
                time.sleep(0.3)
                end = time.monotonic() + 30
                while len(got) < len(payload) and time.monotonic() < end:
                    d = s.recv(65536)
                    if not d:
                        break
                    got += d
                assert done.wait(10)
                assert got == payload
            finally:
                s.close()
