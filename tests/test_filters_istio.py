"""Real traffic through the filters Istio configures — fault, cors, rbac (HTTP and network), gzip
compressor — in a real pyproxy process in front of a real HTTP backend, with the *same* bootstrap run
by the real Envoy: every expectation is checked against both, so semantics match Envoy's."""

from __future__ import annotations

import gzip
import http.client
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml

from proxy_util import until_close

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TP = "type.googleapis.com/"
BODY = ("pyproxy compresses this line. " * 40).encode()


class Backend(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        if self.path.startswith("/big"):
            body, ct = BODY, "text/plain"
        else:
            body = json.dumps({"path": self.path, "headers": dict(self.headers.items())}).encode()
            ct = "application/json"
        self.send_response(200)
        self.send_header("content-type", ct)
        self.send_header("content-length", str(len(body)))
        self.send_header("x-exposed", "1")
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_OPTIONS = do_GET

    def log_message(self, *a):
        pass


@pytest.fixture(scope="module")
def backend():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Backend)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield srv.server_address[1]
    finally:
        srv.shutdown()
        srv.server_close()


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def _hcm(routes, filters):
    return {"name": "envoy.filters.network.http_connection_manager", "typed_config": {
        "@type": TP + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "ingress", "route_config": {"name": "r", "virtual_hosts": [routes]},
        "http_filters": filters + [{"name": "envoy.filters.http.router", "typed_config": {
            "@type": TP + "envoy.extensions.filters.http.router.v3.Router"}}]}}


def bootstrap(bport, hport, tport, aport, closed_port):
    fault_t = TP + "envoy.extensions.filters.http.fault.v3.HTTPFault"
    vhost = {
        "name": "all", "domains": ["*"],
        "typed_per_filter_config": {"envoy.filters.http.cors": {
            "@type": TP + "envoy.extensions.filters.http.cors.v3.CorsPolicy",
            "allow_origin_string_match": [{"exact": "https://good.example"}],
            "allow_methods": "GET,POST", "allow_headers": "x-custom", "expose_headers": "x-exposed",
            "max_age": "600", "allow_credentials": True}},
        "routes": [
            {"match": {"prefix": "/fault/abort"}, "route": {"cluster": "backend"},
             "typed_per_filter_config": {"envoy.filters.http.fault": {
                 "@type": fault_t, "abort": {"http_status": 418, "percentage": {"numerator": 100}}}}},
            {"match": {"prefix": "/fault/delay"}, "route": {"cluster": "backend"},
             "typed_per_filter_config": {"envoy.filters.http.fault": {
                 "@type": fault_t, "delay": {"fixed_delay": "0.4s", "percentage": {"numerator": 100}}}}},
            {"match": {"prefix": "/fault/header"}, "route": {"cluster": "backend"},
             "typed_per_filter_config": {"envoy.filters.http.fault": {
                 "@type": fault_t, "abort": {"header_abort": {}, "percentage": {"numerator": 100}}}}},
            {"match": {"prefix": "/"}, "route": {"cluster": "backend"}},
        ]}
    any_p = [{"any": True}]
    rbac = {"name": "envoy.filters.http.rbac", "typed_config": {
        "@type": TP + "envoy.extensions.filters.http.rbac.v3.RBAC",
        "rules": {"action": "DENY", "policies": {
            "deny-admin": {"permissions": [{"url_path": {"path": {"prefix": "/admin"}}}], "principals": any_p},
            "deny-header": {"permissions": [{"header": {"name": "x-block", "present_match": True}}],
                            "principals": any_p},
            "deny-src": {"permissions": any_p,
                         "principals": [{"direct_remote_ip": {"address_prefix": "127.0.0.2", "prefix_len": 32}}]},
            "deny-post-data": {"permissions": [{"and_rules": {"rules": [
                {"header": {"name": ":method", "string_match": {"exact": "POST"}}},
                {"url_path": {"path": {"exact": "/data"}}}]}}], "principals": any_p},
        }},
        "shadow_rules": {"action": "ALLOW", "policies": {
            "only-get": {"permissions": [{"header": {"name": ":method", "string_match": {"exact": "GET"}}}],
                         "principals": any_p}}},
        "shadow_rules_stat_prefix": "dry_run_"}}
    gz = {"name": "envoy.filters.http.compressor", "typed_config": {
        "@type": TP + "envoy.extensions.filters.http.compressor.v3.Compressor",
        "compressor_library": {"name": "text", "typed_config": {
            "@type": TP + "envoy.extensions.compression.gzip.compressor.v3.Gzip"}},
        "response_direction_config": {"common_config": {"content_type": ["text/plain"],
                                                        "min_content_length": 100}}}}
    filters = [
        {"name": "envoy.filters.http.cors", "typed_config": {"@type": TP + "envoy.extensions.filters.http.cors.v3.Cors"}},
        {"name": "envoy.filters.http.fault", "typed_config": {"@type": fault_t}},
        rbac, gz]
    tcp_rbac = {"name": "envoy.filters.network.rbac", "typed_config": {
        "@type": TP + "envoy.extensions.filters.network.rbac.v3.RBAC", "stat_prefix": "tcp.",
        "rules": {"action": "ALLOW", "policies": {"loopback-1": {
            "permissions": any_p,
            "principals": [{"direct_remote_ip": {"address_prefix": "127.0.0.1", "prefix_len": 32}}]}}}}}
    tcp = {"name": "envoy.filters.network.tcp_proxy", "typed_config": {
        "@type": TP + "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
        "stat_prefix": "tcp", "cluster": "backend"}}
    # Istio's CUSTOM authorization: a shadow RBAC policy selects requests, ext_authz checks them
    authz_filters = [
        {"name": "envoy.filters.http.rbac", "typed_config": {
            "@type": TP + "envoy.extensions.filters.http.rbac.v3.RBAC",
            "shadow_rules": {"action": "DENY", "policies": {"istio-ext-authz-check": {
                "permissions": [{"url_path": {"path": {"prefix": "/check"}}}], "principals": any_p}}},
            "shadow_rules_stat_prefix": "istio_ext_authz_"}},
        {"name": "envoy.filters.http.ext_authz", "typed_config": {
            "@type": TP + "envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
            "grpc_service": {"envoy_grpc": {"cluster_name": "authz"}, "timeout": "1s"},
            "transport_api_version": "V3",
            "filter_enabled_metadata": {"filter": "envoy.filters.http.rbac",
                                        "path": [{"key": "istio_ext_authz_shadow_effective_policy_id"}],
                                        "value": {"string_match": {"prefix": "istio-ext-authz"}}}}}]
    authz_vhost = {"name": "all", "domains": ["*"], "routes": [{"match": {"prefix": "/"},
                                                                "route": {"cluster": "backend"}}]}
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "clusters": [{"name": "backend", "type": "STATIC", "connect_timeout": "1s",
                          "load_assignment": {"cluster_name": "backend", "endpoints": [{"lb_endpoints": [
                              {"endpoint": {"address": {"socket_address": {
                                  "address": "127.0.0.1", "port_value": bport}}}}]}]}},
                         {"name": "authz", "type": "STATIC", "connect_timeout": "0.5s",
                          "typed_extension_protocol_options": {
                              "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                                  "@type": TP + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                                  "explicit_http_config": {"http2_protocol_options": {}}}},
                          "load_assignment": {"cluster_name": "authz", "endpoints": [{"lb_endpoints": [
                              {"endpoint": {"address": {"socket_address": {
                                  "address": "127.0.0.1", "port_value": closed_port}}}}]}]}}],
            "listeners": [
                {"name": "http", "address": {"socket_address": {"address": "0.0.0.0", "port_value": hport}},
                 "filter_chains": [{"filters": [_hcm(vhost, filters)]}]},
                {"name": "tcp", "address": {"socket_address": {"address": "0.0.0.0", "port_value": tport}},
                 "filter_chains": [{"filters": [tcp_rbac, tcp]}]},
                {"name": "authz", "address": {"socket_address": {"address": "0.0.0.0", "port_value": aport}},
                 "filter_chains": [{"filters": [_hcm(authz_vhost, authz_filters)]}]},
            ]}}


class Proxy:
    def __init__(self, kind, tmp, bport):
        self.kind = kind
        self.hport, self.tport, self.aport = _free_port(), _free_port(), _free_port()
        cfg = os.path.join(tmp, "%s.yaml" % kind)
        with open(cfg, "w") as f:
            yaml.safe_dump(bootstrap(bport, self.hport, self.tport, self.aport, _free_port()), f)
        self.admin_path = os.path.join(tmp, "%s.admin" % kind)
        if kind == "envoy":
            cmd = ["envoy", "--base-id", str(random.randint(1000, 60000)), "--disable-hot-restart"]
        else:
            cmd = [sys.executable, "-m", "pyproxy"]
        cmd += ["-c", cfg, "--concurrency", "1", "-l", "warning", "--admin-address-path", self.admin_path]
        self.log = open(os.path.join(tmp, "%s.log" % kind), "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT)
        deadline = time.monotonic() + 15
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError("%s exited: %s" % (kind, open(self.log.name).read()[-3000:]))
            try:
                socket.create_connection(("127.0.0.1", self.hport), timeout=0.5).close()
                socket.create_connection(("127.0.0.1", self.tport), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("%s did not start" % kind)
                time.sleep(0.05)

    def request(self, method, path, headers=None, source="127.0.0.1", port=None):
        c = http.client.HTTPConnection("127.0.0.1", port or self.hport, timeout=5, source_address=(source, 0))
        try:
            c.request(method, path, headers=headers or {})
            r = c.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            c.close()

    def stats(self) -> dict:
        addr = open(self.admin_path).read().strip()
        host, _, port = addr.rpartition(":")
        c = http.client.HTTPConnection(host, int(port), timeout=5)
        c.request("GET", "/stats")
        text = c.getresponse().read().decode()
        c.close()
        out = {}
        for line in text.splitlines():
            k, _, v = line.partition(": ")
            out[k] = v
        return out

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.log.close()


KINDS = ["pyproxy"] + (["envoy"] if shutil.which("envoy") else [])


@pytest.fixture(scope="module", params=KINDS)
def proxy(request, backend, tmp_path_factory):
    p = Proxy(request.param, str(tmp_path_factory.mktemp(request.param)), backend)
    try:
        yield p
    finally:
        p.stop()


def test_fault_abort(proxy):
    st, h, body = proxy.request("GET", "/fault/abort")
    assert st == 418 and body == b"fault filter abort"


def test_fault_abort_from_header(proxy):
    st, _, _ = proxy.request("GET", "/fault/header", {"x-envoy-fault-abort-request": "429"})
    assert st == 429
    st, _, _ = proxy.request("GET", "/fault/header")  # no header: no fault
    assert st == 200


def test_fault_delay(proxy):
    t0 = time.monotonic()
    st, _, body = proxy.request("GET", "/fault/delay")
    dt = time.monotonic() - t0
    assert st == 200 and json.loads(body)["path"] == "/fault/delay"
    assert 0.35 <= dt < 3.0


def test_cors_preflight(proxy):
    st, h, body = proxy.request("OPTIONS", "/x", {"origin": "https://good.example",
                                                  "access-control-request-method": "POST"})
    assert st == 200 and body == b""
    assert h["access-control-allow-origin"] == "https://good.example"
    assert h["access-control-allow-methods"] == "GET,POST"
    assert h["access-control-allow-headers"] == "x-custom"
    assert h["access-control-max-age"] == "600"
    assert h["access-control-allow-credentials"] == "true"
    # a preflight from an origin that is not allowed goes to the backend, with no CORS headers
    st, h, body = proxy.request("OPTIONS", "/x", {"origin": "https://evil.example",
                                                  "access-control-request-method": "POST"})
    assert st == 200 and json.loads(body)["path"] == "/x"
    assert "access-control-allow-origin" not in h


def test_cors_simple_request(proxy):
    st, h, _ = proxy.request("GET", "/x", {"origin": "https://good.example"})
    assert st == 200 and h["access-control-allow-origin"] == "https://good.example"
    assert h["access-control-expose-headers"] == "x-exposed"
    st, h, _ = proxy.request("GET", "/x", {"origin": "https://evil.example"})
    assert st == 200 and "access-control-allow-origin" not in h


@pytest.mark.parametrize("method,path,headers,source,status", [
    ("GET", "/ok", {}, "127.0.0.1", 200),
    ("GET", "/admin/x", {}, "127.0.0.1", 403),
    ("GET", "/admin?x=1", {}, "127.0.0.1", 403),
    ("GET", "/ok", {"x-block": "1"}, "127.0.0.1", 403),
    ("GET", "/ok", {}, "127.0.0.2", 403),
    ("POST", "/data", {"content-length": "0"}, "127.0.0.1", 403),
    ("POST", "/data2", {"content-length": "0"}, "127.0.0.1", 200),
    ("GET", "/data", {}, "127.0.0.1", 200),
])
def test_rbac_http(proxy, method, path, headers, source, status):
    st, _, body = proxy.request(method, path, headers, source=source)
    assert st == status
    if status == 403:
        assert body == b"RBAC: access denied"


def test_rbac_http_stats(proxy):
    before = proxy.stats()
    proxy.request("GET", "/admin")
    proxy.request("POST", "/ok", {"content-length": "0"})
    after = proxy.stats()

    def d(name):
        return int(after.get(name, 0)) - int(before.get(name, 0))
    assert d("http.ingress.rbac.denied") == 1
    assert d("http.ingress.rbac.allowed") == 1
    assert d("http.ingress.rbac.dry_run_.shadow_allowed") == 1
    assert d("http.ingress.rbac.dry_run_.shadow_denied") == 1


def test_gzip(proxy):
    st, h, body = proxy.request("GET", "/big", {"accept-encoding": "gzip"})
    assert st == 200 and h.get("content-encoding") == "gzip"
    assert "accept-encoding" in h.get("vary", "").lower()
    assert gzip.decompress(body) == BODY and len(body) < len(BODY)
    st, h, body = proxy.request("GET", "/big", {"accept-encoding": "br;q=1, gzip;q=0"})
    assert "content-encoding" not in h and body == BODY
    st, h, body = proxy.request("GET", "/small", {"accept-encoding": "gzip"})  # application/json
    assert "content-encoding" not in h and json.loads(body)["path"] == "/small"


def _tcp_exchange(port, source):
    return until_close(port, b"GET /tcp HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n", resets=True, source=source)


def test_rbac_network(proxy):
    assert _tcp_exchange(proxy.tport, "127.0.0.1").startswith(b"HTTP/1.")
    assert _tcp_exchange(proxy.tport, "127.0.0.3") == b""
    st = proxy.stats()
    assert int(st["tcp.rbac.denied"]) >= 1 and int(st["tcp.rbac.allowed"]) >= 1


def test_ext_authz_fail_closed(proxy):
    """The authorization service is unreachable: requests the policy selects are denied (403), others
    pass — what Envoy does, and what pyproxy does for every selected request until it calls services."""
    st, _, _ = proxy.request("GET", "/check/x", port=proxy.aport)
    assert st == 403
    st, _, body = proxy.request("GET", "/other", port=proxy.aport)
    assert st == 200 and json.loads(body)["path"] == "/other"
