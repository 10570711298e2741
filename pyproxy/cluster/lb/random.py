"""RANDOM (Envoy extension ``envoy.load_balancing_policies.random``): uniform over the hosts;
weights are ignored, as Envoy does.
"""

from __future__ import annotations

from .base import Policy, PolicyFactory, locality_config, only_host, rand


class Random(Policy):
    name = "RANDOM"

    def picker(self, hosts, weights=None):
        n = len(hosts)
        if n == 1:
            return only_host(hosts[0])
        hosts = list(hosts)
        return lambda ctx: hosts[int(rand() * n)]


def _from_typed(msg):
    return (Random(),) + locality_config(msg)


factory = PolicyFactory(_from_typed, lambda cluster: Random())
