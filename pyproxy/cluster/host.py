"""Upstream hosts and the priority set a cluster's load balancer picks from.

``Host`` objects are created when endpoints arrive (static config, DNS, EDS) and are shared by every
connection pool and load balancer of the cluster; their counters (``rq_active``, ``cx_active``) are
read by LEAST_REQUEST and circuit breakers.
"""

from __future__ import annotations

import socket

HEALTHY, DEGRADED, UNHEALTHY = 0, 1, 2


class Host:
    __slots__ = (
        "address", "port", "pipe", "family", "hostname", "weight", "priority", "locality",
        "metadata", "health", "rq_active", "cx_active", "key", "outlier_ejected", "lb_endpoint",
        "stats",
    )

    def __init__(self, address: str, port: int, *, weight: int = 1, priority: int = 0,
                 locality: tuple = ("", "", ""), metadata: dict | None = None,
                 health: int = HEALTHY, hostname: str = "", pipe: str = "", lb_endpoint=None):
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
        self.health = health
        self.rq_active = 0
        self.cx_active = 0
        self.outlier_ejected = False
        self.lb_endpoint = lb_endpoint  # the proto, for /clusters and config_dump
        self.stats = None  # per-host counters, set by the cluster (rq_total, cx_connect_fail, ...)
        if pipe:
            self.key = pipe
        elif self.family == socket.AF_INET6:
            self.key = "[%s]:%d" % (address, port)
        else:
            self.key = "%s:%d" % (address, port)

    @property
    def healthy(self) -> bool:
        return self.health == HEALTHY and not self.outlier_ejected

    def __repr__(self) -> str:
        return "Host(%s w=%d p=%d)" % (self.key, self.weight, self.priority)


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
