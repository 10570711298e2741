"""WebSocket over HTTP/1.1 (the HCM's ``upgrade_configs: [websocket]``, as Istio sets it) side by
side with Envoy (review finding F39): what the client and the upstream see, the access log line
(%RESPONSE_CODE%, %RESPONSE_FLAGS%, %RESPONSE_CODE_DETAILS%, bytes) and the counters, for

- an upstream that answers the upgrade with a 2xx/3xx other than 101 (Envoy: its head as a local
  reply without the body, ``content-length: 0``, ``connection: close``, details
  ``websocket_handshake_unsuccessful``, no ``upstream_rq_<code>``) or with an error status (relayed,
  ``connection: close``);
- the tunnel's end: the client's FIN or close (``DC downstream_remote_disconnect``; the upstream
  connection is closed, data it sends later never reaches the client), the upstream's close or
  half-close (``UC upstream_reset_after_response_started{connection_termination}``);
- no ``x-envoy-upstream-service-time`` on the 101 (the request never completed);
- ``http.<prefix>.downstream_cx_upgrades_active`` while a tunnel is open, and after.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
import threading

import pytest

from proxy_util import (ENVOY, Envoy, HttpBackend, Pyproxy, bootstrap, cluster, free_port, http_listener, route,
                        recv_until, route_config, simple_response, wait_until, with_fresh_ports)

pytestmark = pytest.mark.skipif(not ENVOY, reason="envoy not installed")

AL = ("%REQ(:PATH)% %RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %BYTES_RECEIVED% %BYTES_SENT% "
      "%UPSTREAM_CLUSTER%\n")
U = (b"GET %s HTTP/1.1\r\nHost: x\r\nconnection: Upgrade\r\nupgrade: websocket\r\nsec-websocket-key: k\r\n"
     b"sec-websocket-version: 13\r\n\r\n")
SWITCH = b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n"


class _Handler:
    """The upstream: /stNNN answers NNN with a body (and x-up: 1), /srvclose and /srvhalf switch
    and close / half-close after "bye", /late switches, echoes, and after the proxy's EOF sends
    "late"; anything else switches and echoes."""

    def __init__(self):
        self.events = []
        self.lock = threading.Lock()

    def note(self, e):
        with self.lock:
            self.events.append(e)

    def __call__(self, req, sock):
        p = req.path
        m = re.match(r"/st(\d+)", p)
        if m:
            st = int(m.group(1))
            return simple_response(st, b"" if st == 204 else b"plain", [("x-up", "1")])
        if p == "/srvclose":
            sock.sendall(SWITCH + b"bye")
            return "close"
        if p == "/srvhalf":
            sock.sendall(SWITCH + b"bye")
            sock.shutdown(socket.SHUT_WR)
            self.note(("half-read", _read_to_eof(sock)))
            return "close"
        if p == "/late":
            sock.sendall(SWITCH)
            got = b""
            while True:
                d = _recv(sock)
                if not d:
                    break
                got += d
                sock.sendall(d)
            self.note(("late-read", got))
            try:
                sock.sendall(b"late")
            except OSError:
                pass
            return "close"
        sock.sendall(SWITCH)
        return "websocket"


def _recv(sock):
    try:
        sock.settimeout(5)
        return sock.recv(65536)
    except OSError:
        return b""


def _read_to_eof(sock):
    got = b""
    while True:
        d = _recv(sock)
        if not d:
            return got
        got += d


def _talk(port, steps):
    """Run ``steps`` (bytes to send, "shut", "wait:<bytes>" to read until they arrived, or a float:
    read that long); -> (response bytes without date, how it ended: "open", "eof" or "rst")."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    out = b""
    how = "open"
    try:
        for st in steps:
            if st == "shut":
                s.shutdown(socket.SHUT_WR)
            elif isinstance(st, str) and st.startswith("wait:"):
                want = st[5:].encode()
                out, end = recv_until(s, 5, done=lambda b, w=want: b.endswith(w), buf=out)
                how = "eof" if end == "eof" else how
            elif isinstance(st, float):
                if how == "open":
                    out, end = recv_until(s, st, buf=out, resets=True)
                    how = {"eof": "eof", "reset": "rst"}.get(end, how)
            else:
                s.sendall(st)
    finally:
        s.close()
    return re.sub(rb"date: [^\r]+\r\n", b"", out), how


CASES = {
    # a 2xx/3xx that is not a 101: the handshake failed
    "st200": [U % b"/st200", 1.5],
    "st204": [U % b"/st204", 1.5],
    "st302": [U % b"/st302", 1.5],
    # an error status: relayed as it is, the connection closing after it
    "st403": [U % b"/st403", 1.5],
    "st500": [U % b"/st500", 1.5],
    # the upstream ends the tunnel (its FIN or close); Envoy closes the client after its
    # delayed-close wait (1 s), pyproxy at once: only the bytes are compared
    "srvclose": [U % b"/srvclose", "wait:bye", 0.5],
    "srvhalf": [U % b"/srvhalf", "wait:bye", 0.5],
    # the client ends the tunnel: its FIN is the connection's end (the upstream's later "late"
    # never arrives), or it closes
    "late": [U % b"/late", "wait:\r\n\r\n", b"ping", "wait:ping", "shut", 2.0],
    "echo-close": [U % b"/ws", "wait:\r\n\r\n", b"ping", "wait:ping"],
}


def _bs(be_port, log):
    ln = http_listener(free_port(), route_config([route("/", "b")]), stat_prefix="in",
                       upgrade_configs=[{"upgrade_type": "websocket"}])
    ln["filter_chains"][0]["filters"][0]["typed_config"]["access_log"] = [{
        "name": "envoy.access_loggers.file", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog", "path": log,
            "log_format": {"text_format_source": {"inline_string": AL}}}}]
    return bootstrap([ln], [cluster("b", [be_port])])


_STATS = re.compile(r"^http\.in\.(downstream_rq_[1-5]xx|downstream_cx_upgrades_total)$|"
                    r"^cluster\.b\.upstream_(rq_\d+|rq_[1-5]xx|rq_total|cx_total)$")


def _run(cls, tmp):
    log = os.path.join(tmp, cls.__name__ + ".log")
    open(log, "w").close()
    h = _Handler()
    out = {}
    with HttpBackend(h) as be:
        with cls(with_fresh_ports(_bs(be.port, log)), extra_args=["--file-flush-interval-msec", "100"]) as p:
            s0 = p.stats()
            for name, steps in CASES.items():
                n0 = len(open(log).read().splitlines())
                got, how = _talk(p.port, steps)
                if name in ("srvclose", "srvhalf"):
                    how = None  # (the moment of the close differs: Envoy's delayed close)
                # the stream's access log line (written at its end)
                assert wait_until(lambda: len(open(log).read().splitlines()) > n0, 5), name
                line = open(log).read().splitlines()[n0].replace(str(be.port), "BE")
                out[name] = (got, how, line)
            # the active-upgrades gauge while a tunnel is open, then after it ended
            s = socket.create_connection(("127.0.0.1", p.port), timeout=5)
            try:
                s.sendall(U % b"/ws")
                buf = b""
                while b"\r\n\r\n" not in buf:
                    buf += s.recv(65536)
                out["active_open"] = p.stats().get("http.in.downstream_cx_upgrades_active")
            finally:
                s.close()
            wait_until(lambda: p.stats().get("http.in.downstream_cx_upgrades_active") == 0, 5)
            s1 = p.stats()
            out["active_after"] = s1.get("http.in.downstream_cx_upgrades_active")
            out["stats"] = {k: v - s0.get(k, 0) for k, v in s1.items() if _STATS.match(k) and v - s0.get(k, 0)}
    wait_until(lambda: len([e for e in h.events if e[0] == "late-read"]) >= 1, 3)
    out["upstream"] = sorted(h.events)
    return out


@pytest.fixture(scope="module")
def both():
    tmp = tempfile.mkdtemp(prefix="ws-")
    try:
        yield _run(Pyproxy, tmp), _run(Envoy, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.parametrize("case", list(CASES))
def test_websocket_case_as_envoy(both, case):
    px, ev = both
    assert px[case] == ev[case]


def test_websocket_expectations_hold_on_envoy(both):
    """What the comparison rests on (so that a change on either side shows here first)."""
    _, ev = both
    got, how, line = ev["st200"]
    assert got == b"HTTP/1.1 200 OK\r\nx-up: 1\r\nserver: envoy\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"
    assert line == "/st200 200 - websocket_handshake_unsuccessful 0 0 b"
    assert ev["st403"][0].endswith(b"connection: close\r\n\r\nplain")
    assert ev["srvhalf"][2] == "/srvhalf 101 UC upstream_reset_after_response_started{connection_termination} 0 3 b"
    assert ev["late"][1] == "eof" and not ev["late"][0].endswith(b"late")
    assert ev["late"][2] == "/late 101 DC downstream_remote_disconnect 4 4 b"
    assert b"x-envoy-upstream-service-time" not in ev["echo-close"][0]


def test_websocket_gauge_and_counters_as_envoy(both):
    px, ev = both
    assert ev["active_open"] == 1 and ev["active_after"] == 0
    assert (px["active_open"], px["active_after"]) == (ev["active_open"], ev["active_after"])
    assert px["stats"] == ev["stats"]
    assert px["upstream"] == ev["upstream"]
