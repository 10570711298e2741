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


def _prep_plan(gen_rid=True, **fields):
    """A PrepPlan compiled from HttpConnectionManager ``fields`` (JSON names)."""
    from types import SimpleNamespace

    from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as pb
    from google.protobuf import json_format

    from pyproxy.http.request_prep import PrepPlan
    cfg = json_format.ParseDict(dict(fields, stat_prefix="t"), pb.HttpConnectionManager())
    hcm = SimpleNamespace(headers_with_underscores_action=0, normalize_path=False,
                          use_remote_address=cfg.use_remote_address.value, generate_request_id=gen_rid,
                          ctx=SimpleNamespace(local_address_ip_version="v4", listener=None), routes=None)
    return PrepPlan(cfg, hcm)


@pytest.mark.parametrize("plan_kw", [
    {}, {"gen_rid": False}, {"tracing": {}}, {"tracing": {"random_sampling": {"value": 0}}},
    {"forward_client_cert_details": "FORWARD_ONLY"}, {"forward_client_cert_details": "ALWAYS_FORWARD_ONLY"},
    {"xff_num_trusted_hops": 1}, {"internal_address_config": {}}, {"preserve_external_request_id": True},
], ids=lambda kw: ",".join(kw) or "default")
def test_forwarded_path_same_as_the_general_one(plan_kw):
    """request_prep._forwarded (a request through another proxy: only x-forwarded-proto,
    x-request-id, x-envoy-* control and always-dropped headers among the watched ones, on a
    ``constant`` plan) leaves the same headers and returns the same request id as the general
    ``_mutate``: random heads, both run from the same random state."""
    import random
    from types import SimpleNamespace

    from pyproxy.http import request_prep
    from pyproxy.http.headers import Headers
    plan = _prep_plan(**plan_kw)
    assert plan.constant
    names = sorted(request_prep._FORWARDED) + [
        "x-forwarded-proto", "x-request-id", "x-envoy-expected-rq-timeout-ms", "x-a", "user-agent",
        "x-forwarded-for", "x-forwarded-client-cert", "upgrade", "connection", "x-client-trace-id",
        "x-envoy-decorator-operation", "http2-settings"]
    values = ["", "1", "http", "https", "5f1c0c1e-7a3b-4e8f-9c2d-0a1b2c3d4e5f", "10.0.0.1", "websocket", "Upgrade"]
    rng = random.Random(12)
    ids = iter(range(10 ** 9))
    took = 0
    orig = request_prep._uuid4
    try:
        for _ in range(3000):
            h = [(":method", "GET"), (":scheme", "http"), (":path", "/p"), (":authority", "a")]
            h += [(rng.choice(names), rng.choice(values)) for _ in range(rng.randrange(0, 6))]
            conn = SimpleNamespace(ssl=rng.choice([None, SimpleNamespace(client_cert=lambda: None)]),
                                   info=SimpleNamespace(src_ip="10.1.2.3", dst_port=80))
            seed = rng.random()
            n = next(ids)
            results = []
            for general in (False, True):
                hs = Headers(list(h))
                random.seed(seed)
                request_prep._uuid4 = lambda n=n: "00000000-0000-4000-8000-%012d" % n
                if general:
                    r = request_prep._mutate(plan, conn, hs, hs._h, True, ())
                else:
                    r = request_prep.prepare(plan, conn, hs, None)
                results.append((r if type(r) is str else (r.rid, r.remote, r.reply, r.upgrade), hs._h))
            present = plan.watch.intersection(k for k, _ in h)
            if present and present <= request_prep._FORWARDED:
                took += 1
            assert results[0] == results[1], (h, results)
    finally:
        request_prep._uuid4 = orig
    assert took > 300  # (the fast path was exercised)
