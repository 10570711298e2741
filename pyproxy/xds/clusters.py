"""CDS: clusters added, updated and removed, as Envoy's cluster manager does it.

Every good cluster of a response is added or updated and the missing ones removed; a bad one keeps
the cluster of that name in force (or is not added), and the NACK names each. An EDS cluster warms
until its endpoints come (``warming.Warming.watch_cluster``). The handler dumps the
ClustersConfigDump with CDS's version and error states.
"""

from __future__ import annotations

from ..config import ConfigError
from ..xds_client import CLUSTER
from .common import EDS_TYPE, ordered

CLUSTER_TYPE = "envoy.config.cluster.v3.Cluster"


class ClustersHandler:
    type_url = CLUSTER

    def __init__(self, xds):
        self.xds = xds

    def apply(self, version, added, removed):
        xds = self.xds
        eds = xds.eds
        xds.st[CLUSTER][0].inc()
        cm = xds.cm
        static = {c.name for c in cm.active.values() if not c.added_via_api}
        applied, failures = [], []
        eds.batch = True            # one EDS subscription update for the whole response
        try:
            for name, proto in added.items():
                try:
                    if name in static:
                        raise ConfigError("cluster '%s' is static and cannot be updated by CDS" % name)
                    c = cm.build(proto, added_via_api=True,
                                 version_info=xds.resource_version(CLUSTER, name, version))
                except ConfigError as e:
                    failures.append((name, e))
                    continue
                applied.append(name)
                if cm.add_or_update(c):
                    if c.type == EDS_TYPE:     # its EDS subscription starts: an attempt (Envoy)
                        c.scope.counter("update_attempt").inc()
                    if c.type == EDS_TYPE and cm.warming.get(c.name) is c:
                        xds.warming.watch_cluster(c)
            gone = [n for n in removed if n not in static]
            for name in gone:
                cm.remove(name)
        finally:
            eds.batch = False
        # endpoints held for clusters that are gone would be stale if the cluster came back
        if gone:
            still = cm.eds_names()
            for name in gone:
                if name not in still:
                    cm.pending_cla.pop(name, None)
        xds.clear_errors(CLUSTER, applied + gone)
        eds.update_subscription()
        xds.end_update(CLUSTER, CLUSTER_TYPE, version, added, removed, failures, applied,
                       "Error adding/updating cluster(s)")

    def config_dump(self) -> dict:
        """The cluster manager's ClustersConfigDump with CDS's version and error states."""
        xds = self.xds
        out = xds.cm.config_dump()
        v = xds.type_version.get(CLUSTER)
        if v is not None:
            out["version_info"] = v
        for key in ("dynamic_active_clusters", "dynamic_warming_clusters"):
            for e in out.get(key, ()):
                err = xds.errors.get((CLUSTER, e.get("cluster", {}).get("name")))
                if err is not None:
                    e["error_state"] = err
        return ordered(out, ("@type", "version_info", "static_clusters", "dynamic_active_clusters",
                             "dynamic_warming_clusters"))
