"""Load balancers over a PrioritySet: one module per policy, registered by type URL.

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

Layout: ``base`` (context, hash, weighted rotation, the ``Policy`` / ``PolicyFactory`` interfaces),
``balancer`` (``LoadBalancer``: priorities, panic, localities), one module per policy
(``round_robin``, ``least_request``, ``random``, ``ring_hash``, ``maglev``, ``cluster_provided``),
each registered in ``pyproxy/extensions.py`` under its ``load_balancing_policy`` type URL and
imported only when a cluster uses it. The legacy ``lb_policy`` enum maps onto the same
registrations (``factory.from_cluster(cluster)``).

Not implemented (accepted, ignored, logged once): slow_start_config, hash_balance_factor (bounded
loads), zone-aware routing (needs the local cluster). (``update_merge_window`` is the cluster's:
see ``Cluster.hosts_health_changed``.)
"""

from __future__ import annotations

from ... import extensions  # noqa: F401 (the table naming each policy's module)
from ...config.errors import ConfigError
from ...config.registry import REGISTRY, type_name_of, unpack_any
from ..host import PrioritySet
from .balancer import LoadBalancer, distribute_load
from .base import DEFAULT_PANIC_THRESHOLD, LbContext, Policy, has_field, hash_bytes, warn_once

__all__ = ("LbContext", "LoadBalancer", "Policy", "create_lb", "distribute_load", "hash_bytes",
           "REGISTRY")

LB_POLICY_TYPE = "envoy.extensions.load_balancing_policies."
# the legacy ``lb_policy`` enum -> the load_balancing_policy type registered for it
_LEGACY_TYPES = {0: "round_robin.v3.RoundRobin", 1: "least_request.v3.LeastRequest",
                 2: "ring_hash.v3.RingHash", 3: "random.v3.Random", 5: "maglev.v3.Maglev",
                 6: "cluster_provided.v3.ClusterProvided"}
_ORIGINAL_DST = 4


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
        if lp == 7:
            raise ConfigError("LOAD_BALANCING_POLICY_CONFIG needs load_balancing_policy",
                              "load_balancing_policy")
        tname = _LEGACY_TYPES.get(lp)
        if tname is None:
            raise ConfigError("unsupported lb_policy %d" % lp, "lb_policy")
        policy = REGISTRY.lookup("lb_policy", LB_POLICY_TYPE + tname).from_cluster(cluster)
    if ctype == _ORIGINAL_DST and not policy.cluster_provided:
        raise ConfigError("LB policy %s is not valid for Cluster type ORIGINAL_DST. Only "
                          "'CLUSTER_PROVIDED' is allowed with cluster type 'ORIGINAL_DST'"
                          % policy.name, "lb_policy")
    if policy.cluster_provided and ctype is not None and ctype != _ORIGINAL_DST:
        raise ConfigError("cluster provided LB specified but cluster '%s' did not provide one. "
                          "Check cluster documentation." % cluster.name, "lb_policy")
    clc = cluster.common_lb_config
    panic = DEFAULT_PANIC_THRESHOLD
    if has_field(cluster, "common_lb_config"):
        if has_field(clc, "healthy_panic_threshold"):
            panic = clc.healthy_panic_threshold.value
        if locality_weighted is None:
            locality_weighted = has_field(clc, "locality_weighted_lb_config")
        if fail_on_panic is None and has_field(clc, "zone_aware_lb_config"):
            fail_on_panic = clc.zone_aware_lb_config.fail_traffic_on_panic
        if has_field(clc, "zone_aware_lb_config"):
            warn_once("zone-aware routing")
    return LoadBalancer(policy, priority_set, panic_threshold=panic,
                        locality_weighted=bool(locality_weighted),
                        fail_traffic_on_panic=bool(fail_on_panic), panic_counter=panic_counter,
                        scope=scope)
