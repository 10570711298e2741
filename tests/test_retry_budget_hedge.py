"""Retry budgets (``circuit_breakers.thresholds[].retry_budget``), Envoy's retry accounting
(overflow, limit exceeded, success, ``retry.upstream_rq_*``) and ``hedge_policy`` on per-try
timeouts, compared with Envoy request for request and stat for stat."""

import math
import threading
import time

import pytest

from tests.proxy_util import (ENVOY, HttpBackend, bootstrap, cluster, free_port, http_listener, proxies,
                              request, route, route_config, simple_response, validate)

pytestmark = pytest.mark.skipif(ENVOY is None, reason="envoy binary not on PATH")

RETRY_STATS = ("upstream_rq_retry", "upstream_rq_retry_overflow", "upstream_rq_retry_limit_exceeded",
               "upstream_rq_retry_success", "retry.upstream_rq_503", "upstream_rq_503",
               "upstream_rq_200", "upstream_rq_per_try_timeout")


def _stats(px):
    st = px.stats()
    return {k: st.get("cluster.b." + k, 0) for k in RETRY_STATS}


class SlotBackend(HttpBackend):
    """Answers 503 (or 200 for /ok paths) in lock step: every request is held until the next
    whole slot after it arrived, so requests of one round are answered together whatever the
    machine's load, and the proxies' retry decisions see the same concurrency."""

    SLOT = 1.0

    def __init__(self):
        self.t0 = None
        self.lk = threading.Lock()
        super().__init__(handler=self._slot)

    def _slot(self, req, sock):
        with self.lk:
            now = time.monotonic()
            if self.t0 is None:
                self.t0 = now
        # answers go out at t0 + 1, 2, 3...: the first boundary at least 0.2 s away (so a round's
        # requests may trickle in over 0.8 s on a busy machine and still be answered together)
        m = max(0, math.ceil((now + 0.2 - self.t0 - 1.0) / self.SLOT))
        if req.path.startswith("/ok"):
            m = max(m, 2)  # the long ones: active until the third slot
        time.sleep(max(0.0, self.t0 + 1.0 + m * self.SLOT - time.monotonic()))
        return simple_response(200 if req.path.startswith("/ok") else 503, b"x")


def _budget_run(proxy_cls, budget, n, n_ok=0, num_retries=2):
    with SlotBackend() as be:
        port = free_port()
        rt = route("/", "b", retry_policy={
            "retry_on": "5xx", "num_retries": num_retries,
            "retry_back_off": {"base_interval": "0.2s", "max_interval": "0.2s"}})
        cb = {"thresholds": [{"retry_budget": budget}]} if budget is not None else \
            {"thresholds": [{"max_retries": 1}]}
        bs = bootstrap([http_listener(port, route_config([rt]))],
                       [cluster("b", [be.port], circuit_breakers=cb)])
        with proxy_cls(bs) as px:
            res = []
            lock = threading.Lock()

            def one(i):
                try:
                    st, _, body = request(px.port, "GET", "/%s" % i, timeout=15)
                except OSError as e:
                    st, body = "error", str(e).encode()
                with lock:
                    res.append((st, body))

            ts = [threading.Thread(target=one, args=("ok%d" % i,)) for i in range(n_ok)]
            ts += [threading.Thread(target=one, args=(i,)) for i in range(n)]
            for t in ts:
                t.start()
            for t in ts:
                t.join(20)
            return sorted(res), _stats(px), len(be.requests)


@pytest.mark.parametrize("budget,n,n_ok", [
    ({"budget_percent": {"value": 0.0}, "min_retry_concurrency": 1}, 4, 0),
    ({}, 5, 0),  # the defaults: 20 %, at least 3
    # 15 % of the 8 to 12 active requests is 1 (min_retry_concurrency 0 does not raise it)
    ({"budget_percent": {"value": 15.0}, "min_retry_concurrency": 0}, 4, 8),
    (None, 3, 0),  # no budget: max_retries 1
], ids=["percent0_min1", "defaults", "percent15_min0", "max_retries"])
def test_retry_budget_overflow_matches_envoy(budget, n, n_ok):
    """Concurrent requests whose upstream answers 503 (all in the same instants, so that both
    proxies see the same concurrency): how many are retried, how many overflow the budget (their
    503 goes to the client as it is) and how many run out of retries."""
    results = [_budget_run(cls, budget, n, n_ok) for cls in proxies()]
    py, ev = results
    assert py == ev
    assert py[1]["upstream_rq_retry_overflow"] > 0
    assert sum(1 for st, body in py[0] if st == 503 and body == b"x") == n
    assert sum(1 for st, body in py[0] if st == 200) == n_ok


PLANS = {  # path -> (delay s, status, body) for the first, second... request with that path
    "/a": [(1.2, 200, b"slow"), (0.0, 200, b"fast")],   # the hedge wins
    "/b": [(1.2, 200, b"slow"), (0.0, 503, b"bad")],    # the hedge fails: wait for the first
    # the first still wins, half-way between the hedge's start (0.4 s) and its own per-try
    # timeout (0.8 s): an answer near 0.8 s would race that timeout, which counts a
    # retry_limit_exceeded or not depending on the machine's load, in Envoy as in pyproxy
    "/c": [(0.6, 200, b"first"), (2.5, 200, b"second")],
    "/d": [(1.2, 503, b"bad1"), (0.0, 503, b"bad2")],   # both fail: the last answer goes out
}


def _hedge_run(proxy_cls):
    seen = {}
    lock = threading.Lock()

    def h(req, sock):
        with lock:
            i = seen.get(req.path, 0)
            seen[req.path] = i + 1
        d, st, body = PLANS[req.path][min(i, 1)]
        time.sleep(d)
        return simple_response(st, body)

    with HttpBackend(handler=h) as be:
        port = free_port()
        rt = route("/", "b", retry_policy={
            "retry_on": "5xx", "num_retries": 1, "per_try_timeout": "0.4s",
            "retry_back_off": {"base_interval": "0.01s", "max_interval": "0.01s"}},
            hedge_policy={"hedge_on_per_try_timeout": True})
        bs = bootstrap([http_listener(port, route_config([rt]))], [cluster("b", [be.port])])
        with proxy_cls(bs) as px:
            out = []
            for p in PLANS:
                t = time.monotonic()
                st, _, body = request(px.port, "GET", p, timeout=10)
                out.append((p, st, body, time.monotonic() - t))
            time.sleep(2.6)  # the losers finish (or are reset) before the stats are read
            return out, _stats(px), len(be.requests)


def test_hedge_on_per_try_timeout_matches_envoy():
    results = [_hedge_run(cls) for cls in proxies()]
    (py_out, py_stats, py_n), (ev_out, ev_stats, ev_n) = results
    assert [o[:3] for o in py_out] == [o[:3] for o in ev_out]
    assert [o[:3] for o in py_out] == [("/a", 200, b"fast"), ("/b", 200, b"slow"),
                                       ("/c", 200, b"first"), ("/d", 503, b"bad1")]
    assert py_out[0][3] < 1.0  # the hedge answered: no waiting for the slow attempt
    assert py_stats == ev_stats
    assert py_n == ev_n == 8


def _validate_route(extra):
    port = free_port()
    bs = bootstrap([http_listener(port, route_config([route("/", "b", **extra)]))],
                   [cluster("b", [1])])
    r = validate(bs)
    return r.returncode, r.stdout + r.stderr


@pytest.mark.parametrize("hp,words", [
    ({"initial_requests": 2}, "hedge_policy.initial_requests"),
    ({"additional_request_chance": {"numerator": 10}}, "hedge_policy.additional_request_chance"),
])
def test_hedge_fields_envoy_does_not_implement_are_rejected(hp, words):
    rc, out = _validate_route({"hedge_policy": hp})
    assert rc == 1 and words in out and "Envoy does not implement" in out, out
    rc, out = _validate_route({"hedge_policy": {"hedge_on_per_try_timeout": True, "initial_requests": 1}})
    assert rc == 0, out


@pytest.mark.parametrize("proxy_cls", proxies(), ids=lambda c: c.kind)
def test_retry_gives_up_past_the_buffer_limit_as_envoy(proxy_cls):
    """A request body larger than the route's per_request_buffer_limit_bytes cannot be replayed:
    no retry, the 503 goes out and retry_or_shadow_abandoned counts it; a smaller one is
    retried."""
    seen = []

    def h(req, sock):
        seen.append(len(req.body))
        return simple_response(503 if len(seen) % 2 == 1 else 200, b"r%d" % len(seen))

    with HttpBackend(handler=h) as be:
        port = free_port()
        rc = route_config([route("/", "b", retry_policy={"retry_on": "5xx", "num_retries": 1})])
        rc["virtual_hosts"][0]["routes"][0]["per_request_buffer_limit_bytes"] = 4096
        bs = bootstrap([http_listener(port, rc)], [cluster("b", [be.port])])
        with proxy_cls(bs) as px:
            st_small = request(px.port, "POST", "/s", body=b"s" * 1000)[0]
            st_big = request(px.port, "POST", "/b", body=b"b" * 20000)[0]
            st = _stats(px)
            abandoned = px.stat("cluster.b.retry_or_shadow_abandoned")
    assert (st_small, st_big) == (200, 503)
    assert abandoned == 1 and st["upstream_rq_retry"] == 1
    assert seen == [1000, 1000, 20000]
