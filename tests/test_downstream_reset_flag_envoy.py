"""An HTTP/2 client that resets its stream (RST_STREAM CANCEL, every cancelled gRPC call) while an
HTTP/1.1 upstream is still answering, side by side with Envoy (review finding F44): the access log
says ``DR http2.remote_reset`` (a lost connection stays ``DC downstream_remote_disconnect``), and the
abandoned HTTP/1.1 upstream request is not counted as ``upstream_rq_tx_reset`` (its connection is
closed, no stream is reset)."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
import time

import h2.config
import h2.connection
import h2.errors
import pytest

from proxy_util import (ENVOY, Envoy, HttpBackend, Pyproxy, bootstrap, cluster, free_port, http_listener, route,
                        route_config, simple_response, with_fresh_ports)
from log_util import file_access_log, hcm_config, last_log_line

pytestmark = pytest.mark.skipif(not ENVOY, reason="envoy not installed")
LOG_FMT = "%REQ(:PATH)% %RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS%\n"
KEYS = ("cluster.b.upstream_rq_tx_reset", "http.in.downstream_rq_rx_reset")


def _bs(be_port, log_path):
    bs = bootstrap([http_listener(free_port(), route_config([route("/", "b", timeout="10s")]), stat_prefix="in")],
                   [cluster("b", [be_port])])
    hcm_config(bs)["access_log"] = file_access_log(log_path, LOG_FMT)
    return bs


def _run(cls, tmp):
    got = {}
    release = threading.Event()

    def handler(req, sock):
        got.setdefault(req.path, threading.Event()).set()
        release.wait(3)
        return simple_response(200, b"late")

    got["/rst"] = threading.Event()
    got["/close"] = threading.Event()
    be = HttpBackend(handler)
    log = os.path.join(tmp, cls.__name__ + ".log")
    open(log, "w").close()
    try:
        with cls(with_fresh_ports(_bs(be.port, log)), extra_args=["--file-flush-interval-msec", "100"]) as p:
            s0 = p.stats()
            out = []
            for path in ("/rst", "/close"):
                s = socket.create_connection(("127.0.0.1", p.port), timeout=5)
                c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
                c.initiate_connection()
                c.send_headers(1, [(":method", "GET"), (":path", path), (":scheme", "http"),
                                   (":authority", "x")], end_stream=True)
                s.sendall(c.data_to_send())
                assert got[path].wait(5), path  # (the upstream has the request)
                if path == "/rst":
                    c.reset_stream(1, h2.errors.ErrorCodes.CANCEL)
                    s.sendall(c.data_to_send())
                    out.append(last_log_line(log, path, timeout=5))
                    s.close()
                else:
                    s.close()
                    out.append(last_log_line(log, path, timeout=5))
            release.set()
            time.sleep(0.3)
            s1 = p.stats()
            return out, {k: s1.get(k, 0) - s0.get(k, 0) for k in KEYS}
    finally:
        release.set()
        be.close()


def test_h2_client_stream_reset_is_dr_and_h1_upstream_request_not_tx_reset():
    tmp = tempfile.mkdtemp(prefix="dr-")
    try:
        px, ev = _run(Pyproxy, tmp), _run(Envoy, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert ev[0] == ["/rst 0 DR http2.remote_reset", "/close 0 DC downstream_remote_disconnect"], ev
    assert px == ev, (px, ev)
