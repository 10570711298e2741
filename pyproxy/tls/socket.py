"""TLS on a live connection: ``ssl.SSLObject`` over a pair of ``ssl.MemoryBIO``.

The layer sits between the plaintext asyncio transport and whoever used it, and presents the same
transport interface upward (write/writelines/write_eof/close/abort, pause/resume_reading,
is_closing, write-buffer size and limits, get_extra_info with 'ssl_object', 'peercert', 'cipher',
'sslcontext'), so network filters, codecs and pools never know they run over TLS.

- ``ServerTls`` (listeners): the listener filters have already read the ClientHello, so TLS starts
  on a connection that exists: the layer replaces ``conn.transport``, takes over ``conn.on_data_cb``
  (ciphertext in) and passes decrypted bytes to the chain's filters. Writes made before the
  handshake ends are held and sent encrypted after it. ``write_eof`` sends close_notify, then FIN.
  A failed handshake (bad ClientHello, wrong CA, missing client certificate, SAN mismatch) sends
  OpenSSL's alert where there is one and closes; it is counted under ``listener.<name>.ssl.*``.
  The handshake is bounded by the chain's ``transport_socket_connect_timeout``, else by
  ``DEFAULT_HANDSHAKE_TIMEOUT`` (Envoy has no default; a peer that never finishes would hold the
  connection until an idle timeout, which tcp_proxy chains may not have).
- ``ClientTls`` (cluster pools, ``tls.client``) builds on the same layer.

Per record, the hot path calls the C ``_ssl._SSLSocket`` under the ``SSLObject`` directly (the
``ssl.SSLObject`` methods are Python wrappers around it), and reads without an ``SSLWantReadError``
in the common case of whole records: it stops when neither the incoming BIO nor OpenSSL holds
bytes. A response leaves as one ``SSL_write`` (writes of one event-loop turn are joined above, in
the connection's write batch), so its records go out in one transport write.
"""

from __future__ import annotations

import logging
import ssl

from . import tickets
from .peer import peer_facts
from .ssl_stats import (TIMEOUT, SslStats, cluster_stats, count_failure, error_text, failure_kind,  # noqa: F401
                        listener_ssl_stats, listener_stats)

log = logging.getLogger("pyproxy.tls")

HANDSHAKE, OPEN, CLOSED = 0, 1, 2
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
RECORD = 16384  # an SSL_read returns at most one record's plaintext

_WantRead = ssl.SSLWantReadError
_ZeroReturn = ssl.SSLZeroReturnError
_SSLError = ssl.SSLError


class TlsLayer:
    """What the server and client sides share: the SSLObject, its BIOs, the transport interface."""

    __slots__ = ("raw", "obj", "so", "inc", "out", "tls", "state", "wq", "timer", "stats", "close_sent",
                 "peer_eof", "alpn", "version", "cipher_name", "peer_uri_san", "peer_dns_san",
                 "peer_principal", "peer_subject", "peer_issuer", "peer_serial", "sni", "cert_facts",
                 "peer_principals", "ticket_due")

    def _init(self, tls, stats):
        self.tls = tls
        self.stats = stats
        self.raw = None
        self.obj = None
        self.so = None
        self.inc = ssl.MemoryBIO()
        self.out = ssl.MemoryBIO()
        self.state = HANDSHAKE
        self.wq = []
        self.timer = None
        self.close_sent = False
        self.peer_eof = False
        self.alpn = ""
        self.version = ""
        self.cipher_name = ""
        self.peer_uri_san = ""
        self.peer_dns_san = ""
        self.peer_principal = ""
        self.peer_principals = ()
        self.peer_subject = ""
        self.peer_issuer = ""
        self.peer_serial = ""
        self.sni = ""
        self.cert_facts = None
        self.ticket_due = False  # a TLS 1.3 session ticket goes out with the next write

    def _wrap(self, server_side: bool, server_hostname=None, session=None) -> None:
        """The ``SSLObject`` over this layer's BIOs, and the C object under it (``so``) that the
        per-record path calls without the Python wrapper (the SSLObject itself where it has none)."""
        obj = self.obj = self.tls.ctx.wrap_bio(self.inc, self.out, server_side=server_side,
                                               server_hostname=server_hostname, session=session)
        self.so = getattr(obj, "_sslobj", None) or obj

    # -- handshake ----------------------------------------------------------------------------------
    def _flush_out(self) -> None:
        out = self.out
        if out.pending:
            self.raw.write(out.read())

    def _handshake(self):
        """True once complete, False while it needs more bytes, None after a failure (closed)."""
        try:
            self.so.do_handshake()
        except _WantRead:
            self._flush_out()
            return False
        except (_SSLError, OSError, ValueError) as e:
            self._flush_out()  # OpenSSL's alert, if it wrote one
            self._failed(failure_kind(e), error_text(e))
            return None
        self._flush_out()
        tls = self.tls
        # OpenSSL verified the peer's chain in this handshake; what Python reads from the verified
        # leaf (SANs, names, serial) is parsed once per distinct certificate (peer_facts)
        so = self.so
        facts = None
        if tls.verifies:
            der = so.getpeercert(True)
            if der:
                facts = peer_facts(so, der)
        kind = tls.check_peer(so, facts)
        if kind:
            self._failed(kind, "TLS_error:|peer certificate: %s:TLS_error_end" % kind)
            return None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.state = OPEN
        self._record(facts)
        return True

    def _record(self, facts) -> None:
        """Facts of the finished handshake (for access logs, RBAC, stats)."""
        obj = self.so
        self.version = obj.version() or ""
        self.alpn = obj.selected_alpn_protocol() or ""
        c = obj.cipher()
        self.cipher_name = c[0] if c else ""
        st = self.stats
        if st is not None:
            st.handshake_done(self.version, self.cipher_name)
            if obj.session_reused:
                st.inc("ssl.session_reused")
        if self.tls.verifies:
            if facts is not None:
                self.peer_uri_san = facts.uri
                self.peer_dns_san = facts.dns
                self.peer_subject = facts.subject
                self.peer_issuer = facts.issuer
                self.peer_serial = facts.serial
                self.peer_principal = facts.principal
                self.peer_principals = facts.principals
            elif st is not None:
                st.no_certificate.inc()
        elif st is not None and self.tls.server:
            st.no_certificate.inc()

    def client_cert(self):
        """The peer's verified certificate, for x-forwarded-client-cert: a ``PeerCert`` (DER of
        the leaf and of the chain it sent, leaf first), or None when the peer presented none or
        this side does not verify peers. Computed on first use, once per connection."""
        f = self.cert_facts
        if f is None:
            f = False
            if self.tls.verifies and self.state == OPEN:
                der = self.so.getpeercert(True)
                if der:
                    try:
                        chain = tuple(c.public_bytes(2) for c in self.obj._sslobj.get_unverified_chain() or ())
                    except (AttributeError, ValueError):
                        chain = ()
                    f = PeerCert(der, chain or (der,))
            self.cert_facts = f
        return f or None

    def _timeout(self) -> None:
        self.timer = None
        if self.state == HANDSHAKE:
            self._failed(TIMEOUT, "TLS_error:|handshake timeout:TLS_error_end", abort=True)

    def _send_queued(self) -> None:
        wq, self.wq = self.wq, []
        for d in wq:
            if d is None:
                self.write_eof()
            else:
                self.write(d)

    # -- records in ---------------------------------------------------------------------------------
    def _read(self):
        """Decrypt everything buffered: (plaintext, peer sent close_notify). Raises SSLError on a
        fatal record error."""
        try:
            d = self.so.read(RECORD)
            if not d:
                d, eof = b"", True
            elif self.inc.pending or self.so.pending():  # more than one record's plaintext waiting
                d, eof = self._read_more(d)
            else:
                eof = False
        except _WantRead:
            d, eof = b"", False
        except _ZeroReturn:
            d, eof = b"", True
        if self.out.pending:  # post-handshake messages (tickets, key updates)
            self.raw.write(self.out.read())
        return d, eof

    def _read_more(self, d):
        """The records after a first one (``d``, its plaintext): (all their plaintext, eof).
        Each read is of a whole record's size, so OpenSSL keeps no plaintext back: the incoming
        BIO says whether more is buffered."""
        more = [d]
        so = self.so
        inc = self.inc
        eof = False
        try:
            while inc.pending:
                d = so.read(RECORD)
                if not d:
                    eof = True
                    break
                more.append(d)
        except _WantRead:  # the last record is not all here yet
            pass
        except _ZeroReturn:
            eof = True
        return b"".join(more), eof

    # -- transport interface ------------------------------------------------------------------------
    def write(self, data) -> None:
        if self.state == OPEN:
            if not data or self.close_sent:
                return
            if self.ticket_due:
                self.ticket_due = False
                tickets.issue(self.so)
            try:
                self.so.write(data)
            except _SSLError as e:
                log.debug("TLS write failed: %s", e)
                self.abort()
                return
            self.raw.write(self.out.read())
        elif self.state == HANDSHAKE:
            if data:
                self.wq.append(bytes(data))

    def writelines(self, chunks) -> None:
        self.write(b"".join(chunks))

    def write_eof(self) -> None:
        """TLS close_notify, then the TCP half-close; reading goes on until the peer closes."""
        if self.state == HANDSHAKE:
            self.wq.append(None)
            return
        if self.state != OPEN or self.close_sent:
            return
        self._close_notify()
        self.raw.write_eof()

    def can_write_eof(self) -> bool:
        return True

    def _close_notify(self) -> None:
        # A session ticket still due (nothing was written) is not sent with the close, unlike
        # BoringSSL's: asking OpenSSL for one puts the connection back "in init" until it is
        # written, and if writing it failed, SSL_shutdown would refuse ("shutdown while in init")
        # and the peer would get an internal_error alert instead of close_notify. The close is
        # what matters; a client that got no response has little use for a ticket.
        self.close_sent = True
        self.ticket_due = False
        try:
            self.obj.unwrap()
        except (_SSLError, ValueError, OSError):
            pass  # want-read: ours is sent, the peer's comes (or not) later
        self._flush_out()

    def close(self) -> None:
        if self.state == OPEN and not self.close_sent:
            self._close_notify()
        self._closed()
        self.raw.close()

    def abort(self) -> None:
        self._closed()
        self.raw.abort()

    def _closed(self) -> None:
        self.state = CLOSED
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def is_closing(self) -> bool:
        return self.state == CLOSED or self.raw.is_closing()

    def pause_reading(self) -> None:
        self.raw.pause_reading()

    def resume_reading(self) -> None:
        self.raw.resume_reading()

    def is_reading(self) -> bool:
        return self.raw.is_reading()

    def get_write_buffer_size(self) -> int:
        return self.raw.get_write_buffer_size() + self.out.pending

    def get_write_buffer_limits(self):
        return self.raw.get_write_buffer_limits()

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        self.raw.set_write_buffer_limits(high=high, low=low)

    def get_extra_info(self, name, default=None):
        obj = self.obj
        if name == "ssl_object":
            return obj
        if name == "sslcontext":
            return self.tls.ctx
        if obj is not None and self.state != HANDSHAKE:
            if name == "peercert":
                return obj.getpeercert()
            if name == "cipher":
                return obj.cipher()
            if name == "compression":
                return obj.compression()
            if name == "alpn_protocol":
                return self.alpn or None
        return self.raw.get_extra_info(name, default)


class PeerCert:
    """A peer certificate's bytes (and a per-connection cache of XFCC values built from them)."""

    __slots__ = ("der", "chain", "xfcc")

    def __init__(self, der: bytes, chain: tuple):
        self.der = der
        self.chain = chain
        self.xfcc = {}


# -- server side (listeners) --------------------------------------------------------------------------

class ServerTls(TlsLayer):
    """TLS server over a DownstreamConnection: ``conn.transport`` becomes this layer."""

    __slots__ = ("conn", "sink", "rx")

    def __init__(self, tls, conn, chain=None):
        self._init(tls, listener_stats(conn))
        self.conn = conn
        self.sink = None
        self.rx = False
        self.raw = conn.transport
        self._wrap(True)
        conn.transport = self
        timeout = DEFAULT_HANDSHAKE_TIMEOUT
        if chain is not None:
            p = getattr(chain, "proto", None)
            if p is not None and p.HasField("transport_socket_connect_timeout"):
                d = p.transport_socket_connect_timeout
                timeout = d.seconds + d.nanos / 1e9
        if timeout > 0:
            self.timer = conn.manager.loop.call_later(timeout, self._timeout)
        conn.close_cbs.append(self._lost)

    def start(self) -> None:
        """The chain's filters exist: ciphertext now comes here, plaintext goes to them."""
        conn = self.conn
        self.sink = conn.on_data_cb
        conn.on_data_cb = self.feed

    def feed(self, data, end_stream) -> None:
        if self.state == OPEN and data and not end_stream:
            # the hot path (bytes in on an open connection; usually one whole record): _read inlined
            inc = self.inc
            inc.write(data)
            eof = False
            try:
                plain = self.so.read(RECORD)
                if not plain:
                    eof = True
                elif inc.pending:
                    plain, eof = self._read_more(plain)
            except _WantRead:  # part of a record: the rest comes with the next read
                plain = b""
            except _ZeroReturn:
                plain = b""
                eof = True
            except (_SSLError, OSError) as e:
                self._read_failed(e)
                return
            out = self.out
            if out.pending:  # post-handshake messages (tickets, key updates)
                self.raw.write(out.read())
            if plain:
                self.sink(plain, False)
            if eof and not self.peer_eof and not self.conn.closed:
                self.peer_eof = True
                self.sink(b"", True)
            return
        if data:
            self.inc.write(data)
        if self.state != OPEN:
            if self.state == CLOSED:
                return
            if data:
                self.rx = True
            elif not self.rx:
                if end_stream:  # closed before sending anything: not a TLS error (as Envoy)
                    self._closed()
                    self.conn.close(flush=True)
                return
            r = self._handshake()
            if not r:
                if r is False and end_stream:
                    self._failed("", "TLS_error:|connection closed during handshake:TLS_error_end")
                return
            self._opened()
            if self.state != OPEN:
                return
            if not (self.inc.pending or self.so.pending() or end_stream):
                return
        try:
            plain, eof = self._read()
        except (_SSLError, OSError) as e:
            self._read_failed(e)
            return
        conn = self.conn
        if plain:
            self.sink(plain, False)
        if (eof or end_stream) and not self.peer_eof and not conn.closed:
            self.peer_eof = True
            self.sink(b"", True)

    def _read_failed(self, e) -> None:
        """A fatal record error (a bad MAC, an alert): counted, the connection reset."""
        self.stats.connection_error.inc()
        self.conn.stream_info.connection_termination_details = error_text(e)
        self.conn.close(flush=False)

    def _opened(self) -> None:
        conn = self.conn
        conn.ssl = self
        if self.tls.defer_ticket and self.version == "TLSv1.3":
            self.ticket_due = True
        si = conn.stream_info
        si.downstream_tls_version = self.version
        si.downstream_peer_uri_san = self.peer_uri_san
        si.downstream_local_uri_san = self.tls.local_uri_san
        si.downstream_ssl = self
        sni = getattr(self.obj, "pyproxy_sni", None)
        if sni:
            self.sni = sni
            if not si.requested_server_name:
                si.requested_server_name = sni
        cb = conn.on_tls_open
        if cb is not None:  # (istio.metadata_exchange: the negotiated ALPN is known now)
            conn.on_tls_open = None
            cb()
        if self.wq:
            self._send_queued()

    def _failed(self, kind: str, reason: str, abort: bool = False) -> None:
        count_failure(self.stats, kind, "downstream_cx_transport_socket_connect_timeout")
        self._closed()
        conn = self.conn
        conn.stream_info.connection_termination_details = reason
        log.debug("downstream TLS handshake failed (%s): %s", conn.remote_address, reason)
        conn.close(flush=not abort)

    def _lost(self) -> None:
        if self.state == HANDSHAKE and self.rx:
            self.stats.connection_error.inc()
        self._closed()
