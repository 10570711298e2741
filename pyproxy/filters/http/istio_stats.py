"""``istio.stats`` as an HTTP filter (``stats.PluginConfig``): ``istio_requests_total``,
``istio_request_duration_milliseconds``, ``istio_request_bytes`` and ``istio_response_bytes`` per
stream, recorded when the stream ends (Envoy: the access-log phase). See
``pyproxy.filters.istio_stats_core`` for labels, overrides and bounds.

The filter only observes the finished stream, so it never needs to be in the request's way: its
config is a *completion observer* (``compiled_hooks``, see ``ChainPlan`` in
``filters/network/http_connection_manager.py``). On a compiled lane the stream calls
``observe(stream)`` once when it finishes; on the filter-by-filter path the filter's
``on_destroy`` makes the same call. Either way the work is done once, at the end, from what the
stream recorded.

Values: the duration is the stream's lifetime in whole milliseconds; request and response bytes
are estimates of the downstream wire bytes, headers included: each header line counted as
``name: value\\r\\n`` (pseudo-headers as well) plus the blank line, over the request headers as
the stream forwarded them and the response headers as it sent them, plus the bodies (the byte
relay, http/h1_relay.py, which has the response head written from the upstream's, counts that
head as written). gRPC streams (``content-type: application/grpc*``) get ``request_protocol="grpc"``
and the numeric gRPC status from the trailers, else the headers, else the HTTP status mapped as
Envoy maps it. With
``envoy.filters.http.grpc_stats`` (``emit_filter_state``) before it, a gRPC stream also adds its
message counts to ``istio_request_messages_total`` / ``istio_response_messages_total`` (once, at
the end of the stream; Envoy also reports long streams' deltas every ``tcp_reporting_duration``).

Cost per request, once the label set has been seen: one key tuple, one dict lookup, one counter
increment and three histogram appends (``stats/histogram.py`` folds them into buckets in batches);
header sizes are summed in C (no per-header Python loop), and nothing else is computed unless a
configured dimension needs it. A stream that made no ``StreamInfo`` (the inline stream) is read directly
(``observe_bare``): telemetry never makes one just to be recorded.
"""

from __future__ import annotations

import time
from itertools import chain
from operator import itemgetter

from ...http.filter import HttpFilter
from ..istio_peer import DOWNSTREAM_PEER_OBJ, UPSTREAM_PEER_OBJ
from .grpc_stats import FILTER_STATE_KEY as GRPC_STATS_KEY
from ...stats import DETACHED, Counter
from ...stats.histogram import PENDING, Histogram
from ..istio_stats_core import MAX_CACHED, StatsConfig, fs_upstream_peer

# Envoy's Grpc::Utility::httpToGrpcStatus
_HTTP_TO_GRPC = {400: "13", 401: "16", 403: "7", 404: "12", 429: "14", 502: "14", 503: "14", 504: "14"}
_flat = chain.from_iterable
_first = itemgetter(0)
_join = "".join
_monotonic = time.monotonic


def _head_bytes(h) -> int:
    """``name: value\\r\\n`` per header and the blank line, summed in C."""
    return len(_join(_flat(h))) + 4 * len(h) + 2


def _is_grpc(ct) -> bool:
    return ct is not None and ct.startswith("application/grpc")


def grpc_status(rs, rt, code: int) -> str:
    for hm in (rt, rs):
        if hm is not None:
            v = hm.get("grpc-status")
            if v is not None:
                try:
                    n = int(v)
                except ValueError:
                    continue
                return str(n) if 0 <= n <= 16 else "-1"
    if code:
        return _HTTP_TO_GRPC.get(code, "2")
    return ""


class _Observer:
    """The compiled-path interface of this filter (ChainPlan): completion only."""

    __slots__ = ("on_request", "response_take", "on_response", "on_response_raw", "on_complete")

    def __init__(self, observe):
        self.on_request = None
        self.response_take = frozenset()
        self.on_response = None
        self.on_response_raw = None
        self.on_complete = observe


class IstioStatsHttpConfig(StatsConfig):
    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx, "http")
        self.host_fallback = not self.disable_host_fallback
        # a stream without a StreamInfo (one whose head the byte relay wrote, when nothing else needed one) is
        # read directly unless a dimension expression or the waypoint labels need the StreamInfo
        self.bare_ok = not self.dynamic and self.reporter != "waypoint"
        self.bare: dict = {}  # the shorter keys of such streams -> (counter, 3 histograms)
        self.compiled_hooks = _Observer(self.observe)

    def create(self, stream):
        return IstioStatsFilter(stream, self)

    def observe(self, s) -> None:
        """Record one finished stream (``s``: the stream, with ``stream_info``,
        ``request_headers``, ``response_headers``, ``response_trailers`` and ``connection``).

        A stream that relayed the response head as bytes (``http/h1_relay.py``: a bodiless
        HTTP/1.1 request, ``status`` set) and ended without response flags is read from the
        stream itself, with or without a StreamInfo (none is made for telemetry): its route,
        cluster, upstream host, status and start are the stream's, the filter state and the
        upstream principals the StreamInfo's if one was made (else the connection's, and none),
        the request head size from the head written upstream, the response head and body sizes
        as the relay counted them. Its series are cached under a shorter key (``bare``); a miss
        resolves through the StreamInfo (made then) as every other stream does."""
        d = s.__dict__
        si = d.get("stream_info")  # (made on first use by a stream that started without one)
        code = getattr(s, "status", 0)  # (set by a stream that relayed the response head as bytes)
        if code and self.bare_ok and (si is None or not si.response_flags):
            rq = s.request_headers
            h = rq._h
            # (gRPC? never when the chain plan sends gRPC requests to the generic chain: chain_is_inert)
            if s.cfg.live_on_grpc or s.route.grpc_router or "content-type" not in map(_first, h) or \
                    not _is_grpc(rq.get("content-type")):
                k, host = h[3]  # (the codecs put :authority fourth)
                if k != ":authority":
                    host = rq.get(":authority") or ""
                elif not self.host_fallback:
                    host = ""
                if si is None:
                    fs = s.hc.conn.filter_state
                    up_san = up_local_san = ""
                    end = None
                else:
                    fs = si.filter_state
                    up_san = si.upstream_peer_uri_san
                    up_local_san = si.upstream_local_uri_san
                    end = si.end_monotonic
                if self.server_side:
                    conn = s.hc.conn
                    peer_san, local_san, _ = self.principals(conn, si or conn.stream_info, fs)
                    key = (fs.get(DOWNSTREAM_PEER_OBJ) if fs else None, peer_san, local_san, s.route.name,
                           s.cluster.name, host, code)
                else:
                    up = s.host
                    key = (fs.get(UPSTREAM_PEER_OBJ) if fs else None, s.route.name, s.cluster.name, host, code,
                           up.key if up is not None else "", up_san, up_local_san)
                series = self.bare.get(key)
                if series is None:
                    series = self.bare_miss(s, key)
                c, dur, rqb, rsb = series
                c.value += 1
                # (Histogram.record, inline: append; fold when PENDING values wait)
                p = dur.pending
                p.append(int(((end or _monotonic()) - s.t0) * 1000))
                if len(p) >= PENDING:
                    dur.fold()
                # the request head as ``name: value\r\n`` lines and the blank line: from the head
                # the relay wrote upstream (h1_relay.send_request: the request line and ``host``
                # in place of the four pseudo-headers' lines, 25 bytes and the scheme fewer)
                uh = getattr(s, "up_head", None)
                p = rqb.pending
                p.append(len(uh) + 25 + len(h[1][1]) if uh is not None else len(_join(_flat(h))) + 4 * len(h) + 2)
                if len(p) >= PENDING:
                    rqb.fold()
                tx = s.tx_head
                if tx:  # (its header lines; the status counts as the :status pseudo-header does)
                    tx += 14 if code < 1000 else 11 + len(str(code))
                p = rsb.pending
                p.append(tx + s.tx_body if si is None else tx + s.tx_body + si.bytes_sent)
                if len(p) >= PENDING:
                    rsb.fold()
                return
        if si is None:
            si = s.stream_info
        if si.end_monotonic is None:
            si.end_monotonic = _monotonic()
        if code:
            si.response_code = code
        rq = s.request_headers
        fs = si.filter_state
        code = si.response_code or 0
        rf = si.response_flags
        host = ""
        grpc = False
        if rq is not None:
            h = rq._h
            if self.host_fallback:
                # (the codecs put :authority fourth)
                host = (h[3][1] if len(h) > 3 and h[3][0] == ":authority" else rq.get(":authority")) or ""
            if "content-type" in map(_first, h):  # (looked up only when present)
                grpc = (rq.get("content-type") or "").startswith("application/grpc")
        if self.server_side:
            peer = fs.get(DOWNSTREAM_PEER_OBJ) if fs else None
            peer_san, local_san, mtls = self.principals(s.connection, si, fs)
            ep = fs_upstream_peer(si) if self.reporter == "waypoint" else None
        else:
            peer = fs.get(UPSTREAM_PEER_OBJ) if fs else None
            peer_san = si.upstream_peer_uri_san
            local_san = si.upstream_local_uri_san
            mtls = None
            # (no peer: the endpoint's metadata is the fallback peer)
            ep = None if peer is not None else si.upstream_host or None
        dyn = self.dynamic
        key = (peer, peer_san, local_san, si.route_name, si.upstream_cluster, host, grpc, code,
               ",".join(rf) if rf else "-", ep, dyn and tuple([e.fn(rq, s.response_headers, si) for e in dyn]),
               grpc and grpc_status(s.response_headers, s.response_trailers, code))
        series = self.cache.get(key)
        if series is None:
            rs = s.response_headers
            series = self.miss(key, mtls, rq, rs, si)
        c, dur, rqb, rsb, labels, msgs = series
        if c is not None:
            c.value += 1
        if grpc:  # message counts from envoy.filters.http.grpc_stats (emit_filter_state), at the end
            counts = (getattr(s, "filter_state", None) or {}).get(GRPC_STATS_KEY)
            if counts:
                if msgs is None:  # first counts for this label set: the two counters, then cached
                    msgs = self.series(list(labels), rq, s.response_headers, si, self.msg_shapes)
                    self.cache[key] = series[:5] + (msgs,)
                qm, pm = msgs
                if qm is not None:
                    qm.value += counts.get("request_message_count", 0)
                if pm is not None:
                    pm.value += counts.get("response_message_count", 0)
        if dur is not None:
            end = si.end_monotonic
            if end is not None:
                dur.record(int((end - si.start_monotonic) * 1000))
        if rqb is not None:
            # the request head: ``name: value\r\n`` per header and the blank line, summed in C
            rqb.record((len(_join(_flat(h))) + 4 * len(h) + 2 if rq is not None else 2) + si.bytes_received)
        if rsb is not None:
            rs = s.response_headers
            if rs is not None:
                h = rs._h
                tx = si.bytes_sent + len(_join(_flat(h))) + 4 * len(h) + 2
                rt = s.response_trailers
                if rt is not None:
                    tx += _head_bytes(rt._h)
            else:  # the byte relay (http/h1_relay.py) wrote the head itself (or nothing was sent)
                tx = s.tx_head if hasattr(s, "tx_head") else 0
                if tx:  # (its header lines; the status counts as the :status pseudo-header does)
                    tx += 11 + len(str(code))
                tx += (s.tx_body if hasattr(s, "tx_body") else 0) + si.bytes_sent
            rsb.record(tx)

    def miss(self, key, mtls, rq, rs, si) -> tuple:
        """The series for a key ``observe`` has not seen (resolved, then cached)."""
        return self.cached(key, lambda: self._resolve(key[0], key[1], key[2], mtls, key[5], key[6], key[7],
                                                      key[11] or "", key[8], key[9], rq, rs, si))

    def bare_miss(self, s, key) -> tuple:
        """The series for a ``bare`` key not seen yet: resolved through the StreamInfo (made now)
        as ``observe`` resolves them; a dropped or overflowing metric gets a detached stand-in."""
        si = s.stream_info
        code = si.response_code = s.status
        rq = s.request_headers
        host = key[5] if self.server_side else key[3]
        if self.server_side:
            peer, peer_san, local_san = key[0], key[1], key[2]
            mtls = bool(peer_san and local_san)
            ep = None
        else:
            peer, peer_san, local_san, mtls = key[0], key[6], key[7], None
            ep = None if peer is not None else key[5] or None
        full = (peer, peer_san, local_san, si.route_name, si.upstream_cluster, host, False, code, "-", ep, (), False)
        series = self.cached(full, lambda: self._resolve(peer, peer_san, local_san, mtls, host, False, code,
                                                         "", "-", ep, rq, None, si))
        c, dur, rqb, rsb = series[:4]
        out = (c if c is not None else Counter(DETACHED), dur if dur is not None else Histogram(DETACHED),
               rqb if rqb is not None else Histogram(DETACHED), rsb if rsb is not None else Histogram(DETACHED))
        b = self.bare
        if len(b) >= MAX_CACHED:
            b.clear()
        b[key] = out
        return out

    def _resolve(self, peer, peer_san, local_san, mtls, host, grpc, code, gs, flags, ep, rq, rs, si):
        if peer is None and ep is not None and not self.server_side:
            peer = self.endpoint_peer(si)
        vals = self.peer_labels(peer, peer_san, local_san, host, si)
        vals.append("grpc" if grpc else "http")
        vals.append(str(code))
        vals.append(gs)
        vals.append(flags)
        vals.append("unknown" if mtls is None else ("mutual_tls" if mtls else "none"))
        # (gRPC: the labels are kept for the message counters, made when grpc_stats first reports)
        return self.series(vals, rq, rs, si) + (tuple(vals) if grpc else None, None)


class IstioStatsFilter(HttpFilter):
    """The filter-by-filter form: nothing per event, the record when the stream is destroyed."""

    __slots__ = ("f",)

    def __init__(self, callbacks, f):
        self.callbacks = callbacks
        self.f = f

    def on_destroy(self):
        self.f.observe(self.callbacks)


def factory(cfg, ctx):
    return IstioStatsHttpConfig(cfg, ctx)
