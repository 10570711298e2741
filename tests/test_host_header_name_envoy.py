"""A header named ``host`` in config is the request's authority, as in Envoy (whose request header
map resolves ``host`` to ``:authority``): an RBAC DENY policy on ``host`` denies, a route header
match on ``host`` matches, a hash policy on ``host`` is sticky, and ``%REQ(HOST)%`` prints the
authority, over HTTP/1.1 and HTTP/2 (review finding F52: the name was looked up literally, so the
DENY failed open). Each case runs through pyproxy and Envoy with the same bootstrap."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

import pytest

from proxy_util import (ENVOY, Envoy, HttpBackend, Pyproxy, bootstrap, cluster, free_port, http_listener,
                        route, route_config, with_fresh_ports)
from log_util import FLUSH_FAST, file_access_log, log_lines

pytestmark = pytest.mark.skipif(not ENVOY, reason="envoy not installed")
T = "type.googleapis.com/"
FMT = "%REQ(:PATH)% %RESPONSE_CODE% host=%REQ(HOST)% h2=%REQ(x-h)%\n"


def _bs(ports, log):
    rbac = {"name": "envoy.filters.http.rbac", "typed_config": {
        "@type": T + "envoy.extensions.filters.http.rbac.v3.RBAC",
        "rules": {"action": "DENY", "policies": {"deny-host": {
            "permissions": [{"header": {"name": "host", "string_match": {"exact": "blocked.example"}}}],
            "principals": [{"any": True}]}}}}}
    router = {"name": "envoy.filters.http.router",
              "typed_config": {"@type": T + "envoy.extensions.filters.http.router.v3.Router"}}
    direct = route("/r/", "b")
    direct["match"]["headers"] = [{"name": "host", "string_match": {"exact": "h.example"}}]
    direct["direct_response"] = {"status": 299}
    del direct["route"]
    hashed = route("/", "b")
    hashed["route"]["hash_policy"] = [{"header": {"header_name": "host"}}]
    rc = route_config([direct, hashed])
    rc["request_headers_to_add"] = [{"header": {"key": "x-h", "value": "%REQ(host)%"}}]
    L = http_listener(free_port(), rc, stat_prefix="in", http_filters=[rbac, router])
    L["filter_chains"][0]["filters"][0]["typed_config"]["access_log"] = file_access_log(log, FMT)
    return bootstrap([L], [cluster("b", ports, lb_policy="RING_HASH")])


def _curl(port, host, path, proto):
    c = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", proto, "-H", "Host: " + host,
                        "--max-time", "5", "http://127.0.0.1:%d%s" % (port, path)],
                       capture_output=True, timeout=10)
    return c.stdout.decode()


def test_host_names_the_authority_in_rbac_route_match_hash_policy_and_formatter():
    cases = [(h, p, proto) for h, p in (("blocked.example", "/x"), ("ok.example", "/x"), ("h.example", "/r/"),
                                         ("zz.example", "/r/"))
             for proto in ("--http1.1", "--http2-prior-knowledge")]
    tmp = tempfile.mkdtemp(prefix="host-name-")
    out = {}
    try:
        for name, cls in (("pyproxy", Pyproxy), ("envoy", Envoy)):
            bes = [HttpBackend(name="b%d" % i) for i in range(3)]
            log = os.path.join(tmp, name + ".log")
            open(log, "w").close()
            try:
                with cls(with_fresh_ports(_bs([b.port for b in bes], log)), extra_args=FLUSH_FAST) as p:
                    codes = [_curl(p.port, h, path, proto) for h, path, proto in cases]
                    sticky = [_curl(p.port, "same.example", "/s", "--http1.1") for _ in range(12)]
                    lines = log_lines(log, len(cases) + 12)
                counts = sorted(len([r for r in b.requests if r.path == "/s"]) for b in bes)
                seen_xh = sorted({r.header("x-h") for b in bes for r in b.requests if r.path == "/s"})
                out[name] = (codes, sticky, counts, seen_xh, lines)
            finally:
                for b in bes:
                    b.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert out["pyproxy"] == out["envoy"], out
    codes, sticky, counts, seen_xh, lines = out["envoy"]
    assert codes == ["403", "403", "200", "200", "299", "299", "200", "200"], codes
    assert sticky == ["200"] * 12 and counts == [0, 0, 12], (sticky, counts)
    assert seen_xh == ["same.example"], seen_xh
    assert "/s 200 host=same.example h2=same.example" in lines, lines
