"""The cluster manager: every cluster by name, static and from CDS, with Envoy's warming.

A cluster added over CDS warms until its endpoints arrive (EDS) or its initial fetch times out;
only then does it replace the active cluster of the same name. Traffic looks clusters up by name
in ``active`` (a plain dict swapped entry by entry on the event loop).
"""

from __future__ import annotations

import logging
import time

from ..config.dump import to_dict
from ..config import ConfigError
from .cluster import EDS, Cluster

log = logging.getLogger("pyproxy.upstream")


class ClusterManager:
    def __init__(self, loop, stats):
        self.loop = loop
        self.stats = stats
        self.active: dict[str, Cluster] = {}
        self.warming: dict[str, Cluster] = {}
        self.pending_cla: dict = {}  # EDS data that arrived before its cluster
        self.eds_watchers = []  # callables notified when the set of EDS names changes
        self.st_active = stats.gauge("cluster_manager.active_clusters", accumulate=False)
        self.st_warming = stats.gauge("cluster_manager.warming_clusters", accumulate=False)
        self.st_added = stats.counter("cluster_manager.cluster_added")
        self.st_modified = stats.counter("cluster_manager.cluster_modified")
        self.st_removed = stats.counter("cluster_manager.cluster_removed")
        self.initialized_callbacks = []
        # the bootstrap's cluster_manager.outlier_detection.event_log_path (outlier.EventLog)
        self.outlier_event_log = None
        self._owned_stats: dict = {}  # cluster stat name -> StatsOwner (kept across updates)
        self._alt_stat_names = False  # whether any cluster was built with an alt_stat_name
        self.node = None  # the bootstrap node (upstream filters read the local workload from it)

    def cluster_scope(self, stat_name: str):
        """The stats scope of cluster ``stat_name``: what is made through it (by the cluster, its
        pools, filters charging it) is recorded, across updates, and freed when it is removed."""
        owner = self._owned_stats.get(stat_name)
        if owner is None:
            owner = self._owned_stats[stat_name] = self.stats.new_owner()
        return self.stats.owned_scope("cluster.%s." % stat_name, owner)

    def _release_stats(self, cluster: Cluster) -> None:
        sn = cluster.stat_name
        if sn in self.active or sn in self.warming:
            return  # a cluster of that name reports there
        if self._alt_stat_names and any(c.stat_name == sn for c in
                                        list(self.active.values()) + list(self.warming.values())):
            return  # another cluster reports under the same alt_stat_name (scanned only if any has one)
        owner = self._owned_stats.pop(sn, None)
        if owner is not None:
            owner.release()

    def get(self, name: str) -> Cluster | None:
        return self.active.get(name)

    # -- updates ---------------------------------------------------------------------------------
    def build(self, proto, *, added_via_api: bool, version_info: str = "") -> Cluster:
        """Compile a cluster without installing it (raises ConfigError)."""
        if proto.alt_stat_name:
            self._alt_stat_names = True
        try:
            return Cluster(proto, self, added_via_api=added_via_api, version_info=version_info)
        except ConfigError as e:
            tag = "cluster '%s'" % proto.name
            raise e if e.resource.startswith(tag) else e.within(resource=tag)

    def add_or_update(self, cluster: Cluster) -> bool:
        """Install a compiled cluster; returns False when it is identical to the current one."""
        name = cluster.name
        cur = self.active.get(name) or self.warming.get(name)
        if cur is not None and cur.proto == cluster.proto:
            return False
        old_warm = self.warming.pop(name, None)
        if old_warm is not None:
            old_warm.close()
        if name in self.active:
            self.st_modified.inc()
        else:
            self.st_added.inc()
        if cluster.type == EDS:
            cla = self.pending_cla.get(cluster.eds_service_name)
            if cla is not None:
                cluster.update_load_assignment(cla)
        if cluster.initialized:
            self._activate(cluster)
        else:
            self.warming[name] = cluster
            cluster.on_initialized.append(self._on_cluster_initialized)
        cluster.start()
        self._update_gauges()
        self._notify_eds()
        return True

    def _on_cluster_initialized(self, cluster: Cluster) -> None:
        if self.warming.get(cluster.name) is cluster:
            del self.warming[cluster.name]
            self._activate(cluster)
            self._update_gauges()

    def _activate(self, cluster: Cluster) -> None:
        old = self.active.get(cluster.name)
        self.active[cluster.name] = cluster
        if old is not None and old is not cluster:
            old.close()
        if not self.warming:
            cbs, self.initialized_callbacks = self.initialized_callbacks, []
            for cb in cbs:
                cb()

    def remove(self, name: str) -> bool:
        c = self.active.pop(name, None)
        w = self.warming.pop(name, None)
        for x in (c, w):
            if x is not None:
                x.close()
        if c is None and w is None:
            return False
        self._release_stats(c or w)  # its stats leave /stats, as in Envoy
        self.st_removed.inc()
        self._update_gauges()
        self._notify_eds()
        return True

    def on_load_assignment(self, cla) -> None:
        """EDS data for service ``cla.cluster_name``; applied to every cluster using it."""
        name = cla.cluster_name
        self.pending_cla[name] = cla
        for c in list(self.active.values()) + list(self.warming.values()):
            if c.type == EDS and c.eds_service_name == name:
                c.update_load_assignment(cla)

    def validate_load_assignment(self, cla) -> None:
        from .endpoints import build_priority_set
        build_priority_set(cla)

    def eds_names(self) -> set:
        return {c.eds_service_name for c in list(self.active.values()) + list(self.warming.values())
                if c.type == EDS}

    def _notify_eds(self):
        for w in self.eds_watchers:
            w()

    def _update_gauges(self):
        self.st_active.set(len(self.active))
        self.st_warming.set(len(self.warming))

    def when_initialized(self, cb) -> None:
        if not self.warming:
            cb()
        else:
            self.initialized_callbacks.append(cb)

    def fail_warming(self) -> None:
        """Initial fetch timed out: warming clusters become active without endpoints."""
        for c in list(self.warming.values()):
            c.initial_fetch_timed_out()

    def close(self) -> None:
        for c in list(self.active.values()) + list(self.warming.values()):
            c.close()

    # -- admin ---------------------------------------------------------------------------------
    def status(self) -> list:
        return [c.status() for c in self.active.values()]

    def config_dump(self) -> dict:
        from google.protobuf import json_format
        static, dynamic_active, dynamic_warming = [], [], []
        def ts(c):
            return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(c.last_updated)) + ".000Z"
        for c in self.active.values():
            body = to_dict(c.proto)
            body["@type"] = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
            if c.added_via_api:
                dynamic_active.append({"version_info": c.version_info, "cluster": body, "last_updated": ts(c)})
            else:
                static.append({"cluster": body, "last_updated": ts(c)})
        for c in self.warming.values():
            body = to_dict(c.proto)
            body["@type"] = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
            dynamic_warming.append({"version_info": c.version_info, "cluster": body, "last_updated": ts(c)})
        out = {"@type": "type.googleapis.com/envoy.admin.v3.ClustersConfigDump"}
        if static:
            out["static_clusters"] = static
        if dynamic_active:
            out["dynamic_active_clusters"] = dynamic_active
        if dynamic_warming:
            out["dynamic_warming_clusters"] = dynamic_warming
        return out
