"""CONNECT termination: the router's upstream for a route with ``upgrade_configs: [{upgrade_type:
CONNECT, connect_config: {}}]`` (Istio's ``connect_terminate`` shape), as Envoy's TCP upstream
(``TcpUpstream``): the request's bytes go to the chosen host over a plain TCP connection (the
cluster's transport socket), the CONNECT's headers are not sent; once connected the client is
answered ``200`` (the router's response path: ``upstream_rq_200``, the route's response headers),
and the bytes flow both ways. A half-close goes through in both directions (the request's end is
a FIN upstream, the upstream's FIN ends the response); an abort is a ``connection termination``
reset (flag UC). A connect failure is the pool failure the router answers (503 UF, UO at the
cluster's ``max_connections``).

One connection per request, made here (Envoy's TCP pool does not reuse a tunnel's connection).
The pieces the router knows: ``connect(router, up, host)`` returns a pending handle (``cancel``)
and later calls ``up.on_pool_ready(encoder, host)`` / ``up.on_pool_failure``; the encoder
(``TcpUpstream``) takes ``encode_headers/data/trailers``, ``reset``, ``read_disable``.
"""

from __future__ import annotations

import asyncio

from ... import writebatch
from ...cluster.pool import CONNECT_TIMEOUT, OVERFLOW, connect_error, open_socket
from ...http.headers import Headers
from ...transport import connect_upstream


class _Pending:
    __slots__ = ("task", "cancelled")

    def __init__(self):
        self.task = None
        self.cancelled = False

    def cancel(self):
        self.cancelled = True
        t = self.task
        if t is not None:
            self.task = None
            t.cancel()


def connect(router, up, host):
    """Open the tunnel's connection to ``host`` for the attempt ``up``; None when it failed at once."""
    c = router.cluster
    if c.cx_total_active >= c.max_connections:
        c.st_cx_overflow.value += 1
        up.on_pool_failure(OVERFLOW, "UO", host)
        return None
    c.cx_total_active += 1
    c.st_cx_total.value += 1
    c.st_cx_active.inc()
    host.cx_active += 1
    host.cx_total += 1
    p = _Pending()
    loop = router.cfg.loop
    p.task = loop.create_task(_connect(loop, c, host, up, p, router.s.hc.conn.listener.buffer_limit))
    return p


async def _connect(loop, c, host, up, p, limit):
    t = TcpUpstream(c, host, up, limit)
    try:
        sock = await open_socket(loop, host, c.connect_timeout, c.source_address, c.tcp_keepalive)
        await connect_upstream(loop, c.transport_for(host), sock, t, c)
    except (OSError, asyncio.TimeoutError) as e:
        p.task = None
        _gone(c, host)
        c.st_cx_connect_fail.value += 1
        host.cx_connect_fail += 1
        timeout = isinstance(e, asyncio.TimeoutError)
        if timeout:
            c.st_cx_connect_timeout.value += 1
        c.report_connect_failure(host)
        if not p.cancelled:
            s = up.router.s
            if s.hc.is_h2 and s.encoder is not None:
                s.encoder.tunnel = 3  # (Envoy resets such a stream with CONNECT_ERROR after its 503)
            up.on_pool_failure(CONNECT_TIMEOUT if timeout else "delayed connect error: %s" % connect_error(e),
                               "UF", host)
        return
    p.task = None
    if host.outlier is not None:
        c.report_connect_success(host)
    if p.cancelled:
        t.reset()
        return
    c.st_rq_total.value += 1
    host.rq_total += 1
    t.bound = True
    up.on_pool_ready(t, host)
    if up.encoder is t:
        # Envoy's TCP upstream answers for the connection: a 200, the tunnel is open
        up.on_upstream_headers(Headers([(":status", "200")]), False)


def _gone(c, host):
    c.cx_total_active -= 1
    c.st_cx_active.dec()
    host.cx_active -= 1


class TcpUpstream(asyncio.Protocol):
    """The tunnel's upstream connection: the protocol on the socket and the router's encoder."""

    __slots__ = ("cluster", "host", "up", "transport", "closed", "local_close", "eof_sent", "bound",
                 "local_address", "limit")

    def __init__(self, cluster, host, up, limit):
        self.cluster = cluster
        self.host = host
        self.up = up
        self.transport = None
        self.closed = self.local_close = self.eof_sent = self.bound = False
        self.local_address = ""
        self.limit = limit

    @property
    def open_tunnel(self) -> bool:
        """Still open after its response ended (the router closes it when the stream goes)."""
        return not self.closed

    # -- the socket's protocol ---------------------------------------------------------------------
    def connection_made(self, transport):
        self.transport = transport
        lim = self.limit
        if lim:
            transport.set_write_buffer_limits(high=lim, low=lim // 2)
        try:
            la = transport.get_extra_info("sockname")
            self.local_address = "%s:%d" % la[:2]
        except Exception:
            pass

    def data_received(self, data):
        self.cluster.st_cx_rx_bytes.value += len(data)
        up = self.up
        if up is not None:
            writebatch.enter()
            try:
                up.on_upstream_data(data, False)
            finally:
                writebatch.leave()

    def eof_received(self):
        up = self.up
        self.up = None  # (the response is over: a later close is no reset)
        if up is not None:
            up.on_upstream_data(b"", True)
        return True  # (half-closed: what the client still sends goes on)

    def connection_lost(self, exc):
        self.closed = True
        c = self.cluster
        _gone(c, self.host)
        c.count_cx_destroy(not self.local_close, self.up is not None)
        up = self.up
        self.up = None
        if up is not None and not self.local_close:
            up.on_upstream_reset("connection termination")

    def pause_writing(self):
        up = self.up
        if up is not None:
            up.on_upstream_watermark(True)

    def resume_writing(self):
        up = self.up
        if up is not None:
            up.on_upstream_watermark(False)

    # -- the router's encoder ------------------------------------------------------------------------
    def encode_headers(self, headers, end_stream: bool) -> None:
        if end_stream:
            self._write_eof()  # (the CONNECT's headers themselves are not sent)

    def encode_data(self, data: bytes, end_stream: bool) -> None:
        t = self.transport
        if data and t is not None and not self.closed:
            t.write(data)
            self.cluster.st_cx_tx_bytes.value += len(data)
        if end_stream:
            self._write_eof()

    def encode_trailers(self, trailers) -> None:
        self._write_eof()

    def _write_eof(self):
        t = self.transport
        if t is not None and not self.closed and not self.eof_sent:
            self.eof_sent = True
            try:
                t.write_eof()
            except (OSError, RuntimeError, NotImplementedError):  # (TLS: no half-close)
                self.reset()

    def read_disable(self, disable: bool) -> None:
        t = self.transport
        if t is not None and not self.closed:
            if disable:
                t.pause_reading()
            else:
                t.resume_reading()

    def reset(self) -> None:
        """The stream is gone (or the attempt dropped): the connection closes at once."""
        self.up = None
        if not self.closed and not self.local_close:
            self.local_close = True
            t = self.transport
            if t is not None:
                t.abort()
