"""``cluster.<c>.http2.tx_reset`` / ``rx_reset``, side by side with Envoy (review finding F31): an
HTTP/2 upstream stream the proxy resets (the route timeout passed: RST_STREAM from the proxy) and
one the upstream resets mid-body (RST_STREAM from the upstream) are counted under the cluster's
``http2.`` scope, as Envoy's upstream codec counts them. Scripted h2c upstream."""

from __future__ import annotations

import socket

import pytest

from h2_upstream_util import ResetRecordingUpstream
from proxy_util import (ENVOY, Envoy, Pyproxy, bootstrap, cluster, free_port, http_listener, route, route_config,
                        wait_until, with_fresh_ports)

pytestmark = pytest.mark.skipif(not ENVOY, reason="envoy not installed")
HPO = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


class _Up(ResetRecordingUpstream):
    def on_request(self, conn, ev, state):
        path = dict(ev.headers)[":path"]
        sid = ev.stream_id
        if path.startswith("/never"):
            return True
        if path.startswith("/rst-mid"):
            conn.send_headers(sid, [(":status", "200"), ("content-length", "100")])
            conn.send_data(sid, b"abc")
            conn.reset_stream(sid, 2)
            return True
        conn.send_headers(sid, [(":status", "200"), ("content-length", "2")])
        conn.send_data(sid, b"ok", end_stream=True)
        return True


def _get(port, path):
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    got = b""
    try:
        s.sendall(("GET %s HTTP/1.1\r\nHost: x\r\nconnection: close\r\n\r\n" % path).encode())
        while True:
            d = s.recv(65536)
            if not d:
                break
            got += d
    except OSError:
        pass
    finally:
        s.close()
    return got[9:12]


def _run(cls):
    up = _Up()
    try:
        c = cluster("b", [up.port], typed_extension_protocol_options={HPO: {
            "@type": "type.googleapis.com/" + HPO, "explicit_http_config": {"http2_protocol_options": {}}}})
        bs = bootstrap([http_listener(free_port(), route_config([route("/", "b", timeout="0.5s")]))], [c])
        with cls(with_fresh_ports(bs)) as p:
            codes = [_get(p.port, "/ok"), _get(p.port, "/never"), _get(p.port, "/rst-mid"), _get(p.port, "/ok")]
            up.got.wait(3)
            wait_until(lambda: p.stat("cluster.b.http2.tx_reset") and p.stat("cluster.b.http2.rx_reset"), 3)
            st = p.stats()
    finally:
        up.close()
    # (Envoy's nghttp2_upstream_connections gauge names its codec library: not compared)
    return codes, list(up.resets), {k: v for k, v in st.items() if k.startswith("cluster.b.http2.") and v
                                    and "nghttp2" not in k}


def test_upstream_h2_resets_counted_like_envoy():
    px, env = _run(Pyproxy), _run(Envoy)
    assert env[2].get("cluster.b.http2.tx_reset") == 1 and env[2].get("cluster.b.http2.rx_reset") == 1, env
    assert px == env, (px, env)
