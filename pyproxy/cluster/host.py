"""Upstream hosts and the priority set a cluster's load balancer picks from.

``Host`` objects are created when endpoints arrive (static config, DNS, EDS) and are shared by every
connection pool and load balancer of the cluster; their counters (``rq_active``, ``cx_active``) are
read by LEAST_REQUEST and circuit breakers.
"""

from __future__ import annotations

import socket

HEALTHY, DEGRADED, UNHEALTHY = 0, 1, 2

# Envoy's host health flags (``Host::HealthFlag``), in the order /clusters prints them.
FAILED_ACTIVE_HC = 1 << 0
FAILED_OUTLIER_CHECK = 1 << 1
FAILED_EDS_HEALTH = 1 << 2
DEGRADED_ACTIVE_HC = 1 << 3
DEGRADED_EDS_HEALTH = 1 << 4
PENDING_DYNAMIC_REMOVAL = 1 << 5
PENDING_ACTIVE_HC = 1 << 6
EXCLUDED_VIA_IMMEDIATE_HC_FAIL = 1 << 7
ACTIVE_HC_TIMEOUT = 1 << 8
EDS_STATUS_DRAINING = 1 << 9
FLAG_NAMES = (
    (FAILED_ACTIVE_HC, "failed_active_hc"), (FAILED_OUTLIER_CHECK, "failed_outlier_check"),
    (FAILED_EDS_HEALTH, "failed_eds_health"), (DEGRADED_ACTIVE_HC, "degraded_active_hc"),
    (DEGRADED_EDS_HEALTH, "degraded_eds_health"),
    (PENDING_DYNAMIC_REMOVAL, "pending_dynamic_removal"), (PENDING_ACTIVE_HC, "pending_active_hc"),
    (EXCLUDED_VIA_IMMEDIATE_HC_FAIL, "excluded_via_immediate_hc_fail"),
    (ACTIVE_HC_TIMEOUT, "active_hc_timeout"), (EDS_STATUS_DRAINING, "eds_status_draining"),
)
_UNHEALTHY_MASK = (FAILED_ACTIVE_HC | FAILED_OUTLIER_CHECK | FAILED_EDS_HEALTH
                   | EDS_STATUS_DRAINING)
_DEGRADED_MASK = DEGRADED_ACTIVE_HC | DEGRADED_EDS_HEALTH
EXCLUDED_MASK = PENDING_ACTIVE_HC | EXCLUDED_VIA_IMMEDIATE_HC_FAIL  # (Envoy's excluded hosts)
_EDS_MASK = FAILED_EDS_HEALTH | DEGRADED_EDS_HEALTH | EDS_STATUS_DRAINING
# envoy.config.core.v3.HealthStatus -> EDS flags: UNKNOWN 0, HEALTHY 1, UNHEALTHY 2, DRAINING 3,
# TIMEOUT 4, DEGRADED 5
EDS_STATUS_FLAGS = {0: 0, 1: 0, 2: FAILED_EDS_HEALTH, 3: EDS_STATUS_DRAINING,
                    4: FAILED_EDS_HEALTH, 5: DEGRADED_EDS_HEALTH}
EDS_STATUS_NAMES = {0: "UNKNOWN", 1: "HEALTHY", 2: "UNHEALTHY", 3: "DRAINING", 4: "TIMEOUT",
                    5: "DEGRADED"}
_COARSE_TO_EDS = {HEALTHY: 1, DEGRADED: 5, UNHEALTHY: 2}


class Host:
    """One upstream endpoint.

    ``flags`` holds Envoy's health flags (EDS status, active health check, outlier ejection);
    ``health`` is the coarse health a load balancer reads (``HEALTHY``/``DEGRADED``/``UNHEALTHY``,
    Envoy's ``coarseHealth()``), recomputed whenever a flag changes (``set_flag``/``clear_flag``).
    """

    __slots__ = (
        "address", "port", "pipe", "family", "hostname", "weight", "priority", "locality",
        "metadata", "health", "rq_active", "cx_active", "key", "outlier_ejected", "lb_endpoint",
        "stats", "flags", "eds_status", "outlier", "hc",
        # per-host counters /clusters shows (Envoy's HostStats)
        "cx_total", "cx_connect_fail", "rq_total", "rq_success", "rq_error", "rq_timeout",
    )

    def __init__(self, address: str, port: int, *, weight: int = 1, priority: int = 0,
                 locality: tuple = ("", "", ""), metadata: dict | None = None,
                 health: int = HEALTHY, hostname: str = "", pipe: str = "", lb_endpoint=None,
                 eds_status: int | None = None):
        self.address = address
        self.port = port
        self.pipe = pipe
        if pipe:
            self.family = socket.AF_UNIX
        elif ":" in address:
            self.family = socket.AF_INET6
        else:
            self.family = socket.AF_INET
        self.hostname = hostname
        self.weight = max(1, weight)
        self.priority = priority
        self.locality = locality  # (region, zone, sub_zone)
        self.metadata = metadata or {}  # filter name -> dict (from endpoint metadata)
        self.rq_active = 0
        self.cx_active = 0
        self.cx_total = self.cx_connect_fail = self.rq_total = 0
        self.rq_success = self.rq_error = self.rq_timeout = 0
        self.outlier_ejected = False
        self.outlier = None  # the outlier detector's per-host monitor (cluster/outlier.py)
        self.hc = None       # the active health checker's per-host session
        self.lb_endpoint = lb_endpoint  # the proto, for /clusters and config_dump
        self.stats = None  # per-host counters, set by the cluster (rq_total, cx_connect_fail, ...)
        if eds_status is None:
            eds_status = _COARSE_TO_EDS.get(health, 2)
        self.eds_status = eds_status
        self.flags = EDS_STATUS_FLAGS.get(eds_status, FAILED_EDS_HEALTH)
        self.health = HEALTHY
        self._coarse()
        if pipe:
            self.key = pipe
        elif self.family == socket.AF_INET6:
            self.key = "[%s]:%d" % (address, port)
        else:
            self.key = "%s:%d" % (address, port)

    def _coarse(self) -> None:
        f = self.flags
        self.health = (UNHEALTHY if f & _UNHEALTHY_MASK else
                       DEGRADED if f & _DEGRADED_MASK else HEALTHY)
        self.outlier_ejected = bool(f & FAILED_OUTLIER_CHECK)

    def set_flag(self, flag: int) -> None:
        self.flags |= flag
        self._coarse()

    def clear_flag(self, flag: int) -> None:
        self.flags &= ~flag
        self._coarse()

    def has_flag(self, flag: int) -> bool:
        return bool(self.flags & flag)

    def set_eds_status(self, status: int) -> None:
        """A new EDS ``health_status`` (an update of the endpoint)."""
        self.eds_status = status
        self.flags = (self.flags & ~_EDS_MASK) | EDS_STATUS_FLAGS.get(status, FAILED_EDS_HEALTH)
        self._coarse()

    def flag_names(self) -> list:
        f = self.flags
        return [name for bit, name in FLAG_NAMES if f & bit]

    @property
    def healthy(self) -> bool:
        return self.health == HEALTHY

    def __repr__(self) -> str:
        return "Host(%s w=%d p=%d)" % (self.key, self.weight, self.priority)


def membership_counts(hosts) -> tuple:
    """(healthy, degraded, excluded) hosts, as Envoy's membership_* gauges count them (excluded:
    pending its first active check, or failed it at once)."""
    return (sum(1 for h in hosts if h.health == HEALTHY), sum(1 for h in hosts if h.health == DEGRADED),
            sum(1 for h in hosts if h.flags & EXCLUDED_MASK))


class PrioritySet:
    """Hosts grouped by priority (index = priority), each a list in config order.

    ``localities[p]`` maps a locality tuple to its ``load_balancing_weight`` (0 when unset).
    Immutable once built: an update builds a new PrioritySet and a new load balancer.
    """

    __slots__ = ("priorities", "localities", "all_hosts", "overprovisioning_factor")

    def __init__(self, priorities: list[list[Host]], localities: list[dict] | None = None,
                 overprovisioning_factor: int = 140):
        self.priorities = priorities
        self.localities = localities or [{} for _ in priorities]
        self.all_hosts = [h for p in priorities for h in p]
        self.overprovisioning_factor = overprovisioning_factor
