"""Local replies, upstream failures, retries, timeouts, header manipulation, circuit breakers and
load balancing through the real proxy, compared with Envoy 1.40 on the same bootstrap.

One bootstrap holds every case (one route per prefix), so one pyproxy and one Envoy serve the module.
"""

from __future__ import annotations

import collections
import json
import re
import socket
import threading
import time
import uuid

import pytest

from proxy_util import (ENVOY, Envoy, HttpBackend, Pyproxy, bootstrap, cluster, exchange, free_port,
                        http_listener, request, route, route_config, simple_response, with_fresh_ports)

COUNTS = collections.Counter()
LOCK = threading.Lock()


def handler(req, sock):
    parts = req.path.split("?")[0].split("/")
    if "slow" in parts:  # .../slow/<ms>
        time.sleep(int(parts[parts.index("slow") + 1]) / 1000.0)
    elif "flaky" in parts:  # .../flaky/<key>/<n>/<code>: <code> for the first n requests of <key>
        i = parts.index("flaky")
        key, n, code = parts[i + 1], int(parts[i + 2]), int(parts[i + 3])
        with LOCK:
            COUNTS[key] += 1
            c = COUNTS[key]
        if c <= n:
            if code == 0:
                return "close"  # reset before any response
            return simple_response(code, b"flaky %d" % c)
    body = json.dumps({"path": req.path, "headers": req.headers, "backend": HttpBackend.current_name(sock)})
    return simple_response(200, body.encode(), [("content-type", "application/json")])


class Backends:
    def __init__(self):
        self.names = {}
        self.a = self._mk("a")
        self.rr = [self._mk("rr%d" % i) for i in range(3)]
        self.w = [self._mk("w90"), self._mk("w10")]

    def _mk(self, name):
        be = HttpBackend(handler, name=name)
        self.names[be.port] = name
        return be

    def close(self):
        for be in [self.a] + self.rr + self.w:
            be.close()


def _current_name(sock):
    return BACKENDS.names.get(sock.getsockname()[1], "?") if BACKENDS else "?"


HttpBackend.current_name = staticmethod(_current_name)
BACKENDS = None


def make_bootstrap(b: Backends):
    dead = free_port()
    port = free_port()
    retry = lambda on, n=2, **kw: dict({"retry_on": on, "num_retries": n}, **kw)  # noqa: E731
    routes = [
        route("/route-timeout", "a", timeout="0.3s"),
        route("/per-try", "a", timeout="3s", retry_policy=retry("5xx", 2, per_try_timeout="0.2s")),
        route("/retry-5xx", "a", retry_policy=retry("5xx")),
        route("/retry-gateway", "a", retry_policy=retry("gateway-error")),
        route("/retry-codes", "a", retry_policy=retry("retriable-status-codes", retriable_status_codes=[418])),
        route("/retry-reset", "a", retry_policy=retry("reset")),
        route("/no-retry", "a"),
        route("/dead-retry", "dead", retry_policy=retry("connect-failure", 1)),
        route("/dead", "dead"),
        route("/empty", "empty"),
        route("/header-cluster", None, cluster_header="x-cluster"),
        route("/weighted", None, weighted_clusters={"clusters": [{"name": "w90", "weight": 90},
                                                                 {"name": "w10", "weight": 10}]}),
        route("/rr", "rr"),
        route("/rh", "rh", hash_policy=[{"header": {"header_name": "x-user"}}]),
        route("/cb", "cb"),
        {"match": {"prefix": "/direct"}, "direct_response": {"status": 418, "body": {"inline_string": "teapot %REQ(x-who)%"}}},
        {"match": {"prefix": "/redirect"}, "redirect": {"host_redirect": "other.example", "path_redirect": "/new"}},
        dict(route("/hdrs", "a"),
             request_headers_to_add=[{"header": {"key": "x-remote", "value": "%DOWNSTREAM_REMOTE_ADDRESS%"}},
                                     {"header": {"key": "x-proto", "value": "%PROTOCOL%"}}],
             request_headers_to_remove=["x-secret"],
             response_headers_to_add=[{"header": {"key": "x-resp", "value": "%UPSTREAM_CLUSTER%"}}],
             response_headers_to_remove=["x-drop-me"]),
        route("/", "a"),
    ]
    rc = route_config(routes)
    rc["virtual_hosts"].insert(0, {"name": "api", "domains": ["api.example"],
                                   "routes": [{"match": {"prefix": "/only"}, "route": {"cluster": "a"}}]})
    lst = http_listener(port, rc, use_remote_address=True, server_name="pyproxy-test",
                        via="1.1 test-proxy", max_request_headers_kb=2,
                        common_http_protocol_options={"headers_with_underscores_action": "REJECT_REQUEST"},
                        normalize_path=True, merge_slashes=True,
                        stream_idle_timeout="1s", request_timeout="1.5s")
    clusters = [
        cluster("a", [b.a.port]),
        cluster("dead", [dead]),
        cluster("empty", []),
        cluster("rr", [x.port for x in b.rr]),
        cluster("rh", [x.port for x in b.rr], lb_policy="RING_HASH"),
        cluster("w90", [b.w[0].port]),
        cluster("w10", [b.w[1].port]),
        cluster("cb", [b.a.port], circuit_breakers={"thresholds": [
            {"max_connections": 1, "max_pending_requests": 1, "max_requests": 1}]}),
    ]
    return bootstrap([lst], clusters)


@pytest.fixture(scope="module")
def env():
    global BACKENDS
    BACKENDS = Backends()
    bs = make_bootstrap(BACKENDS)
    px = Pyproxy(bs)
    en = Envoy(with_fresh_ports(bs)) if ENVOY else None
    try:
        yield px, en
    finally:
        px.stop()
        if en is not None:
            en.stop()
        BACKENDS.close()


def both(env):
    return [p for p in env if p is not None]


def _get(p, path, headers=None, method="GET", timeout=5, host="x.example"):
    return request(p.port, method, path, headers=headers, timeout=timeout, host=host)


def _shape(resp):
    st, h, body = resp
    return st, body, h.get("content-type"), "content-length" in h


# ------------------------------------------------------------------ local replies

def test_no_route_404(env):
    shapes = [_shape(_get(p, "/nothing", host="api.example")) for p in both(env)]
    assert shapes[0][0] == 404 and shapes[0][1] == b""
    assert len(set(shapes)) == 1, shapes


def test_unknown_cluster_503(env):
    shapes = [_shape(_get(p, "/header-cluster", {"x-cluster": "nope"})) for p in both(env)]
    assert shapes[0][0] == 503
    assert len(set(shapes)) == 1, shapes


def test_no_healthy_upstream_503_uh(env):
    shapes = [_shape(_get(p, "/empty")) for p in both(env)]
    assert shapes[0] == (503, b"no healthy upstream", "text/plain", True)
    assert len(set(shapes)) == 1, shapes
    assert env[0].stat("cluster.empty.upstream_cx_none_healthy") >= 1


def test_connect_failure_503_uf(env):
    for p in both(env):
        st, h, body = _get(p, "/dead")
        assert st == 503 and h["content-type"] == "text/plain"
        assert body.startswith(b"upstream connect error or disconnect/reset before headers. reset reason: ")
    assert env[0].stat("cluster.dead.upstream_cx_connect_fail") >= 1


def test_connect_failure_body_text_matches_envoy(env):
    if env[1] is None:
        pytest.skip("envoy not on PATH")
    bodies = [_get(p, "/dead")[2] for p in both(env)]
    assert bodies[0] == bodies[1]


def test_route_timeout_504(env):
    for p in both(env):
        t = time.monotonic()
        st, h, body = _get(p, "/route-timeout/slow/2000")
        assert (st, body) == (504, b"upstream request timeout")
        assert time.monotonic() - t < 1.5
    assert env[0].stat("cluster.a.upstream_rq_timeout") >= 1


def test_direct_response_and_redirect(env):
    got = []
    for p in both(env):
        st, h, body = _get(p, "/direct", {"x-who": "me"})
        st2, h2, body2 = _get(p, "/redirect/x")
        got.append((st, body, h.get("content-type"), st2, h2.get("location"), body2))
    # a direct_response body is literal (no %...% substitution, as in Envoy)
    assert got[0] == (418, b"teapot %REQ(x-who)%", "text/plain", 301, "http://other.example/new", b"")
    assert len(set(got)) == 1, got


# ------------------------------------------------------------------ retries

def _retry_case(p, path):
    before = p.stat("cluster.a.upstream_rq_retry")
    st, h, body = _get(p, path)
    return st, p.stat("cluster.a.upstream_rq_retry") - before


@pytest.mark.parametrize("path,want", [
    ("/retry-5xx/flaky/{k}/2/503", (200, 2)),
    ("/retry-5xx/flaky/{k}/5/503", (503, 2)),
    ("/retry-gateway/flaky/{k}/1/502", (200, 1)),
    ("/retry-gateway/flaky/{k}/1/500", (500, 0)),
    ("/retry-codes/flaky/{k}/1/418", (200, 1)),
    ("/retry-reset/flaky/{k}/1/0", (200, 1)),
    ("/no-retry/flaky/{k}/1/503", (503, 0)),
])
def test_retries(env, path, want):
    for p in both(env):
        key = uuid.uuid4().hex
        assert _retry_case(p, path.format(k=key)) == want, (p.kind, path)


def test_per_try_timeout_then_retry(env):
    for p in both(env):
        # every try is slower than the 0.2 s per-try timeout: 3 tries then 504
        t = time.monotonic()
        st, h, body = _get(p, "/per-try/slow/1000")
        assert (st, body) == (504, b"upstream request timeout")
        assert 0.5 < time.monotonic() - t < 2.5
    assert env[0].stat("cluster.a.upstream_rq_per_try_timeout") >= 3


def test_connect_failure_retry(env):
    for p in both(env):
        before = p.stat("cluster.dead.upstream_rq_retry")
        st, _, _ = _get(p, "/dead-retry")
        assert st == 503
        assert p.stat("cluster.dead.upstream_rq_retry") == before + 1


# ------------------------------------------------------------------ headers

def _seen(p, path="/hdrs/x", headers=None):
    st, h, body = _get(p, path, headers)
    assert st == 200, (st, body)
    d = json.loads(body)
    return dict(d["headers"]), h


def test_request_and_response_header_manipulation(env):
    xffs = set()
    for p in both(env):
        seen, h = _seen(p, headers={"x-secret": "s", "x-forwarded-for": "10.9.9.9"})
        assert re.fullmatch(r"127\.0\.0\.1:\d+", seen["x-remote"]), seen["x-remote"]
        assert seen["x-proto"] == "HTTP/1.1"
        assert "x-secret" not in seen
        assert h["x-resp"] == "a"
        # use_remote_address: the peer is appended to x-forwarded-for, the request id regenerated;
        # a loopback peer is replaced by the host's first non-loopback address, as Envoy does
        assert seen["x-forwarded-for"].startswith("10.9.9.9,")
        xffs.add(seen["x-forwarded-for"])
        if p.kind == "pyproxy":
            from pyproxy.netaddr import local_ip
            assert seen["x-forwarded-for"] == "10.9.9.9," + local_ip("v4")
        assert seen["x-forwarded-proto"] == "http"
        u = uuid.UUID(seen["x-request-id"])
        assert u.version == 4 and u.variant == uuid.RFC_4122 and str(u) == seen["x-request-id"]
        assert seen["via"] == "1.1 test-proxy"
        assert h["server"] == "pyproxy-test"
        assert h["via"] == "1.1 test-proxy"
        assert "x-envoy-upstream-service-time" in h
        assert seen["x-envoy-expected-rq-timeout-ms"] == "15000"
    assert len(xffs) == 1, xffs


def test_external_request_id_replaced_at_the_edge(env):
    for p in both(env):
        seen, _ = _seen(p, headers={"x-request-id": "mine"})
        assert seen["x-request-id"] != "mine"


def test_max_request_headers_kb_431(env):
    for p in both(env):
        st, h, body = _get(p, "/", {"x-big": "a" * 3000})
        assert st == 431


def test_headers_with_underscores_rejected(env):
    got = [_get(p, "/", {"x_under": "1"})[:1] for p in both(env)]
    assert got[0] == (400,)
    assert len(set(got)) == 1


def test_normalize_path_and_merge_slashes(env):
    for p in both(env):
        seen_path = json.loads(_get(p, "/a//b/./c/../d")[2])["path"]
        assert seen_path == "/a/b/d", p.kind


def test_stream_idle_timeout(env):
    for p in both(env):
        t = time.monotonic()
        st, h, body = _get(p, "/slow/3000")
        assert st == 504 and body == b"stream timeout", (p.kind, st, body)
        assert time.monotonic() - t < 2.5


def test_request_timeout_408(env):
    """The body never finishes: request_timeout (1.5 s) answers 408 (stream_idle_timeout is reset by
    the trickle)."""
    for p in both(env):
        s = socket.create_connection(("127.0.0.1", p.port), timeout=5)
        try:
            s.sendall(b"POST /slow/0 HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n")
            t = time.monotonic()
            out = b""
            while time.monotonic() - t < 4:
                s.sendall(b"x")
                s.settimeout(0.5)
                try:
                    d = s.recv(4096)
                except socket.timeout:
                    continue
                except ConnectionResetError:
                    break
                if not d:
                    break
                out += d
                if b"\r\n\r\n" in out:
                    break
            assert out.startswith(b"HTTP/1.1 408"), (p.kind, out)
            assert 1.2 < time.monotonic() - t < 3
        finally:
            s.close()


# ------------------------------------------------------------------ circuit breakers, LB

def test_circuit_breaker_overflow_503_uo(env):
    for p in both(env):
        before = p.stats()
        results = []

        def one():
            results.append(_get(p, "/cb/slow/600")[0])
        ts = [threading.Thread(target=one) for _ in range(4)]
        for t in ts:
            t.start()
            time.sleep(0.05)
        for t in ts:
            t.join(10)
        after = p.stats()
        assert sorted(results).count(200) >= 1 and 503 in results, (p.kind, results)
        overflow = sum(after.get("cluster.cb.upstream_rq_pending_overflow", 0) - before.get(
            "cluster.cb.upstream_rq_pending_overflow", 0) for _ in [0])
        assert overflow == results.count(503), (p.kind, results, overflow)


def test_weighted_clusters_90_10(env):
    p = env[0]
    c = collections.Counter()
    for _ in range(300):
        c[json.loads(_get(p, "/weighted")[2])["backend"]] += 1
    share = c["w10"] / 300.0
    assert 0.04 < share < 0.18, c


def test_round_robin_across_three(env):
    for p in both(env):
        c = collections.Counter(json.loads(_get(p, "/rr")[2])["backend"] for _ in range(30))
        assert set(c) == {"rr0", "rr1", "rr2"} and min(c.values()) >= 8, (p.kind, c)


def test_ring_hash_sticks_per_header(env):
    for p in both(env):
        picks = {}
        for user in ("u%d" % i for i in range(12)):
            got = {json.loads(_get(p, "/rh", {"x-user": user})[2])["backend"] for _ in range(4)}
            assert len(got) == 1, (p.kind, user, got)
            picks[user] = got.pop()
        assert len(set(picks.values())) >= 2, picks


def test_stats_count_responses(env):
    p = env[0]
    before = p.stats()
    for _ in range(3):
        _get(p, "/")
    _get(p, "/empty")
    after = p.stats()
    d = lambda n: after.get(n, 0) - before.get(n, 0)  # noqa: E731
    assert d("http.ingress.downstream_rq_2xx") == 3
    assert d("http.ingress.downstream_rq_5xx") == 1
    assert d("cluster.a.upstream_rq_200") == 3
    assert d("http.ingress.downstream_rq_total") == 4


def test_local_reply_headers_like_envoy(env):
    if env[1] is None:
        pytest.skip("envoy not on PATH")
    names = []
    for p in both(env):
        rs, _, raw = exchange(p.port, b"GET /empty HTTP/1.1\r\nHost: x\r\n\r\n")
        names.append(sorted(k for k, _ in rs[0].headers))
    assert names[0] == names[1]
