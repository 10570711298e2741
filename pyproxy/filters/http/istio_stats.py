"""``istio.stats`` as an HTTP filter (``stats.PluginConfig``): ``istio_requests_total``,
``istio_request_duration_milliseconds``, ``istio_request_bytes`` and ``istio_response_bytes`` per
stream, recorded when the stream ends (Envoy: the access-log phase). See
``pyproxy.filters.istio_stats_core`` for labels, overrides and bounds.

Values: the duration is the stream's lifetime in whole milliseconds; request and response bytes
are the downstream wire bytes, headers included (HTTP/1.1 header block size as decoded and as
encoded: an estimate of the wire form, exact for HTTP/1.1 without obs-folds). gRPC streams
(``content-type: application/grpc*``) get ``request_protocol="grpc"`` and the numeric gRPC status
from the trailers, else the headers, else the HTTP status mapped as Envoy maps it. With
``envoy.filters.http.grpc_stats`` (``emit_filter_state``) before it, a gRPC stream also adds its
message counts to ``istio_request_messages_total`` / ``istio_response_messages_total`` (once, at
the end of the stream; Envoy also reports long streams' deltas every ``tcp_reporting_duration``).
"""

from __future__ import annotations

from ...http.filter import CONTINUE, HttpFilter
from ..istio_peer import DOWNSTREAM_PEER_OBJ, UPSTREAM_PEER_OBJ
from .grpc_stats import FILTER_STATE_KEY as GRPC_STATS_KEY
from ..istio_stats_core import StatsConfig, fs_upstream_peer

# Envoy's Grpc::Utility::httpToGrpcStatus
_HTTP_TO_GRPC = {400: "13", 401: "16", 403: "7", 404: "12", 429: "14", 502: "14", 503: "14", 504: "14"}


def _head_bytes(h) -> int:
    n = 0
    for k, v in h:
        n += len(k) + len(v) + 4
    return n + 2


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


class IstioStatsHttpConfig(StatsConfig):
    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx, "http")

    def create(self, stream):
        return IstioStatsFilter(stream, self)


class IstioStatsFilter(HttpFilter):
    __slots__ = ("f", "grpc", "rx_head")

    def __init__(self, callbacks, f):
        self.callbacks = callbacks
        self.f = f
        self.grpc = False
        self.rx_head = 0

    def decode_headers(self, headers, end_stream):
        n = 2
        grpc = False
        for k, v in headers._h:  # one pass: the header block's size and the content type
            n += len(k) + len(v) + 4
            if k == "content-type" and v.startswith("application/grpc"):
                grpc = True
        self.rx_head = n
        self.grpc = grpc
        return CONTINUE

    def on_destroy(self):
        s = self.callbacks
        f = self.f
        si = s.stream_info
        rq = s.request_headers
        rs = s.response_headers
        rt = s.response_trailers
        fs = si.filter_state
        code = si.response_code or 0
        grpc = self.grpc
        gs = grpc_status(rs, rt, code) if grpc else ""
        rf = si.response_flags
        flags = ",".join(rf) if rf else "-"
        if f.server_side:
            peer = fs.get(DOWNSTREAM_PEER_OBJ) if fs else None
            peer_san, local_san, mtls = f.principals(s.connection, si, fs)
        else:
            peer = fs.get(UPSTREAM_PEER_OBJ) if fs else None
            peer_san, local_san, mtls = si.upstream_peer_uri_san, si.upstream_local_uri_san, None
        host = "" if f.disable_host_fallback or rq is None else (rq.get(":authority") or "")
        ep = None
        if peer is None and not f.server_side and si.upstream_host:
            ep = si.upstream_host  # the endpoint's metadata is the fallback peer
        elif f.reporter == "waypoint":
            ep = fs_upstream_peer(si)
        dyn = f.dynamic
        key = (peer, peer_san, local_san, si.route_name, si.upstream_cluster, host, grpc, code, gs, flags, ep,
               tuple(e.fn(rq, rs, si) for e in dyn) if dyn else None)
        series = f.cache.get(key)
        if series is None:
            series = f.cached(key, lambda: self._resolve(peer, peer_san, local_san, mtls, host, grpc, code,
                                                         gs, flags, ep, rq, rs, si))
        c, dur, rqb, rsb = series[:4]
        if c is not None:
            c.value += 1
        if grpc:  # message counts from envoy.filters.http.grpc_stats (emit_filter_state), at the end
            counts = (getattr(s, "filter_state", None) or {}).get(GRPC_STATS_KEY)
            if counts:
                msgs = series[5]
                if msgs is None:  # first counts for this label set: the two counters, then cached
                    msgs = f.series(list(series[4]), rq, rs, si, f.msg_shapes)
                    series = f.cache[key] = series[:5] + (msgs,)
                qm, pm = msgs
                if qm is not None:
                    qm.value += counts.get("request_message_count", 0)
                if pm is not None:
                    pm.value += counts.get("response_message_count", 0)
        end = si.end_monotonic
        if dur is not None and end is not None:
            dur.record(int((end - si.start_monotonic) * 1000))
        if rqb is not None:
            rqb.record(self.rx_head + si.bytes_received)
        if rsb is not None:
            tx = si.bytes_sent
            if rs is not None:
                tx += _head_bytes(rs._h)
            if rt is not None:
                tx += _head_bytes(rt._h)
            rsb.record(tx)

    def _resolve(self, peer, peer_san, local_san, mtls, host, grpc, code, gs, flags, ep, rq, rs, si):
        f = self.f
        if peer is None and ep is not None and not f.server_side:
            peer = f.endpoint_peer(si)
        vals = f.peer_labels(peer, peer_san, local_san, host, si)
        vals.append("grpc" if grpc else "http")
        vals.append(str(code))
        vals.append(gs)
        vals.append(flags)
        vals.append("unknown" if mtls is None else ("mutual_tls" if mtls else "none"))
        series = f.series(vals, rq, rs, si)
        # gRPC: the labels kept for the message counters, made when grpc_stats first reports counts
        return series + (tuple(vals), None) if grpc else series


def factory(cfg, ctx):
    return IstioStatsHttpConfig(cfg, ctx)
