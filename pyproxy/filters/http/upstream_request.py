"""One attempt of the router filter (``router.py``): the connection pool's callbacks and the
response decoder for the bound upstream connection, reporting to its ``Router``."""

from __future__ import annotations

from ...cluster.pool import UpstreamConnection
from ...transport import upstream_tls_sans


class UpstreamRequest:
    """One attempt: pool callbacks plus the response decoder for the bound connection."""

    __slots__ = ("router", "host", "encoder", "pending", "abandoned", "per_try_timer", "read_off",
                 "retried", "idle_timer")

    def __init__(self, router, host):
        self.router = router
        self.host = host
        self.encoder = None
        self.pending = None
        self.abandoned = False
        self.per_try_timer = self.idle_timer = None  # (idle: the retry policy's per_try_idle_timeout)
        self.read_off = False
        self.retried = False  # hedging: a retry was started for this attempt, it keeps running

    # pool callbacks
    def on_pool_ready(self, encoder, host):
        if self.abandoned:
            encoder.reset()
            return
        self.encoder = encoder
        self.pending = None
        r = self.router
        if r.s.hc.conn.write_paused:
            self.read_off = True
            encoder.read_disable(True)
        si = r.s.stream_info
        si.upstream_local_address = getattr(encoder, "local_address", "")
        sans = upstream_tls_sans(encoder)
        if sans is not None:
            si.upstream_peer_uri_san, si.upstream_local_uri_san, si.upstream_ssl = sans
        r.on_pool_ready(self, encoder)

    def on_pool_failure(self, reason, flag, host):
        self.pending = None
        if not self.abandoned:
            self.router.on_pool_failure(self, reason, flag, host)

    # response decoder (at the response's end the link to the encoder is dropped: an HTTP/2
    # upstream stream points back at us, and the pair must not wait for a GC pass)
    def on_upstream_headers(self, headers, end_stream):
        if end_stream:
            self._release_timers()
        elif self.idle_timer is not None:
            self._idle_restart()
        self.router.on_upstream_headers(self, headers, end_stream)
        if end_stream:
            self.encoder = None

    def on_upstream_data(self, data, end_stream):
        if end_stream:
            self._release_timers()
        elif self.idle_timer is not None:
            self._idle_restart()
        self.router.on_upstream_data(self, data, end_stream)
        if end_stream:
            self.encoder = None

    def on_upstream_trailers(self, trailers):
        self._release_timers()
        self.router.on_upstream_trailers(self, trailers)
        self.encoder = None

    def on_upstream_reset(self, reason):
        self._release_timers()
        if not self.abandoned:
            self.router.on_upstream_reset(self, reason)
        self.encoder = None

    def on_upstream_watermark(self, above: bool):
        if not self.abandoned:
            self.router.on_upstream_watermark(above)

    def on_per_try_timeout(self):
        self.per_try_timer = None
        self.router.on_per_try_timeout(self)

    def on_per_try_idle_timeout(self):
        self.idle_timer = None
        self.router.on_per_try_idle_timeout(self)

    def _idle_restart(self):
        """Response bytes came: the per-try idle timeout starts again."""
        self.idle_timer.cancel()
        r = self.router
        self.idle_timer = r.cfg.loop.call_later(r.retry.per_try_idle_timeout, self.on_per_try_idle_timeout)

    # request body streaming
    def send_data(self, data, end_stream):
        enc = self.encoder
        if enc is not None:
            enc.encode_data(data, end_stream)

    def send_trailers(self, trailers):
        enc = self.encoder
        if enc is not None:
            enc.encode_trailers(trailers)

    # downstream watermarks (response direction)
    def on_above_write_buffer_high_watermark(self):
        enc = self.encoder
        if enc is not None and not self.abandoned:
            self.read_off = True
            enc.read_disable(True)

    def on_below_write_buffer_low_watermark(self):
        enc = self.encoder
        if enc is not None and self.read_off:
            self.read_off = False
            enc.read_disable(False)

    def _release_timers(self):
        if self.per_try_timer is not None:
            self.per_try_timer.cancel()
            self.per_try_timer = None
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None

    def abandon(self):
        """Stop this attempt: cancel a queued request or reset the bound connection. True when
        an HTTP/2 stream was reset (an HTTP/1.1 request's connection is closed: no stream reset)."""
        if self.abandoned:
            return False
        self.abandoned = True
        self._release_timers()
        if self.pending is not None:
            self.pending.cancel()
            self.pending = None
        enc = self.encoder
        if enc is not None:
            self.encoder = None
            enc.reset()
            return not isinstance(enc, UpstreamConnection)
        return False
