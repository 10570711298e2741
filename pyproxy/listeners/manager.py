"""Listener manager: binds listeners, swaps their config on update, drains them.

An update of a listener at the same address keeps the listening socket and swaps the compiled
config: new connections take the new filter chains, live ones keep the chain they started with and
are drained (HTTP gets ``connection: close``/GOAWAY, idle ones close) after ``--drain-time-s``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time

from ..config.dump import to_dict
from ..config import ConfigError
from ..stats import OwnedStats
from .connection import DownstreamConnection
from .listener import CompiledListener, _listener_stat_name
from .overload import listener_limit

log = logging.getLogger("pyproxy.config")

IP_TRANSPARENT = 19


class _Acceptor:
    """The protocol factory a listening socket's server holds; an update re-points ``listener``."""

    __slots__ = ("listener",)

    def __init__(self, listener):
        self.listener = listener

    def __call__(self):
        return DownstreamConnection(self.listener.manager, self.listener)


class ActiveListener:
    """A compiled listener plus its socket, server and live connections."""

    def __init__(self, manager, config: CompiledListener):
        self.manager = manager
        self.config = config
        self.sock = None
        self.server = None
        self.connections: set = set()
        self.draining = False
        self.graceful = False  # (a graceful /drain_listeners: see ListenerManager.drain_listeners)
        self.acceptor = None
        owner = getattr(config, "stats_owner", None) or manager.stats.new_owner(shared=True)
        config.stats_owner = owner
        s = manager.stats.owned_scope("listener.%s." % config.stat_prefix, owner)
        self.st_cx_total = s.counter("downstream_cx_total")
        self.st_cx_active = s.gauge("downstream_cx_active")
        self.st_cx_destroy = s.counter("downstream_cx_destroy")
        self.st_no_filter_chain = s.counter("no_filter_chain_match")
        self.st_listener_filter_timeout = s.counter("downstream_pre_cx_timeout")
        self.st_http_cx_total = None
        for ch in config.chains + [config.default_chain]:  # (listener.<address>.http.<prefix>.*)
            for f in ch.filter_factories if ch is not None else ():
                bind = getattr(getattr(f, "stats", None), "bind_listener", None)
                if bind is not None:
                    bind(s)
        if any(getattr(c.transport_socket, "is_tls", False) for c in config.chains + [config.default_chain] if c):
            from ..tls.socket import listener_ssl_stats
            listener_ssl_stats(config, manager.stats)  # listener.<prefix>.ssl.*, as Envoy makes them
        # overload limits (listeners/overload.py): this listener's own, and whether the global
        # one applies to it
        self.st_cx_overflow = s.counter("downstream_cx_overflow")
        self.st_global_cx_overflow = s.counter("downstream_global_cx_overflow")
        self.global_limited = not config.proto.ignore_global_conn_limit
        self.cx_limit = listener_limit(manager.runtime_bootstrap, config.name) \
            if manager.runtime_bootstrap is not None else None

    def admit(self, conn) -> bool:
        """A connection just accepted: False (and counted) when a connection limit is reached."""
        m = self.manager
        if self.global_limited and m.global_limit is not None:
            if m.global_active >= m.global_limit:
                self.st_global_cx_overflow.value += 1
                return False
        if self.cx_limit is not None and len(self.connections) >= self.cx_limit:
            self.st_cx_overflow.value += 1
            return False
        if self.global_limited:
            m.global_active += 1
            conn.global_slot = True
        return True

    def on_connection(self, conn, handed_off: bool = False) -> None:
        self.connections.add(conn)
        self.st_cx_total.value += 1
        self.st_cx_active.inc()

    def on_connection_gone(self, conn) -> None:
        if conn.closed and conn.global_slot:   # (not on a hand-off to another listener)
            conn.global_slot = False
            self.manager.global_active -= 1
        if conn in self.connections:
            self.connections.discard(conn)
            self.st_cx_active.dec()
            self.st_cx_destroy.value += 1
            if self.draining and not self.connections:
                self.manager._maybe_drained()

    def protocol_factory(self):
        return DownstreamConnection(self.manager, self)


class ListenerManager:
    def __init__(self, loop, stats, ctx_factory, *, drain_time: float = 600.0, reuse_port: bool = False):
        self.loop = loop
        self.stats = stats
        self.ctx_factory = ctx_factory  # () -> FactoryContext for compiling filters
        self.drain_time = drain_time
        self.reuse_port = reuse_port
        self.active: dict[str, ActiveListener] = {}
        self.draining_listeners: list = []
        # static listeners bound but waiting for their SDS secrets (server._warm_static_listener):
        # Envoy adds them to its active list during server init, so /listeners and /config_dump
        # show them as static listeners already
        self.warming_static: dict = {}
        self.by_address: dict = {}  # (ip, port) -> ActiveListener for bind_to_port:false lookup
        self.st_added = stats.counter("listener_manager.listener_added")
        self.st_modified = stats.counter("listener_manager.listener_modified")
        self.st_removed = stats.counter("listener_manager.listener_removed")
        self.st_create_success = stats.counter("listener_manager.listener_create_success")
        self.st_create_failure = stats.counter("listener_manager.listener_create_failure")
        self.st_total_active = stats.gauge("listener_manager.total_listeners_active", accumulate=False)
        self.st_total_draining = stats.gauge("listener_manager.total_listeners_draining", accumulate=False)
        self.st_listener_stopped = stats.counter("listener_manager.listener_stopped")
        self.st_workers_started = stats.gauge("listener_manager.workers_started", accumulate=False)
        self.workers_started = False
        self.drain_callbacks = []
        # overload (listeners/overload.py): the global downstream connection limit, the number of
        # accepted sockets counted towards it, the bootstrap whose runtime keys set listener limits
        self.global_limit: int | None = None
        self.global_active = 0
        self.runtime_bootstrap = None


    # -- compile / install ----------------------------------------------------------------------
    def build(self, proto, *, added_via_api: bool, version_info: str = "") -> CompiledListener:
        ctx = self.ctx_factory()
        owner = self.stats.new_owner(shared=True)
        if getattr(ctx, "stats", None) is self.stats:
            ctx.stats = OwnedStats(self.stats, owner)  # the stats its filters make are the listener's
        try:
            cl = CompiledListener(proto, ctx, added_via_api=added_via_api, version_info=version_info)
            cl.stats_owner = owner
            return cl
        except ConfigError as e:
            raise e.within(resource="listener '%s'" % proto.name)

    def check_bindable(self, cfg: CompiledListener) -> None:
        """Reject (before anything is applied) a listener whose address another listener owns."""
        if not cfg.bind_to_port or cfg.family != "ip":
            return
        for name, al in self.active.items():
            c = al.config
            if name != cfg.name and c.bind_to_port and c.family == "ip" and \
                    c.host == cfg.host and c.port == cfg.port and cfg.port != 0:
                raise ConfigError("error adding listener '%s': listener '%s' has duplicate address '%s'"
                                  % (cfg.name, name, cfg.address_str()))

    def install(self, cfg: CompiledListener, sock=None) -> bool:
        """Install a compiled listener (``sock``: pre-bound by ``bind_socket``, when new).

        Synchronous: accepting starts on the next loop iteration (the socket already listens).
        """
        cur = self.active.get(cfg.name)
        if cur is not None and cur.config.proto == cfg.proto:
            if sock is not None:
                sock.close()
            return False
        if sock is None and cfg.bind_to_port and cfg.family == "ip" and not self._same_socket(cur, cfg):
            sock = self.bind_socket(cfg)  # before the stats scope: port 0 becomes the bound port
        new = ActiveListener(self, cfg)
        if self._same_socket(cur, cfg):
            self._swap_server(cur, new)
            self.st_modified.inc()
            self._drain_old(cur, keep_socket=True)
        else:
            if cfg.bind_to_port and cfg.family == "ip":
                if sock is None:
                    sock = self.bind_socket(cfg)
                new.sock = sock
                self.loop.create_task(self._serve(new))
            if cur is not None:
                self.st_modified.inc()
                self._drain_old(cur, keep_socket=False)
            else:
                self.st_added.inc()
        self.active[cfg.name] = new
        self._index()
        self.st_create_success.inc()
        self.st_total_active.set(len(self.active))
        return True

    def needs_new_socket(self, cfg: CompiledListener) -> bool:
        return cfg.bind_to_port and cfg.family == "ip" and not self._same_socket(self.active.get(cfg.name), cfg)

    @staticmethod
    def _same_socket(cur, cfg) -> bool:
        return cur is not None and cur.sock is not None and cur.config.family == cfg.family and \
            cur.config.host == cfg.host and (cur.config.port == cfg.port or cfg.port == 0) and \
            cur.config.bind_to_port == cfg.bind_to_port

    async def _serve(self, al: ActiveListener) -> None:
        if al.sock is None or al.sock.fileno() < 0:
            return
        acc = al.acceptor
        if acc is None:
            acc = al.acceptor = _Acceptor(al)
        server = await self.loop.create_server(acc, sock=al.sock, backlog=1024)
        owner = acc.listener  # an update may have re-pointed the acceptor meanwhile
        owner.server = server
        if owner.draining or self.active.get(owner.config.name) is not owner:
            server.close()

    def bind_socket(self, cfg: CompiledListener):
        """A listening socket for ``cfg`` (raises ConfigError when the address can't be bound)."""
        fam = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
        sock = socket.socket(fam, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self.reuse_port and cfg.reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if fam == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY,
                                0 if cfg.proto.address.socket_address.ipv4_compat else 1)
            if cfg.proto.HasField("transparent") and cfg.proto.transparent.value:
                sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
            if cfg.proto.HasField("freebind") and cfg.proto.freebind.value:
                sock.setsockopt(socket.SOL_IP, 15, 1)  # IP_FREEBIND
            sock.bind((cfg.host, cfg.port))
            backlog = cfg.proto.tcp_backlog_size.value if cfg.proto.HasField("tcp_backlog_size") else 1024
            sock.listen(backlog)
            sock.setblocking(False)
        except OSError as e:
            sock.close()
            self.st_create_failure.inc()
            raise ConfigError("cannot bind '%s': %s" % (cfg.address_str(), e.strerror or e),
                              resource="listener '%s'" % cfg.name) from None
        if cfg.port == 0:
            cfg.port = sock.getsockname()[1]
            if not cfg.proto.stat_prefix:
                cfg.stat_prefix = _listener_stat_name(cfg)  # stats name the bound port, as Envoy's
        return sock

    def _swap_server(self, old: ActiveListener, new: ActiveListener) -> None:
        # the server keeps its acceptor; re-point the acceptor at the new listener
        new.sock = old.sock
        new.server = old.server
        acc = old.acceptor
        if acc is None:
            acc = _Acceptor(new)
        acc.listener = new
        new.acceptor = acc
        old.acceptor = None
        old.server = None
        old.sock = None

    def _drain_old(self, al: ActiveListener, keep_socket: bool) -> None:
        if not keep_socket:
            self._stop_accepting(al)
        al.draining = True
        self.draining_listeners.append(al)
        self.st_total_draining.set(len(self.draining_listeners))
        for conn in list(al.connections):
            self._drain_connection(conn)
        self.loop.call_later(self.drain_time, self._finish_drain, al)

    def health_check_failed(self) -> None:
        """Admin /healthcheck/fail: every open HTTP connection drains at its next request
        (``HttpConnection.health_check_failed``); new ones see the server's state as they open."""
        for al in list(self.active.values()) + self.draining_listeners:
            for conn in list(al.connections):
                for f in conn.filters:
                    d = getattr(f, "health_check_failed", None)
                    if d is not None:
                        d()

    @staticmethod
    def _drain_connection(conn, graceful: bool = False) -> None:
        for f in conn.filters:
            d = getattr(f, "start_drain", None)
            if d is not None:
                d(graceful)

    def _finish_drain(self, al: ActiveListener) -> None:
        for conn in list(al.connections):
            conn.close(flush=True)
        if al in self.draining_listeners:
            self.draining_listeners.remove(al)
        self.st_total_draining.set(len(self.draining_listeners))
        owner = getattr(al.config, "stats_owner", None)
        if owner is not None:  # its stats go, but those another listener also made (as Envoy)
            owner.release()

    def remove(self, name: str) -> bool:
        al = self.active.pop(name, None)
        if al is None:
            return False
        self.st_removed.inc()
        self._drain_old(al, keep_socket=False)
        self._index()
        self.st_total_active.set(len(self.active))
        return True

    def _index(self) -> None:
        idx = {}
        for al in self.active.values():
            c = al.config
            if c.family == "ip" and not c.bind_to_port:
                idx[(c.host, c.port)] = al
        self.by_address = idx

    def find_original_dst_listener(self, ip: str, port: int):
        """The ``bind_to_port: false`` listener for an original destination: exact ``IP:port``,
        then ``0.0.0.0:port``; None when there is none (the accepting listener keeps it)."""
        idx = self.by_address
        al = idx.get((ip, port))
        if al is None:
            al = idx.get(("::" if ":" in ip else "0.0.0.0", port))
            if al is None and ":" not in ip:
                al = idx.get(("::", port))
        return al

    def start_workers(self) -> None:
        self.workers_started = True
        self.st_workers_started.set(1)

    # -- drain / shutdown -------------------------------------------------------------------------
    def drain_listeners(self, inbound_only: bool = False, graceful: bool = False) -> None:
        """Envoy's /drain_listeners: stop accepting (at once, or after the drain time when graceful)."""
        targets = [al for al in self.active.values() if not inbound_only or al.config.inbound]
        for al in targets:
            al.draining = True
            al.graceful = graceful  # (connections it accepts meanwhile drain too: connection.py)
            for conn in list(al.connections):
                self._drain_connection(conn, graceful)
            if graceful:
                self.loop.call_later(self.drain_time, self._stop_listener, al)
            else:
                self._stop_listener(al)

    def _stop_listener(self, al) -> None:
        self.st_listener_stopped.value += 1  # (Envoy's stopListeners)
        self._stop_accepting(al)

    def _stop_accepting(self, al) -> None:
        if al.server is not None:
            al.server.close()
            al.server = None
        elif al.sock is not None:
            al.sock.close()
        al.sock = None

    def active_connections(self) -> int:
        n = sum(len(al.connections) for al in self.active.values())
        return n + sum(len(al.connections) for al in self.draining_listeners)

    def _maybe_drained(self):
        if self.active_connections() == 0:
            cbs, self.drain_callbacks = self.drain_callbacks, []
            for cb in cbs:
                cb()

    def close_all(self) -> None:
        for al in list(self.active.values()) + self.draining_listeners:
            self._stop_accepting(al)
            for conn in list(al.connections):
                conn.close(flush=False)

    # -- admin ----------------------------------------------------------------------------------
    def status(self) -> list:
        out = []
        for c in [al.config for al in self.active.values()] + list(self.warming_static.values()):
            out.append({"name": c.name, "local_address": c.address_str(),
                        "family": c.family, "host": c.host, "port": c.port})
        return out

    def config_dump(self) -> dict:
        from google.protobuf import json_format
        static, dynamic = [], []
        for c in [al.config for al in self.active.values()] + list(self.warming_static.values()):
            body = to_dict(c.proto)
            body["@type"] = "type.googleapis.com/envoy.config.listener.v3.Listener"
            ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(c.last_updated)) + ".000Z"
            if c.added_via_api:
                dynamic.append({"name": c.name, "active_state": {
                    "version_info": c.version_info, "listener": body, "last_updated": ts}})
            else:
                static.append({"listener": body, "last_updated": ts})
        for al in self.draining_listeners:
            c = al.config
            if c.added_via_api:
                body = to_dict(c.proto)
                body["@type"] = "type.googleapis.com/envoy.config.listener.v3.Listener"
                dynamic.append({"name": c.name, "draining_state": {"version_info": c.version_info, "listener": body}})
        out = {"@type": "type.googleapis.com/envoy.admin.v3.ListenersConfigDump"}
        if static:
            out["static_listeners"] = static
        if dynamic:
            out["dynamic_listeners"] = dynamic
        return out
