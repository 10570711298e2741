"""An upstream HTTP/1.1 connection goes back to its pool before the response's end reaches the
stream (http/http1_client.py on_message_complete): the next request pipelined on the same
downstream connection, let go by that end, finds it idle. Envoy opens one upstream connection for
such a sequence; pyproxy opened a second one (upstream_cx_total 2, upstream_rq_pending_total 3)."""

import os
import time

from proxy_util import (Envoy, HttpBackend, Pyproxy, bootstrap, cluster, http_listener, raw, request, route,
                        route_config, with_fresh_ports)

NAMES = ("cluster.b.upstream_cx_total", "cluster.b.upstream_rq_pending_total", "cluster.b.upstream_rq_total",
         "cluster.b.upstream_rq_200")


def _stats(admin_port):
    _, _, body = request(admin_port, "GET", "/stats")
    out = {}
    for line in body.decode().splitlines():
        k, _, v = line.partition(": ")
        if k in NAMES:
            out[k] = v
    return out


def test_a_pipelined_request_reuses_the_upstream_connection_as_envoy():
    be = HttpBackend()
    try:
        port = 0
        r = route("/", "b")
        r["response_headers_to_add"] = [{"header": {"key": "x-a", "value": "1"}}]  # (the byte relay's path)
        bs = bootstrap([http_listener(port, route_config([r]))], [cluster("b", [be.port])])
        seen = {}
        for name, cls, env in (("compiled", Pyproxy, None),
                               ("reference", Pyproxy, dict(os.environ, PYPROXY_REFERENCE="1")),
                               ("envoy", Envoy, None)):
            with cls(with_fresh_ports(bs), env=env) as px:
                for p in (b"/", b"/x", b"/y?q=1"):
                    out = raw(px.port, b"GET %s HTTP/1.1\r\nhost: a\r\n\r\nGET %s HTTP/1.1\r\nhost: a\r\n"
                                       b"connection: close\r\n\r\n" % (p, p), timeout=3)
                    assert out.count(b"HTTP/1.1 200") == 2, (name, out)
                deadline = time.monotonic() + 5
                while True:  # (the stats settle once the last response is counted)
                    st = _stats(px.admin_port)
                    if st.get("cluster.b.upstream_rq_200") == "6" or time.monotonic() > deadline:
                        break
                    time.sleep(0.05)
                seen[name] = st
        assert seen["envoy"]["cluster.b.upstream_cx_total"] == "1", seen
        assert seen["compiled"] == seen["envoy"], seen
        assert seen["reference"] == seen["envoy"], seen
    finally:
        be.close()
