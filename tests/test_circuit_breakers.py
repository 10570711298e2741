"""Cluster circuit breakers side by side with Envoy (review finding F9).

Envoy checks ``max_requests`` when a request is attached to an upstream connection (HTTP/1.1 or
HTTP/2 stream), not before it is queued: a request waiting in the pool's queue is bounded by
``max_pending_requests`` alone. An overflow is answered 503 ``reset reason: overflow`` with
``x-envoy-overloaded: true`` (unless the router's ``suppress_envoy_headers``) and counted in
``upstream_rq_503`` and ``upstream_rq_pending_overflow`` (the queue was full) or
``upstream_rq_active_overflow`` (``max_requests`` at attach time). Istio maps DestinationRule ``http2MaxRequests`` / ``http1MaxPendingRequests``
onto these thresholds.

Every scenario is event-driven: the held request is answered only when the test releases it, and
the next step waits for the proxy's own gauges (``upstream_rq_pending_active``).
"""

import threading
import time

import pytest

from h2_upstream_util import ThreadedH2Upstream, answer
from proxy_util import Envoy, HttpBackend, Pyproxy, one_route_bootstrap, request, simple_response

KINDS = [Pyproxy, Envoy]
OVERFLOW_BODY = b"upstream connect error or disconnect/reset before headers. reset reason: overflow"


def _wait(pred, what, timeout=8.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.02)
    raise AssertionError("timed out waiting for " + what)


class _Client(threading.Thread):
    """One HTTP/1.1 request on its own connection, in a thread."""

    def __init__(self, port, path, headers=None):
        super().__init__(daemon=True)
        self.port, self.path, self.headers = port, path, headers
        self.result = None
        self.start()

    def run(self):
        try:
            self.result = request(self.port, path=self.path, headers=self.headers, timeout=10)
        except OSError as e:
            self.result = ("error", str(e), b"")

    def get(self):
        self.join(12)
        assert not self.is_alive()
        return self.result


def _counters(p, names):
    st = p.stats()
    return {n: st.get("cluster.b." + n, 0) for n in names}


def _shape(res):
    st, h, body = res
    return st, h.get("x-envoy-overloaded"), body


class GatedH2(ThreadedH2Upstream):
    """An HTTP/2 upstream: a request whose path starts with ``/hold`` is answered once ``gate`` is
    set, one with ``/kill`` closes the connection, any other is answered at once."""

    poll = 0.05

    def __init__(self):
        self.gate = threading.Event()
        self.received = 0
        super().__init__()

    def on_request(self, conn, e, state):
        with self.lock:
            self.received += 1
        path = dict(e.headers).get(":path", "")
        if path.startswith("/kill"):
            return False  # (the connection dies under the request)
        if path.startswith("/hold"):
            state.setdefault("held", []).append(e.stream_id)
        else:
            answer(conn, e.stream_id)
        return True

    def on_tick(self, conn, state):
        held = state.get("held")
        if held and self.gate.is_set():
            for sid in held:
                answer(conn, sid)
            held.clear()


def _h1_queue_scenario(kind):
    """max_requests 1, max_pending_requests 1, max_connections 1: A is attached; B waits for the
    connection (pending, not shed by max_requests); C and D overflow the pending queue."""
    gate = threading.Event()

    def handler(req, sock):
        if req.path.startswith("/hold"):
            gate.wait(10)
        return simple_response(200, b"ok")
    with HttpBackend(handler) as be:
        bs, _ = one_route_bootstrap([be.port], cluster_extra={"circuit_breakers": {"thresholds": [
            {"max_requests": 1, "max_pending_requests": 1, "max_connections": 1, "max_retries": 0}]}},
            route_extra={"timeout": "8s", "retry_policy": {"retry_on": "5xx,reset", "num_retries": 2}})
        with kind(bs) as p:
            try:
                a = _Client(p.port, "/hold")
                _wait(lambda: len(be.requests) == 1, "A at the backend")
                b = _Client(p.port, "/b")
                _wait(lambda: p.stat("cluster.b.upstream_rq_pending_active") == 1, "B pending")
                c, d = _Client(p.port, "/c"), _Client(p.port, "/d")
                shed = [_shape(c.get()), _shape(d.get())]
            finally:
                gate.set()
            served = [_shape(a.get()), _shape(b.get())]
            return served, shed, _counters(p, ("upstream_rq_pending_overflow", "upstream_cx_overflow",
                                               "upstream_rq_503", "upstream_rq_200", "upstream_rq_retry"))


@pytest.fixture(scope="module")
def h1_queue():
    return {k.__name__: _h1_queue_scenario(k) for k in KINDS}


def test_h1_pending_request_not_shed_by_max_requests(h1_queue):
    for kind, (served, shed, counters) in h1_queue.items():
        assert served == [(200, None, b"ok")] * 2, (kind, served)
        assert shed == [(503, "true", OVERFLOW_BODY)] * 2, (kind, shed)
        assert counters == {"upstream_rq_pending_overflow": 2, "upstream_cx_overflow": 1, "upstream_rq_503": 2,
                            "upstream_rq_200": 2, "upstream_rq_retry": 0}, (kind, counters)


def test_h1_pending_same_as_envoy(h1_queue):
    assert h1_queue["Pyproxy"] == h1_queue["Envoy"]


def _h1_attach_scenario(kind, suppress=False):
    """max_requests 1 with 2 connections allowed: B is queued, a second connection opens, and B
    overflows when it would be attached to it (Envoy's attach-time check)."""
    gate = threading.Event()

    def handler(req, sock):
        if req.path.startswith("/hold"):
            gate.wait(10)
        return simple_response(200, b"ok")
    hcm_extra = {}
    if suppress:
        hcm_extra["http_filters"] = [{"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router",
            "suppress_envoy_headers": True}}]
    with HttpBackend(handler) as be:
        bs, _ = one_route_bootstrap([be.port], hcm_extra=hcm_extra, cluster_extra={"circuit_breakers": {
            "thresholds": [{"max_requests": 1, "max_pending_requests": 4, "max_connections": 2}]}})
        with kind(bs) as p:
            try:
                a = _Client(p.port, "/hold")
                _wait(lambda: len(be.requests) == 1, "A at the backend")
                shed = _shape(_Client(p.port, "/b").get())
            finally:
                gate.set()
            served = _shape(a.get())
            return served, shed, _counters(p, ("upstream_rq_pending_overflow", "upstream_rq_active_overflow",
                                               "upstream_cx_overflow", "upstream_rq_503", "upstream_cx_total"))


@pytest.mark.parametrize("suppress", [False, True])
def test_h1_max_requests_checked_at_attach(suppress):
    res = {k.__name__: _h1_attach_scenario(k, suppress) for k in KINDS}
    for kind, (served, shed, counters) in res.items():
        assert served == (200, None, b"ok"), (kind, served)
        assert shed == (503, None if suppress else "true", OVERFLOW_BODY), (kind, shed)
        assert counters == {"upstream_rq_pending_overflow": 0, "upstream_rq_active_overflow": 1,
                            "upstream_cx_overflow": 0, "upstream_rq_503": 1, "upstream_cx_total": 2}, (kind, counters)
    assert res["Pyproxy"] == res["Envoy"]


def _h2_scenario(kind, cb, streams):
    """An HTTP/2 upstream: A (held) is attached, then B, then C, each once the previous one is at
    the upstream or queued."""
    up = GatedH2()
    try:
        extra = {"circuit_breakers": {"thresholds": [cb]},
                 "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                     "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                     "explicit_http_config": {"http2_protocol_options": {"max_concurrent_streams": streams}}}}}
        bs, _ = one_route_bootstrap([up.port], cluster_extra=extra)
        with kind(bs) as p:
            try:
                a = _Client(p.port, "/hold")
                _wait(lambda: up.received == 1, "A at the upstream")
                b = _Client(p.port, "/hold-b")
                _wait(lambda: b.result is not None or p.stat("cluster.b.upstream_rq_pending_active") == 1, "B")
                c = _Client(p.port, "/hold-c")
                _wait(lambda: c.result is not None or p.stat("cluster.b.upstream_rq_pending_active") == 2, "C")
                time.sleep(0.2)  # (nothing more is due: what was to be shed is shed)
            finally:
                up.gate.set()
            out = [_shape(x.get()) for x in (a, b, c)]
            return out, _counters(p, ("upstream_rq_pending_overflow", "upstream_rq_active_overflow",
                                      "upstream_rq_503", "upstream_rq_200", "upstream_cx_total"))
    finally:
        up.close()


def test_h2_max_requests_is_the_stream_limit():
    """max_requests 1 on an HTTP/2 upstream: the connection has free streams, but B and C
    overflow as they would be attached."""
    cb = {"max_requests": 1, "max_pending_requests": 1}
    res = {k.__name__: _h2_scenario(k, cb, 100) for k in KINDS}
    for kind, (out, counters) in res.items():
        assert out == [(200, None, b"ok")] + [(503, "true", OVERFLOW_BODY)] * 2, (kind, out)
        assert counters == {"upstream_rq_pending_overflow": 0, "upstream_rq_active_overflow": 2,
                            "upstream_rq_503": 2, "upstream_rq_200": 1, "upstream_cx_total": 1}, (kind, counters)
    assert res["Pyproxy"] == res["Envoy"]


def test_h2_queued_requests_bounded_by_max_pending_only():
    """One stream per connection, one connection: B and C wait in the queue (max_pending 2) while
    max_requests 2 counts only A, the attached one; all three are served in turn."""
    cb = {"max_requests": 2, "max_pending_requests": 2, "max_connections": 1}
    res = {k.__name__: _h2_scenario(k, cb, 1) for k in KINDS}
    for kind, (out, counters) in res.items():
        assert out == [(200, None, b"ok")] * 3, (kind, out)
        assert counters == {"upstream_rq_pending_overflow": 0, "upstream_rq_active_overflow": 0,
                            "upstream_rq_503": 0, "upstream_rq_200": 3, "upstream_cx_total": 1}, (kind, counters)
    assert res["Pyproxy"] == res["Envoy"]


def test_h2_connection_loss_frees_its_requests():
    """Requests failed by their HTTP/2 connection's end no longer count against max_requests
    (else a cluster would shed everything after max_requests lost connections)."""
    cb = {"max_requests": 2}
    for kind in KINDS:
        up = GatedH2()
        try:
            extra = {"circuit_breakers": {"thresholds": [cb]},
                     "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                         "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                         "explicit_http_config": {"http2_protocol_options": {}}}}}
            bs, _ = one_route_bootstrap([up.port], cluster_extra=extra)
            with kind(bs) as p:
                lost = [request(p.port, path="/kill", timeout=8)[0] for _ in range(3)]
                after = [_shape(request(p.port, path="/ok", timeout=8)) for _ in range(2)]
            assert lost == [503] * 3, (kind.__name__, lost)
            assert after == [(200, None, b"ok")] * 2, (kind.__name__, after)
        finally:
            up.close()


def test_h1_connection_loss_frees_its_requests():
    """The same with HTTP/1.1 upstream connections closed under their requests."""
    def handler(req, sock):
        return "close" if req.path.startswith("/kill") else simple_response(200, b"ok")
    for kind in KINDS:
        with HttpBackend(handler) as be:
            bs, _ = one_route_bootstrap([be.port], cluster_extra={"circuit_breakers": {"thresholds": [
                {"max_requests": 2}]}})
            with kind(bs) as p:
                lost = [request(p.port, path="/kill", timeout=8)[0] for _ in range(3)]
                after = [_shape(request(p.port, path="/ok", timeout=8)) for _ in range(2)]
            assert lost == [503] * 3, (kind.__name__, lost)
            assert after == [(200, None, b"ok")] * 2, (kind.__name__, after)
