"""Requests rejected before a stream exists (HTTP/1.1 heads the codec refuses, HTTP/1.0, the
request_headers_timeout), side by side with Envoy (review finding F22): the same local reply,
an access-log line (Istio's default text format fields that apply) and the request counters
(downstream_rq_total, _http1_total, _rx_reset, _completed, _response_before_rq_complete)."""

from __future__ import annotations

import os
import socket
import time

import pytest

from proxy_util import (ENVOY, Envoy, HttpBackend, Pyproxy, bootstrap, cluster, free_port, http_listener, route,
                        route_config, with_fresh_ports)

pytestmark = pytest.mark.skipif(not ENVOY, reason="envoy not installed")
FMT = ('"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" %RESPONSE_CODE% %RESPONSE_FLAGS% '
       '%RESPONSE_CODE_DETAILS% %BYTES_RECEIVED% %BYTES_SENT% "%UPSTREAM_HOST%" %UPSTREAM_CLUSTER%\n')
KEYS = ("downstream_rq_total", "downstream_rq_http1_total", "downstream_rq_http2_total", "downstream_rq_rx_reset", "downstream_rq_completed",
        "downstream_rq_response_before_rq_complete", "downstream_rq_4xx", "downstream_cx_protocol_error")
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
                out[name] = (status, lines, {k: s1.get("http.in." + k, 0) - s0.get("http.in." + k, 0) for k in KEYS})
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


CASES_H2 = {"h2-bad-pseudo": _h2_bad_pseudo}


def test_streamless_rejections_logged_and_counted_like_envoy(tmp_path):
    px, env = _run(Pyproxy, str(tmp_path)), _run(Envoy, str(tmp_path))
    assert env["bad-header"][1] == ['"- - HTTP/1.1" 400 DPE http1.codec_error 0 11 "-" -'], env  # (the reference)
    assert env["h2-bad-pseudo"][1] == ['"- - HTTP/2" 0 DPE http2.invalid.header.field 0 0 "-" -'], env
    for name in list(CASES) + list(CASES_H2):
        assert px[name] == env[name], (name, px[name], env[name])
