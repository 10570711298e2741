"""The connection manager's request preparation, run for every request.

One ``PrepPlan`` is compiled per ``http_connection_manager`` when its config loads; ``prepare()``
runs it once per request, before routing and before any HTTP filter (the connection manager's
entry, ``HttpConnection.on_request``, or the stream's ``decode_headers`` call it, and it is never
run twice on a request). It is Envoy's ``ConnectionManagerUtility`` in Envoy's order:

1. headers with underscores (``headers_with_underscores_action``);
2. the path (``path_norm``): a fragment refused (400), escaped slashes, ``normalize_path``,
   ``merge_slashes``; a refused path is a 400, ``UNESCAPE_AND_REDIRECT`` a 307 (400 for gRPC);
3. the host: ``strip_trailing_host_dot``, ``strip_any_host_port``/``strip_matching_host_port``;
4. ``mutateRequestHeaders``: hop-by-hop headers (``connection``/``upgrade`` are kept only for an
   upgrade, which needs both), the downstream address (``use_remote_address``,
   ``xff_num_trusted_hops``, ``skip_xff_append``, ``original_ip_detection_extensions``),
   ``x-forwarded-proto``, whether the request is internal (``internal_address_config``; Envoy 1.40
   trusts no address without one), ``x-envoy-internal`` (set only by the proxy), the
   ``x-envoy-*`` control headers and the route table's ``internal_only_headers`` (removed from
   requests that are not internal), ``via``, ``x-envoy-external-address``, ``x-request-id``;
5. ``x-forwarded-client-cert`` (``forward_client_cert_details``, ``set_current_client_cert_details``):
   removed on every connection without a verified client certificate unless ALWAYS_FORWARD_ONLY.

``prepare()`` returns the request id (a str) in the common case, or a ``Prepared`` carrying a
derived downstream address and/or a local reply. What a request costs is decided here at config
load: a request carrying none of the headers the plan watches takes a path that appends
``x-forwarded-proto``/``x-request-id`` (and what the plan always adds) without a scan.

The steps' parts live beside it: ``path_norm.py`` (the path), ``original_ip.py`` (the address from
``x-forwarded-for`` and the detection extensions), ``xfcc.py`` (the client certificate element),
``pyproxy/netaddr.py`` (address helpers).
"""

from __future__ import annotations

import logging
from operator import itemgetter

from ..config import ConfigError, runtime
from ..netaddr import cidr_range, default_internal, fmt_addr, in_any, is_loopback, local_ip
from ..tracing.request_id import compile_trace_sampler, uuid4 as _uuid4
from . import path_norm
from .decorator import DECORATE_EGRESS, DECORATE_INGRESS
from .headers import H1_SCHEME_HTTP
from .original_ip import CustomHeaderDetection, XffDetection, detection, last_xff
from .xfcc import (ALWAYS_FORWARD_ONLY, APPEND_FORWARD, CERT, CHAIN, DNS, FORWARD_ONLY, SANITIZE, SANITIZE_SET,
                   SUBJECT, URI, xfcc_value)

log = logging.getLogger("pyproxy.http")

# removed from every request that is not internal (Envoy's cleanInternalHeaders)
ENVOY_CONTROL = frozenset((
    "x-envoy-retriable-status-codes", "x-envoy-retriable-header-names", "x-envoy-retry-on",
    "x-envoy-retry-grpc-on", "x-envoy-max-retries", "x-envoy-upstream-alt-stat-name",
    "x-envoy-upstream-rq-timeout-ms", "x-envoy-upstream-rq-per-try-timeout-ms",
    "x-envoy-upstream-rq-timeout-alt-response", "x-envoy-expected-rq-timeout-ms",
    "x-envoy-force-trace", "x-envoy-ip-tags", "x-envoy-original-url",
    "x-envoy-hedge-on-per-try-timeout",
))
# the ones Envoy's router consumes (and removes) on internal requests: taken out of the headers
# here and handed to the router (``Prepared.ctl``; filters/http/router_control.py), which acts on
# them as Envoy's does (all but x-envoy-upstream-alt-stat-name: consumed, not acted on)
ROUTER_CONSUMED = frozenset((
    "x-envoy-retry-on", "x-envoy-retry-grpc-on", "x-envoy-max-retries", "x-envoy-retriable-status-codes",
    "x-envoy-retriable-header-names", "x-envoy-upstream-rq-timeout-ms", "x-envoy-upstream-rq-per-try-timeout-ms",
    "x-envoy-hedge-on-per-try-timeout", "x-envoy-upstream-alt-stat-name", "x-envoy-expected-rq-timeout-ms",
    "x-envoy-upstream-rq-timeout-alt-response",
))
# ... and from edge requests (use_remote_address, not internal); a client's x-envoy-original-path
# and x-envoy-original-host too (the router sets them when it rewrites), as Envoy 1.40 does
EDGE_ONLY = frozenset(("x-envoy-decorator-operation", "x-envoy-downstream-service-cluster",
                       "x-envoy-downstream-service-node", "x-envoy-original-path",
                       "x-envoy-original-host"))
# always removed (hop-by-hop; connection/upgrade unless this is an upgrade); and
# x-envoy-upstream-stream-duration-ms, which Envoy 1.40's router consumes from every request (its
# connection manager does not strip it) without a visible effect on an HTTP/1.1 upstream
ALWAYS_DROP = frozenset(("x-envoy-internal", "keep-alive", "proxy-connection", "transfer-encoding",
                         "x-envoy-upstream-stream-duration-ms"))
XFCC = "x-forwarded-client-cert"
XFF = "x-forwarded-for"
# the headers whose presence sends a request down the scanning path
_WATCH = ENVOY_CONTROL | EDGE_ONLY | ALWAYS_DROP | frozenset((
    XFCC, XFF, "x-forwarded-proto", "x-request-id", "connection", "upgrade", "http2-settings",
    "x-client-trace-id"))

_first = itemgetter(0)
_SCHEME_HTTPS = (":scheme", "https")
_XFP_HTTPS, _XFP_HTTP = ("x-forwarded-proto", "https"), ("x-forwarded-proto", "http")  # (header lines are tuples: shared)
_path_special = path_norm.SPECIAL_CHARS
# (as bytes: the HTTP/1.1 codec notes their presence while parsing, for ``prepare(quiet=...)``)
WATCH_BYTES = frozenset(n.encode() for n in _WATCH)


class Prepared:
    """What ``prepare()`` found besides the request id: the downstream address derived from the
    headers ("ip:port", None for the connection's) and/or a local reply ``(status, details,
    location)``."""

    __slots__ = ("rid", "remote", "reply", "upgrade", "table", "route", "ctl")

    def __init__(self, rid: str = "", remote=None, reply=None, upgrade=None, table=None, route=None, ctl=None):
        self.rid = rid
        self.remote = remote
        self.reply = reply
        self.upgrade = upgrade  # the upgrade type of a genuine upgrade request (lower case)
        # the route on_request found in ``table`` before it left the request to the stream's entry
        # (which then does not look it up again)
        self.table = table
        self.route = route
        # an internal request's router control headers (ROUTER_CONSUMED), name -> value, taken out
        # of the headers for the router (filters/http/router_control.py), or None
        self.ctl = ctl


PREPARED_NOTHING = Prepared()

# -- the plan -----------------------------------------------------------------------------------

REJECT_FRAGMENT_KEY = "envoy.reloadable_features.http_reject_path_with_fragment"


class PrepPlan:
    """Per-HCM request preparation, decided when the config loads."""

    __slots__ = ("underscores", "esc_action", "normalize", "merge", "strip_any_port",
                 "use_remote", "hops", "skip_xff_append", "detectors", "internal", "internal_unix",
                 "local_ip", "via", "gen_rid", "preserve_rid", "fcc", "cert_details", "watch",
                 "constant", "pre", "xff_only", "strip_matching_port", "strip_host_dot", "xf_port", "trace",
                 "decorate", "path_steps", "host_steps", "reject_fragment")

    def __init__(self, cfg, hcm):
        self.underscores = hcm.headers_with_underscores_action
        esc = cfg.path_with_escaped_slashes_action
        # IMPLEMENTATION_SPECIFIC_DEFAULT is KEEP_UNCHANGED in Envoy (without a runtime override)
        self.esc_action = path_norm.KEEP_UNCHANGED if esc == 0 else esc
        self.normalize = hcm.normalize_path
        # a '#fragment' in the path: refused (400), or stripped when the runtime turns the check off
        # (Istio's bootstrap sets envoy.reloadable_features.http_reject_path_with_fragment: false)
        self.reject_fragment = runtime.feature_enabled(REJECT_FRAGMENT_KEY, True)
        self.merge = cfg.merge_slashes
        self.strip_any_port = cfg.strip_any_host_port
        self.strip_matching_port = cfg.strip_matching_host_port
        if self.strip_any_port and self.strip_matching_port:
            raise ConfigError("Only one of `strip_matching_host_port` or `strip_any_host_port` can be set.",
                              field="strip_matching_host_port")
        self.strip_host_dot = cfg.strip_trailing_host_dot
        self.xf_port = cfg.append_x_forwarded_port
        # security-relevant fields pyproxy does not implement: refused, never silently ignored
        if cfg.HasField("forward_client_cert_matcher"):
            raise ConfigError("forward_client_cert_matcher is not supported (use forward_client_cert_details)",
                              field="forward_client_cert_matcher")
        if cfg.HasField("path_normalization_options"):
            raise ConfigError("path_normalization_options (forwarding/filter path transformations) is not supported",
                              field="path_normalization_options")
        if cfg.HasField("typed_header_validation_config"):
            raise ConfigError("typed_header_validation_config (UHV) is not supported",
                              field="typed_header_validation_config")
        self.use_remote = hcm.use_remote_address
        self.hops = cfg.xff_num_trusted_hops
        self.skip_xff_append = cfg.skip_xff_append
        dets = []
        if cfg.original_ip_detection_extensions:
            if self.use_remote:
                raise ConfigError("Original IP detection extensions and use_remote_address may not be mixed",
                                  field="original_ip_detection_extensions")
            if self.hops:
                raise ConfigError("Original IP detection extensions and xff_num_trusted_hops may not be mixed",
                                  field="original_ip_detection_extensions")
            for i, ext in enumerate(cfg.original_ip_detection_extensions):
                dets.append(detection(ext, "original_ip_detection_extensions[%d]" % i))
        else:
            dets.append(XffDetection(self.hops))
        self.detectors = tuple(dets)
        d0 = dets[0]
        self.xff_only = d0.hops if len(dets) == 1 and isinstance(d0, XffDetection) and not d0.trusted else None
        extra_watch = {d.name for d in dets if isinstance(d, CustomHeaderDetection)}
        # internal_address_config: without it no address is internal (Envoy 1.36+)
        self.internal = None
        self.internal_unix = False
        if cfg.HasField("internal_address_config"):
            iac = cfg.internal_address_config
            self.internal_unix = iac.unix_sockets
            nets = tuple(cidr_range(c, "internal_address_config.cidr_ranges[%d]" % i)
                         for i, c in enumerate(iac.cidr_ranges))
            self.internal = nets or "default"
        self.local_ip = local_ip(getattr(hcm.ctx, "local_address_ip_version", "v4") or "v4") \
            if self.use_remote and not self.skip_xff_append else "127.0.0.1"
        self.via = cfg.via
        self.gen_rid = hcm.generate_request_id
        # the trace decision packed into x-request-id (pyproxy/tracing/request_id.py), or None
        self.trace = compile_trace_sampler(cfg, getattr(hcm, "routes", None))
        # Envoy's decorator step (http/decorator.py) runs for every request of an HCM with a tracing
        # block, with or without a tracer provider, sampled or not: egress on an OUTBOUND listener,
        # ingress on any other
        self.decorate = 0
        if cfg.HasField("tracing"):
            lp = getattr(getattr(getattr(hcm, "ctx", None), "listener", None), "proto", None)
            self.decorate = DECORATE_EGRESS if lp is not None and lp.traffic_direction == 2 else DECORATE_INGRESS
        self.preserve_rid = cfg.preserve_external_request_id
        self.fcc = cfg.forward_client_cert_details
        if self.fcc not in (SANITIZE, FORWARD_ONLY, APPEND_FORWARD, SANITIZE_SET, ALWAYS_FORWARD_ONLY):
            raise ConfigError("unknown forward_client_cert_details %d" % self.fcc,
                              field="forward_client_cert_details")
        d = cfg.set_current_client_cert_details
        det = []
        # Envoy's order: Cert, Chain, Subject, URI, DNS
        if d.cert:
            det.append(CERT)
        if d.chain:
            det.append(CHAIN)
        if d.HasField("subject") and d.subject.value:
            det.append(SUBJECT)
        if d.uri:
            det.append(URI)
        if d.dns:
            det.append(DNS)
        self.cert_details = tuple(det)
        self.watch = _WATCH | extra_watch
        # True when a request carrying none of the watched headers only needs x-forwarded-proto
        # and x-request-id appended (the common case)
        self.constant = not (self.use_remote or self.via or self.fcc in (APPEND_FORWARD, SANITIZE_SET) or self.xf_port
                             or any(isinstance(x, CustomHeaderDetection) for x in dets))
        # (step 2, the path: whether any of its transformations is configured; step 3, the host)
        self.path_steps = bool(self.esc_action != path_norm.KEEP_UNCHANGED or self.normalize or self.merge)
        self.host_steps = bool(self.strip_host_dot or self.strip_any_port or self.strip_matching_port)
        self.pre = bool(self.underscores or self.path_steps or self.host_steps)

    def is_internal(self, ip: str) -> bool:
        nets = self.internal
        if nets is None:
            return False
        if nets == "default":
            return default_internal(ip)
        return in_any(ip, nets)


# -- per request --------------------------------------------------------------------------------

def prepare(plan: PrepPlan, conn, headers, table, quiet: bool = False):
    """Prepare one request's headers (see the module docstring). Returns the request id, or a
    ``Prepared`` when there is a derived downstream address or a local reply to send.

    ``quiet``: the caller knows the request carries none of the headers in ``WATCH_BYTES`` and no
    fragment in its path (the HTTP/1.1 codec notes both as it parses)."""
    h = headers._h
    if plan.pre:
        r = _pre(plan, conn, headers, h)
        if r is not None:
            return r
    elif not quiet:
        kv = h[2] if len(h) > 2 else h[0]
        if kv[0] != ":path":
            kv = _find(h, ":path")
        if kv is not None and "#" in kv[1]:
            if plan.reject_fragment:
                return Prepared(reply=(400, "path_normalization_failed", None))
            headers.set(":path", kv[1][:kv[1].index("#")])
    ioh = table.internal_only_headers if table is not None else ()
    if (quiet or plan.watch.isdisjoint(map(_first, h))) and (not ioh or ioh.isdisjoint(map(_first, h))):
        if plan.constant:
            # nothing to remove, no address in the headers, nothing to add but these two
            if conn.ssl is not None:
                h.append(_XFP_HTTPS)
                if h[1] is H1_SCHEME_HTTP:  # (an HTTP/1.1 request over TLS: https, as Envoy's)
                    h[1] = _SCHEME_HTTPS
            else:
                h.append(_XFP_HTTP)
            if plan.gen_rid:
                rid = _uuid4()
                if plan.trace is not None:
                    rid = plan.trace.fresh(rid, h)
                h.append(("x-request-id", rid))
                return rid
            return ""
        return _mutate(plan, conn, headers, h, False, ioh)
    return _mutate(plan, conn, headers, h, True, ioh)


def _find(h, name):
    for kv in h:
        if kv[0] == name:
            return kv
    return None


def _pre(plan, conn, headers, h):
    """Steps 1-3: underscores, the path, the host (trailing dot, port)."""
    if plan.underscores:
        bad = [k for k, _ in h if "_" in k and k[0] != ":"]
        if bad:
            if plan.underscores == 1:
                return Prepared(reply=(400, "unexpected_underscore", None))
            h[:] = [kv for kv in h if kv[0] not in bad]
    kv = h[2] if len(h) > 2 else h[0]  # (where a codec's request headers have it)
    if kv[0] != ":path":
        kv = _find(h, ":path")
    path = kv[1] if kv is not None else None
    if path is not None and path[:1] == "/":
        if "#" in path:
            if plan.reject_fragment:
                return Prepared(reply=(400, "path_normalization_failed", None))
            path = path[:path.index("#")]
            headers.set(":path", path)
        np = path
        if plan.path_steps and not (_path_special.isdisjoint(path) and path.isascii()
                                    and (not plan.merge or "//" not in path)):
            # (a path with none of the characters a path step acts on is left as it is: the
            # first check of path_norm.normalize, made here without the call)
            action, np2 = path_norm.normalize(np, plan.esc_action, plan.normalize, plan.merge)
            if action == path_norm.REJECT:
                return Prepared(reply=(400, "path_normalization_failed", None))
            np = np2
            if action == path_norm.REDIRECT:
                if (headers.get("content-type") or "").startswith("application/grpc"):
                    return Prepared(reply=(400, "path_normalization_failed", None))
                headers.set(":path", np)
                return Prepared(reply=(307, "path_normalization_failed", np))
        if np != path:
            headers.set(":path", np)
    if plan.host_steps:
        a = headers.get(":authority")
        if a:
            b = _normalize_host(a, plan.strip_host_dot, plan.strip_any_port,
                                conn.info.dst_port if plan.strip_matching_port else None)
            if b != a:
                headers.set(":authority", b)
    return None


def _port_start(host: str) -> int:
    """Envoy's HeaderUtility::getPortStart: the ':' before a port, or -1 (IPv6 literals need [])."""
    i = host.rfind(":")
    if i < 0:
        return -1
    j = host.rfind("]")
    if j < 0 or j < i:
        return i
    return -1


def _normalize_host(a: str, strip_dot: bool, strip_any: bool, match_port):
    """Envoy's maybeNormalizeHost: the trailing dot of the host, then the port (any, or the
    listener's port only)."""
    if strip_dot:
        i = _port_start(a)
        if i < 0:
            if a.endswith("."):
                a = a[:-1]
        elif i > 0 and a[i - 1] == ".":
            a = a[:i - 1] + a[i:]
    if strip_any or match_port is not None:
        i = _port_start(a)
        if i >= 0:
            port = a[i + 1:]
            if port.isdigit() and len(port) < 11 and int(port) < 2 ** 32 and \
                    (match_port is None or int(port) == match_port):
                a = a[:i]
    return a


def _mutate(plan, conn, headers, h, scan, ioh):
    scheme = "https" if conn.ssl is not None else "http"
    xff = None
    xfp = False
    xfp_v = None  # (the client's X-Forwarded-Proto, while it stands)
    rid = None
    upgrade = None
    connection = None
    xfcc = None
    drop = None
    dropping = False  # the request has a header that may have to go
    lone = None  # the name of the only such line, when it is the only one (False: more)
    multi = False  # a repeated x-forwarded-for / x-forwarded-client-cert (Envoy joins them into one)
    if scan:
        watch = plan.watch
        for k, v in h:
            if k in watch:
                if k == XFF:
                    if xff is None:
                        xff = v
                    else:
                        xff = xff + "," + v
                        multi = True
                elif k == "x-forwarded-proto":
                    xfp = True
                    xfp_v = v
                elif k == "x-request-id":
                    if rid is None:
                        rid = v
                elif k == XFCC:
                    if xfcc is None:
                        xfcc = v
                    else:
                        xfcc = xfcc + "," + v
                        multi = True
                elif k == "upgrade":
                    if upgrade is None:
                        upgrade = v
                    dropping = True
                    lone = False
                elif k == "connection":
                    connection = v if connection is None else connection + "," + v
                    dropping = True
                    lone = False
                else:
                    # (a header that is removed, at least from most requests)
                    lone = k if not dropping else False
                    dropping = True
        if ioh and not dropping and not ioh.isdisjoint(map(_first, h)):
            dropping = True
        if dropping:
            drop = _drop_set(upgrade, connection)
            if drop is not ALWAYS_DROP:
                upgrade = None  # (not an upgrade, or an h2c one: served as plain HTTP/1.1)
            if connection is not None:
                _drop_nominated(h, connection)
        if multi:
            if xff is not None:
                _set(h, XFF, xff)
            if xfcc is not None:
                _set(h, XFCC, xfcc)
    conn_info = conn.info
    direct_ip = conn_info.src_ip
    remote_ip = None
    allow_trusted = False
    if plan.use_remote:
        allow_trusted = xff is None
        if plan.hops and xff is not None:
            remote_ip, _ = last_xff(xff, plan.hops - 1)
        from_headers = remote_ip is not None
        if remote_ip is None:
            remote_ip = direct_ip
        if not plan.skip_xff_append and direct_ip:
            add = plan.local_ip if is_loopback(direct_ip) else direct_ip
            xff = add if xff is None else xff + "," + add
            _set(h, XFF, xff)
        if plan.hops == 0 or not xfp:
            _set(h, "x-forwarded-proto", scheme)
            xfp = True
            xfp_v = None
        if plan.xf_port and (plan.hops == 0 or headers.get("x-forwarded-port") is None):
            _set(h, "x-forwarded-port", str(conn_info.dst_port))
    elif plan.xff_only is not None:
        # (the default detection, XFF with xff_num_trusted_hops, without the call chain)
        from_headers = False
        if xff is not None:
            remote_ip, allow_trusted = last_xff(xff, plan.xff_only)
            from_headers = remote_ip is not None
    else:
        from_headers = False
        for det in plan.detectors:
            ip, trusted, reject = det.detect(xff, headers, direct_ip)
            if reject is not None:
                return Prepared(reply=reject)
            if ip is not None:
                remote_ip, allow_trusted, from_headers = ip, trusted, True
                break
    if not xfp:
        h.append(("x-forwarded-proto", scheme))
    if h[1] is H1_SCHEME_HTTP:
        # (HTTP/1.1 origin-form: Envoy's :scheme is the X-Forwarded-Proto, if http or https, else
        # the connection's)
        p = xfp_v if xfp_v == "https" or xfp_v == "http" else scheme
        if p == "https":
            h[1] = _SCHEME_HTTPS
    if plan.xf_port and headers.get("x-forwarded-port") is None:
        h.append(("x-forwarded-port", str(conn_info.dst_port)))
    if remote_ip:
        internal = allow_trusted and plan.is_internal(remote_ip)
    else:
        # a unix-socket peer (use_remote_address): internal when internal_address_config says so
        internal = allow_trusted and plan.use_remote and plan.internal_unix
    if remote_ip is None:
        remote_ip = direct_ip
    edge = not internal and plan.use_remote
    ctl = None
    if internal:
        if drop is not None:
            ctl = {kv[0]: kv[1] for kv in h if kv[0] in ROUTER_CONSUMED} or None
            _remove(h, (drop | ROUTER_CONSUMED) - _INTERNAL_KEEP)
        _set(h, "x-envoy-internal", "true")
        if ctl is None:
            ctl = NO_CONTROL  # (still the router's: it charges internal.upstream_rq_*)
    elif drop is not None:
        drop = _NOT_INTERNAL[drop]
        if edge:
            drop |= EDGE_ONLY
        if ioh:
            drop |= ioh
            _remove(h, drop)
        elif lone:
            # (every name in ``drop`` is watched: the lone line is the only one that may go, as
            # on a client sidecar's request, its x-envoy-expected-rq-timeout-ms)
            if lone in drop:
                del h[[*map(_first, h)].index(lone)]
        else:
            _remove(h, drop)
    if plan.via:
        via = headers.get("via")
        headers.set("via", plan.via if not via else via + ", " + plan.via)
    if edge and remote_ip:
        _set(h, "x-envoy-external-address", remote_ip)
    if plan.gen_rid:
        if rid is None:
            rid = _uuid4()
            h.append(("x-request-id", rid))
        elif edge and not plan.preserve_rid:
            rid = _uuid4()
            _set(h, "x-request-id", rid)
    if plan.trace is not None and rid:
        rid = plan.trace.apply(h, rid)
    # 5. XFCC
    fcc = plan.fcc
    if fcc != ALWAYS_FORWARD_ONLY:
        tls = conn.ssl
        if fcc == SANITIZE or tls is None:
            cert = None
        elif fcc == FORWARD_ONLY:
            cert = "" if tls.client_cert() is not None else None
        else:
            cert = xfcc_value(tls, plan.cert_details)
        if cert is None:
            if xfcc is not None:
                _remove(h, (XFCC,))
        elif fcc == APPEND_FORWARD:
            _set(h, XFCC, cert if xfcc is None else xfcc + "," + cert)
        elif fcc == SANITIZE_SET:
            _set(h, XFCC, cert)
    remote = fmt_addr(remote_ip, 0) if from_headers else None
    if remote is None and upgrade is None and ctl is None:
        return rid or ""
    return Prepared(rid=rid or "", remote=remote, upgrade=upgrade.strip().lower() if upgrade is not None else None,
                    ctl=ctl)


_DROP_NO_UPGRADE = ALWAYS_DROP | {"connection", "upgrade"}
_DROP_H2C = _DROP_NO_UPGRADE | {"http2-settings"}
_INTERNAL_KEEP = frozenset(("x-envoy-internal",))
# the ``ctl`` of an internal request without control headers: never written to
NO_CONTROL: dict = {}
# each hop-by-hop drop set (_drop_set) with the x-envoy-* control headers, for a request that is
# not internal
_NOT_INTERNAL = {d: d | ENVOY_CONTROL for d in (_DROP_NO_UPGRADE, _DROP_H2C, ALWAYS_DROP)}


def _drop_set(upgrade, connection):
    """The hop-by-hop headers to remove: ALWAYS_DROP for a genuine upgrade (it keeps connection
    and upgrade), else those two as well; an h2c upgrade also loses HTTP2-Settings."""
    if upgrade is None:
        return _DROP_NO_UPGRADE
    # an upgrade needs both headers (Envoy's Utility::isUpgrade); a lone one is stripped
    if connection is None or "upgrade" not in [t.strip().lower() for t in connection.split(",")]:
        return _DROP_NO_UPGRADE
    if upgrade.strip().lower() == "h2c":
        # Envoy's HTTP/1 codec: h2c upgrades are not supported; served as HTTP/1.1
        return _DROP_H2C
    return ALWAYS_DROP


# Connection tokens that name no header to remove here (options, hop-by-hop headers handled
# elsewhere, and the headers this module itself reads and rewrites)
_CONNECTION_OPTIONS = frozenset(("", "close", "keep-alive", "upgrade", "te", "host", XFF, XFCC, "x-forwarded-proto",
                                 "x-request-id", "x-envoy-internal"))


def _drop_nominated(h, connection: str) -> None:
    """The headers a request's Connection header nominates are hop-by-hop (RFC 9110 7.6.1):
    removed, as Envoy does."""
    names = {t.strip().lower() for t in connection.split(",")} - _CONNECTION_OPTIONS
    names = {n for n in names if n[0] != ":"}
    if names:
        _remove(h, names)


def _set(h, name, value):
    """Replace every ``name`` with one entry (at the first one's place, else appended)."""
    for i, kv in enumerate(h):
        if kv[0] == name:
            h[i] = (name, value)
            j = i + 1
            while j < len(h):
                if h[j][0] == name:
                    del h[j]
                else:
                    j += 1
            return
    h.append((name, value))


def _remove(h, names):
    h[:] = [kv for kv in h if kv[0] not in names]
