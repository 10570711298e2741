"""Request mirroring for the router (``RouteAction.request_mirror_policies``, Istio's
VirtualService ``mirror``): Envoy's shadow writer.

A mirrored request is a copy of the routed request (after the route's header mutations and
rewrites) with the host changed by the policy (``MirrorPolicy.shadow_headers``), sent to the
mirror cluster's own host, connection pool and circuit breakers. It is fire and forget:

- it starts with the main request and streams its body along as the body arrives;
- its response is read and thrown away (only the cluster's ``upstream_rq_<code>`` stats see it);
- nothing it does reaches the main request: a failure, a reset or a slow mirror ends the mirror
  alone;
- memory is bounded by the request's buffer limit (the listener's, or the route's
  ``per_request_buffer_limit_bytes`` when smaller). While the mirror's connection is being opened,
  a body past the limit pauses reading the request, as Envoy's shadow stream does (bounded by the
  connect timeout). Once connected, a mirror that cannot keep up (its socket above the high
  watermark with a full buffer) is abandoned instead, where Envoy would slow the main request
  down: a slow mirror never slows the main request (``cluster.<main>.retry_or_shadow_abandoned``
  counts it, as Envoy counts the shadows it gives up);
- it ends at the route's timeout (Envoy gives the shadow the route's global timeout), or when the
  main request is reset before its body was complete (Envoy cancels unfinished shadow streams).
"""

from __future__ import annotations

import logging
import random
import socket

from ...cluster.lb import LbContext

log = logging.getLogger("pyproxy.router")

_NO_CTX = LbContext()


def local_address() -> str:
    """The address Envoy's local info reports (its first non-loopback address), appended to a
    mirror's ``x-forwarded-for`` as Envoy's async client does. Found once, at config load."""
    global _LOCAL
    if _LOCAL is None:
        addr = "127.0.0.1"
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.connect(("198.51.100.1", 9))  # no packet is sent: only the route is looked up
            addr = s.getsockname()[0]
        except OSError:
            pass
        finally:
            s.close()
        _LOCAL = addr
    return _LOCAL


_LOCAL = None


class ShadowRequest:
    """One mirrored request; the pool's stream callbacks and the response sink in one object."""

    __slots__ = ("cluster", "host", "headers", "pending", "encoder", "buf", "buf_len", "trailers",
                 "complete", "done", "timer", "limit", "above", "main_cluster", "counted",
                 "stream", "holding")

    def __init__(self, cluster, headers, limit: int, main_cluster, stream):
        self.cluster = cluster
        self.host = None
        self.headers = headers
        self.pending = None
        self.encoder = None
        self.buf = None
        self.buf_len = 0
        self.trailers = None
        self.complete = False  # the whole request was handed to us
        self.done = False
        self.timer = None
        self.limit = limit
        self.above = False
        self.main_cluster = main_cluster
        self.counted = False
        self.stream = stream  # the main request's stream, to pause reading it while connecting
        self.holding = False

    # -- started and fed by the router -----------------------------------------------------------
    def start(self, end_stream: bool, timeout: float, loop, downstream_h2: bool) -> None:
        c = self.cluster
        self.complete = end_stream
        host = self.host = c.choose_host(_NO_CTX)
        if host is None:
            c.st_cx_none_healthy.value += 1
            self.done = True
            return
        c.rq_active_total += 1
        c.st_rq_active.inc()
        self.counted = True
        if timeout:
            self.timer = loop.call_later(timeout, self._on_timeout)
        pool = c.http_pool(host, downstream_h2)
        self.pending = pool.new_stream(self)

    def send_data(self, data: bytes, end_stream: bool) -> None:
        if self.done:
            return
        if end_stream:
            self.complete = True
        enc = self.encoder
        if enc is not None and not self.above:
            enc.encode_data(data, end_stream)
            return
        if self.buf is None:
            self.buf = []
        self.buf.append(data)
        self.buf_len += len(data)
        if self.buf_len > self.limit:
            if enc is not None:
                self.abandon(count=True)  # connected, but not keeping up
            elif not self.holding:
                self.holding = True
                self.stream.read_disable(True)

    def send_trailers(self, trailers) -> None:
        if self.done:
            return
        self.complete = True
        enc = self.encoder
        if enc is not None and not self.above and not self.buf:
            enc.encode_trailers(trailers.copy())
        else:
            self.trailers = trailers.copy()

    def downstream_gone(self) -> None:
        """The main request ended early (reset or local reply): a mirror still waiting for body
        bytes can never finish, so it stops (a complete one carries on)."""
        if not self.complete:
            self.abandon()

    # -- pool callbacks ------------------------------------------------------------------------------
    def on_pool_ready(self, encoder, host):
        self.pending = None
        if self.done:
            encoder.reset()
            return
        self.encoder = encoder
        self.above = bool(getattr(encoder, "write_paused", False))
        buf = self.buf
        enc_end = self.complete and not buf and self.trailers is None
        encoder.encode_headers(self.headers, enc_end)
        self.headers = None
        if self.encoder is None:
            return  # answered and finished inside encode_headers
        self._flush()
        self._release()

    def _release(self):
        if self.holding:
            self.holding = False
            self.stream.read_disable(False)

    def on_pool_failure(self, reason, flag, host):
        self.pending = None
        self._finish()

    def _flush(self):
        enc = self.encoder
        buf = self.buf
        if buf:
            self.buf = None
            self.buf_len = 0
            enc.encode_data(b"".join(buf), self.complete and self.trailers is None)
        if self.trailers is not None and self.encoder is not None:
            t, self.trailers = self.trailers, None
            enc.encode_trailers(t)

    # -- the response: counted, then dropped ---------------------------------------------------------
    def on_upstream_headers(self, headers, end_stream):
        if self.done:
            return
        try:
            self.cluster.count_response(int(headers._h[0][1]), self.host)  # (outlier detection too)
        except (ValueError, IndexError):
            pass
        if end_stream:
            self._finish()

    def on_upstream_data(self, data, end_stream):
        if end_stream:
            self._finish()

    def on_upstream_trailers(self, trailers):
        self._finish()

    def on_upstream_reset(self, reason):
        self.encoder = None
        if not self.done:
            self.cluster.st_rq_rx_reset.value += 1
        self._finish()

    def on_upstream_watermark(self, above: bool):
        """The mirror's connection cannot take more now: body bytes wait here (bounded)."""
        self.above = above
        if not above and not self.done and self.encoder is not None and (self.buf or self.trailers):
            self._flush()

    # -- endings ---------------------------------------------------------------------------------------
    def _on_timeout(self):
        self.timer = None
        if not self.done:
            self.cluster.st_rq_timeout.value += 1
            self.abandon()

    def abandon(self, count: bool = False) -> None:
        if self.done:
            return
        if count:
            st = getattr(self.main_cluster, "st_retry_or_shadow_abandoned", None)
            if st is not None:
                st.value += 1
        if self.pending is not None:
            self.pending.cancel()
            self.pending = None
        enc = self.encoder
        self.encoder = None
        self._finish()
        if enc is not None:
            enc.reset()

    def _finish(self):
        if self.done:
            self.encoder = None
            return
        self.done = True
        self._release()
        self.stream = None
        self.encoder = None
        self.buf = None
        self.trailers = None
        self.headers = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.counted:
            self.counted = False
            c = self.cluster
            c.rq_active_total -= 1
            c.st_rq_active.dec()


def start_shadows(router, route, headers, end_stream: bool):
    """The mirrors of one routed request (Envoy: chosen per request by ``runtime_fraction``; never
    for CONNECT, and pyproxy also never mirrors an upgrade). Returns a tuple of the started ones
    that still wait for the body (possibly empty)."""
    if headers.get(":method") == "CONNECT" or "upgrade" in headers:
        return ()
    s = router.s
    cm = router.cfg.cm
    out = []
    rv = None
    limit = s.hc.conn.listener.buffer_limit
    rl = route.per_request_buffer_limit_bytes
    if rl is not None and rl < limit:
        limit = max(rl, 1)
    for p in route.mirror_policies:
        if p.denominator != 1 or p.numerator != 1:
            if rv is None:
                rv = random.getrandbits(32)
            if not p.sampled(rv):
                continue
        name = p.cluster_name(headers)
        if not name:
            continue
        c = cm.get(name)
        if c is None or c.original_dst:
            # Envoy: the mirror cluster is gone (CDS removal): no shadow. (An ORIGINAL_DST
            # cluster has no host to pick for a copy: not mirrored either.)
            continue
        sh = p.shadow_headers(headers, s.stream_info)
        xff = sh.get("x-forwarded-for")
        la = router.cfg.local_address
        sh.set("x-forwarded-for", la if not xff else xff + "," + la)
        req = ShadowRequest(c, sh, limit, router.cluster, s)
        try:
            req.start(end_stream, router.timeout, router.cfg.loop, s.hc.is_h2)
        except Exception:  # a mirror must never fail the main request
            log.exception("mirror to cluster '%s' failed to start", name)
            req.abandon()
            continue
        if not req.done and not end_stream:
            out.append(req)
    return tuple(out)
