"""Upstream HTTP/2: multiplexed connections per host, same interface as ``Http1Pool``.

``pool.new_stream(cb)`` binds ``cb`` to a stream on a connection with a free stream slot (the
peer's SETTINGS_MAX_CONCURRENT_STREAMS, capped by ours) or queues it; a new connection is opened
when the slots run out, within the cluster's circuit breakers. The stream object handed to
``cb.on_pool_ready`` is the request encoder; the response comes back through
``cb.on_upstream_headers/data/trailers/reset`` and ``on_upstream_watermark``.

A request the peer did not process (GOAWAY with a lower last-stream-id, or REFUSED_STREAM before
any response) is replayed on another connection as long as what was sent is still held (up to
``REPLAY_LIMIT`` bytes); the caller does not notice. Connections close after
``max_requests_per_connection`` streams, after ``idle_timeout`` without streams, or when the pool
drains.
"""

from __future__ import annotations

import asyncio
import collections
import logging

import h2.exceptions
from h2.errors import ErrorCodes
from h2.settings import SettingCodes

from ..http import http2 as h2c
from ..http.headers import Headers
from .. import writebatch
from .pool import CONNECT_FAILURE, CONNECT_TIMEOUT, OVERFLOW, PoolBase, attach_transport

log = logging.getLogger("pyproxy.pool")

REPLAY_LIMIT = 64 * 1024
REFUSED = "remote refused stream reset"
REMOTE_RESET = "remote reset"
TERMINATED = "connection termination"

EVENT_KIND = h2c.EVENT_KIND
EV_RESPONSE, EV_DATA, EV_TRAILERS, EV_ENDED, EV_RESET = h2c.EV_RESPONSE, h2c.EV_DATA, h2c.EV_TRAILERS, h2c.EV_ENDED, h2c.EV_RESET
EV_WINDOW, EV_SETTINGS, EV_GOAWAY = h2c.EV_WINDOW, h2c.EV_SETTINGS, h2c.EV_GOAWAY


def cluster_options(cluster) -> h2c.H2Options:
    o = getattr(cluster, "h2_compiled_options", None)
    if o is None:
        po = getattr(cluster, "protocol_options", None)
        o = h2c.H2Options(getattr(po, "http2_options", None), 80 * 1024, 200)
        try:
            cluster.h2_compiled_options = o
        except AttributeError:
            pass
    return o


class H2UpstreamStream(h2c.OutStream):
    """One request on an upstream HTTP/2 connection: the encoder the router writes to."""

    __slots__ = ("pool", "conn", "sid", "cb", "pending", "pending_bytes", "pending_end", "pending_trailers",
                 "above", "read_off", "unacked", "replay", "replay_bytes", "response_started",
                 "remote_ended", "local_ended", "closed", "cancelled", "headers_sent", "upgrade")

    def __init__(self, pool, cb):
        self.pool = pool
        self.conn = None
        self.sid = 0
        self.cb = cb
        self._init_out()
        self.replay = []
        self.replay_bytes = 0
        self.response_started = False
        self.remote_ended = False
        self.local_ended = False
        self.closed = False
        self.cancelled = False
        self.headers_sent = False
        self.upgrade = None  # the protocol of an HTTP/1.1 upgrade sent as extended CONNECT

    @property
    def local_address(self) -> str:
        c = self.conn
        return c.local_address if c is not None else ""

    # -- encoder API (router -> upstream) -----------------------------------------------------------
    def encode_headers(self, headers: Headers, end_stream: bool) -> None:
        if self.closed:
            return
        self._log(("h", headers, end_stream), 0)
        c = self.conn
        if c is None:
            return  # waiting for a connection to replay on
        self._send_headers(headers, end_stream)

    def _send_headers(self, headers, end_stream):
        c = self.conn
        h = c.h2
        sid = self.sid = h.get_next_available_stream_id()
        c.streams[sid] = self
        fields = headers._h
        if c.extended_connect and "upgrade" in headers:
            fields = self._extended_connect(fields)
        h.send_headers(sid, fields if c.lean else h2c.to_h2(Headers(fields)), end_stream=end_stream)
        self.headers_sent = True
        if end_stream:
            self.local_ended = True
        c.want_flush()

    def _extended_connect(self, fields) -> list:
        """An HTTP/1.1 upgrade (websocket) as RFC 8441 extended CONNECT, as Envoy sends it to an
        upstream that announced SETTINGS_ENABLE_CONNECT_PROTOCOL; its 200 comes back as a 101."""
        out = []
        for kv in fields:
            k = kv[0]
            if k == ":method":
                out.append((":method", "CONNECT"))
            elif k == "upgrade":
                self.upgrade = kv[1]
            elif k != "connection":
                out.append(kv)
        i = 0
        while i < len(out) and out[i][0][0] == ":":
            i += 1
        out.insert(i, (":protocol", self.upgrade))
        return out

    def encode_data(self, data: bytes, end_stream: bool) -> None:
        if self.closed:
            return
        self._log(("d", data, end_stream), len(data))
        if self.conn is None or not self.headers_sent:
            return
        try:
            self._send_data(data, end_stream)
        except h2.exceptions.ProtocolError as e:
            self._local_failure(e)
            return
        self.conn.want_flush()

    def encode_trailers(self, trailers: Headers) -> None:
        if self.closed:
            return
        self._log(("t", trailers), 0)
        if self.conn is None or not self.headers_sent:
            return
        try:
            self._send_trailers(trailers)
        except h2.exceptions.ProtocolError as e:
            self._local_failure(e)
            return
        self.conn.want_flush()

    def read_disable(self, disable: bool) -> None:
        if disable:
            self.read_off += 1
            return
        if not self.read_off:
            return
        self.read_off -= 1
        if not self.read_off and self.unacked:
            n, self.unacked = self.unacked, 0
            c = self.conn
            if c is not None and not c.closed:
                try:
                    c.h2.acknowledge_received_data(n, self.sid)
                except (h2.exceptions.ProtocolError, ValueError):
                    pass
                c.want_flush()

    def reset(self) -> None:
        """The router abandons the request: RST_STREAM(CANCEL) and free the slot."""
        if self.closed:
            return
        self.cancelled = True
        c = self.conn
        if c is not None and self.headers_sent and not c.closed:
            try:
                c.h2.reset_stream(self.sid, ErrorCodes.CANCEL)
            except h2.exceptions.ProtocolError:
                pass
            c.want_flush()
        self._finish()

    # -- internals ----------------------------------------------------------------------------------
    def _log(self, ev, n):
        r = self.replay
        if r is not None:
            self.replay_bytes += n
            if self.replay_bytes > REPLAY_LIMIT:
                self.replay = None
            else:
                r.append(ev)

    def replay_on(self, conn) -> None:
        """Bound to a (new) connection: send what the router already gave us."""
        self.conn = conn
        self.headers_sent = False
        self.local_ended = False
        self.pending.clear()
        self.pending_bytes = 0
        self.pending_end = False
        self.pending_trailers = None
        for ev in self.replay or ():
            if self.closed:
                return
            k = ev[0]
            if k == "h":
                self._send_headers(ev[1], ev[2])
            elif k == "d":
                self._send_data(ev[1], ev[2])
            else:
                self._send_trailers(ev[1])
        conn.want_flush()

    def _ended(self) -> None:
        self.local_ended = True

    def _watermark(self, above: bool) -> None:
        if not self.closed:
            self.cb.on_upstream_watermark(above)

    def _local_failure(self, e) -> None:
        log.debug("upstream h2 stream failed: %s", e)
        cb = self.cb
        self.reset()
        cb.on_upstream_reset("local reset")

    def _finish(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.pending.clear()
        self.pending_bytes = 0
        self.replay = None
        c = self.conn
        if c is not None:
            c.blocked.discard(self)
            if self.headers_sent and not c.closed:
                h = c.h2
                try:
                    if not self.local_ended and not self.cancelled:
                        # the response is complete: stop sending the request
                        h.reset_stream(self.sid, ErrorCodes.CANCEL)
                        c.want_flush()
                    if self.unacked:
                        h.acknowledge_received_data(self.unacked, self.sid)
                        self.unacked = 0
                        c.want_flush()
                except (h2.exceptions.ProtocolError, ValueError):
                    pass
            c.stream_done(self)

    def _release_watermark(self) -> None:
        if self.above:
            self.above = False
            self.cb.on_upstream_watermark(False)

    def can_replay(self) -> bool:
        return self.replay is not None and not self.response_started and not self.cancelled


class H2UpstreamConnection(asyncio.Protocol):
    __slots__ = ("pool", "host", "transport", "h2", "streams", "bound", "closed", "write_paused",
                 "blocked", "max_frame", "stream_high", "requests", "idle_handle", "flush_handle",
                 "local_address", "goaway", "draining", "max_streams", "loop", "ready", "ready_timer", "lean",
                 "extended_connect")

    def __init__(self, pool, host):
        self.pool = pool
        self.host = host
        self.loop = pool.loop
        self.transport = None
        opts = cluster_options(pool.cluster)
        self.h2 = h2c.new_h2(True, opts)
        self.lean = self.h2.__class__ is h2c.H2Engine  # takes Headers' pairs as they are
        self.max_frame = self.h2.max_outbound_frame_size
        self.streams: dict = {}  # sid -> stream with headers sent
        self.bound = 0  # streams holding a slot (with or without headers sent)
        self.closed = False
        self.write_paused = False
        self.blocked: set = set()
        self.stream_high = pool.cluster.buffer_limit
        self.requests = 0
        self.idle_handle = None
        self.flush_handle = None
        self.local_address = ""
        self.goaway = False
        self.draining = False
        self.max_streams = opts.max_concurrent_streams
        self.ready = False  # the peer's SETTINGS (its stream limit) arrived
        self.extended_connect = False  # the peer announced SETTINGS_ENABLE_CONNECT_PROTOCOL
        self.ready_timer = None

    # -- capacity -----------------------------------------------------------------------------------
    def capacity(self) -> int:
        if self.closed or self.goaway or self.draining or not self.ready:
            return 0
        peer = self.h2.remote_settings.max_concurrent_streams
        n = min(peer, self.max_streams) - self.bound
        mr = self.pool.cluster.max_requests_per_connection
        if mr:
            n = min(n, mr - self.requests)
        return n

    # -- asyncio.Protocol ---------------------------------------------------------------------------
    def connection_made(self, transport):
        attach_transport(self, transport)
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
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as e:
            log.debug("upstream %s: h2 protocol error: %s", self.host.key, e)
            self._flush()
            self.close(TERMINATED)
            return
        writebatch.enter()
        try:
            self._handle(events)
        except Exception:
            log.exception("upstream h2 event handling failed")
            self.close(TERMINATED)
            return
        finally:
            writebatch.leave()
        self._flush()

    def _handle(self, events):
        streams = self.streams
        h = self.h2
        kinds = EVENT_KIND
        for e in events:
            t = kinds.get(e.__class__, -1)
            if t == EV_DATA:
                s = streams.get(e.stream_id)
                n = e.flow_controlled_length
                if s is None:
                    if n:
                        try:
                            h.acknowledge_received_data(n, e.stream_id)
                        except h2.exceptions.ProtocolError:
                            pass
                    continue
                end = e.stream_ended is not None
                if end:
                    s.remote_ended = True
                    s._release_watermark()
                    s._finish()
                s.cb.on_upstream_data(e.data, end)
                if n:
                    if s.read_off and not s.closed:
                        s.unacked += n
                    else:
                        try:
                            h.acknowledge_received_data(n, e.stream_id)
                        except h2.exceptions.ProtocolError:
                            pass
            elif t == EV_RESPONSE:
                s = streams.get(e.stream_id)
                if s is None:
                    continue
                s.response_started = True
                s.replay = None
                try:
                    headers = Headers(h2c.response_fields(e.headers))
                except h2c.BadHeaders as err:
                    self._bad_response(s, err)
                    continue
                end = e.stream_ended is not None
                if s.upgrade is not None and not end and headers._h[0][1][:1] == "2":
                    # the extended CONNECT was accepted: the HTTP/1.1 side expects a 101
                    headers._h[0] = (":status", "101")
                    headers._h.append(("upgrade", s.upgrade))
                    headers._h.append(("connection", "upgrade"))
                if end:
                    s.remote_ended = True
                    s._release_watermark()
                    s._finish()
                s.cb.on_upstream_headers(headers, end)
            elif t == EV_TRAILERS:
                s = streams.get(e.stream_id)
                if s is None:
                    continue
                try:
                    trailers = Headers(h2c.inbound_headers(e.headers, h2c.TRAILERS))
                except h2c.BadHeaders as err:
                    self._bad_response(s, err)
                    continue
                s.remote_ended = True
                s._release_watermark()
                s._finish()
                s.cb.on_upstream_trailers(trailers)
            elif t == EV_ENDED:
                s = streams.get(e.stream_id)
                if s is not None and not s.remote_ended:
                    s.remote_ended = True
                    s._release_watermark()
                    s._finish()
                    s.cb.on_upstream_data(b"", True)
            elif t == EV_RESET:
                s = streams.get(e.stream_id)
                if s is None:
                    continue
                if e.error_code == ErrorCodes.REFUSED_STREAM and s.can_replay():
                    self._detach(s)
                    self.pool.requeue(s)
                    continue
                s._release_watermark()
                s._finish()
                self.pool.cluster.report_connect_failure(self.host)  # (Envoy: any reset)
                s.cb.on_upstream_reset(REFUSED if e.error_code == ErrorCodes.REFUSED_STREAM else REMOTE_RESET)
            elif t == EV_WINDOW:
                if self.blocked:
                    if e.stream_id == 0:
                        h2c.flush_blocked(self)
                    else:
                        s = streams.get(e.stream_id)
                        if s is not None and s.pending:
                            s.flush_pending()
            elif t == EV_SETTINGS:
                self.max_frame = h.max_outbound_frame_size
                ch = e.changed_settings
                if SettingCodes.ENABLE_CONNECT_PROTOCOL in ch:
                    self.extended_connect = bool(ch[SettingCodes.ENABLE_CONNECT_PROTOCOL].new_value)
                if SettingCodes.INITIAL_WINDOW_SIZE in ch and self.blocked:
                    h2c.flush_blocked(self)
                if not self.ready:
                    self.ready = True
                    if self.ready_timer is not None:
                        self.ready_timer.cancel()
                        self.ready_timer = None
                    self.pool.on_ready(self)
                elif SettingCodes.MAX_CONCURRENT_STREAMS in ch:
                    self.pool.on_capacity(self)
            elif t == EV_GOAWAY:
                self._on_goaway(e)

    def _bad_response(self, s, err):
        log.debug("upstream %s: malformed response headers: %s", self.host.key, err)
        try:
            self.h2.reset_stream(s.sid, ErrorCodes.PROTOCOL_ERROR)
        except h2.exceptions.ProtocolError:
            pass
        s.cancelled = True
        s._release_watermark()
        s._finish()
        s.cb.on_upstream_reset("protocol error")

    def _on_goaway(self, e):
        self.goaway = True
        last = e.last_stream_id if e.last_stream_id is not None else 0
        for sid, s in sorted(self.streams.items()):
            if sid > last:
                if s.can_replay():
                    self._detach(s)
                    self.pool.requeue(s)
                else:
                    s._release_watermark()
                    s._finish()
                    s.cb.on_upstream_reset(REFUSED)
        self.pool.on_goaway(self)
        if not self.bound:
            self.close(None)

    def _detach(self, s):
        """Take a stream the peer did not process off this connection (to replay elsewhere)."""
        self.streams.pop(s.sid, None)
        self.blocked.discard(s)
        self.bound -= 1
        self.pool.stream_unbound(self)
        s.conn = None
        s.sid = 0
        s.headers_sent = False

    def connection_lost(self, exc):
        self.close(TERMINATED if exc is not None else REMOTE_RESET, lost=True)

    def pause_writing(self):
        self.write_paused = True
        for s in list(self.streams.values()):
            if not s.above:
                s.above = True
                s._watermark(True)

    def resume_writing(self):
        self.write_paused = False
        if self.blocked:
            h2c.flush_blocked(self)
        for s in list(self.streams.values()):
            if s.above and s.pending_bytes <= self.stream_high // 2:
                s.above = False
                s._watermark(False)
        self._flush()

    # -- output -------------------------------------------------------------------------------------
    def want_flush(self) -> None:
        if self.flush_handle is None and not self.closed:
            # sent when the read being dispatched (e.g. a downstream request) is done, or on the
            # next loop iteration outside a read
            self.flush_handle = True
            writebatch.queue(self, self.loop)

    def flush(self) -> None:
        """``writebatch``'s callback."""
        if self.flush_handle is not None:
            self._flush()

    def _flush(self) -> None:
        self.flush_handle = None
        if self.closed or self.transport is None:
            return
        data = self.h2.data_to_send()
        if data:
            self.pool.cluster.st_cx_tx_bytes.value += len(data)
            self.transport.write(data)

    # -- stream bookkeeping -------------------------------------------------------------------------
    def attach(self, s) -> None:
        if self.idle_handle is not None:
            self.idle_handle.cancel()
            self.idle_handle = None
        self.bound += 1
        self.requests += 1
        s.conn = self

    def stream_done(self, s) -> None:
        if s.sid:
            self.streams.pop(s.sid, None)
        self.bound -= 1
        self.pool.stream_released(self)

    def close(self, reason, lost: bool = False, timed_out: bool = False) -> None:
        first = not self.closed
        self.closed = True
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
        streams = list(self.streams.values())
        self.streams.clear()
        self.blocked.clear()
        for s in streams:
            if s.closed:
                continue
            s.closed = True
            s.replay = None
            self.pool.cluster.report_connect_failure(self.host)
            s.cb.on_upstream_reset(reason or TERMINATED)
        if lost:
            self.pool.on_connection_closed(self)


class _Pending:
    __slots__ = ("cb", "cancelled", "stream")

    def __init__(self, cb):
        self.cb = cb
        self.cancelled = False
        self.stream = None  # a request being replayed after GOAWAY / REFUSED_STREAM

    def cancel(self):
        self.cancelled = True


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
        for conn in self.conns:
            if conn.capacity() > 0:
                self._bind(conn, H2UpstreamStream(self, cb))
                return None
        c = self.cluster
        if c.pending_total >= c.max_pending_requests:
            c.st_pending_overflow.value += 1
            cb.on_pool_failure(OVERFLOW, "UO", self.host)
            return None
        p = _Pending(cb)
        self._queue(p)
        if self.connecting == 0:
            if c.cx_total_active >= c.max_connections:
                c.st_cx_overflow.value += 1
                if not self.conns:
                    self._fail_pending(p, OVERFLOW, "UO")
                    return None
            else:
                self._connect()
        return p

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

    def _fail_pending(self, p, reason, flag):
        try:
            self.pending.remove(p)
        except ValueError:
            return
        self._pending_done()
        if not p.cancelled:
            self._fail(p, reason, flag)

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
        conn.attach(s)
        c = self.cluster
        c.st_rq_total.value += 1
        h = self.host
        h.rq_active += 1
        if h.outlier is not None:
            c.report_connect_success(h)
        s.cb.on_pool_ready(s, h)

    def requeue(self, s) -> None:
        """A stream the peer refused or did not process goes to the front of the queue."""
        h = self.host
        h.rq_active -= 1
        p = _Pending(s.cb)
        p.stream = s
        self._queue(p, front=True)
        self._dispatch()
        if self.pending and self.connecting == 0 and not self.draining:
            c = self.cluster
            if c.cx_total_active < c.max_connections:
                self._connect()
            elif not any(cn.capacity() > 0 for cn in self.conns):
                c.st_cx_overflow.value += 1

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
                    conn.attach(s)
                    self.cluster.st_rq_total.value += 1
                    self.host.rq_active += 1
                    try:
                        s.replay_on(conn)
                    except h2.exceptions.ProtocolError as e:
                        s._local_failure(e)
                else:
                    self._bind(conn, H2UpstreamStream(self, p.cb))
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
        if self.pending:
            self._dispatch()
        if not conn.bound:
            if conn.goaway or conn.draining or self.draining or (
                    self.cluster.max_requests_per_connection and
                    conn.requests >= self.cluster.max_requests_per_connection):
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
        it = self.cluster.idle_timeout
        if it and conn.idle_handle is None and not conn.closed:
            conn.idle_handle = self.loop.call_later(it, self._idle_close, conn)

    def _idle_close(self, conn) -> None:
        conn.idle_handle = None
        if not conn.bound:
            conn.close(None)
            self._remove(conn)

    def _remove(self, conn, keep_counted: bool = False) -> None:
        try:
            self.conns.remove(conn)
        except ValueError:
            pass

    def on_connection_closed(self, conn) -> None:
        if not conn.ready:
            # closed (or timed out) before its SETTINGS: a failed connection attempt
            timeout = self.settings_timeout
            self.settings_timeout = False
            self.cluster.st_cx_destroy.value += 1
            self._connect_failed(CONNECT_TIMEOUT if timeout else "%s (closed before SETTINGS)" % CONNECT_FAILURE,
                                 timeout=timeout)
            return
        self._remove(conn)
        self._cx_gone()
        self.cluster.st_cx_destroy.value += 1
        if self.pending and self.connecting == 0 and not self.draining:
            if any(cn.capacity() > 0 for cn in self.conns):
                self._dispatch()
            elif self.cluster.cx_total_active < self.cluster.max_connections:
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
