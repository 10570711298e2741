"""HTTP/1.1 protocol elements shared by the server codec (http1.py, http1_response.py) and the
client codec (http1_client.py): versions, reason phrases and status lines, the hop-by-hop header
names, protocol errors and how llhttp's errors map to Envoy's answers, the server codec's check of
a request head's framing headers, header line encoding, and the chunked-body decoder for bodies
llhttp does not read (an h2c upgrade request's).
"""

from __future__ import annotations

import time

from .headers import Headers
from .http_date import http_date

HTTP11 = "HTTP/1.1"
HTTP10 = "HTTP/1.0"

METHODS = frozenset((
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH", "PROPFIND",
    "PROPPATCH", "MKCOL", "COPY", "MOVE", "LOCK", "UNLOCK", "SEARCH", "REPORT", "MKACTIVITY",
    "CHECKOUT", "MERGE", "M-SEARCH", "NOTIFY", "SUBSCRIBE", "UNSUBSCRIBE", "PURGE", "MKCALENDAR",
    "LINK", "UNLINK", "ACL", "BIND", "REBIND", "UNBIND", "VERSION-CONTROL", "CHECKIN",
    "UNCHECKOUT", "MKWORKSPACE", "UPDATE", "LABEL", "BASELINE-CONTROL", "ORDERPATCH",
    "MKREDIRECTREF", "UPDATEREDIRECTREF",
))

METHOD_NAMES = {m.encode(): m for m in METHODS}  # llhttp's method bytes -> the name the server codec accepts

# Hop-by-hop headers removed when forwarding (Envoy strips these on HTTP/1).
HOP_BY_HOP = frozenset((
    "connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te",
))

REASONS = {
    100: "Continue", 101: "Switching Protocols", 200: "OK", 201: "Created", 202: "Accepted",
    203: "Non-Authoritative Information", 204: "No Content", 205: "Reset Content",
    206: "Partial Content", 300: "Multiple Choices", 301: "Moved Permanently", 302: "Found",
    303: "See Other", 304: "Not Modified", 307: "Temporary Redirect", 308: "Permanent Redirect",
    400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
    405: "Method Not Allowed", 406: "Not Acceptable", 408: "Request Timeout", 409: "Conflict",
    410: "Gone", 411: "Length Required", 412: "Precondition Failed", 413: "Payload Too Large",
    414: "URI Too Long", 415: "Unsupported Media Type", 416: "Range Not Satisfiable",
    417: "Expectation Failed", 421: "Misdirected Request", 422: "Unprocessable Entity",
    425: "Too Early", 426: "Upgrade Required", 428: "Precondition Required",
    429: "Too Many Requests", 431: "Request Header Fields Too Large", 500: "Internal Server Error",
    501: "Not Implemented", 502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
}
_STATUS_LINES = {c: ("HTTP/1.1 %d %s\r\n" % (c, r)).encode() for c, r in REASONS.items()}


def status_line(code: int) -> bytes:
    s = _STATUS_LINES.get(code)
    if s is None:
        s = ("HTTP/1.1 %d %s\r\n" % (code, REASONS.get(code, "Unknown"))).encode()
    return s


class ProtocolError(Exception):
    """A request or response that must not be forwarded. ``status`` is what the client gets."""

    def __init__(self, status: int, details: str):
        super().__init__(details)
        self.status = status
        self.details = details


def parser_error(msg: str):
    """llhttp's error message -> (status, details) as Envoy answers the same input."""
    if "Transfer-Encoding" in msg:
        if "Content-Length" in msg:
            return 400, "http1.content_length_and_chunked_not_allowed"
        # an unsupported or repeated transfer-coding: Envoy says 501
        return 501, "http1.invalid_transfer_encoding"
    if "Content-Length" in msg and "Invalid character" not in msg:  # (a non-number: codec_error)
        return 400, "http1.content_length_not_allowed"
    return 400, "http1.codec_error"


class ChunkedBody:
    """A chunked request body read outside llhttp (an h2c upgrade request's, which llhttp treats as
    upgraded bytes): as strict as the parser (hex size, optional extension, CRLF everywhere),
    with bounded size lines and trailers."""

    __slots__ = ("state", "line", "left", "trailer_bytes")

    MAX_LINE = 4096
    MAX_TRAILERS = 64 * 1024

    def __init__(self):
        self.state = 0  # 0 size line, 1 data, 2 CRLF after data, 3 trailers
        self.line = b""
        self.left = 0
        self.trailer_bytes = 0

    def feed(self, data: bytes):
        """``(body parts, done, the bytes after the body)``; ValueError on a malformed body."""
        parts = []
        i = 0
        n = len(data)
        while i < n:
            st = self.state
            if st == 1:
                take = data[i:i + self.left]
                parts.append(take)
                self.left -= len(take)
                i += len(take)
                if not self.left:
                    self.state = 2
                continue
            j = data.find(b"\n", i)
            if j < 0:
                self.line += data[i:]
                if len(self.line) > self.MAX_LINE:
                    raise ValueError("line too long")
                break
            line = self.line + data[i:j + 1]
            self.line = b""
            i = j + 1
            if not line.endswith(b"\r\n") or len(line) > self.MAX_LINE:
                raise ValueError("bad line ending")
            line = line[:-2]
            if st == 2:
                if line:
                    raise ValueError("data after chunk")
                self.state = 0
            elif st == 0:
                size = line.split(b";", 1)[0]
                if not size or len(size) > 16 or not all(c in b"0123456789abcdefABCDEF" for c in size):
                    raise ValueError("bad chunk size")
                self.left = int(size, 16)
                self.state = 1 if self.left else 3
            else:
                self.trailer_bytes += len(line) + 2
                if self.trailer_bytes > self.MAX_TRAILERS:
                    raise ValueError("trailers too large")
                if not line:
                    return [p for p in parts if p], True, data[i:]
        return [p for p in parts if p], False, b""


def encode_headers_block(headers: Headers, skip=HOP_BY_HOP) -> list:
    """Regular (non-pseudo) headers as ``name: value\\r\\n`` byte strings, hop-by-hop removed."""
    out = []
    for k, v in headers._h:
        if k[0] == ":" or k in skip:
            continue
        out.append(("%s: %s\r\n" % (k, v)).encode("latin-1"))
    return out


def header_line(name: str, value: str) -> bytes:
    """One header as an HTTP/1.1 header line, ``name: value\r\n`` (latin-1: UnicodeEncodeError
    for a value outside it)."""
    return ("%s: %s\r\n" % (name, value)).encode("latin-1")


def header_lines(pairs) -> bytes:
    """``(name, value)`` str pairs as HTTP/1.1 header lines, in order."""
    return b"".join(header_line(n, v) for n, v in pairs)


def int_header_template(name: str) -> bytes:
    """The header line of a header whose value is an integer, as a template: ``template % n``."""
    return name.encode("latin-1") + b": %d\r\n"


_time = time.time
_DATE_LINE = [0, b""]


def date_line() -> bytes:
    """``date: <now>\r\n`` (cached for the second, as the date itself)."""
    c = _DATE_LINE
    now = int(_time())
    if c[0] != now:
        c[1] = b"date: " + http_date().encode() + b"\r\n"
        c[0] = now
    return c[1]


# headers a Connection header may not nominate (hop-by-hop removal would drop them): Envoy answers 400
_NOT_HOP_BY_HOP = frozenset(("host", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"))


def request_framing(self, names: list, values: list):
    """The server codec's (http1.py ``Http1ServerCodec._framing``) check of a request head that
    carries framing, hop-by-hop or noted headers: one by one (as Envoy does). Returns
    ``(regular headers, authority)``; Host and ``Expect: 100-continue`` are consumed (the first
    becomes ``:authority``)."""
    self.watched = True
    watch = self.watch_nohost
    note = self.note
    authority = None
    out = []
    for n, v in zip(names, values):
        if n == "host":
            # becomes :authority (the codec's headers never carry a host header)
            if authority is not None:
                raise ProtocolError(400, "http1.codec_error")
            authority = v
            continue
        if n in watch:
            if n == "content-length":
                if not v.isdigit() or not v.isascii() or len(v) > 18:
                    raise ProtocolError(400, "http1.invalid_content_length")
                if self.content_length is not None:
                    raise ProtocolError(400, "http1.multiple_content_length")
                self.content_length = int(v)
            elif n == "transfer-encoding":
                if self.te_seen:
                    raise ProtocolError(501, "http1.invalid_transfer_encoding")
                self.te_seen = True
                if v.lower() != "chunked":
                    raise ProtocolError(501, "http1.invalid_transfer_encoding")
                self.chunked = True
            elif n == "expect" and v.lower() == "100-continue":
                self.expect_continue = True
                continue
            elif n == "connection" and not _NOT_HOP_BY_HOP.isdisjoint(t.strip() for t in v.lower().split(",")):
                raise ProtocolError(400, "http1.connection_header_rejected")  # (as Envoy)
            if n in note:
                self.noted = True
            else:
                self.hop_seen = True  # (framing or hop-by-hop)
        out.append((n, v))
    if self.chunked:
        if self.content_length is not None:
            raise ProtocolError(400, "http1.content_length_and_chunked_not_allowed")
        self.max_flat = len(self.hdrs)  # trailers to come: each one is checked (_over_limit)
    else:
        self.hdrs = []
    return out, authority
