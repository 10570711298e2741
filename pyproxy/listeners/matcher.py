"""``Listener.filter_chain_matcher``: the unified matcher API (``xds.type.matcher.v3.Matcher``) selecting
a filter chain by name — what Istio's waypoints and ambient listeners use.

Compiled once into nested closures ``m(info) -> result | None``, where ``info`` is a ``ConnInfo`` and a
result is a ``FilterChain``. Supported: ``matcher_tree`` (``exact_match_map``, ``prefix_match_map`` —
longest prefix first —, and ``custom_match`` with ``xds.type.matcher.v3.IPMatcher``), ``matcher_list``
(first matching predicate; ``single_predicate`` with exact/prefix/suffix/contains/regex string
matchers or an IPMatcher, ``and``/``or``/``not``), ``on_no_match`` at every level, ``keep_matching``
(the match is skipped, as Envoy treats it for selection). Inputs: destination/source IP and port,
direct source IP, source type, server name, transport protocol, application protocol (Envoy renders
the ALPN list as ``'h2','http/1.1'``). Actions name a chain with ``google.protobuf.StringValue``.
A matcher that finds nothing returns None and the listener's ``default_filter_chain`` applies.
An action naming a chain the listener does not have is accepted, as Envoy accepts it (Istio renders
such listeners): a connection it selects gets no chain at all (``NO_CHAIN``: closed and counted as
``no_filter_chain_match``, the default chain does not apply); a warning says so once at load.
"""

from __future__ import annotations

import ipaddress

import logging

from ..config import ConfigError
from ..netaddr import cidr_range
from ..config.registry import type_name_of, unpack_any

log = logging.getLogger("pyproxy.config")


class _NoChain:
    """What a matcher returns when its action names a filter chain the listener does not have."""

    __slots__ = ()

    def __repr__(self):
        return "NO_CHAIN"


NO_CHAIN = _NoChain()

_NI = "envoy.extensions.matching.common_inputs.network.v3."


def _src_type(info):
    from .chain_match import _ip
    ip = _ip(info.src_ip)
    local = ip is not None and (ip.is_loopback or info.src_ip == info.dst_ip)
    return "local" if local else None


# input type -> function(ConnInfo) -> str | None   (None = no data: the input does not match)
INPUTS = {
    _NI + "DestinationIPInput": lambda i: i.dst_ip or None,
    _NI + "DestinationPortInput": lambda i: str(i.dst_port) if i.dst_port else None,
    _NI + "SourceIPInput": lambda i: i.src_ip or None,
    _NI + "SourcePortInput": lambda i: str(i.src_port) if i.src_port else None,
    _NI + "DirectSourceIPInput": lambda i: i.direct_src_ip or None,
    _NI + "ServerNameInput": lambda i: i.server_name or None,
    _NI + "TransportProtocolInput": lambda i: i.transport_protocol or None,
    _NI + "ApplicationProtocolInput":
        lambda i: ",".join("'%s'" % p for p in i.application_protocols) if i.application_protocols else None,
    _NI + "SourceTypeInput": _src_type,
}


def compile_chain_matcher(matcher_proto, chains_by_name: dict, listener: str = ""):
    """``callable(ConnInfo) -> FilterChain | NO_CHAIN | None`` for a listener's
    ``filter_chain_matcher`` (None: no match, the default chain applies)."""
    try:
        comp = _Compiler(chains_by_name)
        m = comp.matcher(matcher_proto, "filter_chain_matcher")
        for name, field in comp.missing:
            log.warning("listener '%s': %s: matcher action names filter chain '%s', which does not exist; "
                        "connections it selects are closed (as Envoy does)", listener, field, name)
        return m
    except ConfigError as e:
        if not e.field.startswith("filter_chain_matcher"):
            e.within(field="filter_chain_matcher")
        raise


class _Compiler:
    def __init__(self, chains):
        self.chains = chains
        self.missing = []   # (chain name, field) of actions naming no chain of the listener

    # -- Matcher ------------------------------------------------------------------------------
    def matcher(self, m, field):
        which = m.WhichOneof("matcher_type")
        if which == "matcher_tree":
            body = self.tree(m.matcher_tree, field + ".matcher_tree")
        elif which == "matcher_list":
            body = self.mlist(m.matcher_list, field + ".matcher_list")
        else:
            body = None
        no_match = self.on_match(m.on_no_match, field + ".on_no_match") if m.HasField("on_no_match") else None
        if body is None:
            return no_match or (lambda info: None)
        if no_match is None:
            return body

        def f(info):
            r = body(info)
            return r if r is not None else no_match(info)
        return f

    def on_match(self, om, field):
        if om.keep_matching:
            # the action is recorded but matching continues: for chain selection nothing is chosen here
            return None
        which = om.WhichOneof("on_match")
        if which == "matcher":
            return self.matcher(om.matcher, field + ".matcher")
        if which == "action":
            chain = self.action(om.action, field + ".action")
            return lambda info: chain
        raise ConfigError("on_match needs a matcher or an action", field=field)

    def action(self, a, field):
        if not a.HasField("typed_config"):
            raise ConfigError("action needs typed_config", field=field)
        t = type_name_of(a.typed_config)
        if t != "google.protobuf.StringValue":
            raise ConfigError("unsupported action type '%s' (a filter chain name as StringValue is expected)" % t,
                              field=field)
        name = unpack_any(a.typed_config).value
        chain = self.chains.get(name)
        if chain is None:
            self.missing.append((name, field))
            return NO_CHAIN
        return chain

    def input(self, inp, field):
        if not inp.HasField("typed_config"):
            raise ConfigError("input needs typed_config", field=field)
        t = type_name_of(inp.typed_config)
        fn = INPUTS.get(t)
        if fn is None:
            raise ConfigError("unsupported matcher input '%s'" % t, field=field)
        return fn

    # -- MatcherTree ----------------------------------------------------------------------------
    def tree(self, t, field):
        get = self.input(t.input, field + ".input")
        which = t.WhichOneof("tree_type")
        if which == "exact_match_map":
            table = {k: self.on_match(v, "%s.exact_match_map[%s]" % (field, k)) for k, v in t.exact_match_map.map.items()}
            table = {k: v for k, v in table.items() if v is not None}

            def f(info):
                v = get(info)
                if v is None:
                    return None
                m = table.get(v)
                return m(info) if m is not None else None
            return f
        if which == "prefix_match_map":
            items = sorted(((k, self.on_match(v, "%s.prefix_match_map[%s]" % (field, k)))
                            for k, v in t.prefix_match_map.map.items()), key=lambda kv: -len(kv[0]))
            items = [(k, v) for k, v in items if v is not None]

            def f(info):
                v = get(info)
                if v is None:
                    return None
                for k, m in items:
                    if v.startswith(k):
                        r = m(info)
                        if r is not None:
                            return r
                return None
            return f
        if which == "custom_match":
            ipm = self.ip_matcher(t.custom_match, field + ".custom_match")

            def f(info):
                v = get(info)
                return ipm(v, info) if v is not None else None
            return f
        raise ConfigError("matcher_tree needs exact_match_map, prefix_match_map or custom_match", field=field)

    def ip_matcher(self, ext, field):
        if not ext.HasField("typed_config") or type_name_of(ext.typed_config) != "xds.type.matcher.v3.IPMatcher":
            raise ConfigError("unsupported custom matcher '%s'" % (type_name_of(ext.typed_config)
                                                                  if ext.HasField("typed_config") else ""), field=field)
        ipm = unpack_any(ext.typed_config)
        ranges = []  # (prefix length, network, on_match callable)
        for i, rm in enumerate(ipm.range_matchers):
            rf = "%s.range_matchers[%d]" % (field, i)
            om = self.on_match(rm.on_match, rf + ".on_match")
            if om is None:
                continue
            for j, r in enumerate(rm.ranges):
                net = cidr_range(r, "%s.ranges[%d]" % (rf, j))
                ranges.append((net.prefixlen, net, om))
        ranges.sort(key=lambda x: -x[0])

        def f(value, info):
            try:
                ip = ipaddress.ip_address(value.split("%")[0])
            except ValueError:
                return None
            for _, net, om in ranges:
                if ip.version == net.version and ip in net:
                    r = om(info)
                    if r is not None:
                        return r
            return None
        return f

    # -- MatcherList ------------------------------------------------------------------------------
    def mlist(self, ml, field):
        entries = []
        for i, fm in enumerate(ml.matchers):
            ff = "%s.matchers[%d]" % (field, i)
            pred = self.predicate(fm.predicate, ff + ".predicate")
            om = self.on_match(fm.on_match, ff + ".on_match")
            if om is not None:
                entries.append((pred, om))
        if not ml.matchers:
            raise ConfigError("matcher_list needs at least one matcher", field=field)

        def f(info):
            for pred, om in entries:
                if pred(info):
                    r = om(info)
                    if r is not None:
                        return r
            return None
        return f

    def predicate(self, p, field):
        which = p.WhichOneof("match_type")
        if which == "single_predicate":
            sp = p.single_predicate
            get = self.input(sp.input, field + ".single_predicate.input")
            if sp.WhichOneof("matcher") == "value_match":
                from ..routing import compile_string_matcher
                sm = compile_string_matcher(sp.value_match, field + ".single_predicate.value_match")

                def f(info):
                    v = get(info)
                    return v is not None and sm.match(v)
                return f
            ipm = self.ip_matcher_predicate(sp.custom_match, field + ".single_predicate.custom_match")

            def g(info):
                v = get(info)
                return v is not None and ipm(v)
            return g
        if which in ("or_matcher", "and_matcher"):
            subs = [self.predicate(x, "%s.%s.predicate[%d]" % (field, which, i))
                    for i, x in enumerate(getattr(p, which).predicate)]
            if len(subs) < 2:
                raise ConfigError("needs at least two predicates", field="%s.%s" % (field, which))
            if which == "or_matcher":
                return lambda info: any(s(info) for s in subs)
            return lambda info: all(s(info) for s in subs)
        if which == "not_matcher":
            inner = self.predicate(p.not_matcher, field + ".not_matcher")
            return lambda info: not inner(info)
        raise ConfigError("predicate needs a match type", field=field)

    def ip_matcher_predicate(self, ext, field):
        if not ext.HasField("typed_config") or type_name_of(ext.typed_config) != "xds.type.matcher.v3.IPMatcher":
            raise ConfigError("unsupported custom predicate matcher", field=field)
        ipm = unpack_any(ext.typed_config)
        nets = [cidr_range(r, "%s.range_matchers[%d].ranges[%d]" % (field, i, j))
                for i, rm in enumerate(ipm.range_matchers) for j, r in enumerate(rm.ranges)]

        def f(value):
            try:
                ip = ipaddress.ip_address(value.split("%")[0])
            except ValueError:
                return False
            return any(ip.version == n.version and ip in n for n in nets)
        return f


