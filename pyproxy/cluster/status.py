"""A cluster as the admin's ``/clusters`` shows it (the dict ``AdminContext.clusters_status``
documents): hosts with their counters and health flags, both priorities' circuit-breaker thresholds."""

from __future__ import annotations

from envoy.config.cluster.v3 import cluster_pb2

_CB_KEYS = ("max_connections", "max_pending_requests", "max_requests", "max_retries")


def cluster_status(c) -> dict:
    hosts = []
    for h in c.priority_set.all_hosts:
        hosts.append({
            "address": h.pipe or h.address, "port": h.port, "weight": h.weight,
            "priority": h.priority, "region": h.locality[0], "zone": h.locality[1],
            "sub_zone": h.locality[2], "health_flags": h.flag_names(),
            "hostname": h.hostname,
            "stats": {"cx_active": h.cx_active, "rq_active": h.rq_active,
                      "cx_total": h.cx_total, "cx_connect_fail": h.cx_connect_fail,
                      "rq_total": h.rq_total, "rq_success": h.rq_success,
                      "rq_error": h.rq_error, "rq_timeout": h.rq_timeout},
            "success_rate": h.outlier.ext.rate if h.outlier is not None else -1,
            "local_origin_success_rate": h.outlier.local.rate if h.outlier is not None else -1,
        })
    out = {
        "name": c.name, "observability_name": c.stat_name,
        "added_via_api": c.added_via_api, "hosts": hosts,
        "circuit_breakers": {prio: dict(zip(_CB_KEYS, th)) for prio, th in c.thresholds.items()},
    }
    if c.outlier is not None:
        out["outlier_detection"] = c.outlier.status()
    if c.type == cluster_pb2.Cluster.EDS and c.proto.eds_cluster_config.service_name:
        out["eds_service_name"] = c.eds_service_name
    return out
