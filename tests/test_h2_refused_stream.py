"""An HTTP/2 upstream's REFUSED_STREAM is the router's to retry, as Envoy's (review finding F11):
without a retry policy the client gets 503 ``reset reason: remote refused stream reset`` and no
second upstream request is made; with ``retry_on: refused-stream`` the router retries it, counted
in ``upstream_rq_retry``. Side by side with Envoy, pyproxy on both HTTP/2 engines.
"""

import socket
import threading

import h2.config
import h2.connection
import h2.events as E
import h2.exceptions
import pytest
from h2.errors import ErrorCodes

from proxy_util import Envoy, Pyproxy, bootstrap, cluster, free_port, http_listener, request, route, route_config

REFUSED_BODY = b"upstream connect error or disconnect/reset before headers. reset reason: remote refused stream reset"


class RefusingH2:
    """An HTTP/2 upstream that resets the first request of every connection with REFUSED_STREAM
    and answers the others 200."""

    def __init__(self):
        self.requests = 0
        self.lock = threading.Lock()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        self.sock.settimeout(0.2)
        while not self.stop:
            try:
                c, _ = self.sock.accept()
            except OSError:
                continue
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c):
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
        conn.initiate_connection()
        c.sendall(conn.data_to_send())
        c.settimeout(10)
        refused = False
        try:
            while not self.stop:
                data = c.recv(65536)
                if not data:
                    return
                for e in conn.receive_data(data):
                    if isinstance(e, E.RequestReceived):
                        with self.lock:
                            self.requests += 1
                        if not refused:
                            refused = True
                            conn.reset_stream(e.stream_id, ErrorCodes.REFUSED_STREAM)
                        else:
                            conn.send_headers(e.stream_id, [(":status", "200"), ("content-length", "2")])
                            conn.send_data(e.stream_id, b"ok", end_stream=True)
                out = conn.data_to_send()
                if out:
                    c.sendall(out)
        except (OSError, h2.exceptions.ProtocolError):
            return
        finally:
            c.close()

    def close(self):
        self.stop = True
        self.sock.close()


KINDS = [("pyproxy", "lean"), ("pyproxy", "h2"), ("envoy", None)]


@pytest.mark.parametrize("kind, engine", KINDS, ids=["pyproxy-lean", "pyproxy-h2", "envoy"])
@pytest.mark.parametrize("policy", [None, {"retry_on": "refused-stream", "num_retries": 1}],
                         ids=["no-retry-policy", "retry-refused-stream"])
def test_refused_stream_is_the_routers_retry(kind, engine, policy, monkeypatch):
    if engine is not None:
        monkeypatch.setenv("PYPROXY_H2_ENGINE", engine)
    up = RefusingH2()
    try:
        action = {"timeout": "5s"}
        if policy is not None:
            action["retry_policy"] = policy
        port = free_port()
        opts = {"typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}}}}}
        bs = bootstrap([http_listener(port, route_config([route("/", "b", **action)]))],
                       [cluster("b", [up.port], **opts)])
        with (Pyproxy if kind == "pyproxy" else Envoy)(bs) as p:
            st, h, body = request(p.port, path="/x", timeout=8)
            stats = p.stats()
        retries = stats.get("cluster.b.upstream_rq_retry", 0)
        if policy is None:
            assert (st, body) == (503, REFUSED_BODY), (st, body)
            assert up.requests == 1 and retries == 0, (up.requests, retries)
            assert stats.get("cluster.b.upstream_rq_503", 0) == 1
        else:
            assert (st, body) == (200, b"ok"), (st, body)
            assert up.requests == 2 and retries == 1, (up.requests, retries)
            assert stats.get("cluster.b.upstream_rq_retry_success", 0) == 1
    finally:
        up.close()
