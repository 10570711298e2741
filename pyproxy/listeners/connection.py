"""A downstream connection: listener filters, filter-chain selection, network filters.

accept -> (original destination hand-off) -> listener filters (may peek at the first bytes)
-> filter-chain match -> network filters (read filters first to last) -> the terminal filter
(tcp_proxy or http_connection_manager) which writes back through ``write()``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import struct

from .. import writebatch
from ..writebatch import pending as _pending
from ..stream_info import StreamInfo
from .chain_match import ConnInfo, select_chain
from .matcher import NO_CHAIN

log = logging.getLogger("pyproxy.connection")

_ids = itertools.count(1)
SO_ORIGINAL_DST = 80
IP6T_SO_ORIGINAL_DST = 80

from ..http.filter import CONTINUE, STOP
MAX_INSPECT_BYTES = 64 * 1024  # listener filters see at most this much before the chain is chosen


def original_dst(sock) -> tuple[str, int] | None:
    """The pre-NAT destination of a connection redirected by iptables (conntrack), or None.

    IPv4 sockets: ``SO_ORIGINAL_DST``. IPv6 sockets: ``IP6T_SO_ORIGINAL_DST``; an IPv4 peer on a
    dual-stack socket (local address ``::ffff:a.b.c.d``) is tracked as IPv4, so the IPv4 option
    answers for it. Addresses come back as plain strings (v4-mapped ones unmapped).
    """
    try:
        if sock.family == socket.AF_INET6:
            try:
                raw = sock.getsockopt(socket.IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST, 28)
            except OSError:
                raw = None
            if raw is not None and len(raw) >= 24:
                port = struct.unpack_from("!H", raw, 2)[0]
                ip = socket.inet_ntop(socket.AF_INET6, raw[8:24])
                if ip.startswith("::ffff:") and "." in ip:
                    ip = ip[7:]
                return ip, port
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        port = struct.unpack_from("!H", raw, 2)[0]
        return socket.inet_ntoa(raw[4:8]), port
    except OSError:
        return None


class _Bytes:
    __slots__ = ("value",)

    def __init__(self):
        self.value = 0


class DownstreamConnection(asyncio.Protocol):
    __slots__ = (
        "manager", "listener", "active", "transport", "chain", "filters", "on_data_cb", "closed",
        "read_disable_count", "watermark_cbs", "info", "stream_info", "inspect_buf", "inspectors",
        "inspect_timer", "id", "write_paused", "half_closed_local", "sock", "close_cbs",
        "filter_state", "ssl", "dst_restored", "handed_off", "pending_eof", "wbuf", "write_hook", "on_tls_open",
        "global_slot", "remote_closed", "rx_ctr", "tx_ctr",
    )

    def __init__(self, manager, active_listener):
        self.manager = manager
        self.wbuf = None
        self.active = active_listener  # ActiveListener (stats, connections set)
        # bytes read and written: the network filter's counters once it takes them (the HTTP
        # connection manager's http.<prefix>.downstream_cx_rx/tx_bytes_total), else this
        # connection's own count (a listener has no such stats in Envoy)
        self.rx_ctr = _Bytes()
        self.tx_ctr = _Bytes()
        self.listener = active_listener.config
        self.transport = None
        self.chain = None
        self.filters = ()
        self.on_data_cb = None
        self.closed = False
        self.read_disable_count = 0
        self.watermark_cbs = []
        self.close_cbs = []
        self.inspect_buf = None
        self.inspectors = None
        self.inspect_timer = None
        self.id = next(_ids)
        self.write_paused = False
        self.half_closed_local = False
        self.sock = None
        self.filter_state = {}
        self.ssl = None
        self.dst_restored = False
        self.handed_off = False
        self.global_slot = False     # counted towards the global connection limit
        self.pending_eof = False
        self.remote_closed = False  # the peer closed first (FIN or reset): Envoy's RemoteClose
        # istio.metadata_exchange: ``write_hook(data)`` sees the first write (True: it took the
        # bytes); ``on_tls_open()`` runs once the TLS handshake is done
        self.write_hook = None
        self.on_tls_open = None

    # -- asyncio.Protocol ---------------------------------------------------------------------
    def connection_made(self, transport):
        self.transport = transport
        lim = self.listener.buffer_limit
        transport.set_write_buffer_limits(high=lim, low=lim // 2)
        self.sock = transport.get_extra_info("socket")
        peer = transport.get_extra_info("peername")
        local = transport.get_extra_info("sockname")
        info = self.info = ConnInfo()
        if isinstance(peer, tuple):
            info.src_ip, info.src_port = peer[0], peer[1]
            info.direct_src_ip = peer[0]
        if isinstance(local, tuple):
            info.dst_ip, info.dst_port = local[0], local[1]
        si = self.stream_info = StreamInfo(_fmt_addr(info.src_ip, info.src_port),
                                           _fmt_addr(info.dst_ip, info.dst_port), connection_id=self.id)
        si.protocol = ""
        if not self.active.admit(self):   # over a connection limit (listeners/overload.py): reset
            self.closed = True
            transport.abort()
            return
        self.active.on_connection(self)
        if self.listener.use_original_dst:
            # Envoy puts an implicit original_dst filter first on use_original_dst listeners
            self.restore_original_dst()
        self._run_listener_filters()

    def restore_original_dst(self) -> bool:
        """Make the local address the pre-NAT destination (original_dst filter); True if restored."""
        if self.dst_restored:
            return True
        sock = self.sock
        if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
            return False
        od = original_dst(sock)
        if od is None:
            return False
        info = self.info
        info.dst_ip, info.dst_port = od
        self.stream_info.downstream_local_address = _fmt_addr(*od)
        self.dst_restored = True
        return True

    def _run_listener_filters(self):
        inspectors = []
        info = self.info
        for lf in self.listener.listener_filters:
            if lf.disabled is not None and lf.disabled(info):
                continue
            r = lf.factory.on_accept(self)
            if self.closed:
                return
            if r == STOP:
                inspectors.append(lf.factory)
        if inspectors:
            self.inspectors = inspectors
            if self.inspect_buf is None:
                self.inspect_buf = b""
            t = self.listener.filters_timeout
            if t:
                self.inspect_timer = asyncio.get_running_loop().call_later(t, self._inspect_timeout)
            if self.inspect_buf or self.pending_eof:
                # bytes already read (handed off from another listener): inspect them now
                self._inspect(b"", self.pending_eof)
            return
        self._filters_done()

    def _filters_done(self):
        """Listener filters finished: hand off to the original destination's listener, or match."""
        if self.listener.use_original_dst and self.dst_restored and not self.handed_off:
            info = self.info
            target = self.manager.find_original_dst_listener(info.dst_ip, info.dst_port)
            if target is not None and target is not self.active and not target.draining:
                # the connection now belongs to the listener for its destination, which runs
                # its own listener filters (and does not hand off again)
                self.handed_off = True
                self.active.on_connection_gone(self)
                self.active = target
                self.listener = target.config
                lim = self.listener.buffer_limit
                self.transport.set_write_buffer_limits(high=lim, low=lim // 2)
                target.on_connection(self, handed_off=True)
                self._run_listener_filters()
                return
        buf, self.inspect_buf = self.inspect_buf, None
        self._select_chain()
        if buf and not self.closed:
            self.on_data_cb(buf, False)
        if self.pending_eof and not self.closed:
            self.on_data_cb(b"", True)

    def _inspect_timeout(self):
        self.inspect_timer = None
        if self.closed or self.inspectors is None:
            return
        self.active.st_listener_filter_timeout.value += 1
        if self.listener.continue_on_filters_timeout:
            self.inspectors = None
            self._filters_done()
        else:
            self.close(flush=False)

    def _inspect(self, data: bytes, eof: bool):
        buf = self.inspect_buf = self.inspect_buf + data if data else self.inspect_buf
        remaining = []
        for f in self.inspectors:
            if f.on_data(self, buf, eof) == STOP:
                remaining.append(f)
            if self.closed:
                return
        if remaining and not eof and len(buf) < MAX_INSPECT_BYTES:
            self.inspectors = remaining
            return
        if self.inspect_timer is not None:
            self.inspect_timer.cancel()
            self.inspect_timer = None
        self.inspectors = None
        if eof:
            self.pending_eof = True
        self._filters_done()

    def _select_chain(self):
        lst = self.listener
        if lst.chain_matcher is not None:
            chain = lst.chain_matcher(self.info)
        else:
            chain = select_chain(lst.chains, self.info) if lst.chains else None
        if chain is None:
            chain = lst.default_chain
        elif chain is NO_CHAIN:     # the matcher's action names a chain the listener lacks
            chain = None
        if chain is None:
            self.active.st_no_filter_chain.value += 1
            self.close(flush=False)
            return
        tls = None
        if chain.transport_socket.is_tls:
            # TLS over this connection: the layer becomes self.transport (pyproxy.tls.socket)
            try:
                tls = chain.transport_socket.wrap_downstream(self, chain)
            except ConnectionError as e:
                self.stream_info.connection_termination_details = str(e)
                self.close(flush=False)
                return
        self.chain = chain
        self.stream_info.requested_server_name = self.info.server_name
        filters = self.filters = [f.create(self) for f in chain.filter_factories]
        for f in filters:
            take = getattr(getattr(f, "stats", None), "take_connection_bytes", None)
            if take is not None:
                take(self)
        for f in filters:
            if f.on_new_connection() is STOP:
                break
        if self.closed:
            return
        if self.active.graceful:  # (accepted while its listener drains: drained too, as Envoy)
            self.manager._drain_connection(self, True)
        if len(filters) == 1:
            self.on_data_cb = filters[0].on_data
        else:
            self.on_data_cb = self._iterate_filters
        if tls is not None:
            tls.start()  # ciphertext in, decrypted bytes on to the filters

    def _iterate_filters(self, data, end_stream):
        for f in self.filters:
            if f.on_data(data, end_stream) is STOP:
                return

    def data_received(self, data):
        self.rx_ctr.value += len(data)
        wb = writebatch
        wb.depth += 1  # (writebatch.enter/leave, inlined)
        try:
            if self.inspectors is not None:
                self._inspect(data, False)
                return
            cb = self.on_data_cb
            if cb is not None:
                cb(data, False)
        finally:
            wb.depth -= 1
            if wb.pending and not wb.depth:
                wb.flush()

    def eof_received(self):
        if not self.closed:
            self.remote_closed = True
        if self.inspectors is not None:
            self._inspect(b"", True)
        elif self.on_data_cb is not None:
            self.on_data_cb(b"", True)
        return not self.closed

    def connection_lost(self, exc):
        if not self.closed:
            self.remote_closed = True
        self.closed = True
        if self.inspect_timer is not None:
            self.inspect_timer.cancel()
            self.inspect_timer = None
        self.active.on_connection_gone(self)
        for f in self.filters:
            try:
                f.on_close(exc)
            except Exception:  # one filter's bug must not leak the others
                log.exception("filter on_close failed")
        cbs, self.close_cbs = self.close_cbs, []
        for cb in cbs:
            cb()

    def pause_writing(self):
        self.write_paused = True
        for cb in self.watermark_cbs:
            cb.on_above_write_buffer_high_watermark()

    def resume_writing(self):
        self.write_paused = False
        for cb in self.watermark_cbs:
            cb.on_below_write_buffer_low_watermark()

    # -- API for filters ----------------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        """Queue bytes; everything written in one loop iteration goes out in one send."""
        buf = self.wbuf
        if buf is not None:  # a later write of this dispatch (a closed connection's are dropped by flush)
            buf.append(data)
            return
        if self.closed:
            return
        hook = self.write_hook  # (set before the connection's first write only, so never with a wbuf)
        if hook is not None:
            self.write_hook = None
            if hook(data):
                return
            buf = self.wbuf  # (the hook may have written first)
            if buf is not None:
                buf.append(data)
                return
        self.wbuf = [data]
        _pending.append(self)  # (writebatch.queue, inlined)
        if not writebatch.depth:
            writebatch.flush()

    def flush(self) -> None:
        buf = self.wbuf
        if buf is not None:
            self.wbuf = None
            if not self.closed:
                data = b"".join(buf)  # (one bytes object: itself, no copy)
                self.tx_ctr.value += len(data)
                self.transport.write(data)

    def write_eof(self) -> None:
        self.flush()
        if not self.closed and not self.half_closed_local:
            self.half_closed_local = True
            try:
                self.transport.write_eof()
            except (OSError, RuntimeError):
                self.close(flush=False)

    def close(self, flush: bool = True) -> None:
        if self.closed:
            return
        if flush:
            self.flush()
        self.closed = True
        t = self.transport
        if t is None:
            return
        if flush:
            t.close()
        else:
            t.abort()

    def read_disable(self, disable: bool) -> None:
        """Reference-counted: reading resumes when every disabler has enabled again."""
        if disable:
            self.read_disable_count += 1
            if self.read_disable_count == 1 and not self.closed:
                self.transport.pause_reading()
        else:
            if self.read_disable_count == 0:
                return
            self.read_disable_count -= 1
            if self.read_disable_count == 0 and not self.closed:
                self.transport.resume_reading()

    def add_watermark_callbacks(self, cb) -> None:
        self.watermark_cbs.append(cb)

    def remove_watermark_callbacks(self, cb) -> None:
        try:
            self.watermark_cbs.remove(cb)
        except ValueError:
            pass

    @property
    def remote_address(self) -> str:
        return self.stream_info.downstream_remote_address

    @property
    def local_address(self) -> str:
        return self.stream_info.downstream_local_address


def _fmt_addr(ip: str, port: int) -> str:
    if ":" in ip:
        return "[%s]:%d" % (ip, port)
    return "%s:%d" % (ip, port)
