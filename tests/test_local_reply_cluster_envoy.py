"""Local replies from HTTP filters before the router (RBAC deny, fault abort, local rate limit) log
the route's cluster in ``%UPSTREAM_CLUSTER%`` / ``%UPSTREAM_CLUSTER_RAW%``, as Envoy's (it records the
cluster as the route resolves), side by side with Envoy (review finding F26). Access log to a file
(flushed every 0.1 s); one backend per proxy."""

from __future__ import annotations

import pytest

from proxy_util import (ENVOY, bootstrap, cluster, free_port, get_close, http_listener, route, route_config,
                        until_close)
from log_util import file_access_log, logged_each

pytestmark = pytest.mark.skipif(not ENVOY, reason="envoy not installed")
FMT = "%REQ(:PATH)% %RESPONSE_CODE% %RESPONSE_FLAGS% cl=%UPSTREAM_CLUSTER% raw=%UPSTREAM_CLUSTER_RAW%\n"
CL = "inbound|80||"
FAULT = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"
LRL = "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit"


def _bs(port, log):
    r1 = route("/abort", CL)
    r1["typed_per_filter_config"] = {"envoy.filters.http.fault": {
        "@type": FAULT, "abort": {"http_status": 418, "percentage": {"numerator": 100}}}}
    r2 = route("/rl", CL)
    r2["typed_per_filter_config"] = {"envoy.filters.http.local_ratelimit": {
        "@type": LRL, "stat_prefix": "rl",
        "token_bucket": {"max_tokens": 1, "tokens_per_fill": 1, "fill_interval": "60s"},
        "filter_enabled": {"default_value": {"numerator": 100}, "runtime_key": "a"},
        "filter_enforced": {"default_value": {"numerator": 100}, "runtime_key": "b"}}}
    L = http_listener(free_port(), route_config([route("/deny", CL), r1, r2, route("/", CL)]))
    hc = L["filter_chains"][0]["filters"][0]["typed_config"]
    hc["http_filters"] = [
        {"name": "envoy.filters.http.rbac", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
            "rules": {"action": "DENY", "policies": {"deny": {
                "permissions": [{"url_path": {"path": {"prefix": "/deny"}}}], "principals": [{"any": True}]}}}}},
        {"name": "envoy.filters.http.fault", "typed_config": {"@type": FAULT}},
        {"name": "envoy.filters.http.local_ratelimit", "typed_config": {"@type": LRL, "stat_prefix": "rl"}},
    ] + hc["http_filters"]
    hc["access_log"] = file_access_log(log, FMT)
    return bootstrap([L], [cluster(CL, [port])])


def _get(port, path):
    until_close(port, get_close(path))


def test_filter_local_replies_log_the_route_cluster():
    paths = ["/deny", "/abort", "/rl", "/rl", "/ok"]

    def send(port):
        for path in paths:
            _get(port, path)

    out = logged_each(_bs, send, len(paths))
    assert out["pyproxy"] == out["envoy"], out
    assert out["envoy"] == ["/deny 403 - cl=%s raw=%s" % (CL, CL), "/abort 418 FI cl=%s raw=%s" % (CL, CL),
                            "/rl 200 - cl=%s raw=%s" % (CL, CL), "/rl 429 RL cl=%s raw=%s" % (CL, CL),
                            "/ok 200 - cl=%s raw=%s" % (CL, CL)], out
