"""``cluster.<c>.circuit_breakers.<priority>.*_open`` gauges, side by side with Envoy 1.40: all 0 on
an idle cluster, and with ``max_connections: 1`` / ``max_requests: 1`` and one request in flight,
``cx_open`` and ``rq_open`` are 1 (the others 0). Real sockets; the stats are read while the
backend holds the request (event-driven: once it has received it)."""

from __future__ import annotations

import threading
import time

import pytest

from proxy_util import ENVOY, Envoy, HttpBackend, Pyproxy, one_route_bootstrap, raw, simple_response

NAMES = ["circuit_breakers.%s.%s" % (p, n) for p in ("default", "high")
         for n in ("cx_open", "rq_pending_open", "rq_open", "rq_retry_open", "cx_pool_open")]


@pytest.mark.parametrize("cls", [Pyproxy] + ([Envoy] if ENVOY else []), ids=lambda c: c.kind)
def test_breaker_gauges(cls):
    release = threading.Event()

    def handler(req, sock):
        if req.path == "/hold":
            release.wait(10)
        return simple_response(200, b"ok")

    be = HttpBackend(handler)
    bs, _ = one_route_bootstrap([be.port], cluster_extra={"circuit_breakers": {"thresholds": [
        {"max_connections": 1, "max_pending_requests": 1, "max_requests": 1, "max_retries": 1}]}})
    p = cls(bs)
    t = None
    try:
        st = p.stats()  # (no upstream connection yet)
        idle = {n: st.get("cluster.b." + n) for n in NAMES}
        assert idle == {n: 0 for n in NAMES}, idle
        t = threading.Thread(target=raw, args=(p.port, b"GET /hold HTTP/1.1\r\nhost: h\r\nconnection: close\r\n\r\n"),
                             kwargs={"timeout": 12}, daemon=True)
        t.start()
        deadline = time.monotonic() + 5
        while not any(r.path == "/hold" for r in be.requests) and time.monotonic() < deadline:
            time.sleep(0.02)
        st = p.stats()
        busy = {n: st.get("cluster.b." + n) for n in NAMES}
        want = {n: 0 for n in NAMES}
        want["circuit_breakers.default.cx_open"] = want["circuit_breakers.default.rq_open"] = 1
        assert busy == want, busy
    finally:
        release.set()
        if t is not None:
            t.join(5)
        p.stop()
        be.close()
