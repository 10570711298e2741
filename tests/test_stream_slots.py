"""The stream's per-request state is in slots (http/stream.py ActiveStream, http/first_attempt.py
FirstAttempt): a slot has no class-level default, so every way a stream starts must set each one
before anything reads it. Drives requests through an in-memory listener/HCM/pool stack on both
ways a stream starts (the HTTP/1.1 codec's inline entry and the generic stream) and checks, at the
points where the stream first talks to the pool or answers locally, that no slot is unset."""

import json
import os
import sys

import pytest

from pyproxy.http.first_attempt import FirstAttempt
from pyproxy.http.stream import ActiveStream

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import micro_h1  # noqa: E402  (benchmarks/micro_h1.py: the in-memory listener/HCM/pool stack)

SLOTS = [n for c in (ActiveStream, FirstAttempt) for n in c.__slots__ if n != "__dict__"]
HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"


def _bootstrap():
    route = {"cluster": "backend", "timeout": "5s"}
    return json.dumps({"static_resources": {
        "listeners": [{"name": "l", "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                       "filter_chains": [{"filters": [{"name": "hcm", "typed_config": {
                           "@type": HCM, "stat_prefix": "t",
                           "route_config": {"virtual_hosts": [{"name": "v", "domains": ["*"], "routes": [
                               {"match": {"prefix": "/none"}, "route": {"cluster": "empty"}},
                               {"match": {"prefix": "/"}, "route": route,
                                "request_headers_to_add": [{"header": {"key": "x-r", "value": "1"},
                                                            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}],
                                "response_headers_to_add": [{"header": {"key": "x-m", "value": "1"}}]}]}]},
                           "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                               "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
                       }}]}]}],
        "clusters": [
            {"name": "backend", "type": "STATIC", "connect_timeout": "1s", "load_assignment": {
                "cluster_name": "backend", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                    "socket_address": {"address": "127.0.0.1", "port_value": 9}}}}]}]}},
            {"name": "empty", "type": "STATIC", "connect_timeout": "1s",
             "load_assignment": {"cluster_name": "empty", "endpoints": []}},
        ]}})


@pytest.fixture
def stack(monkeypatch):
    # (the in-memory stack is micro_h1's: the compiled bootstrap, a pool with one idle upstream
    # connection and a downstream connection, each over a transport that records what is written)
    loop, lm, al, cluster, host, pool = micro_h1.build_stack(_bootstrap())
    up, ut, down, dt = micro_h1.connect(loop, lm, al, cluster, host, pool)

    seen = []

    def check(where, s):
        unset = [n for n in SLOTS if not hasattr(s, n)]
        assert not unset, "%s: slots not set: %s" % (where, unset)
        seen.append(where)

    orig_ready = FirstAttempt.on_pool_ready
    orig_reply = ActiveStream.send_local_reply
    orig_decode = ActiveStream.decode_headers

    def on_pool_ready(self, encoder, h):
        check("on_pool_ready", self)
        return orig_ready(self, encoder, h)

    def send_local_reply(self, *a, **k):
        check("send_local_reply", self)
        return orig_reply(self, *a, **k)

    def decode_headers(self, headers, end_stream):
        check("decode_headers", self)
        return orig_decode(self, headers, end_stream)

    def hook(stream, headers, cluster):  # (the earliest code outside the stream a request runs)
        check("request hook", stream)

    orig_begin = FirstAttempt.begin_first_attempt

    def begin_first_attempt(self, *a):
        self.cfg.request_hooks = (hook,)  # (this test's HCM config only)
        return orig_begin(self, *a)

    monkeypatch.setattr(FirstAttempt, "begin_first_attempt", begin_first_attempt)
    monkeypatch.setattr(FirstAttempt, "on_pool_ready", on_pool_ready)
    monkeypatch.setattr(ActiveStream, "send_local_reply", send_local_reply)
    monkeypatch.setattr(ActiveStream, "decode_headers", decode_headers)
    yield down, up, dt, ut, seen
    loop.close()


RESPONSE = b"HTTP/1.1 200 OK\r\nServer: t\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok"


def test_every_slot_is_set_on_both_ways_a_stream_starts(stack):
    down, up, dt, ut, seen = stack
    # the codec's inline entry (a bodiless request): the stream runs the first attempt itself
    down.data_received(b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n")
    assert b"GET /a HTTP/1.1" in b"".join(ut.out) and b"x-r: 1" in b"".join(ut.out)
    up.data_received(RESPONSE)
    assert b"x-m: 1" in b"".join(dt.out) and b"HTTP/1.1 200 OK" in b"".join(dt.out)
    assert seen == ["request hook", "on_pool_ready"]
    # no healthy host: a local reply from the stream's first attempt
    dt.out.clear()
    down.data_received(b"GET /none HTTP/1.1\r\nHost: h\r\n\r\n")
    assert b"503" in b"".join(dt.out).split(b"\r\n")[0]
    assert seen[-1] == "send_local_reply"
    # a request with a body: the generic stream (ActiveStream.__init__, the filter chain)
    dt.out.clear()
    ut.out.clear()
    down.data_received(b"POST /b HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc")
    assert "decode_headers" in seen
    assert b"POST /b HTTP/1.1" in b"".join(ut.out)
    up.data_received(RESPONSE)
    assert b"HTTP/1.1 200 OK" in b"".join(dt.out)
    # the generic stream with no healthy host
    dt.out.clear()
    down.data_received(b"POST /none HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc")
    assert b"503" in b"".join(dt.out).split(b"\r\n")[0]


def test_every_slot_is_set_on_an_http2_stream_the_manager_serves_at_once(stack):
    import h2.config
    import h2.connection
    down, up, dt, ut, seen = stack
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    c.initiate_connection()
    c.send_headers(1, [(":method", "GET"), (":scheme", "http"), (":path", "/a"), (":authority", "h")],
                   end_stream=True)
    down.data_received(c.data_to_send())
    assert b"GET /a HTTP/1.1" in b"".join(ut.out)
    assert "request hook" in seen and "on_pool_ready" in seen and "decode_headers" not in seen
    up.data_received(RESPONSE)
    events = c.receive_data(b"".join(dt.out))
    got = [e for e in events if type(e).__name__ == "ResponseReceived"]
    assert got and dict(got[0].headers)[":status"] == "200"
