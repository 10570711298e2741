"""Envoy's regexes on Google RE2 (the ``google-re2`` bindings): linear time, RE2's syntax.

Every regex pyproxy takes from config or from a request (route and header matches, string matchers
in RBAC, CORS, TLS SAN checks and filter-chain matchers, regex rewrites, the admin API's ``filter=``
and ``name_regex=``) is compiled here, once, at config time (or once per admin request). No
backtracking engine ever sees a pattern or an input from config or from the network.

As in Envoy (``envoy.regex_engines.google_re2``):
- a pattern RE2 rejects is a ``ConfigError`` naming the field and RE2's reason;
- the compiled *program size* is checked against ``re2.max_program_size.error_level`` (default 100)
  and, when set, ``re2.max_program_size.warn_level`` (a warning), both read from the bootstrap's
  ``layered_runtime`` static layers (Istio's bootstrap sets the error level to 32768); a
  ``RegexMatcher`` with the deprecated ``google_re2.max_program_size`` is checked against it too;
- matches run on the raw bytes (header values are latin-1 decoded str: encoding them back with
  latin-1 gives the exact bytes Envoy matches); ``fullmatch`` is ``RE2::FullMatch``, ``search`` is
  ``RE2::PartialMatch`` and ``sub`` is ``RE2::GlobalReplace`` with an RE2 rewrite string (``\\0``..
  ``\\9``, ``\\\\``).
"""

from __future__ import annotations

import logging

import re2
from re2 import _re2

from ..config.errors import ConfigError

__all__ = ["Regex", "Rewrite", "RegexError", "check_re2", "compile_re2", "compile_regex_matcher", "compile_admin_regex",
           "re2_substitution", "set_program_size_limits", "limits_from_bootstrap",
           "configure_from_bootstrap", "DEFAULT_ERROR_LEVEL"]

log = logging.getLogger("pyproxy.misc")

DEFAULT_ERROR_LEVEL = 100  # Envoy's default for re2.max_program_size.error_level
_ERROR_KEY = "re2.max_program_size.error_level"
_WARN_KEY = "re2.max_program_size.warn_level"

_OPTS = re2.Options()
_OPTS.log_errors = False  # RE2::Quiet, as Envoy
_OPTS_NC = re2.Options()
_OPTS_NC.log_errors = False
_OPTS_NC.never_capture = True

_BOTH = _re2.RE2.Anchor.ANCHOR_BOTH
_UNANCHORED = _re2.RE2.Anchor.UNANCHORED
_NULL = (-1, -1)

# process-wide, like Envoy's runtime singleton; set once from the bootstrap at startup
_limits = {"error": DEFAULT_ERROR_LEVEL, "warn": None}


def set_program_size_limits(error_level: int | None = DEFAULT_ERROR_LEVEL, warn_level: int | None = None) -> None:
    """The program-size thresholds every later compile checks (``None``: no check)."""
    _limits["error"] = error_level
    _limits["warn"] = warn_level


def _runtime_int(v):
    """A runtime value as Envoy's ``getInteger`` reads it: a number, or a string holding one."""
    kind = v.WhichOneof("kind")
    if kind == "number_value":
        return int(v.number_value) if v.number_value >= 0 else None
    if kind == "string_value":
        try:
            f = float(v.string_value.strip())
        except ValueError:
            return None
        return int(f) if f >= 0 else None
    return None


def limits_from_bootstrap(bootstrap) -> tuple:
    """(error level, warn level) from the bootstrap's ``layered_runtime`` static layers (the last
    layer that sets a key wins, as in Envoy); Envoy's defaults for what is not set."""
    error, warn = DEFAULT_ERROR_LEVEL, None
    if bootstrap is None or not bootstrap.HasField("layered_runtime"):
        return error, warn
    for layer in bootstrap.layered_runtime.layers:
        if layer.WhichOneof("layer_specifier") != "static_layer":
            continue
        fields = layer.static_layer.fields
        for key, is_error in ((_ERROR_KEY, True), (_WARN_KEY, False)):
            v = _lookup(fields, key)
            if v is None:
                continue
            n = _runtime_int(v)
            if n is None:
                continue
            if is_error:
                error = n
            else:
                warn = n
    return error, warn


def _lookup(fields, key):
    """A runtime key in a static layer: flat (``"re2.max_program_size.error_level": ...``) or
    nested by its dotted parts, as Envoy flattens a static layer."""
    if key in fields:
        return fields[key]
    parts = key.split(".")
    cur = fields
    for i, p in enumerate(parts):
        if p not in cur:
            return None
        v = cur[p]
        if i == len(parts) - 1:
            return v
        if v.WhichOneof("kind") != "struct_value":
            return None
        cur = v.struct_value.fields
    return None


def configure_from_bootstrap(bootstrap) -> None:
    set_program_size_limits(*limits_from_bootstrap(bootstrap))


def _bytes(s):
    """The bytes a str stands for: latin-1 (how header values and paths are decoded), else UTF-8
    (a config string outside latin-1)."""
    if isinstance(s, (bytes, bytearray, memoryview)):
        return s, None
    try:
        return s.encode("latin-1"), "latin-1"
    except UnicodeEncodeError:
        return s.encode("utf-8", "surrogatepass"), "utf-8"


class Rewrite:
    """An RE2 rewrite string (``\\0``..``\\9`` are groups, ``\\\\`` a backslash), parsed once."""

    __slots__ = ("text", "parts", "max_group")

    def __init__(self, text: str, parts: tuple, max_group: int):
        self.text = text
        self.parts = parts  # bytes literals and int group numbers
        self.max_group = max_group

    def __repr__(self):
        return "Rewrite(%r)" % self.text


class Regex:
    """One compiled RE2 pattern. ``fullmatch``/``search`` return a truthy list of spans or None."""

    __slots__ = ("pattern", "groups", "program_size", "_rx", "_bool")

    def __init__(self, pattern: str, rx, program_size: int):
        self.pattern = pattern
        self._rx = rx
        self.groups = rx.NumberOfCapturingGroups()
        self.program_size = program_size
        # boolean matches need no group offsets: a capture-free twin lets RE2 use its DFA only
        self._bool = _re2.RE2(pattern.encode("utf-8"), _OPTS_NC) if self.groups else rx

    def fullmatch(self, s):
        """``RE2::FullMatch``: spans when the whole of ``s`` matches, else None."""
        b = _bytes(s)[0]
        spans = self._bool.Match(_BOTH, b, 0, len(b))
        return spans if spans[0] != _NULL else None

    def search(self, s):
        """``RE2::PartialMatch``: spans when some part of ``s`` matches, else None."""
        b = _bytes(s)[0]
        spans = self._bool.Match(_UNANCHORED, b, 0, len(b))
        return spans if spans[0] != _NULL else None

    def spans(self, s):
        """The group spans (byte offsets; ``(-1, -1)`` for a group that did not take part) of the
        first match in ``s``, or None."""
        b = _bytes(s)[0]
        spans = self._rx.Match(_UNANCHORED, b, 0, len(b))
        return spans if spans[0] != _NULL else None

    def sub(self, rewrite, s):
        """``RE2::GlobalReplace(s, regex, rewrite)``: every non-overlapping match replaced; an empty
        match right after the previous match is skipped, as RE2 does. A rewrite naming a group the
        pattern does not have changes nothing (RE2 refuses it)."""
        if not isinstance(rewrite, Rewrite):
            rewrite = re2_substitution(rewrite)
        if rewrite.max_group > self.groups:
            return s
        b, codec = _bytes(s)
        out = bytearray()
        p, ep = 0, len(b)
        lastend = -1
        count = 0
        rx = self._rx
        parts = rewrite.parts
        while p <= ep:
            spans = rx.Match(_UNANCHORED, b, p, ep)
            ms, me = spans[0]
            if ms < 0:
                break
            if p < ms:
                out += b[p:ms]
            if ms == lastend and ms == me:
                # an empty match where the last one ended: copy one character and move on
                n = _char_len(b, p, ep) if codec != "latin-1" else 1
                if p < ep:
                    out += b[p:p + n]
                p += n
                continue
            for part in parts:
                if part.__class__ is int:
                    gs, ge = spans[part]
                    if gs >= 0:
                        out += b[gs:ge]
                else:
                    out += part
            p = me
            lastend = p
            count += 1
        if count == 0:
            return s
        if p < ep:
            out += b[p:ep]
        if codec is None:
            return bytes(out)
        return out.decode(codec, "surrogatepass") if codec == "utf-8" else out.decode(codec)

    def __repr__(self):
        return "Regex(%r)" % self.pattern

    def __eq__(self, other):
        return isinstance(other, Regex) and other.pattern == self.pattern

    def __hash__(self):
        return hash(self.pattern)


def _char_len(b, p: int, ep: int) -> int:
    """Length of the UTF-8 character at ``b[p]`` (1 for an invalid or truncated sequence)."""
    if p >= ep:
        return 1
    c = b[p]
    n = 1 if c < 0xC0 else 2 if c < 0xE0 else 3 if c < 0xF0 else 4 if c < 0xF8 else 1
    if p + n > ep or any((b[p + k] & 0xC0) != 0x80 for k in range(1, n)):
        return 1
    return n


class RegexError(ValueError):
    """RE2 refused a pattern: ``reason`` is RE2's message (or Envoy's program-size message) and
    ``size_limit`` whether it was the program-size check."""

    def __init__(self, reason: str, size_limit: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.size_limit = size_limit


def check_re2(pattern: str, max_program_size: int | None = None, size_check: bool = True) -> Regex:
    """Compile ``pattern`` with RE2 and, when ``size_check``, Envoy's program-size checks;
    ``RegexError`` with RE2's reason when refused."""
    if not isinstance(pattern, str):
        raise RegexError("not a string")
    rx = _re2.RE2(pattern.encode("utf-8", "surrogatepass"), _OPTS)
    if not rx.ok():
        e = rx.error()
        raise RegexError(e.decode("utf-8", "replace") if isinstance(e, bytes) else str(e))
    size = rx.ProgramSize()
    if not size_check:
        return Regex(pattern, rx, size)
    if max_program_size is not None and size > max_program_size:
        raise RegexError("regex '%s' RE2 program size of %d > max program size of %d. Increase "
                         "configured max program size if necessary." % (pattern, size, max_program_size),
                         True)
    error, warn = _limits["error"], _limits["warn"]
    if error is not None and size > error:
        raise RegexError("regex '%s' RE2 program size of %d > max program size of %d set for the error "
                         "level threshold. Increase configured max program size if necessary."
                         % (pattern, size, error), True)
    if warn is not None and size > warn:
        log.warning("regex '%s' RE2 program size of %d > max program size of %d set for the warn level "
                    "threshold. Increase configured max program size if necessary.", pattern, size, warn)
    return Regex(pattern, rx, size)


def compile_re2(pattern: str, field: str = "regex", max_program_size: int | None = None) -> Regex:
    """Compile an RE2 pattern from config, with Envoy's program-size checks; ``ConfigError``
    naming ``field`` when RE2 rejects it or its program is too large."""
    try:
        return check_re2(pattern, max_program_size)
    except RegexError as e:
        if e.size_limit:
            raise ConfigError(e.reason, field) from None
        raise ConfigError("invalid regex '%s': %s" % (pattern, e.reason), field) from None


def compile_admin_regex(pattern: str) -> Regex:
    """The admin API's ``filter=`` regex (``/stats``, ``/stats/prometheus``, ``/clusters``): RE2
    without a program-size check, as Envoy's admin (RE2's own memory budget still bounds it).
    ``RegexError`` when RE2 refuses it."""
    return check_re2(pattern, size_check=False)


def compile_regex_matcher(msg, field: str = "safe_regex") -> Regex:
    """A ``type.matcher.v3.RegexMatcher`` (google_re2 engine, the only one Envoy has), with the
    deprecated ``google_re2.max_program_size`` applied when set."""
    limit = None
    if msg.HasField("google_re2") and msg.google_re2.HasField("max_program_size"):
        limit = msg.google_re2.max_program_size.value
    return compile_re2(msg.regex, field + ".regex", limit)


def re2_substitution(sub: str) -> Rewrite:
    """Parse an RE2 rewrite string (``\\0``..``\\9``, ``\\\\``); ``ConfigError`` for anything else
    after a backslash (RE2 rejects it)."""
    parts: list = []
    lit = []
    max_group = 0
    i, n = 0, len(sub)
    while i < n:
        c = sub[i]
        if c == "\\":
            if i + 1 >= n:
                raise ConfigError("invalid rewrite substitution '%s': trailing backslash" % sub,
                                  "substitution")
            d = sub[i + 1]
            if "0" <= d <= "9":
                if lit:
                    parts.append("".join(lit).encode("utf-8"))
                    lit = []
                parts.append(int(d))
                max_group = max(max_group, int(d))
            elif d == "\\":
                lit.append("\\")
            else:
                raise ConfigError("invalid rewrite substitution '%s': bad escape \\%s" % (sub, d),
                                  "substitution")
            i += 2
            continue
        lit.append(c)
        i += 1
    if lit:
        parts.append("".join(lit).encode("utf-8"))
    return Rewrite(sub, tuple(parts), max_group)
