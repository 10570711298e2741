"""The router's control headers on internal requests, side by side with Envoy 1.40 (review finding
F18b): ``x-envoy-upstream-rq-timeout-ms``, ``x-envoy-upstream-rq-per-try-timeout-ms``,
``x-envoy-max-retries``, ``x-envoy-retry-on``, ``x-envoy-retry-grpc-on``,
``x-envoy-retriable-status-codes``, ``x-envoy-upstream-rq-timeout-alt-response``,
``x-envoy-hedge-on-per-try-timeout`` and ``x-envoy-expected-rq-timeout-ms``
(``respect_expected_rq_timeout``) are acted on when ``internal_address_config`` makes the client
internal, consumed (never forwarded) except the expected timeout, which the router rewrites; they are
stripped without effect from external requests. ``x-envoy-upstream-stream-duration-ms`` is consumed
and acted on for every request (Envoy's connection manager does not strip it).

Real sockets: a recording backend (slow, failing-then-succeeding answers) shared by the two proxies;
each case runs on both and compares the status, the attempts the backend saw and the control
headers it received. Timing margins: timeouts of 0.3 s against answers 1.5 s late."""

from __future__ import annotations

import threading
import time

import pytest

from proxy_util import (ENVOY, ROUTER_TYPE, Envoy, HttpBackend, Pyproxy, bootstrap, cluster, free_port,
                        http_listener, raw, route, route_config, simple_response)

_count: dict = {}
_lock = threading.Lock()


def _handler(req, sock):
    with _lock:
        n = _count.get(req.path, 0)
        _count[req.path] = n + 1
    tail = req.path.rsplit("/", 1)[-1]
    if tail == "slow":
        time.sleep(1.5)
        return simple_response(200, b"late")
    if tail == "slowfirst":
        if n == 0:
            time.sleep(1.5)
        return simple_response(200, b"ok")
    if tail == "503once":
        return simple_response(503 if n == 0 else 200, b"x")
    if tail == "503":
        return simple_response(503, b"busy")
    if tail == "418once":
        return simple_response(418 if n == 0 else 200, b"x")
    if tail == "hdronce":
        return simple_response(200, b"x", [("x-retry-me", "1")] if n == 0 else [])
    if tail == "grpcunavail":
        return simple_response(200, b"", [("content-type", "application/grpc"), ("grpc-status", "14")]) \
            if n == 0 else simple_response(200, b"", [("content-type", "application/grpc"), ("grpc-status", "0")])
    return simple_response(200, b"ok")


INTERNAL = {"use_remote_address": True,
            "internal_address_config": {"cidr_ranges": [{"address_prefix": "127.0.0.1", "prefix_len": 32}]}}


def _router(**cfg):
    return [{"name": "envoy.filters.http.router", "typed_config": dict({"@type": ROUTER_TYPE}, **cfg)}]


LISTENERS = {
    "internal": dict(INTERNAL),
    "external": {"use_remote_address": True},
    "respect": dict(INTERNAL, http_filters=_router(respect_expected_rq_timeout=True)),
    "suppress": dict(INTERNAL, http_filters=_router(suppress_envoy_headers=True)),
}


def _bs(be_port):
    ls = []
    for name, extra in LISTENERS.items():
        rc = route_config([route("/rp/", "b", timeout="5s", retry_policy={"retry_on": "gateway-error"}),
                           route("/", "b", timeout="5s")])
        ls.append(http_listener(free_port(), rc, name=name, **extra))
    return bootstrap(ls, [cluster("b", [be_port])])


@pytest.fixture(scope="module")
def pair():
    be = HttpBackend(_handler)
    procs = []
    try:
        for cls in (Pyproxy, Envoy) if ENVOY else (Pyproxy,):
            procs.append(cls(_bs(be.port)))
        yield be, procs
    finally:
        for p in procs:
            p.stop()
        be.close()


CONTROL = ("x-envoy-upstream-rq-timeout-ms", "x-envoy-upstream-rq-per-try-timeout-ms", "x-envoy-max-retries",
           "x-envoy-retry-on", "x-envoy-retry-grpc-on", "x-envoy-retriable-status-codes",
           "x-envoy-upstream-rq-timeout-alt-response", "x-envoy-hedge-on-per-try-timeout",
           "x-envoy-expected-rq-timeout-ms", "x-envoy-upstream-stream-duration-ms")

# (case id, listener, path tail, request headers, expected (status, attempts) on pyproxy)
CASES = [
    ("timeout", "internal", "slow", {"x-envoy-upstream-rq-timeout-ms": "300"}, (504, 1)),
    ("timeout-bad", "internal", "ok", {"x-envoy-upstream-rq-timeout-ms": "abc"}, (200, 1)),
    ("timeout-ext", "external", "ok", {"x-envoy-upstream-rq-timeout-ms": "300"}, (200, 1)),
    ("alt", "internal", "slow", {"x-envoy-upstream-rq-timeout-ms": "300",
                                 "x-envoy-upstream-rq-timeout-alt-response": "1"}, (204, 1)),
    ("per-try", "internal", "slow", {"x-envoy-upstream-rq-per-try-timeout-ms": "300"}, (504, 1)),
    ("per-try-retry", "internal", "slowfirst", {"x-envoy-upstream-rq-per-try-timeout-ms": "300",
                                                "x-envoy-retry-on": "5xx"}, (200, 2)),
    ("hedge", "internal", "slowfirst", {"x-envoy-upstream-rq-per-try-timeout-ms": "300", "x-envoy-retry-on": "5xx",
                                        "x-envoy-hedge-on-per-try-timeout": "true"}, (200, 2)),
    ("header-names", "internal", "hdronce", {"x-envoy-retry-on": "retriable-headers",
                                             "x-envoy-retriable-header-names": "x-other, x-retry-me"}, (200, 2)),
    ("retry-on", "internal", "503once", {"x-envoy-retry-on": "5xx"}, (200, 2)),
    ("retry-on-ext", "external", "503once", {"x-envoy-retry-on": "5xx"}, (503, 1)),
    ("max-retries", "internal", "503", {"x-envoy-retry-on": "5xx", "x-envoy-max-retries": "3"}, (503, 4)),
    ("max-retries-alone", "internal", "503", {"x-envoy-max-retries": "3"}, (503, 1)),
    ("max-retries-route", "internal", "rp/503", {"x-envoy-max-retries": "2"}, (503, 3)),
    ("retry-on-route", "internal", "rp/503", {"x-envoy-retry-on": "retriable-4xx"}, (503, 2)),
    ("status-codes", "internal", "418once", {"x-envoy-retry-on": "retriable-status-codes",
                                             "x-envoy-retriable-status-codes": "500,418"}, (200, 2)),
    ("grpc-on", "internal", "grpcunavail", {"x-envoy-retry-grpc-on": "unavailable",
                                            "content-type": "application/grpc"}, (200, 2)),
    ("expected", "internal", "ok", {"x-envoy-expected-rq-timeout-ms": "300"}, (200, 1)),
    ("respect", "respect", "slow", {"x-envoy-expected-rq-timeout-ms": "300"}, (504, 1)),
    ("respect-rq", "respect", "slow", {"x-envoy-upstream-rq-timeout-ms": "300"}, (504, 1)),
    ("suppress", "suppress", "slow", {"x-envoy-upstream-rq-timeout-ms": "300",
                                      "x-envoy-expected-rq-timeout-ms": "7"}, (504, 1)),
    # (consumed, and no visible effect on an HTTP/1.1 upstream in Envoy 1.40)
    ("duration", "external", "ok", {"x-envoy-upstream-stream-duration-ms": "300"}, (200, 1)),
    ("duration-int", "internal", "ok", {"x-envoy-upstream-stream-duration-ms": "300"}, (200, 1)),
]


def _run(be, p, lname, path, headers):
    port = p.ports[list(LISTENERS).index(lname)]
    extra = "".join("%s: %s\r\n" % kv for kv in headers.items())
    t0 = time.monotonic()
    out = raw(port, ("GET %s HTTP/1.1\r\nhost: h\r\n%sconnection: close\r\n\r\n" % (path, extra)).encode(), timeout=6)
    took = time.monotonic() - t0
    status = int(out.split(b" ", 2)[1]) if out.startswith(b"HTTP/1.1 ") else 0
    seen = [r for r in be.requests if r.path == path]
    # (a retry's expected timeout is what is left of the route's: its value depends on timing)
    ctl = [sorted((k, v if i == 0 or k != "x-envoy-expected-rq-timeout-ms" else "<left>")
                  for k, v in r.headers if k in CONTROL) for i, r in enumerate(seen)]
    return status, len(seen), ctl, took


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_router_control_headers_as_envoy(pair, case):
    cid, lname, tail, headers, want = case
    be, procs = pair
    got = {}
    for p in procs:
        path = "/%s/%s/%s" % (cid, p.kind, tail) if not tail.startswith("rp/") else "/rp/%s/%s/%s" % (
            cid, p.kind, tail[3:])
        got[p.kind] = _run(be, p, lname, path, headers)
    status, attempts, ctl, took = got["pyproxy"]
    assert (status, attempts) == want, got
    if want[0] in (504, 204, 408):
        assert took < 1.2, got  # (the answer was 1.5 s late: the header's timeout ended it)
    if "envoy" in got:
        assert got["pyproxy"][:3] == got["envoy"][:3], got
