"""Route timeouts on the connection's shared deadline timer (HttpConnection.arm_deadline, used by
the stream's first attempt): a shorter timeout after a longer one re-arms the timer, streams that
finish in time leave nothing behind, concurrent HTTP/2 streams each time out at their own
deadline. Real sockets: pyproxy in front of a threaded backend that sleeps as asked."""

from __future__ import annotations

import http.client
import time

import pytest

from grpc_util import H2Raw
from proxy_util import HttpBackend, Pyproxy, bootstrap, cluster, free_port, http_listener, route, route_config


def _slow(req, sock):
    # /<anything>/<ms>: answer after ms milliseconds
    ms = int(req.path.rstrip("/").rsplit("/", 1)[-1] or 0)
    time.sleep(ms / 1000.0)
    return b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"


@pytest.fixture(scope="module")
def env():
    be = HttpBackend(_slow)
    port = free_port()
    rc = route_config([route("/t300/", "b", timeout="0.3s"), route("/t800/", "b", timeout="0.8s"),
                       route("/", "b")])  # the default 15 s
    px = Pyproxy(bootstrap([http_listener(port, rc)], [cluster("b", [be.port])]))
    try:
        yield {"px": px, "port": port}
    finally:
        px.stop()
        be.close()


def _timeouts(env):
    return env["px"].stats().get("cluster.b.upstream_rq_timeout", 0)


def test_shorter_timeout_after_a_longer_one_on_one_connection(env):
    before = _timeouts(env)
    c = http.client.HTTPConnection("127.0.0.1", env["port"], timeout=10)
    try:
        c.request("GET", "/fast/0")  # 15 s deadline armed, then cleared by the response
        r = c.getresponse()
        assert (r.status, r.read()) == (200, b"ok")
        t = time.monotonic()
        c.request("GET", "/t300/2000")  # earlier deadline: the timer is re-armed
        r = c.getresponse()
        took = time.monotonic() - t
        assert (r.status, r.read()) == (504, b"upstream request timeout")
        assert 0.25 <= took < 1.2, took
    finally:
        c.close()
    assert _timeouts(env) == before + 1


def test_requests_in_time_leave_no_timeout_behind(env):
    before = _timeouts(env)
    c = http.client.HTTPConnection("127.0.0.1", env["port"], timeout=10)
    try:
        for _ in range(3):
            c.request("GET", "/t300/50")
            r = c.getresponse()
            assert (r.status, r.read()) == (200, b"ok")
        time.sleep(0.6)  # past every deadline those requests had
        c.request("GET", "/t800/100")
        r = c.getresponse()
        assert (r.status, r.read()) == (200, b"ok")
    finally:
        c.close()
    assert _timeouts(env) == before


def test_concurrent_http2_streams_time_out_at_their_own_deadlines(env):
    before = _timeouts(env)
    c = H2Raw(env["port"])
    try:
        t = time.monotonic()
        s_late = c.request("/t800/3000")
        s_early = c.request("/t300/3000")
        s_ok = c.request("/t800/100")
        done = {}
        seen = 0
        deadline = time.monotonic() + 5
        while len(done) < 3 and time.monotonic() < deadline:
            evs = c.read_events(lambda evs: len(evs) > seen, timeout=1.0, quiet=True)
            for ev in evs[seen:]:
                if type(ev).__name__ == "ResponseReceived":
                    hdrs = {(k.encode() if isinstance(k, str) else bytes(k)): (v.encode() if isinstance(v, str) else bytes(v)) for k, v in ev.headers}
                    done[ev.stream_id] = (hdrs[b":status"], round(time.monotonic() - t, 2))
            seen = len(evs)
        assert done[s_ok][0] == b"200", done
        assert done[s_early][0] == b"504" and 0.25 <= done[s_early][1] < 0.75, done
        assert done[s_late][0] == b"504" and 0.75 <= done[s_late][1] < 1.4, done
    finally:
        c.close()
    assert _timeouts(env) == before + 2
