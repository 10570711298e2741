"""The HTTP/1.1 codec's entry for a complete, bodiless request on a connection manager whose
chain plan allows the compiled path (``hcm_is_express``): the connection manager's request
preparation (``x-forwarded-proto``, ``x-request-id``), the route lookup and the fast stream's first
attempt run in one function (``start``), without the ``_guarded`` entry points and with the
``StreamInfo`` made only when something reads it; the stream (``fast_stream.FastStream``) relays
the upstream response head as bytes when the route's plan allows it (``http/h1_relay.py``).

Anything ``start`` does not do falls back before any side effect: the codec's request goes to
an ordinary stream (whose request preparation is idempotent over what ``start()`` has already
added).
"""

from __future__ import annotations

import random
import time

from ..cluster.lb import LbContext
from .fast_stream import FastStream, chain_is_inert, pick_cluster
from .http1 import HTTP11
from .decorator import decorate
from .request_prep import Prepared, prepare

_NO_CTX = LbContext()
_monotonic = time.monotonic
_rand = random.getrandbits
_new_stream = object.__new__


def hcm_is_express(cfg) -> bool:
    """Whether an HTTP connection manager's requests may take the express lane: a router-only
    chain (or one whose other filters the chain plan may show inert per request, ``start()``
    checks) and none of the per-request features the lane leaves to the generic stream."""
    # (the request preparation, XFF, XFCC, paths and all, is the shared request_prep step)
    return bool(
        cfg.fast_router and not cfg.access_logs and not cfg.always_set_request_id_in_response
        and not cfg.request_timeout and not cfg.max_stream_duration)


def start(hc, codec, headers, end_stream, version, direct=False) -> None:
    """The HTTP/1.1 codec's ``on_request`` when the HCM allows this lane: serve a complete, bodiless
    HTTP/1.1 request here, or leave it (having changed nothing the generic stream would not do the
    same way) to a stream (``HttpConnection.on_request``).

    ``headers`` is what the server codec built: ``:method, :scheme, :path, :authority`` first."""
    h = headers._h
    if not (direct and end_stream and version is HTTP11) or len(h) < 4:
        return hc.on_request(codec, headers, end_stream, version)
    cfg = hc.cfg
    # the connection manager's request preparation (request_prep.py), the one every lane runs;
    # when the request then leaves this lane, its result goes with it (it is never run twice)
    table = cfg.routes.table
    r = prepare(cfg.prep, hc.conn, headers, table, not (codec.noted or codec.hop_seen))
    remote = None
    if type(r) is not str:
        if r.reply is not None:
            hc.prepped = r
            return hc.on_request(codec, headers, True, version)
        remote = r.remote
    if table is None:
        return _fall_back(hc, codec, headers, r)
    route = table.find_for_path(headers, h[3][1], h[2][1], _rand(32) if table.needs_random else 0)
    if route is None:
        return _fall_back(hc, codec, headers, r)
    rq_timeout = route.express  # (the route's plan, routing/plan.py)
    if rq_timeout is False:
        return _fall_back(hc, codec, headers, r, table, route)
    if (cfg.chain_checks or route.grpc_router) and not chain_is_inert(cfg, route, headers):
        return _fall_back(hc, codec, headers, r, table, route)  # a filter before the router has work: the generic chain
    picked = pick_cluster(route, headers, cfg.cluster_manager)
    if picked is None:
        return _fall_back(hc, codec, headers, r, table, route)
    name, choice, cluster = picked

    # from here on the request is the compiled path's
    s = _new_stream(FastStream)
    s.hc = hc
    s.cfg = cfg
    s.encoder = codec
    codec.stream = s
    s.t0 = s.start = _monotonic()
    s.request_headers = headers
    s.route = route
    s.router = s
    s.cluster = cluster
    s.choice = choice
    s.plain = not codec.hop_seen
    s.remote_complete = True
    mut = route.resp_raw
    if mut is None or cfg.response_take_raw.isdisjoint(mut[2]):
        s.raw_head = True  # (else a telemetry hook reads a header the route's mutations write)
    if remote is not None:
        s.remote = remote
    s.rid = r if type(r) is str else r.rid
    # HttpConnection.new_stream and ActiveStream.__init__'s counting
    loop_now = cfg.loop.time()
    hc.streams += 1
    hc.last_activity = s.last_activity = loop_now
    hc.live.add(s)
    st = hc.stats
    st.rq_total.value += 1
    g = st.rq_active
    g.value += 1
    g.used = True
    st.rq_http1_total.value += 1
    d = cfg.prep.decorate
    if d:
        # (no tracer on this lane: the caller's operation names no span)
        s.caller_op = decorate(d, route, headers, not (codec.noted or codec.hop_seen))
    for hook in cfg.request_hooks:  # telemetry filters' request work (ChainPlan)
        hook(s, headers, cluster)
    # the router's work (FastStream.decode_headers)
    if rq_timeout and not cfg.router_suppress_envoy_headers:
        # (the request preparation removed any the client sent, internal or not: append)
        headers._h.append(("x-envoy-expected-rq-timeout-ms", rq_timeout))  # (prepare may have replaced h)
    if route.include_request_attempt_count:
        headers.set("x-envoy-attempt-count", "1")
    if route._req_mutations or choice is not None:
        route.finalize_request_headers(headers, None, choice)
    if choice is not None or route.fast_rewrites:
        route.rewrite_request(headers, choice)
    cluster.rq_active_total += 1
    g = cluster.st_rq_active
    g.value += 1
    g.used = True
    s.counted = True
    timeout = route.timeout
    if timeout:
        at = s.deadline = loop_now + timeout
        if hc.dl_handle is None or at < hc.dl_at:  # (the connection's timer already fires in time)
            hc.arm_deadline(at)
    host = s.host = cluster.choose_host(_NO_CTX)
    if host is None:
        cluster.st_cx_none_healthy.value += 1
        s._fail(503, "no healthy upstream", "no_healthy_upstream", "UH")
        return
    s.pending = cluster.http_pool(host, False, s.alpn).new_stream(s)


def _fall_back(hc, codec, headers, r, table=None, route=None) -> None:
    """Leave the request to the generic stream, with the request preparation's result (and the
    route, when one was found: the stream does not look it up again)."""
    if route is not None:
        hc.prepped = Prepared(rid=r, table=table, route=route) if type(r) is str else \
            Prepared(r.rid, r.remote, r.reply, r.upgrade, table, route)
    else:
        hc.prepped = Prepared(rid=r) if type(r) is str else r
    hc.on_request(codec, headers, True, HTTP11)
