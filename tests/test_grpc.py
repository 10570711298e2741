"""gRPC through pyproxy with real grpcio clients and servers: the four call shapes, statuses and
trailers (incl. trailers-only), large messages, grpc-timeout, retries on gRPC status, and the
grpc_stats filter's counters (same names as Envoy's, see test_grpc_stats_match_envoy)."""

import shutil
import threading
import time

import grpc
import h2.events as E
import pytest

from grpc_util import h2_engines  # noqa: F401  (autouse: every test on both HTTP/2 engines)
from grpc_util import (GRPC_STATS, H2Raw, Proxy, bootstrap, channel, cluster, flaky_count, free_port,
                       grpc_frame, hcm_listener, start_grpc_server)

MiB = 1024 * 1024


def _routes():
    return [
        {"match": {"prefix": "/test.Echo/Unary", "headers": [{"name": "x-retry", "present_match": True}]},
         "route": {"cluster": "g", "retry_policy": {"retry_on": "unavailable", "num_retries": 2}}},
        {"match": {"prefix": "/test.Echo/Unary", "headers": [{"name": "x-short", "present_match": True}]},
         "route": {"cluster": "g", "max_stream_duration": {"grpc_timeout_header_max": "0.3s"}}},
        {"match": {"prefix": "/"}, "route": {"cluster": "g", "timeout": "0s",
                                             "max_stream_duration": {"grpc_timeout_header_max": "0s"}}},
    ]


def _start(tmp, envoy=False):
    srv, gport = start_grpc_server()
    lp, ap = free_port(), free_port()
    bs = bootstrap(ap, [hcm_listener("grpc", lp, _routes(), filters=[GRPC_STATS])], [cluster("g", gport, h2=True)])
    try:
        px = Proxy(bs, str(tmp), envoy=envoy, wait_ports=[lp])
    except Exception:
        srv.stop(0)
        raise
    return srv, px, lp


@pytest.fixture(scope="module")
def env(tmp_path_factory, h2_engines):
    srv, px, lp = _start(tmp_path_factory.mktemp("grpc"))
    ch = channel(lp)
    try:
        yield px, ch, lp
    finally:
        ch.close()
        px.stop()
        srv.stop(0)


def test_unary_and_trailing_metadata(env):
    px, ch, _ = env
    resp, call = ch.unary_unary("/test.Echo/Unary").with_call(b"hello", timeout=5)
    assert resp == b"hello"
    assert call.code() == grpc.StatusCode.OK
    assert ("x-trailer", "t1") in tuple(call.trailing_metadata())


def test_error_status_and_message(env):
    _, ch, _ = env
    with pytest.raises(grpc.RpcError) as ei:
        ch.unary_unary("/test.Echo/Unary")(b"status:7:no access for you", timeout=5)
    assert ei.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert ei.value.details() == "no access for you"


def test_trailers_only_response_is_one_headers_frame(env):
    """A server's trailers-only error (HEADERS with END_STREAM and grpc-status) stays so."""
    _, _, lp = env
    c = H2Raw(lp)
    try:
        sid = c.request("/test.Echo/Unary", "POST", [("content-type", "application/grpc"), ("te", "trailers")],
                        body=grpc_frame(b"status:5:gone"))
        headers, body, trailers, reset = c.response(sid)
        assert reset is None
        assert headers[":status"] == "200"
        assert headers["grpc-status"] == "5" and headers["grpc-message"] == "gone"
        assert body == b"" and trailers is None
        resp = [e for e in c.events if isinstance(e, E.ResponseReceived) and e.stream_id == sid][0]
        assert resp.stream_ended is not None
    finally:
        c.close()


def test_client_streaming(env):
    _, ch, _ = env
    parts = [bytes([i]) * 1000 for i in range(50)]
    assert ch.stream_unary("/test.Echo/Collect")(iter(parts), timeout=10) == b"".join(parts)


def test_server_streaming(env):
    _, ch, _ = env
    msgs = list(ch.unary_stream("/test.Echo/Spread")(b"n:200:300", timeout=10))
    assert len(msgs) == 200 and all(len(m) == 300 for m in msgs)
    assert msgs[27] == b"B" * 300


def test_bidi_interleaved(env):
    """Each reply arrives before the next request is sent: nothing is held back by the proxy."""
    _, ch, _ = env
    import queue
    q = queue.Queue()

    def gen():
        for i in range(20):
            yield b"m%d" % i
            got = q.get(timeout=5)
            assert got == b"m%d" % i

    call = ch.stream_stream("/test.Echo/Chat")(gen(), timeout=10)
    n = 0
    for m in call:
        q.put(m)
        n += 1
    assert n == 20
    assert call.code() == grpc.StatusCode.OK


def test_large_messages(env):
    _, ch, _ = env
    big = bytes(range(256)) * (8 * MiB // 256)
    assert ch.unary_unary("/test.Echo/Unary")(big, timeout=20) == big
    assert len(ch.unary_unary("/test.Echo/Unary")(b"big:%d" % (6 * MiB), timeout=20)) == 6 * MiB
    msgs = list(ch.unary_stream("/test.Echo/Spread")(b"n:4:%d" % (2 * MiB), timeout=20))
    assert [len(m) for m in msgs] == [2 * MiB] * 4


def test_concurrent_calls_share_few_connections(env):
    px, ch, _ = env
    before = px.stats().get("cluster.g.upstream_cx_total", 0)
    futs = [ch.unary_unary("/test.Echo/Unary").future(b"c%d" % i, timeout=10) for i in range(200)]
    assert [f.result() for f in futs] == [b"c%d" % i for i in range(200)]
    after = px.stats().get("cluster.g.upstream_cx_total", 0)
    assert after - before <= 1  # multiplexed on the existing connection


def test_grpc_timeout_enforced_by_proxy(env):
    """grpc_timeout_header_max caps the client's grpc-timeout: the stream's duration timer answers
    DEADLINE_EXCEEDED (Envoy's max_duration_timeout, not an upstream timeout) well before the
    client's own 5 s deadline."""
    px, ch, _ = env
    before = px.stats().get("http.grpc.downstream_rq_max_duration_reached", 0)
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as ei:
        ch.unary_unary("/test.Echo/Unary")(b"sleep:3", timeout=5, metadata=(("x-short", "1"),))
    took = time.monotonic() - t0
    assert ei.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, ei.value.details()
    assert "downstream duration timeout" in ei.value.details()
    assert 0.25 < took < 2.0
    assert px.stats().get("http.grpc.downstream_rq_max_duration_reached", 0) == before + 1


def test_client_deadline_propagates(env):
    _, ch, _ = env
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as ei:
        ch.unary_unary("/test.Echo/Unary")(b"sleep:3", timeout=0.4)
    # the client's deadline and the proxy's (from grpc-timeout) expire together: either may win,
    # with the same status
    assert ei.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - t0 < 2.0


def test_retry_on_grpc_status(env):
    px, ch, _ = env
    before = px.stats().get("cluster.g.upstream_rq_retry", 0)
    key = "k%f" % time.time()
    resp = ch.unary_unary("/test.Echo/Unary")(b"flaky:1", timeout=5, metadata=(("x-retry", "1"), ("x-flaky-key", key)))
    assert resp == b"ok after 2"
    assert flaky_count(key) == 2
    assert px.stats().get("cluster.g.upstream_rq_retry", 0) == before + 1
    # without the retry route the first failure reaches the client
    key2 = key + "b"
    with pytest.raises(grpc.RpcError) as ei:
        ch.unary_unary("/test.Echo/Unary")(b"flaky:1", timeout=5, metadata=(("x-flaky-key", key2),))
    assert ei.value.code() == grpc.StatusCode.UNAVAILABLE


def test_cancel_resets_upstream(env):
    """A client cancelling a server stream mid-way: the proxy resets the upstream stream."""
    px, ch, _ = env
    call = ch.unary_stream("/test.Echo/Spread")(b"n:100000:1000", timeout=10)
    got = 0
    for _ in call:
        got += 1
        if got == 10:
            call.cancel()
            break
    end = time.monotonic() + 5
    while time.monotonic() < end:
        st = px.stats()
        if st.get("cluster.g.upstream_rq_active", 1) == 0 and st.get("http.grpc.downstream_rq_active", 1) == 0:
            break
        time.sleep(0.05)
    st = px.stats()
    assert st.get("cluster.g.upstream_rq_active") == 0
    assert st.get("http.grpc.downstream_rq_rx_reset", 0) >= 1


SEQUENCE_STATS = ("success", "failure", "total", "0", "5", "12", "request_message_count", "response_message_count")


def _grpc_sequence(ch):
    ch.unary_unary("/test.Echo/Unary")(b"hello", timeout=5)
    with pytest.raises(grpc.RpcError):
        ch.unary_unary("/test.Echo/Unary")(b"status:5:nope", timeout=5)
    list(ch.unary_stream("/test.Echo/Spread")(b"n:3:4", timeout=5))
    ch.stream_unary("/test.Echo/Collect")(iter([b"a", b"b"]), timeout=5)
    with pytest.raises(grpc.RpcError):
        ch.unary_unary("/test.Nope/X")(b"x", timeout=5)


def _grpc_deltas(px, ch):
    before = px.stats()
    _grpc_sequence(ch)
    time.sleep(0.2)
    after = px.stats()
    return {k: after.get("cluster.g.grpc." + k, 0) - before.get("cluster.g.grpc." + k, 0) for k in SEQUENCE_STATS}


def test_grpc_stats_counters(env):
    px, ch, _ = env
    d = _grpc_deltas(px, ch)
    assert d == {"success": 3, "failure": 2, "total": 5, "0": 3, "5": 1, "12": 1,
                 "request_message_count": 6, "response_message_count": 5}


@pytest.mark.skipif(shutil.which("envoy") is None, reason="envoy not installed")
def test_grpc_stats_match_envoy(env, tmp_path):
    px, ch, _ = env
    ours = _grpc_deltas(px, ch)
    srv, epx, elp = _start(tmp_path, envoy=True)
    ech = channel(elp)
    try:
        theirs = _grpc_deltas(epx, ech)
    finally:
        ech.close()
        epx.stop()
        srv.stop(0)
    assert ours == theirs
