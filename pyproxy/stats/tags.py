"""Envoy's tag extraction: a stat name into its tag-extracted name and its tags (Prometheus
labels), with Envoy's default extractors (``well_known_names.cc``), the bootstrap's ``stats_tags``
(a regex, a ``fixed_value``, or a default's name without regex) in Envoy's order (the defaults
first, then each specifier; of extractors sharing a name only the first that matches counts), every
regex seeing the full name and the removed parts cut at the end, tokenized defaults like
``cluster.$.**``. The admin's renderers (``admin/stats_render.py``) use it.
"""

from __future__ import annotations

import re

from pyproxy import stats as _stats

# RE2 syntax as Envoy takes it -> Python re
_POSIX = {"[:digit:]": r"\d", "[:alpha:]": "a-zA-Z", "[:alnum:]": r"a-zA-Z\d", "[:space:]": r"\s",
          "[:upper:]": "A-Z", "[:lower:]": "a-z", "[:xdigit:]": "0-9a-fA-F", "[:word:]": r"\w",
          "[:punct:]": r"!-/:-@\[-`{-~"}


def re2_to_python(regex: str) -> str:
    for k, v in _POSIX.items():
        regex = regex.replace(k, v)
    return regex.replace(r"\z", r"\Z")


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
