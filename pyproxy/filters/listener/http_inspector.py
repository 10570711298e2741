"""``envoy.filters.listener.http_inspector``: is this plaintext HTTP/1.x or HTTP/2 (h2c)?

Peeks at the first bytes (nothing is consumed): the HTTP/2 connection preface gives
``application_protocols = ("h2c",)``; a request line ``METHOD SP target SP HTTP/1.x CRLF`` with a
known method gives ``("http/1.1",)`` or ``("http/1.0",)``. Anything else (or a connection already
detected as TLS) leaves the application protocols alone. Gives up after 8 KiB without a line end.
"""

from __future__ import annotations

from ...http.filter import CONTINUE, STOP

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
MAX_INSPECT = 8192

METHODS = frozenset(m.encode() for m in (
    "GET HEAD POST PUT DELETE CONNECT OPTIONS TRACE PATCH PROPFIND PROPPATCH MKCOL COPY MOVE LOCK "
    "UNLOCK SEARCH REPORT MKACTIVITY CHECKOUT MERGE M-SEARCH NOTIFY SUBSCRIBE UNSUBSCRIBE PURGE "
    "MKCALENDAR LINK UNLINK BIND REBIND UNBIND ACL SOURCE QUERY").split())
_PREFIXES = frozenset(m[:i] for m in METHODS for i in range(1, len(m) + 1))
_MAX_METHOD = max(len(m) for m in METHODS)

H2C, HTTP11, HTTP10 = "h2c", "http/1.1", "http/1.0"
NEED_MORE = "more"


def detect(buf: bytes):
    """``"h2c"``, ``"http/1.1"``, ``"http/1.0"``, ``None`` (not HTTP) or ``NEED_MORE``."""
    n = len(buf)
    if n == 0:
        return NEED_MORE
    k = min(n, len(H2_PREFACE))
    if buf[:k] == H2_PREFACE[:k]:
        if n >= len(H2_PREFACE):
            return H2C
        # "PRI" is not an HTTP/1 method we accept; keep waiting for the full preface
        return NEED_MORE
    sp = buf.find(b" ", 0, _MAX_METHOD + 1)
    if sp < 0:
        head = buf[:_MAX_METHOD + 1]
        return NEED_MORE if head in _PREFIXES else None
    if buf[:sp] not in METHODS:
        return None
    eol = buf.find(b"\r\n", sp)
    if eol < 0:
        if n >= MAX_INSPECT:
            return None
        # the line so far must not contain bytes that can't be in a request line
        if b"\n" in buf or b"\r" in buf[sp:-1] or b"\x00" in buf:
            return None
        return NEED_MORE
    line = buf[:eol]
    parts = line.split(b" ")
    if len(parts) != 3 or not parts[1]:
        return None
    ver = parts[2]
    if ver == b"HTTP/1.1":
        return HTTP11
    if ver == b"HTTP/1.0":
        return HTTP10
    return None


class HttpInspector:
    __slots__ = ("st_http10", "st_http11", "st_http2", "st_not_found")
    needs_data = True

    def __init__(self, ctx):
        s = ctx.stats.scope("http_inspector.") if ctx is not None and ctx.stats is not None else None
        self.st_http10 = s.counter("http10_found") if s else None
        self.st_http11 = s.counter("http11_found") if s else None
        self.st_http2 = s.counter("http2_found") if s else None
        self.st_not_found = s.counter("http_not_found") if s else None

    def on_accept(self, conn) -> int:
        return STOP

    def on_data(self, conn, buf: bytes, eof: bool) -> int:
        info = conn.info
        if info.transport_protocol not in ("", "raw_buffer"):
            return CONTINUE
        r = detect(buf)
        if r is NEED_MORE:
            if eof:
                self._count(None)
                return CONTINUE
            return STOP
        self._count(r)
        if r is not None:
            info.application_protocols = (r,)
        return CONTINUE

    def _count(self, r):
        c = {H2C: self.st_http2, HTTP11: self.st_http11, HTTP10: self.st_http10}.get(r, self.st_not_found)
        if c is not None:
            c.value += 1


def factory(cfg, ctx):
    return HttpInspector(ctx)
