"""The bootstrap's ``stats_config.stats_matcher`` (``config.metrics.v3.StatsMatcher``).

Envoy decides, when a stat is created, whether it is instantiated: ``reject_all``; an
``inclusion_list`` (only stats whose name matches one of its ``StringMatcher`` patterns exist); an
``exclusion_list`` (stats whose name matches one of its patterns do not exist). The name matched is
the stat's full name before tag extraction (``cluster.<name>.upstream_rq_total``; for a stat made
with explicit tags, such as Istio's ``istio_*`` metrics, the flat name with the tags joined:
``istiocustom.istio_requests_total.reporter.destination...``). Istio's bootstrap uses an inclusion
list (pilot-agent renders prefixes, suffixes and regexes from ``proxyStatsMatcher`` and its
defaults), so under Istio most ``cluster.*`` / ``http.*`` / ``listener.*`` stats do not exist.

A rejected stat still works for the code that holds it (a counter counts, a gauge keeps its value,
as the proxy may read it), but it is not in the store: not in ``/stats``, ``/stats/prometheus`` or
any other rendering, and freed with its holder. The decision is made once per creation, never per
increment: nothing here runs on the data path.

The patterns are grouped at config time (one ``str.startswith`` with a tuple of every prefix, one
``endswith`` for suffixes, a set for exact names, RE2 ``FullMatch`` for ``safe_regex``), so a
decision is a few string operations whatever the list's length.
"""

from __future__ import annotations

from ..config.errors import ConfigError
from ..routing.matchers import compile_string_matcher

__all__ = ["StatsMatcher", "compile_stats_matcher"]


class _Patterns:
    """A ``ListStringMatcher`` grouped for speed: ``match(name)`` is True when any pattern matches."""

    __slots__ = ("exact", "prefixes", "suffixes", "contains", "ci_exact", "ci_prefixes", "ci_suffixes",
                 "ci_contains", "regexes", "any_ci")

    def __init__(self, patterns, field: str):
        if not len(patterns):
            raise ConfigError("value must contain at least 1 item(s)", field=field + ".patterns")
        exact, prefixes, suffixes, contains = set(), [], [], []
        ci_exact, ci_prefixes, ci_suffixes, ci_contains = set(), [], [], []
        regexes = []
        for i, p in enumerate(patterns):
            m = compile_string_matcher(p, "%s.patterns[%d]" % (field, i))
            if m.kind == "safe_regex":
                regexes.append(m.regex.fullmatch)
                continue
            v = m.value  # already lower-cased when ignore_case
            if m.ignore_case:
                {"exact": ci_exact.add, "prefix": ci_prefixes.append, "suffix": ci_suffixes.append,
                 "contains": ci_contains.append}[m.kind](v)
                continue
            if m.kind == "exact":
                exact.add(v)
            elif m.kind == "prefix":
                prefixes.append(v)
                if len(v) > 1 and v.endswith("."):
                    # Envoy keeps such a prefix as a token prefix of the stat name: the stat named
                    # just "a.b" starts with the tokens of "a.b." too
                    exact.add(v[:-1])
            elif m.kind == "suffix":
                suffixes.append(v)
            else:
                contains.append(v)
        self.exact = frozenset(exact)
        self.prefixes = tuple(prefixes)
        self.suffixes = tuple(suffixes)
        self.contains = tuple(contains)
        self.ci_exact = frozenset(ci_exact)
        self.ci_prefixes = tuple(ci_prefixes)
        self.ci_suffixes = tuple(ci_suffixes)
        self.ci_contains = tuple(ci_contains)
        self.regexes = tuple(regexes)
        self.any_ci = bool(ci_exact or ci_prefixes or ci_suffixes or ci_contains)

    def match(self, name: str) -> bool:
        if name in self.exact:
            return True
        if self.prefixes and name.startswith(self.prefixes):
            return True
        if self.suffixes and name.endswith(self.suffixes):
            return True
        for c in self.contains:
            if c in name:
                return True
        if self.any_ci:
            low = name.lower()
            if low in self.ci_exact:
                return True
            if self.ci_prefixes and low.startswith(self.ci_prefixes):
                return True
            if self.ci_suffixes and low.endswith(self.ci_suffixes):
                return True
            for c in self.ci_contains:
                if c in low:
                    return True
        for fm in self.regexes:
            if fm(name) is not None:
                return True
        return False


class StatsMatcher:
    """``rejects(name)``: True when the stat must not be instantiated."""

    __slots__ = ("mode", "patterns", "rejects")

    def __init__(self, mode: str, patterns: _Patterns | None = None):
        self.mode = mode  # "reject_all", "inclusion" or "exclusion"
        self.patterns = patterns
        if mode == "reject_all":
            self.rejects = _reject_all
        elif mode == "inclusion":
            m = patterns.match
            self.rejects = lambda name: not m(name)
        else:
            self.rejects = patterns.match

    def __repr__(self):
        return "StatsMatcher(%s)" % self.mode


def _reject_all(name: str) -> bool:
    return True


def compile_stats_matcher(stats_config, field: str = "stats_config.stats_matcher") -> StatsMatcher | None:
    """The compiled matcher of a ``StatsConfig``, or None when every stat is instantiated (no
    matcher, or ``reject_all: false``). ``ConfigError`` naming the field, as Envoy refuses them: a
    matcher with no case set, an empty pattern list, a bad pattern (an invalid or too large RE2
    regex, an empty prefix, a ``custom`` matcher)."""
    if not stats_config.HasField("stats_matcher"):
        return None
    sm = stats_config.stats_matcher
    which = sm.WhichOneof("stats_matcher")
    if which == "reject_all":
        return StatsMatcher("reject_all") if sm.reject_all else None
    if which == "inclusion_list":
        return StatsMatcher("inclusion", _Patterns(sm.inclusion_list.patterns, field + ".inclusion_list"))
    if which == "exclusion_list":
        return StatsMatcher("exclusion", _Patterns(sm.exclusion_list.patterns, field + ".exclusion_list"))
    if which is None:
        raise ConfigError("one of reject_all, inclusion_list or exclusion_list is required", field=field)
    raise ConfigError("unknown stats matcher '%s'" % which, field=field)
