"""Upstream HTTP/2: multiplexed connections per host, same interface as ``Http1Pool``.

``pool.new_stream(cb)`` binds ``cb`` to a stream on a connection with a free stream slot (the
peer's SETTINGS_MAX_CONCURRENT_STREAMS, capped by ours) or queues it; a new connection is opened
when the slots run out, within the cluster's circuit breakers. The stream object handed to
``cb.on_pool_ready`` is the request encoder; the response comes back through
``cb.on_upstream_headers/data/trailers/reset`` and ``on_upstream_watermark``.

A REFUSED_STREAM reset, and a request the peer did not process (beyond a GOAWAY's
last-stream-id), go to the request's router as a refused stream, which retries it only when its
retry policy says so (as Envoy's). A connection whose GOAWAY was parsed takes no new stream. Connections close after
``max_requests_per_connection`` streams, after ``idle_timeout`` without streams, or when the pool
drains.
"""

from __future__ import annotations

import asyncio
import collections

import h2.exceptions
from h2.errors import ErrorCodes

from ..http.h2_client import REFUSED, REMOTE_RESET, TERMINATED, H2ClientStream, Http2ClientCodec
from ..http.h2_common import H2Options, H2Stats
from .pool import CONNECT_FAILURE, CONNECT_TIMEOUT, PoolBase, PendingRequest, attach_transport

def cluster_options(cluster) -> H2Options:
    o = getattr(cluster, "h2_compiled_options", None)
    if o is None:
        po = getattr(cluster, "protocol_options", None)
        o = H2Options(getattr(po, "http2_options", None), 80 * 1024, getattr(po, "max_headers_count", 100))
        try:
            cluster.h2_compiled_options = o
        except AttributeError:
            pass
    return o


class H2UpstreamConnection(Http2ClientCodec, asyncio.Protocol):
    """One upstream HTTP/2 connection of a pool: the transport, the stream slots, idle and
    SETTINGS timers; the protocol is ``Http2ClientCodec``'s."""

    __slots__ = ("pool", "host", "transport", "h2", "streams", "bound", "closed", "write_paused",
                 "blocked", "max_frame", "max_fields", "stream_high", "requests", "idle_handle", "idle_since",
                 "flush_handle",
                 "local_address", "goaway", "draining", "max_streams", "loop", "ready", "ready_timer", "lean",
                 "extended_connect", "tx_counter", "max_requests", "is_tls", "st_tx_reset", "st_rx_reset")

    def __init__(self, pool, host):
        self.pool = pool
        self.host = host
        self.loop = pool.loop
        cluster = pool.cluster
        opts = cluster_options(cluster)
        self._init_codec(opts, cluster.buffer_limit, cluster.st_cx_tx_bytes)
        self.bound = 0  # streams holding a slot (with or without headers sent)
        self.requests = 0
        self.idle_handle = None  # the idle timer, left armed while streams come and go (see Http2Pool._idle)
        self.idle_since = 0.0  # when the last stream ended
        self.local_address = ""
        self.draining = False
        self.max_streams = opts.max_concurrent_streams
        self.max_requests = cluster.max_requests_per_connection
        self.ready_timer = None
        self.is_tls = True  # (until connected: over TLS when the transport has a TLS layer)
        st = cluster.__dict__.get("h2_codec_stats")
        if st is None:  # (cluster.<c>.http2.*, made with the cluster's first HTTP/2 connection, as Envoy's)
            st = cluster.h2_codec_stats = H2Stats(cluster.scope)
        self.st_tx_reset = st.tx_reset  # (RST_STREAM sent / received: see Http2ClientCodec)
        self.st_rx_reset = st.rx_reset

    # -- capacity -----------------------------------------------------------------------------------
    def capacity(self) -> int:
        if self.closed or self.goaway or self.draining or not self.ready or self.h2.goaway_received:
            return 0  # (goaway_received: parsed, though not yet handled in the current batch of events)
        peer = self.h2.remote_settings.max_concurrent_streams
        ours = self.max_streams
        n = (peer if peer < ours else ours) - self.bound
        mr = self.max_requests
        if mr and mr - self.requests < n:
            return mr - self.requests
        return n

    # -- asyncio.Protocol ---------------------------------------------------------------------------
    def connection_made(self, transport):
        attach_transport(self, transport)
        self.is_tls = getattr(transport, "tls", None) is not None
        transport.write(self.h2.data_to_send())
        # streams wait for the peer's SETTINGS (a strict server treats streams beyond its limit as a
        # connection error); a peer that never sends them fails like a connect timeout
        self.ready_timer = self.loop.call_later(self.pool.cluster.connect_timeout or 5.0, self._not_ready)

    def _not_ready(self):
        self.ready_timer = None
        if not self.ready and not self.closed:
            self.close(None, timed_out=True)

    def data_received(self, data):
        if self.closed:
            return
        self.pool.cluster.st_cx_rx_bytes.value += len(data)
        self.feed(data)

    def connection_lost(self, exc):
        self.close(TERMINATED if exc is not None else REMOTE_RESET, lost=True)

    # -- the codec's hooks --------------------------------------------------------------------------
    def _replay_elsewhere(self, s) -> None:
        """Take a stream the peer did not process off this connection and requeue it."""
        self.streams.pop(s.sid, None)
        self.blocked.discard(s)
        self.bound -= 1
        self.pool.stream_unbound(self)
        s.conn = None
        s.sid = 0
        s.headers_sent = False
        self.pool.requeue(s)

    def _stream_failed(self) -> None:
        self.pool.cluster.report_connect_failure(self.host)

    def _peer_ready(self) -> None:
        if self.ready_timer is not None:
            self.ready_timer.cancel()
            self.ready_timer = None
        self.pool.on_ready(self)

    def _peer_capacity(self) -> None:
        self.pool.on_capacity(self)

    def _goaway_received(self) -> None:
        self.pool.on_goaway(self)
        if not self.bound:
            self.close(None)

    # -- stream bookkeeping -------------------------------------------------------------------------
    def attach(self, s) -> None:
        if self.idle_handle is not None:
            self.idle_handle.cancel()
            self.idle_handle = None
        self.bound += 1
        self.requests += 1
        s.conn = self
        s.is_tls = self.is_tls

    def stream_done(self, s) -> None:
        self.streams.pop(s.sid, None)  # (a stream that never got an id has 0: never a key)
        self.bound -= 1
        self.pool.stream_released(self)

    def close(self, reason, lost: bool = False, timed_out: bool = False) -> None:
        first = not self.closed
        self.closed = True
        active = bool(self.bound)
        if self.ready_timer is not None:
            self.ready_timer.cancel()
            self.ready_timer = None
        if timed_out:
            self.pool.settings_timeout = True
        self.flush_handle = None
        if self.idle_handle is not None:
            self.idle_handle.cancel()
            self.idle_handle = None
        if not lost and self.transport is not None and first:
            try:
                self.h2.close_connection(ErrorCodes.NO_ERROR)
                self.transport.write(self.h2.data_to_send())
            except Exception:
                pass
            self.transport.close()
        # the streams the connection's end fails free their slots here (they never reach
        # stream_done): the host's and the cluster's attached requests (max_requests) with them
        n = sum(1 for st in self.streams.values() if not st.closed)
        self._fail_streams(reason)
        if n:
            self.bound -= n
            self.host.rq_active -= n
            self.pool.cluster.rq_attached -= n
        if lost:
            self.pool.on_connection_closed(self, first and not timed_out, active)


class Http2Pool(PoolBase):
    """Multiplexed HTTP/2 connections to one host."""

    is_http2 = True

    __slots__ = ("cluster", "host", "loop", "conns", "pending", "connecting", "draining", "settings_timeout",
                 "transport")

    def __init__(self, cluster, host, loop):
        self.cluster = cluster
        self.host = host
        self.loop = loop
        self.transport = None
        self.conns: list = []  # connected and not closed
        self.pending = collections.deque()
        self.connecting = 0  # connections without the peer's SETTINGS yet
        self.draining = False
        self.settings_timeout = False

    def new_stream(self, cb):
        c = self.cluster
        for conn in self.conns:
            if conn.capacity() > 0:
                if c.rq_attached >= c.max_requests:
                    self._overflow(cb)
                else:
                    self._bind(conn, H2ClientStream(cb))
                return None
        if c.pending_total >= c.max_pending_requests:
            return self._pending_overflow(cb)
        p = PendingRequest(cb)
        self._queue(p)
        if self.connecting == 0:
            if c.cx_total_active >= c.max_connections:
                c.st_cx_overflow.value += 1
                if not self.conns:
                    self._connect()  # (a pool without a connection opens one at the limit too, as Envoy's)
            else:
                self._connect()
        return p

    def _fail(self, p, reason, flag):
        if flag == "UF":
            self.cluster.report_connect_failure(self.host)
        s = p.stream
        if s is not None:
            if not s.closed:
                s.closed = True
                s.cb.on_upstream_reset(REFUSED)
        else:
            p.cb.on_pool_failure(reason, flag, self.host)

    def _bind(self, conn, s):
        # (an armed idle timer stays: it finds the connection busy, see _idle)
        conn.bound += 1
        conn.requests += 1
        s.conn = conn  # (``conn.attach(s)``)
        s.is_tls = conn.is_tls
        c = self.cluster
        c.st_rq_total.value += 1
        c.rq_attached += 1
        h = self.host
        h.rq_active += 1
        h.rq_total += 1
        if h.outlier is not None:
            c.report_connect_success(h)
        s.cb.on_pool_ready(s, h)

    def requeue(self, s) -> None:
        """A stream the peer refused or did not process goes to the front of the queue."""
        h = self.host
        h.rq_active -= 1
        self.cluster.rq_attached -= 1
        p = PendingRequest(s.cb)
        p.stream = s
        self._queue(p, front=True)
        self._dispatch()
        if self.pending and self.connecting == 0 and not self.draining:
            c = self.cluster
            if c.cx_total_active < c.max_connections:
                self._connect()
            elif not any(cn.capacity() > 0 for cn in self.conns):
                c.st_cx_overflow.value += 1
                if not self.conns:
                    self._connect()

    def _dispatch(self) -> None:
        """Hand queued requests to connections with free slots."""
        pending = self.pending
        if not pending:
            return
        for conn in self.conns:
            n = conn.capacity()
            while n > 0 and pending:
                p = pending.popleft()
                self._pending_done()
                if p.cancelled:
                    continue
                s = p.stream
                if s is not None:
                    if s.cancelled or s.closed:
                        continue
                    conn.attach(s)  # (a replay: admitted when first attached)
                    c = self.cluster
                    c.st_rq_total.value += 1
                    c.rq_attached += 1
                    self.host.rq_active += 1
                    self.host.rq_total += 1
                    try:
                        s.replay_on(conn)
                    except h2.exceptions.ProtocolError as e:
                        s._local_failure(e)
                else:
                    c = self.cluster
                    if c.rq_attached >= c.max_requests:
                        self._overflow(p.cb)
                        continue
                    self._bind(conn, H2ClientStream(p.cb))
                n -= 1
            if not pending:
                return

    def _new_connection(self):
        return H2UpstreamConnection(self, self.host)

    def _connected(self, conn) -> None:
        # the connection counts as connecting until the peer's SETTINGS arrive (on_ready)
        if self.draining:
            conn.close(None)  # connection_lost accounts for it

    def on_ready(self, conn) -> None:
        """The peer's SETTINGS arrived: the connection takes streams."""
        self.connecting -= 1
        if self.draining:
            conn.close(None)
            conn.ready = False
            self.connecting += 1  # undone by on_connection_closed
            return
        c = self.cluster
        self.conns.append(conn)
        self._dispatch()
        if self.pending and self.connecting == 0 and c.cx_total_active < c.max_connections:
            self._connect()
        if not conn.bound:
            self._idle(conn)

    def _connect_failed(self, reason, timeout: bool):
        self._count_connect_failure(timeout)
        if self.connecting or any(cn.capacity() > 0 for cn in self.conns):
            return
        # nothing else will serve the queue: fail every waiting request
        pending, self.pending = self.pending, collections.deque()
        for p in pending:
            self._pending_done()
            if not p.cancelled:
                self._fail(p, reason, "UF")

    # -- connection callbacks -------------------------------------------------------------------------
    def stream_unbound(self, conn) -> None:
        self.host.rq_active -= 0  # accounted again by requeue()

    def stream_released(self, conn) -> None:
        self.host.rq_active -= 1
        self.cluster.rq_attached -= 1
        if self.pending:
            self._dispatch()
        if not conn.bound:
            mr = self.cluster.max_requests_per_connection
            if conn.goaway or conn.draining or self.draining or (mr and conn.requests >= mr):
                if mr and conn.requests >= mr:
                    self.cluster.st_cx_max_rq.value += 1
                conn.close(None)
                self._remove(conn)
            else:
                self._idle(conn)

    def on_capacity(self, conn) -> None:
        if self.pending:
            self._dispatch()
            if self.pending and self.connecting == 0:
                c = self.cluster
                if c.cx_total_active < c.max_connections:
                    self._connect()

    def on_goaway(self, conn) -> None:
        self._remove(conn, keep_counted=True)
        if self.pending:
            self._dispatch()
            if self.pending and self.connecting == 0 and not self.draining:
                c = self.cluster
                if c.cx_total_active - 1 < c.max_connections:
                    self._connect()

    def _idle(self, conn) -> None:
        """The connection's last stream ended: it closes after ``idle_timeout`` without streams.
        The timer is not cancelled when a stream comes (a busy connection would create and cancel
        one per request): when it fires, a busy connection is left alone, and one that went
        idle again meanwhile waits out the rest of its own idle time."""
        it = self.cluster.idle_timeout
        if it and not conn.closed:
            conn.idle_since = self.loop.time()
            if conn.idle_handle is None:
                conn.idle_handle = self.loop.call_later(it, self._idle_close, conn)

    def _idle_close(self, conn) -> None:
        conn.idle_handle = None
        if conn.bound or conn.closed:
            return  # busy: the next time it goes idle arms the timer again
        left = conn.idle_since + self.cluster.idle_timeout - self.loop.time()
        if left > 0.001:
            conn.idle_handle = self.loop.call_later(left, self._idle_close, conn)
            return
        self.cluster.st_cx_idle.value += 1
        conn.close(None)
        self._remove(conn)

    def _remove(self, conn, keep_counted: bool = False) -> None:
        try:
            self.conns.remove(conn)
        except ValueError:
            pass

    def on_connection_closed(self, conn, remote: bool = True, active: bool = False) -> None:
        if not conn.ready:
            # closed (or timed out) before its SETTINGS: a failed connection attempt
            timeout = self.settings_timeout
            self.settings_timeout = False
            self.cluster.count_cx_destroy(remote, active)
            self._connect_failed(CONNECT_TIMEOUT if timeout else "%s (closed before SETTINGS)" % CONNECT_FAILURE,
                                 timeout=timeout)
            return
        self._remove(conn)
        self._cx_gone()
        self.cluster.count_cx_destroy(remote, active)
        if self.pending and self.connecting == 0 and not self.draining:
            if any(cn.capacity() > 0 for cn in self.conns):
                self._dispatch()
            elif self.cluster.cx_total_active < self.cluster.max_connections or not self.conns:
                self._connect()

    def drain(self) -> None:
        """Close idle connections; busy ones close when their last stream ends."""
        self.draining = True
        for conn in list(self.conns):
            conn.draining = True
            if not conn.bound:
                conn.close(None)
                self._remove(conn)


class DownstreamProtocolPools:
    """``USE_DOWNSTREAM_PROTOCOL``: one HTTP/1.1 and one HTTP/2 pool for the host."""

    __slots__ = ("h1", "h2", "host")

    def __init__(self, cluster, host, loop):
        from .pool import Http1Pool
        self.host = host
        self.h1 = Http1Pool(cluster, host, loop)
        self.h2 = Http2Pool(cluster, host, loop)

    def drain(self) -> None:
        self.h1.drain()
        self.h2.drain()
