"""Admin state after ``POST /healthcheck/fail``, side by side with Envoy (review finding F33):
``/ready`` answers ``503 DRAINING`` and ``/server_info`` says ``DRAINING`` while the server.state
gauge stays 0 (LIVE); ``/healthcheck/ok`` restores ``200 LIVE``."""

from __future__ import annotations

import json

import pytest

from proxy_util import (ENVOY, Envoy, HttpBackend, Pyproxy, bootstrap, cluster, free_port, http_listener, request,
                        route, route_config, with_fresh_ports)

pytestmark = pytest.mark.skipif(not ENVOY, reason="envoy not installed")


def _state(p):
    st, _, body = request(p.admin_port, "GET", "/ready")
    _, _, info = request(p.admin_port, "GET", "/server_info")
    return st, body.decode().strip(), json.loads(info)["state"], p.stats().get("server.state")


def _run(cls):
    be = HttpBackend()
    out = []
    try:
        bs = bootstrap([http_listener(free_port(), route_config([route("/", "b")]))], [cluster("b", [be.port])])
        with cls(with_fresh_ports(bs)) as p:
            out.append(_state(p))
            request(p.admin_port, "POST", "/healthcheck/fail")
            out.append(_state(p))
            out.append(request(p.port, "GET", "/")[0])  # (traffic still served)
            request(p.admin_port, "POST", "/healthcheck/ok")
            out.append(_state(p))
    finally:
        be.close()
    return out


def test_ready_and_server_info_say_draining_after_healthcheck_fail():
    px, env = _run(Pyproxy), _run(Envoy)
    assert env[1][:3] == (503, "DRAINING", "DRAINING"), env  # (the reference itself)
    assert px == env, (px, env)
