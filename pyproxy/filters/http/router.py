"""``envoy.filters.http.router``: the terminal HTTP filter that sends requests upstream.

Per request: route action -> cluster -> host (load balancer) -> connection pool -> upstream
request. Retries (``retry_policy``), per-try and global timeouts, circuit breakers and Envoy's
local replies for upstream failures (503 UF/UH/UO/NC/URX, 504 UT) live here, and mirrors
(``request_mirror_policies``, in ``shadow.py``).

Retries follow Envoy's retry state (``router_retry.py``): an outcome (response headers, reset,
connect failure, per-try timeout) that the policy would retry takes one of the retries left (none
left: ``upstream_rq_retry_limit_exceeded``, flag URX), then one unit of the cluster's retry
resource (``retry_budget``: at most ``budget_percent`` of the active and pending requests, never
fewer than ``min_retry_concurrency``; else ``max_retries``; none free:
``upstream_rq_retry_overflow``, flag UO). A retriable response that is not retried goes to the
client as it is. The unit is held from the retry's backoff until that retry's own outcome.
``hedge_policy.hedge_on_per_try_timeout``: a per-try timeout starts a retry without cancelling
the late attempt; the first usable response wins and the others are reset.
"""

from __future__ import annotations

import logging
import random
import time

from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401

from ...cluster.lb import LbContext
from ...cluster.code_stats import charge_internal
from ...cluster.outlier import put_response
from ...http.filter import CONTINUE, STOP
from ...http.headers import Headers
from . import router_control
from .router_retry import (R_NO, R_YES, RetryState, charge_retried, expected_timeout, grpc_retry,
                           legacy_grpc_timeout)
from .tcp_upstream import connect as tcp_connect
from .router_tunnel import handshake_failed, upgrade_ended
from .router_steps import (NO_HEALTHY, OVERLOADED, charge_failure, connect_failure, count_rx_reset, finalize_request,
                           finalize_response, reset_failure, reset_flag, upstream_timeout)
from .shadow import local_address, start_shadows
from .upstream_request import UpstreamRequest

log = logging.getLogger("pyproxy.router")

ROUTE, DIRECT_RESPONSE, REDIRECT = 0, 1, 2
_RETRY_BUFFER_LIMIT = 1024 * 1024
ALPN_KEY = "envoy.network.application_protocols"  # set by istio.alpn: the upstream TLS ALPN list


class RouterConfig:
    is_router = True

    def __init__(self, cfg, ctx):
        self.cm = ctx.cluster_manager
        self.loop = ctx.loop
        self.suppress_envoy_headers = cfg.suppress_envoy_headers if cfg is not None else False
        self.respect_expected_rq_timeout = cfg.respect_expected_rq_timeout if cfg is not None else False
        self.local_address = local_address()  # appended to mirrors' x-forwarded-for

    def create(self, stream):
        return Router(self, stream)


def factory(cfg, ctx):
    return RouterConfig(cfg, ctx)


_NO_CTX = LbContext()


class Router(RetryState):
    __slots__ = ("cfg", "s", "route", "cluster", "upstream", "headers", "body", "body_len",
                 "trailers", "retries_left", "retry", "timing", "attempts", "lb_ctx",
                 "request_complete", "buffering", "done", "start", "choice", "retry_timer",
                 "response_started", "upstream_rq_counted", "grpc", "timeout", "hosts_tried",
                 "read_held", "shadows", "others", "retry_held", "hedge", "tunnel_enc", "timeout_retry")

    def __init__(self, cfg, stream):
        self.cfg = cfg
        self.s = stream
        stream.router = self
        self.upstream = None
        self.tunnel_enc = None  # an upgrade's upstream connection, kept open past the response's end
        self.timing = False  # the route timeout runs (a deadline on the stream)
        self.retry_timer = None
        self.done = False
        self.attempts = 0
        self.body = None
        self.body_len = 0
        self.trailers = None
        self.request_complete = False
        self.response_started = False
        self.hosts_tried = None
        self.read_held = False
        self.shadows = ()
        self.others = None  # hedging: earlier attempts still running (a list) besides ``upstream``
        self.retry_held = False  # one unit of the cluster's retries, until the retry's outcome
        self.timeout_retry = False  # the next retry follows a per-try timeout (x-envoy-is-timeout-retry)

    # -- HTTP filter API --------------------------------------------------------------------------
    def decode_headers(self, headers: Headers, end_stream: bool):
        s = self.s
        route = self.route = s.route
        si = s.stream_info
        s.hc.stats.router_rq_total.value += 1
        if route is None:
            s.hc.stats.no_route.value += 1
            s.send_local_reply(404, "", "route_not_found", flag="NR")
            return STOP
        kind = route.kind
        if kind != ROUTE:
            if kind == DIRECT_RESPONSE:
                s.hc.stats.rq_direct_response.value += 1
                body = route.direct_body(si, headers)
                self._direct_reply(route.direct_status, body, headers)
            else:
                s.hc.stats.rq_redirect.value += 1
                loc = route.redirect_location(headers)
                s.send_local_reply(route.redirect_status, "", "direct_response", headers={"location": loc})
            return STOP
        name, choice = route.select_cluster(headers, random.getrandbits(32))
        self.choice = choice
        si.upstream_cluster = name
        cluster = self.cluster = self.cfg.cm.get(name)
        if cluster is None:
            s.hc.stats.no_cluster.value += 1
            s.send_local_reply(route.cluster_not_found_response_code, "", "cluster_not_found", flag="NC")
            return STOP
        # (upgrades and CONNECT: the connection manager's one check, ActiveStream.upgrade_refused,
        # ran before any filter)
        timeout = route.timeout
        self.grpc = (headers.get("content-type") or "").startswith("application/grpc")
        if route.max_grpc_timeout is not None and self.grpc:
            timeout = legacy_grpc_timeout(route, headers)
        ctl = s.ctl  # (an internal request's x-envoy-* control headers, else None)
        if not ctl:
            self.timeout = timeout
            finalize_request(route, headers, expected_timeout(route, timeout), self.cfg.suppress_envoy_headers, si, choice)
            retry = self.retry = route.retry
            self.retries_left = retry.num_retries if retry is not None else 0
            self.hedge = route.hedge_on_per_try_timeout and retry is not None
        else:
            retry = router_control.apply(self, route, headers, timeout, ctl, si, choice)
        self.headers = headers
        if retry is not None and retry.retriable_request_headers:
            ex = retry.excluded(headers)
            if ex is not None:  # (retriable_request_headers: not this request)
                retry = self.retry = ex
        if retry is not None and retry.num_retries:
            # kept for a retry up to Envoy's retry buffer limit: the listener's buffer limit (HTTP/2: the
            # stream's flow-control window), or the route's per_request_buffer_limit_bytes when smaller
            hc = s.hc
            lim = (hc.codec.opts.stream_window if hc.is_h2 else hc.conn.listener.buffer_limit) or _RETRY_BUFFER_LIMIT
            rl = route.per_request_buffer_limit_bytes
            self.buffering = max(1, rl) if rl is not None and rl < lim else lim
        else:
            self.buffering = 0
        if route.hash_policies or (retry is not None and retry.previous_hosts):
            ctx = self.lb_ctx = LbContext(route.hash_key(headers, s.hc.conn.info.src_ip) if route.hash_policies else None)
            if retry is not None and retry.previous_hosts:
                ctx.previous_hosts = []
                ctx.host_selection_max_attempts = retry.host_selection_max_attempts
        else:
            self.lb_ctx = _NO_CTX
        self.start = time.monotonic()
        cluster.rq_active_total += 1
        cluster.st_rq_active.inc()
        self.upstream_rq_counted = True
        self.request_complete = end_stream
        if end_stream:
            self._start_global_timer()
        self._attempt()
        if route.mirror_policies and si.upstream_host:
            # mirrors start once the main request has a host (Envoy: no shadow when there is no
            # healthy upstream); those still waiting for the body are kept to stream it
            self.shadows = start_shadows(self, route, headers, end_stream)
            if self.done:
                self._cleanup()  # (the main request already failed)
        return STOP

    def adopt(self, route, cluster, choice, headers, host, encoder, start):
        """Take over a complete, bodiless request whose first attempt the stream ran itself (the
        compiled path, ``http/first_attempt.py``) on a route with a retry policy, when that attempt
        failed: the retry state is made now, as ``decode_headers`` would have made it, with the
        attempt as the first. The cluster's active-request count passes to the router. Returns
        the attempt, to which the caller delivers the failure (``on_pool_failure``,
        ``on_upstream_reset``, ``on_upstream_headers``)."""
        self.route = route
        self.cluster = cluster
        self.choice = choice
        self.headers = headers
        self.grpc = False  # (gRPC requests on such a route take the whole router: RouteEntry.grpc_router)
        self.timeout = route.timeout
        self.timing = bool(route.timeout)  # (the stream's deadline is already set)
        retry = self.retry = route.retry
        self.retries_left = retry.num_retries
        self.hedge = False
        self.buffering = 0
        if retry.previous_hosts:
            ctx = self.lb_ctx = LbContext(None)
            ctx.previous_hosts = [host]
            ctx.host_selection_max_attempts = retry.host_selection_max_attempts
        else:
            self.lb_ctx = _NO_CTX
        self.start = start
        self.upstream_rq_counted = True
        self.request_complete = True
        self.attempts = 1
        up = self.upstream = UpstreamRequest(self, host)
        up.encoder = encoder
        return up

    def decode_data(self, data: bytes, end_stream: bool):
        if self.shadows:
            for sh in self.shadows:
                sh.send_data(data, end_stream)
            if end_stream:
                self.shadows = ()
        if self.done:
            return STOP
        up = self.upstream
        bound = up is not None and up.encoder is not None
        if self.buffering or not bound:
            # kept for a retry, or held until the upstream connection is ready (on_pool_ready)
            if self.body is None:
                self.body = []
            self.body.append(data)
            self.body_len += len(data)
            if not bound and self.body_len > self.s.hc.conn.listener.buffer_limit and not self.read_held:
                self.read_held = True
                self.s.read_disable(True)  # no upstream yet: stop reading the body
            if self.buffering and self.body_len > self.buffering:
                # too big to replay: no more retries for this request (Envoy's count)
                self.buffering = 0
                self.retries_left = -1  # (abandoned: not a retry limit reached, router_retry.py)
                self.cluster.st_retry_or_shadow_abandoned.value += 1
                if bound:
                    self.body = None
                    self.body_len = 0
                elif up is None and self.retry_timer is not None:
                    # waiting to retry, and the retry could not replay the body
                    self._fail(507, "exceeded request buffer limit while retrying upstream",
                               "request_payload_exceeded_retry_buffer_limit", "")
                    return STOP
        if end_stream:
            self.request_complete = True
            self._start_global_timer()
        if bound:
            up.send_data(data, end_stream)
            if end_stream:
                self._start_per_try(up)
        return STOP

    def decode_trailers(self, trailers):
        if self.shadows:
            for sh in self.shadows:
                sh.send_trailers(trailers)
            self.shadows = ()
        if self.done:
            return STOP
        self.trailers = trailers
        self.request_complete = True
        self._start_global_timer()
        up = self.upstream
        if up is not None:
            up.send_trailers(trailers)
            if up.encoder is not None:
                self._start_per_try(up)
        return STOP

    def encode_headers(self, headers, end_stream):
        return CONTINUE

    def encode_data(self, data, end_stream):
        return CONTINUE

    def encode_trailers(self, trailers):
        return CONTINUE

    def on_destroy(self):
        self._cleanup()
        if self.s.tunneling:  # (an accepted upgrade always runs the filter chain)
            upgrade_ended(self.s)
        t = self.tunnel_enc
        if t is not None:
            self.tunnel_enc = None
            t.reset()

    # -- attempts ---------------------------------------------------------------------------------
    def _attempt(self):
        s = self.s
        c = self.cluster
        si = s.stream_info
        self.attempts += 1
        si.attempt_count = self.attempts
        if c.original_dst:
            host = self._original_dst_host()
        else:
            host = c.choose_host(self.lb_ctx)
        if host is None:
            c.st_cx_none_healthy.value += 1
            self._fail(*NO_HEALTHY)
            return
        si.upstream_host = host.key
        if self.lb_ctx.previous_hosts is not None:
            self.lb_ctx.previous_hosts.append(host)
        if self.route.auto_host_rewrite and host.hostname:
            self.headers.set(":authority", host.hostname)
        if self.attempts > 1:  # (the first: decode_headers)
            self._retry_headers()
        up = self.upstream = UpstreamRequest(self, host)
        if s.tunneling == 2:  # CONNECT termination: a TCP upstream (tcp_upstream.py)
            up.pending = tcp_connect(self, up, host)
            return
        fs = si.filter_state
        pool = c.http_pool(host, s.hc.is_h2, fs.get(ALPN_KEY) if fs else None)  # istio.alpn
        up.pending = pool.new_stream(up)

    def _original_dst_host(self):
        c = self.cluster
        if c.original_dst_use_header:
            v = self.headers.get("x-envoy-original-dst-host")
            if v:
                ip, _, port = v.rpartition(":")
                try:
                    return c.original_dst_host(ip.strip("[]"), int(port))
                except ValueError:
                    return None
        info = self.s.hc.conn.info
        if not info.dst_ip:
            return None
        return c.original_dst_host(info.dst_ip, info.dst_port)

    def _start_global_timer(self):
        """The route timeout: a deadline on the connection's shared timer
        (``HttpConnection.arm_deadline``), which calls ``on_deadline`` through the stream."""
        if not self.timing and self.timeout and not self.done:
            self.timing = True
            s = self.s
            at = s.deadline = self.cfg.loop.time() + self.timeout
            s.hc.arm_deadline(at)

    def on_deadline(self):
        if self.done:
            return
        c = self.cluster
        up = self.upstream
        upstream_timeout(c, up.host if up is not None else None)
        if up is not None:
            up.abandon()
            self.upstream = None
        if self.others:
            for o in self.others:
                c.report_timeout(o.host)
            self._abandon_others(None)
        if self.response_started:
            si = self.s.stream_info  # (as Envoy's onUpstreamAbort: the flag and details, then the reset)
            si.response_flags.add("UT")
            si.response_code_details = "response_timeout"
            self.s.reset_stream("response_timeout")
            self._done()
            return
        self._fail(*router_control.timeout_reply(self, "response_timeout"))

    # -- upstream request callbacks (via UpstreamRequest) ------------------------------------------------
    def on_pool_ready(self, up, encoder):
        headers = self.headers
        body = self.body
        end = self.request_complete and not body and self.trailers is None
        if self.attempts > 1 or body or self.trailers is not None:
            # a retry replays what was buffered (an earlier attempt's connect failure is not this one's)
            self.s.stream_info.upstream_transport_failure_reason = ""
            encoder.encode_headers(headers, end)
            if body:
                data = b"".join(body)
                encoder.encode_data(data, self.request_complete and self.trailers is None)
            if self.trailers is not None:
                encoder.encode_trailers(self.trailers)
            if not self.buffering:
                self.body = None  # sent; only a retry buffer is kept
                self.body_len = 0
            if self.read_held:
                self.read_held = False
                self.s.read_disable(False)
        else:
            encoder.encode_headers(headers, end)
        if self.request_complete:
            self._start_per_try(up)

    def on_pool_failure(self, up, reason, flag, host):
        if self.done or not self._forget(up):
            return
        si = self.s.stream_info
        si.upstream_transport_failure_reason = reason
        if flag != "UO" and self._maybe_retry_reset("connect-failure", up):
            return
        if self._others_pending():
            return  # an earlier (hedged) attempt may still answer
        if host is not None:
            host.rq_error += 1  # (Envoy's chargeUpstreamAbort: the host's rq_error)
        self._fail(*connect_failure(reason, flag))

    def on_upstream_headers(self, up, headers: Headers, end_stream: bool):
        if self.done:
            return
        if up is not self.upstream and not (self.others and up in self.others):
            return  # an attempt already dropped
        status = int(headers._h[0][1])
        c = self.cluster
        retry = self.retry
        if retry is not None and not self.response_started:
            would = retry.should_retry_status(status, headers) or (
                self.grpc and grpc_retry(retry, headers))
            if up.retried:
                # a hedged attempt that already has its retry: Envoy would not retry it again
                could_not_retry = would
            else:
                st = self._retry_outcome(would, retry.reset_interval(headers) if would and retry.rate_limited_backoff
                                         else None)
                if st == R_YES:
                    charge_retried(c, status, up.host, headers if self.grpc else None)
                    self._drop(up)
                    return
                could_not_retry = st != R_NO
            if could_not_retry and self._others_pending(up):
                # another attempt may still give a better answer: wait for it (Envoy charges
                # no code for this response; outlier detection still sees it)
                put_response(up.host, status, headers if self.grpc else None)
                self._drop(up)
                return
        self._choose(up)
        if self.s.tunneling and status != 101 and handshake_failed(self, up, headers, status):
            return
        self.response_started = True
        self.s.stream_info.response_code_details = "via_upstream"
        c.count_response(status, up.host, headers if self.grpc else None)
        if self.s.ctl is not None:  # (an internal request: cluster/code_stats.py)
            charge_internal(c, status, self.s.ctl)
        # (Envoy: x-envoy-upstream-service-time only once the request was complete)
        finalize_response(self.route, headers, self.start, self.cfg.suppress_envoy_headers or not self.request_complete,
                          self.s.stream_info, self.choice, self.headers)
        if self.route.include_attempt_count_in_response:  # (Envoy: not suppressed by suppress_envoy_headers)
            headers.set("x-envoy-attempt-count", str(self.attempts))
        if end_stream:
            self._complete()
        self.s.encode_headers(headers, end_stream)

    def on_upstream_data(self, up, data: bytes, end_stream: bool):
        if self.done or up is not self.upstream:
            return
        if end_stream:
            enc = up.encoder
            if enc is not None and getattr(enc, "open_tunnel", False):
                # the upstream half-closed an upgraded connection: it is closed (locally, its
                # request still active: Envoy's count) when this stream goes (on_destroy)
                self.tunnel_enc = enc
            self._complete()
        self.s.encode_data(data, end_stream)

    def on_upstream_trailers(self, up, trailers):
        if self.done or up is not self.upstream:
            return
        self._complete()
        self.s.encode_trailers(trailers)

    def on_upstream_reset(self, up, reason: str):
        if self.done or not self._forget(up):
            return
        count_rx_reset(self.cluster, reason)
        if not self.response_started:
            if self._maybe_retry_reset("refused-stream" if reason == "remote refused stream reset" else "reset", up):
                return
            if self._others_pending():
                return
            if up.host is not None:
                up.host.rq_error += 1  # (as on_pool_failure)
            self._fail(*reset_failure(reason))
            return
        si = self.s.stream_info
        si.response_flags.add(reset_flag(reason))
        # (Envoy's details name the reset, not via_upstream, once the response started)
        si.response_code_details = "upstream_reset_after_response_started{%s}" % reason.replace(" ", "_")
        self._done()
        self.s.reset_stream(si.response_code_details)

    def on_per_try_timeout(self, up):
        self.attempt_timed_out(up, "st_rq_per_try_timeout", "upstream_per_try_timeout", self.hedge)

    # -- endings ------------------------------------------------------------------------------------
    def _direct_reply(self, status, body, headers):
        s = self.s
        b = body or b""
        if (headers.get("content-type") or "").startswith("application/grpc"):  # (a gRPC reply, as Envoy's)
            extra = Headers([])  # (with the route's response headers, as Envoy's)
            self.route.finalize_response_headers(extra, s.stream_info, None, headers)
            return s.send_local_reply(status, b, "direct_response", headers=dict(extra.items()))
        h = Headers([(":status", str(status))])
        if b:
            h.add("content-length", str(len(b)))
            h.add("content-type", "text/plain")
        self.route.finalize_response_headers(h, s.stream_info, None, headers)
        h.add("date", _date_now())
        s.stream_info.response_code_details = "direct_response"
        if b and headers.get(":method") != "HEAD":
            s.encode_headers(h, False)
            s.encode_data(b, True)
        else:
            s.encode_headers(h, True)

    def _fail(self, status, body, details, flag):
        """A local reply for an upstream failure; the retry state says if it was exhausted."""
        if self.done:
            return
        body = charge_failure(self.cluster, status, body, flag, self.s.stream_info, self.attempts, self.s.ctl)
        self._done()
        extra = OVERLOADED if flag == "UO" and not self.cfg.suppress_envoy_headers else None
        if self.attempts and self.route.include_attempt_count_in_response:
            extra = dict(extra or (), **{"x-envoy-attempt-count": str(self.attempts)})
        self.s.send_local_reply(status, body, details, flag=flag, headers=extra)

    def _complete(self):
        c = self.cluster
        c.st_rq_time.record((time.monotonic() - self.start) * 1000.0)
        self._done()

    def _done(self):
        if self.done:
            return
        self.done = True
        self._cleanup()
        self.upstream = None  # no Router <-> UpstreamRequest cycle left for the GC

    def _cleanup(self):
        if self.shadows:
            # the request will not be read further: unfinished mirrors stop (complete ones go on)
            for sh in self.shadows:
                sh.downstream_gone()
            self.shadows = ()
        if self.timing:
            self.s.deadline = None
        if self.retry_timer is not None:
            self.retry_timer.cancel()
            self.retry_timer = None
            self.cluster.retries_in_backoff -= 1
        if self.retry_held:
            self._release_retry()
        if self.others:
            self._abandon_others(None)
        up = self.upstream
        if up is not None and not self.done:
            up.abandon()
            self.upstream = None
        if getattr(self, "upstream_rq_counted", False):
            self.upstream_rq_counted = False
            c = self.cluster
            c.rq_active_total -= 1
            c.st_rq_active.dec()

    def on_local_reply(self):
        """The stream answered locally (e.g. timeout): stop talking upstream."""
        up = self.upstream
        if up is not None and not self.response_started:
            up.abandon()
            self.upstream = None
        self._done()

    def on_downstream_reset(self):
        up = self.upstream
        if up is not None:
            if up.abandon():  # (an HTTP/2 stream reset; an HTTP/1.1 request's connection just closes)
                self.cluster.st_rq_tx_reset.value += 1
            self.upstream = None
        self._done()

    # -- flow control -------------------------------------------------------------------------------
    def on_downstream_watermark(self, above: bool):
        """The downstream write buffer is full/drained: stop/resume reading the upstream response."""
        up = self.upstream
        if up is not None:
            if above:
                up.on_above_write_buffer_high_watermark()
            else:
                up.on_below_write_buffer_low_watermark()

    def on_upstream_watermark(self, above: bool):
        """The upstream connection's write buffer is full/drained: stop/resume reading downstream."""
        self.s.read_disable(above)


def _date_now():
    return time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime())
