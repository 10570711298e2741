"""HTTP/1.1 codec on httptools (llhttp), client side (upstream): one request at a time on one
connection; the response becomes the router's ``on_upstream_headers/data/trailers/reset`` events
(the server side is ``http1.py``)."""

from __future__ import annotations

from operator import itemgetter

import httptools

from .headers import Headers
from .http1_common import HOP_BY_HOP, ProtocolError, encode_headers_block

_MAX_UPSTREAM_HEAD = 80 * 1024  # bytes of an upstream response head (or of its trailers)
_JOIN = ": ".join  # (name, value) -> "name: value"
_CRLF = "\r\n"
_SERVICE_TIME = "x-envoy-upstream-service-time"
_first = itemgetter(0)


def _no_content(hdrs: list) -> list:
    """A 204's header lines: a content-length other than 0, or a transfer-encoding, is a protocol
    error (Envoy: 502); ``content-length: 0`` is dropped, as Envoy does."""
    out = []
    for kv in hdrs:
        n = kv[0].lower()
        if n == b"content-length":
            if kv[1].strip() != b"0":
                raise ProtocolError(502, "content-length in a 204 response")
            continue
        if n == b"transfer-encoding":
            raise ProtocolError(502, "transfer-encoding in a 204 response")
        out.append(kv)
    return out


def _transfer_encoding(hdrs: list) -> None:
    """A response's transfer-encoding must be one ``chunked`` (Envoy refuses any other coding)."""
    seen = False
    for n, v in hdrs:
        if n.lower() == b"transfer-encoding":
            if seen or v.strip().lower() != b"chunked":
                raise ProtocolError(502, "unsupported transfer-encoding %r" % v.decode("latin-1"))
            seen = True


def _new_response_parser(proto):
    return httptools.HttpResponseParser(proto)


class Http1ClientCodec:
    """Upstream HTTP/1.1 on one connection: one request at a time.

    ``decoder`` is the router's upstream request (``on_upstream_headers/data/trailers/reset``).
    """

    __slots__ = (
        "conn", "parser", "decoder", "hdrs", "status", "head_request", "chunked_request",
        "keep_alive", "tunnel", "trailers", "in_trailers", "resp_headers_sent", "complete",
        "pending_upgrade", "response_header_bytes", "parser_dirty", "pending_body", "raw",
        "feed_len", "max_headers", "keep_trailers",
    )

    def __init__(self, conn):
        self.pending_body = None  # the last body chunk, held to go out with end_stream if the message ends
        self.conn = conn
        self.parser = _new_response_parser(self)
        self.decoder = None
        self.tunnel = False
        self.complete = True
        self.parser_dirty = False
        self.feed_len = 0
        self.max_headers = 100  # the cluster's common_http_protocol_options.max_headers_count
        # the cluster's http_protocol_options.enable_trailers: else trailers are dropped both ways (as Envoy)
        self.keep_trailers = False

    def start(self, decoder) -> None:
        self.decoder = decoder
        # a decoder with ``raw_head`` takes the response head as raw (name, value) bytes
        self.raw = getattr(decoder, "raw_head", False) is True  # (not relay_h2's H2_RELAY)
        self.hdrs = []
        self.trailers = None
        self.status = 0
        self.head_request = False
        self.chunked_request = False
        self.keep_alive = True
        self.resp_headers_sent = False
        self.complete = False
        self.pending_upgrade = False
        self.response_header_bytes = 0

    # -- request encoding ---------------------------------------------------------------------------
    def encode_headers(self, headers: Headers, end_stream: bool) -> None:
        method = path = authority = None
        parts = []
        add = parts.append
        cl = None
        upgrade = None
        for k, v in headers._h:
            if k[0] == ":":
                if k == ":method":
                    method = v
                elif k == ":path":
                    path = v
                elif k == ":authority":
                    authority = v
                continue
            if k == "content-length":
                cl = v
                continue
            if k in HOP_BY_HOP:
                if k == "upgrade":
                    upgrade = v
                elif k == "te" and (v.lower() == "trailers" or "trailers" in map(str.strip, v.lower().split(","))):
                    add("te: trailers\r\n")  # (Envoy keeps only that coding)
                continue
            add(f"{k}: {v}\r\n")
        self.head_request = method == "HEAD"
        if method == "CONNECT":
            start = "CONNECT " + authority + " HTTP/1.1\r\nhost: " + authority + "\r\n"
            self.pending_upgrade = 2
        else:
            start = method + " " + path + " HTTP/1.1\r\nhost: " + (authority or "") + "\r\n"
        if upgrade is not None:
            add("upgrade: " + upgrade + "\r\nconnection: upgrade\r\n")
            self.pending_upgrade = 2 if method == "CONNECT" else True  # (2: a CONNECT, pool.py half-closes)
        if cl is not None:
            add("content-length: " + cl + "\r\n")
        elif not end_stream and upgrade is None and method != "CONNECT":
            self.chunked_request = True
            add("transfer-encoding: chunked\r\n")
        elif end_stream and method in ("POST", "PUT", "PATCH"):
            add("content-length: 0\r\n")
        add("\r\n")
        self.conn.write((start + "".join(parts)).encode("latin-1"))

    def encode_plain_head(self, h: list) -> bytes:
        """A bodiless request without framing or hop-by-hop headers (nor a body-carrying method):
        ``h`` is its header list, ``:method, :scheme, :path, :authority`` first. Its head is what
        ``encode_headers`` writes for it, without the per-header checks. Returns the head."""
        method = h[0][1]
        self.head_request = method == "HEAD"
        if len(h) > 4:
            head = f"{method} {h[2][1]} HTTP/1.1\r\nhost: {h[3][1]}\r\n{_CRLF.join(map(_JOIN, h[4:]))}\r\n\r\n".encode(
                "latin-1")
        else:
            head = f"{method} {h[2][1]} HTTP/1.1\r\nhost: {h[3][1]}\r\n\r\n".encode("latin-1")
        self.conn.write(head)
        return head

    def encode_data(self, data: bytes, end_stream: bool) -> None:
        if self.chunked_request:
            if data:
                self.conn.write(b"%x\r\n%b\r\n" % (len(data), data))
            if end_stream:
                self.conn.write(b"0\r\n\r\n")
                self.chunked_request = False
        else:
            if data:
                self.conn.write(data)
            if end_stream and self.pending_upgrade == 2:
                # (Envoy's codec: a CONNECT's end closes the connection once written; an upgrade's
                # end is not sent at all, HTTP/1.1 has no way to say it)
                self.conn.close_written()

    def encode_trailers(self, trailers: Headers) -> None:
        if self.chunked_request:
            self.conn.write(b"0\r\n" + (b"".join(encode_headers_block(trailers)) if self.keep_trailers else b"")
                            + b"\r\n")
            self.chunked_request = False

    # -- response parsing ---------------------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        if self.tunnel:
            d = self.decoder
            if d is not None:
                d.on_upstream_data(data, False)
            return
        if self.decoder is None:
            # bytes with no request outstanding: the connection is unusable
            self.conn.close()
            return
        self.feed_len = len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as u:
            rest = data[u.args[0]:]
            self.tunnel = True
            if rest and self.decoder is not None:
                self.decoder.on_upstream_data(rest, False)
        except (httptools.HttpParserError, ProtocolError) as e:
            cause = e.__context__ if isinstance(e, httptools.HttpParserCallbackError) else e
            if isinstance(cause, ProtocolError) or not isinstance(e, httptools.HttpParserCallbackError):
                self.conn.on_protocol_error("upstream protocol error: %s" % e)
            else:
                raise cause
        finally:
            pb = self.pending_body
            if pb is not None:
                # the message goes on in later reads: pass this read's body on now
                self.pending_body = None
                pb[0].on_upstream_data(pb[1], False)
        if not self.resp_headers_sent and self.decoder is not None:
            # this read ended inside a response head (httptools holds it): bound what it holds
            self.response_header_bytes += len(data)
            if self.response_header_bytes > _MAX_UPSTREAM_HEAD:
                self.conn.on_protocol_error("upstream protocol error: upstream headers too large")
                return
        if self.parser_dirty:
            # llhttp cannot be told a response answers HEAD (it waits for content-length bytes):
            # the response ended at its headers, so the next one starts on a fresh parser
            self.parser_dirty = False
            self.parser = _new_response_parser(self)

    # (no on_message_begin / on_status: ``start()`` resets the per-response state, a 1xx response
    # clears its headers itself, and every callback httptools finds costs a call per response)

    def on_header(self, name: bytes, value: bytes):
        # (the head's size is bounded in feed(): it counts the reads that end inside a head)
        if self.resp_headers_sent:
            self._trailer(name, value)
            return
        # kept as bytes, the name lower-cased (decoded for a Headers once the head is complete)
        self.hdrs.append((name.lower(), value))

    def _trailer(self, name: bytes, value: bytes) -> None:
        """A trailer of a chunked response."""
        self.response_header_bytes += len(name) + len(value)
        if self.response_header_bytes > _MAX_UPSTREAM_HEAD:
            raise ProtocolError(502, "upstream headers too large")
        if not self.keep_trailers:
            return
        if self.trailers is None:
            self.trailers = []
        self.trailers.append((name.lower().decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self):
        p = self.parser
        status = p.get_status_code()
        if status < 200 and (status != 101 or not self.pending_upgrade):
            if status < 100:
                raise ProtocolError(502, "upstream status %d" % status)  # (Envoy: a protocol error)
            if status == 101:
                # an upgrade the request did not ask for (Envoy: upgrade and connection dropped, the
                # response ends at its head; the connection is not reused)
                self.hdrs = [kv for kv in self.hdrs if kv[0].lower() not in (b"upgrade", b"connection")]
                self.keep_alive = False
                self.parser_dirty = True
                return self._unasked_101(status)
            self.hdrs = []
            return  # 1xx interim responses are consumed here
        self.status = status
        self.keep_alive = p.should_keep_alive()
        hdrs = self.hdrs
        if len(hdrs) > self.max_headers:
            raise ProtocolError(502, "upstream response has too many headers")
        if self.response_header_bytes + self.feed_len > _MAX_UPSTREAM_HEAD and \
                sum(len(n) + len(v) for n, v in hdrs) > _MAX_UPSTREAM_HEAD:
            # (a head that arrived within reads too small to be over the bound is not summed)
            raise ProtocolError(502, "upstream headers too large")
        end = False
        if self.head_request:
            end = True
            self.parser_dirty = True
            if status == 204:
                hdrs = self.hdrs = _no_content(hdrs)
        elif status in (204, 304):
            end = True
            if status == 204:
                hdrs = self.hdrs = _no_content(hdrs)
        elif status != 101 and not self.raw:
            # (the byte relay, http/h1_relay.py, writes a content-length: 0 head as it is and ends the response
            # when llhttp completes it, a moment later in this same read)
            for n, v in hdrs:
                ln = len(n)
                if ln == 14 and n.lower() == b"content-length":
                    end = v == b"0"
                    break
                if ln == 17 and n.lower() == b"transfer-encoding":
                    _transfer_encoding(hdrs)
        self.resp_headers_sent = True
        if end:
            self.complete = True
        elif self.pending_upgrade:
            self.keep_alive = False  # (the request of an upgrade never ended: the connection is not reused)
            if 200 <= status < 300 and not self.hdrs_have_length():
                self.tunnel = True  # CONNECT answered: raw bytes both ways from here
        d = self.decoder
        if d is not None:
            if self.raw:
                d.on_upstream_head(status, hdrs, end)
            else:
                h = [(":status", str(status))]
                h += [(n.decode("latin-1"), v.decode("latin-1")) for n, v in hdrs]
                if _SERVICE_TIME in map(_first, h):  # (the router adds its own: one, as Envoy)
                    h = [kv for kv in h if kv[0] != _SERVICE_TIME]
                d.on_upstream_headers(Headers(h), end)
        if end and status != 101:
            self._finish()

    def _unasked_101(self, status: int) -> None:
        """A 101 to a request that asked for no upgrade: passed on as a head that ends the response."""
        self.status = status
        self.resp_headers_sent = True
        self.complete = True
        d = self.decoder
        if d is not None:
            h = [(":status", "101")] + [(n.lower().decode("latin-1"), v.decode("latin-1")) for n, v in self.hdrs]
            d.on_upstream_headers(Headers(h), True)
        self._finish()

    def on_body(self, body: bytes):
        if self.parser_dirty:
            return  # bytes after a HEAD response's headers are not a body
        d = self.decoder
        if d is not None:
            pb = self.pending_body
            if pb is not None:
                d.on_upstream_data(pb[1], False)
            # held until we know whether the message ends in this read (one pass, not two)
            self.pending_body = (d, body)

    def on_message_complete(self):
        if not self.resp_headers_sent or self.status < 200:
            # an interim (1xx) response; or a 101's: the connection is a tunnel now (its end is
            # the upstream's EOF). (``status`` is set before ``resp_headers_sent``.)
            return
        was_complete = self.complete
        self.complete = True
        d = self.decoder
        pb = self.pending_body
        self.pending_body = None
        if d is not None and not was_complete:
            trailers = self.trailers
            # the connection goes back to its pool before the response's end reaches the stream
            # (_finish, inlined): a request that end lets go on (the next one pipelined on the same
            # downstream connection) finds it idle, as with Envoy (one upstream connection, not two)
            self.decoder = None
            self.conn.on_response_complete(self.keep_alive)
            if trailers:
                if pb is not None:
                    d.on_upstream_data(pb[1], False)
                d.on_upstream_trailers(Headers(trailers))
            else:
                d.on_upstream_data(pb[1] if pb is not None else b"", True)

    def _finish(self):
        self.decoder = None
        self.conn.on_response_complete(self.keep_alive)

    def on_close(self, reason: str, aborted: bool = True) -> None:  # (aborted: a reset, not a FIN)
        d = self.decoder
        self.decoder = None
        self.pending_body = None
        if d is None:
            return
        if self.tunnel:
            # (Envoy's HTTP/1.1 upstream codec does not half-close a tunnel either: its FIN is a
            # connection termination, the stream is reset: UC)
            d.on_upstream_reset(reason if aborted else "connection termination")
            return
        if self.resp_headers_sent and not self.complete:
            # close-delimited body: EOF ends it (unless a length was promised)
            try:
                self.parser.feed_data(b"")
            except Exception:
                pass
            if self.status and not self.hdrs_have_length():
                d.on_upstream_data(b"", True)
                return
            if not aborted:
                reason = "protocol error"  # (a FIN inside a promised body: Envoy's codec fails to parse EOF)
        d.on_upstream_reset(reason)

    def hdrs_have_length(self) -> bool:
        for k, v in self.hdrs:
            k = k.lower()
            if k == b"content-length" or k == b"transfer-encoding":
                return True
        return False
