"""The admin HTTP/1.1 server: asyncio.Protocol connections on the proxy's own HTTP/1.1 server codec
(``http/http1.py`` ``Http1ServerCodec``), as Envoy serves its admin through its HTTP connection
manager's codec.

The codec reads the requests and writes the answers: keep-alive and pipelining (answered in
order), Envoy's strictness and its answers to bad input (400, 431 for headers over 60 KiB or over
100 of them, 426 for HTTP/1.0, an empty 400 without a Host), ``100 Continue``, the framing of
every response. This module is the codec's connection and connection manager: a request body is
bounded (413), an upgrade or CONNECT is refused (400), idle connections close after
``idle_timeout`` seconds, writes pausing reads when the client does not read. Handlers are
synchronous and only read the context, so a request is answered as soon as it is complete.

    admin = await start_admin(ctx, "127.0.0.1", 15000)
    ...
    await admin.close()
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time

from pyproxy.admin import handlers as _h
from pyproxy.http.headers import Headers
from pyproxy.http.http1 import Http1ServerCodec
from pyproxy.http.http1_common import REASONS
from pyproxy.http.http_date import http_date

log = logging.getLogger("pyproxy.admin")

MAX_HEADER_BYTES = 60 * 1024     # Envoy's default max_request_headers_kb
MAX_HEADERS = 100                # Envoy's default max_headers_count
MAX_BODY_BYTES = 1024 * 1024
IDLE_TIMEOUT_S = 300.0
SERVER = "envoy"


class _AdminRequest:
    """One admin request (the codec's stream): its body is counted (not kept: no handler reads
    it), and it is answered once complete."""

    __slots__ = ("conn", "codec", "headers", "body_bytes")

    def __init__(self, conn, codec, headers: Headers):
        self.conn = conn
        self.codec = codec
        self.headers = headers
        self.body_bytes = 0

    def decode_data(self, data: bytes, end_stream: bool) -> None:
        if self.codec.stream is not self:
            return
        self.body_bytes += len(data)
        if self.body_bytes > MAX_BODY_BYTES:
            self.conn.refuse(self.codec, 413)
        elif end_stream:
            self.conn.answer(self)

    def decode_trailers(self, trailers) -> None:
        if self.codec.stream is self:
            self.conn.answer(self)

    def on_reset(self, reason: str) -> None:
        pass


class _AdminConnection(asyncio.Protocol):
    """One admin connection: the transport side of its ``Http1ServerCodec`` (``write``, ``close``,
    ``read_disable``) and its connection manager (``on_request``, ``on_codec_error``)."""

    __slots__ = ("server", "transport", "codec", "closing", "idle_handle", "peer", "write_paused",
                 "read_disabled", "cfg")

    def __init__(self, server: "AdminServer"):
        self.server = server
        self.transport = None
        self.cfg = None  # (the codec reads its creator's HCM settings here: Envoy's defaults)
        self.codec = Http1ServerCodec(self, self, max_header_bytes=MAX_HEADER_BYTES, max_headers=MAX_HEADERS,
                                      accept_http_10=False, default_host_for_http_10="")
        self.closing = False
        self.idle_handle = None
        self.peer = ""
        self.write_paused = False
        self.read_disabled = False

    # -- transport callbacks ------------------------------------------------------------------
    def connection_made(self, transport):
        self.transport = transport
        self.server._conns.add(self)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self.peer = "%s:%s" % (peer[0], peer[1])
        self._arm_idle()

    def connection_lost(self, exc):
        self.server._conns.discard(self)
        if self.idle_handle is not None:
            self.idle_handle.cancel()
            self.idle_handle = None
        self.closing = True
        self.codec.on_close()

    def data_received(self, data: bytes):
        if self.closing:
            return
        self._arm_idle()
        self.codec.feed(data)

    def eof_received(self):
        self.codec.on_eof()  # (closes the connection, after the answer in progress)
        return True

    def pause_writing(self):
        self.write_paused = True
        self._reading()

    def resume_writing(self):
        self.write_paused = False
        self._reading()

    # -- the codec's connection ---------------------------------------------------------------
    def write(self, data: bytes) -> None:
        if not self.closing and self.transport is not None:
            self.transport.write(data)

    def close(self, flush: bool = False) -> None:
        if self.closing:
            return
        self.closing = True
        self.codec.closed = True  # (nothing more is parsed or answered)
        if self.transport is not None:
            if flush:
                self.transport.close()  # flushes buffered data, then closes
            else:
                self.transport.abort()

    def read_disable(self, disable: bool) -> None:
        self.read_disabled = disable
        self._reading()

    def _reading(self) -> None:
        t = self.transport
        if t is None or self.closing:
            return
        if self.write_paused or self.read_disabled:
            t.pause_reading()
        else:
            t.resume_reading()

    # -- the codec's connection manager -------------------------------------------------------
    def on_request(self, codec, headers: Headers, end_stream: bool, version, *_flags) -> None:
        if codec.upgrade:
            self.refuse(codec, 400)  # (an upgrade or CONNECT: the admin serves neither)
            return
        r = _AdminRequest(self, codec, headers)
        codec.stream = r
        if end_stream:
            self.answer(r)

    def on_codec_error(self, codec, status: int, details: str, text: str | None = None) -> None:
        """Bad request bytes: Envoy's answer (an empty 400 without a Host, else the reason
        phrase), then the connection closes."""
        if text is None:
            text = "" if details == "missing_host_header" else REASONS.get(status, "Bad Request")
        if not self.closing:
            codec.write_error(status, text, http_date(), SERVER)
        self.close(flush=True)

    def refuse(self, codec, status: int) -> None:
        """A request the admin does not take (too large a body, an upgrade): answered, closed."""
        self.on_codec_error(codec, status, "admin", REASONS.get(status, "Bad Request"))

    def answer(self, r: _AdminRequest) -> None:
        """A complete request: the handler's response, written by the codec."""
        h = r.headers
        method = h._h[0][1]
        url = h.get(":path") or "/"
        path, _, query = url.partition("#")[0].partition("?")
        try:
            accept = h.get("accept") or ""
            resp = _h.dispatch(self.server, "GET" if method == "HEAD" else method, path or "/", query, accept)
        except Exception as e:  # a broken context must not take the admin down
            log.error("admin handler for %s failed: %r", path, e)
            resp = _h.Response(500, _h.TEXT, "internal error: %s\n" % e)
        body = resp.body
        head = Headers([(":status", str(resp.status)), ("content-type", resp.content_type),
                        ("cache-control", "no-cache, max-age=0"), ("x-content-type-options", "nosniff"),
                        ("date", http_date()), ("server", SERVER), ("content-length", str(len(body)))])
        codec = r.codec
        if method == "HEAD" or not body:
            codec.encode_headers(head, True)
        else:
            codec.encode_headers(head, False)
            codec.encode_data(body, True)
        self._access_log(r, resp)
        if resp.after is not None:
            asyncio.get_running_loop().call_soon(self._run_after, resp.after)

    # -- helpers ------------------------------------------------------------------------------
    @staticmethod
    def _run_after(fn):
        try:
            fn()
        except Exception as e:
            log.error("admin action failed: %r", e)

    def _arm_idle(self):
        if self.idle_handle is not None:
            self.idle_handle.cancel()
        self.idle_handle = asyncio.get_running_loop().call_later(
            self.server.idle_timeout, self._on_idle)

    def _on_idle(self):
        self.idle_handle = None
        if self.transport is not None and not self.transport.is_closing():
            self.close(flush=True)

    def _access_log(self, r: _AdminRequest, resp):
        loggers = self.server.access_logs
        if not loggers:
            return
        from pyproxy.stream_info import StreamInfo
        si = StreamInfo(downstream_remote_address=self.peer)
        si.response_code = resp.status
        si.bytes_sent = len(resp.body)
        si.bytes_received = r.body_bytes
        si.end_monotonic = time.monotonic()
        rsp = Headers([(":status", str(resp.status)), ("content-type", resp.content_type)])
        for lg in loggers:
            try:
                lg.log(si, r.headers, rsp)
            except Exception as e:
                log.error("admin access log failed: %r", e)


class AdminServer:
    """A running admin endpoint. ``port`` is the bound TCP port (0 when only a UDS is served)."""

    def __init__(self, ctx, access_logs=None, idle_timeout: float = IDLE_TIMEOUT_S):
        self.ctx = ctx
        self.access_logs = list(access_logs) if access_logs else []
        self.idle_timeout = idle_timeout
        self.started_monotonic = time.monotonic()
        self.port = 0
        self.host = None
        self.uds_path = None
        self._servers: list = []
        self._conns: set = set()

    @property
    def address(self) -> str:
        return "%s:%d" % (self.host, self.port) if self.host is not None else (self.uds_path or "")

    async def _start(self, host, port, uds_path):
        loop = asyncio.get_running_loop()
        factory = lambda: _AdminConnection(self)  # noqa: E731
        if host is not None:
            srv = await loop.create_server(factory, host=host, port=port, reuse_address=True)
            self._servers.append(srv)
            self.host = host
            self.port = srv.sockets[0].getsockname()[1]
        if uds_path:
            if not uds_path.startswith("@") and os.path.exists(uds_path):
                os.unlink(uds_path)  # a stale socket from a previous run
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.bind("\0" + uds_path[1:] if uds_path.startswith("@") else uds_path)
                sock.listen(128)
                sock.setblocking(False)
                srv = await loop.create_unix_server(factory, sock=sock)
            except BaseException:
                sock.close()
                raise
            self._servers.append(srv)
            self.uds_path = uds_path

    async def close(self):
        for srv in self._servers:
            srv.close()
        for c in list(self._conns):
            if c.transport is not None:
                c.transport.close()
        for srv in self._servers:
            try:
                await asyncio.wait_for(srv.wait_closed(), 2.0)
            except (asyncio.TimeoutError, Exception):
                pass
        self._servers = []
        if self.uds_path and not self.uds_path.startswith("@"):
            try:
                os.unlink(self.uds_path)
            except OSError:
                pass


async def start_admin(ctx, host: str | None, port: int = 0, *, uds_path: str | None = None,
                      access_logs=None, idle_timeout: float = IDLE_TIMEOUT_S) -> AdminServer:
    """Serve the admin API for ``ctx`` on ``host:port`` (port 0 picks one) and/or a unix socket
    (``@name`` for an abstract one). Raises ``OSError`` when the address cannot be bound."""
    if host is None and not uds_path:
        raise ValueError("admin: an address or a unix socket path is required")
    admin = AdminServer(ctx, access_logs, idle_timeout)
    await admin._start(host, port, uds_path)
    return admin
