"""Upstream connections and per-host connection pools.

A pool hands a ready request encoder to its caller through callbacks, never a task per request:
``pool.new_stream(callbacks)`` either binds an idle connection at once or queues the request until a
connection is up. ``callbacks`` implements ``on_pool_ready(encoder, host)`` and
``on_pool_failure(reason, flag, host)`` and, once bound, the response decoder interface
(``on_upstream_headers/data/trailers/reset`` and ``on_upstream_watermark``).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import socket

from .. import writebatch
from ..http.http1_client import Http1ClientCodec

log = logging.getLogger("pyproxy.pool")
_pending = writebatch.pending  # (never rebound)

CONNECT_FAILURE = "connection failure"
CONNECT_TIMEOUT = "connection timeout"
OVERFLOW = "overflow"
LOCAL_RESET = "local reset"


def connect_error(e) -> str:
    """A failed connect's error as Envoy words it (the errno's text: ``Connection refused``)."""
    return os.strerror(e.errno) if getattr(e, "errno", None) else (e.strerror or str(e))


def tcp_keepalive(proto):
    """A cluster's ``upstream_connection_options.tcp_keepalive`` as socket options (SO_KEEPALIVE on,
    then the probe count, idle time and interval that are set; the kernel's defaults for the
    others, as Envoy's), or None."""
    if not proto.HasField("upstream_connection_options") or \
            not proto.upstream_connection_options.HasField("tcp_keepalive"):
        return None
    k = proto.upstream_connection_options.tcp_keepalive
    opts = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
    for field, opt in (("keepalive_probes", socket.TCP_KEEPCNT), ("keepalive_time", socket.TCP_KEEPIDLE),
                       ("keepalive_interval", socket.TCP_KEEPINTVL)):
        if k.HasField(field):
            opts.append((socket.IPPROTO_TCP, opt, getattr(k, field).value))
    return tuple(opts)


async def open_socket(loop, host, connect_timeout: float, source_address: str | None = None, keepalive=None):
    """A connected non-blocking socket to ``host`` (TCP or unix pipe), bounded by the timeout;
    ``keepalive``: the cluster's ``tcp_keepalive`` socket options."""
    if host.pipe:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        addr = host.pipe
    else:
        sock = socket.socket(host.family, socket.SOCK_STREAM)
        addr = (host.address, host.port)
    try:
        sock.setblocking(False)
        if not host.pipe:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for opt in keepalive or ():
                sock.setsockopt(*opt)
            if source_address:
                sock.bind((source_address, 0))
        await asyncio.wait_for(loop.sock_connect(sock, addr), connect_timeout or None)
        return sock
    except BaseException:
        sock.close()
        raise


def attach_transport(conn, transport) -> None:
    """Common set-up of an upstream connection's transport: watermarks from the cluster's buffer
    limit, and the local address (for access logs)."""
    conn.transport = transport
    lim = conn.pool.cluster.buffer_limit
    transport.set_write_buffer_limits(high=lim, low=lim // 2)
    la = transport.get_extra_info("sockname")
    if isinstance(la, tuple):
        conn.local_address = "%s:%d" % (la[0], la[1])


class UpstreamConnection(asyncio.Protocol):
    """One upstream HTTP/1.1 connection: an asyncio protocol around ``Http1ClientCodec``."""

    __slots__ = ("pool", "host", "transport", "codec", "idle_since", "requests", "closed",
                 "write_paused", "read_paused", "stream_cb", "local_address", "close_reason", "is_tls",
                 "aborted", "rx_bytes", "tx_bytes")

    def __init__(self, pool, host):
        self.pool = pool
        self.host = host
        self.transport = None
        self.codec = Http1ClientCodec(self)
        po = getattr(pool.cluster, "protocol_options", None)
        if po is not None:
            self.codec.max_headers = po.max_headers_count
            self.codec.keep_trailers = po.trailers
        self.close_reason = "connection termination"
        self.aborted = False  # reset with its request in flight (upstream_cx_destroy_*_with_active_rq)
        self.idle_since = 0.0
        self.requests = 0
        self.closed = False
        self.write_paused = False
        self.read_paused = False
        self.stream_cb = None  # the request bound to this connection (router's upstream request)
        self.local_address = ""
        self.is_tls = False  # over TLS (tls.client's layer): the router reads its peer's SANs
        # the cluster's upstream_cx_{rx,tx}_bytes_total: every byte read and written, a tunnel's too
        # (Envoy counts the connection's bytes; TLS: the plaintext, as Envoy's connection does)
        self.rx_bytes = pool.cluster.st_cx_rx_bytes
        self.tx_bytes = pool.cluster.st_cx_tx_bytes

    # -- asyncio.Protocol -----------------------------------------------------------------------
    def connection_made(self, transport):
        attach_transport(self, transport)
        self.is_tls = getattr(transport, "tls", None) is not None

    def data_received(self, data):
        self.rx_bytes.value += len(data)
        wb = writebatch
        wb.depth += 1  # (writebatch.enter/leave, inlined)
        try:
            self.codec.feed(data)
        finally:
            wb.depth -= 1
            if wb.pending and not wb.depth:
                wb.flush()

    def eof_received(self):
        c = self.codec
        if c.tunnel and c.pending_upgrade == 2:  # (Envoy half-closes a CONNECT's connection only)
            cb = self.stream_cb
            if cb is not None:
                cb.on_upstream_data(b"", True)
            return True
        return False  # (an upgrade's FIN ends the connection: codec.on_close, a connection termination)

    def connection_lost(self, exc):
        remote = not self.closed
        self.closed = True
        self.pool.on_connection_closed(self, remote)
        self.stream_cb = None
        # (Envoy's reason for an HTTP/1.1 upstream that closes, cleanly or not, is "connection
        # termination"; a tunnel tells a half-close from an abort)
        self.codec.on_close(self.close_reason, exc is not None)

    def pause_writing(self):
        self.write_paused = True
        cb = self.stream_cb
        if cb is not None:
            cb.on_upstream_watermark(True)

    def resume_writing(self):
        self.write_paused = False
        cb = self.stream_cb
        if cb is not None:
            cb.on_upstream_watermark(False)

    # -- used by the codec ----------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        if not self.closed:
            self.tx_bytes.value += len(data)
            # (writebatch.send, inlined: at the end of the loop iteration, with the others)
            _pending.append((self, data))
            if not writebatch.depth:
                writebatch.flush()

    def write_eof(self) -> None:
        if not self.closed and self.transport.can_write_eof():
            writebatch.send(self, None)  # (after the writes before it)

    def on_response_complete(self, keep_alive: bool) -> None:
        """The request's response is complete: the connection goes back to its pool (to a pending
        request or idle), or is closed when it cannot be reused."""
        self.stream_cb = None
        if self.read_paused:
            self.read_paused = False
            if not self.closed:
                self.transport.resume_reading()
        pool = self.pool
        pool.active -= 1
        self.host.rq_active -= 1
        c = pool.cluster
        c.rq_attached -= 1
        mr = c.max_requests_per_connection
        if not keep_alive or self.codec.chunked_request or self.closed or (mr and self.requests >= mr):
            if mr and self.requests >= mr:
                c.st_cx_max_rq.value += 1
            self.close()
            return
        if pool.pending or pool.draining:
            pool._on_idle_or_pending(self)
            return
        # (_on_idle_or_pending's common case, inlined: nothing waits, the connection parks idle)
        pool.idle.append(self)
        it = c.idle_timeout
        if it:
            self.idle_since = pool.loop.time()
            if pool.sweep is None:
                pool.sweep = pool.loop.call_later(it, pool._sweep_idle)

    def on_protocol_error(self, reason: str) -> None:
        """The upstream broke HTTP/1.1 (a malformed or oversized head, conflicting framing): the
        connection goes, and the request in flight is reset with Envoy's reason "protocol error"
        (the router answers 502 UPE)."""
        log.debug("upstream %s: %s", self.host.key, reason)
        if not self.closed:  # (once per connection)
            self.pool.cluster.st_cx_protocol_error.value += 1
        self.close_reason = "protocol error"
        self.close()

    # -- used by the router: the request encoder -------------------------------------------------------
    def encode_headers(self, headers, end_stream: bool) -> None:
        self.codec.encode_headers(headers, end_stream)

    def encode_data(self, data: bytes, end_stream: bool) -> None:
        self.codec.encode_data(data, end_stream)

    def encode_trailers(self, trailers) -> None:
        self.codec.encode_trailers(trailers)

    def read_disable(self, disable: bool) -> None:
        if self.closed or disable == self.read_paused:
            return
        self.read_paused = disable
        if disable:
            self.transport.pause_reading()
        else:
            self.transport.resume_reading()

    @property
    def open_tunnel(self) -> bool:
        """An upgraded (or CONNECT) connection not closed yet (see the router's ``on_destroy``)."""
        return self.codec.tunnel and not self.closed

    def reset(self) -> None:
        """Abandon the in-flight request: the connection can't be reused."""
        if self.stream_cb is not None:
            self.stream_cb = None
            self.aborted = True
            self.pool.active -= 1
            self.host.rq_active -= 1
            self.pool.cluster.rq_attached -= 1
        self.codec.decoder = None
        self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.abort()

    def close_written(self) -> None:
        """Close once what was written is sent (a CONNECT tunnel's end, http1_client.py)."""
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()


class PendingRequest:
    """A request waiting in a pool's queue for a connection (HTTP/1) or a stream (HTTP/2)."""

    __slots__ = ("cb", "cancelled", "stream")

    def __init__(self, cb):
        self.cb = cb
        self.cancelled = False
        self.stream = None  # (HTTP/2) a request being replayed after GOAWAY / REFUSED_STREAM

    def cancel(self):
        self.cancelled = True


class PoolBase:
    """What every pool shares: opening connections (bounded by the connect timeout; over TLS when
    the host's transport socket says so), the cluster/host connection accounting, and the queue of
    pending requests with its overflow accounting.

    Subclasses provide ``_new_connection()``, ``_connected(conn)`` and ``_connect_failed(reason,
    timeout)``.
    """

    __slots__ = ()
    is_http2 = False

    def _connect(self):
        c = self.cluster
        self.connecting += 1
        c.cx_total_active += 1
        c.st_cx_total.value += 1
        (c.st_cx_http2_total if self.is_http2 else c.st_cx_http1_total).value += 1
        c.st_cx_active.inc()
        h = self.host
        h.cx_active += 1
        h.cx_total += 1
        self.loop.create_task(self._do_connect())

    async def _do_connect(self):
        c = self.cluster
        conn = self._new_connection()
        ts = self.transport or c.transport_for(self.host)  # (istio.alpn pools carry their own)
        try:
            sock = await open_socket(self.loop, self.host, c.connect_timeout, c.source_address, c.tcp_keepalive)
            if ts.is_tls:  # connected = handshake done; a failed handshake is a connect failure
                await ts.connect(self.loop, sock, conn, c.connect_timeout, c.scope)
            else:
                await self.loop.create_connection(lambda: conn, sock=sock)
        except asyncio.TimeoutError:
            self._connect_failed(CONNECT_TIMEOUT, timeout=True)
            return
        except (OSError, asyncio.CancelledError) as e:
            if isinstance(e, asyncio.CancelledError):
                self.connecting -= 1
                self._cx_gone()
                raise
            self._connect_failed("delayed connect error: %s" % connect_error(e), timeout=False)  # (Envoy's words)
            return
        self._connected(conn)

    def _queue(self, p, front: bool = False):
        c = self.cluster
        if front:
            self.pending.appendleft(p)
        else:
            self.pending.append(p)
        c.pending_total += 1
        c.st_rq_pending_total.value += 1
        c.st_rq_pending_active.inc()

    def _pending_done(self):
        c = self.cluster
        c.pending_total -= 1
        c.st_rq_pending_active.dec()

    def _pending_overflow(self, cb):
        """The cluster's ``max_pending_requests`` is reached: ``cb`` fails with overflow at once."""
        self.cluster.st_pending_overflow.value += 1
        cb.on_pool_failure(OVERFLOW, "UO", self.host)

    def _overflow(self, cb):
        """``max_requests`` is reached as ``cb`` would be bound to a connection (HTTP/1) or get a
        stream (HTTP/2): it fails with overflow, counted in ``upstream_rq_active_overflow`` (Envoy
        checks the requests resource when a stream is attached, not before it is queued; a queued
        request is bounded by ``max_pending_requests`` alone)."""
        self.cluster.st_rq_active_overflow.value += 1
        cb.on_pool_failure(OVERFLOW, "UO", self.host)

    def _cx_gone(self):
        c = self.cluster
        c.cx_total_active -= 1
        c.st_cx_active.dec()
        self.host.cx_active -= 1

    def _count_connect_failure(self, timeout: bool) -> None:
        c = self.cluster
        self.connecting -= 1
        self._cx_gone()
        c.st_cx_connect_fail.value += 1
        self.host.cx_connect_fail += 1
        if timeout:
            c.st_cx_connect_timeout.value += 1



class Http1Pool(PoolBase):
    """Connections to one host. Idle connections are reused most-recently-used first."""

    __slots__ = ("cluster", "host", "loop", "idle", "pending", "connecting", "active", "draining",
                 "sweep", "transport")

    def __init__(self, cluster, host, loop):
        self.cluster = cluster
        self.host = host
        self.loop = loop
        self.transport = None
        self.idle: list = []
        self.pending = collections.deque()
        self.connecting = 0
        self.active = 0  # connections with a request bound
        self.draining = False
        self.sweep = None

    def new_stream(self, cb):
        """Bind ``cb`` to a connection now, or queue it. Returns a cancellable handle or None."""
        idle = self.idle
        c = self.cluster
        while idle:
            conn = idle.pop()
            if conn.closed:
                continue
            if c.rq_attached >= c.max_requests:
                idle.append(conn)
                self._overflow(cb)
                return None
            # (_bind, inlined for the common case)
            conn.requests += 1
            conn.stream_cb = cb
            conn.codec.start(cb)
            self.active += 1
            c.st_rq_total.value += 1
            c.rq_attached += 1
            h = self.host
            h.rq_active += 1
            h.rq_total += 1
            if h.outlier is not None:
                c.report_connect_success(h)
            cb.on_pool_ready(conn, h)
            return None
        if c.pending_total >= c.max_pending_requests:
            return self._pending_overflow(cb)
        p = PendingRequest(cb)
        self._queue(p)
        if self.connecting < len(self.pending):
            if c.cx_total_active >= c.max_connections:
                c.st_cx_overflow.value += 1
                if self.active + len(self.idle) + self.connecting == 0:
                    # a pool without a connection opens one at the cluster's limit too (Envoy's
                    # tryCreateNewConnection: else nothing would ever serve its queue)
                    self._connect()
            else:
                self._connect()
        return p

    def _bind(self, conn, cb):
        conn.requests += 1
        conn.stream_cb = cb
        conn.codec.start(cb)
        self.active += 1
        c = self.cluster
        c.st_rq_total.value += 1
        c.rq_attached += 1
        h = self.host
        h.rq_active += 1
        h.rq_total += 1
        if h.outlier is not None:
            c.report_connect_success(h)
        cb.on_pool_ready(conn, h)

    def _new_connection(self):
        return UpstreamConnection(self, self.host)

    def _connected(self, conn) -> None:
        self.connecting -= 1
        self._on_idle_or_pending(conn)

    def _connect_failed(self, reason, timeout: bool):
        c = self.cluster
        self._count_connect_failure(timeout)
        # Envoy fails one pending request per failed connection attempt
        while self.pending:
            p = self.pending.popleft()
            self._pending_done()
            if not p.cancelled:
                c.report_connect_failure(self.host)
                c.st_pending_failure_eject.value += 1
                p.cb.on_pool_failure(reason, "UF", self.host)
                break
        if self.pending and self.connecting < len(self.pending) and (
                c.cx_total_active < c.max_connections or self.active + len(self.idle) + self.connecting == 0):
            self._connect()

    def _on_idle_or_pending(self, conn):
        """A connection is free: give it to the oldest pending request, or park it idle."""
        c = self.cluster
        while self.pending:
            p = self.pending.popleft()
            self._pending_done()
            if p.cancelled:
                continue
            if c.rq_attached >= c.max_requests:
                self._overflow(p.cb)
                continue
            self._bind(conn, p.cb)
            return
        if self.draining:
            conn.close()
            return
        self.idle.append(conn)
        it = self.cluster.idle_timeout
        if it:
            # one sweep timer per pool instead of a timer per parked connection
            conn.idle_since = self.loop.time()
            if self.sweep is None:
                self.sweep = self.loop.call_later(it, self._sweep_idle)

    def _sweep_idle(self) -> None:
        """Close connections idle for the cluster's idle timeout; re-arm for the next one due."""
        self.sweep = None
        it = self.cluster.idle_timeout
        now = self.loop.time()
        keep = []
        for conn in self.idle:
            if conn.closed:
                continue
            if now - conn.idle_since >= it:
                self.cluster.st_cx_idle.value += 1
                conn.close()
            else:
                keep.append(conn)
        self.idle = keep
        if keep:
            due = min(c.idle_since for c in keep) + it - now
            self.sweep = self.loop.call_later(max(due, 0.001), self._sweep_idle)

    def on_connection_closed(self, conn, remote: bool = True) -> None:
        active = conn.stream_cb is not None
        if active:
            self.active -= 1
            self.host.rq_active -= 1
            self.cluster.rq_attached -= 1
            if not conn.codec.resp_headers_sent:  # (a close-delimited body ends this way)
                self.cluster.report_connect_failure(self.host)  # a request's connection was lost
        self._cx_gone()
        c = self.cluster
        c.count_cx_destroy(remote, active or conn.aborted)
        try:
            self.idle.remove(conn)
        except ValueError:
            pass
        if self.pending and self.connecting < len(self.pending) and (
                c.cx_total_active < c.max_connections or self.active + len(self.idle) + self.connecting == 0):
            self._connect()

    def drain(self) -> None:
        """Close idle connections; busy ones close when their request completes."""
        self.draining = True
        for conn in self.idle:
            conn.close()
        self.idle = []
        if self.sweep is not None:
            self.sweep.cancel()
            self.sweep = None
