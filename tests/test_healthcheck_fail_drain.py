"""Admin POST /healthcheck/fail makes Envoy's drain decision true: an HTTP/1.1 keep-alive
connection's next response carries ``connection: close`` (pyproxy then closes it; Envoy waits for
the client or its drain_timeout), a
connection opened while failing does the same with its first response, an HTTP/2 connection
gets a GOAWAY, and ``http.<prefix>.downstream_cx_drain_close`` counts each. After
/healthcheck/ok new connections stay open again. Compared side by side with Envoy."""

from __future__ import annotations

import re
import socket
import time

import h2.config
import h2.connection

from tests.proxy_util import (Envoy, HttpBackend, Pyproxy, bootstrap, cluster, free_port, http_listener,
                              request, route, route_config, with_fresh_ports)


def _h1_exchange(s, path: bytes):
    """One keep-alive request; (status line, connection header, whether the server closed after)."""
    s.sendall(b"GET " + path + b" HTTP/1.1\r\nhost: x\r\n\r\n")
    buf = b""
    deadline = time.monotonic() + 3
    while b"\r\n\r\n" not in buf and time.monotonic() < deadline:
        d = s.recv(65536)
        if not d:
            break
        buf += d
    head, _, body = buf.partition(b"\r\n\r\n")
    m = re.search(rb"\r\ncontent-length: (\d+)", head, re.I)
    n = int(m.group(1)) if m else 0
    while len(body) < n and time.monotonic() < deadline:
        d = s.recv(65536)
        if not d:
            break
        body += d
    conn = re.findall(rb"\r\nconnection: ([^\r]*)", head, re.I)
    s.settimeout(0.5)
    try:
        closed = s.recv(1) == b""
    except socket.timeout:
        closed = False
    s.settimeout(3)
    return head.split(b"\r\n")[0], conn, closed


def _frames(buf: bytes):
    """(type, flags, stream id) of each whole frame in ``buf`` (after the server's preface)."""
    i, out = 0, []
    while i + 9 <= len(buf):
        n = int.from_bytes(buf[i:i + 3], "big")
        if i + 9 + n > len(buf):
            break
        out.append((buf[i + 3], buf[i + 4], int.from_bytes(buf[i + 5:i + 9], "big") & 0x7FFFFFFF))
        i += 9 + n
    return out, buf[i:]


def _h2_exchange(c, s, sid: int):
    """One HTTP/2 request on stream ``sid``: (whether its response came, whether a GOAWAY came)."""
    c.send_headers(sid, [(":method", "GET"), (":path", "/h2"), (":scheme", "http"), (":authority", "x")],
                   end_stream=True)
    s.sendall(c.data_to_send())
    got, goaway, ended, rest = False, False, False, b""
    deadline = time.monotonic() + 3
    s.settimeout(0.5)
    while time.monotonic() < deadline and not (ended and goaway):
        try:
            d = s.recv(65536)
        except socket.timeout:
            if ended:
                break
            continue
        if not d:
            break
        frames, rest = _frames(rest + d)
        for typ, flags, fsid in frames:
            if fsid == sid and typ == 1:
                got = True
            if fsid == sid and typ in (0, 1) and flags & 1:
                ended = True
            if typ == 7:
                goaway = True
            if typ == 4 and not flags & 1:  # (SETTINGS: ack it)
                s.sendall(b"\x00\x00\x00\x04\x01\x00\x00\x00\x00")
    s.settimeout(3)
    return got and ended, goaway


def _h2_connect(port):
    s = socket.create_connection(("127.0.0.1", port), timeout=3)
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    c.initiate_connection()
    s.sendall(c.data_to_send())
    s.settimeout(0.5)
    try:  # (the server's SETTINGS: acked here)
        frames, _ = _frames(s.recv(65536))
        if any(t == 4 and not f & 1 for t, f, _ in frames):
            s.sendall(b"\x00\x00\x00\x04\x01\x00\x00\x00\x00")
    except socket.timeout:
        pass
    s.settimeout(3)
    return c, s


def _scenario(cls):
    be = HttpBackend()
    bs = bootstrap([http_listener(free_port(), route_config([route("/", "b")]))], [cluster("b", [be.port])])
    out = []
    try:
        with cls(with_fresh_ports(bs)) as px:
            before = px.stats().get("http.ingress.downstream_cx_drain_close", 0)
            a = socket.create_connection(("127.0.0.1", px.port), timeout=3)
            out.append(("h1 before", _h1_exchange(a, b"/a")))
            c2, s2 = _h2_connect(px.port)
            out.append(("h2 before", _h2_exchange(c2, s2, 1)))
            idle = socket.create_connection(("127.0.0.1", px.port), timeout=3)
            out.append(("idle before", _h1_exchange(idle, b"/i")))
            assert request(px.admin_port, "POST", "/healthcheck/fail")[0] == 200
            time.sleep(0.3)
            # an idle keep-alive connection is not closed by the flip itself
            idle.settimeout(0.3)
            try:
                out.append(("idle open", idle.recv(1) != b""))
            except socket.timeout:
                out.append(("idle open", True))
            out.append(("h1 after", _h1_exchange(a, b"/b")))
            out.append(("h2 after", _h2_exchange(c2, s2, 3)))
            n = socket.create_connection(("127.0.0.1", px.port), timeout=3)
            out.append(("new h1 while failing", _h1_exchange(n, b"/c")))
            assert request(px.admin_port, "POST", "/healthcheck/ok")[0] == 200
            time.sleep(0.3)
            n2 = socket.create_connection(("127.0.0.1", px.port), timeout=3)
            out.append(("new h1 after ok", _h1_exchange(n2, b"/d")))
            for x in (a, s2, idle, n, n2):
                x.close()
            time.sleep(0.3)
            out.append(("drain_close", px.stats().get("http.ingress.downstream_cx_drain_close", 0) - before))
    finally:
        be.close()
    return out


def test_healthcheck_fail_drains_connections_as_envoy():
    want = _scenario(Envoy)
    # (the test's premise: Envoy's second keep-alive response closes the connection)
    assert dict(want)["h1 after"][1] == [b"close"], want
    got = _scenario(Pyproxy)
    # pyproxy closes an HTTP/1.1 connection right after a response that says connection: close
    # (as its other drain paths do); Envoy leaves it to the client or to the HCM's drain_timeout
    for name in ("h1 after", "new h1 while failing"):
        assert dict(got)[name][2] is True, got
    norm = [(k, v[:2] if k in ("h1 after", "new h1 while failing") else v) for k, v in got]
    want = [(k, v[:2] if k in ("h1 after", "new h1 while failing") else v) for k, v in want]
    assert norm == want, "\n%s\n%s" % (norm, want)
