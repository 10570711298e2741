"""Istio's HTTP ``peer_metadata`` filter (``io.istio.http.peer_metadata.Config``, named
``istio.metadata_exchange`` in sidecar HCMs): peer workload metadata from the
``x-envoy-peer-metadata`` / ``-id`` headers, and the local workload's sent the other way.

Request (``decode_headers``): downstream discovery (the first method that finds a peer wins; its
result goes to filter state ``downstream_peer``/``downstream_peer_obj``), every discovery method's
headers are removed, then upstream propagation sets both headers on the upstream request (unless
the route's cluster has ``istio.disable_mx: true``, or ``skip_external_clusters`` and the cluster is
``PassthroughCluster`` or ``istio.external: true``). Response (``encode_headers``): upstream
discovery into ``upstream_peer``, headers removed, then downstream propagation sets the response
headers only if the request carried them.

``workload_discovery`` needs Istio's workload-metadata xDS provider (off for sidecars:
``METADATA_DISCOVERY=false``) and finds nothing here, as in Envoy without the provider. ``baggage``
discovery/propagation (ambient and waypoints only) is rejected with a message.

The legacy Wasm null-VM form (``envoy.wasm.metadata_exchange``) is compiled into this filter with
the configuration istiod renders for the listener's direction.

A malformed header is counted in ``istio_peer_metadata.malformed_header`` (logged once) and
ignored: the request goes on without a peer.
"""

from __future__ import annotations

from ...config import ConfigError
from ...http.filter import CONTINUE, HttpFilter
from ...stats import Counter
from .. import istio_peer as P

_HEADERS = (P.HEADER, P.HEADER_ID)


class PeerMetadataConfig:
    def __init__(self, cfg, ctx, *, legacy_direction=None):
        node = getattr(getattr(ctx, "server", None), "node", None)
        self.notes = []
        if legacy_direction is not None:
            # the Wasm plugin's behaviour, as istiod renders peer_metadata for this direction
            inbound = legacy_direction
            self.additional = frozenset()
            self.down_disc = inbound
            self.up_disc = not inbound
            self.down_prop = inbound
            self.up_prop = not inbound
            self.skip_external = False
        else:
            self.additional = frozenset(cfg.additional_labels)
            self.down_disc = self._discovery(cfg.downstream_discovery, "downstream_discovery")
            self.up_disc = self._discovery(cfg.upstream_discovery, "upstream_discovery")
            self.down_prop, _ = self._propagation(cfg.downstream_propagation, "downstream_propagation")
            self.up_prop, self.skip_external = self._propagation(cfg.upstream_propagation,
                                                                 "upstream_propagation")
            if cfg.shared_with_upstream:
                self.notes.append("shared_with_upstream: the peer is visible to this proxy's filters "
                                  "and access logs only (no upstream filter state)")
        self.local = P.LocalNode(node, self.additional)
        self.node_id = self.local.node_id
        self.value = self.local.header_value
        self.cache = P.PeerCache()
        st = getattr(ctx, "stats", None)
        c = st.counter("istio_peer_metadata.malformed_header") if st is not None else Counter("x")
        self.bad = P.BadInput(c, "peer_metadata (x-envoy-peer-metadata)")
        self.cm = getattr(ctx, "cluster_manager", None)
        # nothing to do at all: not in the chain
        if not (self.down_disc or self.up_disc or self.down_prop or self.up_prop):
            self.skip_reason = "peer_metadata: no discovery or propagation method configured"

    def _discovery(self, methods, field) -> bool:
        """True when ``istio_headers`` is among the methods (the only one that can find a peer)."""
        found = False
        for i, m in enumerate(methods):
            which = m.WhichOneof("method_specifier")
            if which == "istio_headers":
                found = True
            elif which == "workload_discovery":
                pass  # no workload-metadata provider (sidecars run without one): finds nothing, as Envoy
            elif which == "upstream_filter_state":
                if field == "downstream_discovery":
                    continue  # Istio ignores it downstream (with a warning)
                raise ConfigError("upstream_filter_state discovery (waypoints) is not supported",
                                  field="%s[%d]" % (field, i))
            elif which == "baggage":
                raise ConfigError("baggage discovery (ambient) is not supported", field="%s[%d]" % (field, i))
            else:
                raise ConfigError("a discovery method is required", field="%s[%d]" % (field, i))
        return found

    def _propagation(self, methods, field):
        on = skip = False
        for i, m in enumerate(methods):
            which = m.WhichOneof("method_specifier")
            if which == "istio_headers":
                on = True
                skip = skip or m.istio_headers.skip_external_clusters
            elif which == "baggage":
                raise ConfigError("baggage propagation (ambient) is not supported", field="%s[%d]" % (field, i))
            else:
                raise ConfigError("a propagation method is required", field="%s[%d]" % (field, i))
        return on, skip

    def skip_upstream(self, stream) -> bool:
        """``istio.disable_mx`` on the route's cluster, or an external one with skip_external_clusters."""
        route = stream.route
        if route is None or self.cm is None:
            return False
        name = getattr(route, "cluster", "") or ""
        if not name:
            w = getattr(route, "weighted", None)
            name = w[0].name if w else ""
        if not name:
            return False
        if self.skip_external and name == "PassthroughCluster":
            return True
        c = self.cm.get(name)
        if c is None:
            return False
        md = c.proto.metadata.filter_metadata
        if "istio" not in md:
            return False
        f = md["istio"].fields
        if self.skip_external and "external" in f and f["external"].bool_value:
            return True
        return "disable_mx" in f and f["disable_mx"].bool_value

    def discover(self, headers):
        """(peer or None, had id, had value); removes the headers."""
        h = headers._h
        pid = val = None
        for k, v in h:
            if k == P.HEADER:
                if val is None:
                    val = v
            elif k == P.HEADER_ID:
                if pid is None:
                    pid = v
        if pid is None and val is None:
            return None, False, False
        headers._h = [kv for kv in h if kv[0] not in _HEADERS]
        peer = None
        if val:
            peer = self.cache.get(pid or "", val, self.additional)
            if peer is None:
                self.bad.hit("%d bytes from peer id %r" % (len(val), (pid or "")[:80]))
        return peer, pid is not None, val is not None

    def create(self, stream):
        return PeerMetadataFilter(stream, self)


class PeerMetadataFilter(HttpFilter):
    __slots__ = ("f", "req_id", "req_val")

    def __init__(self, callbacks, f):
        self.callbacks = callbacks
        self.f = f
        self.req_id = False
        self.req_val = False

    def decode_headers(self, headers, end_stream):
        f = self.f
        if f.down_disc:
            peer, self.req_id, self.req_val = f.discover(headers)
            if peer is not None:
                _set(self.callbacks.stream_info, True, peer)
        elif f.down_prop:
            # no discovery: still "did the request carry them" for the response (Istio's context)
            self.req_id = headers.get(P.HEADER_ID) is not None
            self.req_val = headers.get(P.HEADER) is not None
        if f.up_prop and not f.skip_upstream(self.callbacks):
            headers.set(P.HEADER_ID, f.node_id)
            headers.set(P.HEADER, f.value)
        return CONTINUE

    def encode_headers(self, headers, end_stream):
        f = self.f
        if f.up_disc:
            peer, _, _ = f.discover(headers)
            if peer is not None:
                _set(self.callbacks.stream_info, False, peer)
        if f.down_prop:
            if self.req_id:
                headers.set(P.HEADER_ID, f.node_id)
            if self.req_val:
                headers.set(P.HEADER, f.value)
        return CONTINUE


def _set(si, downstream: bool, peer) -> None:
    """Stream-lifetime filter state: the stream gets its own dict (over the connection's) on the
    first write, so a peer found on one request never leaks into the next one on the connection."""
    fs = si.filter_state
    key = P.DOWNSTREAM_PEER if downstream else P.UPSTREAM_PEER
    if fs is not None and key in fs:
        return  # the first value written wins (e.g. the TCP exchange's)
    if not getattr(si, "own_filter_state", False):
        fs = dict(fs) if fs else {}
        si.filter_state = fs
        si.own_filter_state = True
    P.set_peer(fs, downstream, peer)


def factory(cfg, ctx):
    return PeerMetadataConfig(cfg, ctx)


def legacy_wasm_factory(ctx):
    """``envoy.wasm.metadata_exchange`` in a Wasm null VM: the same filter, configured as istiod
    configures peer_metadata for the enclosing listener's direction."""
    listener = getattr(ctx, "listener", None)
    inbound = bool(getattr(listener, "inbound", False))
    return PeerMetadataConfig(None, ctx, legacy_direction=inbound)
