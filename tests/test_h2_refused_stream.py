"""An HTTP/2 upstream's REFUSED_STREAM is the router's to retry, as Envoy's (review finding F11):
without a retry policy the client gets 503 ``reset reason: remote refused stream reset`` and no
second upstream request is made; with ``retry_on: refused-stream`` the router retries it, counted
in ``upstream_rq_retry``. Side by side with Envoy, pyproxy on both HTTP/2 engines.
"""


import pytest
from h2.errors import ErrorCodes

from h2_upstream_util import ThreadedH2Upstream, answer
from proxy_util import Envoy, Pyproxy, bootstrap, cluster, free_port, http_listener, request, route, route_config

REFUSED_BODY = b"upstream connect error or disconnect/reset before headers. reset reason: remote refused stream reset"


class RefusingH2(ThreadedH2Upstream):
    """An HTTP/2 upstream that resets the first request of every connection with REFUSED_STREAM
    and answers the others 200."""

    def __init__(self):
        self.requests = 0
        super().__init__()

    def on_request(self, conn, e, state):
        with self.lock:
            self.requests += 1
        if not state.get("refused"):
            state["refused"] = True
            conn.reset_stream(e.stream_id, ErrorCodes.REFUSED_STREAM)
        else:
            answer(conn, e.stream_id)
        return True


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
