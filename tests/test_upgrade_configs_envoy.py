"""WebSocket upgrade decisions side by side with Envoy (review finding F23): a route's
``upgrade_configs {websocket, enabled: true}`` allows the upgrade even when the HCM lists no
websocket (the route's word wins, either way); refusals are ``403`` with ``connection: close``;
accepted upgrades count in ``downstream_cx_upgrades_total``; a redirect logs ``direct_response``."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile

import pytest

from proxy_util import (ENVOY, Envoy, HttpBackend, Pyproxy, bootstrap, cluster, free_port, head_done,
                        http_listener, recv_until, route, route_config, simple_response, with_fresh_ports)
from log_util import FLUSH_FAST, file_access_log, hcm_config, last_log_line

pytestmark = pytest.mark.skipif(not ENVOY, reason="envoy not installed")
REQ = (b"GET %s HTTP/1.1\r\nHost: x\r\nconnection: upgrade\r\nupgrade: websocket\r\n"
       b"sec-websocket-key: abc\r\nsec-websocket-version: 13\r\n\r\n")
HCMS = {"nohcm": None, "hcm": [{"upgrade_type": "websocket"}],
        "hcmoff": [{"upgrade_type": "websocket", "enabled": False}]}


def _handler(req, sock):
    if req.header("upgrade"):
        sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n")
        return "websocket"
    return simple_response(200, b"hello")


def _bs(be_port, log):
    rc = route_config([route("/routeon", "b", upgrade_configs=[{"upgrade_type": "websocket", "enabled": True}]),
                       route("/routeoff", "b", upgrade_configs=[{"upgrade_type": "websocket", "enabled": False}]),
                       {"match": {"prefix": "/redir"}, "redirect": {"path_redirect": "/other"}},
                       route("/", "b")])
    lns = []
    for name, uc in HCMS.items():
        extra = {"upgrade_configs": uc} if uc else {}
        lns.append(http_listener(free_port(), rc, name=name, stat_prefix="in", **extra))
    bs = bootstrap(lns, [cluster("b", [be_port])])
    hcm_config(bs)["access_log"] = file_access_log(log, "%REQ(:PATH)% %RESPONSE_CODE_DETAILS%\n")
    return bs


def _head(port, data):
    s = socket.create_connection(("127.0.0.1", port), timeout=3)
    try:
        s.sendall(data)
        buf = recv_until(s, 3, head_done)[0]
    finally:
        s.close()
    head = buf.split(b"\r\n\r\n", 1)[0].lower()
    return head.split(b"\r\n")[0].decode(), b"\r\nconnection: close" in head


def _run(cls, tmp):
    log = os.path.join(tmp, cls.__name__ + ".log")
    open(log, "w").close()
    with HttpBackend(_handler) as be:
        with cls(with_fresh_ports(_bs(be.port, log)), extra_args=FLUSH_FAST) as p:
            s0 = p.stats()
            out = {}
            for i, name in enumerate(HCMS):
                for path in (b"/routeon", b"/routeoff", b"/plain"):
                    out[name + path.decode()] = _head(p.ports[i], REQ % path)
            out["redirect"] = _head(p.ports[0], b"GET /redir HTTP/1.1\r\nHost: x\r\n\r\n")
            out["redirect_log"] = last_log_line(log, "/redir")
            s1 = p.stats()
            for k in ("http.in.downstream_cx_upgrades_total", "http.in.downstream_rq_ws_on_non_ws_route"):
                out[k] = s1.get(k, 0) - s0.get(k, 0)
            return out


def test_upgrade_decisions_as_envoy():
    tmp = tempfile.mkdtemp(prefix="upg-")
    try:
        px, ev = _run(Pyproxy, tmp), _run(Envoy, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert ev["nohcm/routeon"][0].startswith("http/1.1 101"), ev
    assert ev["hcm/routeoff"] == ("http/1.1 403 forbidden", True), ev
    assert px == ev, (px, ev)
