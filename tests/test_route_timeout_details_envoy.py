"""The route timeout's access-log fields side by side with Envoy (review finding F21): 504 UT with
``%RESPONSE_CODE_DETAILS%`` ``response_timeout`` (HTTP and gRPC requests), and once the response
started (headers sent, body stalled) the stream is cut with UT ``response_timeout``. Route timeout
0.5 s; the upstream is 1.5 s late."""

from __future__ import annotations

import os
import shutil
import tempfile
import time

import pytest

from proxy_util import (ENVOY, Envoy, HttpBackend, Pyproxy, bootstrap, cluster, free_port, http_listener, raw,
                        route, route_config, simple_response, with_fresh_ports)
from log_util import FLUSH_FAST, file_access_log, hcm_config, log_lines

pytestmark = pytest.mark.skipif(not ENVOY, reason="envoy not installed")
FMT = "%REQ(:PATH)% %RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS%\n"


def _handler(req, sock):
    if req.path.startswith("/stall"):
        sock.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nab")
        time.sleep(1.5)
        try:
            sock.sendall(b"cd")
        except OSError:
            pass
        return None
    time.sleep(1.5)
    return simple_response(200, b"ok")


def test_route_timeout_details_as_envoy():
    reqs = [b"GET /slow HTTP/1.1\r\nHost: x\r\nconnection: close\r\n\r\n",
            b"POST /grpc HTTP/1.1\r\nHost: x\r\nconnection: close\r\ncontent-type: application/grpc\r\n"
            b"te: trailers\r\ncontent-length: 5\r\n\r\n\0\0\0\0\0",
            b"GET /stall HTTP/1.1\r\nHost: x\r\nconnection: close\r\n\r\n"]
    tmp = tempfile.mkdtemp(prefix="rt-details-")
    out = {}
    try:
        for name, cls in (("pyproxy", Pyproxy), ("envoy", Envoy)):
            be = HttpBackend(_handler)
            log = os.path.join(tmp, name + ".log")
            open(log, "w").close()
            try:
                bs = bootstrap([http_listener(free_port(), route_config([route("/", "b", timeout="0.5s")]))],
                               [cluster("b", [be.port])])
                hcm_config(bs)["access_log"] = file_access_log(log, FMT)
                with cls(with_fresh_ports(bs), extra_args=FLUSH_FAST) as p:
                    for r in reqs:
                        raw(p.port, r, timeout=5)
                    lines = log_lines(log, len(reqs))
                    out[name] = lines
            finally:
                be.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert out["pyproxy"] == out["envoy"], out
    assert out["envoy"] == ["/slow 504 UT response_timeout", "/grpc 200 UT response_timeout",
                            "/stall 200 UT response_timeout"], out
