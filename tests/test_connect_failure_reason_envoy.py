"""An upstream connect failure's access-log fields side by side with Envoy (review finding F19):
``%RESPONSE_CODE_DETAILS%`` ``upstream_reset_before_response_started{remote_connection_failure|
delayed_connect_error:_Connection_refused}`` and ``%UPSTREAM_TRANSPORT_FAILURE_REASON%``
``delayed_connect_error:_Connection_refused``; a request whose retry (connect-failure) then gets a
connection logs no failure reason."""

from __future__ import annotations

from proxy_util import (ENVOY, bootstrap, cluster, free_port, get_close, http_listener, route, route_config,
                        until_close)
from log_util import file_access_log, hcm_config, logged_each

import pytest

pytestmark = pytest.mark.skipif(not ENVOY, reason="envoy not installed")
FMT = "%REQ(:PATH)% %RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% \"%UPSTREAM_TRANSPORT_FAILURE_REASON%\"\n"


def _get(port, path):
    until_close(port, get_close(path))


def test_connect_failure_reason_as_envoy():
    paths = ["/dead/x", "/retry/1", "/retry/2"]

    def bs(be_port, log):
        dead = free_port()  # (nothing listens there)
        rs = [route("/dead/", "dead"),
              route("/retry/", "mixed", retry_policy={"retry_on": "connect-failure", "num_retries": 2})]
        bs = bootstrap([http_listener(free_port(), route_config(rs))],
                       [cluster("dead", [dead]), cluster("mixed", [dead, be_port])])
        hcm_config(bs)["access_log"] = file_access_log(log, FMT)
        return bs

    def send(port):
        for path in paths:
            _get(port, path)

    out = logged_each(bs, send, len(paths))
    assert out["pyproxy"] == out["envoy"], out
    assert out["envoy"] == [
        "/dead/x 503 UF upstream_reset_before_response_started{remote_connection_failure|"
        "delayed_connect_error:_Connection_refused} \"delayed_connect_error:_Connection_refused\"",
        "/retry/1 200 - via_upstream \"-\"", "/retry/2 200 - via_upstream \"-\""], out
