"""A request that is not gRPC but carries ``grpc-timeout``, on a route whose
``max_stream_duration`` sets ``grpc_timeout_header_max`` (Istio's inbound route shape), side by side
with Envoy (review finding F20 note): the header arms the stream's duration timer as for a gRPC call
(504 ``downstream duration timeout``, ``downstream_rq_max_duration_reached``) and goes upstream as it
came. Requests with a body (a bodiless one the connection manager serves inline is not read)."""

from __future__ import annotations

import time

import pytest

from proxy_util import (ENVOY, Envoy, HttpBackend, Pyproxy, bootstrap, cluster, free_port, http_listener, route,
                        route_config, simple_response, until_close, with_fresh_ports)

pytestmark = pytest.mark.skipif(not ENVOY, reason="envoy not installed")


def _slow(req, sock):
    time.sleep(2.0)  # (the proxy's 0.3 s timer fires long before)
    return simple_response(200, b"late")


def _post(port, extra):
    got = until_close(port, ("POST /a HTTP/1.1\r\nHost: x\r\n%scontent-length: 2\r\nconnection: close\r\n\r\nab"
                             % extra).encode(), 10)
    return got.split(b"\r\n")[0].decode(), got.split(b"\r\n\r\n", 1)[-1].decode()


def _run(cls):
    with HttpBackend(_slow) as be:
        msd = {"max_stream_duration": "0s", "grpc_timeout_header_max": "0s"}
        rc = route_config([route("/", "b", timeout="0s", max_stream_duration=msd)])
        bs = bootstrap([http_listener(free_port(), rc, stat_prefix="in")], [cluster("b", [be.port])])
        with cls(with_fresh_ports(bs)) as p:
            out = [_post(p.port, "grpc-timeout: 300m\r\n"),
                   _post(p.port, "grpc-timeout: 300m\r\ncontent-type: application/json\r\n")]
            st = p.stats()
        sent = [r.header("grpc-timeout") for r in be.requests]
    return out, sent, st.get("http.in.downstream_rq_max_duration_reached", 0)


def test_grpc_timeout_on_a_non_grpc_request_arms_the_duration_timer():
    px, env = _run(Pyproxy), _run(Envoy)
    assert env[0][0] == ("HTTP/1.1 504 Gateway Timeout", "downstream duration timeout"), env  # (the reference)
    assert px == env, (px, env)
