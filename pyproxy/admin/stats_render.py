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

from pyproxy.routing.regex import RegexError, compile_admin_regex
# tag extraction lives in stats/tags.py; its names stay importable from here
from pyproxy.stats.tags import (DEFAULT_EXTRACTORS, DEFAULT_TAG_NAMES, TagProducer,  # noqa: F401
                                build_extractors, build_from_specifiers, compile_tag_specifiers,
                                producer_for, re2_to_python, regex_prefix)

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
# Regex handling

@functools.lru_cache(maxsize=64)
def compile_filter(regex: str):
    """Compile an Envoy ``filter=`` regex with RE2 (search semantics, linear time: the filter
    comes from the network, e.g. through Istio's 15090 listener); ``StatsParamError`` if invalid."""
    try:
        return compile_admin_regex(regex)
    except RegexError as e:
        raise StatsParamError("Invalid re2 regex: %s" % e.reason) from None


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
