"""``envoy.filters.network.tcp_proxy``: a byte-exact pipe to an upstream cluster.

Half-close is forwarded both ways (the connection ends when both directions have ended), and each
direction is flow-controlled: when one side's write buffer passes its high watermark, reading from
the other side pauses until it drains.
"""

from __future__ import annotations

import asyncio
import logging
import random

from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2  # noqa: F401

from ... import writebatch
from ...cluster.lb import LbContext
from ...cluster.outlier import CONNECT_SUCCESS_FINAL
from ...cluster.pool import connect_error, open_socket
from ...config import ConfigError, duration_s, u32, unacted
from ...listeners.connection import CONTINUE, STOP
from ...routing.hashing import xxh64_str
from ...transport import connect_upstream

log = logging.getLogger("pyproxy.filter")


class TcpProxyConfig:
    def __init__(self, cfg, ctx):
        self.ctx = ctx
        self.cm = ctx.cluster_manager
        self.loop = ctx.loop
        if not cfg.stat_prefix:
            raise ConfigError("stat_prefix must not be empty", field="stat_prefix")
        unacted.warn("tcp_proxy", cfg, cfg.stat_prefix)
        which = cfg.WhichOneof("cluster_specifier")
        if which == "cluster":
            self.clusters = ((cfg.cluster, 1),)
        elif which == "weighted_clusters":
            self.clusters = tuple((c.name, c.weight) for c in cfg.weighted_clusters.clusters)
            if not self.clusters or sum(w for _, w in self.clusters) == 0:
                raise ConfigError("weighted_clusters must have a positive total weight", field="weighted_clusters")
        else:
            raise ConfigError("tcp_proxy needs cluster or weighted_clusters", field="cluster_specifier")
        self.total_weight = sum(w for _, w in self.clusters)
        self.idle_timeout = duration_s(cfg, "idle_timeout", 3600.0)
        # (Istio: DestinationRule connectionPool.tcp.maxConnectionDuration; 0 or unset: none)
        self.max_duration = duration_s(cfg, "max_downstream_connection_duration", 0.0)
        self.hash_policy = _hash_policy(cfg)  # (Istio: loadBalancer.consistentHash.useSourceIp)
        self.max_connect_attempts = u32(cfg, "max_connect_attempts", 1) or 1
        s = ctx.stats.scope("tcp.%s." % cfg.stat_prefix)
        self.st_cx_total = s.counter("downstream_cx_total")
        self.st_cx_no_route = s.counter("downstream_cx_no_route")
        self.st_rx = s.counter("downstream_cx_rx_bytes_total")
        self.st_tx = s.counter("downstream_cx_tx_bytes_total")
        self.st_idle_timeout = s.counter("idle_timeout")
        self.st_max_duration = s.counter("max_downstream_connection_duration")
        self.st_flush = s.counter("upstream_flush_total")
        self.st_paused = s.counter("downstream_flow_control_paused_reading_total")
        self.st_resumed = s.counter("downstream_flow_control_resumed_reading_total")
        self.access_logs = []
        if cfg.access_log:
            from ...access_log import build_access_logs
            self.access_logs = build_access_logs(cfg.access_log)

    def pick_cluster(self) -> str:
        if len(self.clusters) == 1:
            return self.clusters[0][0]
        r = random.randrange(self.total_weight)
        for name, w in self.clusters:
            if r < w:
                return name
            r -= w
        return self.clusters[-1][0]

    def create(self, conn):
        return TcpProxy(self, conn)


def factory(cfg, ctx, terminal=True):
    if not terminal:
        raise ConfigError("tcp_proxy must be the last network filter")
    return TcpProxyConfig(cfg, ctx)


class _Upstream(asyncio.Protocol):
    __slots__ = ("proxy", "transport", "closed", "rx_hook")

    def __init__(self, proxy):
        self.proxy = proxy
        self.transport = None
        self.closed = False
        self.rx_hook = None  # a cluster's upstream filter reading the head of the bytes (metadata exchange)

    def connection_made(self, transport):
        self.transport = transport
        lim = self.proxy.conn.listener.buffer_limit
        transport.set_write_buffer_limits(high=lim, low=lim // 2)

    def data_received(self, data):
        writebatch.enter()
        try:
            hook = self.rx_hook
            if hook is not None:
                data = hook.feed(data)
                if not data:
                    return
            self.proxy.on_upstream_data(data)
        finally:
            writebatch.leave()

    def eof_received(self):
        hook = self.rx_hook
        if hook is not None:
            rest = hook.eof()
            if rest:
                self.proxy.on_upstream_data(rest)
        self.proxy.on_upstream_eof()
        return True

    def connection_lost(self, exc):
        self.closed = True
        self.proxy.on_upstream_closed()

    def pause_writing(self):
        self.proxy.conn.read_disable(True)

    def resume_writing(self):
        self.proxy.conn.read_disable(False)


def _hash_policy(cfg):
    """The tcp_proxy's ``hash_policy`` (at most one, as Envoy's validation says): ``("source_ip",)``
    or ``("filter_state", key)``, or None."""
    if not cfg.hash_policy:
        return None
    if len(cfg.hash_policy) > 1:
        raise ConfigError("at most one hash_policy", field="hash_policy")
    hp = cfg.hash_policy[0]
    which = hp.WhichOneof("policy_specifier")
    if which == "source_ip":
        return ("source_ip",)
    if which == "filter_state":
        return ("filter_state", hp.filter_state.key)
    raise ConfigError("hash_policy needs source_ip or filter_state", field="hash_policy[0]")


def _hash_key(policy, conn):
    """Envoy's ``Network::HashPolicy``: the xxHash64 of the downstream address's IP, or of the
    filter state object's value; None when there is nothing to hash."""
    if policy[0] == "source_ip":
        ip = conn.info.src_ip
        return xxh64_str(ip) if ip else None
    fs = conn.stream_info.filter_state
    obj = fs.get(policy[1]) if fs else None
    if obj is None:
        return None
    h = getattr(obj, "hash", None)
    if callable(h):
        return h()
    return xxh64_str(obj if isinstance(obj, str) else str(obj))


class TcpProxy:
    __slots__ = ("cfg", "conn", "up", "buf", "buf_len", "down_eof", "up_eof", "up_first", "cluster", "host",
                 "idle_handle", "last_activity", "closed", "attempts", "task", "connected", "duration_handle")

    def __init__(self, cfg: TcpProxyConfig, conn):
        self.cfg = cfg
        self.conn = conn
        self.up = None
        self.buf = []
        self.buf_len = 0
        self.down_eof = False
        self.up_eof = False
        self.up_first = False  # (the upstream ended the connection before the client did)
        self.cluster = None
        self.host = None
        self.idle_handle = None
        self.closed = False
        self.attempts = 0
        self.task = None
        self.connected = False
        self.duration_handle = None

    # -- network filter API -----------------------------------------------------------------------
    def on_new_connection(self):
        cfg = self.cfg
        cfg.st_cx_total.value += 1
        conn = self.conn
        conn.add_watermark_callbacks(self)
        name = cfg.pick_cluster()
        cluster = cfg.cm.get(name)
        si = conn.stream_info
        if cluster is None:
            cfg.st_cx_no_route.value += 1
            si.response_flags.add("NC")  # (Envoy: no such cluster; the log's cluster stays "-")
            self._finish(flush=False)
            return STOP
        si.upstream_cluster = name
        self.cluster = cluster
        self._connect()
        if cfg.idle_timeout:
            self.idle_handle = cfg.loop.call_later(cfg.idle_timeout, self._idle_check)
        if cfg.max_duration:
            self.duration_handle = cfg.loop.call_later(cfg.max_duration, self._max_duration)
        self.last_activity = cfg.loop.time()
        return STOP

    def _choose_host(self):
        c = self.cluster
        if c.original_dst:
            info = self.conn.info
            return c.original_dst_host(info.dst_ip, info.dst_port)
        hp = self.cfg.hash_policy
        return c.choose_host(_TCP_LB_CTX if hp is None else LbContext(_hash_key(hp, self.conn)))

    def _connect(self):
        c = self.cluster
        host = self._choose_host()
        si = self.conn.stream_info
        if host is None:
            c.st_cx_none_healthy.value += 1
            si.response_flags.add("UH")
            self._finish(flush=False)
            return
        if c.cx_total_active >= c.max_connections:
            c.st_cx_overflow.value += 1
            si.response_flags.add("UO")
            self._finish(flush=False)
            return
        self.host = host
        si.upstream_host = host.key
        self.attempts += 1
        c.cx_total_active += 1
        c.st_cx_total.value += 1
        c.st_rq_total.value += 1  # (each connection is a request of the cluster, as Envoy counts it)
        c.st_rq_pending_total.value += 1
        c.st_cx_active.inc()
        host.cx_active += 1
        host.cx_total += 1
        self.task = self.cfg.loop.create_task(self._do_connect(host))

    async def _do_connect(self, host):
        c = self.cluster
        loop = self.cfg.loop
        up = _Upstream(self)
        source = c.source_address
        try:
            sock = await open_socket(loop, host, c.connect_timeout, source, c.tcp_keepalive)
            await connect_upstream(loop, c.transport_for(host), sock, up, c)
        except (OSError, asyncio.TimeoutError) as e:
            self.task = None
            c.cx_total_active -= 1
            c.st_cx_active.dec()
            host.cx_active -= 1
            c.st_cx_connect_fail.value += 1
            host.cx_connect_fail += 1
            if isinstance(e, asyncio.TimeoutError):
                c.st_cx_connect_timeout.value += 1
            c.report_connect_failure(host)  # (outlier detection, as Envoy's tcp_proxy)
            if self.closed:
                return
            if self.attempts < self.cfg.max_connect_attempts:
                self._connect()
                return
            si = self.conn.stream_info
            si.response_flags.add("UF")
            si.response_flags.add("URX")  # (Envoy: the connect attempts are used up)
            c.scope.counter("upstream_cx_connect_attempts_exceeded").value += 1  # (the cluster's, as Envoy's)
            # (Envoy's words; a timeout names none)
            si.upstream_transport_failure_reason = "" if isinstance(e, asyncio.TimeoutError) else (
                "delayed connect error: %s" % connect_error(e))
            self._finish(flush=False)
            return
        self.task = None
        if host.outlier is not None:
            host.outlier.put_result(CONNECT_SUCCESS_FINAL)
        if self.closed:
            up.transport.abort()
            return
        self.up = up
        self.connected = True
        tls = getattr(up.transport, "tls", None)
        if tls is not None:  # upstream TLS: who we talk to, as whom (istio.stats principals)
            si = self.conn.stream_info
            si.upstream_peer_uri_san = getattr(up.transport, "peer_uri_san", "") or ""
            si.upstream_local_uri_san = getattr(tls, "local_uri_san", "") or ""
            si.upstream_ssl = up.transport
        for uf in c.upstream_filters:  # the cluster's upstream network filters (Istio: metadata exchange)
            uf.attach(self.conn, up)
        try:
            la = up.transport.get_extra_info("sockname")
            self.conn.stream_info.upstream_local_address = "%s:%d" % la[:2]
        except Exception:
            pass
        if self.buf:
            data = b"".join(self.buf)
            self.buf = []
            self.buf_len = 0
            up.transport.write(data)
            c.st_cx_tx_bytes.value += len(data)
            if self.conn.read_disable_count:
                self.conn.read_disable(False)
        if self.down_eof:
            self._upstream_write_eof()

    def on_data(self, data, end_stream):
        if data:
            self.cfg.st_rx.value += len(data)
            self.conn.stream_info.bytes_received += len(data)
            self.last_activity = self.cfg.loop.time()
            up = self.up
            if up is not None and not up.closed:
                up.transport.write(data)
                self.cluster.st_cx_tx_bytes.value += len(data)
            else:
                self.buf.append(data)
                self.buf_len += len(data)
                if self.buf_len > self.conn.listener.buffer_limit and self.conn.read_disable_count == 0:
                    self.conn.read_disable(True)
        if end_stream:
            self.down_eof = True
            if self.up is not None:
                self._upstream_write_eof()
        return STOP

    def _upstream_write_eof(self):
        up = self.up
        if up is not None and not up.closed:
            try:
                up.transport.write_eof()
            except (OSError, RuntimeError):
                pass
        if self.up_eof:
            self._finish(flush=True)

    def on_close(self, exc):
        self.closed = True
        self._cleanup()
        up = self.up
        if up is not None and not up.closed:
            if exc is None:
                up.transport.close()  # flush what the client sent before it left
            else:
                up.transport.abort()
        self._log()

    # -- upstream events ----------------------------------------------------------------------------
    def on_upstream_data(self, data):
        n = len(data)
        self.cfg.st_tx.value += n
        self.cluster.st_cx_rx_bytes.value += n
        self.conn.stream_info.bytes_sent += n
        self.last_activity = self.cfg.loop.time()
        self.conn.write(data)

    def on_upstream_eof(self):
        self.up_eof = True
        self.up_first = not (self.down_eof or self.closed)
        self.conn.write_eof()
        if self.down_eof:
            self._finish(flush=True)

    def on_upstream_closed(self):
        c = self.cluster
        c.cx_total_active -= 1
        c.st_cx_active.dec()
        # (remote: the upstream ended it, by EOF or reset, before the client did)
        c.count_cx_destroy(self.up_first if self.up_eof else not (self.closed or self.down_eof), True)
        if self.host is not None:
            self.host.cx_active -= 1
        if not self.closed:
            self._finish(flush=True)

    # -- watermarks from the downstream connection --------------------------------------------------
    def on_above_write_buffer_high_watermark(self):
        up = self.up
        if up is not None and not up.closed:
            self.cfg.st_paused.value += 1
            up.transport.pause_reading()

    def on_below_write_buffer_low_watermark(self):
        up = self.up
        if up is not None and not up.closed:
            self.cfg.st_resumed.value += 1
            up.transport.resume_reading()

    # -- timers / teardown --------------------------------------------------------------------------
    def _idle_check(self):
        self.idle_handle = None
        if self.closed:
            return
        loop = self.cfg.loop
        idle_for = loop.time() - self.last_activity
        if idle_for >= self.cfg.idle_timeout:
            self.cfg.st_idle_timeout.value += 1
            self._finish(flush=True)
        else:
            self.idle_handle = loop.call_later(self.cfg.idle_timeout - idle_for, self._idle_check)

    def _max_duration(self):
        """``max_downstream_connection_duration`` passed: the connection closes (flag DT)."""
        self.duration_handle = None
        if self.closed:
            return
        self.cfg.st_max_duration.value += 1
        self.conn.stream_info.response_flags.add("DT")
        self._finish(flush=False)

    def start_drain(self, graceful: bool = False):
        pass  # TCP connections are not interrupted by a drain; they close when the drain ends

    def _cleanup(self):
        if self.idle_handle is not None:
            self.idle_handle.cancel()
            self.idle_handle = None
        if self.duration_handle is not None:
            self.duration_handle.cancel()
            self.duration_handle = None
        if self.task is not None:
            self.task.cancel()
            self.task = None

    def _finish(self, flush: bool):
        if self.closed:
            return
        self._cleanup()
        up = self.up
        if up is not None and not up.closed:
            if flush:
                up.transport.close()
            else:
                up.transport.abort()
        self.conn.close(flush=flush)

    def _log(self):
        if self.cfg.access_logs:
            si = self.conn.stream_info
            import time as _t
            si.end_monotonic = _t.monotonic()
            for al in self.cfg.access_logs:
                al.log(si, None, None, None)


_TCP_LB_CTX = LbContext()
