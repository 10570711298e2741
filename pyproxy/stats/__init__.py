"""Envoy-style statistics: counters, gauges and histograms with dotted names.

Stats are created at config time (``store.counter(name)``) and the data path only touches the
returned object (``c.value += 1`` or ``c.inc()``), so nothing on the hot path looks a name up.

Rendering follows Envoy's admin formats: ``/stats`` text (``name: value``), JSON, and Prometheus
with Envoy's default tag extraction (``cluster.<name>.x`` -> ``envoy_cluster_x{cluster_name=...}``).
"""

from __future__ import annotations

import re

import re2

from .derived import DiffCounter, MirrorCounter, SumCounter  # noqa: F401  (re-exported)
from .histogram import DEFAULT_BUCKETS, QUANTILES, Histogram  # noqa: F401  (re-exported)


class Counter:
    __slots__ = ("name", "value")
    kind = "counter"

    def __init__(self, name: str):
        self.name = name
        self.value = 0

    def inc(self, n: int = 1) -> None:
        self.value += n

    @property
    def used(self) -> bool:
        return self.value != 0


class Gauge:
    """A gauge. ``import_mode`` is Envoy's: ``accumulate`` gauges sum across workers, ``never`` do not."""

    __slots__ = ("name", "value", "used", "accumulate")
    kind = "gauge"

    def __init__(self, name: str, accumulate: bool = True):
        self.name = name
        self.value = 0
        self.used = False
        self.accumulate = accumulate

    def set(self, v: int) -> None:
        self.value = v
        self.used = True

    def inc(self, n: int = 1) -> None:
        self.value += n
        self.used = True

    def dec(self, n: int = 1) -> None:
        self.value -= n
        self.used = True


# Envoy's default tag extractors (source/common/config/well_known_names.cc), in order. Each regex's
# first group is removed from the name and its second group is the tag value.
DEFAULT_TAG_SPECS = [
    ("cluster_name", r"^cluster\.((.+?)\.)"),
    ("listener_address", r"^listener\.(((?:[_.\[\]:\w]*|[_\[\]a-fA-F\d:]*))\.)"),
    ("http_conn_manager_prefix", r"^http\.((.*?)\.)"),
    ("response_code", r"_rq(_(\d{3}))$"),
    ("response_code_class", r"_rq(_(\dxx))$"),
    ("tcp_prefix", r"^tcp\.((.*?)\.)\w+?$"),
    ("virtual_host", r"^vhost\.((.*?)\.)"),
    ("virtual_cluster", r"^vhost\.[\w\.\-]+\.vcluster\.((.*?)\.)"),
    ("route", r"^vhost\.[\w\.\-]+\.route\.((.*?)\.)"),
    ("grpc_bridge_service", r"^cluster\.[^\.]+\.grpc\.([^\.]+)\."),
    ("worker_id", r"^listener_manager\.worker_((\d+)\.)"),
    ("rds_route_config", r"^http\.[^\.]+\.rds\.((.*?)\.)"),
]


_TAG_RE2_OPTS = re2.Options()
_TAG_RE2_OPTS.log_errors = False


def compile_tag_regex(regex: str):
    """A tag extractor's regex from config (``stats_config.stats_tags``): RE2 whenever RE2 takes
    it. Envoy runs these on std::regex, and Istio's bootstrap has one with a look-ahead that RE2
    refuses: only such a pattern is compiled with Python's ``re``, and it only ever sees stat names
    (made from config), never request data. ``re.error`` when neither engine takes it."""
    try:
        return re2.compile(regex, _TAG_RE2_OPTS)
    except re2.error:
        return re.compile(_re2_to_python(regex))


class TagExtractor:
    __slots__ = ("name", "regex")

    def __init__(self, name: str, regex: str):
        self.name = name
        self.regex = compile_tag_regex(regex)

    def extract(self, name: str):
        m = self.regex.search(name)
        if not m or m.lastindex is None or m.lastindex < 1:
            return None
        value = m.group(2) if m.lastindex >= 2 else m.group(1)
        start, end = m.span(1)
        return value, name[:start] + name[end:]


def _re2_to_python(regex: str) -> str:
    # RE2 POSIX classes that Istio's bootstrap uses; Python's re lacks them.
    return regex.replace("[:digit:]", r"\d").replace("[:alpha:]", "a-zA-Z").replace("[:alnum:]", r"a-zA-Z\d")


# The name of every stat the stats_matcher rejected (one shared string: a detached stat costs its
# object, not a copy of its name; nothing renders it)
DETACHED = "(not instantiated: stats_config.stats_matcher)"


class Store:
    """All stats of one process. Names are unique across kinds, as in Envoy.

    ``matcher`` (the bootstrap's ``stats_config.stats_matcher``, see ``stats/matcher.py``): a stat
    whose name it rejects is made detached (it counts for its holder, its name is ``DETACHED``) and
    never enters the store, so no rendering shows it and it is freed with its holder. Decided at
    creation only."""

    def __init__(self, tag_specs=None, use_default_tags: bool = True, matcher=None):
        self.counters: dict[str, Counter] = {}
        self.gauges: dict[str, Gauge] = {}
        self.histograms: dict[str, Histogram] = {}
        self.text_readouts: dict[str, str] = {}
        self.use_default_tags = use_default_tags
        # the bootstrap's stats_tags in config order (stats/tags.compile_tag_specifiers),
        # which the admin's tag producer follows; None: derived from ``tag_specs``
        self.tag_specifiers = None
        specs = list(tag_specs or [])
        if use_default_tags:
            specs += DEFAULT_TAG_SPECS
        self.extractors = []
        for n, r in specs:
            try:
                self.extractors.append(TagExtractor(n, r))
            except (re.error, ValueError):
                pass  # a regex neither engine compiles only loses that tag
        self._tag_cache: dict[str, tuple[str, tuple]] = {}
        # stats created with explicit tags (Istio's istio_* metrics): flat name -> (name, tags).
        # The flat name is Envoy's (``name.tag1.value1.tag2.value2``); Prometheus shows the tags
        # as labels in their given order, never through the regex extractors.
        self.tagged: dict[str, tuple[str, tuple]] = {}
        # bootstrap stats_config.histogram_bucket_settings: [(match(name) -> bool, buckets)], first wins
        self.bucket_settings: list = []
        self.rejects = None  # name -> bool (stats_config.stats_matcher), None: every stat is created
        if matcher is not None:
            self.set_matcher(matcher)

    def set_matcher(self, matcher) -> None:
        """Apply a ``StatsMatcher`` (or None): as Envoy's store does when its matcher is set, the
        stats made before that it rejects are removed from the store (their holders keep them)."""
        self.rejects = matcher.rejects if matcher is not None else None
        if self.rejects is None:
            return
        rejects = self.rejects
        for d in (self.counters, self.gauges, self.histograms, self.text_readouts):
            for k in [k for k in d if rejects(k)]:
                self._drop(k)
                self.text_readouts.pop(k, None)

    # -- creation (config time) ---------------------------------------------------------------
    def counter(self, name: str) -> Counter:
        c = self.counters.get(name)
        if c is None:
            if self.rejects is not None and self.rejects(name):
                return Counter(DETACHED)
            c = self.counters[name] = Counter(name)
        return c

    def mirror_counter(self, name: str, base: Counter):
        """A counter named ``name`` that shows ``base``'s value (MirrorCounter)."""
        c = self.counters.get(name)
        if c is None:
            if self.rejects is not None and self.rejects(name):
                return Counter(DETACHED)
            c = self.counters[name] = MirrorCounter(name, base)
        return c

    def sum_counter(self, name: str) -> SumCounter:
        """The SumCounter named ``name`` (made on first use)."""
        c = self.counters.get(name)
        if c is None or type(c) is not SumCounter:
            if self.rejects is not None and self.rejects(name):
                return SumCounter(DETACHED)
            old, c = c, SumCounter(name)
            if old is not None:  # (a plain counter by that name: its count is kept)
                c.residual = old.value
            self.counters[name] = c
        return c

    def gauge(self, name: str, accumulate: bool = True) -> Gauge:
        g = self.gauges.get(name)
        if g is None:
            if self.rejects is not None and self.rejects(name):
                return Gauge(DETACHED, accumulate)
            g = self.gauges[name] = Gauge(name, accumulate)
        return g

    def histogram(self, name: str, unit: str = "ms") -> Histogram:
        h = self.histograms.get(name)
        if h is None:
            if self.rejects is not None and self.rejects(name):
                return Histogram(DETACHED, unit, self.buckets_for(name))
            h = self.histograms[name] = Histogram(name, unit, self.buckets_for(name))
        return h

    def holds(self, stat) -> bool:
        """True when ``stat`` is the store's (False: made detached, its name rejected)."""
        if self.rejects is None:
            return True
        if stat.name is DETACHED:
            return False
        d = self.counters if stat.kind == "counter" else self.gauges if stat.kind == "gauge" else self.histograms
        return d.get(stat.name) is stat

    def buckets_for(self, name: str) -> tuple:
        for match, buckets in self.bucket_settings:
            if match(name):
                return buckets
        return DEFAULT_BUCKETS

    def tagged_counter(self, name: str, tags: tuple) -> Counter:
        flat = tagged_name(name, tags)
        c = self.counters.get(flat)
        if c is None:
            if self.rejects is not None and self.rejects(flat):
                return Counter(DETACHED)
            c = self.counters[flat] = Counter(flat)
            self.tagged[flat] = (name, tags)
        return c

    def tagged_gauge(self, name: str, tags: tuple, accumulate: bool = True) -> Gauge:
        flat = tagged_name(name, tags)
        g = self.gauges.get(flat)
        if g is None:
            if self.rejects is not None and self.rejects(flat):
                return Gauge(DETACHED, accumulate)
            g = self.gauges[flat] = Gauge(flat, accumulate)
            self.tagged[flat] = (name, tags)
        return g

    def tagged_histogram(self, name: str, tags: tuple, unit: str = "ms") -> Histogram:
        flat = tagged_name(name, tags)
        h = self.histograms.get(flat)
        if h is None:
            if self.rejects is not None and self.rejects(flat):
                return Histogram(DETACHED, unit, self.buckets_for(flat))
            h = self.histograms[flat] = Histogram(flat, unit, self.buckets_for(flat))
            self.tagged[flat] = (name, tags)
        return h

    def text_readout(self, name: str, value: str) -> None:
        if name in self.text_readouts or self.rejects is None or not self.rejects(name):
            self.text_readouts[name] = value

    def scope(self, prefix: str) -> "Scope":
        return Scope(self, prefix)

    def new_owner(self, shared: bool = False) -> "StatsOwner":
        """An owner of stats (a cluster, a listener): what is made through its scopes is recorded,
        and ``owner.release()`` frees it. ``shared``: other owners may make the same names (the
        listeners that share an HCM stat prefix), so names are reference-counted; an exclusive
        owner (a cluster's ``cluster.<name>.``) only keeps the set of its names."""
        return StatsOwner(self, shared)

    def owned_scope(self, prefix: str, owner: "StatsOwner") -> "Scope":
        return Scope(self, prefix, owner)

    def _drop(self, name: str) -> None:
        self.counters.pop(name, None)
        self.gauges.pop(name, None)
        self.histograms.pop(name, None)
        self._tag_cache.pop(name, None)
        self.tagged.pop(name, None)

    def remove_prefix(self, prefix: str) -> None:
        """Drop every stat under ``prefix`` (a removed cluster or listener)."""
        for d in (self.counters, self.gauges, self.histograms, self.text_readouts, self.tagged):
            for k in [k for k in d if k.startswith(prefix)]:
                del d[k]

    # -- rendering (admin) ----------------------------------------------------------------------
    def tags_of(self, name: str) -> tuple[str, tuple]:
        hit = self._tag_cache.get(name)
        if hit is not None:
            return hit
        tags = []
        rest = name
        for ex in self.extractors:
            r = ex.extract(rest)
            if r is not None:
                value, rest = r
                tags.append((ex.name, value))
        hit = (rest, tuple(tags))
        if len(self._tag_cache) < 100000:
            self._tag_cache[name] = hit
        return hit

    def iter_text(self, usedonly: bool = False, regex: re.Pattern | None = None, kind: str | None = None):
        """Yield ``(name, rendered value)`` sorted by name as Envoy's /stats does."""
        items = []
        if kind in (None, "TextReadouts"):
            for n, v in self.text_readouts.items():
                items.append((n, '"%s"' % v))
        if kind in (None, "Counters"):
            for n, c in self.counters.items():
                if (not usedonly or c.value) :
                    items.append((n, str(c.value)))
        if kind in (None, "Gauges"):
            for n, g in self.gauges.items():
                if not usedonly or g.used:
                    items.append((n, str(g.value)))
        if regex is not None:
            items = [i for i in items if regex.search(i[0])]
        items.sort()
        hist = []
        if kind in (None, "Histograms"):
            for n, h in sorted(self.histograms.items()):
                if usedonly and not h.used:
                    continue
                if regex is not None and not regex.search(n):
                    continue
                hist.append((n, self._render_hist(h)))
        return items + hist

    @staticmethod
    def _render_hist(h: Histogram) -> str:
        if not h.count:
            return "No recorded values"
        qs = " ".join("P%g(%s,%s)" % (q * 100, _fmt(h.quantile(q)), _fmt(h.quantile(q))) for q in QUANTILES)
        return qs

    def to_json(self, usedonly=False, regex=None) -> dict:
        stats = []
        for n, c in sorted(self.counters.items()):
            if (not usedonly or c.value) and (regex is None or regex.search(n)):
                stats.append({"name": n, "value": c.value})
        for n, g in sorted(self.gauges.items()):
            if (not usedonly or g.used) and (regex is None or regex.search(n)):
                stats.append({"name": n, "value": g.value})
        for n, v in sorted(self.text_readouts.items()):
            if regex is None or regex.search(n):
                stats.append({"name": n, "value": v})
        hists = []
        for n, h in sorted(self.histograms.items()):
            if (usedonly and not h.used) or (regex is not None and not regex.search(n)):
                continue
            hists.append({"name": n, "values": [
                {"quantile": q, "value": None if not h.count else h.quantile(q)} for q in QUANTILES]})
        if hists:
            stats.append({"histograms": {"supported_quantiles": [q * 100 for q in QUANTILES],
                                         "computed_quantiles": [
                                             {"name": h["name"], "values": [
                                                 {"interval": v["value"], "cumulative": v["value"]}
                                                 for v in h["values"]]} for h in hists]}})
        return {"stats": stats}

    def prometheus(self, usedonly: bool = False, regex=None) -> str:
        """Prometheus text exposition with Envoy's names (``envoy_`` + tag-extracted name)."""
        out = []
        families: dict[str, list] = {}
        kinds = {}
        for src, kind in ((self.counters, "counter"), (self.gauges, "gauge")):
            for n, s in src.items():
                if usedonly and not s.used:
                    continue
                if regex is not None and not regex.search(n):
                    continue
                base, tags = self.tags_of(n)
                pname = prom_name(base)
                families.setdefault(pname, []).append((tags, s.value))
                kinds[pname] = kind
        for pname in sorted(families):
            out.append("# TYPE %s %s" % (pname, kinds[pname]))
            for tags, v in sorted(families[pname]):
                out.append("%s%s %s" % (pname, _labels(tags), v))
        hfam: dict[str, list] = {}
        for n, h in self.histograms.items():
            if usedonly and not h.used:
                continue
            if regex is not None and not regex.search(n):
                continue
            base, tags = self.tags_of(n)
            hfam.setdefault(prom_name(base), []).append((tags, h))
        for pname in sorted(hfam):
            out.append("# TYPE %s histogram" % pname)
            for tags, h in sorted(hfam[pname], key=lambda x: x[0]):
                cum = 0
                for i, b in enumerate(h.buckets):
                    cum += h.counts[i]
                    out.append("%s_bucket%s %d" % (pname, _labels(tags + (("le", _fmt(b)),)), cum))
                out.append("%s_bucket%s %d" % (pname, _labels(tags + (("le", "+Inf"),)), h.count))
                out.append("%s_sum%s %s" % (pname, _labels(tags), _fmt(h.total)))
                out.append("%s_count%s %d" % (pname, _labels(tags), h.count))
        return "\n".join(out) + "\n"


class StatsOwner:
    """The stats one cluster or listener made (names, reference-counted across owners in the
    store): when it goes, ``release`` drops those no live owner still references, as Envoy frees a
    removed cluster's or listener's scope."""

    __slots__ = ("store", "names", "shared", "folds")

    def __init__(self, store: "Store", shared: bool = False):
        self.store = store
        self.folds = None  # [(SumCounter, part)]: parts this owner's configs added to shared sums
        # clusters: a list, a few hundred bytes each where a set took 2 KB; listeners (few, and
        # their istio_* series are added as traffic names them): a set
        self.names = set() if shared else []
        self.shared = shared

    def add(self, name: str) -> None:
        if name not in self.names:
            if self.shared:
                self.names.add(name)
                refs = self.store.__dict__.setdefault("_stat_refs", {})
                refs[name] = refs.get(name, 0) + 1
            else:
                self.names.append(name)

    def own(self, stat) -> None:
        """Record ``stat`` if the store holds it (a stat the matcher rejected is nobody's to free)."""
        if self.store.rejects is None or self.store.holds(stat):
            self.add(stat.name)

    def fold_at_release(self, total: SumCounter, part: Counter) -> None:
        if self.folds is None:
            self.folds = []
        self.folds.append((total, part))

    def release(self) -> None:
        if self.folds:
            for total, part in self.folds:
                total.fold(part)
            self.folds = None
        refs = self.store.__dict__.get("_stat_refs", {})
        for name in self.names:
            if self.shared:
                n = refs.get(name, 1) - 1
                if n > 0:
                    refs[name] = n
                    continue
                refs.pop(name, None)
            elif name in refs:
                continue  # a shared owner (a listener) made it too
            self.store._drop(name)
        self.names.clear()


class OwnedStats:
    """A store as one owner sees it (``FactoryContext.stats`` while a listener is built): stats
    made through it are recorded for that owner; everything else is the store's."""

    def __init__(self, store: "Store", owner: StatsOwner):
        self._store = store
        self._owner = owner

    def scope(self, prefix: str) -> "Scope":
        return Scope(self._store, prefix, self._owner)

    def counter(self, name: str) -> Counter:
        c = self._store.counter(name)
        self._owner.own(c)
        return c

    def gauge(self, name: str, accumulate: bool = True) -> Gauge:
        g = self._store.gauge(name, accumulate)
        self._owner.own(g)
        return g

    def histogram(self, name: str, unit: str = "ms") -> Histogram:
        h = self._store.histogram(name, unit)
        self._owner.own(h)
        return h

    # tagged series (istio_*): the listener whose filters name them owns them too
    def tagged_counter(self, name: str, tags: tuple) -> Counter:
        c = self._store.tagged_counter(name, tags)
        self._owner.own(c)
        return c

    def tagged_gauge(self, name: str, tags: tuple, accumulate: bool = True) -> Gauge:
        g = self._store.tagged_gauge(name, tags, accumulate)
        self._owner.own(g)
        return g

    def tagged_histogram(self, name: str, tags: tuple, unit: str = "ms") -> Histogram:
        h = self._store.tagged_histogram(name, tags, unit)
        self._owner.own(h)
        return h

    def __getattr__(self, name):
        return getattr(self._store, name)


class Scope:
    """A name prefix over a store: ``scope.counter("x")`` is ``store.counter(prefix + "x")``."""

    __slots__ = ("store", "prefix", "owned")

    def __init__(self, store: Store, prefix: str, owned: StatsOwner | None = None):
        self.store = store
        self.prefix = prefix if not prefix or prefix.endswith(".") else prefix + "."
        self.owned = owned  # the StatsOwner that frees what is made through this scope

    def counter(self, name: str) -> Counter:
        full = self.prefix + name
        c = self.store.counter(full)
        if self.owned is not None:
            self.owned.own(c)  # the store's own string, not a second copy
        return c

    def mirror_counter(self, name: str, base: Counter):
        c = self.store.mirror_counter(self.prefix + name, base)
        if self.owned is not None:
            self.owned.own(c)
        return c

    def sum_counter(self, name: str) -> SumCounter:
        c = self.store.sum_counter(self.prefix + name)
        if self.owned is not None:
            self.owned.own(c)
        return c

    def sum_part(self, name: str) -> Counter:
        """A part of the SumCounter named ``name`` (see SumCounter): the counter to charge; it
        leaves the sum (keeping its count there) when this scope's owner is released."""
        total = self.store.sum_counter(self.prefix + name)
        part = Counter(total.name)
        total.add(part)
        if self.owned is not None:
            self.owned.own(total)
            self.owned.fold_at_release(total, part)
        return part

    def gauge(self, name: str, accumulate: bool = True) -> Gauge:
        g = self.store.gauge(self.prefix + name, accumulate)
        if self.owned is not None:
            self.owned.own(g)
        return g

    def histogram(self, name: str, unit: str = "ms") -> Histogram:
        h = self.store.histogram(self.prefix + name, unit)
        if self.owned is not None:
            self.owned.own(h)
        return h

    def scope(self, prefix: str) -> "Scope":
        return Scope(self.store, self.prefix + prefix, self.owned)


def tagged_name(name: str, tags: tuple) -> str:
    """Envoy's flat name of a tagged stat: the name, then each tag's name and value, dot-joined."""
    return name + "".join("." + k + "." + v for k, v in tags)


_PROM_BAD = re.compile(r"[^a-zA-Z0-9_]")


def prom_name(name: str) -> str:
    return "envoy_" + _PROM_BAD.sub("_", name)


def _labels(tags) -> str:
    if not tags:
        return ""
    return "{" + ",".join('%s="%s"' % (k, str(v).replace("\\", "\\\\").replace('"', '\\"')) for k, v in tags) + "}"


def _fmt(v: float) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return "%g" % v
