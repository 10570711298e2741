"""LEAST_REQUEST (Envoy extension ``envoy.load_balancing_policies.least_request``).

Equal weights: power of ``choice_count`` choices (default 2) on ``host.rq_active`` (or a full scan
with ``selection_method: FULL_SCAN`` / ``enable_full_scan``); unequal weights: EDF whose weight is
re-evaluated on every pick as ``weight / (rq_active + 1) ** active_request_bias``.
"""

from __future__ import annotations

import heapq

from ...config.errors import ConfigError
from .base import Policy, PolicyFactory, has_field, locality_config, only_host, rand, warn_once


class LeastRequest(Policy):
    name = "LEAST_REQUEST"

    def __init__(self, choice_count: int = 2, active_request_bias: float = 1.0,
                 full_scan: bool = False):
        if choice_count < 2:
            raise ConfigError("value must be greater than or equal to 2", "choice_count")
        if active_request_bias < 0:
            raise ConfigError("active_request_bias must be >= 0", "active_request_bias")
        self.choice_count = choice_count
        self.active_request_bias = active_request_bias
        self.full_scan = full_scan

    def picker(self, hosts, weights=None):
        hosts = list(hosts)
        n = len(hosts)
        if n == 1:
            return only_host(hosts[0])
        first = hosts[0].weight
        if self.full_scan:
            def full(ctx):
                start = int(rand() * n)
                best = hosts[start]
                for h in hosts:
                    if h.rq_active < best.rq_active:
                        best = h
                return best
            return full
        if any(h.weight != first for h in hosts):
            return _WeightedLeastRequest(hosts, self.active_request_bias).pick
        k = self.choice_count
        if k == 2:
            def p2c(ctx):
                a = hosts[int(rand() * n)]
                b = hosts[int(rand() * n)]
                return b if b.rq_active < a.rq_active else a
            return p2c

        def pnc(ctx):
            best = hosts[int(rand() * n)]
            for _ in range(k - 1):
                c = hosts[int(rand() * n)]
                if c.rq_active < best.rq_active:
                    best = c
            return best
        return pnc


class _WeightedLeastRequest:
    """EDF whose weight is ``weight / (rq_active + 1) ** bias``, re-read on every pick."""

    __slots__ = ("heap", "hosts", "bias", "seq")

    def __init__(self, hosts, bias):
        self.hosts = hosts
        self.bias = bias
        self.heap = [(1.0 / h.weight, i, i) for i, h in enumerate(hosts)]
        heapq.heapify(self.heap)
        self.seq = len(hosts)

    def pick(self, ctx):
        d, _, i = self.heap[0]
        h = self.hosts[i]
        bias = self.bias
        if bias == 1.0:
            w = h.weight / (h.rq_active + 1)
        elif bias == 0.0:
            w = h.weight
        else:
            w = h.weight / (h.rq_active + 1) ** bias
        self.seq += 1
        heapq.heapreplace(self.heap, (d + 1.0 / w, self.seq, i))
        return h


def _from_cluster(cluster) -> LeastRequest:
    cfg = cluster.least_request_lb_config
    if has_field(cfg, "slow_start_config"):
        warn_once("slow_start_config")
    try:
        return LeastRequest(cfg.choice_count.value if has_field(cfg, "choice_count") else 2,
                            cfg.active_request_bias.default_value
                            if has_field(cfg, "active_request_bias") else 1.0)
    except ConfigError as e:
        raise e.within(field="least_request_lb_config")


# Typed load_balancing_policy factories: f(config_message) -> (Policy, locality_weighted | None,


def _from_typed(msg):
    if has_field(msg, "slow_start_config"):
        warn_once("slow_start_config")
    full = msg.selection_method == 1 or (has_field(msg, "enable_full_scan") and msg.enable_full_scan.value)
    lr = LeastRequest(msg.choice_count.value if has_field(msg, "choice_count") else 2,
                      msg.active_request_bias.default_value
                      if has_field(msg, "active_request_bias") else 1.0, full)
    return (lr,) + locality_config(msg)


factory = PolicyFactory(_from_typed, _from_cluster)
