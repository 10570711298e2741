"""Envoy's request path normalisation (``ConnectionManagerUtility::maybeNormalizePath``).

Applied to the path part of ``:path`` (the query is kept as it is), in Envoy's order:

1. ``path_with_escaped_slashes_action``: ``%2F``/``%2f`` become ``/`` and ``%5C``/``%5c`` become
   ``\\``; then the request is refused (400), redirected (307) or forwarded as the action says;
2. ``normalize_path``: RFC 3986 canonicalisation as Envoy does it with Chromium's URL library —
   backslashes become slashes, ``.``/``..`` segments (also percent-encoded, ``%2e``) are removed,
   percent-encoded unreserved characters are decoded, characters that may not appear in a path
   are percent-encoded, and a NUL makes the path invalid (400);
3. ``merge_slashes``: runs of slashes become one.

Pure functions of strings: no regular expressions, linear in the path length.
"""

from __future__ import annotations

# Chromium's path character classes (url_canon_path.cc): how a character is written out
PASS, SPECIAL, ESCAPE, UNESCAPE, INVALID = 0, 1, 3, 4, 9


def _table():
    t = [ESCAPE] * 256  # controls and every high-bit byte are escaped
    t[0] = INVALID
    for c in "!$&'()*+,/:;=@[]":
        t[ord(c)] = PASS
    for c in "-_~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz":
        t[ord(c)] = UNESCAPE
    t[ord(".")] = SPECIAL
    # ' ', '"', '#', '%', '<', '>', '?', '\\', '^', '`', '{', '|', '}', DEL stay ESCAPE
    return tuple(t)


_LOOKUP = _table()
# characters whose presence means the canonical form may differ from the input
SPECIAL_CHARS = frozenset(chr(i) for i in range(256) if _LOOKUP[i] & SPECIAL)
_HEX = frozenset("0123456789abcdefABCDEF")

KEEP_UNCHANGED, REJECT_REQUEST, UNESCAPE_AND_REDIRECT, UNESCAPE_AND_FORWARD = 1, 2, 3, 4
CONTINUE, REJECT, REDIRECT = 0, 1, 2


def _is_dot(p: str, i: int, end: int) -> int:
    """1 for ``.``, 3 for ``%2e``/``%2E`` at ``i``, else 0."""
    c = p[i]
    if c == ".":
        return 1
    if c == "%" and i + 2 < end and p[i + 1] == "2" and p[i + 2] in "eE":
        return 3
    return 0


def _escaped(ch: int) -> str:
    return "%%%02X" % ch  # (extended into the output as three characters)


def canonicalize(p: str):
    """The canonical form of a path (no query), or None when it is invalid (a NUL byte)."""
    if not p:
        return "/"
    if SPECIAL_CHARS.isdisjoint(p) and p[0] == "/" and p.isascii():
        return p
    out = []  # one character per entry (positions matter for the nested-escape rule)
    add = out.append
    if p[0] not in "/\\":
        add("/")
    end = len(p)
    ok = True
    last_bad_pct = -10
    i = 0
    while i < end:
        c = p[i]
        o = ord(c)
        if o > 255:
            for b in c.encode("utf-8"):
                out.extend(_escaped(b))
            i += 1
            continue
        flags = _LOOKUP[o]
        if not flags & SPECIAL:
            add(c)
            i += 1
            continue
        dot = _is_dot(p, i, end)
        if dot:
            if out and out[-1] == "/":
                kind, used = _dot_params(p, i, end) if dot == 1 else (0, 0)
                if not kind:
                    kind, used = _after_dot(p, i + dot, end)
                    used += dot
                if kind == 0:
                    add(".")
                elif kind == 2:
                    _back_up(out)
                i += used if kind else dot
            else:
                add(".")
                i += dot
            continue
        if c == "\\":
            add("/")
        elif c == "%":
            if i + 2 < end and p[i + 1] in _HEX and p[i + 2] in _HEX:
                v = int(p[i + 1:i + 3], 16)
                vf = _LOOKUP[v]
                if vf & UNESCAPE:
                    add(chr(v))
                    if last_bad_pct >= len(out) - 3:
                        _nested(p, i + 3, end, last_bad_pct, out)
                else:
                    out.extend(p[i:i + 3])
                    if vf == INVALID:
                        ok = False
                i += 3
                continue
            last_bad_pct = len(out)
            add("%")
        elif flags == INVALID:
            out.extend(_escaped(o))
            ok = False
        else:
            out.extend(_escaped(o))
        i += 1
    return "".join(out) if ok else None


def _after_dot(p: str, after: int, end: int):
    """Chromium's ClassifyAfterDot: (0 not a directory | 1 current | 2 up, characters consumed)."""
    if after == end:
        return 1, 0
    if p[after] in "/\\":
        return 1, 1
    d2 = _is_dot(p, after, end)
    if d2:
        a2 = after + d2
        if a2 == end:
            return 2, d2
        if p[a2] in "/\\":
            return 2, d2 + 1
    return 0, 0


def _dot_params(p: str, i: int, end: int):
    """A segment of one or two literal dots followed by ``;`` parameters (``.;``, ``..;jsessionid=1``)
    is a dot segment for Envoy too, its parameters dropped through the next ``/``: (1 current |
    2 up, characters consumed), or (0, 0). Servlet containers resolve ``/x/..;/admin`` as
    ``/admin``, so the canonical path must too (an encoded dot, ``%2e;``, is not one)."""
    j = i + 1
    kind = 1
    if j < end and p[j] == ".":
        j += 1
        kind = 2
    if j >= end or p[j] != ";":
        return 0, 0
    s = p.find("/", j)
    return kind, (end if s < 0 else s + 1) - i


def _back_up(out) -> None:
    """Rewind the output (which ends with a slash) to the slash before the last segment."""
    i = len(out) - 1
    if i == 0:
        return
    i -= 1
    while out[i] != "/" and i > 0:
        i -= 1
    del out[i + 1:]


def _nested(p: str, nxt: int, end: int, bad: int, out) -> None:
    """Chromium's CheckForNestedEscapes: "%%30" must not become a valid escape once unescaped
    ("%" whose escape was invalid, followed by what unescaping produced, is written "%25...")."""
    n = len(out)
    append_next = bad == n - 2
    if append_next:
        if nxt == end or ord(p[nxt]) >= 0x80:
            return
        probe = out[bad + 1:] + [p[nxt]]
    else:
        probe = out[bad + 1:]
    if len(probe) >= 2 and probe[0] in _HEX and probe[1] in _HEX:
        out[bad + 1:bad + 1] = ["2", "5"]


def merge_slashes(p: str) -> str:
    if "//" not in p:
        return p
    pre = "/" if p.startswith("/") else ""
    suf = "/" if p.endswith("/") else ""
    return pre + "/".join(x for x in p.split("/") if x) + suf


def unescape_slashes(p: str):
    """``(path, found)``: ``%2F``/``%2f`` -> ``/`` and ``%5C``/``%5c`` -> ``\\``."""
    if "%" not in p:
        return p, False
    q = p.replace("%2F", "/").replace("%2f", "/").replace("%5C", "\\").replace("%5c", "\\")
    return q, len(q) != len(p)


def normalize(path: str, escaped_action: int, normalize_path: bool, merge: bool):
    """``(action, new path)`` for a ``:path``: CONTINUE (new path, maybe unchanged), REJECT (None)
    or REDIRECT (the path to send the client to)."""
    if SPECIAL_CHARS.isdisjoint(path) and path[:1] == "/" and path.isascii() and (
            not merge or "//" not in path):
        # no query ('?'), no '%', '.', '\\' or character to escape: every step leaves it as it is
        return CONTINUE, path
    q = path.find("?")
    if q >= 0:
        p, query = path[:q], path[q:]
    else:
        p, query = path, ""
    action = CONTINUE
    if escaped_action != KEEP_UNCHANGED and escaped_action:
        p, found = unescape_slashes(p)
        if found:
            if escaped_action == REJECT_REQUEST:
                return REJECT, None
            if escaped_action == UNESCAPE_AND_REDIRECT:
                action = REDIRECT
    if normalize_path:
        p = canonicalize(p)
        if p is None:
            return REJECT, None
    if merge:
        p = merge_slashes(p)
    return action, p + query
