"""TLS on upstream connections (cluster pools): ``ClientTls``, an asyncio protocol on the raw
socket that completes the handshake first, then calls the pool connection's ``connection_made``
with itself as the transport. A failure or timeout is a connect failure (counted under
``cluster.<name>.ssl.*``)."""

from __future__ import annotations

import asyncio
import logging

from .socket import CLOSED, DEFAULT_HANDSHAKE_TIMEOUT, HANDSHAKE, OPEN, TlsLayer, _SSLError
from .ssl_stats import TIMEOUT, cluster_stats, count_failure

log = logging.getLogger("pyproxy.tls")


class TlsHandshakeError(ConnectionError):
    """An upstream TLS handshake failed (its text is Envoy-style: ``TLS_error:|...:TLS_error_end``)."""


class ClientTls(TlsLayer, asyncio.Protocol):
    """The asyncio protocol of an upstream socket; the pool's connection protocol sits above it."""

    __slots__ = ("app", "waiter", "made", "keep_open", "want_session")

    def __init__(self, tls, app, waiter, stats, timeout: float, loop):
        self._init(tls, stats)
        self.app = app
        self.waiter = waiter
        self.made = False
        self.keep_open = False
        self.want_session = tls.resume
        self.timer = loop.call_later(timeout if timeout and timeout > 0 else DEFAULT_HANDSHAKE_TIMEOUT,
                                     self._timeout)

    def connection_made(self, raw):
        self.raw = raw
        tls = self.tls
        session = tls.session
        if session is not None:
            tls.session = None  # this connection resumes with it and leaves the next one its own
        self._wrap(False, tls.sni, session)
        self._handshake()

    def _keep_session(self) -> None:
        """Leave this connection's session for the next one to resume with: in TLS 1.2 it is there
        when the handshake ends, in TLS 1.3 its ticket comes after the handshake, before the first
        application data (Envoy sends its tickets with its first write). One look after the first
        data read, then no more."""
        s = self.so.session
        if s is not None and s.has_ticket:
            self.tls.session = s
            self.want_session = False

    def data_received(self, data):
        self.inc.write(data)
        if self.state != OPEN:
            if self.state == CLOSED:
                return
            if not self._handshake():
                return
            if self.want_session:
                self._keep_session()
            self._opened()
            if self.state != OPEN or not (self.inc.pending or self.so.pending()):
                return
        try:
            plain, eof = self._read()
        except (_SSLError, OSError) as e:
            log.debug("upstream TLS read failed: %s", e)
            if self.stats is not None:
                self.stats.connection_error.inc()
            self.abort()
            return
        if plain:
            if self.want_session:
                self._keep_session()
                self.want_session = False
            self.app.data_received(plain)
        if eof and not self.peer_eof and self.state == OPEN:
            self.peer_eof = True
            self.keep_open = bool(self.app.eof_received())
            if not self.keep_open:
                self.close()

    def eof_received(self):
        if self.state == HANDSHAKE:
            self._failed("", "TLS_error:|connection closed during handshake:TLS_error_end")
            return False
        if not self.made:
            return False
        if not self.peer_eof:
            self.peer_eof = True
            self.keep_open = bool(self.app.eof_received())
        return self.keep_open

    def connection_lost(self, exc):
        was = self.state
        self._closed()
        if self.made:
            self.app.connection_lost(exc)
        elif not self.waiter.done():
            if was == HANDSHAKE and self.stats is not None:
                self.stats.connection_error.inc()
            self.waiter.set_exception(TlsHandshakeError(
                "TLS_error:|connection closed during handshake:TLS_error_end"))

    def pause_writing(self):
        if self.made:
            self.app.pause_writing()

    def resume_writing(self):
        if self.made:
            self.app.resume_writing()

    def _opened(self) -> None:
        self.made = True
        self.app.connection_made(self)
        if not self.waiter.done():
            self.waiter.set_result(None)
        if self.wq:
            self._send_queued()

    def _failed(self, kind: str, reason: str, abort: bool = False) -> None:
        if self.stats is not None and kind != TIMEOUT:
            count_failure(self.stats, kind, "")
        self._closed()
        if not self.waiter.done():
            if abort:
                self.waiter.set_exception(asyncio.TimeoutError())
            else:
                self.waiter.set_exception(TlsHandshakeError(reason))
        if abort:
            self.raw.abort()
        else:
            self.raw.close()


async def connect_client(loop, tls, sock, app, timeout: float, scope) -> None:
    """TLS over the connected ``sock``; returns once ``app.connection_made`` has run (handshake done).
    Raises ``TlsHandshakeError`` (an OSError) or ``asyncio.TimeoutError``; the socket is closed then."""
    waiter = loop.create_future()
    proto = ClientTls(tls, app, waiter, cluster_stats(scope), timeout, loop)
    try:
        await loop.create_connection(lambda: proto, sock=sock)
    except BaseException:
        proto._closed()
        sock.close()
        raise
    try:
        await waiter
    except BaseException:
        if proto.state != CLOSED or not proto.raw.is_closing():
            proto.abort()
        raise
