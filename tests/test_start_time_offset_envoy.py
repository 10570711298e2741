"""``%START_TIME(%Ez)%`` (absl's RFC 3339 offset), side by side with Envoy (review finding F61):
``+00:00``, where pyproxy printed strftime's ``+0000``."""

from __future__ import annotations

import pytest

from proxy_util import ENVOY, bootstrap, cluster, free_port, http_listener, raw, route, route_config
from log_util import file_access_log, hcm_config, logged_each

pytestmark = pytest.mark.skipif(not ENVOY, reason="envoy not installed")
FMT = "%START_TIME(%Ez)% %START_TIME(%z)% %RESPONSE_CODE%\n"


def test_start_time_ez_like_envoy():
    def bs(be_port, log):
        bs = bootstrap([http_listener(free_port(), route_config([route("/", "b")]))], [cluster("b", [be_port])])
        hcm_config(bs)["access_log"] = file_access_log(log, FMT)
        return bs

    out = logged_each(bs, lambda port: raw(port, b"GET / HTTP/1.1\r\nHost: x\r\nconnection: close\r\n\r\n"), 1)
    assert out["envoy"] == ["+00:00 +0000 200"], out  # (the reference)
    assert out["pyproxy"] == out["envoy"], out
