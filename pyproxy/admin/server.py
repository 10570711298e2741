"""The admin HTTP/1.1 server (asyncio.Protocol + httptools).

Keep-alive and pipelining (requests answered in order), bounded request headers (431) and body
(413), malformed requests answered ``400 Bad Request`` and closed, idle connections closed after
``idle_timeout`` seconds, writes pausing reads when the client does not read. Handlers are
synchronous and only read the context, so a request is answered as soon as it is parsed.

    admin = await start_admin(ctx, "127.0.0.1", 15000)
    ...
    await admin.close()
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import os
import socket
import time

import httptools

from pyproxy.admin import handlers as _h

log = logging.getLogger("pyproxy.admin")

MAX_HEADER_BYTES = 60 * 1024     # Envoy's default max_request_headers_kb
MAX_HEADERS = 100                # Envoy's default max_headers_count
MAX_BODY_BYTES = 1024 * 1024
IDLE_TIMEOUT_S = 300.0

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            413: "Payload Too Large", 431: "Request Header Fields Too Large",
            500: "Internal Server Error", 503: "Service Unavailable"}

_date_cache = [0, b""]


def _http_date() -> bytes:
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[0] = now
        _date_cache[1] = email.utils.formatdate(now, usegmt=True).encode()
    return _date_cache[1]


class _Abort(Exception):
    def __init__(self, status: int):
        self.status = status


class _AdminConnection(asyncio.Protocol):
    __slots__ = ("server", "transport", "parser", "url", "headers", "hdr_bytes", "body",
                 "body_bytes", "cur_name", "closing", "idle_handle", "peer", "paused",
                 "in_headers")

    def __init__(self, server: "AdminServer"):
        self.server = server
        self.transport = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = []
        self.headers: list = []
        self.hdr_bytes = 0
        self.body: list = []
        self.body_bytes = 0
        self.cur_name = b""
        self.closing = False
        self.idle_handle = None
        self.peer = ""
        self.paused = False
        self.in_headers = False

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

    def data_received(self, data: bytes):
        if self.closing:
            return
        self._arm_idle()
        try:
            self.parser.feed_data(data)
        except _Abort as a:
            self._fail(a.status)
        except httptools.HttpParserCallbackError as e:
            cause = e.__context__
            self._fail(cause.status if isinstance(cause, _Abort) else 400)
        except httptools.HttpParserUpgrade:
            self._fail(400)
        except httptools.HttpParserError:
            self._fail(400)

    def pause_writing(self):
        if not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def resume_writing(self):
        if self.paused and self.transport is not None and not self.closing:
            self.paused = False
            self.transport.resume_reading()

    # -- parser callbacks ---------------------------------------------------------------------
    def on_message_begin(self):
        self.url = []
        self.headers = []
        self.hdr_bytes = 0
        self.body = []
        self.body_bytes = 0
        self.in_headers = True

    def on_url(self, url: bytes):
        self.hdr_bytes += len(url)
        if self.hdr_bytes > MAX_HEADER_BYTES:
            raise _Abort(431)
        self.url.append(url)

    def on_header(self, name: bytes, value: bytes):
        self.hdr_bytes += len(name) + len(value)
        if self.hdr_bytes > MAX_HEADER_BYTES or len(self.headers) >= MAX_HEADERS:
            raise _Abort(431)
        self.headers.append((name.decode("latin-1").lower(), value.decode("latin-1")))

    def on_headers_complete(self):
        self.in_headers = False
        for k, v in self.headers:
            if k == "expect" and v.lower() == "100-continue" and self.transport is not None:
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                break

    def on_body(self, body: bytes):
        self.body_bytes += len(body)
        if self.body_bytes > MAX_BODY_BYTES:
            raise _Abort(413)
        self.body.append(body)

    def on_message_complete(self):
        method = self.parser.get_method().decode("latin-1")
        raw = b"".join(self.url)
        try:
            u = httptools.parse_url(raw)
        except httptools.HttpParserInvalidURLError:
            raise _Abort(400) from None
        path = (u.path or b"/").decode("latin-1")
        query = (u.query or b"").decode("latin-1")
        keep_alive = self.parser.should_keep_alive()
        try:
            accept = next((v for k, v in self.headers if k == "accept"), "")
            resp = _h.dispatch(self.server, "GET" if method == "HEAD" else method, path, query, accept)
        except Exception as e:  # a broken context must not take the admin down
            log.error("admin handler for %s failed: %r", path, e)
            resp = _h.Response(500, _h.TEXT, "internal error: %s\n" % e)
        self._write(resp, keep_alive, head=(method == "HEAD"))
        self._access_log(method, raw.decode("latin-1"), resp)
        if resp.after is not None:
            asyncio.get_running_loop().call_soon(self._run_after, resp.after)
        if not keep_alive:
            self._close_after_write()

    # -- helpers ------------------------------------------------------------------------------
    @staticmethod
    def _run_after(fn):
        try:
            fn()
        except Exception as e:
            log.error("admin action failed: %r", e)

    def _write(self, resp, keep_alive: bool, head: bool = False):
        if self.transport is None or self.transport.is_closing():
            return
        hdr = b"".join((
            b"HTTP/1.1 %d %s\r\n" % (resp.status, _REASONS.get(resp.status, "Unknown").encode()),
            b"content-type: ", resp.content_type.encode(), b"\r\n",
            b"cache-control: no-cache, max-age=0\r\nx-content-type-options: nosniff\r\n",
            b"date: ", _http_date(), b"\r\n",
            b"server: envoy\r\n",
            b"content-length: %d\r\n" % len(resp.body),
            b"" if keep_alive else b"connection: close\r\n",
            b"\r\n"))
        self.transport.write(hdr if head else hdr + resp.body)

    def _fail(self, status: int):
        """Answer a request we cannot parse or accept, then close (Envoy's local reply)."""
        body = _REASONS.get(status, "Bad Request").encode()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join((
                b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, "Bad Request").encode()),
                b"content-length: %d\r\ncontent-type: text/plain\r\n" % len(body),
                b"date: ", _http_date(), b"\r\nserver: envoy\r\nconnection: close\r\n\r\n", body)))
        self._close_after_write()

    def _close_after_write(self):
        self.closing = True
        if self.transport is not None:
            self.transport.close()  # flushes buffered data, then closes

    def _arm_idle(self):
        if self.idle_handle is not None:
            self.idle_handle.cancel()
        self.idle_handle = asyncio.get_running_loop().call_later(
            self.server.idle_timeout, self._on_idle)

    def _on_idle(self):
        self.idle_handle = None
        if self.transport is not None and not self.transport.is_closing():
            self.closing = True
            self.transport.close()

    def _access_log(self, method: str, url: str, resp):
        loggers = self.server.access_logs
        if not loggers:
            return
        from pyproxy.http.headers import Headers
        from pyproxy.stream_info import StreamInfo
        si = StreamInfo(downstream_remote_address=self.peer)
        si.response_code = resp.status
        si.bytes_sent = len(resp.body)
        si.bytes_received = self.body_bytes
        si.end_monotonic = time.monotonic()
        req = Headers([(":method", method), (":path", url)] + self.headers)
        rsp = Headers([(":status", str(resp.status)), ("content-type", resp.content_type)])
        for lg in loggers:
            try:
                lg.log(si, req, rsp)
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
