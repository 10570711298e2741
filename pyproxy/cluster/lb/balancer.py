"""The load balancer over a ``PrioritySet``: priority load, panic, locality weighting and the
per-request ``choose`` that draws a priority slot and calls the policy's picker (see the
package docstring for the algorithm).
"""

from __future__ import annotations

from ...config.errors import ConfigError
from ..host import DEGRADED, HEALTHY, PrioritySet
from .base import DEFAULT_PANIC_THRESHOLD, Policy, getrandbits, rand, weighted_cycle


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
    """Chooses a host of a PrioritySet.

    ``choose(ctx=None) -> Host | None`` is an attribute: the closure built for the current hosts,
    loads and policy each time the balancer is (re)built (``_install``), so a request runs only
    what this build needs."""

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
        self.choose = None          # set by update()
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
                return _t[(getrandbits(64) if h is None else h) % _n](ctx)
        else:
            def pick(ctx, _t=table, _n=len(table), _r=rand):
                return _t[int(_r() * _n)](ctx)
        direct = getattr(pick, "direct", None)
        only = getattr(pick, "only", None)

        if only is not None:
            def choose(ctx=None):
                if ctx is None:
                    return only
                n = ctx.host_selection_max_attempts
                if n <= 1 or not ctx.should_select_another(only):
                    return only
                return _retry(ctx, n, only)
        elif direct is not None:
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
                ctx.hash_key = getrandbits(64)  # one random point for every attempt
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


# --------------------------------------------------------------------------------------------
# Construction from a Cluster proto

