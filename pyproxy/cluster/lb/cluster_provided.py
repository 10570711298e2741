"""CLUSTER_PROVIDED (Envoy extension ``envoy.load_balancing_policies.cluster_provided``): the
cluster picks the host itself (ORIGINAL_DST); ``choose`` returns None.
"""

from __future__ import annotations

from .base import Policy, PolicyFactory


class ClusterProvided(Policy):
    name = "CLUSTER_PROVIDED"
    cluster_provided = True

    def picker(self, hosts, weights=None):
        return lambda ctx: None


factory = PolicyFactory(lambda msg: (ClusterProvided(), None, None), lambda cluster: ClusterProvided())
