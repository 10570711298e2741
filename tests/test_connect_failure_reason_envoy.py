"""An upstream connect failure's access-log fields side by side with Envoy (review finding F19):
``%RESPONSE_CODE_DETAILS%`` ``upstream_reset_before_response_started{remote_connection_failure|
delayed_connect_error:_Connection_refused}`` and ``%UPSTREAM_TRANSPORT_FAILURE_REASON%``
``delayed_connect_error:_Connection_refused``; a request whose retry (connect-failure) then gets a
connection logs no failure reason."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time

from proxy_util import (ENVOY, Envoy, HttpBackend, Pyproxy, bootstrap, cluster, free_port, http_listener, route,
                        route_config, with_fresh_ports)

import pytest

pytestmark = pytest.mark.skipif(not ENVOY, reason="envoy not installed")
FMT = "%REQ(:PATH)% %RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% \"%UPSTREAM_TRANSPORT_FAILURE_REASON%\"\n"


def _get(port, path):
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        s.sendall(("GET %s HTTP/1.1\r\nHost: x\r\nconnection: close\r\n\r\n" % path).encode())
        while s.recv(65536):
            pass
    finally:
        s.close()


def test_connect_failure_reason_as_envoy():
    paths = ["/dead/x", "/retry/1", "/retry/2"]
    tmp = tempfile.mkdtemp(prefix="cf-reason-")
    out = {}
    try:
        for name, cls in (("pyproxy", Pyproxy), ("envoy", Envoy)):
            be = HttpBackend()
            log = os.path.join(tmp, name + ".log")
            open(log, "w").close()
            try:
                dead = free_port()  # (nothing listens there)
                rs = [route("/dead/", "dead"),
                      route("/retry/", "mixed", retry_policy={"retry_on": "connect-failure", "num_retries": 2})]
                bs = bootstrap([http_listener(free_port(), route_config(rs))],
                               [cluster("dead", [dead]), cluster("mixed", [dead, be.port])])
                tc = bs["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
                tc["access_log"] = [{"name": "envoy.access_loggers.file", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                    "path": log, "log_format": {"text_format_source": {"inline_string": FMT}}}}]
                with cls(with_fresh_ports(bs), extra_args=["--file-flush-interval-msec", "100"]) as p:
                    for path in paths:
                        _get(p.port, path)
                    end = time.monotonic() + 3
                    lines = []
                    while time.monotonic() < end and len(lines) < len(paths):
                        lines = open(log).read().splitlines()
                        time.sleep(0.05)
                    out[name] = lines
            finally:
                be.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert out["pyproxy"] == out["envoy"], out
    assert out["envoy"] == [
        "/dead/x 503 UF upstream_reset_before_response_started{remote_connection_failure|"
        "delayed_connect_error:_Connection_refused} \"delayed_connect_error:_Connection_refused\"",
        "/retry/1 200 - via_upstream \"-\"", "/retry/2 200 - via_upstream \"-\""], out
