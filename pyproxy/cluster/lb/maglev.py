"""MAGLEV (Envoy extension ``envoy.load_balancing_policies.maglev``).

Envoy's weighted Maglev permutation fill of a prime-size table (65537 by default): hosts sorted by
hash key, offset ``xxh64(key) % size``, skip ``xxh64(key, seed=1) % (size - 1) + 1``; a request
takes ``table[hash % size]``, a retry that must select another host xors the hash with
``2**64 - attempt``.
"""

from __future__ import annotations

import math

from xxhash import xxh64_intdigest

from ...config.errors import ConfigError
from .base import Policy, PolicyFactory, getrandbits, has_field, host_hash_key, normalized_weights

DEFAULT_MAGLEV_TABLE = 65537
MAX_MAGLEV_TABLE = 5000011


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    r = int(math.isqrt(n))
    f = 3
    while f <= r:
        if n % f == 0:
            return False
        f += 2
    return True


class Maglev(Policy):
    name = "MAGLEV"
    hash_based = True

    def __init__(self, table_size: int = DEFAULT_MAGLEV_TABLE, use_hostname: bool = False):
        if table_size > MAX_MAGLEV_TABLE:
            raise ConfigError("value must be less than or equal to %d" % MAX_MAGLEV_TABLE,
                              "table_size")
        if not _is_prime(table_size):
            raise ConfigError("The table size of maglev must be prime number", "table_size")
        self.table_size = table_size
        self.use_hostname = use_hostname

    def build_table(self, hosts, weights=None) -> list:
        m = self.table_size
        norm = normalized_weights(hosts, weights)
        max_w = max(norm)
        # Envoy sorts the hosts by hash key first (a stable table whatever the config order)
        order = sorted(range(len(hosts)), key=lambda i: host_hash_key(hosts[i], self.use_hostname))
        hosts = [hosts[i] for i in order]
        norm = [norm[i] for i in order]
        n = len(hosts)
        offsets = []
        skips = []
        xx = xxh64_intdigest
        for h in hosts:
            k = host_hash_key(h, self.use_hostname).encode()
            offsets.append(xx(k) % m)
            skips.append(xx(k, 1) % (m - 1) + 1)
        nexts = [0] * n
        counts = [0] * n
        targets = [0.0] * n
        table = [None] * m
        filled = 0
        equal = all(w == max_w for w in norm)
        iteration = 1
        while True:
            for j in range(n):
                if not equal:
                    if iteration * norm[j] < targets[j]:
                        continue
                    targets[j] += max_w
                off = offsets[j]
                sk = skips[j]
                nx = nexts[j]
                c = (off + sk * nx) % m
                while table[c] is not None:
                    nx += 1
                    c = (off + sk * nx) % m
                table[c] = hosts[j]
                nexts[j] = nx + 1
                counts[j] += 1
                filled += 1
                if filled == m:
                    self.last_stats = (min(counts), max(counts))
                    return table
            iteration += 1

    def picker(self, hosts, weights=None):
        table = self.build_table(hosts, weights)
        m = len(table)

        def pick(ctx):
            if ctx is None:
                return table[getrandbits(64) % m]
            h = ctx.hash_key
            if h is None:
                h = getrandbits(64)
            a = ctx.attempt
            if a:
                h ^= (1 << 64) - a
            return table[h % m]
        pick.lb_stats = self.last_stats  # (min entries per host, max entries per host)
        return pick


def _from_cluster(cluster) -> Maglev:
    cfg = cluster.maglev_lb_config
    use_host = cluster.common_lb_config.consistent_hashing_lb_config.use_hostname_for_hashing
    try:
        return Maglev(cfg.table_size.value if has_field(cfg, "table_size") else DEFAULT_MAGLEV_TABLE,
                      use_host)
    except ConfigError as e:
        raise e.within(field="maglev_lb_config")


def _from_typed(msg):
    use_host = (has_field(msg, "consistent_hashing_lb_config")
                and msg.consistent_hashing_lb_config.use_hostname_for_hashing)
    mg = Maglev(msg.table_size.value if has_field(msg, "table_size") else DEFAULT_MAGLEV_TABLE, use_host)
    return mg, (True if has_field(msg, "locality_weighted_lb_config") else None), None


factory = PolicyFactory(_from_typed, _from_cluster)
