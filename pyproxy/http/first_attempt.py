"""The router's first attempt, run by the stream itself (``FirstAttempt``, a part of
``stream.ActiveStream``): what the HCM's chain plan and the route's plan decide per request.

When every filter in front of the router has nothing to do for a request (the HCM's chain plan,
``chain_is_inert``; a router-only chain always) and the request is complete, bodiless, and on a
route whose plan allows it (``RouteEntry.fast``, routing/plan.py: a plain cluster route without
hash policies, host rewrites from the host, mirrors, hedging or per-try timeouts), the stream
needs none of the filter-chain machinery: no filter list, no ``Router`` and ``UpstreamRequest``
objects, no event hops between them. The stream is then the router and the upstream request:
``begin_first_attempt`` does the router's work for the request and the pool and the upstream
codec call the stream back. Everything else (bodies, upgrades, CONNECT, direct responses and
redirects, unknown or ORIGINAL_DST clusters) goes through the filter
chain before any side effect.

What such a request does is what the router does for it: the same headers added
(``x-envoy-expected-rq-timeout-ms``, ``x-envoy-upstream-service-time``), the same route header
mutations, stats, response flags and local replies (503 UH/UF/UO/UR, 504 UT). The differential
tests compare it with ``PYPROXY_REFERENCE=1``, which runs every request filter by filter.

A route with a retry policy (Istio's default) stays here: no retry state is made while the first
attempt goes well. When it fails (a connect failure, a reset before the response, a status in the
plan's ``retry_codes``) the router filter takes the request over (``_to_router``,
``Router.adopt``) with that attempt as its first, and decides, retries and answers as it would
have from the start.

On a bodiless HTTP/1.1 request whose route and chain plans allow it, the upstream response head
is relayed as bytes (``raw_head``, http/h1_relay.py).
"""

from __future__ import annotations

import random
import time
from operator import itemgetter

from ..cluster.cluster import HTTP1
from ..cluster.lb import LbContext
from ..cluster.pool import UpstreamConnection
from ..filters.http.router_steps import (NO_HEALTHY, OVERLOADED, TIMEOUT, charge_failure, connect_failure,
                                         count_rx_reset, finalize_request, finalize_response, reset_failure, reset_flag,
                                         upstream_timeout)
from ..routing.header_mutation import take_out
from ..stats.histogram import PENDING
from ..transport import upstream_tls_sans
from . import h1_relay
from .relay_h2 import H2_RELAY, relay_head

_NO_CTX = LbContext()
_monotonic = time.monotonic
_rand = random.getrandbits
_first = itemgetter(0)
_NEEDS_LENGTH = frozenset(("POST", "PUT", "PATCH"))  # (a bodiless one gets content-length: 0)



def close_tunnel(enc) -> None:
    """The upstream half-closed a tunnel (an upstream 101) and the stream is over: its connection
    is closed, as the router does (``Router.on_destroy``)."""
    if enc is not None and getattr(enc, "open_tunnel", False):
        enc.reset()


def chain_is_inert(cfg, route, headers) -> bool:
    """The HCM's chain plan (filters/network/http_connection_manager.py ChainPlan) and the route's
    plan (routing/plan.py), per request: whether every filter in front of the router has nothing
    to do for this route and request. A filter that is inert unless a route configures it is live
    on a route whose ``filter_names`` (compiled with the route) include its name; ``grpc_stats`` is
    live on a gRPC request only, and so is the router's gRPC work on some routes
    (``route.grpc_router``: gRPC retries, the grpc-timeout header).
    Called when ``cfg.chain_checks or route.grpc_router``; ``headers`` None: the caller knows the
    request has no content-type (the HTTP/1.1 codec's ``ct``)."""
    keys = cfg.live_on_route
    if keys and not keys.isdisjoint(route.filter_names):
        return False
    if headers is not None and (cfg.live_on_grpc or route.grpc_router):  # (None: no content-type)
        ct = headers.get("content-type")
        if ct is not None and ct.startswith("application/grpc"):
            return False
    return True


def pick_cluster(route, headers, cluster_manager):
    """``(name, weighted choice or None, cluster)`` for a first attempt the stream runs, or None
    when the router must answer (an unknown or ORIGINAL_DST cluster). (``max_requests`` is the
    pool's check, as a request is attached to a connection.)"""
    if route.cluster:
        name, choice = route.cluster, None
    else:
        name, choice = route.select_cluster(headers, _rand(32))
    cluster = cluster_manager.active.get(name)  # (ClusterManager.get)
    if cluster is None or cluster.original_dst:
        return None
    return name, choice, cluster


class FirstAttempt:
    """The stream's part that runs the router's first attempt (see the module docstring)."""

    # per-request state in slots (ActiveStream adds its own and a __dict__ for the rest): every
    # way a stream starts sets each of them before anything reads it (``ActiveStream.__init__``;
    # for a stream ``conn_manager.serve_inline`` makes, ``begin_first_attempt``)
    __slots__ = (
        "cluster", "choice", "host",
        "encoder_up",   # the bound upstream connection (request encoder)
        "pending",      # a queued pool request
        "start",
        "counted",      # counted in the cluster's active requests
        "up_done",      # the upstream exchange is over (completed, failed or abandoned)
        "status",       # set when on_upstream_head wrote the response head itself
        "up_local",
        "up_head",      # the request head the relay wrote upstream (istio.stats sizes it)
        "plain",        # the request has no framing or hop-by-hop headers (HTTP/1.1 codec)
        "quiet",        # nor any the codec notes (conn_manager.H1_NOTE: no x-envoy-attempt-count)
        "tx_head",      # bytes of the response header lines written by the relay (istio.stats)
        "tx_body",      # response body bytes written by the relay
        "raw_head",     # True: the upstream HTTP/1.1 codec calls on_upstream_head with raw header bytes;
                        # H2_RELAY: the response goes to the HTTP/2 client as relay_h2.py writes it
    )
    read_off = False      # upstream reading paused for the downstream watermark
    handed = None         # the attempt the router filter took over (_to_router)
    alpn = None           # the upstream ALPN list a request hook chose (istio.alpn)
    # a StreamInfo was made (ActiveStream.__init__, stream_parts.LazyInfo): it is in the instance's
    # dict then (testing ``self.__dict__`` would make a dict for a stream that has none)
    has_info = False

    on_upstream_head = h1_relay.on_upstream_head

    def begin_first_attempt(self, route, headers, cluster, choice) -> None:
        """The router's work for this request (``Router.decode_headers`` for a first attempt
        without retry state): from here on the stream is the request's router."""
        cfg = self.cfg
        self.hc.stats.router_rq_total.value += 1  # (the router's rq_total)
        self.router = self  # the generic code's hooks (resets, local replies, watermarks)
        self.cluster = cluster
        self.choice = choice
        # (the slots serve_inline does not set, before the hooks can read them)
        self.host = self.encoder_up = self.pending = self.deadline = self.up_head = None
        self.counted = self.up_done = self.response_started = self.local_complete = self.done = False
        self.status = self.tx_head = self.tx_body = 0
        self.start = self.t0  # (the stream's start: request preparation and route lookup just ran)
        self.up_local = ""
        for hook in cfg.request_hooks:  # telemetry filters' request work (ChainPlan)
            hook(self, headers, cluster)
        # (no filter ran: the request preparation removed any timeout header the client sent;
        # a route whose mutations are literal needs no StreamInfo)
        timeout = route.timeout
        t = route.req_tail  # (finalize_request, compiled: routing/plan.py request_tail)
        if t is not None and choice is None and (self.quiet or not t[3]) and (
                t[0] is None or t[0].isdisjoint(map(_first, headers._h))):
            if t[4] is not None and not t[4].isdisjoint(map(_first, headers._h)):
                take_out(headers._h, t[4])  # (the request's lines of names the route overwrites)
            headers._h += t[2] if cfg.router_suppress_envoy_headers else t[1]
        else:
            finalize_request(route, headers, timeout, cfg.router_suppress_envoy_headers,
                             None if route.inline else self.stream_info, choice, True, self.quiet)
        cluster.rq_active_total += 1
        g = cluster.st_rq_active
        g.value += 1
        g.used = True
        self.counted = True
        if timeout:
            # the route timeout: a deadline on the connection's shared timer
            hc = self.hc
            at = self.deadline = cfg.loop.time() + timeout
            if hc.dl_handle is None or at < hc.dl_at:  # (the connection's timer already fires in time)
                hc.arm_deadline(at)
        host = self.host = cluster.lb.choose(_NO_CTX)  # (Cluster.choose_host)
        si = self.stream_info if self.has_info else None  # (None: made lazily, from these attributes)
        if si is not None:
            si.upstream_cluster = cluster.name
            si.attempt_count = 1
            if host is not None:
                si.upstream_host = host.key
        if host is None:
            cluster.st_cx_none_healthy.value += 1
            self._fail(*NO_HEALTHY)
            return
        # (Cluster.http_pool's common case, inline: an HTTP/1.1 cluster's pool for the host)
        p = cluster.pools.get(host.key) if cluster.protocol == HTTP1 and self.alpn is None else None
        if p is None:
            p = cluster.http_pool(host, self.hc.is_h2, self.alpn)
        self.pending = p.new_stream(self)

    # -- pool callbacks --------------------------------------------------------------------------
    def on_pool_ready(self, encoder, host):
        self.pending = None
        if self.up_done:
            encoder.reset()
            return
        self.encoder_up = encoder
        if self.hc.conn.write_paused:
            self.read_off = True
            encoder.read_disable(True)
        h1 = type(encoder) is UpstreamConnection
        if encoder.is_tls if h1 else getattr(encoder, "is_tls", True):  # (HTTP/1.1 connections and HTTP/2 streams say)
            sans = upstream_tls_sans(encoder)  # (as the router: istio.stats principals, access logs)
            if sans is not None:
                si = self.stream_info
                si.upstream_peer_uri_san, si.upstream_local_uri_san, si.upstream_ssl = sans
        # the request head upstream
        if not h1 or not self.plain:
            self.up_local = getattr(encoder, "local_address", "")
            si = self.stream_info if self.has_info else None
            if si is not None:
                si.upstream_local_address = self.up_local
            encoder.encode_headers(self.request_headers, True)
            return
        # an HTTP/1.1 upstream and a request with no framing or hop-by-hop headers
        self.up_local = encoder.local_address
        h = self.request_headers._h
        if h[0][1] in _NEEDS_LENGTH:
            encoder.encode_headers(self.request_headers, True)
            return
        self.up_head = encoder.codec.encode_plain_head(h)  # (up_head: istio.stats sizes the request head from it)

    def on_pool_failure(self, reason, flag, host):
        self.pending = None
        if self.up_done:
            return
        if self.route.retry_codes is not None:
            self._to_router().on_pool_failure(reason, flag, host)
            return
        self.stream_info.upstream_transport_failure_reason = reason
        if host is not None:
            host.rq_error += 1  # (Envoy's chargeUpstreamAbort: the host's rq_error)
        self._fail(*connect_failure(reason, flag))

    def _to_router(self):
        """This attempt failed (or has a status its retry policy may retry): the router filter
        takes the request over with it as its first attempt (``Router.adopt``), and with it the
        retry state, made only now. Returns the attempt (an ``UpstreamRequest``) for the caller
        to deliver the failure to."""
        r = self.cfg.decoder_factories[-1].create(self)  # (sets self.router)
        up = r.adopt(self.route, self.cluster, self.choice, self.request_headers, self.host,
                     self.encoder_up, self.start)
        up.read_off = self.read_off
        self.filters = [r]  # (the other filters are inert on the request: the chain plan)
        # the upstream connection still calls this stream: what follows goes to the attempt
        self.handed = up
        # the upstream exchange is the router's now
        self.counted = False
        self.up_done = True
        self.encoder_up = None
        self.pending = None
        return up

    # -- the upstream response ---------------------------------------------------------------------
    def on_upstream_headers(self, headers, end_stream: bool):
        if self.up_done:
            return
        status = int(headers._h[0][1])
        rc = self.route.retry_codes
        if rc is not None and status in rc:
            # a status the route's retry policy may retry: the router decides
            self._to_router().on_upstream_headers(headers, end_stream)
            return
        c = self.cluster
        c.count_response(status, self.host, headers if end_stream else None)  # (gRPC trailers-only)
        si = self.stream_info if self.has_info else None  # (None: made lazily, "via_upstream" then)
        if si is not None:
            si.response_code_details = "via_upstream"
        finalize_response(self.route, headers, self.start, self.cfg.router_suppress_envoy_headers, si,
                          self.choice, self.request_headers)
        for hook in self.cfg.response_hooks:  # telemetry filters' response work (ChainPlan)
            hook.on_response(self, headers)
        if self.raw_head == H2_RELAY and not end_stream and status >= 200:
            relay_head(self, headers, status, si)  # (an HTTP/2 client's: http/relay_h2.py)
            return
        if end_stream:
            self._complete()
        self.encode_headers(headers, end_stream)

    def on_upstream_data(self, data, end_stream: bool):
        if self.up_done:
            h = self.handed
            if h is not None:
                h.on_upstream_data(data, end_stream)
            return
        if self.status:  # the head went as bytes (h1_relay): so does the body
            self.tx_body += len(data)
            if not end_stream:
                self.encoder.write_body(data, False)
                self.last_activity = self.cfg.loop.time()
                return
            # the relayed response is complete: the stream's ``_complete`` and ``_finish``, for a
            # stream whose head went as bytes (made by ``HttpConnection.on_request``: no timers, no
            # filters, no access logs)
            enc = self.encoder_up
            self.encoder_up = None  # (an HTTP/2 stream points back at us: no cycle left)
            now = _monotonic()
            c = self.cluster
            ms = (now - self.start) * 1000.0  # (the stream's start: begin_first_attempt)
            p = c.st_rq_time.pending  # (Histogram.record, inline: append; fold when PENDING values wait)
            p.append(ms)
            if len(p) >= PENDING:
                c.st_rq_time.fold()
            self.up_done = True
            if self.counted:
                self.counted = False
                c.rq_active_total -= 1
                c.st_rq_active.value -= 1  # (gauges that on_request raised: no need to mark them used)
            self.local_complete = True
            self.encoder.relay_done(data)  # (it writes data, the body's last bytes)
            self.done = True
            hc = self.hc
            st = hc.stats
            st.rq_active.value -= 1
            try:
                st.rq_class[self.status // 100].value += 1
            except IndexError:
                pass  # (a status over 599, e.g. 999: no class counter, as ActiveStream._finish)
            st.rq_completed.value += 1
            p = st.rq_time.pending  # (Histogram.record, inline)
            p.append(ms)
            if len(p) >= PENDING:
                st.rq_time.fold()
            # (HttpConnection.stream_done, inlined)
            hc.streams -= 1
            hc.live.discard(self)
            hc.last_activity = self.cfg.loop.time()
            if hc.draining and hc.streams == 0 and not hc.is_h2:  # (HTTP/2: the codec's GOAWAY ends it)
                hc.conn.close(flush=True)
            self.router = None
            self.encoder = None
            obs = self.cfg.observers
            if obs:  # telemetry filters' completion work (ChainPlan)
                si = self.stream_info if self.has_info else None  # (made only if something needed it)
                if si is not None:
                    si.end_monotonic = now
                    si.response_code = self.status
                for o in obs:
                    o(self)
            if type(enc) is not UpstreamConnection or enc.codec.tunnel:  # (an HTTP/1.1 one, mostly)
                close_tunnel(enc)
            return
        if end_stream:
            enc = self.encoder_up
            self._complete()
            self.encode_data(data, end_stream)
            close_tunnel(enc)
            return
        self.encode_data(data, end_stream)

    def on_upstream_trailers(self, trailers):
        if self.up_done:
            h = self.handed
            if h is not None:
                h.on_upstream_trailers(trailers)
            return
        self._complete()
        self.encode_trailers(trailers)

    def on_upstream_reset(self, reason: str):
        if self.up_done:
            h = self.handed
            if h is not None:
                h.on_upstream_reset(reason)
            return
        if not self.response_started and self.route.retry_codes is not None:
            self._to_router().on_upstream_reset(reason)
            return
        self.encoder_up = None
        count_rx_reset(self.cluster, reason)
        if not self.response_started:
            if self.host is not None:
                self.host.rq_error += 1  # (as on_pool_failure)
            self._fail(*reset_failure(reason))
            return
        si = self.stream_info
        si.response_flags.add(reset_flag(reason))
        # (Envoy's details name the reset, not via_upstream, once the response started)
        si.response_code_details = "upstream_reset_after_response_started{%s}" % reason.replace(" ", "_")
        self._up_finished()
        self.reset_stream(si.response_code_details)

    def on_upstream_watermark(self, above: bool):
        if not self.up_done:
            self.read_disable(above)
        elif self.handed is not None:
            self.handed.on_upstream_watermark(above)

    # -- the router hooks the generic stream calls ----------------------------------------------------
    def on_downstream_watermark(self, above: bool):
        enc = self.encoder_up
        if enc is None or self.up_done:
            return
        if above:
            self.read_off = True
            enc.read_disable(True)
        elif self.read_off:
            self.read_off = False
            enc.read_disable(False)

    # the HTTP/2 codec's per-stream watermarks reach the router's ``upstream`` request
    @property
    def upstream(self):
        return self if self.encoder_up is not None and not self.up_done else None

    def on_above_write_buffer_high_watermark(self):
        self.on_downstream_watermark(True)

    def on_below_write_buffer_low_watermark(self):
        self.on_downstream_watermark(False)

    def on_downstream_reset(self):
        enc = self.encoder_up  # (an HTTP/1.1 upstream request is not reset but its connection closed: not counted)
        if enc is not None and not self.up_done and not isinstance(enc, UpstreamConnection):
            self.cluster.st_rq_tx_reset.value += 1
        self._abandon()

    def on_local_reply(self):
        if not self.response_started:
            self._abandon()
        else:
            self._up_finished()

    # -- endings ------------------------------------------------------------------------------------
    def _attempt_deadline(self):
        """The route timeout passed (``ActiveStream.on_deadline``, when the stream is the router)."""
        if self.up_done:
            return
        upstream_timeout(self.cluster, self.host if self.encoder_up is not None else None)
        if self.response_started:
            self._abandon()
            si = self.stream_info  # (as Envoy's onUpstreamAbort: the flag and details, then the reset)
            si.response_flags.add("UT")
            si.response_code_details = "response_timeout"
            self.reset_stream("response_timeout")
            return
        self._fail(*TIMEOUT)

    def _fail(self, status, body, details, flag):
        """A local reply for an upstream failure (the router's ``_fail`` for a first attempt)."""
        body = charge_failure(self.cluster, status, body, flag, None, 1)
        self._abandon()
        dropped = flag == "UO" and not self.cfg.router_suppress_envoy_headers
        self.send_local_reply(status, body, details, flag=flag, headers=OVERLOADED if dropped else None)

    def _complete(self):
        self.cluster.st_rq_time.record((_monotonic() - self.start) * 1000.0)
        self._up_finished()

    def _abandon(self):
        """Stop talking upstream: cancel a queued pool request or reset the bound connection."""
        if self.up_done:
            return
        p = self.pending
        if p is not None:
            self.pending = None
            p.cancel()
        enc = self.encoder_up
        self._up_finished()
        if enc is not None:
            enc.reset()

    def _up_finished(self):
        if self.up_done:
            return
        self.up_done = True
        self.encoder_up = None
        self.deadline = None
        if self.counted:
            self.counted = False
            c = self.cluster
            c.rq_active_total -= 1
            c.st_rq_active.dec()
