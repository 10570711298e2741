"""The RST_STREAM error code an HTTP/2 upstream gets when the proxy abandons its stream (the route
timeout passed), side by side with Envoy (review finding F31): INTERNAL_ERROR (2), as Envoy's local
reset, not CANCEL. Scripted h2c upstream that never answers; route timeout 0.5 s."""

from __future__ import annotations

import socket
import time

import pytest

from h2_upstream_util import ResetRecordingUpstream
from proxy_util import (ENVOY, Envoy, Pyproxy, bootstrap, cluster, free_port, http_listener, route, route_config,
                        with_fresh_ports)

pytestmark = pytest.mark.skipif(not ENVOY, reason="envoy not installed")
HPO = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


class _Silent(ResetRecordingUpstream):
    def on_request(self, conn, ev, state):
        return True  # (never answers)


def test_abandoned_stream_reset_code():
    out = {}
    for name, cls in (("pyproxy", Pyproxy), ("envoy", Envoy)):
        up = _Silent()
        try:
            c = cluster("b", [up.port], typed_extension_protocol_options={HPO: {
                "@type": "type.googleapis.com/" + HPO, "explicit_http_config": {"http2_protocol_options": {}}}})
            bs = bootstrap([http_listener(free_port(), route_config([route("/", "b", timeout="0.5s")]))], [c])
            with cls(with_fresh_ports(bs)) as p:
                s = socket.create_connection(("127.0.0.1", p.port), timeout=5)
                try:
                    s.sendall(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
                    head = s.recv(65536)
                finally:
                    s.close()
                up.got.wait(3)
                time.sleep(0.1)
                out[name] = (head[9:12], list(up.resets))
        finally:
            up.close()
    assert out["pyproxy"] == out["envoy"] == (b"504", [2]), out
