"""``x-envoy-decorator-operation`` on the request, for every request of an HCM with a ``tracing``
block (no tracer provider, nothing sampled), as Envoy 1.40 does it: on an OUTBOUND listener the
route's decorator operation goes upstream (replacing the caller's) unless ``propagate`` is false
(then the caller's passes through); on INBOUND or unspecified listeners the caller's header is
removed. Without a tracing block the caller's header passes through.

One bootstrap with a listener per case runs on Envoy and on pyproxy's three lanes (express, the
fast lane with ``PYPROXY_EXPRESS=0``, the generic chain with ``PYPROXY_FAST_LANE=0``); each lane's
upstream must see what Envoy's upstream sees, and what the table below says.
"""

from __future__ import annotations

import http.client
import os


from proxy_util import Envoy, HttpBackend, Pyproxy, bootstrap, cluster, free_port, http_listener, route_config

LANES = {"express": {}, "fast": {"PYPROXY_EXPRESS": "0"}, "generic": {"PYPROXY_FAST_LANE": "0"}}

# (listener name, traffic_direction or None, decorator propagate (None: unset), tracing block)
CASES = [
    ("out", "OUTBOUND", None, True),
    ("out_nop", "OUTBOUND", False, True),
    ("in", "INBOUND", None, True),
    ("in_nop", "INBOUND", False, True),
    ("unspec", None, True, True),
    ("out_notracing", "OUTBOUND", None, False),
    ("in_notracing", "INBOUND", None, False),
]
CALLERS = [None, "caller-op", ""]


def _expected(direction, propagate, tracing, caller):
    if not tracing:
        return caller
    if direction == "OUTBOUND":
        return "route-op" if propagate is not False else caller
    return None


def _bootstrap(backend_port):
    listeners = []
    ports = {}
    for name, direction, propagate, tracing in CASES:
        dec = {"operation": "route-op"}
        if propagate is not None:
            dec["propagate"] = propagate
        r = {"match": {"prefix": "/"}, "route": {"cluster": "b"}, "decorator": dec}
        extra = {"tracing": {}} if tracing else {}
        port = ports[name] = free_port()
        lis = http_listener(port, route_config([r]), name=name, stat_prefix=name, **extra)
        if direction is not None:
            lis["traffic_direction"] = direction
        listeners.append(lis)
    return bootstrap(listeners, [cluster("b", [backend_port])]), ports


def _seen(proc, backend, ports):
    out = {}
    for name, *_ in CASES:
        for caller in CALLERS:
            c = http.client.HTTPConnection("127.0.0.1", ports[name], timeout=5)
            hdrs = {"x-case": "%s/%r" % (name, caller)}
            if caller is not None:
                hdrs["x-envoy-decorator-operation"] = caller
            c.request("GET", "/d", headers=hdrs)
            resp = c.getresponse()
            resp.read()
            c.close()
            assert resp.status == 200, (proc, name, caller, resp.status)
            req = [r for r in backend.requests if r.header("x-case") == hdrs["x-case"]][-1]
            backend.requests.clear()
            out[(name, caller)] = req.header_all("x-envoy-decorator-operation")
    return out


def test_decorator_header_matches_envoy_on_every_lane():
    backend = HttpBackend()
    try:
        bs, ports = _bootstrap(backend.port)
        with Envoy(bs) as e:
            ref = _seen("envoy", backend, ports)
        for (name, caller), got in ref.items():
            direction, propagate, tracing = next(c[1:] for c in CASES if c[0] == name)
            want = _expected(direction, propagate, tracing, caller)
            assert got == ([] if want is None else [want]), ("envoy", name, caller, got)
        for lane, env in LANES.items():
            with Pyproxy(bs, env=dict(os.environ, **env)):
                got = _seen(lane, backend, ports)
            for k in ref:
                assert got[k] == ref[k], (lane, k, got[k], ref[k])
    finally:
        backend.close()
