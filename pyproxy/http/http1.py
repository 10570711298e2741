"""HTTP/1.1 codec on httptools (llhttp): the server side (downstream; the client side is http1_client.py).

Both sides turn bytes into the same stream events the HTTP/2 codec produces:
``decode_headers(headers, end_stream)``, ``decode_data(data, end_stream)``, ``decode_trailers``;
and encode events back into bytes. Header names are lower-cased; ``Host`` becomes ``:authority``.

Strictness follows Envoy: anything ambiguous (CL+TE, repeated or invalid Content-Length, invalid
chunking, obs-fold, bare LF, NUL/CR in values, oversized headers, invalid methods) is a protocol error
answered with 400/431 and a closed connection, never forwarded.
"""

from __future__ import annotations

import httptools

from .headers import Headers

HTTP11 = "HTTP/1.1"
HTTP10 = "HTTP/1.0"

# Hop-by-hop headers removed when forwarding (Envoy strips these on HTTP/1).
HOP_BY_HOP = frozenset((
    "connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te",
))

_TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_METHODS = frozenset((
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH", "PROPFIND",
    "PROPPATCH", "MKCOL", "COPY", "MOVE", "LOCK", "UNLOCK", "SEARCH", "REPORT", "MKACTIVITY",
    "CHECKOUT", "MERGE", "M-SEARCH", "NOTIFY", "SUBSCRIBE", "UNSUBSCRIBE", "PURGE", "MKCALENDAR",
    "LINK", "UNLINK", "ACL", "BIND", "REBIND", "UNBIND", "VERSION-CONTROL", "CHECKIN",
    "UNCHECKOUT", "MKWORKSPACE", "UPDATE", "LABEL", "BASELINE-CONTROL", "ORDERPATCH",
    "MKREDIRECTREF", "UPDATEREDIRECTREF",
))

_METHOD_NAMES = {m.encode(): m for m in _METHODS}  # llhttp's method bytes -> the name we accept

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
# request headers the server codec looks at as they arrive: framing and hop-by-hop (and the
# names its creator asks it to note, ``note``)
_FRAMING = frozenset((b"content-length", b"transfer-encoding", b"expect", b"connection", b"keep-alive",
                      b"proxy-connection", b"te", b"upgrade", b"host"))
_FRAMING_NAMES = frozenset(n.decode() for n in _FRAMING - {b"host"})
_strip = bytes.strip
_new_headers = Headers.__new__
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


def _parser_error(msg: str):
    """llhttp's error message -> (status, details) as Envoy answers the same input."""
    if "Transfer-Encoding" in msg:
        if "Content-Length" in msg:
            return 400, "http1.content_length_and_chunked_not_allowed"
        # an unsupported or repeated transfer-coding: Envoy says 501
        return 501, "http1.invalid_transfer_encoding"
    if "Content-Length" in msg:
        return 400, "http1.content_length_not_allowed"
    return 400, "http1.codec_error"


class _ChunkedBody:
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


def _new_request_parser(proto):
    p = httptools.HttpRequestParser(proto)
    # llhttp's strict mode, spelled out so a library default change cannot loosen it. The version is
    # parsed leniently only so that any version can be answered (426) by ``on_headers_complete``.
    p.set_dangerous_leniencies(
        lenient_headers=False, lenient_chunked_length=False, lenient_keep_alive=False,
        lenient_transfer_encoding=False, lenient_version=True, lenient_data_after_close=False,
        lenient_optional_lf_after_cr=False, lenient_optional_cr_before_lf=False,
        lenient_optional_crlf_after_chunk=False, lenient_spaces_after_chunk_size=False)
    return p


def encode_headers_block(headers: Headers, skip=HOP_BY_HOP) -> list:
    """Regular (non-pseudo) headers as ``name: value\\r\\n`` byte strings, hop-by-hop removed."""
    out = []
    for k, v in headers._h:
        if k[0] == ":" or k in skip:
            continue
        out.append(("%s: %s\r\n" % (k, v)).encode("latin-1"))
    return out


class Http1ServerCodec:
    """Downstream HTTP/1.1: parses requests, hands them to ``conn_manager`` as streams.

    Requests are served one at a time in order (pipelined requests wait, with reading paused).
    """

    __slots__ = (
        "conn", "manager", "parser", "url", "hdrs", "max_flat", "max_header_bytes",
        "max_headers", "stream", "request_complete", "pending", "cur_events", "chunked",
        "content_length", "te_seen", "upgrade", "closed", "keep_alive", "version",
        "response_chunked", "response_head_done", "response_close", "method", "tunnel",
        "expect_continue", "headers_done", "drain_close", "accept_http_10", "default_host_10",
        "parse_error", "msg_started", "head_bytes", "note", "noted", "on_request",
        "hop_seen", "watched", "h2c", "h2c_left", "rht", "rht_handle", "watch_nohost", "ct",
    )

    def __init__(self, conn, manager, max_header_bytes: int = 60 * 1024, max_headers: int = 100,
                 accept_http_10: bool | None = None, default_host_for_http_10: str | None = None,
                 note: frozenset = frozenset()):
        self.conn = conn  # the downstream Connection (write, close, read_disable)
        self.manager = manager  # HttpConnectionManager runtime (new_stream)
        self.parser = _new_request_parser(self)
        self.max_header_bytes = max_header_bytes
        self.max_headers = max_headers
        self.stream = None  # the ActiveStream being served
        self.pending = None  # list of event lists for pipelined requests waiting their turn
        self.cur_events = None  # when buffering a pipelined request: its events
        self.closed = False
        self.tunnel = False
        self.drain_close = False
        # HTTP/1.0 is refused (426) unless the HCM's http_protocol_options.accept_http_10 says so
        cfg = getattr(manager, "cfg", None)
        if accept_http_10 is None:
            accept_http_10 = bool(getattr(cfg, "accept_http_10", False))
        if default_host_for_http_10 is None:
            default_host_for_http_10 = getattr(cfg, "default_host_for_http_10", "") or ""
        self.accept_http_10 = accept_http_10
        self.default_host_10 = default_host_for_http_10
        self.request_complete = False
        self.ct = False  # the request head (the last one parsed) has a content-type header
        self.parse_error = False
        self.msg_started = False
        # header names (lower-case bytes) whose presence in a request the codec notes (``noted``,
        # also set by a fragment in the path), for the manager; framing and hop-by-hop: ``hop_seen``
        self.note = note = frozenset(n.decode("latin-1") for n in note - _FRAMING)
        # (any of these names in a request head sends it down the header-by-header path: _framing)
        self.watch_nohost = _FRAMING_NAMES | note
        # where a request head goes: ``on_request(codec, headers, end_stream, version, direct)``
        # (it sets ``stream``; ``direct``: just parsed, so ``noted`` and ``hop_seen`` describe it)
        self.on_request = manager.on_request
        self.h2c = False  # the request asked for an h2c upgrade: served as HTTP/1.1 instead
        self.h2c_left = 0  # bytes of such a request's body still to come (see _h2c_body)
        # request_headers_timeout (0: none): a timer from a request's first byte to its last header
        self.rht = float(getattr(cfg, "request_headers_timeout", 0.0) or 0.0)
        self.rht_handle = None
        self.upgrade = False
        self.url = b""
        # the request head's header lines as they arrive, raw: ``[name, value, name, value, ...]``
        # (one list for the connection; translated at once by on_headers_complete)
        self.hdrs = []
        self.max_flat = 2 * max_headers  # (a chunked request's trailers: see _over_limit)
        self.headers_done = False
        self.watched = True  # (_reset_request sets everything the first time)
        self._reset_request()

    def _reset_request(self):
        """What _framing (or a fragment) recorded about the request that just completed (most
        requests set none of it)."""
        self.watched = False
        self.head_bytes = 0
        self.chunked = False
        self.content_length = None
        self.te_seen = False
        self.expect_continue = False
        self.noted = False
        self.hop_seen = False

    # -- bytes in ---------------------------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        if self.tunnel:
            self.stream.decode_data(data, False)
            return
        if self.h2c_left:
            data = self._h2c_body(data)
            if not data:
                return
        if self.parse_error:
            return  # a pipelined request was malformed: nothing after it is read
        # bytes of a request head still in progress (httptools buffers a header line until it ends,
        # so a line that never ends is bounded here, not in on_header); headers_done is False
        # between requests too
        counts = not self.headers_done
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as u:
            off = u.args[0]
            rest = data[off:]
            if self.h2c:
                # (Envoy's codec strips an h2c upgrade: the connection stays HTTP/1.1; llhttp
                # hands the request's body over as upgraded bytes: _h2c_body delivers it)
                self.h2c = False
                self.parser = _new_request_parser(self)
                if rest:
                    self.feed(rest)
                return
            self.tunnel = True
            if rest and self.stream is not None:
                self.stream.decode_data(rest, False)
        except ProtocolError as e:
            self.protocol_error(e.status, e.details)
        except httptools.HttpParserCallbackError as e:
            cause = e.__context__
            if isinstance(cause, ProtocolError):
                self.protocol_error(cause.status, cause.details)
            else:
                raise (cause or e)
        except httptools.HttpParserInvalidMethodError:
            self.protocol_error(400, "http1.codec_error")
        except httptools.HttpParserError as e:
            status, details = _parser_error(str(e))
            self.protocol_error(status, details)
            return
        if counts and self.msg_started and not self.headers_done:
            self.watched = True  # (_reset_request resets head_bytes)
            self.head_bytes += len(data)
            if self.head_bytes > self.max_header_bytes + 1024 + 4 * self.max_headers:
                self.protocol_error(431, "http1.headers_too_large")

    def protocol_error(self, status: int, details: str) -> None:
        """Bad request bytes: answer (if nothing was answered yet) and close.

        If the bad bytes belong to a pipelined request (the active stream's request was complete),
        the requests before it are answered first; the error is queued behind them."""
        if self.closed or self.parse_error:
            return
        self.parse_error = True
        if self.pending is not None or (self.stream is not None and self.request_complete):
            if self.pending is None:
                self.pending = []
                self.conn.read_disable(True)
            if self.cur_events is not None:
                # the malformed request itself never completed: it is never started
                try:
                    self.pending.remove(self.cur_events)
                except ValueError:
                    pass
                self.cur_events = None
            self.pending.append([("x", status, details)])
            return
        self.manager.on_codec_error(self, status, details)

    def on_data(self, data: bytes, end_stream: bool) -> None:
        """The connection's bytes, when the connection manager hands them over directly."""
        if data:
            self.feed(data)
        if end_stream and not self.closed:
            self.on_eof()

    # -- httptools callbacks ----------------------------------------------------------------------
    # (no on_message_begin: the per-request state is reset when a request completes, and a request
    # has begun once its URL arrives; every callback httptools finds costs a call per request)

    def on_url(self, url: bytes):
        if self.msg_started:
            url = self.url = self.url + url  # (the URL arrived in pieces)
        else:
            self.msg_started = True
            self.url = url
            if self.rht and self.rht_handle is None:
                self.rht_handle = self.manager.cfg.loop.call_later(self.rht, self._headers_timeout)
        if len(url) > self.max_header_bytes:
            raise ProtocolError(431, "http1.headers_too_large")

    def on_header(self, name: bytes, value: bytes):
        # (the lines are checked and translated together by on_headers_complete; the head's bytes
        # are bounded by feed, its line count here)
        h = self.hdrs
        h += name, value
        if len(h) > self.max_flat:
            self._over_limit()

    def _over_limit(self):
        """Too many header lines, or (``max_flat`` lowered by on_headers_complete) a trailer of a
        chunked request, which counts with the head's lines and bytes, as in Envoy."""
        h = self.hdrs
        if len(h) > 2 * self.max_headers:
            raise ProtocolError(431, "http1.too_many_headers")
        if len(self.url) + sum(map(len, h)) > self.max_header_bytes:
            raise ProtocolError(431, "http1.headers_too_large")

    def _framing(self, names: list, values: list):
        """The head carries framing, hop-by-hop or noted headers: checked one by one (as Envoy
        does). Returns ``(regular headers, authority)``; Host and ``Expect: 100-continue`` are
        consumed (the first becomes ``:authority``)."""
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

    def _headers_timeout(self):
        self.rht_handle = None
        if not self.closed and self.msg_started and not self.headers_done:
            self.manager.on_request_headers_timeout(self)

    def on_headers_complete(self):
        if self.rht_handle is not None:
            self.rht_handle.cancel()
            self.rht_handle = None
        # the head's lines at once: one join, lower-casing and decoding for all the names and one
        # for all the values (llhttp refuses CR, LF and NUL in both), then split
        raw = self.hdrs
        url = self.url
        if raw:
            if len(url) + sum(map(len, raw)) > self.max_header_bytes:
                raise ProtocolError(431, "http1.headers_too_large")
            names = b"\n".join(raw[0::2]).lower().decode("latin-1").split("\n")
            values = b"\n".join(map(_strip, raw[1::2])).decode("latin-1").split("\n")
            self.ct = "content-type" in names
            if self.watch_nohost.isdisjoint(names):
                # the common case: nothing to check but Host (usually the first line)
                if names[0] == "host" and names.count("host") == 1:
                    rest = zip(names, values)
                    authority = next(rest)[1]
                else:
                    authority = None
                    if "host" in names:
                        if names.count("host") > 1:
                            raise ProtocolError(400, "http1.codec_error")
                        i = names.index("host")
                        del names[i]
                        authority = values.pop(i)
                    rest = zip(names, values)
                self.hdrs = []
            else:
                rest, authority = self._framing(names, values)
        else:
            authority = None
            rest = ()
            self.ct = False
        p = self.parser
        method = _METHOD_NAMES.get(p.get_method())
        if method is None:
            raise ProtocolError(400, "http1.codec_error")
        version = p.get_http_version()
        url = url.decode("latin-1")
        if (version == "1.1" and not self.watched and url[:1] == "/" and authority is not None
                and "#" not in url and method != "CONNECT"):
            # the common case: HTTP/1.1, origin-form with a Host, no framing or hop-by-hop header
            # (so no Connection and no Upgrade: llhttp's answers are keep-alive and no upgrade)
            # and no body
            h = [(":method", method), (":scheme", "http"), (":path", url), (":authority", authority)]
            h += rest
            headers = _new_headers(Headers)
            headers._h = h  # (h is this request's own list: no copy)
            self.version = HTTP11
            self.headers_done = True
            if self.stream is not None or self.pending is not None:
                self._pipelined(headers, True, True, False)
                return
            self.request_complete = True
            self.response_head_done = False
            self.response_chunked = False
            self.response_close = False
            self.method = method
            self.on_request(self, headers, True, HTTP11, True)
            return
        if version == "1.1" and not self.watched:
            self.version = HTTP11
            self.keep_alive = True
            self.upgrade = method == "CONNECT"
        else:
            if version == "1.1":
                self.version = HTTP11
            elif version == "1.0" and self.accept_http_10:
                self.version = HTTP10
                if self.te_seen:
                    raise ProtocolError(400, "http1.invalid_transfer_encoding")
            else:
                # HTTP/0.9, HTTP/1.0 when not accepted, HTTP/2.0 or 1.7 as text: Envoy's answer
                raise ProtocolError(426, "http1.upgrade_required" if version == "1.0" else "http1.codec_error")
            self.keep_alive = p.should_keep_alive()
            self.upgrade = p.should_upgrade()
            if self.upgrade and method != "CONNECT":
                for k, v in rest:  # (a list: the upgrade header went through _framing)
                    if k == "upgrade":
                        if v.lower() == "h2c":
                            # not supported (as in Envoy): the request preparation strips the upgrade
                            # headers and the request is served as an ordinary HTTP/1.1 request
                            self.upgrade = False
                            self.h2c = True
                        break
        if "#" in url:
            self.noted = True  # (a fragment)
            self.watched = True
        if url[:1] == "/" and authority is not None and method != "CONNECT":
            # the common case: origin-form with a Host
            h = [(":method", method), (":scheme", "http"), (":path", url), (":authority", authority)]
        elif method == "CONNECT":
            h = [(":method", method), (":authority", url)]
        else:
            h = [(":method", method)]
            if url[:1] != "/" and url != "*":
                # absolute-form: take the path and authority out of it
                scheme, sep, remainder = url.partition("://")
                if not sep:
                    raise ProtocolError(400, "http1.codec_error")
                host, slash, path = remainder.partition("/")
                authority = authority or host
                url = "/" + path
            h.append((":scheme", "http"))
            h.append((":path", url))
            if authority is None:
                if self.version == HTTP11 or not self.default_host_10:
                    raise ProtocolError(400, "missing_host_header")
                authority = self.default_host_10
            h.append((":authority", authority))
        h += rest
        headers = _new_headers(Headers)
        headers._h = h  # (h is this request's own list: no copy)
        self.headers_done = True
        if self.watched:
            has_body = self.chunked or (self.content_length or 0) > 0 or self.upgrade or method == "CONNECT"
        else:
            has_body = method == "CONNECT"
        if self.stream is not None or self.pending is not None:
            self._pipelined(headers, not has_body, self.keep_alive, self.upgrade)
            return
        self.request_complete = not has_body
        # (_start_stream, inlined for the common case)
        self.response_head_done = False
        self.response_chunked = False
        self.response_close = not self.keep_alive
        self.method = method
        if self.expect_continue:
            self.conn.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self.on_request(self, headers, not has_body, self.version, False)
        else:
            self.on_request(self, headers, not has_body, self.version, True)

    def _pipelined(self, headers, end_stream, keep_alive, upgrade) -> None:
        """A request parsed while another is served: it waits for the current response."""
        ev = [("h", headers, end_stream, self.version, keep_alive, upgrade, self.expect_continue)]
        if self.pending is None:
            # one read-disable for the whole queue (released by _replay_pending when it empties)
            self.pending = []
            self.conn.read_disable(True)
        self.pending.append(ev)
        self.cur_events = ev

    def write_error(self, status: int, text: str, date: str, server: str) -> None:
        """Envoy's answer to a request head too malformed for a stream (then the connection closes)."""
        body = text.encode()
        self.conn.write(("HTTP/1.1 %d %s\r\ncontent-length: %d\r\n%sdate: %s\r\nserver: %s\r\n"
                         "connection: close\r\n\r\n" % (
                             status, REASONS.get(status, "Bad Request"), len(body),
                             "content-type: text/plain\r\n" if body else "", date, server)).encode() + body)

    def _start_stream(self, headers, end_stream, version, keep_alive, upgrade, expect_continue):
        """A pipelined request's turn: it goes to ``on_request``."""
        self.response_head_done = False
        self.response_chunked = False
        self.response_close = not keep_alive
        self.method = headers._h[0][1]
        if expect_continue:
            self.conn.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.on_request(self, headers, end_stream, version, False)

    def on_body(self, body: bytes):
        if self.cur_events is not None:
            self.cur_events.append(("d", body))
            return
        s = self.stream
        if s is not None:
            s.decode_data(body, False)

    def _h2c_body(self, data: bytes) -> bytes:
        """The body of an h2c upgrade request (llhttp hands it over as "upgraded" bytes):
        ``h2c_left`` is the byte count still due, or a ``_ChunkedBody`` decoder. Delivered as
        body, then the request completes; returns what follows it."""
        left = self.h2c_left
        if type(left) is int:
            body, rest = data[:left], data[left:]
            left -= len(body)
            self.h2c_left = left
            if body:
                self.on_body(body)
            done = not left
        else:
            try:
                parts, done, rest = left.feed(data)
            except ValueError:
                self.h2c_left = 0
                self.protocol_error(400, "http1.invalid_chunk_size")
                return b""
            for b in parts:
                self.on_body(b)
            if done:
                self.h2c_left = 0
        if done:
            self.on_message_complete()
        return rest

    def on_message_complete(self):
        if self.h2c and self.headers_done and not self.h2c_left:
            if self.chunked:
                self.h2c_left = _ChunkedBody()  # the body comes as "upgraded" bytes: see feed
                return
            if self.content_length:
                self.h2c_left = self.content_length
                return
        self.msg_started = False
        self.headers_done = False
        if self.watched:
            had_body = self.chunked or (self.content_length or 0) > 0
            if self.chunked:
                self.hdrs = []  # (the head's lines, kept for counting trailers)
                self.max_flat = 2 * self.max_headers
            self._reset_request()  # ready for the next request's callbacks
        else:
            had_body = False
        if self.cur_events is not None:
            # a pipelined request waiting its turn (the active stream's state is left alone)
            self.cur_events.append(("e",))
            self.cur_events = None
            return
        self.request_complete = True
        s = self.stream
        if s is not None and had_body:
            s.decode_data(b"", True)

    # -- response encoding (called by the stream) ----------------------------------------------
    def encode_headers(self, headers: Headers, end_stream: bool) -> None:
        h = headers._h
        status = int(h[0][1]) if h and h[0][0] == ":status" else int(headers.get(":status", "200"))
        if status == 100:
            return  # Envoy answers Expect itself; upstream 100s are not forwarded
        if status == 101:
            self._encode_upgrade_head(h)
            if end_stream:
                self._response_complete()
            return
        # the common case in one pass: every regular header but the framing and hop-by-hop ones
        # (content-length stays where it is, as Envoy writes it; the framing it adds goes last)
        parts = [f"{k}: {v}\r\n" for k, v in h if k[0] != ":" and k not in HOP_BY_HOP]
        add = parts.append
        cl = None
        for k, v in h:
            if k == "content-length":
                cl = v
                break
        if self.method == "CONNECT" and 200 <= status < 300:
            self.tunnel = True
            if cl is not None:
                parts = [p for p in parts if not p.startswith("content-length:")]
                add = parts.append
        elif cl is not None:
            pass
        elif end_stream:
            if status not in (204, 304) and status >= 200 and self.method != "HEAD":
                add("content-length: 0\r\n")
        elif self.method != "HEAD" and status not in (204, 304):
            if self.version == HTTP11:
                self.response_chunked = True
                add("transfer-encoding: chunked\r\n")
            else:
                self.response_close = True
        if self.drain_close or (self.response_close and not self.tunnel):
            self.response_close = True
            add("connection: close\r\n")
        elif self.version == HTTP10:
            add("connection: keep-alive\r\n")
        add("\r\n")
        self.response_head_done = True
        self.conn.write(status_line(status) + "".join(parts).encode("latin-1"))
        if end_stream:
            self._response_complete()

    def _encode_upgrade_head(self, h) -> None:
        """A 101 Switching Protocols: upgrade/connection kept, the connection becomes a tunnel."""
        parts = []
        add = parts.append
        for k, v in h:
            if k[0] == ":" or k == "content-length":
                continue
            if k in HOP_BY_HOP:
                if k == "upgrade":
                    add("upgrade: " + v + "\r\n")
                elif k == "connection":
                    add("connection: upgrade\r\n")
                continue
            add(k + ": " + v + "\r\n")
        self.tunnel = True
        if self.drain_close:
            self.response_close = True
            add("connection: close\r\n")
        add("\r\n")
        self.response_head_done = True
        self.conn.write(status_line(101) + "".join(parts).encode("latin-1"))

    def encode_data(self, data: bytes, end_stream: bool) -> None:
        self.write_body(data, end_stream)
        if end_stream:
            self._response_complete()

    def write_body(self, data: bytes, end_stream: bool) -> None:
        """Response body bytes, framed (chunked or as they are); the last chunk on end_stream."""
        if self.response_chunked:
            if data:
                self.conn.write(b"%x\r\n%b\r\n" % (len(data), data))
            if end_stream:
                self.conn.write(b"0\r\n\r\n")
        elif data:
            self.conn.write(data)

    def encode_trailers(self, trailers: Headers) -> None:
        if self.response_chunked:
            self.conn.write(b"0\r\n" + b"".join(encode_headers_block(trailers)) + b"\r\n")
            self.response_chunked = False
        self._response_complete()

    def _response_complete(self) -> None:
        if self.tunnel:
            self.conn.close(flush=True)
            return
        self.stream = None
        if self.response_close or not self.request_complete:
            # request not fully read: the connection cannot be reused safely
            self.conn.close(flush=True)
            return
        if self.pending:
            self._replay_pending()

    def _replay_pending(self) -> None:
        while self.pending and self.stream is None:
            ev = self.pending.pop(0)
            if ev[0][0] == "x":
                # a malformed pipelined request: its turn has come, answer it and close
                self.pending = None
                self.manager.on_codec_error(self, ev[0][1], ev[0][2])
                return
            _, headers, end_stream, version, keep_alive, upgrade, expect = ev[0]
            complete = end_stream or any(e[0] == "e" for e in ev[1:])
            if self.cur_events is ev:
                self.cur_events = None  # the rest of this request's body goes straight to its stream
            self.request_complete = complete
            self._start_stream(headers, end_stream, version, keep_alive, upgrade, expect)
            s = self.stream
            for e in ev[1:]:
                if s is not self.stream or self.closed:
                    break
                if e[0] == "d":
                    s.decode_data(e[1], False)
                elif e[0] == "e" and not end_stream:
                    s.decode_data(b"", True)
        if not self.pending:
            self.pending = None
            if not self.closed:
                self.conn.read_disable(False)

    # -- connection events ------------------------------------------------------------------------
    def on_close(self) -> None:
        self.closed = True
        if self.rht_handle is not None:
            self.rht_handle.cancel()
            self.rht_handle = None
        s = self.stream
        if s is not None:
            self.stream = None
            s.on_reset("downstream_remote_disconnect")

    def on_eof(self) -> None:
        """The client half-closed. A tunnel forwards the half-close; otherwise close when idle."""
        if self.tunnel and self.stream is not None:
            self.stream.decode_data(b"", True)
            return
        if self.stream is None:
            self.conn.close(flush=True)
        else:
            self.request_complete = self.request_complete or not self.headers_done
            self.response_close = True
