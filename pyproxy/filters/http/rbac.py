"""``envoy.filters.http.rbac``: Envoy's role-based access control on HTTP requests.

``rules`` are enforced (403 ``RBAC: access denied`` when denied); ``shadow_rules`` are evaluated for
stats and dynamic metadata only. The engine (permissions, principals, ALLOW/DENY/LOG) is
``pyproxy.filters.rbac_engine``. A route's ``typed_per_filter_config["envoy.filters.http.rbac"]``
(``RBACPerRoute``) replaces the filter's config; an empty one disables the filter for that route.

Stats under ``http.<prefix>.rbac.``: ``[<rules_stat_prefix>.]allowed|denied`` and
``[<shadow_rules_stat_prefix>.]shadow_allowed|shadow_denied`` (the prefix is its own name element, as
Envoy 1.40 emits it; Prometheus renders both ``.`` and ``_`` as ``_``). Dynamic metadata under
``envoy.filters.http.rbac``: ``<shadow prefix>shadow_effective_policy_id`` and
``<shadow prefix>shadow_engine_result`` (what Istio's ext_authz ``filter_enabled_metadata`` reads),
and the same for the enforced rules with the ``enforced_`` names.
"""

from __future__ import annotations

import logging

from envoy.extensions.filters.http.rbac.v3 import rbac_pb2  # noqa: F401 (registers the types)

from ...config import ConfigError
from ...http.filter import CONTINUE, STOP, HttpFilter
from ...routing.matchers import path_only
from ..rbac_engine import Subject, compile_rbac, parse_ip, peer_principal
from .util import HcmStats, PerRoute

log = logging.getLogger("pyproxy.filter")
META_NS = "envoy.filters.http.rbac"


class RbacConfig:
    __slots__ = ("engine", "shadow", "prefix", "shadow_prefix", "notes")

    def __init__(self, cfg, field: str = "RBAC"):
        self.notes = []
        if cfg.HasField("matcher") or cfg.HasField("shadow_matcher"):
            raise ConfigError("RBAC 'matcher'/'shadow_matcher' (the matcher API) is not supported; use rules",
                              field=field + ".matcher")
        self.engine = compile_rbac(cfg.rules, field + ".rules", http=True) if cfg.HasField("rules") else None
        self.shadow = compile_rbac(cfg.shadow_rules, field + ".shadow_rules", http=True) \
            if cfg.HasField("shadow_rules") else None
        self.prefix = cfg.rules_stat_prefix
        self.shadow_prefix = cfg.shadow_rules_stat_prefix
        if cfg.track_per_rule_stats:
            self.notes.append("track_per_rule_stats not emitted")


def _compile_per_route(msg):
    if msg.DESCRIPTOR.full_name != "envoy.extensions.filters.http.rbac.v3.RBACPerRoute":
        raise ConfigError("per-route RBAC config must be RBACPerRoute, got %s" % msg.DESCRIPTOR.full_name)
    if not msg.HasField("rbac"):
        return _DISABLED
    return RbacConfig(msg.rbac, "typed_per_filter_config.rbac")


_DISABLED = object()


class RbacFactory:
    def __init__(self, cfg, ctx):
        self.config = RbacConfig(cfg)
        self.notes = self.config.notes
        self.per_route = PerRoute(("envoy.filters.http.rbac",), _compile_per_route)
        self.store = ctx.stats
        self._stats = {}

    def stats(self, stream, c: RbacConfig):
        prefix = getattr(getattr(stream, "cfg", None), "stat_prefix", "") or "unknown"
        key = (prefix, c.prefix, c.shadow_prefix)
        d = self._stats.get(key)
        if d is None:
            base = "http.%s.rbac." % prefix
            s = self.store
            # Envoy 1.40 joins a stat prefix as its own element: rbac.<prefix>.shadow_allowed
            p = base + c.prefix + "." if c.prefix else base
            sp = base + c.shadow_prefix + "." if c.shadow_prefix else base
            d = self._stats[key] = (s.counter(p + "allowed"), s.counter(p + "denied"),
                                    s.counter(sp + "shadow_allowed"), s.counter(sp + "shadow_denied"))
        return d

    def create(self, stream):
        return RbacFilter(stream, self)


def http_subject(stream, headers) -> Subject:
    conn = stream.connection
    info = conn.info
    si = stream.stream_info
    path = headers.get(":path")
    if path is not None:
        path = path_only(path)
    fs = conn.filter_state
    if si.filter_state:
        fs = dict(fs, **si.filter_state) if fs else si.filter_state
    direct = parse_ip(info.direct_src_ip)
    remote = parse_ip(si.downstream_remote_address) or direct
    return Subject(headers=headers, path=path, dst_ip=parse_ip(info.dst_ip), dst_port=info.dst_port,
                   direct_remote_ip=direct, remote_ip=remote, sni=info.server_name,
                   dynamic_metadata=si.dynamic_metadata, filter_state=fs, peer_principal=peer_principal(conn),
                   source_ip=parse_ip(info.src_ip))


class RbacFilter(HttpFilter):
    __slots__ = ("f",)

    def __init__(self, callbacks, f):
        self.callbacks = callbacks
        self.f = f

    def decode_headers(self, headers, end_stream):
        cb = self.callbacks
        f = self.f
        c = f.per_route.lookup(cb) or f.config
        if c is _DISABLED or (c.engine is None and c.shadow is None):
            return CONTINUE
        subj = http_subject(cb, headers)
        st = f.stats(cb, c)
        md = None
        if c.shadow is not None:
            ok, pol = c.shadow.evaluate(subj)
            (st[2] if ok else st[3]).inc()
            md = cb.stream_info.dynamic_metadata.setdefault(META_NS, {})
            if pol:
                md[c.shadow_prefix + "shadow_effective_policy_id"] = pol
            md[c.shadow_prefix + "shadow_engine_result"] = "allowed" if ok else "denied"
        if c.engine is None:
            return CONTINUE
        ok, pol = c.engine.evaluate(subj)
        if md is None:
            md = cb.stream_info.dynamic_metadata.setdefault(META_NS, {})
        if pol:
            md[c.prefix + "enforced_effective_policy_id"] = pol
        md[c.prefix + "enforced_engine_result"] = "allowed" if ok else "denied"
        if ok:
            st[0].inc()
            return CONTINUE
        st[1].inc()
        cb.send_local_reply(403, "RBAC: access denied",
                            "rbac_access_denied_matched_policy[%s]" % (pol or "none"))
        return STOP


def factory(cfg, ctx):
    return RbacFactory(cfg, ctx)
