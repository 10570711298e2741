"""The HTTP/1.1 codec fed bytes directly (no sockets): stream events, strictness, pipelining state."""

from __future__ import annotations

import pytest

from pyproxy.http.headers import Headers
from pyproxy.http.http1 import Http1ServerCodec
from pyproxy.http.http1_client import Http1ClientCodec


class Conn:
    def __init__(self):
        self.out = []
        self.closed = False
        self.read_disabled = 0

    def write(self, d):
        self.out.append(d)

    def close(self, flush=True):
        self.closed = True

    def read_disable(self, disable):
        self.read_disabled += 1 if disable else -1

    def written(self):
        return b"".join(self.out)


class Stream:
    def __init__(self, ev):
        self.ev = ev
        self.response_started = False

    def decode_headers(self, h, end):
        self.ev.append(("H", dict(h._h), end))

    def decode_data(self, d, end):
        self.ev.append(("D", d, end))

    def decode_trailers(self, t):
        self.ev.append(("T", t._h))

    def on_reset(self, reason):
        self.ev.append(("R", reason))


class Cfg:
    accept_http_10 = False
    default_host_for_http_10 = ""


class Manager:
    def __init__(self, cfg=None):
        self.ev = []
        self.cfg = cfg or Cfg()
        self.streams = []

    def new_stream(self, enc, version):
        self.ev.append(("S", version))
        s = Stream(self.ev)
        self.streams.append(s)
        return s

    def on_request(self, codec, headers, end_stream, version, direct=False, quiet=False, plain=False, ct=True):
        s = codec.stream = self.new_stream(codec, version)
        s.decode_headers(headers, end_stream)

    def on_codec_error(self, codec, status, details):
        self.ev.append(("E", status, details))
        codec.closed = True


def feed(*chunks, cfg=None, **kw):
    conn, m = Conn(), Manager(cfg)
    codec = Http1ServerCodec(conn, m, **kw)
    for c in chunks:
        codec.feed(c)
    return m.ev, codec, conn


def errors(ev):
    return [e for e in ev if e[0] == "E"]


def test_simple_get_is_complete_at_headers():
    ev, _, _ = feed(b"GET /a?b=1 HTTP/1.1\r\nHost: x:8\r\nX-A: 1\r\n\r\n")
    assert ev[0] == ("S", "HTTP/1.1")
    assert ev[1][0] == "H" and ev[1][2] is True
    h = ev[1][1]
    assert h[":method"] == "GET" and h[":path"] == "/a?b=1" and h[":authority"] == "x:8" and h["x-a"] == "1"
    assert len(ev) == 2


def test_content_length_body_split_anywhere():
    req = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n0123456789"
    for cut in range(1, len(req)):
        ev, _, _ = feed(req[:cut], req[cut:])
        body = b"".join(e[1] for e in ev if e[0] == "D")
        assert body == b"0123456789", cut
        assert ev[-1] == ("D", b"", True) or ev[-1][2] is True
        assert not errors(ev)


def test_chunked_body_with_extensions_and_trailers_decoded():
    ev, _, _ = feed(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nX-T: 1\r\n\r\n")
    assert not errors(ev)
    assert b"".join(e[1] for e in ev if e[0] == "D") == b"abcde"
    assert ev[-1][2] is True


@pytest.mark.parametrize("name,data,status", [
    ("cl+te", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ("te+cl", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n", 400),
    ("dup cl", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\na", 400),
    ("cl list", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1, 1\r\n\r\na", 400),
    ("cl sign", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +1\r\n\r\na", 400),
    ("cl huge", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999\r\n\r\na", 400),
    ("te gzip", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
    ("te dup", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", 501),
    ("te chunked,chunked", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, chunked\r\n\r\n", 501),
    ("bad chunk size", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
    ("chunk without crlf", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabXX", 400),
    ("chunk size overflow", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffffff\r\n", 400),
    ("obs-fold", b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\r\n c\r\n\r\n", 400),
    ("bare lf", b"GET / HTTP/1.1\nHost: a\n\n", 400),
    ("bare lf in headers", b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\n\r\n", 400),
    ("bare cr", b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\rc\r\n\r\n", 400),
    ("nul in value", b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\x00c\r\n\r\n", 400),
    ("space before colon", b"GET / HTTP/1.1\r\nHost: a\r\nX-A : b\r\n\r\n", 400),
    ("invalid method", b"G@T / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("unknown method", b"FOO / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("no host", b"GET / HTTP/1.1\r\n\r\n", 400),
    ("two hosts", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    ("http/1.0 not accepted", b"GET / HTTP/1.0\r\nHost: a\r\n\r\n", 426),
    ("http/0.9", b"GET /\r\n\r\n", 426),
    ("http/2.0 as text", b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 426),
    ("http/1.7", b"GET / HTTP/1.7\r\nHost: a\r\n\r\n", 426),
    ("too many headers", b"GET / HTTP/1.1\r\nHost: a\r\n" + b"".join(b"X-%d: a\r\n" % i for i in range(101)) + b"\r\n", 431),
    ("headers too large", b"GET / HTTP/1.1\r\nHost: a\r\nX-A: " + b"a" * 61 * 1024 + b"\r\n\r\n", 431),
    ("url too large", b"GET /" + b"a" * 61 * 1024 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 431),
])
def test_bad_input_is_a_codec_error_and_never_a_stream(name, data, status):
    # fed whole and byte by byte: the answer does not depend on how the bytes arrive
    for chunks in ([data], [data[i:i + 1] for i in range(len(data))] if len(data) < 400 else [data]):
        ev, _, _ = feed(*chunks)
        errs = errors(ev)
        assert errs and errs[0][1] == status, (name, ev)
        # a stream may have started for a body error, but it never completed a request
        assert not any(e[0] == "D" and e[2] for e in ev), ev


def test_smuggled_request_after_cl_te_is_not_parsed():
    ev, _, _ = feed(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n")
    assert errors(ev)
    assert not any(e[0] == "H" and e[1].get(":path") == "/smuggled" for e in ev)


def test_max_headers_limits_are_constructor_arguments():
    data = b"GET / HTTP/1.1\r\nHost: a\r\n" + b"".join(b"X-%d: a\r\n" % i for i in range(5)) + b"\r\n"
    assert errors(feed(data, max_headers=5)[0])[0][1] == 431
    assert not errors(feed(data, max_headers=6)[0])
    assert errors(feed(data, max_header_bytes=20)[0])[0][1] == 431


def test_http10_accepted_when_configured_with_default_host():
    cfg = Cfg()
    cfg.accept_http_10 = True
    cfg.default_host_for_http_10 = "default.example"
    ev, codec, _ = feed(b"GET / HTTP/1.0\r\n\r\n", cfg=cfg)
    assert ev[0] == ("S", "HTTP/1.0")
    assert ev[1][1][":authority"] == "default.example"
    cfg.default_host_for_http_10 = ""
    assert errors(feed(b"GET / HTTP/1.0\r\n\r\n", cfg=cfg)[0])[0][1] == 400
    # chunked framing is an HTTP/1.1 thing
    assert errors(feed(b"POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", cfg=cfg)[0])


def test_absolute_form_takes_path_and_authority():
    ev, _, _ = feed(b"GET http://other.example:81/p?q HTTP/1.1\r\nHost: ignored\r\n\r\n")
    h = ev[1][1]
    assert h[":path"] == "/p?q"
    # the request-target's authority wins (RFC 9112 3.2.2; Envoy 1.40 forwards it: tests/test_authority.py)
    assert h[":authority"] == "other.example:81"


def _respond(codec, status="200", body=b"ok"):
    h = Headers([(":status", status), ("content-length", str(len(body)))])
    codec.encode_headers(h, not body)
    if body:
        codec.encode_data(body, True)


def test_pipelined_requests_are_served_in_order_with_reading_paused():
    reqs = b"".join(b"GET /%d HTTP/1.1\r\nHost: a\r\n\r\n" % i for i in range(3))
    ev, codec, conn = feed(reqs)
    # only the first stream started; the others wait
    assert [e for e in ev if e[0] == "S"] == [("S", "HTTP/1.1")]
    assert conn.read_disabled == 1
    for i in range(3):
        heads = [e for e in ev if e[0] == "H"]
        assert heads[-1][1][":path"] == "/%d" % i
        _respond(codec, body=b"r%d" % i)
    assert conn.read_disabled == 0
    assert not conn.closed
    out = conn.written()
    assert out.index(b"r0") < out.index(b"r1") < out.index(b"r2")


def test_pipelined_request_whose_body_arrives_later_keeps_the_connection():
    ev, codec, conn = feed(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n"
                           b"POST /2 HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\nab")
    _respond(codec)
    assert not conn.closed, "the first response must not close a connection with a pipelined request"
    codec.feed(b"cd")
    body = b"".join(e[1] for e in ev if e[0] == "D")
    assert body == b"abcd"
    assert ev[-1][2] is True
    _respond(codec)
    assert not conn.closed


def test_response_before_request_body_read_closes():
    ev, codec, conn = feed(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nab")
    _respond(codec, "404", b"")
    assert conn.closed


def test_response_framing():
    # no length and not ended: chunked to HTTP/1.1 clients
    ev, codec, conn = feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    codec.encode_headers(Headers([(":status", "200"), ("transfer-encoding", "chunked"),
                                  ("connection", "keep-alive")]), False)
    codec.encode_data(b"hello", False)
    codec.encode_data(b"", True)
    out = conn.written()
    assert out.startswith(b"HTTP/1.1 200 OK\r\n")
    assert out.count(b"transfer-encoding: chunked") == 1 and b"keep-alive" not in out
    assert out.endswith(b"5\r\nhello\r\n0\r\n\r\n")
    # HEAD: no body, no invented length
    ev, codec, conn = feed(b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n")
    codec.encode_headers(Headers([(":status", "200"), ("content-length", "1234")]), True)
    out = conn.written()
    assert b"content-length: 1234\r\n" in out and out.endswith(b"\r\n\r\n")
    # 204 gets no content-length
    ev, codec, conn = feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    codec.encode_headers(Headers([(":status", "204")]), True)
    assert b"content-length" not in conn.written()


def test_expect_100_continue_answered_by_codec_and_not_forwarded():
    ev, codec, conn = feed(b"POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
    assert conn.written() == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert "expect" not in ev[1][1]
    codec.feed(b"ab")
    assert b"".join(e[1] for e in ev if e[0] == "D") == b"ab"


def test_client_codec_parses_response_and_reports_completion():
    class UpConn:
        def __init__(self):
            self.out = []
            self.done = []
            self.errors = []

        def write(self, d):
            self.out.append(d)

        def on_response_complete(self, keep_alive):
            self.done.append(keep_alive)

        def on_protocol_error(self, reason):
            self.errors.append(reason)

        def close(self):
            pass

    class Dec:
        def __init__(self):
            self.ev = []

        def on_upstream_headers(self, h, end):
            self.ev.append(("H", h.get(":status"), end))

        def on_upstream_data(self, d, end):
            self.ev.append(("D", d, end))

        def on_upstream_trailers(self, t):
            self.ev.append(("T", t._h))

        def on_upstream_reset(self, r):
            self.ev.append(("R", r))

    up = UpConn()
    c = Http1ClientCodec(up)
    d = Dec()
    c.start(d)
    c.encode_headers(Headers([(":method", "POST"), (":path", "/x"), (":authority", "h"),
                              (":scheme", "http"), ("connection", "close")]), False)
    c.encode_data(b"abc", True)
    sent = b"".join(up.out)
    assert sent.startswith(b"POST /x HTTP/1.1\r\nhost: h\r\n") and b"connection: close" not in sent
    assert sent.endswith(b"3\r\nabc\r\n0\r\n\r\n")
    c.feed(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n")
    assert d.ev[0] == ("H", "200", False)
    assert b"".join(e[1] for e in d.ev if e[0] == "D") == b"hi"
    assert up.done == [True]
    # an upstream response with both framings is a protocol error, never a body
    c.start(Dec())
    c.encode_headers(Headers([(":method", "GET"), (":path", "/"), (":authority", "h")]), True)
    c.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    assert up.errors


def test_malformed_pipelined_request_is_answered_after_the_good_ones():
    ev, codec, conn = feed(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n"
                           b"GET /2 HTTP/1.1\r\nHost: a\r\n\r\n"
                           b"POST /3 HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")
    assert not errors(ev), "the error must wait for the requests before it"
    _respond(codec)
    assert not errors(ev)
    assert [e[1][":path"] for e in ev if e[0] == "H"] == ["/1", "/2"]
    _respond(codec)
    assert errors(ev) == [("E", 400, "http1.codec_error")] or errors(ev)[0][1] == 400
    assert [e[1][":path"] for e in ev if e[0] == "H"] == ["/1", "/2"]
    # nothing fed afterwards is parsed
    codec.feed(b"GET /4 HTTP/1.1\r\nHost: a\r\n\r\n")
    assert len([e for e in ev if e[0] == "H"]) == 2


def test_unterminated_header_line_is_bounded():
    ev, codec, conn = feed(b"GET / HTTP/1.1\r\nHost: a\r\nX-A: ", *([b"a" * 4096] * 30), max_header_bytes=8192)
    assert errors(ev) and errors(ev)[0][1] == 431
    # a large body in the same read as its head is not mistaken for a large head
    ev, codec, conn = feed(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 200000\r\n\r\n" + b"x" * 200000,
                           max_header_bytes=8192)
    assert not errors(ev)


# -- the head's lines are collected raw and translated at once (on_headers_complete) ------------

def _head(ev):
    return [e[1] for e in ev if e[0] == "H"]


def test_header_lines_translated_at_once_keep_order_case_and_obs_text():
    ev, codec, _ = feed(b"GET /p HTTP/1.1\r\nX-A: 1 \t\r\nhOsT: h:1\r\nUser-Agent:  b\xa0 \r\nE:\r\n\r\n")
    assert not errors(ev)
    h = ev[1][1]
    assert list(h.items()) == [(":method", "GET"), (":scheme", "http"), (":path", "/p"),
                               (":authority", "h:1"), ("x-a", "1"), ("user-agent", "b\xa0"), ("e", "")]
    assert codec.ct is False and not codec.noted and not codec.hop_seen


@pytest.mark.parametrize("head", [
    b"Host: a\r\nHost: a\r\n",            # host first, twice
    b"X: 1\r\nHost: a\r\nhost: b\r\n",    # elsewhere, twice
    b"Content-Length: 1\r\nHost: a\r\nHost: a\r\n",  # with a framing header (line by line)
])
def test_repeated_host_refused_on_every_path(head):
    ev, _, _ = feed(b"GET / HTTP/1.1\r\n" + head + b"\r\n")
    assert errors(ev) == [("E", 400, "http1.codec_error")]


def test_content_type_flag_per_request():
    ev, codec, _ = feed(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Type: application/grpc\r\n"
                        b"Content-Length: 0\r\n\r\n")
    assert not errors(ev) and codec.ct is True
    ev, codec, _ = feed(b"GET / HTTP/1.1\r\nHost: a\r\nAccept: */*\r\n\r\n")
    assert codec.ct is False


def test_line_count_and_bytes_limits_hold_for_head_and_trailers():
    many = b"".join(b"H%d: v\r\n" % i for i in range(99))
    ev, _, _ = feed(b"GET / HTTP/1.1\r\nHost: h\r\n" + many + b"\r\n")
    assert not errors(ev)  # 100 lines: the limit
    ev, _, _ = feed(b"GET / HTTP/1.1\r\nHost: h\r\nX: 1\r\n" + many + b"\r\n")
    assert errors(ev) == [("E", 431, "http1.too_many_headers")]
    ev, _, _ = feed(b"GET / HTTP/1.1\r\nHost: h\r\nX: " + b"y" * (60 * 1024) + b"\r\n\r\n")
    assert errors(ev) == [("E", 431, "http1.headers_too_large")]
    # a chunked request's trailers count with its head's lines and bytes
    chunked = b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n"
    ev, _, _ = feed(chunked + many + b"\r\n")
    assert errors(ev) == [("E", 431, "http1.too_many_headers")]
    ev, _, _ = feed(chunked + b"T: " + b"y" * (60 * 1024) + b"\r\n\r\n")
    assert errors(ev) == [("E", 431, "http1.headers_too_large")]
    ev, codec, _ = feed(chunked + b"T: 1\r\n\r\n" + b"GET / HTTP/1.1\r\nHost: h\r\n" + many + b"\r\n")
    assert not errors(ev)  # (the next request starts with fresh limits)


def test_noted_names_without_framing_are_noted_per_request():
    """A head with names the manager wants noted (``note``: e.g. what a request through another
    proxy carries, x-request-id, x-envoy-*) and no framing or hop-by-hop one takes the common
    translation (Host consumed, the rest in order) with ``noted`` set for that request only; with
    a framing header too, the line-by-line path; a repeated Host is refused either way."""
    seen = []

    class Noting(Manager):
        def on_request(self, codec, headers, end_stream, version, direct=False, quiet=False, plain=False, ct=True):
            seen.append((codec.noted, codec.hop_seen, direct))
            assert quiet == (direct and not (codec.noted or codec.hop_seen)) and plain == (direct and not codec.hop_seen)
            super().on_request(codec, headers, end_stream, version, direct)

    conn, m = Conn(), Noting()
    codec = Http1ServerCodec(conn, m, note=frozenset((b"x-request-id", b"x-envoy-expected-rq-timeout-ms")))
    heads = [
        b"Host: a\r\nX-A: 1\r\n",
        b"Host: a\r\nX-Request-Id: r1\r\nx-envoy-expected-rq-timeout-ms: 5\r\nX-B: 2\r\n",
        b"Host: a\r\n",
        b"X-Request-Id: r2\r\nhost: b\r\n",  # (Host not first)
        b"Host: a\r\nX-Request-Id: r3\r\nContent-Length: 0\r\n",
        b"Host: a\r\n",
    ]
    for i, head in enumerate(heads):
        codec.feed(b"GET /%d HTTP/1.1\r\n%s\r\n" % (i, head))
        _respond(codec)
    assert not errors(m.ev)
    assert seen == [(False, False, True), (True, False, True), (False, False, True), (True, False, True),
                    (True, True, True), (False, False, True)], seen
    got = [list(h.items())[3:] for h in _head(m.ev)]
    assert got[1] == [(":authority", "a"), ("x-request-id", "r1"), ("x-envoy-expected-rq-timeout-ms", "5"),
                      ("x-b", "2")]
    assert got[3] == [(":authority", "b"), ("x-request-id", "r2")]
    assert got[4] == [(":authority", "a"), ("x-request-id", "r3"), ("content-length", "0")]
    for head in (b"Host: a\r\nX-Request-Id: r\r\nHost: a\r\n", b"X-Request-Id: r\r\nHost: a\r\nHost: b\r\n"):
        conn, m = Conn(), Noting()
        codec = Http1ServerCodec(conn, m, note=frozenset((b"x-request-id",)))
        codec.feed(b"GET / HTTP/1.1\r\n%s\r\n" % head)
        assert errors(m.ev) == [("E", 400, "http1.codec_error")], m.ev


@pytest.mark.parametrize("name,chunks", [
    # a request behind another in the same bytes, with the same method and URL length: where the
    # first request line puts " HTTP/1.1\r\n" is not the second one's version
    ("pipelined", [b"GET /aaaa HTTP/1.1\r\nHost: a\r\n\r\nGET /bbbb HTTP/1.7\r\nHost: a\r\n\r\n"]),
    # the same after a body laid out as such a request line
    ("after a body", [b"POST /aaaa HTTP/1.1\r\nHost: a\r\nContent-Length: 17\r\n\r\n",
                      b"GETxxx HTTP/1.1\r\nGET /b HTTP/1.7\r\nHost: a\r\n\r\n"]),
    # the bytes begin inside the method, or inside the URL with what looks like the method
    ("split in the method", [b"UNSUBSCRIB", b"E /a HTTP/1.7\r\nX: HTTP/1.1\r\nHost: a\r\n\r\n"]),
    ("split in the URL", [b"GET /12345678", b"GET HTTP/1.7\r\nX: HTTP/1.1\r\nHost: a\r\n\r\n"]),
    # more spaces than one around the URL
    ("spaces", [b"GET  /a HTTP/1.7\r\nX: HTTP/1.1\r\nHost: a\r\n\r\n"]),
])
def test_version_read_from_the_request_line_only_where_it_is(name, chunks):
    """The codec reads HTTP/1.1 off the request line when the bytes it parses start with the head
    (else llhttp's numbers): a request line elsewhere in the bytes never stands in for this one's."""
    ev, codec, _ = feed(*chunks)
    if codec.stream is not None and not errors(ev):
        _respond(codec)  # (the first request's turn ends: the pipelined one's comes)
    assert errors(ev) and errors(ev)[0][1] == 426, (name, ev)
    assert [e for e in ev if e[0] == "S"] in ([], [("S", "HTTP/1.1")]), ev


def test_version_from_the_request_line_over_reads_and_pipelines():
    """HTTP/1.1 and HTTP/1.0 requests in any split and pipeline give the versions llhttp reads."""
    cfg = Cfg()
    cfg.accept_http_10 = True
    reqs = [b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n", b"\r\nGET /b HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\n\r\n",
            b"POST /c  HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nok", b"HEAD  /d HTTP/1.0\r\nHost: a\r\n\r\n"]
    data = b"".join(reqs)
    for cut in range(0, len(data), 3):
        ev, codec, _ = feed(data[:cut], data[cut:], cfg=cfg)
        for _ in range(6):
            if codec.stream is None:
                break
            codec.stream = None
            codec._replay_pending()
        assert not errors(ev), ev
        assert [e[1] for e in ev if e[0] == "S"] == ["HTTP/1.1", "HTTP/1.0", "HTTP/1.1", "HTTP/1.0"], (cut, ev)
