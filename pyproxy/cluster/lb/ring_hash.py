"""RING_HASH (Envoy extension ``envoy.load_balancing_policies.ring_hash``).

Envoy's ring construction: entries ``"<host key>_<i>"`` hashed with XXH64, their number scaled
from ``minimum_ring_size`` / ``maximum_ring_size`` by the normalized host weights; a request takes
the first entry whose hash is >= its own (binary search), a retry that must select another host
one entry further per attempt. ``MURMUR_HASH_2`` rings are rejected (not implemented).
"""

from __future__ import annotations

import math
from bisect import bisect_left

from xxhash import xxh64_intdigest

from ...config.errors import ConfigError
from .base import (Policy, PolicyFactory, getrandbits, has_field, host_hash_key, normalized_weights,
                   warn_once)

DEFAULT_MIN_RING = 1024
DEFAULT_MAX_RING = 8 * 1024 * 1024


class RingHash(Policy):
    name = "RING_HASH"
    hash_based = True

    def __init__(self, min_ring: int = DEFAULT_MIN_RING, max_ring: int = DEFAULT_MAX_RING,
                 use_hostname: bool = False):
        if min_ring > DEFAULT_MAX_RING:
            raise ConfigError("value must be less than or equal to %d" % DEFAULT_MAX_RING,
                              "minimum_ring_size")
        if max_ring > DEFAULT_MAX_RING:
            raise ConfigError("value must be less than or equal to %d" % DEFAULT_MAX_RING,
                              "maximum_ring_size")
        if min_ring > max_ring:
            raise ConfigError("ring hash: minimum_ring_size (%d) > maximum_ring_size (%d)"
                              % (min_ring, max_ring), "minimum_ring_size")
        self.min_ring = min_ring
        self.max_ring = max_ring
        self.use_hostname = use_hostname

    def build_ring(self, hosts, weights=None):
        norm = normalized_weights(hosts, weights)
        min_w = min(w for w in norm if w > 0)
        scale = min(math.ceil(min_w * self.min_ring) / min_w, float(self.max_ring))
        entries = []
        current = 0.0
        target = 0.0
        xx = xxh64_intdigest
        counts = []
        for h, w in zip(hosts, norm):
            prefix = (host_hash_key(h, self.use_hostname) + "_").encode()
            target += scale * w
            i = 0
            while current < target:
                entries.append((xx(prefix + str(i).encode()), h))
                i += 1
                current += 1
            counts.append(i)
        entries.sort(key=lambda e: e[0])
        self.last_stats = (math.ceil(scale), min(counts), max(counts))
        return [e[0] for e in entries], [e[1] for e in entries]

    def picker(self, hosts, weights=None):
        keys, ring = self.build_ring(hosts, weights)
        size = len(ring)

        def pick(ctx):
            # the first entry whose hash is >= the request's (ketama's search), wrapping around
            if ctx is None:
                i = bisect_left(keys, getrandbits(64))
                return ring[i] if i < size else ring[0]
            h = ctx.hash_key
            i = bisect_left(keys, getrandbits(64) if h is None else h)
            if i >= size:
                i = 0
            a = ctx.attempt
            if a:
                i = (i + a) % size
            return ring[i]
        pick.ring_size = size
        pick.lb_stats = self.last_stats  # (size, min hashes per host, max hashes per host)
        return pick


def _from_cluster(cluster) -> RingHash:
    cfg = cluster.ring_hash_lb_config
    use_host = cluster.common_lb_config.consistent_hashing_lb_config.use_hostname_for_hashing
    if cluster.common_lb_config.consistent_hashing_lb_config.HasField("hash_balance_factor"):
        warn_once("hash_balance_factor")
    if cfg.hash_function == 1:
        raise ConfigError("ring hash function MURMUR_HASH_2 is not supported (use XX_HASH)",
                          "ring_hash_lb_config.hash_function")
    try:
        return RingHash(cfg.minimum_ring_size.value if has_field(cfg, "minimum_ring_size") else DEFAULT_MIN_RING,
                        cfg.maximum_ring_size.value if has_field(cfg, "maximum_ring_size") else DEFAULT_MAX_RING,
                        use_host)
    except ConfigError as e:
        raise e.within(field="ring_hash_lb_config")


def _from_typed(msg):
    use_host = msg.use_hostname_for_hashing or (
        has_field(msg, "consistent_hashing_lb_config")
        and msg.consistent_hashing_lb_config.use_hostname_for_hashing)
    if has_field(msg, "hash_balance_factor") or (has_field(msg, "consistent_hashing_lb_config") and
                                            has_field(msg.consistent_hashing_lb_config,
                                                 "hash_balance_factor")):
        warn_once("hash_balance_factor")
    if msg.hash_function == 2:
        raise ConfigError("ring hash function MURMUR_HASH_2 is not supported (use XX_HASH)",
                          "hash_function")
    rh = RingHash(msg.minimum_ring_size.value if has_field(msg, "minimum_ring_size") else DEFAULT_MIN_RING,
                  msg.maximum_ring_size.value if has_field(msg, "maximum_ring_size") else DEFAULT_MAX_RING,
                  use_host)
    return rh, (True if has_field(msg, "locality_weighted_lb_config") else None), None


factory = PolicyFactory(_from_typed, _from_cluster)
