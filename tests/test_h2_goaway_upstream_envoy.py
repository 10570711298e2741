"""HTTP/2 upstream GOAWAY, side by side with Envoy (review findings F29, F30).

- A stream beyond the GOAWAY's last_stream_id (not processed by the peer) is a refused stream for
  the request's router: without a retry policy a 503 (``remote_refused_stream_reset``, UR) after
  one attempt; with Istio's default policy (refused-stream, 2 retries) three attempts, counted as
  retries, then 503 URX. It is never replayed behind the router's back (an upstream that refuses
  the first stream of every connection used to get one connection after another).
- A request dispatched in the same read as a graceful GOAWAY (last_stream_id = the answered
  stream; pipelined HTTP/1.1 requests downstream) goes to a new connection, not the closing one.
Scripted h2c upstream (the ``h2`` library); HTTP/1.1 client."""

from __future__ import annotations

import re
import socket
import time

import pytest

from h2_upstream_util import ThreadedH2Upstream, answer
from proxy_util import (ENVOY, Envoy, Pyproxy, bootstrap, cluster, free_port, http_listener, recv_until, route,
                        route_config, with_fresh_ports)

pytestmark = pytest.mark.skipif(not ENVOY, reason="envoy not installed")
HPO = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
ISTIO_RP = {"retry_on": "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes",
            "num_retries": 2, "retriable_status_codes": [503]}
KEYS = ("cluster.b.upstream_cx_total", "cluster.b.upstream_rq_503", "cluster.b.upstream_rq_200",
        "cluster.b.upstream_rq_retry", "cluster.b.upstream_rq_retry_limit_exceeded")


class _Up(ThreadedH2Upstream):
    poll = 0.05

    def __init__(self):
        super().__init__()
        self.requests = []

    def on_request(self, conn, ev, state):
        sid = ev.stream_id
        path = dict(ev.headers)[":path"]
        with self.lock:
            self.requests.append(path)
        if path.startswith("/refuse") and not state.get("refused"):
            state["refused"] = True  # (the first stream of every connection: not processed)
            conn.close_connection(0, last_stream_id=0)
            return True
        answer(conn, sid)
        if path.startswith("/graceful"):
            conn.close_connection(0, last_stream_id=sid)  # (answered, then no more streams)
        return True


def _bs(port):
    c = cluster("b", [port], typed_extension_protocol_options={HPO: {
        "@type": "type.googleapis.com/" + HPO, "explicit_http_config": {"http2_protocol_options": {}}}})
    rs = [route("/refuse-istio", "b", retry_policy=ISTIO_RP), route("/", "b", timeout="3s")]
    return bootstrap([http_listener(free_port(), route_config(rs))], [c])


def _send(port, data, n_responses, timeout=6.0):
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        s.sendall(data)
        buf = recv_until(s, timeout, lambda b: len(re.findall(rb"HTTP/1.1 \d+", b)) >= n_responses)[0]
    finally:
        s.close()
    return [m.decode() for m in re.findall(rb"HTTP/1.1 (\d+)", buf)], buf


def _run(data, n):
    out = {}
    for name, cls in (("pyproxy", Pyproxy), ("envoy", Envoy)):
        up = _Up()
        try:
            with cls(with_fresh_ports(_bs(up.port))) as p:
                s0 = p.stats()
                statuses, body = _send(p.port, data, n)
                time.sleep(0.2)
                s1 = p.stats()
                with up.lock:
                    reqs = list(up.requests)
                out[name] = (statuses, {k: s1.get(k, 0) - s0.get(k, 0) for k in KEYS}, reqs, body)
        finally:
            up.close()
    return out


def test_refused_by_goaway_without_retry_policy_is_503():
    res = _run(b"GET /refuse HTTP/1.1\r\nHost: x\r\n\r\n", 1)
    for name, (statuses, counters, reqs, body) in res.items():
        assert statuses == ["503"], (name, res)
        assert b"remote refused stream reset" in body, (name, body)
        assert reqs == ["/refuse"], (name, reqs)
    assert res["pyproxy"][:3] == res["envoy"][:3], res


def test_refused_by_goaway_with_istio_policy_is_retried_twice():
    res = _run(b"GET /refuse-istio HTTP/1.1\r\nHost: x\r\n\r\n", 1)
    for name, (statuses, counters, reqs, body) in res.items():
        assert statuses == ["503"], (name, res)
        assert len(reqs) == 3, (name, reqs)
        assert counters["cluster.b.upstream_rq_retry"] == 2, (name, counters)
    assert res["pyproxy"][:3] == res["envoy"][:3], res


def test_request_in_the_same_read_as_a_graceful_goaway_gets_a_new_connection():
    res = _run(b"GET /graceful1 HTTP/1.1\r\nHost: x\r\n\r\nGET /graceful2 HTTP/1.1\r\nHost: x\r\n\r\n", 2)
    for name, (statuses, counters, reqs, body) in res.items():
        assert statuses == ["200", "200"], (name, res)
    assert res["pyproxy"][0] == res["envoy"][0], res
