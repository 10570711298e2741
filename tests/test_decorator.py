"""``x-envoy-decorator-operation`` on the request, for every request of an HCM with a ``tracing``
block (no tracer provider, nothing sampled), as Envoy 1.40 does it: on an OUTBOUND listener the
route's decorator operation goes upstream (replacing the caller's) unless ``propagate`` is false
(then the caller's passes through); on INBOUND or unspecified listeners the caller's header is
removed. Without a tracing block the caller's header passes through.

The response side (Envoy's encodeHeaders): on ingress the client gets the route's operation
(unless propagate is false or it named an operation itself), replacing one the upstream sent; on
egress an upstream's ``x-envoy-decorator-operation`` is consumed (it would name the client span);
local replies too.

One bootstrap with a listener per case runs on Envoy and on pyproxy, compiled (the chain and route
plans: the response head relayed as bytes) and in the filter-by-filter reference mode
(``PYPROXY_REFERENCE=1``); each one's upstream must see what Envoy's upstream sees, and what the
table below says.
"""

from __future__ import annotations

import http.client
import os


from proxy_util import (Envoy, HttpBackend, Pyproxy, bootstrap, cluster, free_port, http_listener, route_config,
                        simple_response)

LANES = {"compiled": {}, "reference": {"PYPROXY_REFERENCE": "1"}}

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


# the upstream's answer carries x-envoy-decorator-operation (its own operation) or not
UPSTREAM_OPS = [None, "upstream-op"]


def _backend(req, sock):
    op = req.header("x-up-op")
    extra = [("X-Envoy-Decorator-Operation", op)] if op else []
    return simple_response(200, b"ok", [("Content-Type", "text/plain")] + extra)


def _bootstrap(backend_port):
    listeners = []
    ports = {}
    dead = free_port()  # (nothing listens there: a local 503 answers)
    for name, direction, propagate, tracing in CASES:
        dec = {"operation": "route-op"}
        if propagate is not None:
            dec["propagate"] = propagate
        r = {"match": {"prefix": "/"}, "route": {"cluster": "b"}, "decorator": dec}
        rd = {"match": {"prefix": "/dead"}, "route": {"cluster": "dead"}, "decorator": dec}
        extra = {"tracing": {}} if tracing else {}
        port = ports[name] = free_port()
        lis = http_listener(port, route_config([rd, r]), name=name, stat_prefix=name, **extra)
        if direction is not None:
            lis["traffic_direction"] = direction
        listeners.append(lis)
    return bootstrap(listeners, [cluster("b", [backend_port]), cluster("dead", [dead])]), ports


def _response_head(resp):
    """The response's header names in order, with the decorator's value (others vary by nature)."""
    return [(k.lower(), v if k.lower() == "x-envoy-decorator-operation" else "")
            for k, v in resp.getheaders()]


def _seen(proc, backend, ports):
    """{(listener, caller's op, upstream's op): (what the upstream saw, the response head)}, and
    the same for a local reply ((listener, "dead", None))."""
    out = {}
    for name, *_ in CASES:
        for caller in CALLERS:
            for up_op in UPSTREAM_OPS:
                c = http.client.HTTPConnection("127.0.0.1", ports[name], timeout=5)
                hdrs = {"x-case": "%s/%r/%r" % (name, caller, up_op)}
                if caller is not None:
                    hdrs["x-envoy-decorator-operation"] = caller
                if up_op is not None:
                    hdrs["x-up-op"] = up_op
                c.request("GET", "/d", headers=hdrs)
                resp = c.getresponse()
                resp.read()
                c.close()
                assert resp.status == 200, (proc, name, caller, resp.status)
                req = [r for r in backend.requests if r.header("x-case") == hdrs["x-case"]][-1]
                backend.requests.clear()
                out[(name, caller, up_op)] = (req.header_all("x-envoy-decorator-operation"), _response_head(resp))
        c = http.client.HTTPConnection("127.0.0.1", ports[name], timeout=5)
        c.request("GET", "/dead")
        resp = c.getresponse()
        resp.read()
        c.close()
        assert resp.status == 503, (proc, name, resp.status)
        out[(name, "dead", None)] = ([], _response_head(resp))
    return out


def _expected_response(direction, propagate, tracing, caller, up_op):
    """The response's x-envoy-decorator-operation (Envoy's ConnectionManagerImpl encodeHeaders):
    on ingress the route's operation, unless propagate is false or the caller named a (non-empty)
    operation; on egress any the upstream sent is consumed; without tracing, the upstream's."""
    if not tracing:
        return up_op
    if direction == "OUTBOUND":
        return None
    if propagate is not False and not caller:
        return "route-op"
    return up_op


def test_decorator_header_matches_envoy_on_every_lane():
    backend = HttpBackend(_backend)
    try:
        bs, ports = _bootstrap(backend.port)
        with Envoy(bs) as e:
            ref = _seen("envoy", backend, ports)
        for (name, caller, up_op), (got, head) in ref.items():
            direction, propagate, tracing = next(c[1:] for c in CASES if c[0] == name)
            if caller != "dead":
                want = _expected(direction, propagate, tracing, caller)
                assert got == ([] if want is None else [want]), ("envoy", name, caller, got)
            want = _expected_response(direction, propagate, tracing, caller if caller != "dead" else None, up_op)
            ops = [v for k, v in head if k == "x-envoy-decorator-operation"]
            assert ops == ([] if want is None else [want]), ("envoy response", name, caller, up_op, head)
        for lane, env in LANES.items():
            with Pyproxy(bs, env=dict(os.environ, **env)):
                got = _seen(lane, backend, ports)
            for k in ref:
                assert got[k] == ref[k], (lane, k, got[k], ref[k])
    finally:
        backend.close()
