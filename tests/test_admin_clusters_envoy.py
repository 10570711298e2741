"""Admin ``/clusters`` (text and ``?format=json``) side by side with Envoy (review finding F24):
the circuit-breaker thresholds of both priorities as configured (Istio's shape: DEFAULT at
4294967295 with track_remaining, a HIGH entry), and the per-host counters after traffic
(cx_total, cx_connect_fail, rq_total, rq_success, rq_error, rq_timeout)."""

from __future__ import annotations

import json
import time

import pytest

from proxy_util import (ENVOY, Envoy, HttpBackend, Pyproxy, bootstrap, cluster, free_port, http_listener, request,
                        route, route_config, simple_response, with_fresh_ports)

pytestmark = pytest.mark.skipif(not ENVOY, reason="envoy not installed")
CB = {"thresholds": [
    {"max_connections": 4294967295, "max_pending_requests": 4294967295, "max_requests": 4294967295,
     "max_retries": 4294967295, "track_remaining": True},
    {"priority": "HIGH", "max_connections": 7, "max_pending_requests": 8, "max_requests": 9, "max_retries": 10}]}


def _handler(req, sock):
    if req.path.startswith("/bad"):
        return simple_response(503, b"no")
    if req.path.startswith("/slow"):
        time.sleep(1.0)  # (route timeout 0.3 s: 0.7 s margin)
    return simple_response(200, b"ok")


def _bs(live, dead):
    rc = route_config([route("/slow", "b", timeout="0.3s"), route("/dead", "dead"), route("/", "b")])
    return bootstrap([http_listener(free_port(), rc)],
                     [cluster("b", [live], circuit_breakers=CB), cluster("dead", [dead], connect_timeout="1s")])


def _traffic(port):
    got = [request(port, "GET", p, timeout=5)[0] for p in ("/a", "/b", "/bad", "/c", "/slow", "/dead")]
    assert got == [200, 200, 503, 200, 504, 503], got


def _clusters(p, live, dead, fmt=""):
    _, _, body = request(p.admin_port, "GET", "/clusters" + fmt, timeout=5)
    text = body.decode().replace(":%d" % live, ":LIVE").replace(":%d" % dead, ":DEAD")
    text = text.replace('"port_value": %d' % live, '"port_value": "LIVE"')
    return text.replace('"port_value": %d' % dead, '"port_value": "DEAD"')


def _run():
    out = {}
    for name, cls in (("pyproxy", Pyproxy), ("envoy", Envoy)):
        be = HttpBackend(_handler)
        dead = free_port()  # (nothing listens: connections are refused)
        try:
            with cls(with_fresh_ports(_bs(be.port, dead))) as p:
                _traffic(p.port)
                time.sleep(0.9)  # (the slow answer reaches its host, nothing left in flight)
                text = [l for l in _clusters(p, be.port, dead).splitlines()
                        if l.startswith(("b::", "dead::"))]
                js = json.loads(_clusters(p, be.port, dead, "?format=json"))
                out[name] = (text, {c["name"]: c for c in js["cluster_statuses"] if c["name"] in ("b", "dead")})
        finally:
            be.close()
    return out


def _host_stats(c):
    return [{s["name"]: int(s.get("value", 0)) for s in h["stats"]} for h in c.get("host_statuses", ())]


def test_clusters_thresholds_and_host_counters_match_envoy():
    res = _run()
    (tp, jp), (te, je) = res["pyproxy"], res["envoy"]
    assert "b::high_priority::max_requests::9" in te, te  # (the reference itself)
    keep = ("_priority::", "::cx_total::", "::cx_connect_fail::", "::rq_total::", "::rq_success::",
            "::rq_error::", "::rq_timeout::", "::cx_active::", "::rq_active::")
    sel = lambda ls: sorted(l for l in ls if any(k in l for k in keep))
    assert sel(tp) == sel(te), (sel(tp), sel(te))
    for n in ("b", "dead"):
        assert jp[n].get("circuit_breakers") == je[n].get("circuit_breakers"), (n, jp[n], je[n])
        assert _host_stats(jp[n]) == _host_stats(je[n]), (n, _host_stats(jp[n]), _host_stats(je[n]))
