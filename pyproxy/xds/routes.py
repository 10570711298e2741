"""RDS: route configurations by name, one ``RouteProvider`` per name that HCMs read per request.

The handler compiles every route configuration of a response before any is installed; a bad one
keeps the one in force and is named in the NACK. It also keeps the RDS subscription equal to the
names the active and warming listeners use, and dumps ``RoutesConfigDump``.
"""

from __future__ import annotations

import logging
import time

from ..config import ConfigError
from ..config.dump import to_dict
from ..xds_client import ROUTE
from .common import DEFAULT_INITIAL_FETCH_TIMEOUT, fetch_timeout, partially_applied, ts, version_hash

log = logging.getLogger("pyproxy.config")

ROUTE_CONFIG_TYPE = "envoy.config.route.v3.RouteConfiguration"


class RouteProvider:
    """The current RouteTable for one RDS name; HCMs read ``provider.table`` per request.

    ``ready`` is the provider's init target: set when its first response arrived (accepted, removed or
    rejected, as Envoy does) or its ``initial_fetch_timeout`` elapsed; listeners using it warm until then.
    """

    __slots__ = ("name", "table", "proto", "version_info", "last_updated", "stat_scopes",
                 "ready", "init_timeout", "timer", "error_state", "stats_owner")

    def __init__(self, name, init_timeout=DEFAULT_INITIAL_FETCH_TIMEOUT):
        self.name = name
        self.table = None
        self.proto = None
        self.version_info = ""
        self.last_updated = 0.0
        self.stat_scopes = {}
        self.stats_owner = None  # owns http.<prefix>.rds.<name>.*: freed once no listener uses the name
        self.ready = False
        self.init_timeout = init_timeout
        self.timer = None
        self.error_state = None

    def register_stats(self, store, stat_prefix):
        if stat_prefix not in self.stat_scopes:
            if self.stats_owner is None:
                self.stats_owner = store.new_owner(shared=True)
            s = store.owned_scope("http.%s.rds.%s." % (stat_prefix, self.name), self.stats_owner)
            s.counter("update_attempt").inc()    # the subscription's start, as Envoy counts it
            self.stat_scopes[stat_prefix] = (s.counter("update_attempt"), s.counter("update_success"),
                                             s.counter("update_rejected"), s.counter("update_empty"),
                                             s.gauge("version", accumulate=False),
                                             s.counter("config_reload"), s.counter("init_fetch_timeout"),
                                             s.counter("update_failure"))

    def release_stats(self):
        """No listener uses this route configuration any more: its stats go (as Envoy's RDS
        subscription and its scope go with the last HCM that held them)."""
        self.stat_scopes.clear()
        if self.stats_owner is not None:
            self.stats_owner.release()
            self.stats_owner = None

    def count(self, what: str, version: str = ""):
        idx = {"attempt": 0, "success": 1, "rejected": 2, "empty": 3, "timeout": 6, "failure": 7}[what]
        for st in self.stat_scopes.values():
            st[idx].inc()
            if what == "success":
                st[4].set(version_hash(version))
                st[5].inc()

    def start_timer(self, loop, on_timeout):
        if self.ready or self.timer is not None or self.init_timeout <= 0:
            return
        self.timer = loop.call_later(self.init_timeout, on_timeout, self)

    def set_ready(self):
        self.ready = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class RoutesHandler:
    """The RDS handler of an ``XdsManager``: ``providers`` maps route configuration names to their
    ``RouteProvider``."""

    type_url = ROUTE

    def __init__(self, xds):
        self.xds = xds
        self.providers: dict[str, RouteProvider] = {}

    def provider(self, rds, stat_prefix) -> RouteProvider:
        """The provider an HCM with ``rds`` reads its routes from (made on first use)."""
        name = rds.route_config_name
        if not name:
            raise ConfigError("rds.route_config_name must not be empty", field="rds")
        p = self.providers.get(name)
        if p is None:
            p = self.providers[name] = RouteProvider(name, fetch_timeout(rds.config_source))
        p.register_stats(self.xds.stats, stat_prefix)
        return p

    def pending(self) -> bool:
        """Some route configuration a listener uses has not had its first response yet."""
        for name in self.xds.warming.rds_names():
            p = self.providers.get(name)
            if p is not None and not p.ready:
                return True
        return False

    def update_subscription(self):
        xds = self.xds
        names = xds.warming.rds_names()
        c = xds.client_for_type.get(ROUTE)
        if c is not None:
            c.subscribe(ROUTE, names)
        for n, p in list(self.providers.items()):
            if n not in names:
                # no listener uses it: the provider, its table and its stats go (a draining
                # listener keeps the table it holds); the client forgets the name's version, so a
                # listener naming it again fetches it anew, as Envoy's new RDS subscription does
                p.release_stats()
                del self.providers[n]
                p.set_ready()
        for n in names:
            p = self.providers.get(n)
            if p is not None:
                p.start_timer(xds.loop, self._timed_out)

    def _timed_out(self, p: RouteProvider):
        p.timer = None
        if not p.ready:
            log.warning("xDS: initial fetch of route configuration '%s' timed out", p.name)
            p.count("timeout")
            p.set_ready()
            self.xds.warming.check_listeners()

    def on_stream_failure(self):
        for p in self.providers.values():
            p.count("attempt")
            p.count("failure")

    def apply(self, version, added, removed):
        """RDS: each good route configuration is applied; a bad one keeps the one in force. As in
        Envoy, where every RDS subscription is a watch of the rejected response, every route
        provider counts the rejection."""
        from ..routing import compile_route_config
        xds = self.xds
        providers = self.providers
        compiled, failures = {}, []
        for name, proto in added.items():
            p = providers.get(name)
            if p is not None:
                p.count("attempt")
            try:
                compiled[name] = compile_route_config(proto)
            except ConfigError as e:
                failures.append((name, e if name in e.resource else
                                 e.within(resource="RouteConfiguration '%s'" % name)))
        now = time.time()
        for name, table in compiled.items():
            p = providers.get(name)
            if p is None:
                p = providers[name] = RouteProvider(name)
            p.table = table
            p.proto = added[name]
            p.version_info = xds.resource_version(ROUTE, name, version)
            p.last_updated = now
            p.count("success", version)
            p.set_ready()
        for name in removed:
            p = providers.get(name)
            if p is not None:
                p.table = None
                p.proto = None
                p.set_ready()
        xds.clear_errors(ROUTE, list(compiled) + list(removed))
        if failures:
            for p in providers.values():
                p.count("rejected")
            for name, _ in failures:
                p = providers.get(name)
                if p is not None:
                    p.set_ready()   # as Envoy: a rejected first response ends the initial fetch
            xds.record_failures(ROUTE, ROUTE_CONFIG_TYPE, failures, added)
        xds.warming.check_listeners()
        if failures:
            raise partially_applied("Error adding/updating route configuration(s)", failures, compiled)

    def config_dump(self) -> dict:
        return routes_config_dump(self.xds.lm, self)

    def stop(self):
        for p in self.providers.values():
            if p.timer is not None:
                p.timer.cancel()


def routes_config_dump(lm, rds: RoutesHandler | None = None) -> dict:
    """Envoy's ``RoutesConfigDump``: the listeners' inline route configurations, and the RDS ones
    when there is an RDS handler."""
    out = {"@type": "type.googleapis.com/envoy.admin.v3.RoutesConfigDump"}
    static = []
    for al in lm.active.values():
        for chain in al.config.chains + ([al.config.default_chain] if al.config.default_chain else []):
            for f in chain.filter_factories:
                pr = getattr(f, "proto", None)
                if pr is not None and hasattr(pr, "route_config") and pr.HasField("route_config"):
                    body = to_dict(pr.route_config)
                    body["@type"] = "type.googleapis.com/" + ROUTE_CONFIG_TYPE
                    static.append({"route_config": body, "last_updated": ts(al.config.last_updated)})
    if static:
        out["static_route_configs"] = static
    if rds is not None:
        dyn = []
        errors = rds.xds.errors
        for p in rds.providers.values():
            if p.proto is None:
                continue
            body = to_dict(p.proto)
            body["@type"] = "type.googleapis.com/" + ROUTE_CONFIG_TYPE
            e = {"version_info": p.version_info, "route_config": body, "last_updated": ts(p.last_updated)}
            err = errors.get((ROUTE, p.name))
            if err is not None:
                e["error_state"] = err
            dyn.append(e)
        if dyn:
            out["dynamic_route_configs"] = dyn
    return out
