"""Request mirroring (``request_mirror_policies``, Istio's VirtualService ``mirror``), compared with
Envoy where both can be watched the same way: what the mirror backend receives, and that the main
response never depends on the mirror.
"""

import socket
import threading
import time

import pytest

from tests.proxy_util import (ENVOY, Envoy, HttpBackend, Pyproxy, bootstrap, cluster, free_port, http_listener,
                              proxies, request, route, route_config, validate, wait_until)


def _bs(main_port, shadow_port, policies, **route_extra):
    port = free_port()
    rt = route("/", "b", request_mirror_policies=policies, **route_extra)
    return bootstrap([http_listener(port, route_config([rt]))],
                     [cluster("b", [main_port]), cluster("s", [shadow_port])])


def _seen(proxy_cls, policies, requests, **route_extra):
    """Run ``requests`` [(method, path, host, headers, body)] through a proxy; returns (main
    responses, the mirror backend's requests sorted by (host, path))."""
    with HttpBackend(name="main") as main, HttpBackend(name="shadow") as sh:
        with proxy_cls(_bs(main.port, sh.port, policies, **route_extra)) as px:
            out = []
            for method, path, host, headers, body in requests:
                out.append(request(px.port, method, path, body=body, host=host, headers=headers))
            n = sum(1 for _ in requests) * len(policies)
            wait_until(lambda: len(sh.requests) >= n)
            time.sleep(0.1)
            got = sorted(((r.method, r.path, r.header("host"), r.body, r.header("x-shadow"),
                           r.header("x-remove-me"), r.header("x-envoy-internal"),
                           r.header("x-forwarded-for") is not None)
                          for r in sh.requests), key=repr)
        return out, got


POLICIES = [
    {"cluster": "s"},
    {"cluster": "s", "disable_shadow_host_suffix_append": True},
    {"cluster": "s", "host_rewrite_literal": "lit.example", "request_headers_mutations": [
        {"append": {"header": {"key": "x-shadow", "value": "1"},
                    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}},
        {"remove": "x-remove-me"}]},
]
REQUESTS = [
    ("GET", "/a", "svc:8080", {"x-remove-me": "v"}, None),
    ("POST", "/b?q=1", "svc", {"x-remove-me": "v"}, b"hello body"),
    ("PUT", "/c", "[::1]:80", {}, b"x" * 70000),
]


@pytest.mark.skipif(ENVOY is None, reason="envoy binary not on PATH")
def test_mirror_requests_match_envoy():
    """Host suffix (before the port, IPv6 literal kept), disabled suffix, host_rewrite_literal and
    header mutations, bodies: the mirror backend sees what it sees behind Envoy."""
    results = {}
    for cls in (Pyproxy, Envoy):
        results[cls.kind] = _seen(cls, POLICIES, REQUESTS, prefix_rewrite="/rw")
    py_main, py_shadow = results["pyproxy"]
    ev_main, ev_shadow = results["envoy"]
    assert [m[0] for m in py_main] == [m[0] for m in ev_main] == [200, 200, 200]
    assert [m[2] for m in py_main] == [m[2] for m in ev_main]  # the main backend's answers
    assert py_shadow == ev_shadow
    hosts = {s[2] for s in py_shadow}
    assert {"svc-shadow:8080", "svc-shadow", "[::1]-shadow:80", "svc:8080", "lit.example"} <= hosts
    assert all(s[1].startswith("/rw") for s in py_shadow)  # after the route's rewrite


@pytest.mark.parametrize("proxy_cls", proxies(), ids=lambda c: c.kind)
def test_mirror_fraction_and_cluster_header(proxy_cls):
    """runtime_fraction 0 mirrors nothing; cluster_header picks the mirror (missing: none)."""
    policies = [{"cluster": "s", "runtime_fraction": {"default_value": {"numerator": 0}}},
                {"cluster_header": "x-mirror-to"}]
    reqs = [("GET", "/1", "h", {"x-mirror-to": "s"}, None), ("GET", "/2", "h", {}, None),
            ("GET", "/3", "h", {"x-mirror-to": "nope"}, None)]
    main, shadow = _seen(proxy_cls, policies, reqs)
    assert [m[0] for m in main] == [200, 200, 200]
    assert [(s[1], s[2]) for s in shadow] == [("/1", "h-shadow")]


def _silent_backend():
    """A backend that accepts and reads nothing, never answers: the worst mirror."""
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(64)
    conns = []
    stop = threading.Event()

    def accept():
        ls.settimeout(0.2)
        while not stop.is_set():
            try:
                c, _ = ls.accept()
            except OSError:
                continue
            c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            conns.append(c)

    t = threading.Thread(target=accept, daemon=True)
    t.start()

    def close():
        stop.set()
        t.join(2)
        for c in conns:
            c.close()
        ls.close()
    return ls.getsockname()[1], close, conns


def test_mirror_never_affects_main_and_memory_is_bounded():
    """A mirror that never reads nor answers: the main requests (big bodies too) complete at
    normal speed, the mirror is abandoned past the buffer limit (counted as Envoy counts it) or at
    the route timeout, and pyproxy's memory does not grow with the bodies."""
    sport, close_silent, conns = _silent_backend()
    try:
        with HttpBackend(name="main") as main:
            port = free_port()
            rt = route("/", "b", request_mirror_policies=[{"cluster": "s"}], timeout="2s")
            bs = bootstrap([http_listener(port, route_config([rt]))],
                           [cluster("b", [main.port]), cluster("s", [sport])])
            with Pyproxy(bs) as px:
                rss0 = px.rss_kb()
                body = b"z" * (16 * 1024 * 1024)  # more than the kernel's socket buffers hold
                t0 = time.monotonic()
                for i in range(4):
                    st, _, b = request(px.port, "POST", "/big%d" % i, body=body, timeout=10)
                    assert st == 200 and b.endswith(b" %d" % len(body))
                for i in range(20):
                    st, _, _ = request(px.port, "GET", "/small%d" % i)
                    assert st == 200
                assert time.monotonic() - t0 < 10
                assert wait_until(lambda: px.stat("cluster.b.retry_or_shadow_abandoned") == 4)
                # the bodiless mirrors were sent and get no answer: the route timeout ends them
                assert wait_until(lambda: px.stat("cluster.s.upstream_rq_timeout") >= 20, 6)
                assert wait_until(lambda: px.stat("cluster.s.upstream_rq_active") == 0, 3)
                grown = px.rss_kb() - rss0
                assert grown < 24 * 1024, "pyproxy grew by %d KiB" % grown
                assert len(main.requests) == 24
    finally:
        close_silent()


def test_mirror_to_refused_port_and_missing_cluster():
    """A mirror whose connection is refused, and one whose cluster does not exist: the main
    request is unaffected."""
    dead = free_port()
    with HttpBackend(name="main") as main:
        port = free_port()
        rt = route("/", "b", request_mirror_policies=[{"cluster": "s"}, {"cluster": "gone"}])
        rc = route_config([rt])
        rc["validate_clusters"] = False  # (else the static config is refused, as Envoy does)
        bs = bootstrap([http_listener(port, rc)],
                       [cluster("b", [main.port]), cluster("s", [dead])])
        with Pyproxy(bs) as px:
            for i in range(5):
                st, _, _ = request(px.port, "POST", "/x", body=b"abc")
                assert st == 200
            assert wait_until(lambda: px.stat("cluster.s.upstream_cx_connect_fail") >= 1)
            assert px.stat("cluster.b.upstream_rq_2xx") == 5


def test_mirror_h2_downstream():
    """Mirroring from an HTTP/2 client (curl, prior knowledge) to an HTTP/1.1 mirror."""
    import shutil
    import subprocess
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl not installed")
    with HttpBackend(name="main") as main, HttpBackend(name="shadow") as sh:
        with Pyproxy(_bs(main.port, sh.port, [{"cluster": "s"}])) as px:
            out = subprocess.run([curl, "-s", "--http2-prior-knowledge", "-d", "payload",
                                  "-H", "host: h2svc:1234", "http://127.0.0.1:%d/h2" % px.port],
                                 capture_output=True, timeout=10)
            assert out.stdout.startswith(b"main POST /h2 7")
            assert wait_until(lambda: len(sh.requests) == 1)
            r = sh.requests[0]
            assert (r.path, r.header("host"), r.body) == ("/h2", "h2svc-shadow:1234", b"payload")


def test_mirror_config_errors():
    """cluster and cluster_header together, neither, or a mutation of a pseudo-header: rejected
    with the field named."""
    for pol, words in (({"cluster": "s", "cluster_header": "x"}, "only one of cluster"),
                       ({}, "cluster or cluster_header is required"),
                       ({"cluster": "s", "request_headers_mutations": [{"remove": ":path"}]},
                        "request_mirror_policies[0].request_headers_mutations[0].remove")):
        r = validate(_bs(1, 2, [pol]))
        assert r.returncode == 1, r.stdout + r.stderr
        assert words in r.stdout + r.stderr, r.stdout + r.stderr


def test_mirror_gets_a_big_body_whole():
    """A body larger than the buffer limit reaches a mirror that reads it: while the mirror's
    connection opens, the request is read no faster than the mirror can take it (as in Envoy)."""
    with HttpBackend(name="main") as main, HttpBackend(name="shadow") as sh:
        with Pyproxy(_bs(main.port, sh.port, [{"cluster": "s"}])) as px:
            body = bytes(range(256)) * (5 * 4096)  # 5 MiB
            for i in range(2):
                st, _, b = request(px.port, "POST", "/big%d" % i, body=body, timeout=10)
                assert st == 200 and b == b"main POST /big%d %d" % (i, len(body))
            assert wait_until(lambda: len(sh.requests) == 2)
            assert all(r.body == body for r in sh.requests)
            assert px.stat("cluster.b.retry_or_shadow_abandoned") == 0


def test_mirror_and_hedge_routes_leave_the_fast_lanes_at_load():
    """Decided when the route compiles: a route with mirrors (its own or its virtual host's) or
    hedging is marked for the generic router; a plain one is planned for the compiled path
    (routing/plan.py)."""
    from envoy.config.route.v3 import route_pb2
    from google.protobuf import json_format
    from pyproxy.routing import compile_route_config
    rc = route_config([route("/m", "b", request_mirror_policies=[{"cluster": "s"}]),
                       route("/h", "b", hedge_policy={"hedge_on_per_try_timeout": True}),
                       route("/p", "b")])
    rc["virtual_hosts"].append({"name": "vh2", "domains": ["m.example"],
                                "request_mirror_policies": [{"cluster": "s"}],
                                "routes": [route("/", "b")]})
    t = compile_route_config(json_format.ParseDict(rc, route_pb2.RouteConfiguration()))
    routes = list(t.all_routes())
    assert [(r.fast, r.inline) for r in routes] == [(False, False), (False, False), (True, True),
                                                             (False, False)]


def test_mirror_to_an_http2_cluster():
    """The mirror cluster speaks HTTP/2 (here: a second listener of the same proxy, h2c, in front
    of the mirror backend): bodies and the -shadow host arrive, the main answer is untouched."""
    with HttpBackend(name="main") as main, HttpBackend(name="shadow") as sh:
        port, port2 = free_port(), free_port()
        rt = route("/", "b", request_mirror_policies=[{"cluster": "s"}])
        h2 = {"typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}}}}}
        bs = bootstrap([http_listener(port, route_config([rt])),
                        http_listener(port2, route_config([route("/", "sb")]), name="h2in")],
                       [cluster("b", [main.port]), cluster("s", [port2], **h2),
                        cluster("sb", [sh.port])])
        with Pyproxy(bs) as px:
            for i in range(3):
                st, _, b = request(px.port, "POST", "/m%d" % i, body=b"q" * (100000 * i), host="svc")
                assert st == 200 and b == b"main POST /m%d %d" % (i, 100000 * i)
            assert wait_until(lambda: len(sh.requests) == 3)
            got = sorted((r.path, r.header("host"), len(r.body)) for r in sh.requests)
            assert got == [("/m0", "svc-shadow", 0), ("/m1", "svc-shadow", 100000),
                           ("/m2", "svc-shadow", 200000)]
            assert px.stat("cluster.s.upstream_cx_http2_total") == 1
