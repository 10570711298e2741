"""The HCM's ``stream_idle_timeout`` cutting a response that already started (the upstream sent the
head and the first body bytes, then stalls), side by side with Envoy (review finding F21 note): the
access log says ``200 SI stream_idle_timeout`` (not ``via_upstream``) and the request counts as a
2xx, as Envoy counts it. stream_idle_timeout 0.5 s; the upstream stalls 2 s."""

from __future__ import annotations

import os
import shutil
import tempfile
import time

import pytest

from proxy_util import (ENVOY, Envoy, HttpBackend, Pyproxy, bootstrap, cluster, free_port, http_listener, raw, route,
                        route_config, with_fresh_ports)
from log_util import FLUSH_FAST, file_access_log, hcm_config, log_lines

pytestmark = pytest.mark.skipif(not ENVOY, reason="envoy not installed")
FMT = "%REQ(:PATH)% %RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS%\n"
KEYS = ("downstream_rq_2xx", "downstream_rq_completed", "downstream_rq_idle_timeout", "downstream_rq_tx_reset",
        "downstream_rq_total")


def _handler(req, sock):
    sock.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nab")
    time.sleep(2.0)
    try:
        sock.sendall(b"cdef")
    except OSError:
        pass
    return None


def _run(cls, tmp):
    log = os.path.join(tmp, cls.kind + ".log")
    open(log, "w").close()
    with HttpBackend(_handler) as be:
        bs = bootstrap([http_listener(free_port(), route_config([route("/", "b", timeout="0s")]), stat_prefix="in",
                                      stream_idle_timeout="0.5s")], [cluster("b", [be.port])])
        hcm_config(bs)["access_log"] = file_access_log(log, FMT)
        with cls(with_fresh_ports(bs), extra_args=FLUSH_FAST) as p:
            got = raw(p.port, b"GET /trickle HTTP/1.1\r\nHost: x\r\n\r\n", timeout=5)
            lines = log_lines(log, 1)
            st = p.stats()
    return got.split(b"\r\n")[0], got.split(b"\r\n\r\n", 1)[-1], lines, {k: st.get("http.in." + k, 0) for k in KEYS}


def test_stream_idle_timeout_after_the_response_started():
    tmp = tempfile.mkdtemp(prefix="px-sidle-")
    try:
        px, env = _run(Pyproxy, tmp), _run(Envoy, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert env[2] == ["/trickle 200 SI stream_idle_timeout"], env  # (the reference)
    assert px == env, (px, env)
