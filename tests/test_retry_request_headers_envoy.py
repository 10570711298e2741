"""Retry policy fields side by side with Envoy (review finding F46): ``retriable_request_headers``
(a request that matches none of them is never retried: a POST on a GET-only policy reaches the
upstream once) and ``rate_limited_retry_back_off`` (the retry waits the interval the upstream's
``retry-after`` announces, counted as ``upstream_rq_retry_backoff_ratelimited``). Each proxy gets its
own scripted upstream (first request per path fails, then 200)."""

from __future__ import annotations

import threading
import time

import pytest

from proxy_util import (ENVOY, Envoy, HttpBackend, Pyproxy, bootstrap, cluster, free_port, http_listener, route,
                        route_config, simple_response, until_close, with_fresh_ports)

pytestmark = pytest.mark.skipif(not ENVOY, reason="envoy not installed")


class _Upstream:
    def __init__(self):
        self.lock = threading.Lock()
        self.seen = {}  # path -> [monotonic time of each request]
        self.be = HttpBackend(self.handle)

    def handle(self, req, sock):
        with self.lock:
            times = self.seen.setdefault(req.path, [])
            times.append(time.monotonic())
            n = len(times)
        if n == 1 and req.path.startswith("/rl"):
            return simple_response(429, b"slow down", [("retry-after", "1")])
        if n == 1:
            return simple_response(503, b"busy")
        return simple_response(200, b"ok")


def _bs(port):
    rs = [
        route("/m/", "b", timeout="5s", retry_policy={
            "retry_on": "5xx", "num_retries": 1,
            "retriable_request_headers": [{"name": ":method", "string_match": {"exact": "GET"}}]}),
        route("/rl", "b", timeout="5s", retry_policy={
            "retry_on": "retriable-status-codes", "retriable_status_codes": [429], "num_retries": 1,
            "rate_limited_retry_back_off": {"reset_headers": [{"name": "retry-after", "format": "SECONDS"}],
                                            "max_interval": "5s"}}),
    ]
    return bootstrap([http_listener(free_port(), route_config(rs))], [cluster("b", [port])])


def _req(port, method, path):
    body = b"x" if method == "POST" else b""
    return until_close(port, ("%s %s HTTP/1.1\r\nHost: x\r\nconnection: close\r\ncontent-length: %d\r\n\r\n"
                              % (method, path, len(body))).encode() + body, 6)[9:12].decode()


@pytest.fixture(scope="module")
def results():
    out = {}
    for name, cls in (("pyproxy", Pyproxy), ("envoy", Envoy)):
        up = _Upstream()
        try:
            with cls(with_fresh_ports(_bs(up.be.port))) as p:
                s0 = p.stats()
                res = {"get": _req(p.port, "GET", "/m/get"), "post": _req(p.port, "POST", "/m/post"),
                       "rl": _req(p.port, "GET", "/rl")}
                s1 = p.stats()
                res["counters"] = {k: s1.get(k, 0) - s0.get(k, 0) for k in (
                    "cluster.b.upstream_rq_retry", "cluster.b.upstream_rq_retry_backoff_ratelimited",
                    "cluster.b.upstream_rq_retry_backoff_exponential")}
                with up.lock:
                    res["attempts"] = {k: len(v) for k, v in up.seen.items()}
                    rl = up.seen.get("/rl", [])
                    res["rl_gap"] = rl[1] - rl[0] if len(rl) == 2 else None
        finally:
            up.be.close()
        out[name] = res
    return out


def test_retriable_request_headers_keep_post_unretried(results):
    for name, r in results.items():
        assert (r["get"], r["attempts"]["/m/get"]) == ("200", 2), (name, r)
        assert (r["post"], r["attempts"]["/m/post"]) == ("503", 1), (name, r)


def test_rate_limited_retry_waits_retry_after(results):
    for name, r in results.items():
        assert r["rl"] == "200" and r["attempts"]["/rl"] == 2, (name, r)
        assert 0.9 <= r["rl_gap"] < 2.5, (name, r)
    assert results["pyproxy"]["counters"] == results["envoy"]["counters"], results
