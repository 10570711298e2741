"""Requests rejected before a stream exists (HTTP/1.1 heads the codec refuses, HTTP/1.0, the
request_headers_timeout), side by side with Envoy (review finding F22): the same local reply,
an access-log line (Istio's default text format fields that apply) and the request counters
(downstream_rq_total, _http1_total, _rx_reset, _completed, _response_before_rq_complete)."""

from __future__ import annotations

import os
import re
import socket
import time

import pytest

from proxy_util import (ENVOY, Envoy, HttpBackend, Pyproxy, bootstrap, cluster, free_port, http_listener, route,
                        route_config, with_fresh_ports)

_PORT = re.compile(r"127\.0\.0\.1:\d+")
pytestmark = pytest.mark.skipif(not ENVOY, reason="envoy not installed")
FMT = ('"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" %RESPONSE_CODE% %RESPONSE_FLAGS% '
       '%RESPONSE_CODE_DETAILS% %BYTES_RECEIVED% %BYTES_SENT% "%UPSTREAM_HOST%" %UPSTREAM_CLUSTER%\n')
KEYS = ("downstream_rq_2xx", "downstream_rq_total", "downstream_rq_http1_total", "downstream_rq_http2_total", "downstream_rq_rx_reset", "downstream_rq_completed",
        "downstream_rq_response_before_rq_complete", "downstream_rq_4xx", "downstream_cx_protocol_error")
H2_KEYS = ("http2.header_list_size_too_large", "http2.tx_reset", "http2.rx_messaging_error", "http2.header_overflow")
CASES = {
    "bad-header": b"GET /a HTTP/1.1\r\nHost: x\r\nbad header: 1\r\n\r\n",
    "bad-cl": b"POST /a HTTP/1.1\r\nHost: x\r\ncontent-length: abc\r\n\r\n",
    "http10": b"GET /a HTTP/1.0\r\nHost: x\r\n\r\n",
    "hdr-timeout": b"GET /a HTTP/1.1\r\nHost: x\r\n",  # (headers never finish)
}


def _bs(be_port, log_path):
    al = [{"name": "envoy.access_loggers.file", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
        "path": log_path, "log_format": {"text_format_source": {"inline_string": FMT}}}}]
    return bootstrap([http_listener(free_port(), route_config([route("/", "b")]), stat_prefix="in",
                                    access_log=al, request_headers_timeout="0.3s")],
                     [cluster("b", [be_port])])


def _send(port, data):
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    out = b""
    try:
        s.sendall(data)
        while True:
            d = s.recv(65536)
            if not d:
                break
            out += d
    except OSError:
        pass
    finally:
        s.close()
    return out.split(b"\r\n", 1)[0].decode()


def _run(cls, tmp):
    be = HttpBackend()
    log_path = os.path.join(tmp, "%s.log" % cls.kind)
    out = {}
    try:
        with cls(with_fresh_ports(_bs(be.port, log_path)), ["--file-flush-interval-msec", "100"]) as p:
            for name, data in list(CASES.items()) + list(CASES_H2.items()):
                s0 = p.stats()
                status = data(p.port) if callable(data) else _send(p.port, data)
                deadline = time.monotonic() + 3
                lines = []
                while time.monotonic() < deadline:
                    time.sleep(0.1)
                    with open(log_path) if os.path.exists(log_path) else open(os.devnull) as f:
                        lines = f.read().splitlines()
                    if lines:
                        break
                time.sleep(0.2)  # (nothing more comes)
                with open(log_path) if os.path.exists(log_path) else open(os.devnull) as f:
                    lines = f.read().splitlines()
                open(log_path, "w").close() if os.path.exists(log_path) else None
                s1 = p.stats()
                lines = [_PORT.sub("127.0.0.1:PORT", x) for x in lines]  # (each run has its own backend)
                out[name] = (status, lines, {k: s1.get("http.in." + k, 0) - s0.get("http.in." + k, 0) for k in KEYS},
                             {k: s1.get(k, 0) - s0.get(k, 0) for k in H2_KEYS})
    finally:
        be.close()
    return out


def _h2_bad_pseudo(port):
    """An HTTP/2 request with an unknown pseudo-header (``:foo``): the stream is reset."""
    import hpack
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    blk = hpack.Encoder().encode([(":method", "GET"), (":path", "/"), (":scheme", "http"), (":authority", "x"),
                                  (":foo", "1")])
    try:
        s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00"
                  + len(blk).to_bytes(3, "big") + b"\x01\x05\x00\x00\x00\x01" + blk)
        time.sleep(0.5)
    finally:
        s.close()
    return "sent"


def _h2_oversized(port):
    """An HTTP/2 request whose header list is over max_request_headers_kb (61 KB of 60), then a
    plain one on the same connection: the first stream is reset (INTERNAL_ERROR), the connection
    goes on and the second is answered."""
    import h2.config
    import h2.connection
    import h2.events
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    c.initiate_connection()
    base = [(":method", "GET"), (":scheme", "http"), (":authority", "x"), (":path", "/")]
    c.send_headers(1, base + [("x-a", "a" * 61 * 1024)], end_stream=True)
    c.send_headers(3, base, end_stream=True)
    seen = []
    try:
        s.sendall(c.data_to_send())
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and not any(e[0] == "end" for e in seen):
            d = s.recv(65536)
            if not d:
                seen.append(("eof",))
                break
            for e in c.receive_data(d):
                if isinstance(e, h2.events.StreamReset):
                    seen.append(("rst", e.stream_id, int(e.error_code)))
                elif isinstance(e, h2.events.ResponseReceived):
                    seen.append(("status", e.stream_id, dict(e.headers)[":status"]))
                elif isinstance(e, h2.events.StreamEnded):
                    seen.append(("end", e.stream_id))
                elif isinstance(e, h2.events.ConnectionTerminated):
                    seen.append(("goaway", int(e.error_code)))
            s.sendall(c.data_to_send())
    except OSError:
        seen.append(("error",))
    finally:
        s.close()
    return repr(seen)


CASES_H2 = {"h2-bad-pseudo": _h2_bad_pseudo, "h2-oversized": _h2_oversized}


def test_streamless_rejections_logged_and_counted_like_envoy(tmp_path):
    px, env = _run(Pyproxy, str(tmp_path)), _run(Envoy, str(tmp_path))
    assert env["bad-header"][1] == ['"- - HTTP/1.1" 400 DPE http1.codec_error 0 11 "-" -'], env  # (the reference)
    assert env["h2-bad-pseudo"][1] == ['"- - HTTP/2" 0 DPE http2.invalid.header.field 0 0 "-" -'], env
    assert "('rst', 1, 2), ('status', 3, '200')" in env["h2-oversized"][0], env
    for name in list(CASES) + list(CASES_H2):
        assert px[name] == env[name], (name, px[name], env[name])
