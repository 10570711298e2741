"""gRPC clients and the proxy's own replies, side by side with Envoy (review finding F27): a route's
``direct_response`` to a gRPC request is a gRPC reply (``:status 200``, ``grpc-status`` from the
HTTP status, ``grpc-message`` the body); a local reply with an empty body (no route: 404 ->
``grpc-status 12``) carries no ``grpc-message``; the gRPC direct reply carries the route's and
virtual host's response headers. HTTP/2 client (curl)."""

from __future__ import annotations

import subprocess

import pytest

from proxy_util import (ENVOY, Envoy, HttpBackend, Pyproxy, bootstrap, cluster, free_port, http_listener, route,
                        route_config, with_fresh_ports)

pytestmark = pytest.mark.skipif(not ENVOY, reason="envoy not installed")


def _bs(be_port):
    rc = route_config([{"match": {"prefix": "/direct"}, "direct_response": {"status": 503, "body": {"inline_string": "direct"}},
                        "response_headers_to_add": [{"header": {"key": "x-route", "value": "r"}}]},
                       {"match": {"prefix": "/ok-direct"}, "direct_response": {"status": 200, "body": {"inline_string": "fine"}}},
                       route("/pkg.", "b")], response_headers_to_add=[{"header": {"key": "x-vh", "value": "v"}}])
    return bootstrap([http_listener(free_port(), rc)], [cluster("b", [be_port])])


def _call(port, path, grpc):
    hdrs = ["-H", "content-type: application/grpc", "-H", "te: trailers"] if grpc else []
    cp = subprocess.run(["curl", "-s", "-i", "--http2-prior-knowledge", "--max-time", "5", *hdrs,
                         "-X", "POST", "http://127.0.0.1:%d%s" % (port, path)],
                        capture_output=True, timeout=10)  # (no body: the reply comes before none is read)
    out = cp.stdout.decode("latin-1").lower().replace("\r\n", "\n")
    head, _, body = out.partition("\n\n")
    keep = ("content-type", "grpc-status", "grpc-message", "content-length", "x-route", "x-vh")
    lines = [head.split("\n")[0].strip()] + sorted(l for l in head.split("\n")[1:] if l.split(":")[0] in keep)
    return lines, body


def test_grpc_direct_response_and_empty_message():
    out = {}
    with HttpBackend() as be:
        for cls in (Pyproxy, Envoy):
            with cls(with_fresh_ports(_bs(be.port))) as p:
                out[cls.__name__] = {path: _call(p.port, path, True) for path in ("/direct", "/ok-direct", "/other")}
    ev = out["Envoy"]
    assert "grpc-status: 14" in ev["/direct"][0] and "x-route: r" in ev["/direct"][0], ev
    assert out["Pyproxy"] == ev, out
