"""Compiled ``StringMatcher``, ``HeaderMatcher`` and ``QueryParameterMatcher``.

Each compiles once into a small object whose ``match`` is a handful of string operations. The
semantics follow Envoy 1.40 (checked against the binary): a header sent several times matches when any one of its
values matches (``invert_match`` then negates that); a
missing header only satisfies ``present_match: false`` (or an inverted matcher asking for presence)
unless ``treat_missing_header_as_empty``; a query parameter matches on its first value.
"""

from __future__ import annotations

from ..config.errors import ConfigError
from ..config.util import request_header_name
from .regex import compile_regex_matcher

__all__ = ["StringMatcher", "HeaderMatcher", "QueryParamMatcher", "compile_string_matcher",
           "compile_header_matcher", "compile_query_matcher", "headers_value"]


class StringMatcher:
    """``type.matcher.v3.StringMatcher``: exact / prefix / suffix / contains / safe_regex."""

    __slots__ = ("kind", "value", "ignore_case", "regex", "match")

    def __init__(self, kind: str, value: str = "", ignore_case: bool = False, regex=None):
        self.kind = kind
        self.ignore_case = ignore_case and kind != "safe_regex"
        self.value = value.lower() if self.ignore_case else value
        self.regex = regex
        v = self.value
        if kind == "safe_regex":
            fm = regex.fullmatch
            self.match = lambda s: fm(s) is not None
        elif self.ignore_case:
            if kind == "exact":
                self.match = lambda s: s.lower() == v
            elif kind == "prefix":
                self.match = lambda s: s.lower().startswith(v)
            elif kind == "suffix":
                self.match = lambda s: s.lower().endswith(v)
            else:
                self.match = lambda s: v in s.lower()
        else:
            if kind == "exact":
                self.match = v.__eq__
            elif kind == "prefix":
                self.match = lambda s: s.startswith(v)
            elif kind == "suffix":
                self.match = lambda s: s.endswith(v)
            else:
                self.match = lambda s: v in s

    def __repr__(self):
        return "StringMatcher(%s=%r)" % (self.kind, self.regex.pattern if self.regex else self.value)


def compile_string_matcher(m, field: str = "string_match") -> StringMatcher:
    which = m.WhichOneof("match_pattern")
    if which in ("exact", "prefix", "suffix", "contains"):
        if which in ("prefix", "suffix", "contains") and not getattr(m, which):
            raise ConfigError("value length must be at least 1", field + "." + which)
        return StringMatcher(which, getattr(m, which), m.ignore_case)
    if which == "safe_regex":
        return StringMatcher("safe_regex", regex=compile_regex_matcher(m.safe_regex,
                                                                       field + ".safe_regex"))
    if which is None:
        raise ConfigError("a match pattern is required", field)
    raise ConfigError("string matcher '%s' is not supported" % which, field)


def headers_value(headers, name: str):
    """All values of ``name`` joined with ',', or None when absent."""
    vals = None
    for k, v in headers.items():
        if k == name:
            if vals is None:
                vals = v
            else:
                vals = vals + "," + v
    return vals


# header match kinds
_VALUE, _REGEX, _RANGE, _PRESENT, _STRING = range(5)


class HeaderMatcher:
    __slots__ = ("name", "kind", "value", "start", "end", "present", "invert", "missing_as_empty",
                 "sm", "regex")

    def match(self, headers) -> bool:
        name = self.name
        found = False
        for k, v in headers.items():
            if k == name:
                found = True
                if self._match_value(v):
                    return not self.invert
        if not found:
            if not self.missing_as_empty:
                if self.invert:
                    return self.kind == _PRESENT and self.present
                return self.kind == _PRESENT and not self.present
            return self._match_value("") != self.invert
        return self.invert

    def _match_value(self, value: str) -> bool:
        kind = self.kind
        if kind == _STRING:
            return self.sm.match(value)
        if kind == _VALUE:
            return not self.value or value == self.value
        if kind == _PRESENT:
            return self.present
        if kind == _REGEX:
            return self.regex.fullmatch(value) is not None
        try:
            iv = int(value.strip())
        except ValueError:
            return False
        return self.start <= iv < self.end

    def __repr__(self):
        return "HeaderMatcher(%s)" % self.name


def compile_header_matcher(h, field: str = "headers", response: bool = False) -> HeaderMatcher:
    if not h.name:
        raise ConfigError("header name is required", field + ".name")
    m = HeaderMatcher()
    m.name = h.name.lower() if response else request_header_name(h.name)
    m.invert = h.invert_match
    m.missing_as_empty = h.treat_missing_header_as_empty
    m.value = ""
    m.start = m.end = 0
    m.present = False
    m.sm = None
    m.regex = None
    which = h.WhichOneof("header_match_specifier")
    if which is None:
        m.kind = _VALUE
    elif which == "exact_match":
        m.kind = _VALUE
        m.value = h.exact_match
    elif which == "safe_regex_match":
        m.kind = _REGEX
        m.regex = compile_regex_matcher(h.safe_regex_match, field + ".safe_regex_match")
    elif which == "range_match":
        m.kind = _RANGE
        m.start, m.end = h.range_match.start, h.range_match.end
    elif which == "present_match":
        m.kind = _PRESENT
        m.present = h.present_match
    elif which in ("prefix_match", "suffix_match", "contains_match"):
        v = getattr(h, which)
        if not v:
            raise ConfigError("value length must be at least 1", field + "." + which)
        m.kind = _STRING
        m.sm = StringMatcher(which[:-6], v)
    elif which == "string_match":
        m.kind = _STRING
        m.sm = compile_string_matcher(h.string_match, field + ".string_match")
    else:
        raise ConfigError("header matcher '%s' is not supported" % which, field)
    return m


class QueryParamMatcher:
    __slots__ = ("name", "sm", "present")

    def match(self, params: dict) -> bool:
        v = params.get(self.name)
        if v is None:
            return False
        if self.present or self.sm is None:
            return True
        return self.sm.match(v)


def compile_query_matcher(q, field: str = "query_parameters") -> QueryParamMatcher:
    if not q.name:
        raise ConfigError("query parameter name is required", field + ".name")
    m = QueryParamMatcher()
    m.name = q.name
    m.sm = None
    m.present = False
    which = q.WhichOneof("query_parameter_match_specifier")
    if which == "string_match":
        m.sm = compile_string_matcher(q.string_match, field + ".string_match")
    elif which == "present_match":
        m.present = q.present_match
    return m


def path_only(path: str) -> str:
    """``path`` without its query string and fragment."""
    q = path.find("?")
    if q >= 0:
        path = path[:q]
    h = path.find("#")
    if h >= 0:
        path = path[:h]
    return path


def parse_query(path: str) -> dict:
    """First value of each query parameter of ``path`` (not percent-decoded, as Envoy matches)."""
    q = path.find("?")
    out: dict = {}
    if q < 0:
        return out
    qs = path[q + 1:]
    h = qs.find("#")
    if h >= 0:
        qs = qs[:h]
    for part in qs.split("&"):
        if not part:
            continue
        k, _, v = part.partition("=")
        if k not in out:
            out[k] = v
    return out
