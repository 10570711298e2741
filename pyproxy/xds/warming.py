"""Warming, as Envoy's init managers do it.

An EDS cluster stays in ``cm.warming`` until its endpoints arrive or its
``eds_config.initial_fetch_timeout`` elapses; a listener stays warming (its socket bound, not
accepting) until every init target it has is ready: the RDS routes its HCMs use and the SDS secrets
its TLS chains name. CDS and LDS themselves are waited for until their first response or their
``initial_fetch_timeout``.
"""

from __future__ import annotations

import logging
import time

from .common import as_json, fetch_timeout, ts
from .routes import RouteProvider

log = logging.getLogger("pyproxy.config")

LISTENER_TYPE = "envoy.config.listener.v3.Listener"


class WarmingListener:
    """A compiled listener waiting for its routes; ``sock`` is its pre-bound socket (or None when it
    will take over the active listener's socket)."""

    __slots__ = ("cfg", "sock", "providers", "since")

    def __init__(self, cfg, sock, providers):
        self.cfg = cfg
        self.sock = sock
        self.providers = providers
        self.since = time.time()


def _chains(cfg) -> list:
    return cfg.chains + ([cfg.default_chain] if cfg.default_chain else [])


def listener_providers(cfg) -> list:
    """The RDS route providers a compiled listener's HCMs read."""
    out = []
    for chain in _chains(cfg):
        for f in chain.filter_factories:
            r = getattr(f, "routes", None)
            if isinstance(r, RouteProvider) and r not in out:
                out.append(r)
    return out


def listener_init_targets(cfg) -> list:
    """What a listener warms on: its RDS routes and the SDS secrets its TLS chains name."""
    out = listener_providers(cfg)
    for chain in _chains(cfg):
        for p in getattr(chain.transport_socket, "secret_providers", ()):
            if p not in out:
                out.append(p)
    return out


class Warming:
    """The warming manager of an ``XdsManager``: warming listeners, EDS clusters' and CDS/LDS's
    initial fetch timeouts, and ``initial_done()``."""

    def __init__(self, xds):
        self.xds = xds
        self.listeners: dict[str, WarmingListener] = {}
        self.wanted_types: set = set()     # CDS / LDS, once subscribed
        self.received: set = set()         # types whose first response came (or timed out)
        self._type_timers = []
        self._secret_hook = False
        self.st_listeners_warming = xds.stats.gauge("listener_manager.total_listeners_warming",
                                                    accumulate=False)

    # -- initial fetch ------------------------------------------------------------------------------
    def initial_done(self) -> bool:
        """CDS and LDS answered (or timed out) and nothing warms."""
        for t in self.wanted_types:
            if t not in self.received:
                return False
        if self.xds.cm.warming or self.listeners:
            return False
        return not self.xds.rds.pending()

    def want_type(self, t, config_source) -> None:
        """``t`` (CDS or LDS) is subscribed: wait for it up to its ``initial_fetch_timeout``."""
        self.wanted_types.add(t)
        timeout = fetch_timeout(config_source)
        if timeout > 0:
            self._type_timers.append(self.xds.loop.call_later(timeout, self._type_timed_out, t))

    def _type_timed_out(self, t):
        if t not in self.received:
            log.warning("xDS: initial fetch of %s timed out; continuing without it", t.rpartition(".")[2])
            self.received.add(t)
            st = self.xds.st.get(t)
            if st:
                st[6].inc()

    def watch_cluster(self, c) -> None:
        """An EDS cluster is warming: it goes on without endpoints after its initial fetch timeout."""
        t = fetch_timeout(c.proto.eds_cluster_config.eds_config)
        if t > 0:
            self.xds.loop.call_later(t, self._eds_timed_out, c)

    def _eds_timed_out(self, c):
        if self.xds.cm.warming.get(c.name) is c:
            log.warning("xDS: initial fetch of endpoints for cluster '%s' timed out", c.name)
            c.scope.counter("init_fetch_timeout").inc()
            c.initial_fetch_timed_out()

    # -- listeners ----------------------------------------------------------------------------------
    def rds_names(self) -> set:
        """The route configuration names the active and warming listeners use."""
        names = set()
        for al in self.xds.lm.active.values():
            names.update(p.name for p in listener_providers(al.config))
        for w in self.listeners.values():
            names.update(p.name for p in w.providers if isinstance(p, RouteProvider))
        return names

    def take_socket(self, cfg):
        """The listening socket for ``cfg``: None when the active listener's socket is kept, the
        socket of a warming listener of the same name at the same address, or a new bound one."""
        lm = self.xds.lm
        if not lm.needs_new_socket(cfg):
            return None
        w = self.listeners.get(cfg.name)
        if w is not None and w.sock is not None and w.cfg.family == cfg.family and \
                w.cfg.host == cfg.host and (w.cfg.port == cfg.port or cfg.port == 0) and \
                w.cfg.bind_to_port == cfg.bind_to_port:
            s, w.sock = w.sock, None
            cfg.port = w.cfg.port
            return s
        return lm.bind_socket(cfg)

    def install_or_warm(self, cfg, sock) -> None:
        """Install ``cfg`` now if its init targets are ready, else keep it warming."""
        providers = listener_init_targets(cfg)
        if all(p.ready for p in providers):
            self.xds.lm.install(cfg, sock)
            return
        self.listeners[cfg.name] = WarmingListener(cfg, sock, providers)
        if not self._secret_hook and any(not isinstance(p, RouteProvider) for p in providers):
            from ..tls.secrets import STORE
            STORE.ready_hooks.append(self.check_listeners)  # SDS secrets end warming
            self._secret_hook = True
        log.info("listener '%s' warming (waiting for %s)", cfg.name,
                 ", ".join(p.name for p in providers if not p.ready))

    def drop_listener(self, name):
        w = self.listeners.pop(name, None)
        if w is not None and w.sock is not None:
            w.sock.close()
        self.st_listeners_warming.set(len(self.listeners))

    def check_listeners(self):
        """Install every warming listener whose init targets are all ready."""
        done = [n for n, w in self.listeners.items() if all(p.ready for p in w.providers)]
        lm = self.xds.lm
        for n in done:
            w = self.listeners.pop(n)
            log.info("listener '%s' warmed; now active", n)
            lm.install(w.cfg, w.sock)
        if done:
            self.st_listeners_warming.set(len(self.listeners))
            if self.xds.server.state == 0:
                lm.start_workers()

    def dump_listeners(self, by_name: dict, dyn: list) -> None:
        """Each warming listener's ``warming_state`` in the ListenersConfigDump's dynamic_listeners."""
        for name, w in self.listeners.items():
            e = by_name.get(name)
            if e is None:
                e = by_name[name] = {"name": name}
                dyn.append(e)
            e["warming_state"] = {"version_info": w.cfg.version_info,
                                  "listener": as_json(w.cfg.proto, LISTENER_TYPE),
                                  "last_updated": ts(w.since)}

    def stop(self):
        if self._secret_hook:
            from ..tls.secrets import STORE
            if self.check_listeners in STORE.ready_hooks:
                STORE.ready_hooks.remove(self.check_listeners)
        for h in self._type_timers:
            h.cancel()
        for name in list(self.listeners):
            self.drop_listener(name)

