"""The route timeout's access-log fields side by side with Envoy (review finding F21): 504 UT with
``%RESPONSE_CODE_DETAILS%`` ``response_timeout`` (HTTP and gRPC requests), and once the response
started (headers sent, body stalled) the stream is cut with UT ``response_timeout``. Route timeout
0.5 s; the upstream is 1.5 s late."""

from __future__ import annotations

import time

import pytest

from proxy_util import (ENVOY, bootstrap, cluster, free_port, http_listener, raw, route, route_config,
                        simple_response)
from log_util import file_access_log, hcm_config, logged_each

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

    def bs(be_port, log):
        bs = bootstrap([http_listener(free_port(), route_config([route("/", "b", timeout="0.5s")]))],
                       [cluster("b", [be_port])])
        hcm_config(bs)["access_log"] = file_access_log(log, FMT)
        return bs

    def send(port):
        for r in reqs:
            raw(port, r, timeout=5)

    out = logged_each(bs, send, len(reqs), _handler)
    assert out["pyproxy"] == out["envoy"], out
    assert out["envoy"] == ["/slow 504 UT response_timeout", "/grpc 200 UT response_timeout",
                            "/stall 200 UT response_timeout"], out
