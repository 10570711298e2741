"""Applying an xDS update costs work linear in its size: N clusters, N ClusterLoadAssignments and a
route table of N virtual hosts, through the ADS client's delta path (decode + apply), counted in
Python lines executed (deterministic, unlike time on a shared machine). Quadrupling N must about
quadruple the work; the cost that used to grow with N² (every assignment scanned every cluster,
every cluster added re-listed all EDS names) would give a ratio far above 4. The timings at 2k/5k/10k
against Envoy are benchmarks/run.py's xds mode."""

from __future__ import annotations

import asyncio
import os
import sys

from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.service.discovery.v3 import discovery_pb2

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

from bench import ads  # noqa: E402

import pyproxy  # noqa: E402

PKG = os.path.dirname(os.path.abspath(pyproxy.__file__))   # the package the test imports


def _apply_lines(n: int) -> int:
    from pyproxy import extensions  # noqa: F401 (registers the built-in extensions)
    from pyproxy.server import Options, Server
    from pyproxy.xds_client import CLUSTER, ENDPOINT, ROUTE, XdsClient
    from pyproxy.xds_client.client import _TypeState
    res = ads.build_resources(n, 9)
    loop = asyncio.new_event_loop()
    try:
        server = Server(bootstrap_pb2.Bootstrap(), Options(mode="validate"), loop)
        glue = server.xds_manager()
        c = XdsClient(target="127.0.0.1:1", node=None, api_type="DELTA_GRPC", handler=glue)
        glue.clients.append(c)
        for t in (CLUSTER, ENDPOINT, ROUTE):
            glue.client_for_type[t] = c
            c._types.setdefault(t, _TypeState(t)).sent = True
        c.subscribe(CLUSTER, None)
        responses = []
        for t, key in ((CLUSTER, ads.CDS), (ENDPOINT, ads.EDS), (ROUTE, ads.RDS)):
            r = discovery_pb2.DeltaDiscoveryResponse(type_url=t, system_version_info="1", nonce="n")
            for name, a in res[key].items():
                x = r.resources.add(name=name, version="v1")
                x.resource.CopyFrom(a)
            responses.append(r)
        lines = [0]

        def local(frame, event, arg):
            if event == "line":
                lines[0] += 1
            return local

        def tracer(frame, event, arg):
            return local if frame.f_code.co_filename.startswith(PKG) else None
        sys.settrace(tracer)
        try:
            for r in responses:
                c._on_response(r)
        finally:
            sys.settrace(None)
        for t in (CLUSTER, ENDPOINT, ROUTE):
            assert c.type_state(t)["last_error"] is None, c.type_state(t)["last_error"]
        cm = server.cluster_manager
        assert len(cm.active) == n and not cm.warming
        assert all(cl.priority_set.all_hosts for cl in cm.active.values())
        assert glue.routes[ads.ROUTE_NAME].table is not None
        return lines[0]
    finally:
        loop.close()


def test_xds_apply_work_is_linear_in_the_update():
    small = _apply_lines(150)
    big = _apply_lines(600)
    ratio = big / small
    print("lines executed: N=150 %d, N=600 %d, ratio %.2f" % (small, big, ratio))
    assert 3.5 < ratio < 4.6, ratio     # (the old EDS path alone gave 5.9)
