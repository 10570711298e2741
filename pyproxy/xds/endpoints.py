"""EDS: ClusterLoadAssignments applied to the clusters that use them.

Each good assignment is applied to the clusters using it; the bad ones leave those clusters' hosts
as they are and are named in the NACK (Envoy applies the watches it reaches before the bad one;
pyproxy applies every good one). Linear in the response: clusters are looked up through one index
built per response, each priority set is built once. The EDS subscription follows the clusters'
service names (``cm.eds_watchers``).
"""

from __future__ import annotations

from ..config import ConfigError
from ..config.dump import to_dict
from ..xds_client import ENDPOINT
from .common import EDS_TYPE, partially_applied

CLA_TYPE = "envoy.config.endpoint.v3.ClusterLoadAssignment"


def _eds_stats(c):
    s = c.scope
    return s.counter("update_attempt"), s.counter("update_success"), s.counter("update_rejected")


class EndpointsHandler:
    type_url = ENDPOINT

    def __init__(self, xds):
        self.xds = xds
        self.batch = False      # a CDS response is being applied: subscribe to EDS names once, after
        xds.cm.eds_watchers.append(self.update_subscription)

    def update_subscription(self):
        if self.batch:
            return
        c = self.xds.client_for_type.get(ENDPOINT)
        if c is not None:
            c.subscribe(ENDPOINT, self.xds.cm.eds_names())

    def _eds_clusters(self):
        cm = self.xds.cm
        for c in list(cm.active.values()) + list(cm.warming.values()):
            if c.type == EDS_TYPE:
                yield c

    def on_stream_failure(self):
        for c in self._eds_clusters():
            sc = c.scope
            sc.counter("update_attempt").inc()
            sc.counter("update_failure").inc()

    def apply(self, version, added, removed):
        from ..cluster.endpoints import build_priority_set
        xds = self.xds
        cm = xds.cm
        failures, built = [], {}
        for name, cla in added.items():
            try:
                built[name] = build_priority_set(cla)
            except ConfigError as e:
                failures.append((name, e.within(resource="ClusterLoadAssignment '%s'" % name)))
        by_service = {}
        for c in self._eds_clusters():
            by_service.setdefault(c.eds_service_name, []).append(c)
        for name, ps in built.items():
            cla = added[name]
            if not cla.cluster_name:
                cla.cluster_name = name
            cm.pending_cla[name] = cla
            for i, c in enumerate(by_service.get(name, ())):
                st = _eds_stats(c)
                st[0].inc()
                c.update_load_assignment(cla, ps if i == 0 else None)
                st[1].inc()
        if removed:
            from envoy.config.endpoint.v3 import endpoint_pb2
            for name in removed:
                if name in added:
                    continue
                # the assignment is gone: its clusters have no endpoints now
                empty = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
                for c in by_service.get(name, ()):
                    c.update_load_assignment(empty)
                cm.pending_cla.pop(name, None)
        xds.clear_errors(ENDPOINT, list(built) + list(removed))
        if failures:
            # Envoy lets a warming cluster go on (without endpoints) when its EDS update is rejected,
            # and counts the rejection on every EDS cluster (each is a watch of the rejected response)
            for name, _ in failures:
                for c in by_service.get(name, ()):
                    _eds_stats(c)[0].inc()
                    if cm.warming.get(c.name) is c:
                        c.initial_fetch_timed_out()
            for cs in by_service.values():
                for c in cs:
                    _eds_stats(c)[2].inc()
            xds.record_failures(ENDPOINT, CLA_TYPE, failures, added)
            raise partially_applied("Error adding/updating cluster load assignment(s)", failures, built)


def endpoints_config_dump(cm) -> dict:
    """Envoy's ``EndpointsConfigDump``: static clusters' load assignments and the EDS ones held."""
    out = {"@type": "type.googleapis.com/envoy.admin.v3.EndpointsConfigDump"}
    static, dyn = [], []
    for c in cm.active.values():
        if c.type == EDS_TYPE:
            cla = cm.pending_cla.get(c.eds_service_name)
            if cla is not None:
                body = to_dict(cla)
                body["@type"] = "type.googleapis.com/" + CLA_TYPE
                dyn.append({"endpoint_config": body})
        elif c.proto.HasField("load_assignment"):
            body = to_dict(c.proto.load_assignment)
            body["@type"] = "type.googleapis.com/" + CLA_TYPE
            static.append({"endpoint_config": body})
    if static:
        out["static_endpoint_configs"] = static
    if dyn:
        out["dynamic_endpoint_configs"] = dyn
    return out
