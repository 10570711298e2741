"""ROUND_ROBIN (Envoy extension ``envoy.load_balancing_policies.round_robin``).

Equal weights: plain rotation; unequal weights: a precomputed earliest-deadline-first schedule of
one full period, or a live EDF heap when the period would be huge (``base.weighted_cycle``).
"""

from __future__ import annotations

from .base import Policy, PolicyFactory, has_field, locality_config, only_host, warn_once, weighted_cycle


class RoundRobin(Policy):
    name = "ROUND_ROBIN"

    def picker(self, hosts, weights=None):
        if len(hosts) == 1:
            return only_host(hosts[0])
        nxt = weighted_cycle(hosts, [h.weight for h in hosts])
        pick = lambda ctx: nxt()  # noqa: E731
        pick.direct = nxt  # zero-argument form, called straight from choose()
        return pick


def _from_typed(msg):
    if has_field(msg, "slow_start_config"):
        warn_once("slow_start_config")
    return (RoundRobin(),) + locality_config(msg)


def _from_cluster(cluster):
    if has_field(cluster, "round_robin_lb_config") and \
            has_field(cluster.round_robin_lb_config, "slow_start_config"):
        warn_once("slow_start_config")
    return RoundRobin()


factory = PolicyFactory(_from_typed, _from_cluster)
