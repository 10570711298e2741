"""HTTP/1.1 codec on httptools (llhttp): the server side (downstream; the client side is http1_client.py).

Both sides turn bytes into the same stream events the HTTP/2 codec produces:
``decode_headers(headers, end_stream)``, ``decode_data(data, end_stream)``, ``decode_trailers``;
and encode events back into bytes. Header names are lower-cased; ``Host`` becomes ``:authority``.

Strictness follows Envoy: anything ambiguous (CL+TE, repeated or invalid Content-Length, invalid
chunking, obs-fold, bare LF, NUL/CR in values, oversized headers, invalid methods) is a protocol error
answered with 400/431 and a closed connection, never forwarded.

The server codec's parts: the request side here (parsing, pipelining, the connection's events),
the response side in ``http1_response.py`` (``Http1ResponseEncoder``), what both codecs share in
``http1_common.py``.
"""

from __future__ import annotations

import httptools

from .authority import OK as _AUTH_OK, authority_ok
from .headers import H1_SCHEME_HTTP, Headers, coalesce
from .http1_common import (HTTP10, HTTP11, METHOD_NAMES as _METHOD_NAMES, ChunkedBody, ProtocolError, parser_error,
                           request_framing)
from .http1_response import Http1ResponseEncoder


# request headers the server codec looks at as they arrive: framing and hop-by-hop (and the
# names its creator asks it to note, ``note``)
_FRAMING = frozenset((b"content-length", b"transfer-encoding", b"expect", b"connection", b"keep-alive",
                      b"proxy-connection", b"te", b"upgrade", b"host"))
_FRAMING_NAMES = frozenset(n.decode() for n in _FRAMING - {b"host"})
_strip = bytes.strip
# where the URL starts in a request line with single spaces, by method (up to 9 bytes: on_headers_complete)
_URL_AT = {m: len(m) + 1 for m in _METHOD_NAMES if len(m) <= 9}
_new_headers = Headers.__new__


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


class Http1ServerCodec(Http1ResponseEncoder):
    """Downstream HTTP/1.1: parses requests, hands them to ``conn_manager`` as streams.

    Requests are served one at a time in order (pipelined requests wait, with reading paused).
    """

    __slots__ = (
        "conn", "manager", "parser", "url", "hdrs", "max_flat", "max_header_bytes",
        "max_headers", "stream", "request_complete", "pending", "cur_events", "chunked",
        "content_length", "te_seen", "upgrade", "closed", "keep_alive", "version",
        "response_chunked", "response_close", "method", "tunnel",
        "expect_continue", "headers_done", "drain_close", "accept_http_10", "default_host_10",
        "parse_error", "msg_started", "head_bytes", "note", "noted", "on_request",
        "hop_seen", "watched", "h2c", "h2c_left", "rht", "rht_handle", "watch_nohost", "ct", "body_left",
        "feed_len", "split_head", "data",
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
        self.body_left = None  # (http1_response.Http1ResponseEncoder)
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
        # where a request head goes: ``on_request(codec, headers, end_stream, version, direct, quiet,
        # plain, ct)`` (the manager's one entry; it sets ``stream``; ``direct``: just parsed, so the
        # flags from ``noted``, ``hop_seen`` and ``ct`` describe it)
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
        # the bytes being parsed, and a head begun in earlier ones (one read <= max_header_bytes bounds it)
        self.feed_len = self.split_head = 0
        # the bytes being parsed while no request ended in them yet (False once one did): a head
        # that starts them shows its version line there (on_headers_complete)
        self.data = False
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
        self.on_data(data, False)

    def on_data(self, data: bytes, end_stream: bool) -> None:
        """The connection's bytes (the connection manager hands them over directly)."""
        if end_stream or not data:
            if data:
                self.on_data(data, False)
            if end_stream and not self.closed:
                self.on_eof()
            return
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
        self.feed_len = len(data)
        self.data = data
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
            status, details = parser_error(str(e))
            self.protocol_error(status, details)
            return
        if self.msg_started and not self.headers_done:
            self.split_head = True  # (the head goes on in the next bytes: on_headers_complete checks its size)
            if counts:
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

    _framing = request_framing  # (http1_common.py)

    def _noting(self) -> bool:
        """The head has noted names and no framing or hop-by-hop one: ``noted``, nothing else to
        check (on_message_complete clears it)."""
        self.noted = True
        return True

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
            d = self.data
            if self.split_head or self.feed_len > self.max_header_bytes:  # (else one short read held it)
                self.split_head = False
                d = False  # (the head began in earlier bytes)
                if len(url) + sum(map(len, raw)) > self.max_header_bytes:
                    raise ProtocolError(431, "http1.headers_too_large")
            names = b"\n".join(raw[0::2]).lower().decode("latin-1").split("\n")
            values = b"\n".join(map(_strip, raw[1::2])).decode("latin-1").split("\n")
            once = len(names) == len({*names})  # (no name repeated)
            if not once:
                # a repeated name: Envoy's inline headers become one line (http/headers.py)
                names, values = coalesce(names, values)
            self.ct = "content-type" in names
            if self.watch_nohost.isdisjoint(names) or (_FRAMING_NAMES.isdisjoint(names) and self._noting()):
                # the common case: nothing to check but Host (usually the first line); or only names
                # noted for the manager (a request through another proxy: x-request-id, ...)
                if once and names[0] == "host":
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
            d = False
            authority = None
            rest = ()
            self.ct = False
        if authority is not None and authority not in _AUTH_OK and not authority_ok(authority):
            raise ProtocolError(400, "http.invalid_authority")  # (http/authority.py: as Envoy)
        p = self.parser
        m = p.get_method()
        method = _METHOD_NAMES.get(m)
        if method is None:
            raise ProtocolError(400, "http1.codec_error")
        # HTTP/1.1 read off the request line when the bytes being parsed start with this head
        # (``d``: no request ended in them before it, and not split after its URL began), instead of
        # from llhttp's numbers, which get_http_version formats into a new string per request. The
        # line's only CR ends it, so " HTTP/1.1\r\n" where single spaces put the version is the
        # version; with more spaces it is not found there. (Bytes that begin in an earlier part of the
        # method or its spaces put that place at most len(method) - 10 bytes past the line's end:
        # _URL_AT has the methods of up to 9 bytes only.)
        i = _URL_AT.get(m) if d else None
        if i is not None and d[(i := i + len(url)):i + 11] == b" HTTP/1.1\r\n":
            version = "1.1"
        else:
            version = p.get_http_version()
        url = url.decode("latin-1")
        if (version == "1.1" and not self.watched and url[:1] == "/" and authority is not None
                and "#" not in url and method != "CONNECT"):
            # the common case: HTTP/1.1, origin-form with a Host, no framing or hop-by-hop header
            # (so no Connection and no Upgrade: llhttp's answers are keep-alive and no upgrade)
            # and no body
            h = [(":method", method), H1_SCHEME_HTTP, (":path", url), (":authority", authority)]
            h += rest
            headers = _new_headers(Headers)
            headers._h = h  # (h is this request's own list: no copy)
            self.version = HTTP11
            self.headers_done = True
            if self.stream is not None or self.pending is not None:
                self._pipelined(headers, True, True, False)
                return
            self.request_complete = True
            self.response_chunked = False
            self.response_close = False
            self.method = method
            self.on_request(self, headers, True, HTTP11, True, not self.noted, True, self.ct)
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
                raise ProtocolError(426, "low_version" if version == "1.0" else "http1.codec_error")
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
            h = [(":method", method), H1_SCHEME_HTTP, (":path", url), (":authority", authority)]
        elif method == "CONNECT":
            if not authority_ok(url):
                raise ProtocolError(400, "http.invalid_authority")
            h = [(":method", method), (":authority", url)]
        else:
            h = [(":method", method)]
            if url[:1] != "/" and url != "*":
                # absolute-form: take the path and authority out of it
                scheme, sep, remainder = url.partition("://")
                if not sep:
                    raise ProtocolError(400, "http1.codec_error")
                host, slash, path = remainder.partition("/")
                host = host.rpartition("@")[2]  # (userinfo is not part of the host: Envoy drops it)
                if host:  # (RFC 9112 3.2.2: the request-target's authority wins over Host, as Envoy)
                    if not authority_ok(host):
                        raise ProtocolError(400, "http.invalid_authority")
                    authority = host
                url = "/" + path
                scheme = scheme.lower()
                h.append((":scheme", scheme) if scheme in ("http", "https") else H1_SCHEME_HTTP)  # (the URL's, as Envoy)
            else:
                h.append(H1_SCHEME_HTTP)
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
        self.response_chunked = False
        self.response_close = not self.keep_alive
        self.method = method
        if self.expect_continue:
            self.conn.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self.on_request(self, headers, not has_body, self.version)
        else:
            self.on_request(self, headers, not has_body, self.version, self.version is HTTP11,
                            not (self.noted or self.hop_seen), not self.hop_seen, self.ct)

    def _pipelined(self, headers, end_stream, keep_alive, upgrade) -> None:
        """A request parsed while another is served: it waits for the current response."""
        ev = [("h", headers, end_stream, self.version, keep_alive, upgrade, self.expect_continue)]
        if self.pending is None:
            # one read-disable for the whole queue (released by _replay_pending when it empties)
            self.pending = []
            self.conn.read_disable(True)
        self.pending.append(ev)
        self.cur_events = ev

    def _start_stream(self, headers, end_stream, version, keep_alive, upgrade, expect_continue):
        """A pipelined request's turn: it goes to ``on_request``."""
        self.response_chunked = False
        self.response_close = not keep_alive
        self.method = headers._h[0][1]
        if expect_continue:
            self.conn.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.on_request(self, headers, end_stream, version)

    def on_body(self, body: bytes):
        if self.cur_events is not None:
            self.cur_events.append(("d", body))
            return
        s = self.stream
        if s is not None:
            s.decode_data(body, False)

    def _h2c_body(self, data: bytes) -> bytes:
        """The body of an h2c upgrade request (llhttp hands it over as "upgraded" bytes):
        ``h2c_left`` is the byte count still due, or a ``ChunkedBody`` decoder. Delivered as
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
        if self.watched or self.h2c or self.cur_events is not None:
            return self._message_done()
        # (the common case: no body, nothing _framing recorded, not queued behind another request;
        # data: a request ended in the bytes being parsed)
        self.msg_started = self.headers_done = self.noted = self.data = False  # (noted: _noting)
        self.request_complete = True

    def _message_done(self):
        if self.h2c and self.headers_done and not self.h2c_left:
            if self.chunked:
                self.h2c_left = ChunkedBody()  # the body comes as "upgraded" bytes: see feed
                return
            if self.content_length:
                self.h2c_left = self.content_length
                return
        self.msg_started = self.headers_done = self.data = False
        if self.watched:
            had_body = self.chunked or (self.content_length or 0) > 0
            if self.chunked:
                self.hdrs = []  # (the head's lines, kept for counting trailers)
                self.max_flat = 2 * self.max_headers
            self._reset_request()  # ready for the next request's callbacks
        else:
            had_body = False
            self.noted = False  # (_noting)
        if self.cur_events is not None:
            # a pipelined request waiting its turn (the active stream's state is left alone)
            self.cur_events.append(("e",))
            self.cur_events = None
            return
        self.request_complete = True
        s = self.stream
        if s is not None and had_body:
            s.decode_data(b"", True)

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
        """The client closed its sending side (FIN). As Envoy (HTTP connections do not half-close,
        an upgraded one neither), it is the connection's end: a request in flight or a tunnel is
        reset (``downstream_remote_disconnect``), and its upstream request with it, instead of
        holding both until the upstream answers."""
        self.conn.close(flush=self.stream is None)
