"""``envoy.filters.listener.tls_inspector``: SNI and ALPN from a TLS ClientHello, without consuming it.

The first bytes of the connection are peeked (the connection keeps them and hands them on to the
filter chain untouched). A TLS handshake record sets ``transport_protocol = "tls"`` and, from the
ClientHello, ``server_name`` (SNI host_name) and ``application_protocols`` (ALPN, in the client's
order). Anything else leaves ``raw_buffer``. The ClientHello may span several records; it is
reassembled up to ``max_client_hello_size`` (default and maximum 64 KiB, as Envoy's).
"""

from __future__ import annotations

import struct

from ...config import ConfigError, u32

from ...http.filter import CONTINUE, STOP

_HANDSHAKE = 0x16
_CLIENT_HELLO = 1
_EXT_SNI = 0
_EXT_ALPN = 16
DEFAULT_MAX_HELLO = 64 * 1024
MAX_MAX_HELLO = 64 * 1024

_HH = struct.Struct(">HH").unpack_from  # an extension's type and length

NEED_MORE, NOT_TLS = "more", "not-tls"


class ClientHello:
    __slots__ = ("server_name", "alpn", "version")

    def __init__(self):
        self.server_name = ""
        self.alpn = ()
        self.version = 0


def parse_client_hello(buf: bytes, max_size: int = MAX_MAX_HELLO):
    """``ClientHello`` from the start of a stream, ``NEED_MORE`` or ``NOT_TLS``.

    Malformed TLS (a handshake record whose content does not parse) is ``NOT_TLS`` too, except that
    the transport is still reported as TLS by the caller when the record header was valid.
    """
    n = len(buf)
    if n >= 1 and buf[0] != _HANDSHAKE:
        return NOT_TLS
    if n >= 2 and buf[1] != 3:
        return NOT_TLS
    if n >= 3 and buf[2] > 4:
        return NOT_TLS
    # reassemble the handshake message from consecutive handshake records
    body = bytearray()
    pos = 0
    need = None  # total handshake message length once known
    while True:
        if pos + 5 > n:
            return NEED_MORE
        if buf[pos] != _HANDSHAKE or buf[pos + 1] != 3:
            return NOT_TLS
        rlen = (buf[pos + 3] << 8) | buf[pos + 4]
        if rlen == 0 or rlen > 16384 + 2048:
            return NOT_TLS
        take = buf[pos + 5:pos + 5 + rlen]
        body += take
        if need is None and len(body) >= 4:
            if body[0] != _CLIENT_HELLO:
                return NOT_TLS
            need = 4 + ((body[1] << 16) | (body[2] << 8) | body[3])
            if need > max_size:
                return NOT_TLS
        if need is not None and len(body) >= need:
            return _parse_hello(bytes(body[4:need]))
        if len(take) < rlen:
            return NEED_MORE
        pos += 5 + rlen
        if pos > max_size + 5 * 8:
            return NOT_TLS


def _parse_hello(b: bytes):
    ch = ClientHello()
    try:
        ch.version = (b[0] << 8) | b[1]
        p = 2 + 32
        sid = b[p]
        p += 1 + sid
        cs = (b[p] << 8) | b[p + 1]
        p += 2 + cs
        comp = b[p]
        p += 1 + comp
        if p >= len(b):
            return ch  # no extensions
        elen = (b[p] << 8) | b[p + 1]
        p += 2
        end = min(len(b), p + elen)
        hh = _HH
        # (only SNI and ALPN are sliced out; an extension running past the end stops the walk)
        while p + 4 <= end:
            et, el = hh(b, p)
            p += 4
            if et == _EXT_SNI or et == _EXT_ALPN:
                ext = b[p:p + el]
                if len(ext) < el:
                    break
                if et == _EXT_SNI:
                    ch.server_name = _sni(ext)
                else:
                    ch.alpn = _alpn(ext)
            p += el
    except IndexError:
        pass  # truncated body: keep what was read (Envoy treats the transport as TLS anyway)
    return ch


def _sni(ext: bytes) -> str:
    if len(ext) < 2:
        return ""
    q = 2
    end = min(len(ext), 2 + ((ext[0] << 8) | ext[1]))
    while q + 3 <= end:
        t = ext[q]
        ln = (ext[q + 1] << 8) | ext[q + 2]
        q += 3
        name = ext[q:q + ln]
        q += ln
        if t == 0 and name:
            try:
                return name.decode("ascii").lower()
            except UnicodeDecodeError:
                return ""
    return ""


def _alpn(ext: bytes) -> tuple:
    if len(ext) < 2:
        return ()
    out = []
    q = 2
    end = min(len(ext), 2 + ((ext[0] << 8) | ext[1]))
    while q < end:
        ln = ext[q]
        q += 1
        if ln == 0 or q + ln > end:
            break
        out.append(ext[q:q + ln].decode("latin-1"))
        q += ln
    return tuple(out)


class TlsInspector:
    __slots__ = ("max_size", "close_on_error", "st_tls_found", "st_tls_not_found", "st_sni_found",
                 "st_alpn_found", "st_alpn_not_found", "st_sni_not_found", "st_client_hello_too_large")
    needs_data = True

    def __init__(self, cfg, ctx):
        self.max_size = DEFAULT_MAX_HELLO
        self.close_on_error = False
        if cfg is not None:
            self.max_size = u32(cfg, "max_client_hello_size", DEFAULT_MAX_HELLO)
            if self.max_size > MAX_MAX_HELLO:
                raise ConfigError("max_client_hello_size of %d is greater than maximum of %d"
                                  % (self.max_size, MAX_MAX_HELLO), field="max_client_hello_size")
            self.close_on_error = cfg.close_connection_on_client_hello_parsing_errors
        s = ctx.stats.scope("tls_inspector.") if ctx is not None and ctx.stats is not None else None
        c = s.counter if s is not None else (lambda name: _Null())
        self.st_tls_found = c("tls_found")
        self.st_tls_not_found = c("tls_not_found")
        self.st_sni_found = c("sni_found")
        self.st_sni_not_found = c("sni_not_found")
        self.st_alpn_found = c("alpn_found")
        self.st_alpn_not_found = c("alpn_not_found")
        self.st_client_hello_too_large = c("client_hello_too_large")

    def on_accept(self, conn) -> int:
        return STOP

    def on_data(self, conn, buf: bytes, eof: bool) -> int:
        r = parse_client_hello(buf, self.max_size)
        if r is NEED_MORE:
            if len(buf) > self.max_size + 5 * 8:
                self.st_client_hello_too_large.value += 1
                return CONTINUE
            return CONTINUE if eof else STOP
        if r is NOT_TLS:
            self.st_tls_not_found.value += 1
            if self.close_on_error and buf[:1] == b"\x16":
                conn.close(flush=False)
            return CONTINUE
        info = conn.info
        info.transport_protocol = "tls"
        self.st_tls_found.value += 1
        if r.server_name:
            info.server_name = r.server_name
            self.st_sni_found.value += 1
        else:
            self.st_sni_not_found.value += 1
        if r.alpn:
            info.application_protocols = r.alpn
            self.st_alpn_found.value += 1
        else:
            self.st_alpn_not_found.value += 1
        return CONTINUE


class _Null:
    __slots__ = ("value",)

    def __init__(self):
        self.value = 0


def factory(cfg, ctx):
    return TlsInspector(cfg, ctx)
