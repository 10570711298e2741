"""HTTP/2 header blocks <-> the proxy's ``Headers``: pseudo-headers, validation (RFC 9113
8.2/8.3, as ``h2``'s own validation would check), cookies joined, ``host`` folded into
``:authority``, and the reverse (connection-specific fields dropped, ``te`` only as ``trailers``).
Each distinct field and each distinct block is translated once (memos bounded in bytes).
"""

from __future__ import annotations

from .authority import authority_ok
from .h2_hpack import _FIELD_OVERHEAD, CONNECTION_HEADERS, ByteMemo
from .headers import Headers, coalesce_fields

_OUT = ByteMemo(4 << 20, 8192)
_IN = ByteMemo(4 << 20, 8192)
_OUT_MEMO = _OUT.d
_IN_MEMO = _IN.d
REQUEST, RESPONSE, TRAILERS = 0, 1, 2
_REQUEST_PSEUDO = frozenset((":method", ":scheme", ":authority", ":path", ":protocol"))
_TOKEN_CHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz"  # RFC 9110 tchar, lower case


def _is_token(s: str) -> bool:
    """A non-empty lower-case token (no regex engine sees header names)."""
    return bool(s) and not s.strip(_TOKEN_CHARS)


class BadHeaders(Exception):
    """A malformed header block (RFC 9113 8.2/8.3): the stream is reset with PROTOCOL_ERROR."""


class BadLength(BadHeaders):
    """A request's content-length that is not one decimal number (repeated, even with one value):
    Envoy 1.40 ends the connection."""


class BadAuthority(BadHeaders):
    """A request :authority (or host) Envoy refuses (``http/authority.py``): Envoy ends the
    connection."""


def _out(kv):
    k, v = kv
    r = (k.encode("latin-1"), v.encode("latin-1"))
    _OUT.put(kv, r, 2 * (len(k) + len(v)) + _FIELD_OVERHEAD)
    return r


def to_h2(headers: Headers) -> list:
    """``Headers`` -> ``h2`` (bytes) header tuples: connection-specific fields dropped, ``te``
    only as ``trailers``, values kept byte-for-byte."""
    memo = _OUT_MEMO
    out = []
    for kv in headers._h:
        b = memo.get(kv)
        if b is None:
            k = kv[0]
            if k in CONNECTION_HEADERS or (k == "te" and kv[1].lower() != "trailers"):
                if k != "te" or "trailers" not in [t.strip() for t in kv[1].lower().split(",")]:
                    continue
                kv = ("te", "trailers")  # (only that coding, as Envoy)
            b = _out(kv)
        out.append(b)
    return out


def trailers_to_h2(trailers: Headers) -> list:
    return [_OUT_MEMO.get(kv) or _out(kv) for kv in trailers._h
            if kv[0][0] != ":" and kv[0] not in CONNECTION_HEADERS]


def _in(kv):
    """One received field, validated and decoded (memoized)."""
    n, v = kv
    try:
        name = n.decode("ascii")
    except UnicodeDecodeError:
        raise BadHeaders("invalid header name") from None
    if not name:
        raise BadHeaders("empty header name")
    if name[0] == ":":
        if not _is_token(name[1:]):
            raise BadHeaders("invalid pseudo-header %r" % name)
    elif not _is_token(name):
        raise BadHeaders("invalid header name %r" % name)
    if b"\x00" in v or b"\r" in v or b"\n" in v:
        raise BadHeaders("invalid header value for %s" % name)
    if v[:1] in (b" ", b"\t") or v[-1:] in (b" ", b"\t"):
        raise BadHeaders("surrounding whitespace in %s" % name)
    if name in CONNECTION_HEADERS and name != "host":
        raise BadHeaders("connection-specific header %s" % name)
    value = v.decode("latin-1")
    if name == "te" and value != "trailers":
        raise BadHeaders("te other than trailers")
    r = (name, value)
    _IN.put(kv, r, 2 * (len(n) + len(v)) + _FIELD_OVERHEAD)
    return r


def inbound_headers(raw, kind: int) -> list:
    """A received header block as ``Headers`` pairs, checked as h2's validation would (names
    lower-case tokens, no CR/LF/NUL, pseudo-headers first, once, and the required ones present;
    no connection-specific fields); cookies joined (RFC 9113 8.2.3). Raises ``BadHeaders``."""
    memo = _IN_MEMO
    out = []
    regular = False
    pseudo = None
    cookies = None
    for kv in raw:
        r = memo.get(kv)
        if r is None:
            r = _in(kv)
        name = r[0]
        if name[0] == ":":
            if regular:
                raise BadHeaders("pseudo-header after regular header")
            if pseudo is None:
                pseudo = set()
            if name in pseudo:
                raise BadHeaders("duplicate %s" % name)
            pseudo.add(name)
        else:
            regular = True
            if name == "cookie" and kind == REQUEST:
                if cookies is None:
                    cookies = [len(out), r[1]]
                    out.append(r)
                else:
                    cookies.append(r[1])
                continue
        out.append(r)
    if cookies is not None and len(cookies) > 2:
        out[cookies[0]] = ("cookie", "; ".join(cookies[1:]))
    if kind == REQUEST:
        if pseudo is None or not pseudo <= _REQUEST_PSEUDO or ":method" not in pseudo:
            raise BadHeaders("missing or unknown request pseudo-headers")
        method = path = None
        for k, v in out:
            if k == ":method":
                method = v
            elif k == ":path":
                path = v
            elif k[0] != ":":
                break
        if method == "CONNECT" and ":protocol" not in pseudo:
            if ":authority" not in pseudo or ":path" in pseudo or ":scheme" in pseudo:
                raise BadHeaders("malformed CONNECT")
        elif ":scheme" not in pseudo or not path:
            raise BadHeaders("missing :scheme or :path")
    elif kind == RESPONSE:
        if pseudo != _STATUS_ONLY:
            raise BadHeaders("response needs exactly :status")
    elif pseudo is not None:
        raise BadHeaders("pseudo-header in trailers")
    return out


_STATUS_ONLY = {":status"}
_ORDER = (":method", ":scheme", ":path", ":authority")
_ORDER_SET = frozenset(_ORDER)
_REQ = ByteMemo(4 << 20, 16384)
_RESP = ByteMemo(4 << 20, 16384)
_REQ_MEMO = _REQ.d
_RESP_MEMO = _RESP.d


def request_fields(raw) -> tuple:
    """A received request header block -> (fields tuple for ``Headers``, expect 100-continue?,
    :protocol or None, CONNECT?, declared content-length or None, names): validated
    (``inbound_headers``; a content-length that is not one decimal number is refused), ``host``
    folded into ``:authority``, ``expect: 100-continue`` and ``:protocol`` taken out. Memoized
    per distinct block (the decoder hands repeated blocks over as equal tuples). Raises
    ``BadHeaders``."""
    key = raw if raw.__class__ is tuple else tuple(raw)
    r = _REQ_MEMO.get(key)
    if r is not None:
        return r
    authority = None
    host = None
    expect = False
    protocol = None
    length = None
    h = []
    for kv in inbound_headers(key, REQUEST):
        k = kv[0]
        if k == ":authority":
            authority = kv[1]
        elif k == "content-length":
            v = kv[1]
            if not v.isdigit() or not v.isascii() or len(v) > 18 or length is not None:
                raise BadLength("invalid or repeated content-length %r" % v)
            length = int(v)
        elif k == ":protocol":
            protocol = kv[1]
            continue
        elif k == "host":
            host = kv[1]
            continue
        elif k == "expect":
            if kv[1].lower() == "100-continue":
                expect = True
                continue
        h.append(kv)
    a = authority if authority is not None else host
    if a is not None and (not a or not authority_ok(a, False)):
        raise BadAuthority("invalid authority %r" % a)
    if authority is None and host is not None:
        i = 0
        while i < len(h) and h[i][0][0] == ":":
            i += 1
        h.insert(i, (":authority", host))
    if len(h) > 3 and (h[0][0], h[1][0], h[2][0], h[3][0]) != _ORDER:
        # the pseudo-headers in the HTTP/1.1 codec's order (:method, :scheme, :path, :authority
        # first), so that the stream finds the path and authority where it looks first
        pseudo = {kv[0]: kv for kv in h if kv[0][0] == ":"}
        if len(pseudo) == 4 and _ORDER_SET == pseudo.keys():
            h = [pseudo[k] for k in _ORDER] + [kv for kv in h if kv[0][0] != ":"]
    names = frozenset(kv[0] for kv in h)
    if len(names) != len(h):
        # a repeated name: Envoy's inline headers become one field (http/headers.py)
        h = coalesce_fields(h)
    path = _field(h, ":path")
    if path is not None and "#" in path:
        names = None
    r = (tuple(h), expect, protocol, protocol is not None or _field(h, ":method") == "CONNECT", length, names)
    _REQ.put(key, r, _block_cost(key))
    return r


def _block_cost(fields) -> int:
    """What a memoized block holds: its fields (key and translated result) and the tuples."""
    n = 300
    for kv in fields:
        n += 2 * (len(kv[0]) + len(kv[1])) + 180
    return n


def response_fields(raw) -> tuple:
    """``inbound_headers(raw, RESPONSE)`` memoized per distinct block (shared: copy before changing),
    with the body length its framing allows -> (fields, length): 0 for a 1xx (no DATA before the
    final head), 204 or 304; the content-length otherwise, or None (any length). A content-length
    that is not one decimal number, one on a 1xx, or a non-zero one on a 204 is malformed
    (nghttp2's rules, as Envoy's codec applies them; a 204's ``content-length: 0`` is dropped)."""
    key = raw if raw.__class__ is tuple else tuple(raw)
    r = _RESP_MEMO.get(key)
    if r is None:
        fields = inbound_headers(key, RESPONSE)
        status = fields[0][1]
        if len(status) != 3 or not status.isdigit() or not status.isascii():  # (nghttp2's rule)
            raise BadHeaders("invalid :status %r" % status[:16])
        length = None
        for i in range(len(fields) - 1, 0, -1):
            k, v = fields[i]
            if k == "content-length":
                if not v.isdigit() or not v.isascii() or len(v) > 18 or length is not None:
                    raise BadHeaders("invalid or repeated content-length %r" % v)  # (Envoy: 502)
                length = int(v)
                if status == "204":
                    if length:
                        raise BadHeaders("content-length %r in a 204" % v)
                    del fields[i]
            elif k == "x-envoy-upstream-service-time":
                del fields[i]  # (the router adds its own: one, as Envoy)
        if status[:1] == "1":
            if length is not None:
                raise BadHeaders("content-length in a %s" % status)
            length = 0
        elif status == "204" or status == "304":
            length = 0
        r = (tuple(fields), length)
        _RESP.put(key, r, _block_cost(key))
    return r


def _field(fields, name: str) -> str | None:
    for k, v in fields:
        if k == name:
            return v
    return None

