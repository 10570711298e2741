"""Rendering of a ``pyproxy.stats.Store`` in Envoy 1.40's admin formats.

The store renders too, but a few details differ from what Envoy prints (and what Istio's agent
and Prometheus scrapers see); this module is the admin's reference rendering:

- ``/stats`` text: text readouts first, then counters and gauges sorted together, then
  histograms; histogram quantiles as ``P50(interval,cumulative)`` with shortest-repr numbers.
  The store keeps no flush-interval histogram, so the interval value is ``nan`` (Envoy's output
  when the last interval recorded nothing).
- JSON: compact, Envoy's key order, ``supported_quantiles`` as ``[0,25,...,99.9,100]``,
  ``{"cumulative": v, "interval": null}``.
- Prometheus: Envoy's tag extraction (defaults named ``envoy.<tag>``, so labels read
  ``envoy_cluster_name``; extractors without a name prefix run first; every regex sees the full
  name and the removed parts are cut out at the end; tokenized defaults like ``cluster.$.**``),
  ``{}`` on unlabelled series, counters, then gauges, then histograms, each family sorted,
  ``%.32g`` bucket bounds and sums, ``_rq_(\\d)xx`` -> ``_rq_xx`` with the class digit as value.
"""

from __future__ import annotations

import functools
import json
import math
import re

from prometheus_client import CollectorRegistry
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric,
                                    SummaryMetricFamily)
from prometheus_client.openmetrics.exposition import generate_latest

from pyproxy import stats as _stats
from pyproxy.routing.regex import RegexError, compile_admin_regex

QUANTILES = (0, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999, 1)
_QUANTILE_LABELS = ("0", "25", "50", "75", "90", "95", "99", "99.5", "99.9", "100")
SUPPORTED_QUANTILES = [0, 25, 50, 75, 90, 95, 99, 99.5, 99.9, 100]

# Stat-name prefixes registered as custom namespaces (Envoy's CustomStatNamespaces): their stats
# are exported to Prometheus without the ``envoy_`` prefix and with the namespace stripped, e.g.
# ``istiocustom.istio_requests_total`` -> ``istio_requests_total``.
CUSTOM_NAMESPACES: set[str] = {"istiocustom"}

STAT_TYPES = ("All", "Counters", "Gauges", "Histograms", "TextReadouts")


class StatsParamError(ValueError):
    """A bad query parameter; the message is the 400 body."""


# ---------------------------------------------------------------------------------------------
# Regex handling (RE2 syntax as Envoy takes it -> Python re)

_POSIX = {"[:digit:]": r"\d", "[:alpha:]": "a-zA-Z", "[:alnum:]": r"a-zA-Z\d", "[:space:]": r"\s",
          "[:upper:]": "A-Z", "[:lower:]": "a-z", "[:xdigit:]": "0-9a-fA-F", "[:word:]": r"\w",
          "[:punct:]": r"!-/:-@\[-`{-~"}


def re2_to_python(regex: str) -> str:
    for k, v in _POSIX.items():
        regex = regex.replace(k, v)
    return regex.replace(r"\z", r"\Z")


@functools.lru_cache(maxsize=64)
def compile_filter(regex: str):
    """Compile an Envoy ``filter=`` regex with RE2 (search semantics, linear time: the filter
    comes from the network, e.g. through Istio's 15090 listener); ``StatsParamError`` if invalid."""
    try:
        return compile_admin_regex(regex)
    except RegexError as e:
        raise StatsParamError("Invalid re2 regex: %s" % e.reason) from None


# ---------------------------------------------------------------------------------------------
# Tag extraction as Envoy does it

_TAG_VALUE = r"[^\.]+"
_EXPAND = {
    "<ADDRESS>": r"(?:(?:\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}|\[[a-fA-F_\d]+\])_\d+)",
    "<CIPHER>": r"[\w\-]+",
    "<TLS_VERSION>": r"TLSv\d\.\d",
    "<TAG_VALUE>": _TAG_VALUE,
    "<ROUTE_CONFIG_NAME>": r"[\w\-.]+",
    "<LISTENER_OR_CLUSTER_WITH_NAME>": r"(?:listener|cluster)\..*?",
}


def _expand(regex: str) -> str:
    for k, v in _EXPAND.items():
        regex = regex.replace(k, v)
    return regex


# Envoy's default extractors (source/common/config/well_known_names.cc, 1.40), in order:
# ("re", tag name, regex, substring that must occur, value that disables the tag) or
# ("tok", tag name, token pattern).
DEFAULT_EXTRACTORS = (
    ("re", "envoy.response_code", r"_rq(_(\d{3}))$", "_rq_", ""),
    ("re", "envoy.response_code_class", r"_rq_((\d))xx$", "_rq_", ""),
    ("re", "envoy.dynamodb_partition_id",
     r"^http\.<TAG_VALUE>\.dynamodb\.table\.<TAG_VALUE>\.capacity\.<TAG_VALUE>(\.__partition_id=(\w{7}))$",
     ".dynamodb.table.", ""),
    ("re", "envoy.dynamodb_operation",
     r"^http\.<TAG_VALUE>\.dynamodb.(?:operation|table\.<TAG_VALUE>\.capacity)(\.(<TAG_VALUE>))(?:\.|$)",
     ".dynamodb.", ""),
    ("tok", "envoy.mongo_callsite", "mongo.*.collection.*.callsite.$.query.**"),
    ("re", "envoy.dynamodb_table", r"^http\.<TAG_VALUE>\.dynamodb.(?:table|error)\.((<TAG_VALUE>)\.)",
     ".dynamodb.", ""),
    ("tok", "envoy.mongo_collection", "mongo.*.collection.$.**.query.*"),
    ("tok", "envoy.mongo_cmd", "mongo.*.cmd.$.**"),
    ("tok", "envoy.grpc_bridge_method", "cluster.*.grpc.*.$.**"),
    ("tok", "envoy.http_user_agent", "http.*.user_agent.$.**"),
    ("tok", "envoy.virtual_cluster", "vhost.*.vcluster.$.**"),
    ("tok", "envoy.fault_downstream_cluster", "http.*.fault.$.**"),
    ("re", "envoy.ssl_cipher", r"^listener\..*?\.ssl\.ciphers(\.(<CIPHER>))$", ".ssl.ciphers.", ""),
    ("re", "envoy.ssl_curve", r"^<LISTENER_OR_CLUSTER_WITH_NAME>\.ssl\.curves(\.(<CIPHER>))$",
     ".ssl.curves.", ""),
    ("re", "envoy.ssl_sigalg", r"^<LISTENER_OR_CLUSTER_WITH_NAME>\.ssl\.sigalgs(\.(<CIPHER>))$",
     ".ssl.sigalgs.", ""),
    ("re", "envoy.ssl_version", r"^<LISTENER_OR_CLUSTER_WITH_NAME>\.ssl\.versions(\.(<TLS_VERSION>))$",
     ".ssl.versions.", ""),
    ("re", "cipher_suite", r"^cluster\.<TAG_VALUE>\.ssl\.ciphers(\.(<CIPHER>))$", ".ssl.ciphers.", ""),
    ("tok", "envoy.grpc_bridge_service", "cluster.*.grpc.$.**"),
    ("tok", "envoy.tcp_prefix", "tcp.$.**"),
    ("tok", "envoy.udp_prefix", "udp.$.**"),
    ("tok", "envoy.clientssl_prefix", "auth.clientssl.$.**"),
    ("tok", "envoy.ratelimit_prefix", "ratelimit.$.**"),
    ("tok", "envoy.cluster_name", "cluster.$.**"),
    ("re", "envoy.http_conn_manager_prefix", r"^listener\..*?\.http\.((<TAG_VALUE>)\.)", ".http.", ""),
    ("tok", "envoy.ext_authz_prefix", "cluster.*.ext_authz.$.**"),
    ("tok", "envoy.ext_authz_prefix", "http.*.ext_authz.$.**"),
    ("tok", "envoy.http_conn_manager_prefix", "http.$.**"),
    ("re", "envoy.worker_id",
     r"^(?:listener\.(?:<ADDRESS>|<TAG_VALUE>)\.|server\.|listener_manager\.|"
     r"thread_local_cluster_manager\.)worker_((\d+)\.)", "", ""),
    ("re", "envoy.listener_address", r"^listener\.((<ADDRESS>|<TAG_VALUE>)\.)", "", "admin"),
    ("tok", "envoy.virtual_host", "vhost.$.**"),
    ("tok", "envoy.mongo_prefix", "mongo.$.**"),
    ("re", "envoy.rds_route_config", r"^http\.<TAG_VALUE>\.rds\.((<ROUTE_CONFIG_NAME>)\.)\w+?$", ".rds.", ""),
    ("tok", "envoy.route", "vhost.*.route.$.**"),
    ("tok", "envoy.thrift_prefix", "thrift.$.**"),
    ("tok", "envoy.redis_prefix", "redis.$.**"),
    ("tok", "envoy.http_local_rate_limit_prefix", "$.http_local_rate_limit.**"),
    ("tok", "envoy.local_network_ratelimit_prefix", "local_rate_limit.$.**"),
    ("tok", "envoy.local_listener_ratelimit_prefix", "listener_local_ratelimit.$.**"),
    ("tok", "envoy.dns_filter_prefix", "dns_filter.$.**"),
)

_PREFIX_CHAR = re.compile(r"[A-Za-z0-9_]")


def regex_prefix(regex: str) -> str:
    """Envoy's rule: ``^word\\.`` or ``^word(?=\\.)`` (or ``^word$``) makes ``word`` the prefix:
    the extractor only runs on names whose first token is that word."""
    if not regex.startswith("^"):
        return ""
    i = 1
    while i < len(regex) and _PREFIX_CHAR.match(regex[i]):
        i += 1
    if i == 1:
        return ""
    rest = regex[i:]
    if rest.startswith("\\.") or rest.startswith("(?=\\.)") or rest == "$":
        return regex[1:i]
    return ""


class _RegexExtractor:
    __slots__ = ("name", "regex", "prefix", "substr", "negative")

    def __init__(self, name, regex, substr="", negative="", prefix=None):
        self.name = name
        self.regex = re.compile(regex) if isinstance(regex, str) else regex
        self.prefix = regex_prefix(self.regex.pattern) if prefix is None else prefix
        self.substr = substr
        self.negative = negative

    def extract(self, name, tags, removes):
        if self.substr and self.substr not in name:
            return
        m = self.regex.search(name)
        if m is None or self.regex.groups < 1 or m.start(1) < 0:
            return
        value = m.group(2) if self.regex.groups >= 2 and m.group(2) is not None else m.group(1)
        if self.negative and value == self.negative:
            return
        tags.append((self.name, value))
        removes.append(m.span(1))


class _TokenExtractor:
    """``cluster.$.**``: ``*`` is one token, ``**`` any number, ``$`` the tag value (one token,
    removed together with one dot)."""

    __slots__ = ("name", "tokens", "prefix", "dollar")

    def __init__(self, name, pattern):
        self.name = name
        self.tokens = pattern.split(".")
        self.dollar = self.tokens.index("$")
        first = self.tokens[0]
        self.prefix = first if first not in ("$", "*", "**") else ""

    def _match(self, toks, ti, pi, out):
        pat = self.tokens
        while pi < len(pat):
            p = pat[pi]
            if p == "**":
                if pi == len(pat) - 1:
                    return True
                for k in range(ti, len(toks) + 1):
                    if self._match(toks, k, pi + 1, out):
                        return True
                return False
            if ti >= len(toks):
                return False
            if p == "$":
                out.append(ti)
            elif p != "*" and p != toks[ti]:
                return False
            ti += 1
            pi += 1
        return ti == len(toks)

    def extract(self, name, tags, removes):
        toks = name.split(".")
        out: list = []
        if not self._match(toks, 0, 0, out) or not out:
            return
        idx = out[-1]
        start = sum(len(t) + 1 for t in toks[:idx])
        end = start + len(toks[idx])
        if idx + 1 < len(toks):
            end += 1  # "c1." — the value and the dot after it
        elif idx > 0:
            start -= 1  # last token: the dot before it
        tags.append((self.name, toks[idx]))
        removes.append((start, end))


class _FixedExtractor:
    """``TagSpecifier.fixed_value``: the tag on every stat, nothing removed from the name."""

    __slots__ = ("name", "value", "prefix")

    def __init__(self, name, value):
        self.name = name
        self.value = value
        self.prefix = ""

    def extract(self, name, tags, removes):
        tags.append((self.name, self.value))


DEFAULT_TAG_NAMES = frozenset(d[1] for d in DEFAULT_EXTRACTORS)


def _default_extractors(only=None):
    out = []
    for d in DEFAULT_EXTRACTORS:
        if only is not None and d[1] != only:
            continue
        if d[0] == "re":
            out.append(_RegexExtractor(d[1], re.compile(_expand(d[2])), d[3], d[4]))
        else:
            out.append(_TokenExtractor(d[1], d[2]))
    return out


def compile_tag_specifiers(stats_config, field: str = "stats_config.stats_tags") -> list:
    """The bootstrap's ``stats_tags`` in config order, as Envoy's tag producer takes them:
    ``("regex", name, compiled)``, ``("fixed", name, value)`` (the tag on every stat) or
    ``("default", name)`` (no regex: Envoy's default extractors of that name). ``ConfigError`` on
    a regex neither engine compiles or a name without regex that is no default's, as Envoy refuses
    them."""
    from pyproxy.config.errors import ConfigError
    out = []
    for i, t in enumerate(stats_config.stats_tags):
        f = "%s[%d]" % (field, i)
        if t.WhichOneof("tag_value") == "fixed_value":
            out.append(("fixed", t.tag_name, t.fixed_value))
        elif t.regex:
            try:
                out.append(("regex", t.tag_name, _stats.compile_tag_regex(t.regex)))
            except (re.error, ValueError) as e:
                raise ConfigError("invalid regex '%s': %s" % (t.regex, e), field=f + ".regex") from None
        elif t.tag_name in DEFAULT_TAG_NAMES:
            out.append(("default", t.tag_name))
        else:
            raise ConfigError("No regex specified for tag specifier and no default regex for name: '%s'"
                              % t.tag_name, field=f)
    return out


def build_from_specifiers(specifiers, use_defaults=True) -> list:
    """Envoy's order: the default extractors (``use_all_default_tags``, default true), then each
    tag specifier in config order."""
    out = _default_extractors() if use_defaults else []
    for sp in specifiers:
        if sp[0] == "regex":
            out.append(_RegexExtractor(sp[1], sp[2]))
        elif sp[0] == "fixed":
            out.append(_FixedExtractor(sp[1], sp[2]))
        else:
            out.extend(_default_extractors(sp[1]))
    return out


def build_extractors(specs, use_defaults=True):
    """``specs``: user ``(tag_name, regex)`` pairs (Istio's ``stats_tags``), then Envoy's defaults."""
    out = []
    for name, regex in specs:
        if not isinstance(regex, str):
            out.append(_RegexExtractor(name, regex))
        else:  # from config: RE2 unless it needs std::regex syntax (see compile_tag_regex)
            out.append(_RegexExtractor(name, _stats.compile_tag_regex(regex)))
    if use_defaults:
        for d in DEFAULT_EXTRACTORS:
            if d[0] == "re":
                out.append(_RegexExtractor(d[1], re.compile(_expand(d[2])), d[3], d[4]))
            else:
                out.append(_TokenExtractor(d[1], d[2]))
    return out


class TagProducer:
    """Splits a stat name into Envoy's tag-extracted name and its tags."""

    def __init__(self, extractors):
        self.no_prefix = [e for e in extractors if not e.prefix]
        self.by_prefix: dict[str, list] = {}
        for e in extractors:
            if e.prefix:
                self.by_prefix.setdefault(e.prefix, []).append(e)
        # tag names more than one extractor produces: as Envoy, only the first that matches counts
        seen: set = set()
        self.dups = {e.name for e in extractors if e.name in seen or seen.add(e.name)}
        self._cache: dict[str, tuple] = {}

    def produce(self, name: str) -> tuple[str, tuple]:
        hit = self._cache.get(name)
        if hit is not None:
            return hit
        tags: list = []
        removes: list = []
        dups = self.dups
        first = name.split(".", 1)[0]
        for e in self.no_prefix + self.by_prefix.get(first, []) if dups else ():
            if e.name in dups and any(t[0] == e.name for t in tags):
                continue
            e.extract(name, tags, removes)
        if not dups:
            for e in self.no_prefix:
                e.extract(name, tags, removes)
            for e in self.by_prefix.get(first, ()):
                e.extract(name, tags, removes)
        if removes:
            keep = [True] * len(name)
            for s, t in removes:
                for i in range(s, t):
                    keep[i] = False
            base = "".join(c for c, k in zip(name, keep) if k)
        else:
            base = name
        hit = (base, tuple(tags))
        if len(self._cache) < 200000:
            self._cache[name] = hit
        return hit


_STORE_DEFAULTS = {(n, re2_to_python(r)) for n, r in _stats.DEFAULT_TAG_SPECS}
_producers: dict[int, tuple] = {}


def producer_for(store) -> TagProducer:
    """A TagProducer equivalent to the store's extractors, with the store's default entries
    replaced by Envoy's real defaults (see module doc)."""
    exs = getattr(store, "extractors", [])
    specifiers = getattr(store, "tag_specifiers", None)
    key = id(store)
    cached = _producers.get(key)
    sig = (id(exs), len(exs), id(specifiers))
    if cached is not None and cached[0] == sig and cached[1] is store:
        return cached[2]
    if specifiers is not None:  # the bootstrap's stats_config (server.py)
        p = TagProducer(build_from_specifiers(specifiers, store.use_default_tags))
        _producers[key] = (sig, store, p)
        return p
    user = []
    use_defaults = False
    for e in exs:
        if (e.name, e.regex.pattern) in _STORE_DEFAULTS:
            use_defaults = True
        else:
            user.append((e.name, e.regex))
    if not exs:
        use_defaults = True
    p = TagProducer(build_extractors(user, use_defaults))
    _producers[key] = (sig, store, p)
    return p


# ---------------------------------------------------------------------------------------------
# Number formatting

def fmt_num(v) -> str:
    """Envoy's shortest round-trip rendering: ``0``, ``1.02``, ``1.0166666666666666``, ``nan``."""
    if v is None:
        return "nan"
    if isinstance(v, int):
        return str(v)
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if v.is_integer() and abs(v) < 1e16:
        return str(int(v))
    return repr(v)


def _json_num(v):
    if v is None or (isinstance(v, float) and (math.isnan(v) or math.isinf(v))):
        return None
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e16:
        return int(v)
    return v


def fmt_g32(v: float) -> str:
    return "%.32g" % v


# ---------------------------------------------------------------------------------------------
# Selection

class Query:
    """The parsed stats query: ``usedonly``, ``filter``, ``invert_filter``, ``type``,
    ``histogram_buckets``, ``text_readouts``."""

    __slots__ = ("usedonly", "regex", "invert", "type", "buckets", "text_readouts")

    def __init__(self, params: dict, prometheus: bool = False):
        self.usedonly = "usedonly" in params
        f = params.get("filter")
        self.regex = compile_filter(f) if f else None
        self.invert = "invert_filter" in params
        t = params.get("type", "All") or "All"
        if t not in STAT_TYPES:
            raise StatsParamError("invalid &type= param")
        self.type = t
        default = "cumulative" if prometheus else "summary"
        b = params.get("histogram_buckets", default) or default
        allowed = ("cumulative", "summary") if prometheus else ("cumulative", "disjoint", "summary")
        if b not in allowed:
            raise StatsParamError("usage: /stats?histogram_buckets=(%s)" % "|".join(allowed))
        self.buckets = b
        self.text_readouts = "text_readouts" in params

    def name_ok(self, name: str) -> bool:
        if self.regex is None:
            return True
        return (self.regex.search(name) is None) if self.invert else (self.regex.search(name) is not None)

    def want(self, kind: str) -> bool:
        return self.type == "All" or self.type == kind


def _select(store, q: Query):
    """(text_readouts, counters+gauges, histograms), each sorted by name."""
    tr, cg, hs = [], [], []
    if q.want("TextReadouts"):
        for n, v in list(store.text_readouts.items()):
            if q.name_ok(n):
                tr.append((n, v))
    if q.want("Counters"):
        for n, c in list(store.counters.items()):
            if (not q.usedonly or c.used) and q.name_ok(n):
                cg.append((n, c))
    if q.want("Gauges"):
        for n, g in list(store.gauges.items()):
            if (not q.usedonly or g.used) and q.name_ok(n):
                cg.append((n, g))
    if q.want("Histograms"):
        for n, h in list(store.histograms.items()):
            if (not q.usedonly or h.used) and q.name_ok(n):
                hs.append((n, h))
    tr.sort(key=lambda x: x[0])
    cg.sort(key=lambda x: x[0])
    hs.sort(key=lambda x: x[0])
    return tr, cg, hs


def _quantiles(h) -> list:
    if not h.count:
        return [None] * len(QUANTILES)
    return [h.quantile(q) for q in QUANTILES]


def _bucket_counts(h, cumulative: bool) -> list:
    out = []
    total = 0
    for i, _ in enumerate(h.buckets):
        c = h.counts[i]
        total += c
        out.append(total if cumulative else c)
    return out


# ---------------------------------------------------------------------------------------------
# Renderers

def render_text(store, q: Query) -> str:
    tr, cg, hs = _select(store, q)
    lines = ['%s: "%s"' % (n, v) for n, v in tr]
    lines.extend("%s: %d" % (n, s.value) for n, s in cg)
    for n, h in hs:
        if q.buckets == "summary":
            if not h.count:
                lines.append("%s: No recorded values" % n)
                continue
            vals = _quantiles(h)
            lines.append("%s: %s" % (n, " ".join(
                "P%s(nan,%s)" % (lbl, fmt_num(v)) for lbl, v in zip(_QUANTILE_LABELS, vals))))
        else:
            counts = _bucket_counts(h, q.buckets == "cumulative")
            lines.append("%s: %s" % (n, " ".join(
                "B%s(0,%d)" % (fmt_num(float(b)), c) for b, c in zip(h.buckets, counts))))
    return "".join(line + "\n" for line in lines)


def render_json(store, q: Query) -> str:
    tr, cg, hs = _select(store, q)
    stats: list = [{"name": n, "value": v} for n, v in tr]
    stats.extend({"name": n, "value": s.value} for n, s in cg)
    if hs:
        if q.buckets == "summary":
            computed = []
            for n, h in hs:
                computed.append({"name": n, "values": [
                    {"cumulative": _json_num(v), "interval": None} for v in _quantiles(h)]})
            stats.append({"histograms": {"supported_quantiles": SUPPORTED_QUANTILES,
                                         "computed_quantiles": computed}})
        else:
            details = []
            for n, h in hs:
                counts = _bucket_counts(h, q.buckets == "cumulative")
                details.append({"name": n, "buckets": [
                    {"upper_bound": _json_num(float(b)), "interval": 0, "cumulative": c}
                    for b, c in zip(h.buckets, counts)]})
            stats.append({"histograms": details})
    return json.dumps({"stats": stats}, separators=(",", ":"), ensure_ascii=False)


_PROM_BAD = re.compile(r"[^a-zA-Z0-9_]")
_PROM_OK = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


def sanitize(name: str) -> str:
    s = _PROM_BAD.sub("_", name)
    if s and s[0].isdigit():
        s = "_" + s
    return s


def prometheus_name(extracted: str) -> str | None:
    ns, dot, rest = extracted.partition(".")
    if dot and ns in CUSTOM_NAMESPACES:
        s = sanitize(rest)
        return s if _PROM_OK.match(s) else None
    return "envoy_" + sanitize(extracted)


def _escape_label(v: str) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(tags, extra=()) -> str:
    parts = ['%s="%s"' % (sanitize(k), _escape_label(v)) for k, v in tags]
    parts.extend('%s="%s"' % (k, v) for k, v in extra)
    return "{" + ",".join(parts) + "}"


def _grouper(store):
    prod = producer_for(store)
    tagged = getattr(store, "tagged", None) or {}

    def group(items):
        """{prometheus name: [(stat name, tags, stat)]}, ordered as Envoy orders families: by
        tag-extracted name ("cluster.x" before "cluster_manager.y")."""
        fams: dict[str, list] = {}
        keys: dict[str, str] = {}
        for n, s in items:
            hit = tagged.get(n)
            base, tags = hit if hit is not None else prod.produce(n)
            pn = prometheus_name(base)
            if pn is not None:
                fams.setdefault(pn, []).append((n, tags, s))
                keys.setdefault(pn, base)
        return {pn: fams[pn] for pn in sorted(fams, key=lambda k: keys[k])}
    return group


def render_prometheus(store, q: Query) -> str:
    """Prometheus text format 0.0.4, laid out as Envoy lays it out (see the module doc); the
    ``istio_*`` stats (tagged, namespace ``istiocustom``) carry their tags as labels."""
    group = _grouper(store)
    tr, cg, hs = _select(store, q)
    out: list = []
    counters = [(n, s) for n, s in cg if s.kind == "counter"]
    gauges = [(n, s) for n, s in cg if s.kind == "gauge"]
    for kind, items in (("counter", counters), ("gauge", gauges)):
        fams = group(items)
        for pn in fams:
            out.append("# TYPE %s %s" % (pn, kind))
            for n, tags, s in fams[pn]:
                out.append("%s%s %d" % (pn, _labels(tags), s.value))
    if q.text_readouts:
        fams = group(tr)
        for pn in fams:
            out.append("# TYPE %s gauge" % pn)
            for n, tags, v in fams[pn]:
                out.append("%s%s 0" % (pn, _labels(tags, (("text_value", _escape_label(v)),))))
    fams = group(hs)
    for pn in fams:
        if q.buckets == "summary":
            out.append("# TYPE %s summary" % pn)
            for n, tags, h in fams[pn]:
                for qq, v in zip(QUANTILES, _quantiles(h)):
                    out.append("%s%s %s" % (pn, _labels(tags, (("quantile", fmt_num(float(qq))),)),
                                            fmt_g32(v) if v is not None else "nan"))
                out.append("%s_sum%s %s" % (pn, _labels(tags), fmt_g32(h.total)))
                out.append("%s_count%s %d" % (pn, _labels(tags), h.count))
            continue
        out.append("# TYPE %s histogram" % pn)
        for n, tags, h in fams[pn]:
            for b, c in zip(h.buckets, _bucket_counts(h, True)):
                out.append("%s_bucket%s %d" % (pn, _labels(tags, (("le", fmt_g32(b)),)), c))
            out.append("%s_bucket%s %d" % (pn, _labels(tags, (("le", "+Inf"),)), h.count))
            out.append("%s_sum%s %s" % (pn, _labels(tags), fmt_g32(h.total)))
            out.append("%s_count%s %d" % (pn, _labels(tags), h.count))
    return "".join(line + "\n" for line in out)


# ---------------------------------------------------------------------------------------------
# OpenMetrics, through prometheus_client's exposition

OPENMETRICS_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"


def wants_openmetrics(accept: str) -> bool:
    """True when the scraper's Accept header prefers OpenMetrics (as Prometheus asks by default:
    ``application/openmetrics-text;version=1.0.0,...;q=0.x,text/plain;version=0.0.4;q=0.x``)."""
    if not accept:
        return False
    best_om = best_text = -1.0
    for part in accept.split(","):
        fields = [f.strip() for f in part.split(";")]
        mt = fields[0].lower()
        qv = 1.0
        for f in fields[1:]:
            k, _, v = f.partition("=")
            if k.strip().lower() == "q":
                try:
                    qv = float(v)
                except ValueError:
                    qv = 0.0
        if mt == "application/openmetrics-text":
            best_om = max(best_om, qv)
        elif mt in ("text/plain", "*/*", "text/*"):
            best_text = max(best_text, qv)
    return best_om > 0 and best_om >= best_text


class StoreCollector:
    """The store as prometheus_client metric families (same names, labels and values as the text
    format). Counters whose name ends in ``_total`` are OpenMetrics counters; Envoy's other counters
    (``envoy_cluster_upstream_rq_2xx``...) keep their names as ``unknown``-typed families, since an
    OpenMetrics counter would rename their samples to ``..._total``."""

    def __init__(self, store, q: Query):
        self.store = store
        self.q = q

    def collect(self):
        group = _grouper(self.store)
        q = self.q
        tr, cg, hs = _select(self.store, q)
        counters = [(n, s) for n, s in cg if s.kind == "counter"]
        gauges = [(n, s) for n, s in cg if s.kind == "gauge"]

        def names(tags):
            return [sanitize(k) for k, _ in tags], [str(v) for _, v in tags]

        def value_family(cls, pn, rows):
            # one family per name, labelled by its first row's tag names, one sample per row
            fam = None
            for n, tags, s in rows:
                keys, vals = names(tags)
                if fam is None:
                    fam = cls(pn, "", labels=keys)
                fam.add_metric(vals, s.value)
            return fam
        cfams, gfams, hfams = group(counters), group(gauges), group(hs)
        taken = set(cfams) | set(gfams) | set(hfams)
        for pn, rows in cfams.items():
            # an OpenMetrics counter family is named without _total: only when that name is free
            if pn.endswith("_total") and pn[:-6] not in taken:
                yield value_family(CounterMetricFamily, pn, rows)
            else:
                m = Metric(pn, "", "unknown")
                for n, tags, c in rows:
                    keys, vals = names(tags)
                    m.add_sample(pn, dict(zip(keys, vals)), c.value)
                yield m
        for pn, rows in gfams.items():
            yield value_family(GaugeMetricFamily, pn, rows)
        if q.text_readouts:
            for pn, rows in group(tr).items():
                fam = None
                for n, tags, v in rows:
                    keys, vals = names(tags)
                    if fam is None:
                        fam = GaugeMetricFamily(pn, "", labels=keys + ["text_value"])
                    fam.add_metric(vals + [str(v)], 0)
                yield fam
        for pn, rows in hfams.items():
            fam = None
            for n, tags, h in rows:
                keys, vals = names(tags)
                if q.buckets == "summary":
                    if fam is None:
                        fam = SummaryMetricFamily(pn, "", labels=keys)
                    fam.add_metric(vals, h.count, h.total)
                    continue
                if fam is None:
                    fam = HistogramMetricFamily(pn, "", labels=keys)
                buckets = [(fmt_g32(b), c) for b, c in zip(h.buckets, _bucket_counts(h, True))]
                buckets.append(("+Inf", h.count))
                fam.add_metric(vals, buckets, h.total)
            yield fam


def render_openmetrics(store, q: Query) -> bytes:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(StoreCollector(store, q))
    return generate_latest(reg)
