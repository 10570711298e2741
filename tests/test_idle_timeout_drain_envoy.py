"""HCM ``common_http_protocol_options.idle_timeout``, side by side with Envoy (review finding
F34): the idle connection goes through Envoy's drain sequence instead of closing at once. HTTP/2:
the shutdown-notice GOAWAY (2^31-1), then after drain_timeout the final GOAWAY and the close;
HTTP/1.1: still open (a request then gets ``connection: close``), closed after drain_timeout.
Timings are compared with wide margins (idle 0.5 s, drain_timeout 2 s)."""

from __future__ import annotations

import socket
import time

import pytest

from proxy_util import (ENVOY, Envoy, HttpBackend, Pyproxy, bootstrap, cluster, free_port, http_listener, route,
                        route_config, with_fresh_ports)
from test_drain_listeners_envoy import _H2, _h1

pytestmark = pytest.mark.skipif(not ENVOY, reason="envoy not installed")


def _bs(be_port):
    return bootstrap([http_listener(free_port(), route_config([route("/", "b")]), stat_prefix="in",
                                    common_http_protocol_options={"idle_timeout": "0.5s"}, drain_timeout="2s")],
                     [cluster("b", [be_port])])


def _run(cls):
    be = HttpBackend()
    out = {}
    try:
        with cls(with_fresh_ports(_bs(be.port))) as p:
            h2 = _H2(p.port)
            out["h2 first"] = h2.get()
            t0 = time.monotonic()
            ev = h2.read(lambda ev: ev, 1.8)  # (idle 0.5 s, the proxy's tick: the notice within 1.8 s)
            out["h2 notice"] = ev
            out["h2 served after notice"] = h2.get()
            ev = h2.read(lambda ev: "EOF" in ev, 5.0)
            out["h2 final"] = ev
            out["h2 final late"] = time.monotonic() - t0 > 1.5  # (drain_timeout 2 s after the notice)
            h2.close()
            s = socket.create_connection(("127.0.0.1", p.port), timeout=5)
            out["h1 first"] = _h1(s)
            time.sleep(1.5)  # (idle timeout passed, drain_timeout not)
            out["h1 after idle"] = _h1(s)
            s.close()
            st = p.stats()
            out["idle_timeout"] = st.get("http.in.downstream_cx_idle_timeout")
    finally:
        be.close()
    return out


def test_idle_timeout_runs_the_drain_sequence_like_envoy():
    px, env = _run(Pyproxy), _run(Envoy)
    assert env["h2 notice"] == ["GOAWAY last=2147483647 err=0"], env  # (the reference itself)
    assert px == env, (px, env)
