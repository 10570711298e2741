"""``istio.stats`` as a network filter (``stats.PluginConfig`` before ``tcp_proxy``): the TCP
metrics ``istio_tcp_connections_opened_total``, ``istio_tcp_connections_closed_total``,
``istio_tcp_sent_bytes_total`` and ``istio_tcp_received_bytes_total``.

As in istio_stats.cc: "opened" is counted once, when the peer is known (``*_peer_obj`` or
``peer_not_found`` in the connection's filter state, checked every ``tcp_reporting_duration``,
default 5 s) or at close; the byte counters move by deltas of the downstream bytes at each such
report and at close; "closed" at close. Labels: see ``pyproxy.filters.istio_stats_core``
(``request_protocol="tcp"``). One timer per connection, cancelled at close.
"""

from __future__ import annotations

from .. import istio_peer as P
from ..istio_stats_core import StatsConfig, peer_from

from ...http.filter import CONTINUE


class IstioStatsTcpConfig(StatsConfig):
    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx, "tcp")
        self.loop = ctx.loop

    def create(self, conn):
        return IstioStatsTcpFilter(conn, self)


class IstioStatsTcpFilter:
    __slots__ = ("conn", "f", "timer", "series", "sent", "received")

    def __init__(self, conn, f):
        self.conn = conn
        self.f = f
        self.timer = None
        self.series = None
        self.sent = 0
        self.received = 0

    def on_new_connection(self):
        f = self.f
        if f.tcp_interval:
            self.timer = f.loop.call_later(f.tcp_interval, self._tick)
        return CONTINUE

    def on_data(self, data, end_stream):
        return CONTINUE

    def _peer_known(self) -> bool:
        fs = self.conn.filter_state
        key = P.DOWNSTREAM_PEER_OBJ if self.f.server_side else P.UPSTREAM_PEER_OBJ
        return key in fs or P.NO_PEER in fs

    def _tick(self):
        self.timer = None
        if self.conn.closed:
            return
        self._report(False)
        self.timer = self.f.loop.call_later(self.f.tcp_interval, self._tick)

    def on_close(self, exc):
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self._report(True)

    def _report(self, end: bool) -> None:
        f = self.f
        conn = self.conn
        si = conn.stream_info
        if self.series is None:
            if not (end or self._peer_known()):
                return
            fs = conn.filter_state
            peer = peer_from(fs, f.server_side)
            peer_san, local_san, mtls = f.principals(conn, si, fs)
            flags = si.flags_string()
            ep = si.upstream_host if peer is None and not f.server_side else None
            key = (peer, peer_san, local_san, si.upstream_cluster, flags, ep)
            self.series = f.cached(key, lambda: self._resolve(peer, peer_san, local_san, mtls, flags, ep, si))
            opened = self.series[0]
            if opened is not None:
                opened.value += 1
        _, closed, sent, received = self.series
        tx, rx = si.bytes_sent, si.bytes_received
        if sent is not None and tx > self.sent:
            sent.value += tx - self.sent
        if received is not None and rx > self.received:
            received.value += rx - self.received
        self.sent, self.received = tx, rx
        if end and closed is not None:
            closed.value += 1

    def _resolve(self, peer, peer_san, local_san, mtls, flags, ep, si):
        f = self.f
        if peer is None and ep is not None:
            peer = f.endpoint_peer(si)
        vals = f.peer_labels(peer, peer_san, local_san, "", si)
        vals.append("tcp")
        vals.append(flags)
        vals.append("unknown" if mtls is None else ("mutual_tls" if mtls else "none"))
        return f.series(vals, None, None, si)


def factory(cfg, ctx, terminal=False):
    return IstioStatsTcpConfig(cfg, ctx)
