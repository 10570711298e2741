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

import weakref
from operator import itemgetter

from ...config import ConfigError
from ...http.filter import CONTINUE, HttpFilter
from ...http.http1_common import header_line  # (the byte relay's lines: encoded by the HTTP/1 codec)
from ...stats import Counter
from .. import istio_peer as P

_HEADERS = frozenset((P.HEADER, P.HEADER_ID))
_first = itemgetter(0)
_ref = weakref.ref
_HDR = P.HEADER
_UP = P.UPSTREAM_PEER


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
        # per cluster object (weakly held: a CDS update makes new ones): skip upstream propagation?
        self._skip: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.skip_by_ref = self._skip.data  # (its dict: ``[weakref.ref(cluster)]`` is a lookup in C)
        self.up_headers = ((P.HEADER_ID, self.node_id), (P.HEADER, self.value))
        self._raw_down = header_line(P.HEADER_ID, self.node_id), header_line(P.HEADER, self.value)
        # nothing to do at all: not in the chain
        if not (self.down_disc or self.up_disc or self.down_prop or self.up_prop):
            self.skip_reason = "peer_metadata: no discovery or propagation method configured"
        # the compiled path's form of this filter (ChainPlan): the same header work at the points
        # where the filter would do it, without a filter object per stream
        self.compiled_hooks = _Hooks(self)

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
        return self.skip_cluster(c)

    def skip_cluster(self, c) -> bool:
        """The cluster part of ``skip_upstream``, decided once per cluster object."""
        hit = self._skip.get(c)
        if hit is None:
            hit = False
            if self.skip_external and c.name == "PassthroughCluster":
                hit = True
            else:
                md = c.proto.metadata.filter_metadata
                if "istio" in md:
                    f = md["istio"].fields
                    if self.skip_external and "external" in f and f["external"].bool_value:
                        hit = True
                    else:
                        hit = "disable_mx" in f and f["disable_mx"].bool_value
            try:
                self._skip[c] = hit
            except TypeError:  # (not weakly referenceable: not cached)
                pass
        return hit

    def propagate_up(self, headers) -> None:
        """Upstream propagation: both headers on the request, replacing any the client sent
        (removed, then appended: Envoy's ``setReferenceKey``)."""
        h = headers._h
        if any(map(_HEADERS.__contains__, map(_first, h))):
            h = headers._h = [kv for kv in h if kv[0] not in _HEADERS]
        h += self.up_headers

    def propagate_down(self, headers, rid: bool, rval: bool) -> None:
        """Downstream propagation: the headers the request carried, on the response (replacing
        any the upstream sent, as above)."""
        if rid or rval:
            h = headers._h
            if any(map(_HEADERS.__contains__, map(_first, h))):
                h = headers._h = [kv for kv in h if kv[0] not in _HEADERS]
            if rid:
                h.append(self.up_headers[0])
            if rval:
                h.append(self.up_headers[1])

    def found(self, pid, val):
        """The peer for the headers' values (cached by peer id and value), or None."""
        if not val:
            return None
        peer = self.cache.get(pid or "", val, self.additional)
        if peer is None:
            self.bad.hit("%d bytes from peer id %r" % (len(val), (pid or "")[:80]))
        return peer

    def discover(self, headers):
        """(peer or None, had id, had value); removes the headers."""
        h = headers._h
        if not any(map(_HEADERS.__contains__, map(_first, h))):
            return None, False, False
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
        return self.found(pid, val), pid is not None, val is not None

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
            f.propagate_up(headers)
        return CONTINUE

    def encode_headers(self, headers, end_stream):
        f = self.f
        if f.up_disc:
            peer, _, _ = f.discover(headers)
            if peer is not None:
                _set(self.callbacks.stream_info, False, peer)
        if f.down_prop:
            f.propagate_down(headers, self.req_id, self.req_val)
        return CONTINUE


class _Hooks:
    """This filter on the compiled path (the interface ``ChainPlan`` reads, see
    ``filters/network/http_connection_manager.py``), doing what ``PeerMetadataFilter`` does at the
    same points of the exchange:

    - ``on_request(stream, headers, cluster)``: once the route's cluster is chosen, before the
      route's own header mutations (the filter runs first in the chain, the router last):
      downstream discovery (headers removed, peer into filter state) and upstream propagation;
    - ``response_take``: the response header names the byte relay (http/h1_relay.py) hands over instead of
      writing them (both exchange headers, when anything reads or replaces them);
    - ``on_response(stream, headers)``: the response ``Headers``, after the route's response
      mutations: upstream discovery and downstream propagation;
    - ``on_response_raw(stream, taken)``: the same for the byte relay, which writes the head
      from the upstream's raw header lines: ``taken`` is None or the ``(name, value)`` str pairs
      of ``response_take`` it held back; returns the header lines to add (bytes) or None.
    Per-stream state: ``stream.mx_carried`` (did the request carry the id / the value), only with
    downstream propagation."""

    __slots__ = ("f", "on_request", "response_take", "on_response", "on_response_raw", "on_complete")

    def __init__(self, f: PeerMetadataConfig):
        self.f = f
        if f.up_prop and not (f.down_disc or f.down_prop):
            self.on_request = self._request_up  # (an outbound sidecar's: propagation only)
        else:
            self.on_request = self._request if (f.down_disc or f.down_prop or f.up_prop) else None
        resp = f.up_disc or f.down_prop
        self.response_take = _HEADERS if resp else frozenset()
        self.on_response = self._response if resp else None
        self.on_response_raw = self._response_raw if resp else None
        self.on_complete = None

    def _request(self, stream, headers, cluster) -> None:
        f = self.f
        if f.down_disc:
            peer, rid, rval = f.discover(headers)
            if peer is not None:
                _set(stream.stream_info, True, peer)
            if f.down_prop:
                stream.mx_carried = (rid, rval)
        elif f.down_prop:
            stream.mx_carried = (headers.get(P.HEADER_ID) is not None, headers.get(P.HEADER) is not None)
        if f.up_prop:
            route = stream.route
            # (a weighted route: the filter's choice, the first cluster's metadata)
            skip = f.skip_cluster(cluster) if route is None or route.cluster else f.skip_upstream(stream)
            if not skip:
                f.propagate_up(headers)

    def _request_up(self, stream, headers, cluster) -> None:
        """``_request`` with upstream propagation only: the skip decision for the cluster is one
        lookup, the two header lines were made at config load."""
        f = self.f
        route = stream.route
        if route is None or route.cluster:
            try:
                skip = f.skip_by_ref[_ref(cluster)]
            except (KeyError, TypeError):
                skip = f.skip_cluster(cluster)
        else:  # (a weighted route: the filter's choice, the first cluster's metadata)
            skip = f.skip_upstream(stream)
        if not skip:
            h = headers._h
            if _HEADERS.isdisjoint(map(_first, h)):
                h += f.up_headers
            else:
                f.propagate_up(headers)

    def _response(self, stream, headers) -> None:
        f = self.f
        if f.up_disc:
            peer, _, _ = f.discover(headers)
            if peer is not None:
                _set(stream.stream_info, False, peer)
        if f.down_prop:
            rid, rval = getattr(stream, "mx_carried", None) or (False, False)
            f.propagate_down(headers, rid, rval)

    def _response_raw(self, stream, taken):
        f = self.f
        if taken is not None and f.up_disc:
            pid = val = None
            for k, v in taken:
                if k == _HDR:
                    if val is None:
                        val = v
                elif pid is None:
                    pid = v
            if val:
                hit = f.cache.entry(pid or "", val, f.additional)
                if hit is None:
                    f.bad.hit("%d bytes from peer id %r" % (len(val), (pid or "")[:80]))
                else:  # (_set, with the cached wrapper)
                    si = stream.stream_info
                    fs = si.filter_state
                    if not fs or _UP not in fs:
                        P.set_peer(P.own_filter_state(si), False, hit[1], hit[2])
        if f.down_prop:
            rid, rval = getattr(stream, "mx_carried", None) or (False, False)
            if rid or rval:
                raw_id, raw_val = f._raw_down
                return (raw_id if rid else b"") + (raw_val if rval else b"")
        return None


def _set(si, downstream: bool, peer) -> None:
    """Stream-lifetime filter state (``istio_peer.own_filter_state``); the first value written
    wins (e.g. the TCP exchange's, on the connection's state)."""
    fs = si.filter_state
    if fs is not None and (P.DOWNSTREAM_PEER if downstream else P.UPSTREAM_PEER) in fs:
        return
    P.set_peer(P.own_filter_state(si), downstream, peer)


def factory(cfg, ctx):
    return PeerMetadataConfig(cfg, ctx)


def legacy_wasm_factory(ctx):
    """``envoy.wasm.metadata_exchange`` in a Wasm null VM: the same filter, configured as istiod
    configures peer_metadata for the enclosing listener's direction."""
    listener = getattr(ctx, "listener", None)
    inbound = bool(getattr(listener, "inbound", False))
    return PeerMetadataConfig(None, ctx, legacy_direction=inbound)
