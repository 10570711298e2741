"""LDS: listeners added, updated and removed, as Envoy's listener manager does it.

Every good listener of a response is added or updated and the missing ones removed; a bad one (does
not compile, or its address cannot be had) keeps the listener of that name in force (or is not
added), and the NACK names each. A listener whose init targets are not ready warms first
(``warming.Warming``). The handler dumps the ListenersConfigDump with its dynamic state (version,
warming and error states).
"""

from __future__ import annotations

from ..config import ConfigError
from ..xds_client import LISTENER
from .common import ordered
from .warming import LISTENER_TYPE


class ListenersHandler:
    type_url = LISTENER

    def __init__(self, xds):
        self.xds = xds

    def apply(self, version, added, removed):
        xds = self.xds
        warming = xds.warming
        xds.st[LISTENER][0].inc()
        lm = xds.lm
        ready, failures = [], []
        for name, proto in added.items():
            try:
                cfg = lm.build(proto, added_via_api=True,
                               version_info=xds.resource_version(LISTENER, name, version))
                lm.check_bindable(cfg)
                cur = lm.active.get(name)
                w = warming.listeners.get(name)
                if (cur is not None and cur.config.proto == cfg.proto and w is None) or \
                        (w is not None and w.cfg.proto == cfg.proto):
                    sock = None            # unchanged: left alone
                else:
                    sock = warming.take_socket(cfg)
            except ConfigError as e:
                failures.append((name, e))
                continue
            ready.append((cfg, sock))
        for cfg, s in ready:
            cur = lm.active.get(cfg.name)
            w = warming.listeners.get(cfg.name)
            if cur is not None and cur.config.proto == cfg.proto:
                if w is not None:          # an update back to what is active: stop warming the other
                    warming.drop_listener(cfg.name)
                continue
            if w is not None and w.cfg.proto == cfg.proto:
                continue
            if w is not None:
                warming.drop_listener(cfg.name)
            warming.install_or_warm(cfg, s)
        for name in removed:
            if name in warming.listeners:
                warming.drop_listener(name)
            al = lm.active.get(name)
            if al is not None and al.config.added_via_api:
                lm.remove(name)
        applied = [cfg.name for cfg, _ in ready]
        # as Envoy's listener manager: the error states are those of the latest LDS update alone
        for key in [k for k in xds.errors if k[0] == LISTENER]:
            del xds.errors[key]
        warming.st_listeners_warming.set(len(warming.listeners))
        if xds.server.state == 0:
            lm.start_workers()
        xds.rds.update_subscription()   # also forgets providers only the rejected listeners made
        xds.end_update(LISTENER, LISTENER_TYPE, version, added, removed, failures, applied,
                       "Error adding/updating listener(s)",
                       sep="\n", end="\n")

    def config_dump(self) -> dict:
        """The listener manager's ListenersConfigDump with LDS's version, warming and error states."""
        xds = self.xds
        out = xds.lm.config_dump()
        v = xds.type_version.get(LISTENER)
        if v is not None:
            out["version_info"] = v
        dyn = out.setdefault("dynamic_listeners", [])
        by_name = {e.get("name"): e for e in dyn}
        xds.warming.dump_listeners(by_name, dyn)
        for (t, name), err in xds.errors.items():
            if t != LISTENER:
                continue
            e = by_name.get(name)
            if e is None:
                e = by_name[name] = {"name": name}
                dyn.append(e)
            e["error_state"] = err
        if not dyn:
            del out["dynamic_listeners"]
        return ordered(out, ("@type", "version_info", "static_listeners", "dynamic_listeners"))
