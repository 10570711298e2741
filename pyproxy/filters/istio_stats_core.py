"""``istio.stats`` (``stats.PluginConfig``): Istio's standard ``istio_*`` metrics with their peer
labels, shared by the HTTP filter (``filters/http/istio_stats.py``) and the network filter
(``filters/network/istio_stats.py``). Behaviour follows istio/proxy's ``istio_stats.cc``:

- the reporter is ``waypoint`` for ``reporter: SERVER_GATEWAY``, else ``destination`` on an
  INBOUND listener and ``source`` otherwise;
- labels in Istio's fixed emission order (20 peer/local labels, then ``request_protocol,
  response_code, grpc_response_status, response_flags, connection_security_policy`` for HTTP and
  ``request_protocol, response_flags, connection_security_policy`` for TCP), ``unknown`` for a
  missing peer value and ``latest`` for a missing canonical revision, local values raw;
- the stats live in the custom namespace ``istiocustom`` (Prometheus: ``istio_requests_total``,
  no ``envoy_`` prefix), histograms with Envoy's default buckets.

Cost: a request's labels are resolved once per distinct (peer, principals, route, cluster, host,
protocol, code, gRPC status, flags) and the resulting series are cached (bounded); a hit costs one
tuple and one dict lookup. Label values are bounded in length, and the number of series this
process creates is bounded; both are counted and logged once when they bite.

Metric overrides (Telemetry API): ``drop``, ``tags_to_remove`` and ``dimensions`` whose expression
is a string literal or one of a small set of attributes (``request.host``, ``request.method``,
``request.path``, ``request.url_path``, ``request.protocol``, ``request.headers['x']``,
``response.code``, ``response.headers['x']``, ``connection.mtls``); any other CEL expression, and
``definitions`` (custom metrics), are rejected with a message.
"""

from __future__ import annotations

import logging

from ..config import ConfigError, duration_s
from ..stats import tagged_name
from . import istio_peer as P

log = logging.getLogger("pyproxy.filter")

NAMESPACE = "istiocustom"
PEER_LABELS = (
    "reporter", "source_workload", "source_canonical_service", "source_canonical_revision",
    "source_workload_namespace", "source_principal", "source_app", "source_version", "source_cluster",
    "destination_workload", "destination_workload_namespace", "destination_principal",
    "destination_app", "destination_version", "destination_service", "destination_canonical_service",
    "destination_canonical_revision", "destination_service_name", "destination_service_namespace",
    "destination_cluster",
)
HTTP_LABELS = PEER_LABELS + ("request_protocol", "response_code", "grpc_response_status", "response_flags",
                             "connection_security_policy")
TCP_LABELS = PEER_LABELS + ("request_protocol", "response_flags", "connection_security_policy")

HTTP_METRICS = ("requests_total", "request_duration_milliseconds", "request_bytes", "response_bytes")
TCP_METRICS = ("tcp_connections_opened_total", "tcp_connections_closed_total", "tcp_sent_bytes_total",
               "tcp_received_bytes_total")
ALL_METRICS = HTTP_METRICS + ("request_messages_total", "response_messages_total") + TCP_METRICS

PASSTHROUGH = frozenset(("BlackHoleCluster", "PassthroughCluster", "InboundPassthroughCluster",
                         "InboundPassthroughClusterIpv4", "InboundPassthroughClusterIpv6"))

MAX_LABEL_CHARS = 512        # a longer label value (e.g. from a peer's headers) is cut
MAX_SERIES = 50_000          # istio_* series this process creates at most
MAX_CACHED = 8192            # cached label resolutions per filter config


class _Limits:
    """Process-wide bounds (series created; truncation and overflow counted, logged once)."""

    series = 0
    logged_overflow = False
    logged_truncate = False


def _bound(v: str, truncated) -> str:
    if len(v) <= MAX_LABEL_CHARS:
        return v
    truncated.value += 1
    if not _Limits.logged_truncate:
        _Limits.logged_truncate = True
        log.warning("istio.stats: a label value of %d characters was cut to %d (counted in %s; "
                    "logged once)", len(v), MAX_LABEL_CHARS, truncated.name)
    return v[:MAX_LABEL_CHARS]


def namespace_of(principal: str) -> str:
    """The ``/ns/<ns>/`` segment of a SPIFFE principal, or ""."""
    i = principal.find("/ns/")
    if i < 0:
        return ""
    i += 4
    j = principal.find("/", i)
    return principal[i:] if j < 0 else principal[i:j]


# -- dimension expressions (the Telemetry API subset) ------------------------------------------------

class _Expr:
    """A compiled dimension expression: ``fn(ctx) -> str``; ``dynamic`` if it reads the request."""

    __slots__ = ("src", "fn", "dynamic")

    def __init__(self, src, fn, dynamic):
        self.src = src
        self.fn = fn
        self.dynamic = dynamic


def _header_expr(src, which, name):
    name = name.lower()

    def fn(rq, rs, si):
        h = rq if which == "request" else rs
        v = h.get(name) if h is not None else None
        return v if v is not None else "unknown"
    return _Expr(src, fn, True)


def compile_expr(src: str) -> _Expr:
    s = src.strip()
    if len(s) >= 2 and s[0] == s[-1] and s[0] in "'\"" and s[0] not in s[1:-1]:
        lit = s[1:-1]
        return _Expr(src, lambda rq, rs, si: lit, False)
    for which in ("request", "response"):
        pre = which + ".headers["
        if s.startswith(pre) and s.endswith("]"):
            inner = s[len(pre):-1].strip()
            if len(inner) >= 2 and inner[0] == inner[-1] and inner[0] in "'\"":
                return _header_expr(src, which, inner[1:-1])
    simple = {
        "request.host": lambda rq, rs, si: (rq.get(":authority") if rq is not None else None) or "unknown",
        "request.method": lambda rq, rs, si: (rq.get(":method") if rq is not None else None) or "unknown",
        "request.path": lambda rq, rs, si: (rq.get(":path") if rq is not None else None) or "unknown",
        "request.url_path": lambda rq, rs, si: ((rq.get(":path") or "").partition("?")[0]
                                                if rq is not None else "") or "unknown",
        "request.protocol": lambda rq, rs, si: si.protocol or "unknown",
        "response.code": lambda rq, rs, si: str(si.response_code or 0),
        "connection.mtls": lambda rq, rs, si: "true" if getattr(si, "downstream_peer_uri_san", "") else "false",
    }
    fn = simple.get(s)
    if fn is None:
        raise ConfigError("metric dimension expression %r is not supported (pyproxy evaluates string "
                          "literals, request.host/method/path/url_path/protocol, request.headers['x'], "
                          "response.code, response.headers['x'] and connection.mtls, not general CEL)" % src)
    return _Expr(src, fn, True)


class _MetricRule:
    """How one metric's standard tags change: removed tags, overridden/added dimensions, drop."""

    __slots__ = ("drop", "remove", "dims")

    def __init__(self):
        self.drop = False
        self.remove: set = set()
        self.dims: dict = {}  # tag -> _Expr (overrides the standard value or adds a tag at the end)


def compile_overrides(cfg) -> dict:
    """``{metric short name: _MetricRule}`` from ``PluginConfig.metrics`` (later entries win)."""
    if cfg is None:
        return {}
    if len(cfg.definitions):
        raise ConfigError("custom metric definitions are not supported (only the standard metrics "
                          "with tag overrides)", field="definitions")
    rules: dict = {}
    for i, m in enumerate(cfg.metrics):
        if m.match:
            raise ConfigError("metric 'match' conditions are not supported", field="metrics[%d].match" % i)
        if m.name and m.name not in ALL_METRICS:
            raise ConfigError("unknown metric %r" % m.name, field="metrics[%d].name" % i)
        targets = [m.name] if m.name else list(ALL_METRICS)
        dims = {}
        for tag, src in sorted(m.dimensions.items()):
            try:
                dims[tag] = compile_expr(src)
            except ConfigError as e:
                raise e.within(field="metrics[%d].dimensions[%s]" % (i, tag))
        for t in targets:
            r = rules.setdefault(t, _MetricRule())
            if m.drop:
                r.drop = True
            for tag in m.tags_to_remove:
                r.remove.add(tag)
                r.dims.pop(tag, None)
            for tag, e in dims.items():
                r.dims[tag] = e
                r.remove.discard(tag)
    return rules


class MetricShape:
    """One metric's final tag list, computed at config time from the standard labels and rules."""

    __slots__ = ("name", "keep", "replace", "extra", "drop", "dynamic")

    def __init__(self, short: str, labels: tuple, rule):
        self.name = NAMESPACE + ".istio_" + short
        self.drop = rule is not None and rule.drop
        if rule is None:
            self.keep = tuple(range(len(labels)))
            self.replace = {}
            self.extra = ()
            self.dynamic = ()
            return
        self.keep = tuple(i for i, l in enumerate(labels) if l not in rule.remove)
        self.replace = {i: rule.dims[l] for i, l in enumerate(labels) if l in rule.dims}
        self.extra = tuple((t, e) for t, e in rule.dims.items() if t not in labels)
        self.dynamic = tuple(e for e in rule.dims.values() if e.dynamic)

    def tags(self, labels: tuple, values: list, rq, rs, si) -> tuple:
        rep = self.replace
        out = []
        for i in self.keep:
            e = rep.get(i)
            out.append((labels[i], values[i] if e is None else e.fn(rq, rs, si)))
        for t, e in self.extra:
            out.append((t, e.fn(rq, rs, si)))
        return tuple(out)


class StatsConfig:
    """Config-time state of one ``istio.stats`` filter (HTTP or network)."""

    def __init__(self, cfg, ctx, kind: str):
        server = getattr(ctx, "server", None)
        node = getattr(server, "node", None)
        self.kind = kind
        self.store = ctx.stats
        self.cm = getattr(ctx, "cluster_manager", None)
        self.local = P.LocalNode(node)
        listener = getattr(ctx, "listener", None)
        if cfg is not None and cfg.reporter == 1:
            self.reporter = "waypoint"
        elif listener is not None and getattr(listener, "inbound", False):
            self.reporter = "destination"
        else:
            self.reporter = "source"
        self.server_side = self.reporter != "source"
        self.disable_host_fallback = bool(cfg.disable_host_header_fallback) if cfg is not None else False
        self.tcp_interval = (duration_s(cfg, "tcp_reporting_duration", 5.0) if cfg is not None else 5.0) or 0.0
        rules = compile_overrides(cfg)
        self.labels = HTTP_LABELS if kind == "http" else TCP_LABELS
        metrics = HTTP_METRICS if kind == "http" else TCP_METRICS
        self.shapes = tuple(MetricShape(m, self.labels, rules.get(m)) for m in metrics)
        # gRPC streams also count messages (from the grpc_stats filter's filter state)
        self.msg_shapes = tuple(MetricShape(m, self.labels, rules.get(m))
                                for m in ("request_messages_total", "response_messages_total")) \
            if kind == "http" else ()
        self.dynamic = tuple(e for s in self.shapes for e in s.dynamic)
        st = self.store
        self.truncated = st.counter("istio_stats.label_truncated")
        self.overflow = st.counter("istio_stats.series_overflow")
        self.cache: dict = {}
        # istio_build{component="proxy",tag=<ISTIO_VERSION or unknown>} 1
        st.tagged_gauge(NAMESPACE + ".istio_build",
                        (("component", "proxy"), ("tag", self.local.istio_version or "unknown"))).set(1)

    # -- series --------------------------------------------------------------------------------------
    def series(self, values: list, rq, rs, si, shapes=None) -> tuple:
        """The metric objects for one label resolution (None for dropped metrics / overflow)."""
        st = self.store
        out = []
        counters_only = shapes is not None
        for i, shape in enumerate(self.shapes if shapes is None else shapes):
            if shape.drop:
                out.append(None)
                continue
            tags = shape.tags(self.labels, values, rq, rs, si)
            flat_exists = None
            if _Limits.series >= MAX_SERIES:
                # series of removed listeners are freed: count again what is really there
                _Limits.series = len(st.tagged)
            if _Limits.series >= MAX_SERIES:
                name = tagged_name(shape.name, tags)
                flat_exists = st.counters.get(name) or st.histograms.get(name)
                if flat_exists is None:
                    self.overflow.value += 1
                    if not _Limits.logged_overflow:
                        _Limits.logged_overflow = True
                        log.warning("istio.stats: more than %d istio_* series; new label sets are not "
                                    "recorded (counted in %s; logged once)", MAX_SERIES, self.overflow.name)
                    out.append(None)
                    continue
            if flat_exists is not None:
                out.append(flat_exists)
                continue
            before = len(st.tagged)
            if self.kind == "http" and not counters_only:
                m = st.tagged_counter(shape.name, tags) if i == 0 else \
                    st.tagged_histogram(shape.name, tags, "ms" if i == 1 else "B")
            else:
                m = st.tagged_counter(shape.name, tags)
            if len(st.tagged) > before:
                _Limits.series += 1
            out.append(m)
        return tuple(out)

    def cached(self, key, build):
        c = self.cache
        hit = c.get(key)
        if hit is None:
            if len(c) >= MAX_CACHED:
                c.clear()
            hit = c[key] = build()
        return hit

    # -- labels ----------------------------------------------------------------------------------------
    def service_of(self, si, host_header: str):
        """(service host, service name, service namespace) as istio_stats.cc resolves them."""
        host = name = ns = ""
        if not self.disable_host_fallback and host_header:
            host = name = host_header
        route = si.route_name
        if route == "block_all":
            return host, "BlackHoleCluster", ns
        if route == "allow_any":
            return host, "PassthroughCluster", ns
        cname = si.upstream_cluster
        if not cname:
            return host, name, ns
        if cname in PASSTHROUGH:
            return host, cname, ns
        c = self.cm.get(cname) if self.cm is not None else None
        if c is None:
            return host, name, ns
        md = c.proto.metadata.filter_metadata
        if "istio" in md and "services" in md["istio"].fields:
            lv = md["istio"].fields["services"].list_value.values
            if len(lv):
                svc = lv[0].struct_value.fields
                if "host" in svc:
                    host = svc["host"].string_value
                if "namespace" in svc:
                    ns = svc["namespace"].string_value
                if "name" in svc:
                    name = svc["name"].string_value
                else:
                    name = host.partition(".")[0]
        return host, name, ns

    def endpoint_peer(self, si):
        """Client fallback: the upstream host's ``istio.workload`` endpoint metadata."""
        cname, hkey = si.upstream_cluster, si.upstream_host
        if not cname or not hkey or self.cm is None:
            return None
        c = self.cm.get(cname)
        ps = getattr(c, "priority_set", None) if c is not None else None
        if ps is None:
            return None
        for h in ps.all_hosts:
            if h.key == hkey:
                md = h.metadata.get("istio") or {}
                wl = md.get("workload") if isinstance(md, dict) else None
                return P.from_endpoint_encoding(wl) if isinstance(wl, str) else None
        return None

    def peer_labels(self, peer, peer_san: str, local_san: str, host_header: str, si) -> list:
        """The 20 peer/local labels in emission order."""
        U = "unknown"
        loc = self.local
        host, name, svc_ns = self.service_of(si, host_header)
        peer_ns = namespace_of(peer_san) if peer_san else ""
        if not peer_ns and peer is not None:
            peer_ns = peer.namespace_name

        def pv(attr, default=U):
            v = getattr(peer, attr) if peer is not None else ""
            return v if v else default
        if self.reporter == "waypoint":
            ep = fs_upstream_peer(si)

            def ev(attr):
                v = getattr(ep, attr) if ep is not None else ""
                return v if v else U
            vals = [
                self.reporter, pv("workload_name"), pv("canonical_name"), pv("canonical_revision", "latest"),
                peer_ns or U, peer_san or U, pv("app_name"), pv("app_version"), pv("cluster_name"),
                ev("workload_name"), ev("namespace_name"), ev("identity"), ev("app_name"), ev("app_version"),
                host or U, ev("canonical_name"), ev("canonical_revision"), name or U, svc_ns or U,
                ev("cluster_name"),
            ]
        elif self.server_side:
            vals = [
                self.reporter, pv("workload_name"), pv("canonical_name"), pv("canonical_revision", "latest"),
                peer_ns or U, peer_san or U, pv("app_name"), pv("app_version"), pv("cluster_name"),
                loc.workload, loc.namespace, local_san or U, loc.app, loc.version,
                host or loc.canonical_name, loc.canonical_name, loc.canonical_revision,
                name or loc.canonical_name, loc.namespace, loc.cluster_id,
            ]
        else:
            vals = [
                self.reporter, loc.workload, loc.canonical_name, loc.canonical_revision, loc.namespace,
                local_san or U, loc.app, loc.version, loc.cluster_id,
                pv("workload_name"), peer_ns or U, peer_san or U, pv("app_name"), pv("app_version"),
                host or U, pv("canonical_name"), pv("canonical_revision", "latest"), name or U,
                svc_ns or peer_ns or U, pv("cluster_name"),
            ]
        tr = self.truncated
        return [v if len(v) <= MAX_LABEL_CHARS else _bound(v, tr) for v in vals]

    def principals(self, conn, si, fs) -> tuple:
        """(peer_san, local_san, mutual_tls) for this reporter."""
        if self.server_side:
            pp = fs.get("io.istio.peer_principal") if fs else None
            lp = fs.get("io.istio.local_principal") if fs else None
            peer_san = pp if isinstance(pp, str) else ""
            local_san = lp if isinstance(lp, str) else ""
            if not peer_san and not local_san:
                tls = getattr(conn, "ssl", None) if conn is not None else None
                peer_san = (getattr(tls, "peer_uri_san", "") or getattr(si, "downstream_peer_uri_san", "")
                            if tls is not None else getattr(si, "downstream_peer_uri_san", "")) or ""
                local_san = getattr(si, "downstream_local_uri_san", "") or \
                    (getattr(tls, "local_uri_san", "") if tls is not None else "") or ""
            return peer_san, local_san, bool(peer_san and local_san)
        return getattr(si, "upstream_peer_uri_san", "") or "", getattr(si, "upstream_local_uri_san", "") or "", None


def fs_upstream_peer(si):
    fs = si.filter_state
    return fs.get(P.UPSTREAM_PEER_OBJ) if fs else None


def peer_from(fs, server_side: bool):
    if not fs:
        return None
    return fs.get(P.DOWNSTREAM_PEER_OBJ if server_side else P.UPSTREAM_PEER_OBJ)
