"""CONNECT and extended CONNECT (RFC 8441) over HTTP/2 through the real proxy, with real peers:
an ``h2`` client on a socket, an HTTP/1.1 tunnel/websocket server and an HTTP/2 CONNECT server
as upstreams. Both protocol engines (lean and ``h2``) run every tunnel test; the refused cases
are compared with Envoy when it is on PATH."""

from __future__ import annotations

import random
import shutil
import socket
import time

import h2.events as E
import pytest
from h2.settings import SettingCodes

from grpc_util import Proxy, bootstrap, cluster, free_port, hcm_listener
from h2connect_util import H2ConnectClient, H2TunnelServer, Http1TunnelServer
from proxy_util import read_head

CONNECT_ROUTE = {"match": {"connect_matcher": {}}, "route": {"cluster": "h1"}}
CONNECT_ROUTE_H2 = {"match": {"connect_matcher": {}}, "route": {"cluster": "h2"}}
PREFIX_ROUTE = {"match": {"prefix": "/"}, "route": {"cluster": "h1"}}
PREFIX_ROUTE_H2 = {"match": {"prefix": "/"}, "route": {"cluster": "h2"}}
UP_CONNECT = {"upgrade_configs": [{"upgrade_type": "CONNECT"}]}
UP_WS = {"upgrade_configs": [{"upgrade_type": "websocket"}]}
ALLOW = {"allow_connect": True}
PAYLOAD = random.Random(5).randbytes(3 * 1024 * 1024 + 17)


@pytest.fixture(scope="module")
def ups():
    h1 = Http1TunnelServer()
    h2s = H2TunnelServer(enable_connect=True)
    yield h1, h2s
    h1.stop()
    h2s.stop()


@pytest.fixture(params=["lean", "h2"])
def engine(request, monkeypatch):
    monkeypatch.setenv("PYPROXY_H2_ENGINE", request.param)
    return request.param


class Px:
    def __init__(self, ups, tmp, routes, hcm_extra=None, http2_opts=None, envoy=False, codec="AUTO"):
        self.port = free_port()
        bs = bootstrap(free_port(), [hcm_listener("l", self.port, routes, http2_opts=http2_opts, hcm_extra=hcm_extra,
                                                  codec=codec)],
                       [cluster("h1", ups[0].port), cluster("h2", ups[1].port, h2=True)])
        self.p = Proxy(bs, str(tmp), envoy=envoy, wait_ports=[self.port])

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.p.stop()


def _pump(c, sid, payload, expect_tail=b"bye", h1=None):
    """Send ``payload`` in chunks while reading the echo; half-close; read to END_STREAM.
    ``h1="connect"`` (an HTTP/1.1 upstream's CONNECT): as Envoy's codec, the END_STREAM closes the
    upstream connection once written, and that close resets the stream (CONNECT_ERROR);
    ``h1="upgrade"``: an HTTP/1.1 upgrade has no way to say END_STREAM, it is not passed on and
    the tunnel stays open."""
    view = memoryview(payload)
    off = 0
    while off < len(payload):
        w = min(c.h2.local_flow_control_window(sid), c.h2.max_outbound_frame_size, len(payload) - off)
        if w > 0:
            c.send(sid, bytes(view[off:off + w]))
            off += w
        else:
            c.read_until(lambda: c.h2.local_flow_control_window(sid) > 0, 5)
    if h1 is not None:
        c.read_until(lambda: len(c.body(sid)) >= len(payload), 10)  # the whole echo, before the end
    c.end(sid)
    if h1 == "upgrade":
        with pytest.raises(TimeoutError):
            c.read_until(lambda: c.done(sid), 0.5)
        assert c.body(sid) == payload
        return
    c.read_until(lambda: c.done(sid), 10)
    if h1 == "connect":
        assert c.reset_code(sid) == 0xA and c.body(sid) == payload
        return
    assert c.reset_code(sid) is None
    assert c.ended(sid)
    assert c.body(sid) == payload + expect_tail


def test_connect_to_http1_upstream_both_ways_and_half_close(ups, tmp_path, engine):
    with Px(ups, tmp_path, [CONNECT_ROUTE], hcm_extra=UP_CONNECT) as px:
        c = H2ConnectClient(px.port)
        try:
            sid = c.open("backend.example:443")
            status, _, reset = c.response(sid)
            assert status == 200 and reset is None
            assert ups[0].heads[-1].startswith("CONNECT backend.example:443 HTTP/1.1\r\n")
            _pump(c, sid, PAYLOAD, h1="connect")
            # the connection is still good for another tunnel
            sid2 = c.open("other:80")
            assert c.response(sid2)[0] == 200
            _pump(c, sid2, b"second", h1="connect")
        finally:
            c.close()


def test_connect_to_http2_upstream(ups, tmp_path, engine):
    with Px(ups, tmp_path, [CONNECT_ROUTE_H2], hcm_extra=UP_CONNECT) as px:
        c = H2ConnectClient(px.port)
        try:
            sid = c.open("backend.example:443")
            assert c.response(sid)[0] == 200
            req = ups[1].requests[-1]
            assert req[":method"] == "CONNECT" and req[":authority"] == "backend.example:443"
            assert ":path" not in req and ":scheme" not in req
            _pump(c, sid, PAYLOAD)
        finally:
            c.close()


def test_extended_connect_websocket_to_http1_upgrade(ups, tmp_path, engine):
    with Px(ups, tmp_path, [PREFIX_ROUTE], hcm_extra=UP_WS, http2_opts=ALLOW) as px:
        c = H2ConnectClient(px.port)
        try:
            c.read_until(lambda: any(isinstance(e, E.RemoteSettingsChanged) for e in c.events), 3)
            assert c.h2.remote_settings.get(SettingCodes.ENABLE_CONNECT_PROTOCOL) == 1
            sid = c.open("backend", protocol="websocket", path="/chat?x=1",
                         extra=[("sec-websocket-version", "13")])
            status, _, reset = c.response(sid)
            assert status == 200 and reset is None  # the upstream's 101, as RFC 8441 wants it
            assert c.headers(sid)["sec-websocket-accept"] == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
            head = ups[0].heads[-1].lower()
            assert head.startswith("get /chat?x=1 http/1.1\r\n")
            assert "upgrade: websocket" in head and "connection: upgrade" in head
            _pump(c, sid, PAYLOAD[:300000], h1="upgrade")
        finally:
            c.close()


def test_extended_connect_to_http2_upstream_stays_extended_connect(ups, tmp_path, engine):
    with Px(ups, tmp_path, [PREFIX_ROUTE_H2], hcm_extra=UP_WS, http2_opts=ALLOW) as px:
        c = H2ConnectClient(px.port)
        try:
            sid = c.open("backend", protocol="websocket", path="/ws")
            assert c.response(sid)[0] == 200
            req = ups[1].requests[-1]
            assert req[":method"] == "CONNECT" and req[":protocol"] == "websocket" and req[":path"] == "/ws"
            assert "upgrade" not in req and "connection" not in req
            _pump(c, sid, b"ws bytes" * 1000)
        finally:
            c.close()


def _h1_websocket(port):
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        s.sendall(b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  b"Sec-WebSocket-Version: 13\r\n\r\n")
        head, rest = read_head(s) or (b"", b"")
        if not head.startswith(b"HTTP/1.1 101"):
            return head, b""
        s.sendall(b"over h2 upstream")
        got = rest
        while len(got) < 16:
            d = s.recv(65536)
            if not d:
                break
            got += d
        s.shutdown(socket.SHUT_WR)  # (as Envoy: an HTTP/1.1 client's FIN ends the tunnel, both ways)
        end = time.monotonic() + 5
        while time.monotonic() < end:
            d = s.recv(65536)
            if not d:
                break
            got += d
        return head, got
    finally:
        s.close()


def test_http1_websocket_to_http2_upstream_as_extended_connect(ups, tmp_path, engine):
    with Px(ups, tmp_path, [PREFIX_ROUTE_H2], hcm_extra=UP_WS) as px:
        head, got = _h1_websocket(px.port)
        assert head.startswith(b"HTTP/1.1 101"), head
        assert b"upgrade: websocket" in head.lower()
        assert got == b"over h2 upstream"
        req = ups[1].requests[-1]
        assert req[":method"] == "CONNECT" and req[":protocol"] == "websocket"


def test_upstream_refuses_connect(tmp_path, engine):
    h1 = Http1TunnelServer(status=403)
    try:
        with Px((h1, h1), tmp_path, [CONNECT_ROUTE], hcm_extra=UP_CONNECT) as px:
            c = H2ConnectClient(px.port)
            try:
                sid = c.open("backend:443")
                status, body, _ = c.response(sid)
                assert status == 403 and body == b"nope"
            finally:
                c.close()
    finally:
        h1.stop()


def test_resets_propagate(ups, tmp_path, engine):
    with Px(ups, tmp_path, [CONNECT_ROUTE], hcm_extra=UP_CONNECT) as px:
        c = H2ConnectClient(px.port)
        try:
            # client reset -> the upstream connection is closed
            n = len(ups[0].conns)
            sid = c.open("a:1")
            assert c.response(sid)[0] == 200
            c.send(sid, b"x")
            c.read_until(lambda: c.body(sid) == b"x", 3)
            up_sock = ups[0].conns[n]
            c.reset(sid)
            end = time.monotonic() + 3
            closed = False
            while time.monotonic() < end and not closed:
                try:
                    up_sock.getpeername()
                except OSError:
                    closed = True  # the server thread saw EOF and closed it
                time.sleep(0.02)
            assert closed
            # upstream connection aborted -> RST_STREAM(CONNECT_ERROR) downstream
            sid = c.open("b:2")
            assert c.response(sid)[0] == 200
            c.send(sid, b"y")
            c.read_until(lambda: c.body(sid) == b"y", 3)
            c.send(sid, b"RESET")
            c.read_until(lambda: c.done(sid), 5)
            assert c.reset_code(sid) == 0xA  # CONNECT_ERROR (RFC 9113 8.5)
        finally:
            c.close()


def test_tunnel_buffers_are_bounded(ups, tmp_path, engine):
    """The client stops reading (window 65535, never credited back): the proxy must stop
    crediting the client's DATA, so the client runs out of window long before 64 MB."""
    with Px(ups, tmp_path, [CONNECT_ROUTE], hcm_extra=UP_CONNECT,
            http2_opts={"initial_stream_window_size": 65535, "initial_connection_window_size": 65535}) as px:
        c = H2ConnectClient(px.port, window=65535)
        try:
            sid = c.open("a:1")
            assert c.response(sid)[0] == 200
            c.ack = False
            chunk = b"z" * 16384
            sent = 0
            stalled_since = None
            while sent < 64 * 1024 * 1024:
                w = min(c.h2.local_flow_control_window(sid), len(chunk))
                if w > 0:
                    c.send(sid, chunk[:w])
                    sent += w
                    stalled_since = None
                    continue
                if stalled_since is None:
                    stalled_since = time.monotonic()
                elif time.monotonic() - stalled_since > 1.0:
                    break  # no credit for a second: back-pressure reached the client
                try:
                    c.read_until(lambda: c.h2.local_flow_control_window(sid) > 0, 0.3)
                except TimeoutError:
                    pass
            assert sent < 32 * 1024 * 1024, sent
            # reading again drains everything, byte-exact
            c.ack = True
            for e in c.events:
                if isinstance(e, E.DataReceived) and e.stream_id == sid and e.flow_controlled_length:
                    c.h2.acknowledge_received_data(e.flow_controlled_length, sid)
            c.flush()
            c.read_until(lambda: len(c.body(sid)) >= sent, 20)
            c.end(sid)
            c.read_until(lambda: c.done(sid), 20)
            assert c.body(sid) == b"z" * sent and c.reset_code(sid) == 0xA  # (Envoy's end of an HTTP/1.1 CONNECT)
        finally:
            c.close()


# -- refused cases, compared with Envoy ---------------------------------------------------------------

def _refused(px_port, protocol=None):
    """(status or None, connection closed?, GOAWAY code) for one CONNECT attempt."""
    c = H2ConnectClient(px_port)
    try:
        try:
            c.read_until(lambda: False, 0.3)
        except TimeoutError:
            pass
        sid = c.open("backend:443") if protocol is None else c.open("backend", protocol=protocol)
        c.read_until(lambda: c.done(sid), 5)
        h = [f for f in c.frames if f[0] == 1 and f[2] == sid]
        status = None
        if h:
            import hpack
            status = int(dict(hpack.Decoder().decode(h[0][3]))[":status"])
        try:
            c.read_until(lambda: False, 0.5)
        except TimeoutError:
            pass
        return status, c.goaway_code()
    finally:
        c.close()


REFUSED = [
    ("no_upgrade_config", [CONNECT_ROUTE], None, None, None, (403, 0)),
    ("prefix_route_only", [PREFIX_ROUTE], UP_CONNECT, None, None, (404, None)),
    ("route_disables", [dict(CONNECT_ROUTE, route={"cluster": "h1", "upgrade_configs": [
        {"upgrade_type": "CONNECT", "enabled": False}]})], UP_CONNECT, None, None, (403, 0)),
    ("websocket_not_configured", [PREFIX_ROUTE], None, ALLOW, "websocket", (403, 0)),
    ("protocol_without_allow_connect", [PREFIX_ROUTE], UP_WS, None, "websocket", (None, None)),
]


@pytest.mark.parametrize("case", REFUSED, ids=[c[0] for c in REFUSED])
def test_refused_like_envoy(ups, tmp_path, case, engine):
    _, routes, hcm_extra, h2o, protocol, want = case
    with Px(ups, tmp_path, routes, hcm_extra=hcm_extra, http2_opts=h2o) as px:
        got = _refused(px.port, protocol)
    if protocol is not None and want[0] is None:
        assert got[0] is None  # dropped: no answer (pyproxy says GOAWAY PROTOCOL_ERROR first)
    else:
        assert got == want
    if shutil.which("envoy") and engine == "lean":
        (tmp_path / "e").mkdir()
        with Px(ups, tmp_path / "e", routes, hcm_extra=hcm_extra, http2_opts=h2o, envoy=True) as ex:
            egot = _refused(ex.port, protocol)
        assert egot[0] == got[0]
        if got[0] is not None:
            assert egot == got


def test_http1_connect_to_http2_upstream(ups, tmp_path, engine):
    with Px(ups, tmp_path, [CONNECT_ROUTE_H2], hcm_extra=UP_CONNECT) as px:
        s = socket.create_connection(("127.0.0.1", px.port), timeout=5)
        try:
            s.sendall(b"CONNECT backend:443 HTTP/1.1\r\nHost: backend:443\r\n\r\n")
            r = read_head(s)
            assert r is not None, "closed before a response head"
            head, got = r
            assert head.startswith(b"HTTP/1.1 200"), head
            s.sendall(b"tunnel over h2")
            while len(got) < 14:
                d = s.recv(65536)
                if not d:
                    break
                got += d
            s.shutdown(socket.SHUT_WR)  # (as Envoy: the client's FIN ends the tunnel; no "bye")
            end = time.monotonic() + 5
            while time.monotonic() < end:
                d = s.recv(65536)
                if not d:
                    break
                got += d
            assert got == b"tunnel over h2"
            req = ups[1].requests[-1]
            assert req[":method"] == "CONNECT" and req[":authority"] == "backend:443" and ":path" not in req
        finally:
            s.close()
