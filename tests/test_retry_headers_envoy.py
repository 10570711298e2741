"""Retry-related headers, side by side with Envoy (review finding F6): ``include_attempt_count_in_response``
(``x-envoy-attempt-count`` on the downstream response, local replies after attempts included),
``include_request_attempt_count`` and ``include_is_timeout_retry_header`` on each attempt, and
``x-envoy-expected-rq-timeout-ms`` carrying what is left of the route timeout on a retry (the per-try
timeout when shorter). Real sockets; one scripted upstream shared by pyproxy and Envoy."""

from __future__ import annotations

import threading
import time

import pytest

from proxy_util import (HttpBackend, bootstrap, both_ways, cluster, free_port, get_close, http_listener, raw,
                        route, route_config, simple_response)

_state: dict = {}
_lock = threading.Lock()


def _handler(req, sock):
    with _lock:
        n = _state.get(req.path, 0)
        _state[req.path] = n + 1
    if req.path.endswith("/503x1"):
        return simple_response(503, b"busy") if n == 0 else simple_response(200, b"ok")
    if req.path.endswith("/503"):
        return simple_response(503, b"busy")
    if req.path.endswith("/slow1"):
        if n == 0:
            time.sleep(1.0)  # past the 0.3 s per-try timeout (the proxy gave up on it long before)
        return simple_response(200, b"ok")
    if req.path.endswith("/sleep300"):
        time.sleep(0.3)
        return simple_response(503, b"busy") if n == 0 else simple_response(200, b"ok")
    return simple_response(200, b"ok")


RP = {"retry_on": "5xx", "num_retries": 2}


def _bs(be_port):
    rc = route_config([
        route("/r/", "b", retry_policy=RP, timeout="4s"),
        route("/pt/", "b", retry_policy=dict(RP, per_try_timeout="0.3s"), timeout="4s"),
        route("/", "b")],
        include_request_attempt_count=True, include_attempt_count_in_response=True,
        include_is_timeout_retry_header=True)
    return bootstrap([http_listener(free_port(), rc)], [cluster("b", [be_port])])


@pytest.fixture(scope="module")
def pair():
    be = HttpBackend(_handler)
    try:
        for procs in both_ways(_bs(be.port)):
            yield be, procs
    finally:
        be.close()


def _get(port, path):
    out = raw(port, get_close(path), timeout=8)
    head = out.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    hdrs = {}
    for line in head[1:]:
        k, _, v = line.partition(": ")
        hdrs.setdefault(k.lower(), []).append(v)
    return head[0].split(" ")[1], hdrs


def _run(pair, path):
    """For each proxy: (status, response attempt-count values, [per upstream request: (attempt count,
    is-timeout-retry, expected timeout ms)])."""
    be, procs = pair
    out = {}
    for name, (p, port) in procs.items():
        with _lock:
            _state.clear()
        n0 = len(be.requests)
        status, hdrs = _get(port, path)
        time.sleep(1.2)  # (an abandoned slow attempt ends at the upstream)
        ups = [(r.header("x-envoy-attempt-count"), r.header("x-envoy-is-timeout-retry"),
                r.header("x-envoy-expected-rq-timeout-ms")) for r in be.requests[n0:]]
        out[name] = (status, hdrs.get("x-envoy-attempt-count"), ups)
    return out


def test_attempt_count_in_response_after_a_retry(pair):
    res = _run(pair, "/r/503x1")
    for name, (status, count, ups) in res.items():
        assert status == "200" and count == ["2"], (name, res)
        assert [u[:2] for u in ups] == [("1", None), ("2", "false")], (name, res)
    assert res["pyproxy"][:2] == res["envoy"][:2]


def test_attempt_count_in_response_first_try_and_exhausted(pair):
    for path, want in (("/r/ok", ("200", ["1"])), ("/r/503", ("503", ["3"])), ("/plain", ("200", ["1"]))):
        res = _run(pair, path)
        for name, (status, count, ups) in res.items():
            assert (status, count) == want, (path, name, res)


def test_expected_timeout_left_on_retry(pair):
    """The retry announces what is left of the 4 s route timeout (about 3.7 s after a 0.3 s attempt)."""
    res = _run(pair, "/r/sleep300")
    for name, (status, count, ups) in res.items():
        assert status == "200" and len(ups) == 2, (name, res)
        first, second = int(ups[0][2]), int(ups[1][2])
        assert first == 4000, (name, res)
        assert 2500 <= second <= 3750, (name, res)


def test_per_try_timeout_retry_headers(pair):
    """A per-try timeout's retry: x-envoy-is-timeout-retry true; the per-try timeout (shorter than
    what is left of the route's) is what each attempt is told to expect."""
    res = _run(pair, "/pt/slow1")
    for name, (status, count, ups) in res.items():
        assert status == "200" and count == ["2"], (name, res)
        assert ups == [("1", None, "300"), ("2", "true", "300")], (name, res)
