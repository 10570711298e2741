"""The ``:scheme`` of HTTP/1.1 requests, side by side with Envoy (review finding F59): Envoy's
HTTP/1.1 codec sets none for an origin-form request and its connection manager takes it from
X-Forwarded-Proto (when ``http``/``https``), else from the connection (TLS: ``https``); an
absolute-form URI gives its own. Seen through a route ``:scheme`` match (VirtualService
``match.scheme``: 201 for https, 202 otherwise) and ``require_tls: ALL`` (Gateway httpsRedirect),
on a TLS listener (HTTP/1.1 and HTTP/2, curl) and on plaintext sidecar-shaped and edge HCMs."""

from __future__ import annotations

import shutil
import socket
import subprocess

import pytest

from proxy_util import ENVOY, Envoy, Pyproxy, bootstrap, cluster, free_port, http_listener, with_fresh_ports
from tls_certs import Pki, downstream_tls

pytestmark = [pytest.mark.skipif(not ENVOY, reason="envoy not installed"),
              pytest.mark.skipif(not shutil.which("curl"), reason="curl not installed")]
RC = {"name": "r", "virtual_hosts": [
    {"name": "tls", "domains": ["tls.example"], "require_tls": "ALL",
     "routes": [{"match": {"prefix": "/"}, "direct_response": {"status": 200}}]},
    {"name": "v", "domains": ["*"], "routes": [
        {"match": {"prefix": "/", "headers": [{"name": ":scheme", "string_match": {"exact": "https"}}]},
         "direct_response": {"status": 201}},
        {"match": {"prefix": "/"}, "direct_response": {"status": 202}}]}]}
REQS = {"plain": b"GET /a HTTP/1.1\r\nHost: %s\r\nconnection: close\r\n\r\n",
        "xfp-https": b"GET /a HTTP/1.1\r\nHost: %s\r\nX-Forwarded-Proto: https\r\nconnection: close\r\n\r\n",
        "xfp-http": b"GET /a HTTP/1.1\r\nHost: %s\r\nX-Forwarded-Proto: http\r\nconnection: close\r\n\r\n",
        "abs-http": b"GET http://%s/a HTTP/1.1\r\nHost: %s\r\nconnection: close\r\n\r\n"}


def _status(port, data):
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    got = b""
    try:
        s.sendall(data)
        while True:
            d = s.recv(65536)
            if not d:
                break
            got += d
    finally:
        s.close()
    return got[9:12].decode()


@pytest.mark.parametrize("hcm", [{}, {"use_remote_address": True}], ids=["sidecar", "edge"])
def test_plaintext_h1_scheme_like_envoy(hcm):
    out = {}
    for cls in (Pyproxy, Envoy):
        bs = bootstrap([http_listener(free_port(), RC, stat_prefix="in", **hcm)], [cluster("b", [free_port()])])
        with cls(with_fresh_ports(bs)) as p:
            out[cls.kind] = {"%s:%s" % (host.decode()[:3], n): _status(p.port, q.replace(b"%s", host))
                             for host in (b"tls.example", b"other") for n, q in REQS.items()}
    assert out["envoy"]["oth:abs-http"] == "202", out  # (the reference itself)
    assert out["pyproxy"] == out["envoy"], out


def test_tls_listener_h1_and_h2_scheme_like_envoy(tmp_path):
    srv = Pki(tmp_path).issue("server", dns=["localhost"])
    out = {}
    for cls in (Pyproxy, Envoy):
        l = http_listener(free_port(), RC, stat_prefix="in")
        l["filter_chains"][0]["transport_socket"] = downstream_tls(srv)
        with cls(with_fresh_ports(bootstrap([l], [cluster("b", [free_port()])]))) as p:
            res = {}
            for flag in ("--http1.1", "--http2"):
                for xfp in ("", "http"):
                    args = ["curl", "-sk", "-o", "/dev/null", "-w", "%{http_code}", flag, "--max-time", "5"]
                    if xfp:
                        args += ["-H", "x-forwarded-proto: " + xfp]
                    cp = subprocess.run(args + ["https://localhost:%d/m" % p.port], capture_output=True, timeout=10)
                    res["%s xfp=%s" % (flag, xfp)] = cp.stdout.decode()
            out[cls.kind] = res
    assert out["envoy"]["--http1.1 xfp="] == "201", out  # (the reference: TLS is https)
    assert out["pyproxy"] == out["envoy"], out
