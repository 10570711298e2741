"""Load balancers over a PrioritySet.

Built at config / update time, a ``LoadBalancer`` precomputes everything the per-request
``choose(ctx)`` needs:

1. **Priority load** (Envoy's algorithm). Per priority, ``health = min(100, OF * healthy / total)``
   and ``degraded = min(100, OF * degraded / total)`` with OF the overprovisioning factor (140).
   The normalized total availability is ``min(100, sum(health + degraded))``; healthy load is
   handed out first, priority by priority (``health * 100 / total_availability`` each, capped by
   what is left), then degraded load; rounding leftovers go to the first priority with
   availability. The result is a 100-slot table: a request draws one slot.
2. **Panic**: a priority whose (healthy + degraded) percentage is below ``healthy_panic_threshold``
   (default 50 %, 0 disables) balances across *all* its hosts, ignoring health (or fails, with
   ``zone_aware_lb_config.fail_traffic_on_panic``). When every priority is in panic, load is split
   by host count. A priority with no hosts counts as in panic.
3. **Host source**: the healthy (or degraded) hosts of the chosen priority; with
   ``locality_weighted_lb_config``, a locality is picked first by ``locality weight * min(1,
   OF/100 * healthy/total in locality)`` (weight-0 localities never chosen; when no locality is
   eligible, all healthy hosts of the priority are used), then a host inside it.
4. **Algorithm** per host source:
   ROUND_ROBIN — equal weights: plain rotation (``itertools.cycle``); unequal weights: a
   precomputed earliest-deadline-first schedule of one full period (exact: over ``sum(weights)``
   picks each host is chosen ``weight`` times), or a live EDF heap when the period would be huge.
   LEAST_REQUEST — equal weights: power of ``choice_count`` choices (default 2) on
   ``host.rq_active`` (or a full scan with ``selection_method: FULL_SCAN``/``enable_full_scan``);
   unequal weights: EDF whose weight is re-evaluated on every pick as
   ``weight / (rq_active + 1) ** active_request_bias``.
   RANDOM — uniform (Envoy ignores weights too).
   RING_HASH — Envoy's ring construction (entries ``"<host key>_<i>"`` scaled from
   ``minimum_ring_size``/``maximum_ring_size``); binary search of the 64-bit request hash.
   MAGLEV — Envoy's weighted Maglev permutation fill of a prime-size table (65537 default);
   lookup ``table[hash % size]``.
   The per-host hash key is ``metadata["envoy.lb"]["hash_key"]`` if present, else the hostname
   with ``use_hostname_for_hashing``, else ``ip:port``.
   **Hash function**: XXH64 with seed 0 (the ``xxhash`` package), as Envoy's ``HashUtil::xxHash64``:
   ring entries hash ``"<key>_<i>"``; Maglev sorts the hosts by key and takes the offset from
   ``xxh64(key) % size`` and the skip from ``xxh64(key, seed=1) % (size - 1) + 1``, then fills the
   table with Envoy's weighted iteration. Host weights are normalized as Envoy's thread-aware
   balancer does (``weight / sum``; with locality weighting ``weight * lw / sum(lw) / sum(w)``,
   localities in lexicographic order, raw locality weights). So the same request key lands on the
   same host as under Envoy. A retry that must select another host moves one ring entry further
   per attempt (ring) or xors the hash with ``2**64 - attempt`` (Maglev), as Envoy does; the
   priority is picked with ``hash % 100``. ``MURMUR_HASH_2`` rings are rejected (not implemented).
   When ``ctx.hash_key`` is None a random point is used.
   CLUSTER_PROVIDED (ORIGINAL_DST) — ``cluster_provided`` is True and ``choose`` returns None: the
   cluster picks the host itself.

Health is read when the balancer is built: after active health check / outlier ejection changes,
call ``lb.update()`` (or ``lb.update(new_priority_set)`` after an EDS / DNS update).

Per request: ``lb.choose(ctx) -> Host | None`` (``ctx`` may be None). With
``ctx.host_selection_max_attempts > 1`` a host for which ``ctx.should_select_another(host)`` holds
is re-picked (hash policies perturb the hash per attempt); the last pick is returned.

Not implemented (accepted, ignored, logged once): slow_start_config, hash_balance_factor (bounded
loads), zone-aware routing (needs the local cluster). (``update_merge_window`` is the cluster's:
see ``Cluster.hosts_health_changed``.)
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import random as _random_mod
from bisect import bisect_left

from xxhash import xxh64_intdigest

from ..config.errors import ConfigError
from ..config.registry import REGISTRY, unpack_any, type_name_of
from .host import DEGRADED, HEALTHY, Host, PrioritySet

log = logging.getLogger("pyproxy.cluster.lb")

_rng = _random_mod.Random()
_random = _rng.random
_getrandbits = _rng.getrandbits

_MASK64 = (1 << 64) - 1
SCHEDULE_MAX = 1 << 14       # longest precomputed weighted-RR period (entries)
DEFAULT_PANIC_THRESHOLD = 50.0
DEFAULT_MIN_RING = 1024
DEFAULT_MAX_RING = 8 * 1024 * 1024
DEFAULT_MAGLEV_TABLE = 65537
MAX_MAGLEV_TABLE = 5000011


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
    start = int(_random() * len(items))
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
            start = int(_random() * len(sched))
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


class RoundRobin(Policy):
    name = "ROUND_ROBIN"

    def picker(self, hosts, weights=None):
        nxt = weighted_cycle(hosts, [h.weight for h in hosts])
        pick = lambda ctx: nxt()  # noqa: E731
        pick.direct = nxt  # zero-argument form, called straight from choose()
        return pick


class Random(Policy):
    name = "RANDOM"

    def picker(self, hosts, weights=None):
        n = len(hosts)
        if n == 1:
            only = hosts[0]
            return lambda ctx: only
        hosts = list(hosts)
        return lambda ctx: hosts[int(_random() * n)]


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
            only = hosts[0]
            return lambda ctx: only
        first = hosts[0].weight
        if self.full_scan:
            def full(ctx):
                start = int(_random() * n)
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
                a = hosts[int(_random() * n)]
                b = hosts[int(_random() * n)]
                return b if b.rq_active < a.rq_active else a
            return p2c

        def pnc(ctx):
            best = hosts[int(_random() * n)]
            for _ in range(k - 1):
                c = hosts[int(_random() * n)]
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


def _host_hash_key(h: Host, use_hostname: bool) -> str:
    lbmd = h.metadata.get("envoy.lb") if h.metadata else None
    if lbmd:
        k = lbmd.get("hash_key")
        if isinstance(k, str) and k:
            return k
    if use_hostname and h.hostname:
        return h.hostname
    return h.key


def _normalized(hosts, weights):
    """Envoy's normalized host weights: ``weight / sum(weights)``; ``weights`` given = already
    normalized (locality weighting), used as they are."""
    if weights is not None:
        return [float(w) for w in weights]
    total = sum(h.weight for h in hosts)
    return [h.weight * 1.0 / total for h in hosts]


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
        norm = _normalized(hosts, weights)
        min_w = min(w for w in norm if w > 0)
        scale = min(math.ceil(min_w * self.min_ring) / min_w, float(self.max_ring))
        entries = []
        current = 0.0
        target = 0.0
        xx = xxh64_intdigest
        counts = []
        for h, w in zip(hosts, norm):
            prefix = (_host_hash_key(h, self.use_hostname) + "_").encode()
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
                i = bisect_left(keys, _getrandbits(64))
                return ring[i] if i < size else ring[0]
            h = ctx.hash_key
            i = bisect_left(keys, _getrandbits(64) if h is None else h)
            if i >= size:
                i = 0
            a = ctx.attempt
            if a:
                i = (i + a) % size
            return ring[i]
        pick.ring_size = size
        pick.lb_stats = self.last_stats  # (size, min hashes per host, max hashes per host)
        return pick


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
        norm = _normalized(hosts, weights)
        max_w = max(norm)
        # Envoy sorts the hosts by hash key first (a stable table whatever the config order)
        order = sorted(range(len(hosts)), key=lambda i: _host_hash_key(hosts[i], self.use_hostname))
        hosts = [hosts[i] for i in order]
        norm = [norm[i] for i in order]
        n = len(hosts)
        offsets = []
        skips = []
        xx = xxh64_intdigest
        for h in hosts:
            k = _host_hash_key(h, self.use_hostname).encode()
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
                return table[_getrandbits(64) % m]
            h = ctx.hash_key
            if h is None:
                h = _getrandbits(64)
            a = ctx.attempt
            if a:
                h ^= (1 << 64) - a
            return table[h % m]
        pick.lb_stats = self.last_stats  # (min entries per host, max entries per host)
        return pick


class ClusterProvided(Policy):
    name = "CLUSTER_PROVIDED"
    cluster_provided = True

    def picker(self, hosts, weights=None):
        return lambda ctx: None


def _no_host(ctx):
    return None


# --------------------------------------------------------------------------------------------
# The load balancer

def distribute_load(availability: list[int], total_load: int, normalized_total: int):
    """Envoy's distributeLoad: returns (loads, first_available_index or -1, remaining)."""
    loads = []
    first = -1
    for i, a in enumerate(availability):
        if a > 0 and first == -1:
            first = i
        load = min(total_load, a * 100 // normalized_total)
        loads.append(load)
        total_load -= load
    return loads, first, total_load


class LoadBalancer:
    """Chooses a host of a PrioritySet. ``choose`` is replaced per build by a specialized closure."""

    def __init__(self, policy: Policy, priority_set: PrioritySet, *,
                 panic_threshold: float = DEFAULT_PANIC_THRESHOLD, locality_weighted: bool = False,
                 fail_traffic_on_panic: bool = False, panic_counter=None, scope=None):
        if not 0.0 <= panic_threshold <= 100.0:
            raise ConfigError("healthy_panic_threshold must be within [0, 100]",
                              "common_lb_config.healthy_panic_threshold")
        self.policy = policy
        self.cluster_provided = policy.cluster_provided
        self.panic_threshold = panic_threshold
        self.locality_weighted = locality_weighted
        self.fail_traffic_on_panic = fail_traffic_on_panic
        self.panic_counter = panic_counter  # counts host picks in panic (``lb_healthy_panic``)
        # Envoy's ring_hash_lb.* / maglev_lb.* gauges, set when a ring / table is built
        self.hash_gauges = None
        if scope is not None and policy.name == "RING_HASH":
            self.hash_gauges = tuple(scope.gauge("ring_hash_lb." + n) for n in (
                "size", "min_hashes_per_host", "max_hashes_per_host"))
        elif scope is not None and policy.name == "MAGLEV":
            self.hash_gauges = tuple(scope.gauge("maglev_lb." + n) for n in (
                "min_entries_per_host", "max_entries_per_host"))
        self.priority_set = priority_set
        self.healthy_load: list[int] = []
        self.degraded_load: list[int] = []
        self.panic: list[bool] = []
        self._cache: dict = {}
        self.update(priority_set)

    @property
    def name(self) -> str:
        return self.policy.name

    # ---- build

    def update(self, priority_set: PrioritySet | None = None) -> None:
        """Recompute loads and pickers (new hosts, or health / ejection changes)."""
        if priority_set is not None:
            self.priority_set = priority_set
        ps = self.priority_set
        of = ps.overprovisioning_factor
        health, degr, panic, counts = [], [], [], []
        healthy_lists, degraded_lists = [], []
        for hosts in ps.priorities:
            hl = [h for h in hosts if h.health == HEALTHY and not h.outlier_ejected]
            dl = [h for h in hosts if h.health == DEGRADED and not h.outlier_ejected]
            n = len(hosts)
            healthy_lists.append(hl)
            degraded_lists.append(dl)
            counts.append(n)
            if n:
                health.append(min(100, of * len(hl) // n))
                degr.append(min(100, of * len(dl) // n))
            else:
                health.append(0)
                degr.append(0)
            if self.panic_threshold == 0:
                panic.append(False)
            else:
                pct = (100.0 * (len(hl) + len(dl)) / n) if n else 0.0
                panic.append(pct < self.panic_threshold)
        np_ = len(ps.priorities)
        hload = [0] * np_
        dload = [0] * np_
        total_hosts = sum(counts)
        if np_ and all(panic):
            # Total panic: split by host count.
            if total_hosts:
                rem = 100
                for i, c in enumerate(counts):
                    hload[i] = 100 * c // total_hosts
                    rem -= hload[i]
                if rem:
                    hload[next(i for i, c in enumerate(counts) if c)] += rem
        elif np_:
            norm_total = min(100, sum(health) + sum(degr))
            if norm_total == 0:
                hload[0] = 100
            else:
                hload, first_h, rem = distribute_load(health, 100, norm_total)
                dload, first_d, rem = distribute_load(degr, rem, norm_total)
                if rem:
                    if first_h != -1:
                        hload[first_h] += rem
                    elif first_d != -1:
                        dload[first_d] += rem
        self.healthy_load, self.degraded_load, self.panic = hload, dload, panic

        old_cache, self._cache = self._cache, {}
        # healthy load of every priority first, then degraded load (Envoy's choosePriority order:
        # a hash policy picks slot ``hash % 100``)
        slots = []
        for load, lists, kind in ((hload, healthy_lists, HEALTHY),
                                  (dload, degraded_lists, DEGRADED)):
            for p in range(np_):
                if load[p] <= 0:
                    continue
                f = self._source_picker(p, kind, lists[p], old_cache)
                slots.extend([f] * load[p])
        if not slots:
            table = None
        elif all(s is slots[0] for s in slots):
            table = slots[0]
        else:
            table = slots
        self._install(table)

    def _cached(self, key, make, old_cache):
        f = self._cache.get(key)
        if f is None:
            f = old_cache.get(key)
            if f is None:
                f = make()
            self._cache[key] = f
        return f

    def _flat(self, hosts, old_cache, weights=None):
        if not hosts:
            return _no_host
        key = ("flat", tuple(id(h) for h in hosts),
               tuple(h.weight for h in hosts) if weights is None else tuple(weights))
        return self._cached(key, lambda: self._make(list(hosts), weights), old_cache)

    def _make(self, hosts, weights):
        f = self.policy.picker(hosts, weights)
        g = self.hash_gauges
        if g is not None:
            for gauge, v in zip(g, f.lb_stats):
                gauge.set(v)
        return f

    def _source_picker(self, p: int, kind: int, eligible: list, old_cache):
        ps = self.priority_set
        if self.panic[p]:
            if self.fail_traffic_on_panic:
                return _no_host
            if self.policy.hash_based:
                f = self._hash_source(p, ps.priorities[p], old_cache)
            else:
                f = self._flat(ps.priorities[p], old_cache)
            c = self.panic_counter
            if c is None:
                return f

            def in_panic(ctx, _f=f, _c=c):
                _c.value += 1
                return _f(ctx)
            return in_panic
        if self.policy.hash_based:
            return self._hash_source(p, eligible, old_cache)
        if not self.locality_weighted or self.policy.cluster_provided:
            return self._flat(eligible, old_cache)
        # Locality weighted: effective weight = weight * min(1, OF/100 * eligible/total).
        of = ps.overprovisioning_factor / 100.0
        lweights = ps.localities[p] if p < len(ps.localities) else {}
        by_loc: dict = {}
        totals: dict = {}
        for h in ps.priorities[p]:
            totals[h.locality] = totals.get(h.locality, 0) + 1
        for h in eligible:
            by_loc.setdefault(h.locality, []).append(h)
        locs, effs = [], []
        for loc, hs in by_loc.items():
            eff = lweights.get(loc, 0) * min(1.0, of * len(hs) / totals[loc])
            if eff > 0:
                locs.append(loc)
                effs.append(eff)
        if not locs:
            return self._flat(eligible, old_cache)
        subs = [self._flat(by_loc[loc], old_cache) for loc in locs]
        if len(subs) == 1:
            return subs[0]
        choose_loc = weighted_cycle(subs, effs)

        def by_locality(ctx):
            return choose_loc()(ctx)
        return by_locality

    def _hash_source(self, p: int, hosts: list, old_cache):
        """One ring / Maglev table over ``hosts`` (the healthy ones, or all in panic), weighted as
        Envoy's thread-aware balancer normalizes them: with locality weighting, each locality's
        raw weight share (localities in lexicographic order, weight-0 ones left out) times the
        host's share of its locality."""
        if not self.locality_weighted:
            return self._flat(hosts, old_cache)
        ps = self.priority_set
        lweights = ps.localities[p] if p < len(ps.localities) else {}
        present = sorted({h.locality for h in ps.priorities[p]})
        lsum = sum(lweights.get(loc, 0) for loc in present)
        if lsum == 0:
            return _no_host
        by_loc: dict = {}
        for h in hosts:
            by_loc.setdefault(h.locality, []).append(h)
        out, ws = [], []
        for loc in present:
            lw = lweights.get(loc, 0)
            hs = by_loc.get(loc)
            if not lw or not hs:
                continue
            nlw = lw / lsum
            hsum = sum(h.weight for h in hs)
            for h in hs:
                out.append(h)
                ws.append(h.weight * nlw / hsum)
        return self._flat(out, old_cache, ws)

    def _install(self, table) -> None:
        hash_based = self.policy.hash_based
        if table is None:
            def pick(ctx):
                return None
        elif callable(table):
            pick = table
        elif hash_based:
            def pick(ctx, _t=table, _n=len(table)):
                h = ctx.hash_key if ctx is not None else None
                return _t[(_getrandbits(64) if h is None else h) % _n](ctx)
        else:
            def pick(ctx, _t=table, _n=len(table), _r=_random):
                return _t[int(_r() * _n)](ctx)
        self._pick = pick
        direct = getattr(pick, "direct", None)

        if direct is not None:
            def choose(ctx=None):
                h = direct()
                if ctx is None:
                    return h
                n = ctx.host_selection_max_attempts
                if n <= 1 or not ctx.should_select_another(h):
                    return h
                return _retry(ctx, n, h)
        else:
            def choose(ctx=None):
                h = pick(ctx)
                if ctx is None or h is None:
                    return h
                n = ctx.host_selection_max_attempts
                if n <= 1 or not ctx.should_select_another(h):
                    return h
                return _retry(ctx, n, h)

        def _retry(ctx, n, h):
            orig = ctx.hash_key
            if hash_based and orig is None:
                ctx.hash_key = _getrandbits(64)  # one random point for every attempt
            try:
                for attempt in range(1, n):
                    ctx.attempt = attempt
                    h2 = pick(ctx)
                    if h2 is None:
                        return h
                    h = h2
                    if not ctx.should_select_another(h):
                        return h
                return h
            finally:
                ctx.attempt = 0
                ctx.hash_key = orig
        self.choose = choose

    def choose(self, ctx: LbContext | None = None) -> Host | None:  # replaced in _install
        return self._pick(ctx)


# --------------------------------------------------------------------------------------------
# Construction from a Cluster proto

_warned: set = set()


def _warn_once(what: str) -> None:
    if what not in _warned:
        _warned.add(what)
        log.warning("%s is not implemented; ignored", what)


def _has(msg, field) -> bool:
    try:
        return msg.HasField(field)
    except ValueError:
        return False


def _ring_from_legacy(cluster) -> RingHash:
    cfg = cluster.ring_hash_lb_config
    use_host = cluster.common_lb_config.consistent_hashing_lb_config.use_hostname_for_hashing
    if cluster.common_lb_config.consistent_hashing_lb_config.HasField("hash_balance_factor"):
        _warn_once("hash_balance_factor")
    if cfg.hash_function == 1:
        raise ConfigError("ring hash function MURMUR_HASH_2 is not supported (use XX_HASH)",
                          "ring_hash_lb_config.hash_function")
    try:
        return RingHash(cfg.minimum_ring_size.value if _has(cfg, "minimum_ring_size") else DEFAULT_MIN_RING,
                        cfg.maximum_ring_size.value if _has(cfg, "maximum_ring_size") else DEFAULT_MAX_RING,
                        use_host)
    except ConfigError as e:
        raise e.within(field="ring_hash_lb_config")


def _maglev_from_legacy(cluster) -> Maglev:
    cfg = cluster.maglev_lb_config
    use_host = cluster.common_lb_config.consistent_hashing_lb_config.use_hostname_for_hashing
    try:
        return Maglev(cfg.table_size.value if _has(cfg, "table_size") else DEFAULT_MAGLEV_TABLE,
                      use_host)
    except ConfigError as e:
        raise e.within(field="maglev_lb_config")


def _lr_from_legacy(cluster) -> LeastRequest:
    cfg = cluster.least_request_lb_config
    if _has(cfg, "slow_start_config"):
        _warn_once("slow_start_config")
    try:
        return LeastRequest(cfg.choice_count.value if _has(cfg, "choice_count") else 2,
                            cfg.active_request_bias.default_value
                            if _has(cfg, "active_request_bias") else 1.0)
    except ConfigError as e:
        raise e.within(field="least_request_lb_config")


# Typed load_balancing_policy factories: f(config_message) -> (Policy, locality_weighted | None,
# fail_traffic_on_panic | None). None = not set by this config (cluster common_lb_config applies).

def _locality_cfg(msg):
    if not _has(msg, "locality_lb_config"):
        return None, None
    lc = msg.locality_lb_config
    if _has(lc, "locality_weighted_lb_config"):
        return True, None
    if _has(lc, "zone_aware_lb_config"):
        _warn_once("zone-aware routing")
        return False, lc.zone_aware_lb_config.fail_traffic_on_panic
    return None, None


def policy_round_robin(msg):
    if _has(msg, "slow_start_config"):
        _warn_once("slow_start_config")
    return (RoundRobin(),) + _locality_cfg(msg)


def policy_random(msg):
    return (Random(),) + _locality_cfg(msg)


def policy_least_request(msg):
    if _has(msg, "slow_start_config"):
        _warn_once("slow_start_config")
    full = msg.selection_method == 1 or (_has(msg, "enable_full_scan") and msg.enable_full_scan.value)
    lr = LeastRequest(msg.choice_count.value if _has(msg, "choice_count") else 2,
                      msg.active_request_bias.default_value
                      if _has(msg, "active_request_bias") else 1.0, full)
    return (lr,) + _locality_cfg(msg)


def policy_ring_hash(msg):
    use_host = msg.use_hostname_for_hashing or (
        _has(msg, "consistent_hashing_lb_config")
        and msg.consistent_hashing_lb_config.use_hostname_for_hashing)
    if _has(msg, "hash_balance_factor") or (_has(msg, "consistent_hashing_lb_config") and
                                            _has(msg.consistent_hashing_lb_config,
                                                 "hash_balance_factor")):
        _warn_once("hash_balance_factor")
    if msg.hash_function == 2:
        raise ConfigError("ring hash function MURMUR_HASH_2 is not supported (use XX_HASH)",
                          "hash_function")
    rh = RingHash(msg.minimum_ring_size.value if _has(msg, "minimum_ring_size") else DEFAULT_MIN_RING,
                  msg.maximum_ring_size.value if _has(msg, "maximum_ring_size") else DEFAULT_MAX_RING,
                  use_host)
    return rh, (True if _has(msg, "locality_weighted_lb_config") else None), None


def policy_maglev(msg):
    use_host = (_has(msg, "consistent_hashing_lb_config")
                and msg.consistent_hashing_lb_config.use_hostname_for_hashing)
    mg = Maglev(msg.table_size.value if _has(msg, "table_size") else DEFAULT_MAGLEV_TABLE, use_host)
    return mg, (True if _has(msg, "locality_weighted_lb_config") else None), None


def policy_cluster_provided(msg):
    return ClusterProvided(), None, None


_LBP = "envoy.extensions.load_balancing_policies."
for _t, _f, _n in (
        ("round_robin.v3.RoundRobin", policy_round_robin, "envoy.load_balancing_policies.round_robin"),
        ("least_request.v3.LeastRequest", policy_least_request,
         "envoy.load_balancing_policies.least_request"),
        ("random.v3.Random", policy_random, "envoy.load_balancing_policies.random"),
        ("ring_hash.v3.RingHash", policy_ring_hash, "envoy.load_balancing_policies.ring_hash"),
        ("maglev.v3.Maglev", policy_maglev, "envoy.load_balancing_policies.maglev"),
        ("cluster_provided.v3.ClusterProvided", policy_cluster_provided,
         "envoy.load_balancing_policies.cluster_provided")):
    REGISTRY.register("lb_policy", _LBP + _t, _f, names=(_n,))

_STATIC, _STRICT_DNS, _LOGICAL_DNS, _EDS, _ORIGINAL_DST = 0, 1, 2, 3, 4
_LB_NAMES = {0: "ROUND_ROBIN", 1: "LEAST_REQUEST", 2: "RING_HASH", 3: "RANDOM", 5: "MAGLEV",
             6: "CLUSTER_PROVIDED", 7: "LOAD_BALANCING_POLICY_CONFIG"}
_TYPE_NAMES = {0: "STATIC", 1: "STRICT_DNS", 2: "LOGICAL_DNS", 3: "EDS", 4: "ORIGINAL_DST"}


def _from_load_balancing_policy(cluster):
    errors = []
    for i, pol in enumerate(cluster.load_balancing_policy.policies):
        tec = pol.typed_extension_config
        if not tec.HasField("typed_config"):
            errors.append(tec.name)
            continue
        tname = type_name_of(tec.typed_config)
        factory = REGISTRY.lookup("lb_policy", tname)
        if factory is None or not callable(factory):
            errors.append(tname)
            continue
        try:
            return factory(unpack_any(tec.typed_config))
        except ConfigError as e:
            raise e.within(field="load_balancing_policy.policies[%d].typed_extension_config" % i)
    raise ConfigError("didn't find a registered load balancer factory implementation for cluster: "
                      "'%s' (tried: %s)" % (cluster.name, ", ".join(errors) or "nothing"),
                      "load_balancing_policy")


def create_lb(cluster, priority_set: PrioritySet, panic_counter=None, scope=None) -> LoadBalancer:
    """The load balancer for ``cluster`` (an ``envoy.config.cluster.v3.Cluster``).

    Reads ``load_balancing_policy`` (first supported entry wins) or else ``lb_policy`` with its
    ``*_lb_config``, and ``common_lb_config``. Raises ``ConfigError`` for unsupported policies and
    invalid combinations (ORIGINAL_DST needs CLUSTER_PROVIDED and vice versa). ``panic_counter``:
    a counter moved by every host pick in panic (the cluster's ``lb_healthy_panic``); ``scope``:
    the cluster's stats scope, for the ``ring_hash_lb.*`` / ``maglev_lb.*`` gauges.
    """
    try:
        return _create_lb(cluster, priority_set, panic_counter, scope)
    except ConfigError as e:
        raise e.within(resource="cluster '%s'" % cluster.name)


def _create_lb(cluster, priority_set: PrioritySet, panic_counter=None,
               scope=None) -> LoadBalancer:
    ctype = cluster.type if cluster.WhichOneof("cluster_discovery_type") != "cluster_type" else None
    locality_weighted = None
    fail_on_panic = None
    if len(cluster.load_balancing_policy.policies):
        policy, locality_weighted, fail_on_panic = _from_load_balancing_policy(cluster)
    else:
        lp = cluster.lb_policy
        if lp == 0:
            if _has(cluster, "round_robin_lb_config") and \
                    _has(cluster.round_robin_lb_config, "slow_start_config"):
                _warn_once("slow_start_config")
            policy = RoundRobin()
        elif lp == 1:
            policy = _lr_from_legacy(cluster)
        elif lp == 2:
            policy = _ring_from_legacy(cluster)
        elif lp == 3:
            policy = Random()
        elif lp == 5:
            policy = _maglev_from_legacy(cluster)
        elif lp == 6:
            policy = ClusterProvided()
        elif lp == 7:
            raise ConfigError("LOAD_BALANCING_POLICY_CONFIG needs load_balancing_policy",
                              "load_balancing_policy")
        else:
            raise ConfigError("unsupported lb_policy %d" % lp, "lb_policy")
    if ctype == _ORIGINAL_DST and not policy.cluster_provided:
        raise ConfigError("LB policy %s is not valid for Cluster type ORIGINAL_DST. Only "
                          "'CLUSTER_PROVIDED' is allowed with cluster type 'ORIGINAL_DST'"
                          % policy.name, "lb_policy")
    if policy.cluster_provided and ctype is not None and ctype != _ORIGINAL_DST:
        raise ConfigError("cluster provided LB specified but cluster '%s' did not provide one. "
                          "Check cluster documentation." % cluster.name, "lb_policy")
    clc = cluster.common_lb_config
    panic = DEFAULT_PANIC_THRESHOLD
    if _has(cluster, "common_lb_config"):
        if _has(clc, "healthy_panic_threshold"):
            panic = clc.healthy_panic_threshold.value
        if locality_weighted is None:
            locality_weighted = _has(clc, "locality_weighted_lb_config")
        if fail_on_panic is None and _has(clc, "zone_aware_lb_config"):
            fail_on_panic = clc.zone_aware_lb_config.fail_traffic_on_panic
        if _has(clc, "zone_aware_lb_config"):
            _warn_once("zone-aware routing")
    return LoadBalancer(policy, priority_set, panic_threshold=panic,
                        locality_weighted=bool(locality_weighted),
                        fail_traffic_on_panic=bool(fail_on_panic), panic_counter=panic_counter,
                        scope=scope)
