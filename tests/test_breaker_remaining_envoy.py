"""``cluster.<c>.circuit_breakers.<priority>.remaining_*`` gauges that ``track_remaining: true``
asks for (Istio sets it on every cluster), side by side with Envoy 1.40 (review finding F49): the
limits on an idle cluster, one connection / request / pool less with a request in flight, and no
remaining_* gauges for a priority that does not track them. The stats are read while the backend
holds the request (event-driven: once it has received it)."""

from __future__ import annotations

import pytest

from proxy_util import ENVOY, Envoy, HoldingBackend, Pyproxy, one_route_bootstrap

pytestmark = pytest.mark.skipif(not ENVOY, reason="envoy not installed")
CB = {"thresholds": [
    {"max_connections": 10, "max_pending_requests": 20, "max_requests": 30, "max_retries": 4, "track_remaining": True},
    {"priority": "HIGH", "max_connections": 7, "max_pending_requests": 8, "max_requests": 9, "max_retries": 10,
     "track_remaining": True}]}
CB_UNTRACKED = {"thresholds": [{"max_connections": 10}]}


def _remaining(st):
    return {k: v for k, v in st.items() if k.startswith("cluster.b.circuit_breakers.") and ".remaining_" in k}


def _run(cls, cb):
    be = HoldingBackend()
    bs, _ = one_route_bootstrap([be.port], cluster_extra={"circuit_breakers": cb})
    p = cls(bs)
    try:
        idle = _remaining(p.stats())
        be.hold(p.port)
        busy = _remaining(p.stats())
    finally:
        be.release()
        p.stop()
        be.close()
    return idle, busy


def test_remaining_gauges_like_envoy():
    px, env = _run(Pyproxy, CB), _run(Envoy, CB)
    assert env[1]["cluster.b.circuit_breakers.default.remaining_rq"] == 29, env  # (the reference itself)
    assert px == env, (px, env)


def test_no_remaining_gauges_without_track_remaining():
    px, env = _run(Pyproxy, CB_UNTRACKED), _run(Envoy, CB_UNTRACKED)
    assert px == env == ({}, {}), (px, env)
