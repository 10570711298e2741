"""Active health checks (HTTP, TCP, gRPC) over real connections: a host failing its check leaves
rotation and comes back when it passes; thresholds, timeouts, stats; compared with Envoy where the
same thing can be observed (/clusters flags at stable points, which hosts serve)."""

from __future__ import annotations

import socket
import threading
import time
from concurrent import futures

import grpc
import pytest

from proxy_util import (ENVOY, Envoy, HttpBackend, Pyproxy, bootstrap, free_port, health_flags, http_listener,
                        request, route, route_config, simple_response, with_fresh_ports)


class Switchable:
    """An HTTP backend whose /healthz answers ``self.hc_status`` (or hangs with "hang")."""

    def __init__(self, name):
        self.name = name
        self.hc_status = 200
        self.hc_hits = 0

        def handler(req, sock):
            if req.path == "/healthz":
                self.hc_hits += 1
                assert req.header("user-agent") == "Envoy/HC"
                if self.hc_status == "hang":
                    time.sleep(1.5)
                    return None
                if self.hc_status == "degraded":
                    return simple_response(200, b"hc", [("x-envoy-degraded", "")])
                return simple_response(self.hc_status, b"hc")
            return simple_response(200, name.encode(), [("x-backend", name)])
        self.be = HttpBackend(handler, name=name)
        self.port = self.be.port

    def close(self):
        self.be.close()


def _bs(ports, hc, **extra):
    eps = [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}}
           for p in ports]
    c = {"name": "c", "type": "STATIC", "connect_timeout": "0.5s", "health_checks": [hc],
         "load_assignment": {"cluster_name": "c", "endpoints": [{"lb_endpoints": eps}]}}
    c.update(extra)
    return bootstrap([http_listener(free_port(), route_config([route("/", "c")]))], [c])


def _flags(px) -> dict:
    """host -> health_flags of cluster c (/clusters)."""
    return {h: f for (c, h), f in health_flags(px.admin_port).items() if c == "c"}


def _wait(px, key, want, timeout=5.0):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        got = _flags(px).get(key)
        if got == want:
            return time.monotonic() - t0
        time.sleep(0.03)
    raise AssertionError("%s: %s, not %s, after %ss" % (key, _flags(px).get(key), want, timeout))


def _served(px, n=30) -> set:
    seen = set()
    for _ in range(n):
        st, h, _ = request(px.port, "GET", "/")
        assert st == 200
        seen.add(h.get("x-backend"))
    return seen


HTTP_HC = {"timeout": "0.5s", "interval": "0.2s", "unhealthy_threshold": 2, "healthy_threshold": 2,
           "no_traffic_interval": "0.2s", "http_health_check": {"path": "/healthz"}}


def _http_scenario(cls, bs, bes):
    keys = ["127.0.0.1:%d" % b.port for b in bes]
    out = {}
    for b in bes:
        b.hc_status = 200
    with cls(bs) as px:
        # ready only once every host had its first check: all healthy at once
        out["start"] = [_flags(px)[k] for k in keys]
        out["served_all"] = _served(px)
        bes[1].hc_status = 503  # not expected: unhealthy at the first failure
        out["t_down"] = _wait(px, keys[1], "/failed_active_hc")
        out["served_without"] = _served(px)
        bes[1].hc_status = 200  # healthy_threshold 2: back after two passes
        out["t_up"] = _wait(px, keys[1], "healthy")
        # a change within update_merge_window (1 s) of the last one waits for the window
        out["served_soon"] = _served(px, 10)
        time.sleep(1.1)
        out["served_again"] = _served(px)
        bes[2].hc_status = "degraded"  # a passing check that says x-envoy-degraded
        out["t_degraded"] = _wait(px, keys[2], "/degraded_active_hc")
        time.sleep(1.1)
        # 2 healthy of 3 take 93 % of the load (overprovisioning 1.4); the degraded host the rest
        got = [request(px.port, "GET", "/")[1].get("x-backend") for _ in range(150)]
        out["degraded_share"] = got.count("be2") / len(got)
        st = px.stats()
        out["stats"] = {k: st.get("cluster.c.health_check." + k, 0) > 0
                        for k in ("attempt", "success", "failure")}
        out["healthy_gauge"] = st.get("cluster.c.health_check.healthy")
    return out


def test_http_health_check_as_envoy():
    bes = [Switchable("be%d" % i) for i in range(3)]
    try:
        bs = _bs([b.port for b in bes], HTTP_HC)
        mine = _http_scenario(Pyproxy, bs, bes)
        assert mine["start"] == ["healthy"] * 3
        assert mine["served_all"] == {"be0", "be1", "be2"}
        assert mine["served_without"] == {"be0", "be2"}
        assert mine["served_soon"] == {"be0", "be2"}
        assert mine["served_again"] == {"be0", "be1", "be2"}
        assert mine["degraded_share"] < 0.2
        assert mine["t_down"] < 1.0 and 0.2 < mine["t_up"] < 1.5
        assert mine["stats"] == {"attempt": True, "success": True, "failure": True}
        assert mine["healthy_gauge"] == 3
        if not ENVOY:
            pytest.skip("envoy binary not available")
        theirs = _http_scenario(Envoy, with_fresh_ports(bs), bes)
        for k in ("start", "served_all", "served_without", "served_again", "stats",
                  "healthy_gauge"):
            assert mine[k] == theirs[k], (k, mine[k], theirs[k])
        assert abs(mine["t_up"] - theirs["t_up"]) < 0.6
        assert theirs["degraded_share"] < 0.2
    finally:
        for b in bes:
            b.close()


def test_http_health_check_timeout_threshold_and_flags():
    """A hanging check is a network failure: unhealthy after unhealthy_threshold (2) timeouts, with
    /failed_active_hc/active_hc_timeout; the timeout flag clears when the host passes again."""
    bes = [Switchable("be%d" % i) for i in range(2)]
    try:
        hc = dict(HTTP_HC, timeout="0.3s", interval="0.1s", no_traffic_interval="0.1s")
        bs = _bs([b.port for b in bes], hc)
        key = "127.0.0.1:%d" % bes[0].port
        with Pyproxy(bs) as px:
            bes[0].hc_status = "hang"
            t = _wait(px, key, "/failed_active_hc/active_hc_timeout", 5)
            assert t >= 0.5  # two timeouts of 0.3 s at least
            assert px.stat("cluster.c.health_check.network_failure") >= 2
            assert _served(px, 10) == {"be1"}
            bes[0].hc_status = 200
            _wait(px, key, "healthy", 8)
    finally:
        for b in bes:
            b.close()


def test_tcp_health_check_killed_and_restarted_host():
    """TCP check with send/receive payloads: a host that stops listening leaves rotation; a new
    listener on the same port brings it back."""
    class Server:
        def __init__(self, ls):
            self.ls = ls
            self.conns = []

        def getsockname(self):
            return self.ls.getsockname()

        def close(self):  # the process dies: listener and connections
            try:
                self.ls.shutdown(socket.SHUT_RDWR)  # (wakes the accept() of the server thread)
            except OSError:
                pass
            self.ls.close()
            for c in self.conns:
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                c.close()

    def tcp_server(port=0):
        ls = socket.socket()
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("127.0.0.1", port))
        ls.listen(16)
        srv = Server(ls)

        def serve():
            while True:
                try:
                    s, _ = ls.accept()
                except OSError:
                    return
                srv.conns.append(s)

                def one(s=s):
                    try:
                        while True:
                            d = s.recv(100)
                            if not d:
                                return
                            if b"PING" in d:
                                s.sendall(b"xxPONG-OK")
                    except OSError:
                        pass
                    finally:
                        s.close()
                threading.Thread(target=one, daemon=True).start()
        threading.Thread(target=serve, daemon=True).start()
        return srv

    a, b = tcp_server(), tcp_server()
    ports = [a.getsockname()[1], b.getsockname()[1]]
    hc = {"timeout": "0.3s", "interval": "0.1s", "unhealthy_threshold": 2, "healthy_threshold": 1,
          "no_traffic_interval": "0.1s",
          "tcp_health_check": {"send": {"text": "50494e47"},  # PING
                               "receive": [{"text": "504f4e47"}, {"binary": "LU9L"}]}}  # PONG, -OK
    eps = [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}}
           for p in ports]
    c = {"name": "c", "type": "STATIC", "connect_timeout": "0.5s", "health_checks": [hc],
         "load_assignment": {"cluster_name": "c", "endpoints": [{"lb_endpoints": eps}]}}
    bs = bootstrap([http_listener(free_port(), route_config([route("/", "c")]))], [c])
    key = "127.0.0.1:%d" % ports[0]
    try:
        with Pyproxy(bs) as px:
            assert set(_flags(px).values()) == {"healthy"}
            a.close()
            _wait(px, key, "/failed_active_hc", 5)
            assert px.stat("cluster.c.health_check.network_failure") >= 2
            a = tcp_server(ports[0])
            _wait(px, key, "healthy", 5)
    finally:
        a.close()
        b.close()


class _Health(grpc.GenericRpcHandler):
    def __init__(self):
        self.status = 1  # SERVING
        self.services = []

    def service(self, details):
        if details.method != "/grpc.health.v1.Health/Check":
            return None

        def check(req, ctx):
            self.services.append(req)
            return bytes([0x08, self.status])
        return grpc.unary_unary_rpc_method_handler(check)


def test_grpc_health_check():
    hs = [_Health(), _Health()]
    servers, ports = [], []
    for h in hs:
        srv = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        srv.add_generic_rpc_handlers((h,))
        ports.append(srv.add_insecure_port("127.0.0.1:0"))
        srv.start()
        servers.append(srv)
    hc = {"timeout": "0.5s", "interval": "0.1s", "unhealthy_threshold": 2, "healthy_threshold": 2,
          "no_traffic_interval": "0.1s", "grpc_health_check": {"service_name": "svc.A"}}
    bs = _bs(ports, hc, typed_extension_protocol_options={
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}}}})
    key = "127.0.0.1:%d" % ports[1]
    try:
        with Pyproxy(bs) as px:
            assert set(_flags(px).values()) == {"healthy"}
            assert hs[1].services and hs[1].services[0] == b"\x0a\x05svc.A"
            hs[1].status = 2  # NOT_SERVING: unhealthy at once
            _wait(px, key, "/failed_active_hc", 3)
            hs[1].status = 1
            _wait(px, key, "healthy", 3)
            servers[1].stop(0)
            _wait(px, key, "/failed_active_hc", 5)
            assert px.stat("cluster.c.health_check.network_failure") >= 2
    finally:
        for s in servers:
            s.stop(0)


def test_health_check_config_errors(tmp_path):
    import json
    from proxy_util import run_pyproxy
    for hc, why in (({"interval": "1s", "unhealthy_threshold": 1, "healthy_threshold": 1,
                      "http_health_check": {"path": "/"}}, "timeout is required"),
                    ({"timeout": "1s", "interval": "1s", "unhealthy_threshold": 1,
                      "healthy_threshold": 1, "http_health_check": {"path": "/",
                                                                    "codec_client_type": "HTTP2"}},
                     "only HTTP/1.1")):
        p = tmp_path / "bs.json"
        p.write_text(json.dumps(_bs([free_port()], hc)))
        r = run_pyproxy(["validate", str(p)])
        assert r.returncode == 1 and why in r.stdout, r.stdout


def test_http_health_check_over_the_clusters_tls(tmp_path):
    """A TLS cluster is health-checked over TLS (its transport socket): healthy; a host whose
    certificate fails the SAN check is unhealthy (a network failure, as a failed handshake)."""
    import os
    from test_tls_upstream import BACKEND_URI, TlsHttpBackend
    from tls_certs import Pki, upstream_tls, uri_san
    pki = Pki(os.path.join(str(tmp_path), "pki"))
    good = TlsHttpBackend(pki.issue("backend", dns=["backend.local"], uri=[BACKEND_URI]))
    bad = TlsHttpBackend(pki.issue("other", dns=["backend.local"],
                                   uri=["spiffe://cluster.local/ns/x/sa/other"]))
    try:
        hc = dict(HTTP_HC, unhealthy_threshold=1)
        bs = _bs([good.port, bad.port], hc, transport_socket=upstream_tls(
            sni="backend.local", ca=pki, sans=[uri_san("exact", BACKEND_URI)]))
        with Pyproxy(bs) as px:
            f = _flags(px)
            assert f["127.0.0.1:%d" % good.port] == "healthy"
            assert f["127.0.0.1:%d" % bad.port] == "/failed_active_hc"
            assert good.handshakes >= 1
            assert px.stat("cluster.c.health_check.network_failure") >= 1
            st, _, body = request(px.port, "GET", "/x")
            assert st == 200 and b"path=/x" in body
    finally:
        good.close()
        bad.close()
