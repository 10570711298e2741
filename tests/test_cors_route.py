"""CORS policies on routes, side by side with Envoy: the deprecated ``cors`` field of VirtualHost
and RouteAction (still honoured by Envoy 1.40) and ``typed_per_filter_config`` policies, merged
field by field from the most specific level (filters/http/cors.py compile_route_cors); preflights
answered by the proxy, simple requests decorated, forward_not_matching_preflights, shadow mode,
"*" for methods and headers. Real sockets; pyproxy and Envoy on the same bootstrap."""

from __future__ import annotations

import json
import socket
import time

import pytest

from proxy_util import HttpBackend, bootstrap, both_ways, cluster, free_port, http_listener, route, run_pyproxy

T = "type.googleapis.com/"
CORS_FILTER = {"name": "envoy.filters.http.cors", "typed_config": {"@type": T + "envoy.extensions.filters.http.cors.v3.Cors"}}
ROUTER = {"name": "envoy.filters.http.router", "typed_config": {"@type": T + "envoy.extensions.filters.http.router.v3.Router"}}


def _origins(*o):
    return [{"exact": x} for x in o]


def _per_filter(policy):
    return {"envoy.filters.http.cors": dict(policy, **{"@type": T + "envoy.extensions.filters.http.cors.v3.CorsPolicy"})}


def _vhosts():
    good = _origins("https://good")
    return [
        # the deprecated vhost cors, and a route cors that overrides some of its fields
        {"name": "legacy", "domains": ["legacy"], "cors": {
            "allow_origin_string_match": good, "allow_methods": "GET, PUT", "allow_headers": "*",
            "expose_headers": "x-exp", "max_age": "60", "allow_credentials": True},
         "routes": [route("/r", "b", cors={"allow_origin_string_match": _origins("https://other"),
                                            "allow_methods": "*"}),
                    {"match": {"prefix": "/direct"}, "direct_response": {"status": 204}},
                    route("/", "b")]},
        # a per-filter policy: the deprecated fields of the same vhost are then ignored
        {"name": "typed", "domains": ["typed"], "typed_per_filter_config": _per_filter(
            {"allow_origin_string_match": good, "allow_methods": "POST"}),
         "cors": {"allow_origin_string_match": _origins("https://legacy-only"), "max_age": "99"},
         "routes": [route("/", "b")]},
        {"name": "fnm", "domains": ["fnm"], "cors": {
            "allow_origin_string_match": good, "allow_methods": "GET", "allow_credentials": True,
            "forward_not_matching_preflights": False},
         "routes": [route("/", "b")]},
        {"name": "shadow", "domains": ["shadow"], "cors": {
            "allow_origin_string_match": good, "allow_methods": "GET",
            "filter_enabled": {"default_value": {"numerator": 0}},
            "shadow_enabled": {"default_value": {"numerator": 100}}},
         "routes": [route("/", "b")]},
        {"name": "none", "domains": ["*"], "routes": [route("/", "b")]},
    ]


def _bs(be_port):
    rc = {"name": "rc", "virtual_hosts": _vhosts()}
    return bootstrap([http_listener(free_port(), rc, http_filters=[CORS_FILTER, ROUTER])], [cluster("b", [be_port])])


def _req(method, path, host, headers=()):
    h = "".join("%s: %s\r\n" % kv for kv in headers)
    return ("%s %s HTTP/1.1\r\nHost: %s\r\n%sconnection: close\r\n\r\n" % (method, path, host, h)).encode()


PF = [("Origin", "https://good"), ("Access-Control-Request-Method", "PATCH"),
      ("Access-Control-Request-Headers", "x-a, x-b")]
BAD_PF = [("Origin", "https://evil"), ("Access-Control-Request-Method", "GET")]
CASES = [
    ("OPTIONS", "/", "legacy", PF), ("OPTIONS", "/", "legacy", BAD_PF),
    ("GET", "/", "legacy", [("Origin", "https://good")]), ("GET", "/", "legacy", [("Origin", "https://evil")]),
    ("OPTIONS", "/r", "legacy", [("Origin", "https://other"), ("Access-Control-Request-Method", "PATCH")]),
    ("OPTIONS", "/r", "legacy", PF), ("GET", "/r", "legacy", [("Origin", "https://other")]),
    ("OPTIONS", "/direct", "legacy", PF),
    ("OPTIONS", "/", "typed", PF), ("OPTIONS", "/", "typed", [("Origin", "https://legacy-only"),
                                                          ("Access-Control-Request-Method", "GET")]),
    ("OPTIONS", "/", "fnm", BAD_PF), ("OPTIONS", "/", "fnm", PF),
    ("OPTIONS", "/", "shadow", PF), ("GET", "/", "shadow", [("Origin", "https://good")]),
    ("OPTIONS", "/", "other", PF),
]


def _exchange(port, data):
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    out = b""
    try:
        s.sendall(data)
        end = time.monotonic() + 5
        while time.monotonic() < end:
            d = s.recv(65536)
            if not d:
                break
            out += d
    except (socket.timeout, ConnectionResetError):
        pass
    finally:
        s.close()
    head = out.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    status = head[0].split(" ")[1] if head and " " in head[0] else "?"
    acs = sorted(tuple(x.lower() if i == 0 else x for i, x in enumerate(line.split(": ", 1)))
                 for line in head[1:] if line.lower().startswith("access-control-"))
    return status, acs


@pytest.fixture(scope="module")
def pair():
    be = HttpBackend()
    try:
        for procs in both_ways(_bs(be.port)):
            yield be, procs
    finally:
        be.close()


@pytest.mark.parametrize("case", CASES, ids=["%s-%s%s-%d" % (c[0], c[2], c[1], i) for i, c in enumerate(CASES)])
def test_same_answer_as_envoy(pair, case):
    be, procs = pair
    method, path, host, headers = case
    got = {}
    for name, (p, port) in procs.items():
        n0 = len(be.requests)
        status, acs = _exchange(port, _req(method, path, host, headers))
        time.sleep(0.05)
        got[name] = (status, acs, len(be.requests) - n0)  # (the upstream saw the request or not)
    assert got["pyproxy"] == got["envoy"], got


def test_preflight_answered_from_vhost_cors(pair):
    """The reviewer's case: a vhost cors policy answers the preflight (it never reaches the upstream)."""
    be, procs = pair
    n0 = len(be.requests)
    status, acs = _exchange(procs["pyproxy"][1], _req("OPTIONS", "/a", "legacy", PF))
    assert status == "200" and ("access-control-allow-origin", "https://good") in acs, acs
    assert ("access-control-allow-headers", "x-a, x-b") in acs, acs  # "*" echoes the request's
    assert len(be.requests) == n0


def test_shadow_counts(pair):
    be, procs = pair
    p, port = procs["pyproxy"]
    before = p.stat("http.ingress.cors.origin_valid")
    _exchange(port, _req("GET", "/", "shadow", [("Origin", "https://good")]))
    assert p.stat("http.ingress.cors.origin_valid") == before + 1


def test_validate_accepts_and_rejects(tmp_path):
    bs = _bs(1)
    p = tmp_path / "bs.json"
    p.write_text(json.dumps(bs))
    r = run_pyproxy(["validate", str(p)])
    assert r.returncode == 0 and "0 accepted with ignored parts" in r.stdout and "cors" not in r.stdout, r.stdout
    # an invalid policy refuses the route configuration (as Envoy), deprecated field or not
    bad = _bs(1)
    vh = bad["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]["route_config"][
        "virtual_hosts"][0]
    vh["cors"]["allow_origin_string_match"] = [{"safe_regex": {"regex": "(unclosed"}}]
    p.write_text(json.dumps(bad))
    r = run_pyproxy(["validate", str(p)])
    assert r.returncode == 1 and "cors" in r.stdout, r.stdout
