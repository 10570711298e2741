"""Istio's ``istio.alpn`` HTTP filter (``istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig``),
on every outbound sidecar HCM.

For each request it looks up the upstream HTTP protocol of the route's cluster (HTTP/1.1, HTTP/2, or
the downstream request's for ``use_downstream_protocol``; HTTP/1.0 downstream gives HTTP10) and
puts the matching ``alpn_override`` list into the stream's filter state under
``envoy.network.application_protocols``. The router then takes a connection from a pool keyed by
that list, whose TLS connections offer it instead of the cluster's ``alpn_protocols``. So an Istio
HTTP mTLS connection offers ``istio-http/1.1, istio, http/1.1`` (never ``istio-peer-exchange``)
and the server side picks its HTTP filter chain by it.

Skipped for a cluster whose metadata says ``istio.alpn_override: "false"`` (SIMPLE/MUTUAL
DestinationRules) and for a cluster without TLS (nothing would offer the list). For weighted
clusters the first one's protocol is used (Istio's subsets of a service share their protocol
settings). ``auto_config`` clusters keep their own ALPN (``h2, http/1.1``).
"""

from __future__ import annotations

import weakref

from ...config import ConfigError
from ...http.filter import CONTINUE, HttpFilter
from ..istio_peer import own_filter_state

KEY = "envoy.network.application_protocols"
_ref = weakref.ref
_NAMES = {0: "HTTP10", 1: "HTTP11", 2: "HTTP2"}


class AlpnConfig:
    def __init__(self, cfg, ctx):
        self.cm = getattr(ctx, "cluster_manager", None)
        self.table: dict = {}
        for i, o in enumerate(getattr(cfg, "alpn_override", ())):
            name = _NAMES.get(o.upstream_protocol)
            if name is None:
                raise ConfigError("unknown upstream_protocol %d" % o.upstream_protocol,
                                  field="alpn_override[%d].upstream_protocol" % i)
            for j, p in enumerate(o.alpn_override):
                if not p or len(p.encode()) > 255:
                    raise ConfigError("ALPN protocol must be 1..255 bytes",
                                      field="alpn_override[%d].alpn_override[%d]" % (i, j))
            self.table[name] = tuple(o.alpn_override)
        # per cluster object (weakly held: a CDS update makes new ones): its override kind
        self._kind: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        # per cluster object: the list itself, or a dict by downstream protocol (``DOWNSTREAM``)
        self._final: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.final_by_ref = self._final.data  # (its dict: ``[weakref.ref(cluster)]`` is a lookup in C)
        # the compiled path's form (ChainPlan): the same decision once the cluster is chosen
        self.compiled_hooks = _Hooks(self)

    def create(self, callbacks):
        return AlpnFilter(callbacks, self)

    def override_for(self, stream, cluster=None):
        """The ALPN list for this request's upstream connection, or None."""
        if cluster is None:
            route = stream.route
            if route is None or self.cm is None or not self.table:
                return None
            name = getattr(route, "cluster", "") or ""
            if not name:
                w = getattr(route, "weighted", None)
                name = w[0].name if w else ""
            cluster = self.cm.get(name) if name else None
            if cluster is None:
                return None
        want = self._kind.get(cluster, 0)
        if want == 0:
            want = self._kind_of(cluster)
        if want is None:
            return None
        if want == "DOWNSTREAM":
            dp = stream.version
            want = "HTTP2" if dp == "HTTP/2" else ("HTTP10" if dp == "HTTP/1.0" else "HTTP11")
        return self.table.get(want)

    def _kind_of(self, c):
        """``HTTP11``, ``HTTP2``, ``DOWNSTREAM`` (the request's protocol decides) or None (no
        override: ``istio.alpn_override: "false"``, no TLS transport anywhere, or a protocol
        that keeps its own ALPN), decided once per cluster object."""
        from ...cluster.cluster import HTTP1, HTTP2, USE_DOWNSTREAM
        want = None
        md = c.proto.metadata.filter_metadata
        f = md["istio"].fields.get("alpn_override") if "istio" in md else None
        tls = any(getattr(t, "is_tls", False) for t in
                  [c.transport_socket] + [t for _, t in (c.transport_socket_matches or ())])
        if tls and (f is None or f.string_value != "false"):
            proto = c.protocol
            want = "HTTP11" if proto == HTTP1 else "HTTP2" if proto == HTTP2 else \
                "DOWNSTREAM" if proto == USE_DOWNSTREAM else None
        try:
            self._kind[c] = want
        except TypeError:
            pass
        return want

    def final_for(self, stream, cluster):
        """``override_for(stream, cluster)``, remembered per cluster object (and downstream
        protocol, for a ``DOWNSTREAM`` one)."""
        alpn = self.override_for(stream, cluster)
        try:
            if self._kind.get(cluster) == "DOWNSTREAM":
                self._final.setdefault(cluster, {})[stream.version] = alpn
            else:
                self._final[cluster] = alpn
        except TypeError:
            pass
        return alpn


class _Hooks:
    """``istio.alpn`` on the compiled path (``ChainPlan``): ``on_request(stream, headers,
    cluster)`` once the cluster is chosen puts the list into the stream's filter state, as the
    filter does, and into ``stream.alpn``, which the lane passes to ``Cluster.http_pool``."""

    __slots__ = ("cfg", "on_request", "response_take", "on_response", "on_response_raw", "on_complete")

    def __init__(self, cfg):
        self.cfg = cfg
        self.on_request = self._request
        self.response_take = frozenset()
        self.on_response = self.on_response_raw = self.on_complete = None

    def _request(self, stream, headers, cluster) -> None:
        cfg = self.cfg
        route = stream.route
        if route is None or route.cluster:
            try:
                alpn = cfg.final_by_ref[_ref(cluster)]
                if type(alpn) is dict:
                    alpn = alpn[stream.version]
            except (KeyError, TypeError):
                alpn = cfg.final_for(stream, cluster)
        else:  # (a weighted route: the filter's choice, the first cluster's protocol)
            alpn = cfg.override_for(stream, None)
        if alpn:
            own_filter_state(stream.stream_info)[KEY] = alpn
            stream.alpn = alpn


class AlpnFilter(HttpFilter):
    __slots__ = ("cfg",)

    def __init__(self, callbacks, cfg):
        self.callbacks = callbacks
        self.cfg = cfg

    def decode_headers(self, headers, end_stream):
        alpn = self.cfg.override_for(self.callbacks)
        if alpn:
            own_filter_state(self.callbacks.stream_info)[KEY] = alpn
        return CONTINUE


def factory(cfg, ctx):
    return AlpnConfig(cfg, ctx)
