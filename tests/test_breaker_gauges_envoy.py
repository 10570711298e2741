"""``cluster.<c>.circuit_breakers.<priority>.*_open`` gauges, side by side with Envoy 1.40: all 0 on
an idle cluster, and with ``max_connections: 1`` / ``max_requests: 1`` and one request in flight,
``cx_open`` and ``rq_open`` are 1 (the others 0). Real sockets; the stats are read while the
backend holds the request (event-driven: once it has received it)."""

from __future__ import annotations

import pytest

from proxy_util import ENVOY, Envoy, HoldingBackend, Pyproxy, one_route_bootstrap

NAMES = ["circuit_breakers.%s.%s" % (p, n) for p in ("default", "high")
         for n in ("cx_open", "rq_pending_open", "rq_open", "rq_retry_open", "cx_pool_open")]


@pytest.mark.parametrize("cls", [Pyproxy] + ([Envoy] if ENVOY else []), ids=lambda c: c.kind)
def test_breaker_gauges(cls):
    be = HoldingBackend()
    bs, _ = one_route_bootstrap([be.port], cluster_extra={"circuit_breakers": {"thresholds": [
        {"max_connections": 1, "max_pending_requests": 1, "max_requests": 1, "max_retries": 1}]}})
    p = cls(bs)
    try:
        st = p.stats()  # (no upstream connection yet)
        idle = {n: st.get("cluster.b." + n) for n in NAMES}
        assert idle == {n: 0 for n in NAMES}, idle
        be.hold(p.port)
        st = p.stats()
        busy = {n: st.get("cluster.b." + n) for n in NAMES}
        want = {n: 0 for n in NAMES}
        want["circuit_breakers.default.cx_open"] = want["circuit_breakers.default.rq_open"] = 1
        assert busy == want, busy
    finally:
        be.release()
        p.stop()
        be.close()
