"""The xDS manager: the ADS client's handler, dispatching each response to the handler of its type
URL (``cds``, ``eds``, ``lds``, ``rds``, ``sds``: SDS over ADS).

Every update is compiled and validated *as a whole* before anything changes (a bad resource NACKs
the update and the last good config stays), then installed, and forwarded to the worker processes.
The manager keeps what the handlers share: the clients per type, Envoy's per-type update stats,
the accepted version per type and the error state per rejected resource; warming is
``warming.Warming``'s. Each handler dumps its own part of /config_dump (``config_dumps``).
"""

from __future__ import annotations

import logging
import time

from ..xds_client import CLUSTER, LISTENER, PartiallyApplied, XdsClient
from ..config import ConfigError
from .clusters import ClustersHandler
from .common import as_json, now_ts, partially_applied, version_hash
from .endpoints import EndpointsHandler, endpoints_config_dump
from .listeners import ListenersHandler
from .routes import RouteProvider, RoutesHandler
from .secrets import SecretsHandler
from .warming import Warming

log = logging.getLogger("pyproxy.config")


class XdsManager:
    """Handler for the ADS client(s); see the module docstring."""

    def __init__(self, server):
        self.server = server
        self.loop = server.loop
        self.cm = server.cluster_manager
        self.lm = server.listener_manager
        self.stats = s = server.stats
        self.clients: list[XdsClient] = []
        self.client_for_type: dict = {}
        self.type_version: dict = {}       # type URL -> last accepted version_info
        self.errors: dict = {}             # (type URL, name) -> Envoy's UpdateFailureState as JSON
        self.connected = False
        self.st = {}
        for t, prefix in ((CLUSTER, "cluster_manager.cds."), (LISTENER, "listener_manager.lds.")):
            sc = s.scope(prefix)
            self.st[t] = (sc.counter("update_attempt"), sc.counter("update_success"),
                          sc.counter("update_rejected"), sc.counter("update_empty"),
                          sc.gauge("version", accumulate=False), sc.counter("update_failure"),
                          sc.counter("init_fetch_timeout"))
        self.st_duration = {t: (s.histogram(prefix + "update_duration"),
                                s.gauge(prefix + "update_time", accumulate=False))
                            for t, prefix in ((CLUSTER, "cluster_manager.cds."),
                                              (LISTENER, "listener_manager.lds."))}
        self.apply_seconds: dict = {}      # type URL -> seconds the latest response took to apply
        self.warming = Warming(self)
        self.cds = ClustersHandler(self)
        self.eds = EndpointsHandler(self)
        self.lds = ListenersHandler(self)
        self.rds = RoutesHandler(self)
        self.sds = SecretsHandler(self)
        self.handlers = {h.type_url: h for h in (self.cds, self.eds, self.lds, self.rds, self.sds)}

    @property
    def routes(self) -> dict:
        """RDS route providers by route configuration name."""
        return self.rds.providers

    # -- wiring -------------------------------------------------------------------------------------
    def route_provider(self, rds, stat_prefix) -> RouteProvider:
        return self.rds.provider(rds, stat_prefix)

    def initial_done(self) -> bool:
        return self.warming.initial_done()

    def resource_version(self, type_url, name, version) -> str:
        """The version config_dump shows for one resource: delta's per-resource version (as Envoy
        shows it), else the response's version_info."""
        c = self.client_for_type.get(type_url)
        rv = getattr(c, "response_versions", None) if c is not None and c.delta else None
        return (rv or {}).get(name) or version

    def record_failures(self, type_url, type_name, failures: list, added: dict) -> None:
        """Envoy's error_state (config_dump) for each rejected resource."""
        ts = now_ts()
        for name, err in failures:
            self.errors[(type_url, name)] = {
                "failed_configuration": as_json(added[name], type_name) if name in added else {},
                "last_update_attempt": ts, "details": str(err)}

    def end_update(self, type_url, type_name, version, added, removed, failures, applied,
                   header: str, sep: str = ", ", end: str = "") -> None:
        """The end of a CDS or LDS update: Envoy's update stats, and with failures the error states
        and the NACK (a rejected first response still ends the type's initial fetch)."""
        st = self.st[type_url]
        if failures:
            st[2].inc()
            self.warming.received.add(type_url)
            self.record_failures(type_url, type_name, failures, added)
            raise partially_applied(header, failures, applied, sep=sep, end=end)
        if not added and not removed:
            st[3].inc()
        st[1].inc()
        st[4].set(version_hash(version))

    def clear_errors(self, type_url, names):
        errors = self.errors
        if not errors:
            return
        for n in names:
            errors.pop((type_url, n), None)

    # -- XdsHandler ---------------------------------------------------------------------------------
    def on_connection_state(self, connected: bool) -> None:
        self.connected = connected
        log.info("xDS stream %s", "connected" if connected else "disconnected")

    def on_stream_failure(self) -> None:
        """The ADS stream ended or could not be opened: as Envoy, every subscription counts an
        update attempt that failed (``update_failure``): CDS, LDS, each RDS route and EDS cluster."""
        for t in self.warming.wanted_types:
            st = self.st.get(t)
            if st is not None:
                st[0].inc()
                st[5].inc()
        self.rds.on_stream_failure()
        self.eds.on_stream_failure()

    def on_resources(self, type_url, version_info, added, removed, sotw):
        t0 = time.perf_counter()
        try:
            self._on_resources(type_url, version_info, added, removed)
        finally:
            # Envoy's update_duration (ms) and update_time (ms since the epoch) of CDS and LDS
            dt = time.perf_counter() - t0
            self.apply_seconds[type_url] = dt
            h = self.st_duration.get(type_url)
            if h is not None:
                h[0].record(dt * 1000.0)
                h[1].set(int(time.time() * 1000))
            (log.info if dt >= 0.5 else log.debug)(
                "xDS: %s: %d resource(s) applied, %d removed in %.3f s",
                type_url.rpartition(".")[2], len(added), len(removed), dt)

    def _on_resources(self, type_url, version_info, added, removed):
        handler = self.handlers.get(type_url)
        if handler is None:
            raise ConfigError("resource type '%s' is not supported" % type_url)
        received = self.warming.received
        try:
            handler.apply(version_info, added, removed)
        except PartiallyApplied as e:
            # the good resources are in force: the workers take exactly those
            received.add(type_url)
            self._forward(type_url, version_info, {n: added[n] for n in e.applied if n in added}, removed)
            raise
        received.add(type_url)
        self.type_version[type_url] = version_info
        self._forward(type_url, version_info, added, removed)

    def _forward(self, type_url, version_info, added, removed):
        workers = self.server.workers
        if workers is not None:
            workers.forward(type_url, version_info, added, removed)

    # -- /config_dump ---------------------------------------------------------------------------------
    def config_dumps(self, include_eds: bool = False) -> list:
        """The clusters, listeners, routes (and endpoints) sections of /config_dump, each dumped by
        its handler from its manager's state and the xDS state it keeps."""
        out = [self.cds.config_dump(), self.lds.config_dump(), self.rds.config_dump()]
        if include_eds:
            out.append(endpoints_config_dump(self.cm))
        return out

    # -- lifecycle ----------------------------------------------------------------------------------
    async def stop(self):
        self.warming.stop()
        self.rds.stop()
        for c in self.clients:
            await c.stop()
