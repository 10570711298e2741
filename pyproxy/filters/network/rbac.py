"""``envoy.filters.network.rbac``: RBAC on TCP connections (Istio's inbound TCP AuthorizationPolicy).

Evaluated once on the first bytes (``ONE_TIME_ON_FIRST_BYTE``, the default) or on every read
(``CONTINUOUS``). A denied connection is closed (after ``delay_deny`` when set). HTTP-only rules
(``header``, ``url_path``) never match on a connection, as in Envoy. Stats: ``<stat_prefix>rbac.allowed|
denied`` and ``<stat_prefix>rbac.[<shadow_rules_stat_prefix>.]shadow_allowed|shadow_denied``.
"""

from __future__ import annotations

import logging

from envoy.extensions.filters.network.rbac.v3 import rbac_pb2

from ...config import ConfigError, duration_s
from ..rbac_engine import Subject, compile_rbac, parse_ip, peer_principal

log = logging.getLogger("pyproxy.filter")

from ...http.filter import CONTINUE, STOP
from . import NetworkFilter
CONTINUOUS = rbac_pb2.RBAC.EnforcementType.CONTINUOUS


class RbacNetworkFactory:
    def __init__(self, cfg, ctx):
        if cfg.HasField("matcher") or cfg.HasField("shadow_matcher"):
            raise ConfigError("RBAC 'matcher'/'shadow_matcher' (the matcher API) is not supported; use rules",
                              field="RBAC.matcher")
        if not cfg.stat_prefix:
            raise ConfigError("stat_prefix must not be empty", field="RBAC.stat_prefix")
        self.engine = compile_rbac(cfg.rules, "RBAC.rules", http=False) if cfg.HasField("rules") else None
        self.shadow = compile_rbac(cfg.shadow_rules, "RBAC.shadow_rules", http=False) \
            if cfg.HasField("shadow_rules") else None
        self.continuous = cfg.enforcement_type == CONTINUOUS
        self.delay_deny = duration_s(cfg, "delay_deny", 0.0)
        self.loop = ctx.loop
        s = ctx.stats
        base = cfg.stat_prefix + "rbac."
        sp = base + cfg.shadow_rules_stat_prefix + "." if cfg.shadow_rules_stat_prefix else base
        self.st_allowed = s.counter(base + "allowed")
        self.st_denied = s.counter(base + "denied")
        self.st_shadow_allowed = s.counter(sp + "shadow_allowed")
        self.st_shadow_denied = s.counter(sp + "shadow_denied")
        self.shadow_prefix = cfg.shadow_rules_stat_prefix

    def create(self, conn):
        return RbacNetworkFilter(conn, self)


def conn_subject(conn) -> Subject:
    info = conn.info
    direct = parse_ip(info.direct_src_ip)
    return Subject(dst_ip=parse_ip(info.dst_ip), dst_port=info.dst_port, direct_remote_ip=direct,
                   remote_ip=parse_ip(info.src_ip) or direct, sni=info.server_name,
                   dynamic_metadata=conn.stream_info.dynamic_metadata, filter_state=conn.filter_state,
                   peer_principal=peer_principal(conn))


class RbacNetworkFilter(NetworkFilter):
    __slots__ = ("decided", "denied")

    def __init__(self, conn, f):
        self.conn = conn
        self.f = f
        self.decided = False
        self.denied = False

    def on_data(self, data, end_stream):
        if self.denied:
            return STOP
        if self.decided and not self.f.continuous:
            return CONTINUE
        self.decided = True
        f = self.f
        subj = conn_subject(self.conn)
        if f.shadow is not None:
            ok, pol = f.shadow.evaluate(subj)
            (f.st_shadow_allowed if ok else f.st_shadow_denied).inc()
            md = self.conn.stream_info.dynamic_metadata.setdefault("envoy.filters.network.rbac", {})
            if pol:
                md[f.shadow_prefix + "shadow_effective_policy_id"] = pol
            md[f.shadow_prefix + "shadow_engine_result"] = "allowed" if ok else "denied"
        if f.engine is None:
            return CONTINUE
        ok, pol = f.engine.evaluate(subj)
        if ok:
            f.st_allowed.inc()
            return CONTINUE
        f.st_denied.inc()
        self.denied = True
        si = self.conn.stream_info
        si.connection_termination_details = "rbac_access_denied_matched_policy[%s]" % (pol or "none")
        if f.delay_deny:
            self.conn.read_disable(True)
            f.loop.call_later(f.delay_deny, self.conn.close, False)
        else:
            self.conn.close(flush=False)
        return STOP


def factory(cfg, ctx, terminal=False):
    if terminal:
        raise ConfigError("the RBAC network filter must not be the last filter")
    return RbacNetworkFactory(cfg, ctx)
