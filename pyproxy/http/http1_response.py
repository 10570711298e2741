"""HTTP/1.1 responses: the server codec's encoding side (``Http1ResponseEncoder``, a part of
``http1.Http1ServerCodec``): the response head from ``Headers`` (framing and hop-by-hop headers
as Envoy writes them), or relayed from an HTTP/1.1 upstream's raw header lines (``relay_head``);
the body (chunked or as it is), trailers, an upgrade's 101, Envoy's answer to a malformed request
head, and the end of a response (keep-alive, close, the next pipelined request).
"""

from __future__ import annotations

from .headers import Headers
from .http1_common import (_STATUS_LINES, HOP_BY_HOP, HTTP10, HTTP11, REASONS, ProtocolError, date_line,
                           encode_headers_block, status_line)

# response header names ``relay_head`` handles itself (framing, hop-by-hop, server, date)
_SERVICE_TIME = b"x-envoy-upstream-service-time"
_RELAY_OWN = frozenset(n.encode() for n in HOP_BY_HOP) | {b"content-length", b"server", b"date", _SERVICE_TIME}
# RelayEdits.kind
_DROP, _K_LENGTH, _K_DATE, _K_SERVER, _K_REPLACE, _K_TAKE, _K_TE, _K_SERVICE_TIME = range(8)


# the framing lines the encoder adds itself (after connection: close, as Envoy's codec)
_FRAMING_LINES = frozenset(("transfer-encoding: chunked\r\n", "content-length: 0\r\n"))
_FRAMING_BYTES = frozenset(s.encode() for s in _FRAMING_LINES)


class RelayEdits:
    """How a connection manager edits the response heads it relays (``relay_head``), decided when
    its config loads:

    - ``server``: its ``server`` header line; ``server_mode`` 0 overwrites the upstream's (in place,
      added last when absent), 1 adds it when absent, 2 passes the upstream's through, adds none;
    - ``replace``: the name (bytes) of a header a response may replace (``relay_head``'s ``rep``),
      or ``b""``;
    - ``drop``: names (bytes) removed from every head;
    - ``take``: names (bytes) held back from the head and handed to ``more``;
    - ``more``: None, or ``more(ctx, taken)``, called by ``relay_head`` (with its ``ctx``) after the
      caller's lines: ``taken`` is None or the held-back ``(name, value)`` str pairs; it returns
      header lines to add, or None;
    - ``special``: every name ``relay_head`` does not copy as it is (these, its own, framing and
      hop-by-hop)."""

    __slots__ = ("server", "server_mode", "replace", "take", "more", "special", "kind")

    def __init__(self, server: bytes, server_mode: int, replace: bytes = b"", drop: frozenset = frozenset(),
                 take: frozenset = frozenset(), more=None):
        self.server = server
        self.server_mode = server_mode
        self.replace = replace
        self.take = take
        self.more = more
        self.special = _RELAY_OWN | take | drop | ({replace} if replace else frozenset())
        # what ``relay_head`` does with each special name (_DROP: nothing, the line goes)
        kind = dict.fromkeys(self.special, _DROP)
        kind.update({_SERVICE_TIME: _K_SERVICE_TIME, b"transfer-encoding": _K_TE})
        kind.update(dict.fromkeys(take, _K_TAKE))
        if replace:
            kind[replace] = _K_REPLACE
        kind.update({b"content-length": _K_LENGTH, b"date": _K_DATE, b"server": _K_SERVER})
        self.kind = kind


class Http1ResponseEncoder:
    """The response side of ``Http1ServerCodec`` (its slots hold the state: ``conn``, ``method``,
    ``version``, ``response_chunked``, ``response_close``, ``tunnel``,
    ``drain_close``, ``request_complete``, ``pending``, ``stream``, ``body_left``).

    ``body_left`` is the number of body bytes the response head announced (its content-length; 0
    for HEAD, 1xx, 204, 304 or a head that ended the response), None when the body is chunked or
    delimited by the close: ``encode_headers`` sets it, and ``encode_data`` refuses a body that
    disagrees with it (the connection closes), so that no upstream can make a response run into
    the next one on a keep-alive connection."""

    __slots__ = ()

    def write_error(self, status: int, text: str, date: str, server: str) -> None:
        """Envoy's answer to a request head too malformed for a stream (then the connection closes)."""
        body = text.encode()
        self.conn.write(("HTTP/1.1 %d %s\r\ncontent-length: %d\r\n%sdate: %s\r\nserver: %s\r\n"
                         "connection: close\r\n\r\n" % (
                             status, REASONS.get(status, "Bad Request"), len(body),
                             "content-type: text/plain\r\n" if body else "", date, server)).encode() + body)

    def encode_headers(self, headers: Headers, end_stream: bool) -> None:
        h = headers._h
        status = int(h[0][1]) if h and h[0][0] == ":status" else int(headers.get(":status", "200"))
        if status == 100:
            return  # Envoy answers Expect itself; upstream 100s are not forwarded
        if status == 101 and "upgrade" in headers:  # (an unasked 101 lost its upgrade: a plain head)
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
            if status not in (204, 304) and status >= 200:
                if self.method != "HEAD":
                    add("content-length: 0\r\n")
                elif self.version == HTTP11:
                    add("transfer-encoding: chunked\r\n")  # (Envoy: a HEAD answer without a length)
        elif self.method != "HEAD" and status not in (204, 304):
            if self.version == HTTP11:
                self.response_chunked = True
                add("transfer-encoding: chunked\r\n")
            else:
                self.response_close = True
        elif status not in (204, 304) and status >= 200 and self.method == "HEAD" and self.version == HTTP11:
            add("transfer-encoding: chunked\r\n")
        if self.tunnel:
            self.body_left = None
            if self._upgrade_not_taken(status):
                self.response_close = True
        elif end_stream or self.method == "HEAD" or status < 200 or status == 204 or status == 304:
            self.body_left = 0
        else:
            self.body_left = int(cl) if cl is not None and cl.isdigit() else None
        # (a response before the whole request was read closes the connection and says so, as Envoy's)
        if self.drain_close or ((self.response_close or not self.request_complete) and not self.tunnel):
            self.response_close = True
            if cl is None and parts and parts[-1] in _FRAMING_LINES:
                parts.insert(-1, "connection: close\r\n")  # (Envoy: the codec's framing line comes last)
            else:
                add("connection: close\r\n")
        elif self.version == HTTP10:
            add("connection: keep-alive\r\n")
        add("\r\n")
        self.conn.write(status_line(status) + "".join(parts).encode("latin-1"))
        if end_stream:
            self._response_complete()

    def _upgrade_not_taken(self, status: int) -> bool:
        """An upgrade or CONNECT answered with anything but a switch or a CONNECT's 2xx: no tunnel,
        the answer ends the connection (and says so, as Envoy's)."""
        if self.method == "CONNECT" and 200 <= status < 300:
            return False
        self.tunnel = False
        return True

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
        self.body_left = None
        if self.drain_close:
            self.response_close = True
            add("connection: close\r\n")
        add("\r\n")
        self.conn.write(status_line(101) + "".join(parts).encode("latin-1"))

    def relay_head(self, status: int, raw: list, end_stream: bool, edits: RelayEdits, mut, lead: bytes, rep,
                   ctx) -> int:
        """The head of a response relayed from an HTTP/1.1 upstream: ``raw`` is its header lines,
        ``(name, value)`` bytes as llhttp gave them, names lower-cased, copied in order but for:
        framing and hop-by-hop headers (the first content-length stays in place; the framing
        this head needs goes last, as ``encode_headers`` writes it), ``server`` and ``date``
        (``edits``), the header ``edits.replace`` (``rep``: None passes the upstream's, False
        removes it, a header line replaces the first, added last when absent), the names
        ``edits.take`` (held back, handed to ``edits.more``) and ``mut``, the caller's header
        edits ``(names removed, lines added, ...)`` or None. After the upstream's lines: ``lead``
        (header lines), ``mut``'s lines, the lines ``edits.more(ctx, taken)`` returns, the date
        when the upstream sent none, the server, ``rep``. Returns the size of the header lines
        (not the status line)."""
        parts = [_STATUS_LINES.get(status) or status_line(status)]
        add = parts.append
        cl = None
        server = False
        date = False
        te = False
        taken = None
        special = edits.special
        kind = edits.kind
        drop = mut[0] if mut is not None else None  # (the caller's removals: not special names)
        for n, v in raw:
            if n in special:
                k = kind[n]
                if not k:
                    continue  # (hop-by-hop, or a name ``edits`` removes)
                if k == _K_LENGTH:
                    if cl is None:
                        cl = v
                        parts += (b"content-length: ", v, b"\r\n")  # (in place, as Envoy writes it)
                elif k == _K_DATE:
                    date = True
                    parts += (b"date: ", v, b"\r\n")
                elif k == _K_SERVER:
                    if edits.server_mode:
                        parts += (b"server: ", v, b"\r\n")
                    elif not server:
                        add(edits.server)
                    server = True
                elif k == _K_REPLACE:
                    if rep is None:
                        parts += (n, b": ", v, b"\r\n")
                    elif rep:
                        add(rep)  # (in place of the upstream's, once)
                        rep = False
                elif k == _K_TAKE:
                    if taken is None:
                        taken = []
                    taken.append((n.decode("latin-1"), v.decode("latin-1")))
                elif k == _K_TE:
                    # one "chunked" (Envoy refuses any other coding): nothing was written yet
                    if te or v.strip().lower() != b"chunked":
                        raise ProtocolError(502, "unsupported transfer-encoding")
                    te = True
                elif not lead:  # x-envoy-upstream-service-time (``lead`` is the router's own, unless suppressed)
                    parts += (n, b": ", v, b"\r\n")
                continue
            if drop and n in drop:
                continue
            parts += (n, b": ", v, b"\r\n")  # (faster than concatenating the line)
        if lead:
            add(lead)
        if mut is not None:
            add(mut[1])
        more = edits.more
        if more is not None:
            extra = more(ctx, taken)
            if extra:
                add(extra)
        if not date:
            add(date_line())
        if not server and edits.server_mode != 2:
            add(edits.server)
        if rep:
            add(rep)
        # framing, as encode_headers
        if cl is None:
            if end_stream:
                if status != 204 and status != 304:
                    # (Envoy: a HEAD answer without a length says chunked)
                    add(b"content-length: 0\r\n" if self.method != "HEAD" else b"transfer-encoding: chunked\r\n")
            elif status != 204 and status != 304:
                if self.method != "HEAD":
                    self.response_chunked = True
                add(b"transfer-encoding: chunked\r\n")
        if self.response_close or self.drain_close or not self.request_complete:  # (as encode_headers)
            self.response_close = True
            if cl is None and parts[-1] in _FRAMING_BYTES:
                parts.insert(-1, b"connection: close\r\n")  # (Envoy: the codec's framing line comes last)
                add(b"\r\n")
            else:
                add(b"connection: close\r\n\r\n")
        else:
            add(b"\r\n")
        head = b"".join(parts)
        self.conn.write(head)
        return len(head) - len(parts[0])

    def relay_done(self, data: bytes) -> None:
        """A relayed response (``relay_head``, ``write_body``) is complete, ``data`` its last body
        bytes (``write_body(data, True)``)."""
        if self.response_chunked:
            self.conn.write(b"%x\r\n%b\r\n0\r\n\r\n" % (len(data), data) if data else b"0\r\n\r\n")
        elif data:
            self.conn.write(data)
        if self.response_close or self.pending or self.tunnel or not self.request_complete:
            self._response_complete()
        else:
            self.stream = None  # (_response_complete's common case)

    def encode_data(self, data: bytes, end_stream: bool) -> None:
        left = self.body_left
        if left is not None:
            n = len(data)
            if n > left or end_stream and n != left:
                self._body_mismatch(data, left)
                return
            self.body_left = left - n
        self.write_body(data, end_stream)
        if end_stream:
            self._response_complete()

    def write_body(self, data: bytes, end_stream: bool) -> None:
        """Response body bytes, framed (chunked or as they are); the last chunk on end_stream.
        (``encode_data`` checks them against the head; a relayed response (``relay_head``) comes here
        directly: its body is framed by the upstream HTTP/1.1 parser, on the same head.)"""
        if self.response_chunked:
            if data:
                self.conn.write(b"%x\r\n%b\r\n" % (len(data), data))
            if end_stream:
                self.conn.write(b"0\r\n\r\n")
        elif data:
            self.conn.write(data)

    def _body_mismatch(self, data: bytes, left: int) -> None:
        """More or fewer body bytes than the head announced: what fits is written, then the
        connection closes (Envoy closes an HTTP/1.1 connection whose upstream response broke its
        framing after the head went out)."""
        if left >= 0:
            if left and data:
                self.conn.write(data[:left])
            self.body_left = -1  # (later bytes are dropped)
            self.response_close = True
            self.conn.close(flush=True)

    def encode_trailers(self, trailers: Headers) -> None:
        if self.response_chunked:
            # (Envoy's HTTP/1.1 codec sends trailers only with the HCM's http_protocol_options.enable_trailers)
            keep = getattr(getattr(self.manager, "cfg", None), "enable_trailers", False)
            self.conn.write(b"0\r\n" + (b"".join(encode_headers_block(trailers)) if keep else b"") + b"\r\n")
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
