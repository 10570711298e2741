"""``retry_policy.per_try_idle_timeout`` side by side with Envoy (review finding F45): 0.3 s without
a byte from an attempt abandons it (``upstream_rq_per_try_idle_timeout``) and retries it under the
policy (retry_on 5xx, 1 retry; route timeout 3 s); exhausted: 504 URX,UT
``upstream_per_try_idle_timeout``; a response whose body stalls is cut (200 UT). The upstream
stalls 1.5 s (margins >= 0.5 s against the 0.3 s timeout and the 3 s route timeout)."""

from __future__ import annotations

import collections
import os
import shutil
import socket
import tempfile
import threading
import time

import pytest

from proxy_util import (ENVOY, Envoy, HttpBackend, Pyproxy, bootstrap, cluster, free_port, http_listener, route,
                        route_config, simple_response, with_fresh_ports)
from log_util import FLUSH_FAST, file_access_log, hcm_config, log_lines

pytestmark = pytest.mark.skipif(not ENVOY, reason="envoy not installed")
FMT = "%REQ(:PATH)% %RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS%\n"
STALL = 1.5


def _handler(state, lock):
    def h(req, sock):
        with lock:
            n = state[req.path]
            state[req.path] += 1
        if req.path.startswith("/always") or (req.path.startswith("/first") and n == 0):
            time.sleep(STALL)
        if req.path.startswith("/stall"):
            sock.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nab")
            time.sleep(STALL)
            try:
                sock.sendall(b"cd")
            except OSError:
                pass
            return None
        return simple_response(200, b"ok%d" % n)
    return h


def _get(port, path):
    s = socket.create_connection(("127.0.0.1", port), timeout=6)
    buf = b""
    try:
        s.sendall(("GET %s HTTP/1.1\r\nHost: x\r\nconnection: close\r\n\r\n" % path).encode())
        while True:
            try:
                d = s.recv(65536)
            except ConnectionResetError:
                break
            if not d:
                break
            buf += d
    finally:
        s.close()
    return buf[9:12].decode(), buf.split(b"\r\n\r\n", 1)[-1]


@pytest.fixture(scope="module")
def results():
    tmp = tempfile.mkdtemp(prefix="ptidle-")
    out = {}
    try:
        for name, cls in (("pyproxy", Pyproxy), ("envoy", Envoy)):
            state, lock = collections.defaultdict(int), threading.Lock()
            be = HttpBackend(_handler(state, lock))
            log = os.path.join(tmp, name + ".log")
            open(log, "w").close()
            try:
                bs = bootstrap([http_listener(free_port(), route_config([route("/", "b", timeout="3s", retry_policy={
                    "retry_on": "5xx", "num_retries": 1, "per_try_idle_timeout": "0.3s"})]))], [cluster("b", [be.port])])
                hcm_config(bs)["access_log"] = file_access_log(log, FMT)
                with cls(with_fresh_ports(bs), extra_args=FLUSH_FAST) as p:
                    s0 = p.stats()
                    res = {}
                    for path in ("/first", "/always", "/stall"):
                        t0 = time.monotonic()
                        status, body = _get(p.port, path)
                        res[path] = (status, body, time.monotonic() - t0)
                    lines = log_lines(log, 3)
                    s1 = p.stats()
                    with lock:
                        attempts = dict(state)
                    out[name] = (res, lines, attempts, {k: s1.get(k, 0) - s0.get(k, 0) for k in (
                        "cluster.b.upstream_rq_per_try_idle_timeout", "cluster.b.upstream_rq_retry")})
            finally:
                be.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def test_idle_attempt_is_abandoned_and_retried(results):
    for name, (res, lines, attempts, counters) in results.items():
        status, body, took = res["/first"]
        assert (status, body, attempts["/first"]) == ("200", b"ok1", 2), (name, res)
        assert took < STALL - 0.5, (name, took)


def test_exhausted_and_cut_responses_as_envoy(results):
    px, ev = results["pyproxy"], results["envoy"]
    assert px[1] == ev[1] == ["/first 200 - via_upstream", "/always 504 URX,UT upstream_per_try_idle_timeout",
                              "/stall 200 UT upstream_per_try_idle_timeout"], (px, ev)
    assert [px[0][p][:2] for p in ("/always", "/stall")] == [ev[0][p][:2] for p in ("/always", "/stall")], (px, ev)
    assert px[2] == ev[2] and px[3] == ev[3], (px, ev)
