"""One host's active health check session: its connection, the HTTP / TCP / gRPC check on it, the
timers and the healthy / unhealthy transitions (see ``health_check`` for the semantics)."""

from __future__ import annotations

import asyncio
import logging
import random

import h2.config
import h2.connection
import h2.events

from ..http.headers import Headers
from ..http.http1_client import Http1ClientCodec
from .health_check_config import GRPC, HTTP, TCP
from .host import ACTIVE_HC_TIMEOUT, DEGRADED_ACTIVE_HC, FAILED_ACTIVE_HC, PENDING_ACTIVE_HC
from .pool import open_socket

log = logging.getLogger("pyproxy.hc")

_MAX_RESPONSE = 64 * 1024  # bytes read from a TCP check / an HTTP body before giving up

# results of one check
_OK, _ACTIVE_FAIL, _NETWORK_FAIL, _TIMEOUT, _RETRIABLE_FAIL = range(5)


class _Conn(asyncio.Protocol):
    """The connection of a session: feeds bytes to the check in progress. An HTTP check's
    connection carries the HTTP/1.1 client codec (``codec``), which writes the request and parses
    the answer; this is its connection (``write``, ``close``, ``on_response_complete``, ...)."""

    def __init__(self, session):
        self.session = session
        self.transport = None
        self.closed = False
        self.codec = None
        self.reusable = True  # (an HTTP answer without keep-alive clears it)

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.session.on_data(self, data)

    def eof_received(self):
        return False

    def connection_lost(self, exc):
        self.closed = True
        if self.codec is not None:
            self.codec.on_close("connection closed", exc is not None)
        self.session.on_conn_lost(self)

    def write(self, data: bytes) -> None:
        if not self.closed:
            self.transport.write(data)

    def write_eof(self) -> None:  # (the codec half-closes only a tunnel: a check never is one)
        pass

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.abort()

    # -- the HTTP/1.1 client codec's connection events --------------------------------------------
    def on_response_complete(self, keep_alive: bool) -> None:
        if not keep_alive:
            self.reusable = False
        self.session.http_end(self)

    def on_protocol_error(self, reason: str) -> None:
        self.reusable = False
        self.session.http_failed(self)


class _HttpCheck:
    """The answer to one HTTP health check, as the HTTP/1.1 client codec decodes it (the codec's
    decoder: ``on_upstream_headers/data/trailers/reset``)."""

    __slots__ = ("session", "conn", "status", "body", "degraded")

    def __init__(self, session, conn):
        self.session = session
        self.conn = conn
        self.status = 0
        self.body = 0
        self.degraded = False

    def on_upstream_headers(self, headers: Headers, end_stream: bool) -> None:
        self.status = int(headers.get(":status"))
        self.degraded = "x-envoy-degraded" in headers
        if end_stream:
            self.session.http_end(self.conn)

    def on_upstream_data(self, data: bytes, end_stream: bool) -> None:
        self.body += len(data)
        if self.body > _MAX_RESPONSE:
            self.session.http_failed(self.conn)
        elif end_stream:
            self.session.http_end(self.conn)

    def on_upstream_trailers(self, trailers) -> None:
        self.session.http_end(self.conn)

    def on_upstream_reset(self, reason: str) -> None:
        self.session.http_failed(self.conn)


def _grpc_request(service: str) -> bytes:
    body = b""
    if service:
        s = service.encode()
        n = len(s)
        var = bytearray()
        while True:
            b = n & 0x7F
            n >>= 7
            var.append(b | (0x80 if n else 0))
            if not n:
                break
        body = b"\x0a" + bytes(var) + s
    return b"\x00" + len(body).to_bytes(4, "big") + body


def _grpc_serving(msg: bytes) -> int:
    """The ``status`` field of a HealthCheckResponse (0 when absent / unparsable)."""
    i = 0
    while i < len(msg):
        key = msg[i]
        i += 1
        if key == 0x08:  # field 1, varint
            v = shift = 0
            while i < len(msg):
                b = msg[i]
                i += 1
                v |= (b & 0x7F) << shift
                shift += 7
                if not b & 0x80:
                    return v
            return 0
        return 0  # (other fields: not expected)
    return 0


class Session:
    """Health checking of one host."""

    def __init__(self, checker, host):
        self.checker = checker
        self.host = host
        self.cfg = checker.cfg
        self.loop = checker.loop
        self.timer = None
        self.timeout_timer = None
        self.conn = None
        self.connecting = False
        self.num_healthy = 0
        self.num_unhealthy = 0
        self.first_check = True
        self.in_check = False
        self.stopped = False
        # per-check state
        self.http = None
        self.buf = b""
        self.h2 = None
        self.grpc_sid = None
        self.grpc_data = b""
        self.grpc_status = None
        self.grpc_http = 0

    # -- scheduling -------------------------------------------------------------------------------
    def start(self) -> None:
        j = self.cfg.initial_jitter
        delay = random.random() * j if j > 0 else 0.0
        self.timer = self.loop.call_later(delay, self._on_interval)

    def stop(self) -> None:
        self.stopped = True
        for t in (self.timer, self.timeout_timer):
            if t is not None:
                t.cancel()
        self.timer = self.timeout_timer = None
        self._close_conn()

    def _close_conn(self) -> None:
        c = self.conn
        self.conn = None
        self.h2 = None
        if c is not None:
            c.close()

    def _next(self, healthy: bool, pending: bool) -> float:
        cfg = self.cfg
        if self.checker.cluster.st_cx_total.value:
            if not healthy:
                base = cfg.unhealthy_edge_interval if pending else cfg.unhealthy_interval
            else:
                base = cfg.healthy_edge_interval if pending else cfg.interval
        else:
            base = cfg.no_traffic_healthy_interval if healthy else cfg.no_traffic_interval
        ms = int(base * 1000)
        if cfg.interval_jitter_percent:
            mod = cfg.interval_jitter_percent * ms // 100
            if mod > 0:
                ms += random.randrange(mod)
        j = int(cfg.interval_jitter * 1000)
        if j > 0:
            ms += random.randrange(j)
        return ms / 1000.0

    def _on_interval(self) -> None:
        self.timer = None
        if self.stopped:
            return
        self.checker.st["attempt"].value += 1
        self.in_check = True
        self.timeout_timer = self.loop.call_later(self.cfg.timeout, self._on_timeout)
        if self.conn is None or self.conn.closed:
            self.conn = None
            if not self.connecting:
                self.connecting = True
                self.loop.create_task(self._connect())
        else:
            self._send_check()

    async def _connect(self) -> None:
        h = self.host
        conn = _Conn(self)
        try:
            # (bounded by the check's own timeout timer, not a connect timeout)
            sock = await open_socket(self.loop, h, None)
            # the cluster's transport socket for this host (TLS as its traffic uses it)
            ts = self.checker.cluster.transport_for(h)
            if ts.is_tls:
                await ts.connect(self.loop, sock, conn, self.cfg.timeout, self.checker.cluster.scope)
            else:
                try:
                    await self.loop.create_connection(lambda: conn, sock=sock)
                except BaseException:
                    sock.close()
                    raise
        except asyncio.CancelledError:
            self.connecting = False
            raise
        except (OSError, asyncio.TimeoutError):
            self.connecting = False
            if self.in_check and not self.stopped:
                self._result(_NETWORK_FAIL)
            return
        self.connecting = False
        if self.stopped or not self.in_check:
            conn.close()  # (the check timed out meanwhile)
            return
        self.conn = conn
        if self.cfg.kind == HTTP:
            conn.codec = Http1ClientCodec(conn)
        elif self.cfg.kind == GRPC:
            self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(
                client_side=True, header_encoding="utf-8"))
            self.h2.initiate_connection()
            conn.write(self.h2.data_to_send())
        self._send_check()

    # -- one check ---------------------------------------------------------------------------------
    def _send_check(self) -> None:
        cfg = self.cfg
        conn = self.conn
        if cfg.kind == HTTP:
            # the request as Envoy's health checker sends it, written by the HTTP/1.1 client codec
            # (``:authority`` is the ``host`` line; the framing is the codec's)
            self.http = _HttpCheck(self, conn)
            codec = conn.codec
            codec.start(self.http)
            codec.encode_headers(Headers([(":method", cfg.method), (":scheme", "http"), (":path", cfg.path),
                                          (":authority", cfg.host), ("user-agent", "Envoy/HC")]
                                         + cfg.headers), True)
        elif cfg.kind == TCP:
            self.buf = b""
            if cfg.send:
                conn.write(cfg.send)
            if not cfg.receive:
                self._result(_OK)
        else:
            h = self.h2
            sid = self.grpc_sid = h.get_next_available_stream_id()
            self.grpc_data = b""
            self.grpc_status = None
            self.grpc_http = 0
            hdrs = [(":method", "POST"), (":scheme", "http"),
                    (":path", "/grpc.health.v1.Health/Check"), (":authority", cfg.authority),
                    ("content-type", "application/grpc"), ("te", "trailers"),
                    ("user-agent", "Envoy/HC")] + cfg.metadata
            try:
                h.send_headers(sid, hdrs)
                h.send_data(sid, _grpc_request(cfg.service_name), end_stream=True)
            except Exception:
                self._result(_NETWORK_FAIL)
                return
            conn.write(h.data_to_send())

    def on_data(self, conn, data: bytes) -> None:
        if conn is not self.conn:
            return
        cfg = self.cfg
        if not self.in_check:
            if cfg.kind == GRPC and self.h2 is not None:
                self._grpc_feed(data)  # (pings, settings between checks)
                return
            self._close_conn()  # unsolicited bytes: start afresh next time
            return
        if cfg.kind == HTTP:
            conn.codec.feed(data)  # (the answer comes back through http_end / http_failed)
        elif cfg.kind == TCP:
            self.buf += data
            if len(self.buf) > _MAX_RESPONSE:
                self._result(_NETWORK_FAIL)
                return
            pos = 0
            for want in cfg.receive:
                i = self.buf.find(want, pos)
                if i < 0:
                    return
                pos = i + len(want)
            self._result(_OK)
        else:
            self._grpc_feed(data)

    def _grpc_feed(self, data: bytes) -> None:
        h = self.h2
        try:
            events = h.receive_data(data)
        except Exception:
            if self.in_check:
                self._result(_NETWORK_FAIL)
            else:
                self._close_conn()
            return
        out = h.data_to_send()
        if out and self.conn is not None:
            self.conn.write(out)
        sid = self.grpc_sid
        for e in events:
            if isinstance(e, (h2.events.ResponseReceived, h2.events.TrailersReceived)) \
                    and e.stream_id == sid:
                for k, v in e.headers:
                    if k == ":status":
                        self.grpc_http = int(v)
                    elif k == "grpc-status":
                        self.grpc_status = v
            elif isinstance(e, h2.events.DataReceived) and e.stream_id == sid:
                h.acknowledge_received_data(e.flow_controlled_length, sid)
                self.grpc_data += e.data
                if len(self.grpc_data) > _MAX_RESPONSE:
                    self._result(_NETWORK_FAIL)
                    return
            elif isinstance(e, h2.events.StreamReset) and e.stream_id == sid:
                self._result(_NETWORK_FAIL)
                return
            elif isinstance(e, h2.events.ConnectionTerminated):
                if self.in_check:
                    self._result(_NETWORK_FAIL)
                else:
                    self._close_conn()
                return
            if isinstance(e, h2.events.StreamEnded) and e.stream_id == sid and self.in_check:
                ok = False
                if self.grpc_http == 200 and self.grpc_status == "0" and \
                        len(self.grpc_data) >= 5:
                    ok = _grpc_serving(self.grpc_data[5:]) == 1
                self._result(_OK if ok else (_ACTIVE_FAIL if self.grpc_http == 200
                                             else _NETWORK_FAIL))
                return
        out = h.data_to_send()
        if out and self.conn is not None:
            self.conn.write(out)

    def http_end(self, conn) -> None:
        """The answer to an HTTP check is complete (its head was read: ``http.status``)."""
        if conn is not self.conn:
            return
        p = self.http
        if not self.in_check or p is None or not p.status:
            if not conn.reusable:
                self._close_conn()  # (an answer ended at its head, then said connection: close)
            return
        status = p.status
        cfg = self.cfg
        if any(a <= status < b for a, b in cfg.expected):
            self._result(_OK, degraded=p.degraded)
        elif any(a <= status < b for a, b in cfg.retriable):
            self._result(_RETRIABLE_FAIL)  # (counted toward the threshold)
        else:
            self._result(_ACTIVE_FAIL)

    def http_failed(self, conn) -> None:
        """An HTTP check's answer broke the protocol, was too large, or its connection went."""
        if conn is self.conn and self.in_check:
            self._result(_NETWORK_FAIL)

    def on_conn_lost(self, conn) -> None:
        if conn is not self.conn:
            return
        self.conn = None
        self.h2 = None
        if self.in_check:  # (an HTTP check's codec ended a close-delimited answer before this)
            self._result(_NETWORK_FAIL)

    def _on_timeout(self) -> None:
        self.timeout_timer = None
        if self.in_check:
            self._result(_TIMEOUT)

    # -- the result ----------------------------------------------------------------------------------
    def _result(self, r: int, degraded: bool = False) -> None:
        if not self.in_check or self.stopped:
            return
        self.in_check = False
        if self.timeout_timer is not None:
            self.timeout_timer.cancel()
            self.timeout_timer = None
        cfg = self.cfg
        if r != _OK or not cfg.reuse_connection or (self.conn is not None and not self.conn.reusable):
            self._close_conn()
        if r == _OK:
            healthy, pending = self._on_success(degraded)
        else:
            healthy, pending = self._on_failure(r)
        self.timer = self.loop.call_later(self._next(healthy, pending), self._on_interval)

    def _on_success(self, degraded: bool = False):
        h = self.host
        ck = self.checker
        changed = pending = False
        self.num_unhealthy = 0
        if h.has_flag(FAILED_ACTIVE_HC):
            self.num_healthy += 1
            if self.first_check or self.num_healthy >= self.cfg.healthy_threshold:
                h.clear_flag(ACTIVE_HC_TIMEOUT | FAILED_ACTIVE_HC)
                changed = True
                log.info("health check: %s of cluster %s is healthy", h.key, ck.cluster.name)
            else:
                pending = True
        if h.has_flag(PENDING_ACTIVE_HC):
            h.clear_flag(PENDING_ACTIVE_HC)
            changed = True
        if degraded != h.has_flag(DEGRADED_ACTIVE_HC):  # (x-envoy-degraded in the answer)
            if degraded:
                h.set_flag(DEGRADED_ACTIVE_HC)
            else:
                h.clear_flag(DEGRADED_ACTIVE_HC)
            changed = True
        ck.st["success"].value += 1
        first = self.first_check
        self.first_check = False
        ck.on_result(self, changed, first, passed=True)
        return True, pending

    def _on_failure(self, r: int):
        h = self.host
        ck = self.checker
        changed = pending = False
        self.num_healthy = 0
        network = r in (_NETWORK_FAIL, _TIMEOUT)
        if not h.has_flag(FAILED_ACTIVE_HC):
            self.num_unhealthy += 1
            if r == _ACTIVE_FAIL or self.num_unhealthy >= self.cfg.unhealthy_threshold:
                h.set_flag(FAILED_ACTIVE_HC)
                changed = True
                log.info("health check: %s of cluster %s is unhealthy", h.key, ck.cluster.name)
            else:
                pending = True
        if r == _TIMEOUT and not h.has_flag(ACTIVE_HC_TIMEOUT):
            h.set_flag(ACTIVE_HC_TIMEOUT)
        if h.has_flag(PENDING_ACTIVE_HC):
            h.clear_flag(PENDING_ACTIVE_HC)
            changed = True
        ck.st["failure"].value += 1
        if network:
            ck.st["network_failure"].value += 1
        first = self.first_check
        self.first_check = False
        ck.on_result(self, changed, first, passed=False)
        return not h.has_flag(FAILED_ACTIVE_HC), pending
