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

from ...config import ConfigError
from ...http.filter import CONTINUE, HttpFilter

KEY = "envoy.network.application_protocols"
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

    def create(self, callbacks):
        return AlpnFilter(callbacks, self)

    def override_for(self, stream):
        """The ALPN list for this request's upstream connection, or None."""
        route = stream.route
        if route is None or self.cm is None or not self.table:
            return None
        name = getattr(route, "cluster", "") or ""
        if not name:
            w = getattr(route, "weighted", None)
            name = w[0].name if w else ""
        c = self.cm.get(name) if name else None
        if c is None:
            return None
        md = c.proto.metadata.filter_metadata
        if "istio" in md:
            f = md["istio"].fields.get("alpn_override")
            if f is not None and f.string_value == "false":
                return None
        from ...cluster.cluster import HTTP1, HTTP2, USE_DOWNSTREAM
        proto = c.protocol
        if proto == HTTP1:
            want = "HTTP11"
        elif proto == HTTP2:
            want = "HTTP2"
        elif proto == USE_DOWNSTREAM:
            dp = stream.stream_info.protocol
            want = "HTTP2" if dp == "HTTP/2" else ("HTTP10" if dp == "HTTP/1.0" else "HTTP11")
        else:
            return None
        return self.table.get(want)


class AlpnFilter(HttpFilter):
    __slots__ = ("cfg",)

    def __init__(self, callbacks, cfg):
        self.callbacks = callbacks
        self.cfg = cfg

    def decode_headers(self, headers, end_stream):
        alpn = self.cfg.override_for(self.callbacks)
        if alpn:
            self.callbacks.stream_info.filter_state[KEY] = alpn
        return CONTINUE


def factory(cfg, ctx):
    return AlpnConfig(cfg, ctx)
