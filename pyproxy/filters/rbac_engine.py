"""Envoy's RBAC policy engine (``envoy.config.rbac.v3.RBAC``), shared by the HTTP and network filters.

Each permission and principal compiles once into a closure ``f(subject) -> bool``. A policy matches
when any of its permissions and any of its principals match. ``ALLOW``: a request is allowed iff
some policy matches; ``DENY``: iff none does; ``LOG``: always allowed. An ``RBAC`` message that is
present with no policies therefore denies everything under ``ALLOW`` (Envoy's rule).

TLS is not implemented yet, so a connection has no authenticated peer: ``authenticated`` principals
never match, and ``io.istio.peer_principal`` filter state is absent (exactly as Envoy on plaintext).
CEL conditions and extension matchers are rejected at config time rather than ignored.
"""

from __future__ import annotations

import ipaddress

from ..config import ConfigError
from ..netaddr import cidr_range

ALLOW, DENY, LOG = 0, 1, 2
ACTION_NAMES = {ALLOW: "ALLOW", DENY: "DENY", LOG: "LOG"}


class Subject:
    """What the engine reads about one request or connection (filled by the filter)."""

    __slots__ = ("headers", "path", "dst_ip", "dst_port", "direct_remote_ip", "remote_ip", "sni",
                 "dynamic_metadata", "filter_state", "peer_principal", "source_ip")

    def __init__(self, headers=None, path=None, dst_ip=None, dst_port=0, direct_remote_ip=None,
                 remote_ip=None, sni="", dynamic_metadata=None, filter_state=None, peer_principal=None,
                 source_ip=None):
        self.headers = headers
        self.path = path
        self.dst_ip = dst_ip
        self.dst_port = dst_port
        self.direct_remote_ip = direct_remote_ip
        self.remote_ip = remote_ip
        self.sni = sni
        self.dynamic_metadata = dynamic_metadata if dynamic_metadata is not None else {}
        self.filter_state = filter_state if filter_state is not None else {}
        self.peer_principal = peer_principal
        # the connection's remote address (Envoy: proxy protocol honoured, x-forwarded-for not)
        self.source_ip = source_ip if source_ip is not None else direct_remote_ip


def parse_ip(s: str):
    """An ``ipaddress`` object from ``"1.2.3.4"``, ``"1.2.3.4:80"`` or ``"[::1]:80"``; None if not an IP."""
    if not s:
        return None
    if s.startswith("["):
        s = s[1:s.find("]")]
    elif s.count(":") == 1:
        s = s.rsplit(":", 1)[0]
    try:
        return ipaddress.ip_address(s.split("%")[0])
    except ValueError:
        return None


class Engine:
    """One compiled RBAC message."""

    __slots__ = ("action", "policies")

    def __init__(self, action: int, policies: tuple):
        self.action = action
        self.policies = policies  # ((name, permission_fn, principal_fn), ...) in name order

    def evaluate(self, subject: Subject):
        """``(allowed, matched_policy_name or "")``."""
        matched = ""
        for name, perm, princ in self.policies:
            if perm(subject) and princ(subject):
                matched = name
                break
        if self.action == ALLOW:
            return bool(matched), matched
        if self.action == DENY:
            return not matched, matched
        return True, matched


def compile_rbac(rbac, field: str, *, http: bool) -> Engine:
    if rbac.action not in ACTION_NAMES:
        raise ConfigError("unknown action %d" % rbac.action, field=field + ".action")
    if rbac.HasField("audit_logging_options"):
        pass  # audit loggers only log; nothing to enforce
    pols = []
    for name in sorted(rbac.policies):
        p = rbac.policies[name]
        pf = "%s.policies[%s]" % (field, name)
        if p.HasField("condition") or p.HasField("checked_condition"):
            raise ConfigError("CEL conditions are not supported", field=pf + ".condition")
        if not p.permissions:
            raise ConfigError("a policy needs at least one permission", field=pf + ".permissions")
        if not p.principals:
            raise ConfigError("a policy needs at least one principal", field=pf + ".principals")
        perms = [_permission(x, "%s.permissions[%d]" % (pf, i), http) for i, x in enumerate(p.permissions)]
        princs = [_principal(x, "%s.principals[%d]" % (pf, i), http) for i, x in enumerate(p.principals)]
        pols.append((name, _any_of(perms), _any_of(princs)))
    return Engine(rbac.action, tuple(pols))


def _any_of(fns):
    if len(fns) == 1:
        return fns[0]
    fns = tuple(fns)
    return lambda s: any(f(s) for f in fns)


def _all_of(fns):
    if len(fns) == 1:
        return fns[0]
    fns = tuple(fns)
    return lambda s: all(f(s) for f in fns)


def _never(s):
    return False


def _always(s):
    return True


def _ip_in(attr: str, net):
    def f(s):
        ip = getattr(s, attr)
        return ip is not None and ip.version == net.version and ip in net
    return f


def _header(h, field, http):
    if not http:
        # a network filter has no headers: Envoy refuses the rule (a DENY on it would never match)
        raise ConfigError("Found header(%s) rule,not supported by RBAC network filter" % h.name, field=field)
    from ..routing import compile_header_matcher
    hm = compile_header_matcher(h, field)

    def f(s):
        return s.headers is not None and hm.match(s.headers)
    return f


def _url_path(pm, field, http):
    if not http:
        return _never
    from ..routing import compile_string_matcher
    which = pm.WhichOneof("rule")
    if which != "path":
        raise ConfigError("path matcher is required", field=field)
    sm = compile_string_matcher(pm.path, field + ".path")

    def f(s):
        return s.path is not None and sm.match(s.path)
    return f


def _permission(p, field, http):
    which = p.WhichOneof("rule")
    if which == "any":
        return _always if p.any else _never
    if which == "and_rules":
        return _all_of([_permission(x, "%s.and_rules.rules[%d]" % (field, i), http)
                        for i, x in enumerate(p.and_rules.rules)] or [_always])
    if which == "or_rules":
        return _any_of([_permission(x, "%s.or_rules.rules[%d]" % (field, i), http)
                        for i, x in enumerate(p.or_rules.rules)] or [_never])
    if which == "not_rule":
        inner = _permission(p.not_rule, field + ".not_rule", http)
        return lambda s: not inner(s)
    if which == "header":
        return _header(p.header, field + ".header", http)
    if which == "url_path":
        return _url_path(p.url_path, field + ".url_path", http)
    if which == "destination_ip":
        return _ip_in("dst_ip", cidr_range(p.destination_ip, field + ".destination_ip"))
    if which == "destination_port":
        port = p.destination_port
        return lambda s: s.dst_port == port
    if which == "destination_port_range":
        lo, hi = p.destination_port_range.start, p.destination_port_range.end
        return lambda s: lo <= s.dst_port < hi
    if which == "metadata":
        return _metadata(p.metadata, field + ".metadata")
    if which == "requested_server_name":
        from ..routing import compile_string_matcher
        sm = compile_string_matcher(p.requested_server_name, field + ".requested_server_name")
        return lambda s: sm.match(s.sni or "")
    if which is None:
        raise ConfigError("permission rule is required", field=field)
    raise ConfigError("permission '%s' is not supported" % which, field="%s.%s" % (field, which))


def _principal(p, field, http):
    which = p.WhichOneof("identifier")
    if which == "any":
        return _always if p.any else _never
    if which == "and_ids":
        return _all_of([_principal(x, "%s.and_ids.ids[%d]" % (field, i), http)
                        for i, x in enumerate(p.and_ids.ids)] or [_always])
    if which == "or_ids":
        return _any_of([_principal(x, "%s.or_ids.ids[%d]" % (field, i), http)
                        for i, x in enumerate(p.or_ids.ids)] or [_never])
    if which == "not_id":
        inner = _principal(p.not_id, field + ".not_id", http)
        return lambda s: not inner(s)
    if which == "authenticated":
        from ..routing import compile_string_matcher
        a = p.authenticated
        sm = compile_string_matcher(a.principal_name, field + ".authenticated.principal_name") \
            if a.HasField("principal_name") else None
        # plaintext: peer_principal is None and this never matches. Any TLS connection, with or
        # without a client certificate, matches an absent principal_name (Envoy's
        # AuthenticatedMatcher); otherwise every URI SAN, every DNS SAN, then the subject (an empty
        # string without a certificate) is tried, any one may match
        if sm is None:
            return lambda s: s.peer_principal is not None
        return lambda s: s.peer_principal is not None and any(sm.match(p) for p in s.peer_principal)
    if which == "direct_remote_ip":
        # the physical peer, whatever x-forwarded-for says
        return _ip_in("direct_remote_ip", cidr_range(p.direct_remote_ip, field + ".direct_remote_ip"))
    if which == "source_ip":
        return _ip_in("source_ip", cidr_range(p.source_ip, field + ".source_ip"))
    if which == "remote_ip":
        # the downstream address as the connection manager derived it (x-forwarded-for,
        # original_ip_detection_extensions: pyproxy/http/request_prep.py)
        return _ip_in("remote_ip", cidr_range(p.remote_ip, field + ".remote_ip"))
    if which == "header":
        return _header(p.header, field + ".header", http)
    if which == "url_path":
        return _url_path(p.url_path, field + ".url_path", http)
    if which == "metadata":
        return _metadata(p.metadata, field + ".metadata")
    if which == "filter_state":
        return _filter_state(p.filter_state, field + ".filter_state")
    if which is None:
        raise ConfigError("principal identifier is required", field=field)
    raise ConfigError("principal '%s' is not supported" % which, field="%s.%s" % (field, which))


def _filter_state(fs, field):
    from ..routing import compile_string_matcher
    key = fs.key
    if not key:
        raise ConfigError("key must not be empty", field=field + ".key")
    which = fs.WhichOneof("matcher")
    if which != "string_match":
        raise ConfigError("filter state matcher '%s' is not supported" % which, field=field)
    sm = compile_string_matcher(fs.string_match, field + ".string_match")

    def f(s):
        v = s.filter_state.get(key)
        return isinstance(v, str) and sm.match(v)
    return f


def _metadata(mm, field):
    filt = mm.filter
    path = tuple(seg.key for seg in mm.path)
    if not path:
        raise ConfigError("path must not be empty", field=field + ".path")
    vm = compile_value_matcher(mm.value, field + ".value")
    invert = mm.invert

    def f(s):
        v = s.dynamic_metadata.get(filt)
        for k in path:
            if not isinstance(v, dict):
                v = None
                break
            v = v.get(k)
        return vm(v) != invert
    return f


_MISSING = object()


def compile_value_matcher(vm, field):
    """``type.matcher.v3.ValueMatcher`` over a plain Python value (dict/list/str/float/bool/None)."""
    from ..routing import compile_string_matcher
    which = vm.WhichOneof("match_pattern")
    if which == "null_match":
        return lambda v: v is None
    if which == "present_match":
        want = vm.present_match
        return lambda v: (v is not None) == want
    if which == "bool_match":
        b = vm.bool_match
        return lambda v: isinstance(v, bool) and v == b
    if which == "string_match":
        sm = compile_string_matcher(vm.string_match, field + ".string_match")
        return lambda v: isinstance(v, str) and sm.match(v)
    if which == "double_match":
        dm = vm.double_match
        if dm.WhichOneof("match_pattern") == "exact":
            x = dm.exact
            return lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v == x
        lo, hi = dm.range.start, dm.range.end
        return lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and lo <= v < hi
    if which == "list_match":
        inner = compile_value_matcher(vm.list_match.one_of, field + ".list_match.one_of")
        return lambda v: isinstance(v, list) and any(inner(x) for x in v)
    if which == "or_match":
        ms = [compile_value_matcher(x, "%s.or_match.value_matchers[%d]" % (field, i))
              for i, x in enumerate(vm.or_match.value_matchers)]
        return lambda v: any(m(v) for m in ms)
    raise ConfigError("value matcher '%s' is not supported" % which, field=field)


def peer_principal(conn):
    """The names RBAC's ``authenticated`` principal tries on a TLS connection (URI SANs, DNS SANs,
    subject; the empty subject alone without a client certificate), or None on plaintext."""
    tls = conn.ssl
    if tls is None:
        return None
    return getattr(tls, "peer_principals", None) or _NO_CERT


_NO_CERT = ("",)
