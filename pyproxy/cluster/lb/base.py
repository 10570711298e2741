"""What every load-balancing policy shares: the per-request context, the hash, weighted rotation
and the ``Policy`` / ``PolicyFactory`` interfaces.

A policy module (``round_robin``, ``least_request``, ``random``, ``ring_hash``, ``maglev``,
``cluster_provided``) defines a ``Policy`` (``picker(hosts, weights)`` returns ``f(ctx) -> Host``
for a non-empty host list) and a ``factory``: a ``PolicyFactory`` registered in
``pyproxy/extensions.py`` under the type URL of Envoy's ``load_balancing_policy`` typed config. The
legacy ``lb_policy`` enum maps onto the same registrations (``factory.from_cluster``).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import random as _random_mod

from xxhash import xxh64_intdigest

from ..host import Host

log = logging.getLogger("pyproxy.cluster.lb")

_rng = _random_mod.Random()
rand = _rng.random
getrandbits = _rng.getrandbits

SCHEDULE_MAX = 1 << 14       # longest precomputed weighted-RR period (entries)
DEFAULT_PANIC_THRESHOLD = 50.0


def only_host(host):
    """The picker of a one-host list (any policy without per-pick state): ``choose()`` reads
    ``only`` and returns the host without calling it."""
    f = lambda ctx: host  # noqa: E731
    f.only = host
    return f


def hash_bytes(data: bytes, seed: int = 0) -> int:
    """The 64-bit hash used by RING_HASH and MAGLEV: XXH64 (Envoy's ``HashUtil::xxHash64``)."""
    return xxh64_intdigest(data, seed)


# --------------------------------------------------------------------------------------------
# Per-request context

class LbContext:
    """What the router tells the load balancer about one request.

    ``hash_key``: 64-bit int from the route's hash policies (RING_HASH / MAGLEV), or None.
    ``host_selection_max_attempts``: from the route's retry policy (default 1).
    ``previous_hosts``: hosts already tried (retry predicate ``previous_hosts``), or None.
    ``predicate``: optional extra ``callable(host) -> bool`` rejecting a host.
    ``attempt``: set by the balancer while it re-picks (hash policies move off the first host).
    """

    __slots__ = ("hash_key", "host_selection_max_attempts", "previous_hosts", "predicate",
                 "attempt")

    def __init__(self, hash_key: int | None = None, host_selection_max_attempts: int = 1,
                 previous_hosts=None, predicate=None):
        self.attempt = 0
        self.hash_key = hash_key
        self.host_selection_max_attempts = host_selection_max_attempts
        self.previous_hosts = previous_hosts
        self.predicate = predicate

    def should_select_another(self, host: Host) -> bool:
        ph = self.previous_hosts
        if ph is not None and host in ph:
            return True
        p = self.predicate
        return p is not None and bool(p(host))


# --------------------------------------------------------------------------------------------
# Weighted choice helpers (all return zero-argument callables)

def _gcd_reduce(weights: list[int]) -> list[int]:
    g = 0
    for w in weights:
        g = math.gcd(g, w)
    return [w // g for w in weights] if g > 1 else list(weights)


def _rotation(items: list):
    start = int(rand() * len(items))
    return itertools.cycle(items[start:] + items[:start]).__next__


class _EdfScheduler:
    """Earliest deadline first over fixed float weights (each pick advances by 1/weight)."""

    __slots__ = ("heap", "items", "inv", "seq")

    def __init__(self, items: list, weights: list[float]):
        self.items = items
        self.inv = [1.0 / w for w in weights]
        self.heap = [(self.inv[i], i, i) for i in range(len(items))]
        heapq.heapify(self.heap)
        self.seq = len(items)

    def next(self):
        d, _, i = self.heap[0]
        self.seq += 1
        heapq.heapreplace(self.heap, (d + self.inv[i], self.seq, i))
        return self.items[i]


def _edf_schedule(items: list, weights: list[int]) -> list:
    """One full EDF period: item i appears exactly weights[i] times, spread evenly."""
    entries = sorted((j / w, i) for i, w in enumerate(weights) for j in range(1, w + 1))
    return [items[i] for _, i in entries]


def weighted_cycle(items: list, weights: list):
    """A zero-argument callable returning items in proportion to ``weights`` (all > 0).

    Deterministic: equal weights rotate; small integral weights follow a precomputed exact
    schedule; otherwise an EDF heap.
    """
    if len(items) == 1:
        only = items[0]
        return lambda: only
    first = weights[0]
    if all(w == first for w in weights):
        return _rotation(items)
    if all(float(w).is_integer() for w in weights):
        ints = _gcd_reduce([int(w) for w in weights])
        if sum(ints) <= SCHEDULE_MAX:
            sched = _edf_schedule(items, ints)
            start = int(rand() * len(sched))
            return itertools.cycle(sched[start:] + sched[:start]).__next__
    return _EdfScheduler(items, [float(w) for w in weights]).next


# --------------------------------------------------------------------------------------------
# Algorithms. ``picker(hosts, weights)`` returns ``f(ctx) -> Host`` for a non-empty host list;
# ``weights`` (floats, hash policies only) replaces host weights under locality weighting.

class Policy:
    name = ""
    hash_based = False
    cluster_provided = False

    def picker(self, hosts: list[Host], weights: list[float] | None = None):
        raise NotImplementedError


class PolicyFactory:
    """An ``lb_policy`` extension. ``factory(msg)`` builds from the typed ``load_balancing_policy``
    config and returns ``(Policy, locality_weighted | None, fail_traffic_on_panic | None)`` (None =
    not set by this config: the cluster's ``common_lb_config`` applies); ``from_cluster(cluster)``
    builds from the legacy ``lb_policy`` enum and the cluster's ``*_lb_config``."""

    __slots__ = ("typed", "legacy")

    def __init__(self, typed, legacy):
        self.typed = typed
        self.legacy = legacy

    def __call__(self, msg):
        return self.typed(msg)

    def from_cluster(self, cluster) -> Policy:
        return self.legacy(cluster)


def host_hash_key(h: Host, use_hostname: bool) -> str:
    lbmd = h.metadata.get("envoy.lb") if h.metadata else None
    if lbmd:
        k = lbmd.get("hash_key")
        if isinstance(k, str) and k:
            return k
    if use_hostname and h.hostname:
        return h.hostname
    return h.key


def normalized_weights(hosts, weights):
    """Envoy's normalized host weights: ``weight / sum(weights)``; ``weights`` given = already
    normalized (locality weighting), used as they are."""
    if weights is not None:
        return [float(w) for w in weights]
    total = sum(h.weight for h in hosts)
    return [h.weight * 1.0 / total for h in hosts]


_warned: set = set()


def warn_once(what: str) -> None:
    if what not in _warned:
        _warned.add(what)
        log.warning("%s is not implemented; ignored", what)


def has_field(msg, field) -> bool:
    try:
        return msg.HasField(field)
    except ValueError:
        return False


def locality_config(msg):
    """``(locality_weighted, fail_traffic_on_panic)`` from a typed policy's ``locality_lb_config``."""
    if not has_field(msg, "locality_lb_config"):
        return None, None
    lc = msg.locality_lb_config
    if has_field(lc, "locality_weighted_lb_config"):
        return True, None
    if has_field(lc, "zone_aware_lb_config"):
        warn_once("zone-aware routing")
        return False, lc.zone_aware_lb_config.fail_traffic_on_panic
    return None, None
