"""Bytes relayed through an upgraded (websocket) or CONNECT stream over an HTTP/1.1 upstream are
counted as Envoy counts them: in the cluster's upstream_cx_tx_bytes_total / rx_bytes_total (every
byte of the upstream connection: request head, tunnel payload, response head) and in the access
log's %BYTES_RECEIVED% / %BYTES_SENT% (the tunnel payload each way). Checked against what the
backend itself read and wrote, on pyproxy and on Envoy in the same test."""

from __future__ import annotations

import re
import socket
import threading

import pytest

from tests.proxy_util import ENVOY, Envoy, Pyproxy, TcpBackend, bootstrap, cluster, free_port, wait_until

T = "type.googleapis.com/"
CHUNK = 1000
ROUNDS = 3


class TunnelBackend(TcpBackend):
    """Answers a CONNECT with 200 and anything else with 101, then sends back each read twice
    (so the two directions differ); counts every byte it reads and writes, and the connections
    it has finished (``done``)."""

    def __init__(self):
        self.read = 0
        self.written = 0
        self.done = 0
        self.lock = threading.Lock()
        super().__init__(self._serve)

    def _send(self, c, data):
        c.sendall(data)
        with self.lock:
            self.written += len(data)

    def _serve(self, c):
        c.settimeout(5)
        buf = b""
        try:
            while b"\r\n\r\n" not in buf:
                d = c.recv(65536)
                if not d:
                    return
                buf += d
                with self.lock:
                    self.read += len(d)
            head, _, data = buf.partition(b"\r\n\r\n")
            if head.startswith(b"CONNECT "):
                self._send(c, b"HTTP/1.1 200 OK\r\n\r\n")
            else:
                self._send(c, b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n")
            while True:
                if data:
                    self._send(c, data * 2)
                data = c.recv(65536)
                if not data:
                    break
                with self.lock:
                    self.read += len(data)
            c.shutdown(socket.SHUT_WR)
        finally:
            with self.lock:
                self.done += 1


def _bootstrap(port: int, backend: int, log: str) -> dict:
    rc = {"virtual_hosts": [{"name": "v", "domains": ["*"], "routes": [
        {"match": {"connect_matcher": {}}, "route": {"cluster": "b", "upgrade_configs": [{"upgrade_type": "CONNECT"}]}},
        {"match": {"prefix": "/"}, "route": {"cluster": "b"}}]}]}
    hcm = {"@type": T + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
           "stat_prefix": "in", "route_config": rc,
           "upgrade_configs": [{"upgrade_type": "websocket"}, {"upgrade_type": "CONNECT"}],
           "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
               "@type": T + "envoy.extensions.filters.http.router.v3.Router"}}],
           "access_log": [{"name": "envoy.access_loggers.file", "typed_config": {
               "@type": T + "envoy.extensions.access_loggers.file.v3.FileAccessLog", "path": log,
               "log_format": {"text_format_source": {
                   "inline_string": "%REQ(:METHOD)% %RESPONSE_CODE% %BYTES_RECEIVED% %BYTES_SENT%\n"}}}}]}
    return bootstrap([{"name": "l", "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                       "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                       "typed_config": hcm}]}]}],
                     [cluster("b", [backend])])


def _tunnel(port: int, request: bytes) -> None:
    """Open the tunnel, send ROUNDS chunks (each echoed twice), half-close, read to the end."""
    c = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        c.sendall(request)
        got = b""
        while b"\r\n\r\n" not in got:
            d = c.recv(65536)
            assert d, got
            got += d
        n = len(got.partition(b"\r\n\r\n")[2])
        for i in range(ROUNDS):
            c.sendall(b"x" * CHUNK)
            while n < 2 * CHUNK * (i + 1):
                d = c.recv(65536)
                assert d
                n += len(d)
        c.shutdown(socket.SHUT_WR)
        while c.recv(65536):
            pass
    finally:
        c.close()


@pytest.mark.parametrize("cls", [Pyproxy] + ([Envoy] if ENVOY else []), ids=lambda c: c.kind)
def test_tunnel_bytes_counted_in_cluster_stats_and_access_log(cls, tmp_path):
    be = TunnelBackend()
    port = free_port()
    log = str(tmp_path / "access.log")
    try:
        with cls(_bootstrap(port, be.port, log), extra_args=["--file-flush-interval-msec", "100"]) as p:
            _tunnel(port, b"GET /ws HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n")
            _tunnel(port, b"CONNECT example.com:443 HTTP/1.1\r\nhost: example.com:443\r\n\r\n")
            assert wait_until(lambda: be.done == 2, 10)

            def settled():
                st = p.stats()
                tx = st.get("cluster.b.upstream_cx_tx_bytes_total")
                rx = st.get("cluster.b.upstream_cx_rx_bytes_total")
                return (tx, rx) if (tx, rx) == (be.read, be.written) else None
            got = wait_until(settled, 10)
            st = p.stats()
            assert got, (st.get("cluster.b.upstream_cx_tx_bytes_total"), st.get("cluster.b.upstream_cx_rx_bytes_total"),
                         be.read, be.written)
            # (the payload alone is 3,000 bytes up and 6,000 down; the rest is the two heads each way)
            assert be.read > ROUNDS * CHUNK * 2 and be.written > ROUNDS * CHUNK * 4
            lines = wait_until(lambda: [ln for ln in open(log).read().splitlines()
                                   if ln.startswith("GET 101")] and open(log).read().splitlines())
            ws = [ln for ln in lines if ln.startswith("GET 101 ")]
            assert ws == ["GET 101 %d %d" % (ROUNDS * CHUNK, 2 * ROUNDS * CHUNK)], lines
            # (Envoy logs a CONNECT stream when it is destroyed, which it may not be by now; when
            # it is, the payload counts are the same)
            for ln in lines:
                if ln.startswith("CONNECT "):
                    assert re.fullmatch(r"CONNECT 200 %d %d" % (ROUNDS * CHUNK, 2 * ROUNDS * CHUNK), ln), ln
            if cls is Pyproxy:
                assert wait_until(lambda: any(ln.startswith("CONNECT ") for ln in open(log).read().splitlines()))
    finally:
        be.close()
