"""An HTTP/1.1 client that closes its sending side (FIN) while its request is in flight ends the
request, as in Envoy (HTTP connections do not half-close): the upstream request is reset at once
and nothing stays allocated. Before, pyproxy held the stream, the client connection and the
upstream connection until the upstream answered, which with Istio's defaults (no route timeout,
stream_idle_timeout 0) let any client pin every connection the circuit breakers allow.
Side by side with Envoy."""

import socket
import threading
import time

import pytest

from proxy_util import HttpBackend, one_route_bootstrap, proxies, request, wait_until


class SilentUpstream:
    """Accepts HTTP/1.1 connections, reads requests and never answers; notes when the proxy
    closes each connection."""

    def __init__(self):
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(64)
        self.port = self.lsock.getsockname()[1]
        self.accepted = 0
        self.closed = 0
        self.lock = threading.Lock()
        self.stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        self.lsock.settimeout(0.2)
        while not self.stop:
            try:
                s, _ = self.lsock.accept()
            except OSError:
                continue
            with self.lock:
                self.accepted += 1
            threading.Thread(target=self._serve, args=(s,), daemon=True).start()

    def _serve(self, s):
        s.settimeout(0.2)
        deadline = time.time() + 30
        try:
            while not self.stop and time.time() < deadline:
                try:
                    d = s.recv(65536)
                except socket.timeout:
                    continue
                except OSError:
                    break
                if not d:
                    break
            else:
                return
            with self.lock:
                self.closed += 1
        finally:
            s.close()

    def close(self):
        self.stop = True
        self.lsock.close()


@pytest.mark.parametrize("proxy", proxies())
def test_client_fin_resets_the_request_in_flight(proxy):
    up = SilentUpstream()
    try:
        bs, port = one_route_bootstrap([up.port], route_extra={"timeout": "0s"},
                                       hcm_extra={"stream_idle_timeout": "0s"})
        with proxy(bs) as p:
            clients = []
            for _ in range(3):
                c = socket.create_connection(("127.0.0.1", port), timeout=5)
                c.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
                clients.append(c)
            assert wait_until(lambda: up.accepted == 3), up.accepted
            for c in clients:
                c.shutdown(socket.SHUT_WR)
            # the proxy closes each upstream connection (the request is reset) and each client's
            assert wait_until(lambda: up.closed == 3), (proxy.kind, up.closed)
            for c in clients:
                c.settimeout(5)
                try:
                    rest = c.recv(100)
                except OSError:
                    rest = b""
                assert rest == b"", (proxy.kind, rest)
                c.close()
            assert wait_until(lambda: p.stat("cluster.b.upstream_rq_active") == 0), proxy.kind
            assert p.stat("http.ingress.downstream_cx_active") == 0, proxy.kind
    finally:
        up.close()


@pytest.mark.parametrize("proxy", proxies())
def test_fin_after_the_answer_closes_the_idle_connection(proxy):
    # a request answered before the client's FIN is unaffected; the FIN on the idle keep-alive
    # connection closes it cleanly (no further bytes)
    with HttpBackend() as be:
        bs, port = one_route_bootstrap([be.port])
        with proxy(bs):
            assert request(port, "GET", "/a")[0] == 200
            c = socket.create_connection(("127.0.0.1", port), timeout=5)
            c.sendall(b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n")
            c.settimeout(5)
            head = c.recv(65536)
            assert head.startswith(b"HTTP/1.1 200"), head
            c.shutdown(socket.SHUT_WR)
            rest = b""
            try:
                while True:
                    d = c.recv(65536)
                    if not d:
                        break
                    rest += d
            except OSError:
                pass
            c.close()
            assert b"HTTP/1.1" not in rest, rest
