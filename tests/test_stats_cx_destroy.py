"""Counters Envoy emits for how connections end and for the router, compared side by side with
Envoy on the same traffic: ``http.<prefix>.rq_total`` (the router's), the downstream
``downstream_cx_destroy_{local,remote}`` and ``_active_rq`` variants, and the cluster's
``upstream_cx_destroy_{local,remote}`` and ``_with_active_rq`` variants, and its
``external.upstream_rq_<code>/<class>/completed``."""

from __future__ import annotations

import os
import socket
import struct
import time

from tests.proxy_util import (Envoy, HttpBackend, Pyproxy, bootstrap, cluster, free_port, http_listener,
                              route, route_config, simple_response, with_fresh_ports)

NAMES = ["http.ingress.rq_total", "http.ingress.downstream_rq_total"] + [
    "http.ingress.downstream_cx_destroy" + s for s in
    ("", "_local", "_remote", "_active_rq", "_local_active_rq", "_remote_active_rq")] + [
    "cluster.b.upstream_cx_destroy" + s for s in
    ("", "_local", "_remote", "_with_active_rq", "_local_with_active_rq", "_remote_with_active_rq")] + [
    "cluster.b.%supstream_rq_%s" % (p, s) for p in ("", "external.") for s in ("200", "2xx", "503", "5xx", "completed")]


def _handler(req, sock):
    if req.path == "/upclose":
        return simple_response(200, b"ok", [("connection", "close")])
    if req.path == "/drop":
        return "close"
    if req.path == "/slow":
        time.sleep(1.0)
    return simple_response(200, b"ok")


def _exchange(s, req: bytes) -> bytes:
    s.sendall(req)
    buf = b""
    deadline = time.monotonic() + 3
    while b"\r\n\r\n" not in buf or not buf.endswith(b"ok") and b"content-length: 0" not in buf.lower() \
            and not buf.rstrip().endswith(b"headers") and b" 503 " not in buf:
        if time.monotonic() > deadline:
            break
        d = s.recv(65536)
        if not d:
            break
        buf += d
    return buf


def _scenario(cls, env=None):
    be = HttpBackend(_handler)
    bs = bootstrap([http_listener(free_port(), route_config([route("/", "b")]))], [cluster("b", [be.port])])
    try:
        with cls(with_fresh_ports(bs), env=env) as px:
            before = px.stats()
            conn = lambda: socket.create_connection(("127.0.0.1", px.port), timeout=3)  # noqa: E731
            # two keep-alive requests, then the client closes: a remote close
            s = conn()
            _exchange(s, b"GET /a HTTP/1.1\r\nhost: x\r\n\r\n")
            _exchange(s, b"GET /a HTTP/1.1\r\nhost: x\r\n\r\n")
            s.close()
            # the client asks for connection: close: the proxy closes (local)
            s = conn()
            _exchange(s, b"GET /a HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            time.sleep(0.3)
            s.close()
            # the upstream answers connection: close; then an upstream that closes without answering
            s = conn()
            _exchange(s, b"GET /upclose HTTP/1.1\r\nhost: x\r\n\r\n")
            _exchange(s, b"GET /drop HTTP/1.1\r\nhost: x\r\n\r\n")
            s.close()
            # the client resets its connection while its request is in flight
            s = conn()
            s.sendall(b"GET /slow HTTP/1.1\r\nhost: x\r\n\r\n")
            time.sleep(0.3)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
            time.sleep(1.5)  # (the slow answer comes back to no one; connections settle)
            after = px.stats()
    finally:
        be.close()
    return {n: after.get(n, 0) - before.get(n, 0) for n in NAMES}


def test_destroy_and_router_counters_match_envoy():
    want = _scenario(Envoy)
    assert want["http.ingress.downstream_cx_destroy_remote"] and want["http.ingress.rq_total"], want  # (premise)
    assert want["cluster.b.external.upstream_rq_503"] and want["cluster.b.external.upstream_rq_completed"], want
    got = _scenario(Pyproxy)
    assert got == want, "\n%s\n%s" % (got, want)
    ref = _scenario(Pyproxy, env=dict(os.environ, PYPROXY_REFERENCE="1"))  # (the filter-by-filter router)
    assert ref == want, "\n%s\n%s" % (ref, want)
