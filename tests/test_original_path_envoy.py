"""``x-envoy-original-path`` sent by a client, side by side with Envoy: Envoy removes it from edge
requests (``use_remote_address`` and not internal: ``cleanInternalHeaders``) and passes it on
otherwise (no ``use_remote_address``, or an internal peer); a route's path rewrite sets it to the
path the client sent (the router's ``finalizeRequestHeaders``). Real sockets; one upstream shared
by pyproxy and Envoy; every shape on both HTTP/1.1 paths (the inline stream and, with an access
log, the filter chain)."""

from __future__ import annotations

import socket

import pytest

from proxy_util import Envoy, HttpBackend, Pyproxy, one_route_bootstrap, simple_response

INTERNAL = {"internal_address_config": {"cidr_ranges": [{"address_prefix": "127.0.0.1", "prefix_len": 32}]}}
LOG = {"access_log": [{"name": "envoy.access_loggers.stdout", "typed_config": {
    "@type": "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog"}}]}
SHAPES = {
    "no_remote_address": {},
    "edge": {"use_remote_address": True},
    "internal": dict(use_remote_address=True, **INTERNAL),
}


def _get(port: int, path: str, headers) -> bytes:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        s.sendall(("GET %s HTTP/1.1\r\nhost: x\r\n%s\r\n" % (
            path, "".join("%s: %s\r\n" % kv for kv in headers))).encode())
        out = b""
        while not out.endswith(b"\r\n\r\nok"):
            d = s.recv(65536)
            if not d:
                break
            out += d
        return out
    finally:
        s.close()


def _seen(kind, backend, shape: dict, rewrite: bool, log: bool):
    """The x-envoy-original-path values the upstream received for a request carrying one."""
    bs, port = one_route_bootstrap([backend.port], hcm_extra=dict(shape, **(LOG if log else {})),
                                   route_extra={"prefix_rewrite": "/r/"} if rewrite else None)
    with kind(bs):
        n = len(backend.requests)
        out = _get(port, "/a/b", [("x-envoy-original-path", "/client")])
        assert out.startswith(b"HTTP/1.1 200"), out
        return backend.requests[n].header_all("x-envoy-original-path")


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("rewrite", [False, True], ids=["as_sent", "prefix_rewrite"])
def test_client_original_path_as_envoy(shape, rewrite):
    with HttpBackend(lambda req, sock: simple_response(200, b"ok")) as b:
        want = _seen(Envoy, b, SHAPES[shape], rewrite, False)
        # (Envoy 1.40, checked: removed from edge requests only; a rewrite sets the client's path)
        assert want == (["/a/b"] if rewrite else [] if shape == "edge" else ["/client"])
        for log in (False, True):
            assert _seen(Pyproxy, b, SHAPES[shape], rewrite, log) == want, (shape, rewrite, log)


def _seen_host(kind, backend, shape: dict):
    bs, port = one_route_bootstrap([backend.port], hcm_extra=shape)
    with kind(bs):
        n = len(backend.requests)
        out = _get(port, "/a/b", [("x-envoy-original-host", "forged")])
        assert out.startswith(b"HTTP/1.1 200"), out
        return backend.requests[n].header_all("x-envoy-original-host")


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_client_original_host_as_envoy(shape):
    # the same rule for a client's x-envoy-original-host (review F12): removed from edge requests
    with HttpBackend(lambda req, sock: simple_response(200, b"ok")) as b:
        want = _seen_host(Envoy, b, SHAPES[shape])
        assert want == ([] if shape == "edge" else ["forged"])
        assert _seen_host(Pyproxy, b, SHAPES[shape]) == want, shape
