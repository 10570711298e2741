"""The request preparation's pure parts, without sockets (tests/test_hostile_input.py compares the
whole step with Envoy; these pin the building blocks it relies on)."""

from __future__ import annotations

import pytest

from pyproxy.http import path_norm
from pyproxy.http.original_ip import last_xff
from pyproxy.http.request_prep import _normalize_host
from pyproxy.netaddr import parse_ip


@pytest.mark.parametrize("xff,skip,want", [
    ("1.2.3.4", 0, ("1.2.3.4", True)),
    ("1.2.3.4, 5.6.7.8", 0, ("5.6.7.8", False)),
    ("1.2.3.4, 5.6.7.8", 1, ("1.2.3.4", True)),   # (Envoy: "single" is judged after the skip)
    ("1.2.3.4", 1, (None, False)),
    ("1.2.3.4,", 0, (None, False)),
    ("junk", 0, (None, False)),
    ("1.2.3.4 , 2001:db8::1", 0, ("2001:db8::1", False)),
    ("01.2.3.4", 0, (None, False)),      # inet_pton rules: no leading zeros
    ("1.2.3.4:80", 0, (None, False)),    # an address, not an address:port
])
def test_last_xff(xff, skip, want):
    assert last_xff(xff, skip) == want


def test_parse_ip_canonical_form():
    assert parse_ip("2001:0db8:0000::0001") == "2001:db8::1"
    assert parse_ip("") is None and parse_ip("[::1]") is None


@pytest.mark.parametrize("path,want", [
    ("/a/./b/../c", "/a/c"),
    ("/x/%2e%2E/admin", "/admin"),
    ("/%61dmin", "/admin"),
    ("/x\\..\\admin", "/admin"),
    ("/a b", "/a%20b"),
    ("/a%2Fb", "/a%2Fb"),           # an escaped slash stays escaped: path_with_escaped_slashes_action decides
    ("/..", "/"),
    ("/a/.b/..c", "/a/.b/..c"),
    ("/a%00", None),                 # NUL: invalid
    ("/x/..;/ok", "/ok"),            # a dot segment with ;parameters (Envoy, as servlet containers)
    ("/x/..;a;b/ok", "/ok"),
    ("/x/.;/ok", "/x/ok"),
    ("/x/..;\\ok", "/"),             # only a real '/' ends the parameters
    ("/x/%2e%2e;/ok", "/x/..;/ok"),  # encoded dots followed by ';' are not a dot segment
    ("/x/a..;/ok", "/x/a..;/ok"),
])
def test_canonical_paths(path, want):
    assert path_norm.canonicalize(path) == want


@pytest.mark.parametrize("action,path,want", [
    (path_norm.UNESCAPE_AND_FORWARD, "/x%2F..%2Fadmin?q=%2F", (path_norm.CONTINUE, "/admin?q=%2F")),
    (path_norm.REJECT_REQUEST, "/x%2fy", (path_norm.REJECT, None)),
    (path_norm.UNESCAPE_AND_REDIRECT, "/x%5Cy", (path_norm.REDIRECT, "/x/y")),
    (path_norm.KEEP_UNCHANGED, "/x%2F..%2Fadmin", (path_norm.CONTINUE, "/x%2F..%2Fadmin")),
])
def test_escaped_slashes(action, path, want):
    assert path_norm.normalize(path, action, True, True) == want


def test_merge_slashes_keeps_the_ends():
    assert path_norm.merge_slashes("//a///b//") == "/a/b/"


@pytest.mark.parametrize("host,dot,anyp,match,want", [
    ("example.com.", True, False, None, "example.com"),
    ("example.com.:80", True, False, 80, "example.com"),
    ("example.com:81", False, False, 80, "example.com:81"),
    ("example.com:81", False, True, None, "example.com"),
    ("[::1]:80", False, True, None, "[::1]"),
    ("[::1]", False, True, None, "[::1]"),
    ("example.com:abc", False, True, None, "example.com:abc"),
])
def test_host_normalisation(host, dot, anyp, match, want):
    assert _normalize_host(host, dot, anyp, match) == want


def test_every_dropped_name_is_watched():
    """request_prep._mutate removes a lone watched line by name (``lone``): that is right only
    while every name a drop set may remove, but the route table's internal_only_headers, is one
    the scan watches."""
    from pyproxy.http import request_prep as rp
    for d in rp._NOT_INTERNAL.values():
        assert d | rp.EDGE_ONLY <= rp._WATCH


def _plan(use_remote: bool):
    from types import SimpleNamespace

    from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb

    from pyproxy.http.request_prep import PrepPlan
    cfg = hcm_pb.HttpConnectionManager(stat_prefix="t")
    cfg.use_remote_address.value = use_remote
    cfg.preserve_external_request_id = True  # (an edge request keeps its id: comparable)
    hcm = SimpleNamespace(headers_with_underscores_action=0, normalize_path=False, use_remote_address=use_remote,
                          generate_request_id=True, ctx=None, routes=None)
    return PrepPlan(cfg, hcm)


def test_lone_removal_equals_the_full_scan():
    """A request with one watched line to remove (a client sidecar's x-envoy-expected-rq-timeout-ms)
    loses it by name; random requests (removable names once or twice, watched names kept, other
    headers, edge or not) leave the same headers as the full removal, which a route table's
    internal_only_headers (absent from the request) forces."""
    import random
    from types import SimpleNamespace

    from pyproxy.http import request_prep as rp
    from pyproxy.http.headers import Headers
    conn = SimpleNamespace(ssl=None, info=SimpleNamespace(src_ip="10.1.2.3", dst_port=8080))
    forced = SimpleNamespace(internal_only_headers=frozenset({"x-not-sent"}))
    pool = sorted(rp.ENVOY_CONTROL | rp.EDGE_ONLY | rp.ALWAYS_DROP) + [
        "x-client-trace-id", "x-forwarded-proto", "x-forwarded-for", "x-a", "x-b", "user-agent"]
    rnd = random.Random(3)
    lone = 0
    for i in range(2000):
        plan = _plan(i % 2 == 1)
        h = [(":method", "GET"), (":path", "/"), (":authority", "a"), ("x-request-id", "r%d" % i)]
        for n in rnd.sample(pool, rnd.randrange(1, 4)):
            h += [(n, "v")] * rnd.choice((1, 1, 1, 2))
        rnd.shuffle(h)
        got, want = Headers(h), Headers(h)
        r1 = rp.prepare(plan, conn, got, None)
        r2 = rp.prepare(plan, conn, want, forced)
        assert got._h == want._h and r1 == r2, h
        lone += sum(1 for k, _ in h if k in rp._NOT_INTERNAL[rp._DROP_NO_UPGRADE]) == 1
    assert lone > 300
