"""``POST /drain_listeners?inboundonly&graceful`` (pilot-agent's pod-shutdown call, proxies started
with ``--drain-strategy immediate``) side by side with Envoy (review finding F28): an existing
HTTP/2 connection gets the shutdown-notice GOAWAY (last_stream_id 2^31-1) and is still served,
the final GOAWAY follows after the HCM's drain_timeout; a connection accepted during the drain
window is drained too (HTTP/1.1: ``connection: close``); ``listener_manager.listener_stopped``."""

from __future__ import annotations

import re
import socket
import struct
import time

import hpack
import pytest

from proxy_util import (ENVOY, Envoy, HttpBackend, Pyproxy, bootstrap, cluster, free_port, http_listener, request,
                        route, route_config, with_fresh_ports)

pytestmark = pytest.mark.skipif(not ENVOY, reason="envoy not installed")


def _bs(be_port):
    li = http_listener(free_port(), route_config([route("/", "b")]), name="in", stat_prefix="inb",
                       drain_timeout="1s")
    li["traffic_direction"] = "INBOUND"
    lo = http_listener(free_port(), route_config([route("/", "b")]), name="out", stat_prefix="outb")
    lo["traffic_direction"] = "OUTBOUND"
    return bootstrap([li, lo], [cluster("b", [be_port])])


class _H2:
    """A bare HTTP/2 client reading frames itself (a client library's state machine would stop
    at the first GOAWAY, which is exactly what is under test)."""

    def __init__(self, port):
        self.s = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.s.settimeout(0.1)
        self.enc, self.dec = hpack.Encoder(), hpack.Decoder()
        self.buf, self.sid = b"", 1
        self.s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")

    def get(self):
        blk = self.enc.encode([(":method", "GET"), (":path", "/"), (":scheme", "http"), (":authority", "x")])
        self.s.sendall(struct.pack(">I", len(blk))[1:] + bytes([1, 5]) + struct.pack(">I", self.sid) + blk)
        self.sid += 2
        return self.read(lambda ev: "END" in ev or "EOF" in ev, 3.0)

    def read(self, done, timeout):
        ev = []
        end = time.monotonic() + timeout
        while time.monotonic() < end and not done(ev):
            try:
                d = self.s.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                ev.append("EOF")
                break
            if not d:
                ev.append("EOF")
                break
            self.buf += d
            while len(self.buf) >= 9:
                n, t, fl = int.from_bytes(self.buf[:3], "big"), self.buf[3], self.buf[4]
                if len(self.buf) < 9 + n:
                    break
                p, self.buf = self.buf[9:9 + n], self.buf[9 + n:]
                if t == 4 and not fl & 1:
                    self.s.sendall(b"\x00\x00\x00\x04\x01\x00\x00\x00\x00")
                elif t == 1:
                    ev.append("H %s" % dict(self.dec.decode(p)).get(":status"))
                    if fl & 1:
                        ev.append("END")
                elif t == 0 and fl & 1:
                    ev.append("END")
                elif t == 7:
                    ev.append("GOAWAY last=%d err=%d" % (int.from_bytes(p[:4], "big") & 0x7fffffff,
                                                         int.from_bytes(p[4:8], "big")))
        return ev

    def close(self):
        self.s.close()


def _h1(s):
    """One keep-alive GET on ``s``: the status line and any connection header."""
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    s.settimeout(3)
    d = b""
    while True:
        if b"\r\n\r\n" in d:
            head, body = d.split(b"\r\n\r\n", 1)
            m = re.search(rb"content-length: (\d+)", head, re.I)
            if m and len(body) >= int(m.group(1)):
                break
        x = s.recv(65536)
        if not x:
            break
        d += x
    head = d.split(b"\r\n\r\n")[0].split(b"\r\n")
    return b" ".join(l for l in head if l.startswith(b"HTTP") or l.lower().startswith(b"connection:")).decode()


def _run(cls):
    be = HttpBackend()
    out = []
    try:
        with cls(with_fresh_ports(_bs(be.port)), ["--drain-strategy", "immediate", "--drain-time-s", "3"]) as p:
            pin, pout = p.ports
            h1 = socket.create_connection(("127.0.0.1", pin), timeout=5)
            out.append(("h1 before", _h1(h1)))
            h2i, h2o = _H2(pin), _H2(pout)
            out.append(("h2 in before", h2i.get()))
            out.append(("h2 out before", h2o.get()))
            st, _, _ = request(p.admin_port, "POST", "/drain_listeners?inboundonly&graceful")
            out.append(("drain", st))
            notice = h2i.read(lambda ev: ev, 2.0)
            t0 = time.monotonic()
            out.append(("h2 in notice", notice))
            out.append(("h2 in after notice", h2i.get()))  # (still served)
            out.append(("h2 out after", h2o.get()))
            out.append(("h1 after", _h1(h1)))
            new = socket.create_connection(("127.0.0.1", pin), timeout=5)
            out.append(("new h1 during drain", _h1(new)))
            new.close()
            final = h2i.read(lambda ev: "EOF" in ev, 4.0)
            out.append(("h2 in final", final))
            out.append(("final after drain_timeout", time.monotonic() - t0 > 0.5))
            time.sleep(3.2 - (time.monotonic() - t0))  # (the drain time passes: the listener stops)
            out.append(("stopped", p.stats().get("listener_manager.listener_stopped", 0)))
            for c in (h1, h2i, h2o):
                c.close()
    finally:
        be.close()
    return out


def test_graceful_drain_listeners_like_envoy():
    px, env = _run(Pyproxy), _run(Envoy)
    assert ("h2 in after notice", ["GOAWAY last=2147483647 err=0", "H 200", "END"]) in env, env  # (the reference)
    assert px == env, "\n".join("%s: %r | %r" % (a[0], a[1], b[1]) for a, b in zip(px, env))
