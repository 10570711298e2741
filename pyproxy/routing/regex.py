"""RE2 patterns (Envoy's ``safe_regex``) compiled with Python's ``re``.

Envoy's regexes are Google RE2. Most RE2 syntax means the same in Python; this module rewrites the
few constructs that differ and rejects the ones RE2 would reject (look-around, back-references,
possessive/atomic groups), so a config that Envoy refuses is refused here too and a pattern means the
same thing in both. Patterns are compiled once, at config time.

Differences handled:
- ``$`` (without the ``m`` flag) is end-of-text in RE2 but "end or before a final newline" in Python:
  it becomes ``\\Z``. ``\\z`` becomes ``\\Z``.
- ``(?<name>...)`` becomes ``(?P<name>...)``; ``\\Q...\\E`` is quoted; ``\\x{HHHH}`` becomes the char;
  ``[[:alpha:]]``-style POSIX classes become explicit ranges.
- a flag group in the middle of a pattern, ``a(?i)b``, applies up to the end of its enclosing group in
  RE2; Python only accepts global flags at the very start, so it becomes a scoped ``(?i:...)`` group.
- ``\\d \\w \\s \\b`` are ASCII-only in RE2 (``re.ASCII``).
"""

from __future__ import annotations

import re

from ..config.errors import ConfigError

_POSIX = {
    "alnum": "0-9A-Za-z", "alpha": "A-Za-z", "ascii": "\\x00-\\x7f", "blank": "\\t ",
    "cntrl": "\\x00-\\x1f\\x7f", "digit": "0-9", "graph": "!-~", "lower": "a-z",
    "print": " -~", "punct": "!-/:-@\\[-`{-~", "space": "\\t\\n\\v\\f\\r ", "upper": "A-Z",
    "word": "0-9A-Za-z_", "xdigit": "0-9A-Fa-f",
}
_RE2_FLAGS = set("imsU")


def _err(msg: str, pattern: str, field: str) -> ConfigError:
    return ConfigError("invalid regex '%s': %s" % (pattern, msg), field)


def translate(pattern: str, field: str = "regex") -> str:
    """The Python ``re`` spelling of an RE2 ``pattern``; ``ConfigError`` naming ``field`` if RE2
    would reject it (or it uses RE2 syntax Python cannot express)."""
    out: list[str] = []
    # one entry per open group: number of extra ')' to emit when that group closes
    stack: list[int] = [0]
    multiline = False
    i, n = 0, len(pattern)
    at_start = True
    while i < n:
        c = pattern[i]
        if c == "\\":
            if i + 1 >= n:
                raise _err("trailing backslash", pattern, field)
            d = pattern[i + 1]
            if d.isdigit() and d != "0":
                raise _err("back-references are not supported by RE2", pattern, field)
            if d == "z":
                out.append("\\Z")
            elif d in "ZGC":
                raise _err("escape \\%s is not supported by RE2" % d, pattern, field)
            elif d == "Q":
                end = pattern.find("\\E", i + 2)
                lit = pattern[i + 2:] if end < 0 else pattern[i + 2:end]
                out.append(re.escape(lit))
                i = n if end < 0 else end + 2
                at_start = False
                continue
            elif d == "x" and i + 2 < n and pattern[i + 2] == "{":
                end = pattern.find("}", i + 3)
                if end < 0:
                    raise _err("bad \\x{...} escape", pattern, field)
                try:
                    out.append(re.escape(chr(int(pattern[i + 3:end], 16))))
                except ValueError:
                    raise _err("bad \\x{...} escape", pattern, field) from None
                i = end + 1
                at_start = False
                continue
            elif d in "pP":
                raise _err("unicode classes (\\p) are not supported", pattern, field)
            else:
                out.append(pattern[i:i + 2])
            i += 2
            at_start = False
            continue
        if c == "[":
            j, cls = _class(pattern, i, field)
            out.append(cls)
            i = j
            at_start = False
            continue
        if c == "(":
            if pattern.startswith("(?", i):
                rest = pattern[i + 2:]
                if rest.startswith("P<") or rest.startswith("P="):
                    if rest.startswith("P="):
                        raise _err("back-references are not supported by RE2", pattern, field)
                    out.append("(?P<")
                    i += 4
                    stack.append(0)
                    at_start = False
                    continue
                if rest.startswith("<") and not rest.startswith("<=") and not rest.startswith("<!"):
                    out.append("(?P<")
                    i += 3
                    stack.append(0)
                    at_start = False
                    continue
                if rest.startswith(":"):
                    out.append("(?:")
                    i += 3
                    stack.append(0)
                    at_start = False
                    continue
                m = re.match(r"([a-zA-Z]*)(?:-([a-zA-Z]*))?([:)])", rest)
                if not m:
                    raise _err("unsupported group syntax '(?%s'" % rest[:3], pattern, field)
                on, off, term = m.group(1), m.group(2) or "", m.group(3)
                for f in on + off:
                    if f not in _RE2_FLAGS:
                        raise _err("unknown flag '%s'" % f, pattern, field)
                    if f == "U":
                        raise _err("flag U (ungreedy) is not supported", pattern, field)
                if m.group(2) is not None and not off:
                    raise _err("missing flags after '-'", pattern, field)
                if "m" in on and not off.count("m"):
                    multiline = multiline or (term == ")" and len(stack) == 1)
                spec = on + ("-" + off if off else "")
                i += 2 + m.end()
                if term == ":":
                    out.append("(?%s:" % spec if spec else "(?:")
                    stack.append(0)
                elif spec:
                    if at_start and len(stack) == 1 and not off:
                        out.append("(?%s)" % on)
                    else:
                        # scoped to the rest of the enclosing group
                        out.append("(?%s:" % spec)
                        stack[-1] += 1
                continue
            out.append("(")
            stack.append(0)
            i += 1
            at_start = False
            continue
        if c == ")":
            if len(stack) == 1:
                raise _err("unmatched ')'", pattern, field)
            out.append(")" * stack.pop())
            out.append(")")
            i += 1
            continue
        if c == "|":
            # a scoped flag group ends at the alternation in RE2 too
            if stack[-1]:
                out.append(")" * stack[-1])
                stack[-1] = 0
            out.append("|")
            i += 1
            continue
        if c in "*+?}":
            if i + 1 < n and pattern[i + 1] == "+":
                raise _err("bad repetition operator: %s+" % c, pattern, field)
        if c == "$" and not multiline:
            out.append("\\Z")
            i += 1
            at_start = False
            continue
        out.append(c)
        i += 1
        at_start = False
    if len(stack) != 1:
        raise _err("missing ')'", pattern, field)
    out.append(")" * stack[0])
    return "".join(out)


def _class(p: str, i: int, field: str):
    """Translate a bracket class starting at ``p[i] == '['``; returns (end index, text)."""
    n = len(p)
    j = i + 1
    out = ["["]
    if j < n and p[j] == "^":
        out.append("^")
        j += 1
    first = True
    while j < n:
        c = p[j]
        if c == "]" and not first:
            out.append("]")
            return j + 1, "".join(out)
        first = False
        if c == "[" and p.startswith("[:", j):
            end = p.find(":]", j + 2)
            if end < 0:
                raise _err("bad POSIX class", p, field)
            name = p[j + 2:end]
            neg = name.startswith("^")
            if neg:
                raise _err("negated POSIX classes are not supported", p, field)
            if name not in _POSIX:
                raise _err("unknown POSIX class '%s'" % name, p, field)
            out.append(_POSIX[name])
            j = end + 2
            continue
        if c == "[":
            out.append("\\[")  # literal in RE2; Python warns about nested sets
            j += 1
            continue
        if c == "\\":
            if j + 1 >= n:
                raise _err("trailing backslash", p, field)
            d = p[j + 1]
            if d in "pP":
                raise _err("unicode classes (\\p) are not supported", p, field)
            if d == "x" and j + 2 < n and p[j + 2] == "{":
                end = p.find("}", j + 3)
                if end < 0:
                    raise _err("bad \\x{...} escape", p, field)
                try:
                    ch = chr(int(p[j + 3:end], 16))
                except ValueError:
                    raise _err("bad \\x{...} escape", p, field) from None
                out.append("\\" + ch if ch in "\\]^-[" else ch)
                j = end + 1
                continue
            out.append(p[j:j + 2])
            j += 2
            continue
        if c in "&~|-" and j + 1 < n and p[j + 1] == c:
            out.append("\\" + c)  # Python reserves doubled set operators
            j += 1
            continue
        out.append(c)
        j += 1
    raise _err("missing ']'", p, field)


def compile_re2(pattern: str, field: str = "regex") -> re.Pattern:
    """Compile an RE2 pattern for Python's ``re``; ``ConfigError`` naming ``field`` when invalid."""
    py = translate(pattern, field)
    try:
        return re.compile(py, re.ASCII)
    except re.error as e:
        raise _err(str(e), pattern, field) from None
    except (OverflowError, RecursionError) as e:
        raise _err(str(e), pattern, field) from None


def compile_regex_matcher(msg, field: str = "safe_regex") -> re.Pattern:
    """A ``type.matcher.v3.RegexMatcher`` (google_re2 engine, the only one Envoy has)."""
    return compile_re2(msg.regex, field + ".regex")


def re2_substitution(sub: str) -> str:
    """An RE2 rewrite string (``\\1``, ``\\\\``) as a Python ``re`` replacement template."""
    out = []
    i, n = 0, len(sub)
    while i < n:
        c = sub[i]
        if c == "\\" and i + 1 < n:
            d = sub[i + 1]
            if d.isdigit():
                out.append("\\g<%s>" % d)
                i += 2
                continue
            if d == "\\":
                out.append("\\\\")
                i += 2
                continue
            raise ConfigError("invalid rewrite substitution '%s': bad escape \\%s" % (sub, d),
                              "substitution")
        if c == "\\":
            raise ConfigError("invalid rewrite substitution '%s': trailing backslash" % sub,
                              "substitution")
        out.append(c)
        i += 1
    return "".join(out)
