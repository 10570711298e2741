import collections

import pytest
from google.protobuf import json_format
from envoy.config.cluster.v3 import cluster_pb2

from pyproxy.cluster import lb as L
from pyproxy.cluster.lb.base import host_hash_key
from pyproxy.cluster.lb.cluster_provided import ClusterProvided
from pyproxy.cluster.lb.least_request import LeastRequest
from pyproxy.cluster.lb.maglev import Maglev
from pyproxy.cluster.lb.random import Random
from pyproxy.cluster.lb.ring_hash import RingHash
from pyproxy.cluster.lb.round_robin import RoundRobin
from pyproxy.cluster.host import DEGRADED, HEALTHY, UNHEALTHY, Host, PrioritySet
from pyproxy.config.errors import ConfigError


def hosts(n, prefix="10.0.0.", weights=None, health=None, priority=0, locality=("", "", "")):
    out = []
    for i in range(n):
        out.append(Host("%s%d" % (prefix, i + 1), 80,
                        weight=weights[i] if weights else 1,
                        health=health[i] if health else HEALTHY,
                        priority=priority, locality=locality))
    return out


def counts(lb, n, ctx=None):
    return collections.Counter(lb.choose(ctx) for _ in range(n))


def cluster(d):
    return json_format.ParseDict(dict({"name": "c"}, **d), cluster_pb2.Cluster())


# ---- round robin

def test_round_robin_equal_weights_rotates_exactly():
    hs = hosts(5)
    lb = L.LoadBalancer(RoundRobin(), PrioritySet([hs]))
    seq = [lb.choose() for _ in range(10)]
    assert seq[:5] == seq[5:] and set(seq[:5]) == set(hs)


def test_weighted_round_robin_exact_over_period():
    hs = hosts(4, weights=[1, 2, 3, 4])
    lb = L.LoadBalancer(RoundRobin(), PrioritySet([hs]))
    c = counts(lb, 10 * 50)
    assert [c[h] for h in hs] == [50, 100, 150, 200]
    # Smooth: the heaviest host never gets more than 2 consecutive picks out of 10.
    seq = [lb.choose() for _ in range(10)]
    assert max(len(list(g)) for _, g in __import__("itertools").groupby(seq)) <= 2


def test_weighted_round_robin_gcd_and_big_weights_edf():
    hs = hosts(3, weights=[100, 200, 300])
    lb = L.LoadBalancer(RoundRobin(), PrioritySet([hs]))
    c = counts(lb, 600)
    assert [c[h] for h in hs] == [100, 200, 300]
    # Sum beyond the precomputed schedule: the live EDF heap stays within 1 of exact.
    big = hosts(3, weights=[10007, 20011, 30011])
    lb = L.LoadBalancer(RoundRobin(), PrioritySet([big]))
    total = 10007 + 20011 + 30011
    c = counts(lb, total)
    for h in big:
        assert abs(c[h] - h.weight) <= 1


# ---- least request / random

def test_p2c_prefers_less_loaded():
    hs = hosts(4)
    hs[0].rq_active = 0
    for h in hs[1:]:
        h.rq_active = 10
    hs[3].rq_active = 100
    lb = L.LoadBalancer(LeastRequest(), PrioritySet([hs]))
    c = counts(lb, 20000)
    # P(least loaded) = 1 - (3/4)^2 = 0.4375; P(most loaded) = (1/4)^2 = 0.0625
    assert 0.40 < c[hs[0]] / 20000 < 0.48
    assert c[hs[3]] / 20000 < 0.08


def test_least_request_choice_count_and_full_scan():
    hs = hosts(8)
    for i, h in enumerate(hs):
        h.rq_active = i
    lb = L.LoadBalancer(LeastRequest(choice_count=8), PrioritySet([hs]))
    c = counts(lb, 5000)
    assert c[hs[0]] / 5000 > 0.6  # 1 - (7/8)^8 = 0.656
    lb = L.LoadBalancer(LeastRequest(full_scan=True), PrioritySet([hs]))
    assert set(counts(lb, 100)) == {hs[0]}
    with pytest.raises(ConfigError):
        LeastRequest(choice_count=1)


def test_weighted_least_request_uses_weight_and_load():
    hs = hosts(2, weights=[2, 1])
    lb = L.LoadBalancer(LeastRequest(), PrioritySet([hs]))
    c = counts(lb, 3000)
    assert abs(c[hs[0]] - 2000) <= 2
    hs[0].rq_active = 3  # effective 2/4 = 0.5 vs 1/1
    lb.update()
    c = counts(lb, 3000)
    assert abs(c[hs[1]] - 2000) <= 5


def test_random_roughly_uniform():
    hs = hosts(4)
    lb = L.LoadBalancer(Random(), PrioritySet([hs]))
    c = counts(lb, 20000)
    for h in hs:
        assert 0.22 < c[h] / 20000 < 0.28


# ---- hash based

def _keys(n):
    return [L.hash_bytes(b"user-%d" % i) for i in range(n)]


def _mapping(lb, keys):
    ctx = L.LbContext()
    out = []
    for k in keys:
        ctx.hash_key = k
        out.append(lb.choose(ctx))
    return out


@pytest.mark.parametrize("policy", [RingHash(), Maglev()])
def test_hash_consistency_on_removal(policy):
    hs = hosts(10)
    keys = _keys(5000)
    lb = L.LoadBalancer(policy, PrioritySet([hs]))
    before = _mapping(lb, keys)
    assert _mapping(L.LoadBalancer(policy, PrioritySet([list(hs)])), keys) == before  # stable
    share = collections.Counter(before)
    assert all(300 < share[h] < 700 for h in hs), share
    gone = hs[3]
    lb2 = L.LoadBalancer(policy, PrioritySet([hs[:3] + hs[4:]]))
    after = _mapping(lb2, keys)
    moved = sum(1 for a, b in zip(before, after) if a is not b)
    moved_other = sum(1 for a, b in zip(before, after) if a is not b and a is not gone)
    assert moved >= share[gone]
    if isinstance(policy, RingHash):
        # Envoy's ring is rescaled to the host count (1024/9 -> 114 entries per host instead of
        # 103), so besides the removed host's ~1/N a further ~1/N moves to the new entries.
        assert moved / len(keys) < 0.22
        assert moved_other / len(keys) < 0.12
    else:
        assert moved / len(keys) < 0.14  # about 1/N
        assert moved_other / len(keys) < 0.03
    assert gone not in after


def test_ring_hash_weights_and_sizes():
    hs = hosts(2, weights=[1, 3])
    pick = RingHash().picker(hs)
    assert pick.ring_size == 1024  # least weight gets ceil(0.25 * 1024) entries
    assert RingHash().picker(hosts(2, weights=[1, 1000])).ring_size == 2002  # 2 + 2000
    lb = L.LoadBalancer(RingHash(min_ring=256, max_ring=1024), PrioritySet([hs]))
    c = collections.Counter(_mapping(lb, _keys(8000)))
    assert 0.65 < c[hs[1]] / 8000 < 0.85
    assert RingHash(min_ring=8, max_ring=8).picker(hs).ring_size == 8
    with pytest.raises(ConfigError, match=r"minimum_ring_size \(2000\) > maximum_ring_size"):
        RingHash(min_ring=2000, max_ring=1000)


def test_maglev_weights_and_table_size():
    hs = hosts(2, weights=[1, 3])
    lb = L.LoadBalancer(Maglev(table_size=1009), PrioritySet([hs]))
    c = collections.Counter(_mapping(lb, _keys(8000)))
    assert 0.70 < c[hs[1]] / 8000 < 0.80
    with pytest.raises(ConfigError, match="prime"):
        Maglev(table_size=65536)


def test_hash_without_key_is_random_and_metadata_hash_key():
    hs = hosts(4)
    lb = L.LoadBalancer(RingHash(), PrioritySet([hs]))
    assert len(set(counts(lb, 400))) == 4
    a = Host("10.9.9.9", 80)
    b = Host("10.9.9.8", 80)
    b.metadata = {"envoy.lb": {"hash_key": "10.9.9.9:80"}}
    ka = _mapping(L.LoadBalancer(Maglev(table_size=1009), PrioritySet([[a]])), [1])
    assert host_hash_key(b, False) == host_hash_key(a, False)
    assert ka == [a]


# ---- priorities, panic, degraded, localities

def test_priority_spillover():
    p0 = hosts(10, health=[HEALTHY] * 7 + [UNHEALTHY] * 3)
    p1 = hosts(4, prefix="10.1.0.", priority=1)
    lb = L.LoadBalancer(RoundRobin(), PrioritySet([p0, p1]))
    assert lb.healthy_load == [98, 2] and lb.panic == [False, False]
    for h in p0[5:7]:
        h.health = UNHEALTHY
    lb.update()
    assert lb.healthy_load == [70, 30]
    c = counts(lb, 10000)
    assert all(c[h] == 0 for h in p0[5:])
    assert 0.66 < sum(c[h] for h in p0) / 10000 < 0.74


def test_panic_uses_all_hosts_of_priority():
    p0 = hosts(10, health=[HEALTHY] * 4 + [UNHEALTHY] * 6)  # 40% < 50%: panic
    p1 = hosts(2, prefix="10.1.0.", priority=1)
    lb = L.LoadBalancer(RoundRobin(), PrioritySet([p0, p1]))
    assert lb.panic == [True, False] and lb.healthy_load == [56, 44]
    c = counts(lb, 10000)
    assert all(c[h] > 0 for h in p0)  # unhealthy ones included
    # Panic disabled: unhealthy never chosen.
    lb = L.LoadBalancer(RoundRobin(), PrioritySet([p0, p1]), panic_threshold=0)
    c = counts(lb, 5000)
    assert all(c[h] == 0 for h in p0[4:]) and lb.panic == [False, False]
    # fail_traffic_on_panic: the panicking priority's share fails.
    lb = L.LoadBalancer(RoundRobin(), PrioritySet([p0, p1]), fail_traffic_on_panic=True)
    c = counts(lb, 5000)
    assert 0.5 < c[None] / 5000 < 0.62


def test_total_panic_splits_by_host_count_and_empty():
    p0 = hosts(3, health=[UNHEALTHY] * 3)
    p1 = hosts(1, prefix="10.1.0.", priority=1, health=[UNHEALTHY])
    lb = L.LoadBalancer(RoundRobin(), PrioritySet([p0, p1]))
    assert lb.panic == [True, True] and lb.healthy_load == [75, 25]
    assert L.LoadBalancer(RoundRobin(), PrioritySet([])).choose() is None
    assert L.LoadBalancer(RoundRobin(), PrioritySet([[], []])).choose() is None
    # An empty first priority spills everything to the next.
    lb = L.LoadBalancer(LeastRequest(), PrioritySet([[], hosts(2, priority=1)]))
    assert lb.healthy_load == [0, 100] and lb.choose() is not None


def test_degraded_hosts():
    p0 = hosts(4, health=[DEGRADED] * 4)
    lb = L.LoadBalancer(RoundRobin(), PrioritySet([p0]))
    assert lb.healthy_load == [0] and lb.degraded_load == [100] and lb.panic == [False]
    assert set(counts(lb, 8)) == set(p0)
    # Healthy hosts in a lower priority win over degraded ones in a higher priority.
    p1 = hosts(2, prefix="10.1.0.", priority=1)
    lb = L.LoadBalancer(RoundRobin(), PrioritySet([p0, p1]))
    assert lb.healthy_load == [0, 100] and lb.degraded_load == [0, 0]
    # Half degraded, half healthy in one priority.
    mix = hosts(4, health=[HEALTHY, HEALTHY, DEGRADED, DEGRADED])
    lb = L.LoadBalancer(RoundRobin(), PrioritySet([mix]))
    assert lb.healthy_load == [70] and lb.degraded_load == [30]


def test_outlier_ejection_after_update():
    hs = hosts(3)
    lb = L.LoadBalancer(RoundRobin(), PrioritySet([hs]))
    hs[0].outlier_ejected = True
    lb.update()
    assert hs[0] not in set(counts(lb, 30))


def _loc_set(weights, n=4, unhealthy=None):
    unhealthy = unhealthy or {}
    prio, locs = [], {}
    for li, w in enumerate(weights):
        loc = ("r", "z%d" % li, "")
        locs[loc] = w
        bad = unhealthy.get(li, 0)
        prio += hosts(n, prefix="10.%d.0." % li, locality=loc,
                      health=[UNHEALTHY] * bad + [HEALTHY] * (n - bad))
    return PrioritySet([prio], [locs]), prio


def test_locality_weighted():
    ps, hs = _loc_set([1, 3])
    lb = L.LoadBalancer(RoundRobin(), ps, locality_weighted=True)
    c = counts(lb, 4000)
    assert sum(c[h] for h in hs[:4]) == 1000 and sum(c[h] for h in hs[4:]) == 3000
    # Flat without the option.
    lb = L.LoadBalancer(RoundRobin(), ps)
    c = counts(lb, 4000)
    assert sum(c[h] for h in hs[:4]) == 2000
    # Locality health scales its weight: z1 has 2/4 healthy -> 3 * min(1, 1.4 * 0.5) = 2.1
    ps, hs = _loc_set([1, 3], unhealthy={1: 2})
    lb = L.LoadBalancer(RoundRobin(), ps, locality_weighted=True)
    c = counts(lb, 3100)
    assert abs(sum(c[h] for h in hs[4:]) - 2100) <= 2
    # Weight-0 localities are never chosen.
    ps, hs = _loc_set([0, 1])
    lb = L.LoadBalancer(Random(), ps, locality_weighted=True)
    assert not set(counts(lb, 200)) & set(hs[:4])


def test_locality_weighted_hash_policy():
    ps, hs = _loc_set([1, 3])
    lb = L.LoadBalancer(Maglev(table_size=4001), ps, locality_weighted=True)
    c = collections.Counter(_mapping(lb, _keys(8000)))
    assert 0.70 < sum(c[h] for h in hs[4:]) / 8000 < 0.80


# ---- retries / context

def test_should_select_another():
    hs = hosts(3)
    for policy in (RoundRobin(), Random(), LeastRequest(), RingHash(), Maglev()):
        lb = L.LoadBalancer(policy, PrioritySet([hs]))
        ctx = L.LbContext(hash_key=12345, host_selection_max_attempts=60,
                          previous_hosts={hs[0], hs[1]})
        got = {lb.choose(ctx) for _ in range(20)}
        assert got == {hs[2]}, policy.name
        assert ctx.hash_key == 12345
    ctx = L.LbContext(host_selection_max_attempts=5, predicate=lambda h: True)
    assert L.LoadBalancer(RoundRobin(), PrioritySet([hs])).choose(ctx) in hs


def test_one_host_is_chosen_without_a_pick_and_retries_keep_it():
    """A one-host list: every policy without per-pick state returns its host from choose()
    directly; a retry predicate that rejects it still ends on it (the attempts run out)."""
    (h,) = hosts(1)
    for policy in (RoundRobin(), Random(), LeastRequest()):
        lb = L.LoadBalancer(policy, PrioritySet([[h]]))
        assert lb.choose() is h and lb.choose(L.LbContext()) is h, policy.name
        tried = []
        ctx = L.LbContext(host_selection_max_attempts=4, predicate=lambda x: tried.append(x) or True)
        assert lb.choose(ctx) is h and tried == [h] * 4, policy.name
        assert ctx.attempt == 0
        # the host set changes: choose() follows it (and back to one host)
        h2, h3 = hosts(2)
        lb.priority_set.priorities[0] = [h2, h3]
        lb.update()
        assert {lb.choose() for _ in range(60)} == {h2, h3}, policy.name
        lb.priority_set.priorities[0] = [h3]
        lb.update()
        assert lb.choose() is h3, policy.name


# ---- create_lb

def ps3():
    return PrioritySet([hosts(3)])


@pytest.mark.parametrize("d, cls", [
    ({}, RoundRobin),
    ({"lb_policy": "LEAST_REQUEST", "least_request_lb_config": {"choice_count": 3}},
     LeastRequest),
    ({"lb_policy": "RANDOM"}, Random),
    ({"lb_policy": "RING_HASH", "ring_hash_lb_config": {"minimum_ring_size": 64}}, RingHash),
    ({"lb_policy": "MAGLEV", "maglev_lb_config": {"table_size": 1009}}, Maglev),
    ({"type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED"}, ClusterProvided),
])
def test_create_lb_lb_policy(d, cls):
    lb = L.create_lb(cluster(d), ps3())
    assert isinstance(lb.policy, cls)
    if cls is ClusterProvided:
        assert lb.cluster_provided and lb.choose() is None
    else:
        assert not lb.cluster_provided and lb.choose() is not None
    if cls is LeastRequest:
        assert lb.policy.choice_count == 3
    if cls is RingHash:
        assert lb.policy.min_ring == 64


def test_create_lb_errors():
    with pytest.raises(ConfigError, match="Only 'CLUSTER_PROVIDED' is allowed"):
        L.create_lb(cluster({"type": "ORIGINAL_DST"}), ps3())
    with pytest.raises(ConfigError, match="did not provide one"):
        L.create_lb(cluster({"lb_policy": "CLUSTER_PROVIDED"}), ps3())
    with pytest.raises(ConfigError, match="maximum_ring_size") as ei:
        L.create_lb(cluster({"lb_policy": "RING_HASH", "ring_hash_lb_config": {
            "minimum_ring_size": 2000, "maximum_ring_size": 1000}}), ps3())
    assert "cluster 'c'" in str(ei.value)
    with pytest.raises(ConfigError, match="prime"):
        L.create_lb(cluster({"lb_policy": "MAGLEV", "maglev_lb_config": {"table_size": 1000}}),
                    ps3())
    with pytest.raises(ConfigError, match="load_balancing_policy"):
        L.create_lb(cluster({"lb_policy": "LOAD_BALANCING_POLICY_CONFIG"}), ps3())


def test_create_lb_common_config():
    lb = L.create_lb(cluster({"common_lb_config": {
        "healthy_panic_threshold": {"value": 0}, "locality_weighted_lb_config": {}}}), ps3())
    assert lb.panic_threshold == 0 and lb.locality_weighted
    lb = L.create_lb(cluster({}), ps3())
    assert lb.panic_threshold == 50 and not lb.locality_weighted
    lb = L.create_lb(cluster({"common_lb_config": {
        "zone_aware_lb_config": {"fail_traffic_on_panic": True}}}), ps3())
    assert lb.fail_traffic_on_panic


TP = "type.googleapis.com/envoy.extensions.load_balancing_policies."


def test_create_lb_load_balancing_policy():
    d = {"load_balancing_policy": {"policies": [
        {"typed_extension_config": {"name": "x", "typed_config": {
            "@type": TP + "client_side_weighted_round_robin.v3.ClientSideWeightedRoundRobin"}}},
        {"typed_extension_config": {"name": "y", "typed_config": {
            "@type": TP + "least_request.v3.LeastRequest", "choice_count": 4,
            "locality_lb_config": {"locality_weighted_lb_config": {}}}}}]}}
    from envoy.extensions.load_balancing_policies.client_side_weighted_round_robin.v3 import \
        client_side_weighted_round_robin_pb2  # noqa: F401 (type for JSON parsing)
    from envoy.extensions.load_balancing_policies.least_request.v3 import least_request_pb2  # noqa
    lb = L.create_lb(cluster(d), ps3())
    assert isinstance(lb.policy, LeastRequest) and lb.policy.choice_count == 4
    assert lb.locality_weighted
    for t, cls, extra in (("round_robin.v3.RoundRobin", RoundRobin, {}),
                          ("random.v3.Random", Random, {}),
                          ("ring_hash.v3.RingHash", RingHash, {"minimum_ring_size": 16}),
                          ("maglev.v3.Maglev", Maglev, {"table_size": 101})):
        L.REGISTRY.lookup("lb_policy", "envoy.extensions.load_balancing_policies." + t)
        from pyproxy.config.registry import message_class
        message_class("envoy.extensions.load_balancing_policies." + t)
        d = {"load_balancing_policy": {"policies": [{"typed_extension_config": {
            "name": "z", "typed_config": dict({"@type": TP + t}, **extra)}}]}}
        lb = L.create_lb(cluster(d), ps3())
        assert isinstance(lb.policy, cls) and lb.choose(L.LbContext(hash_key=5)) is not None
    with pytest.raises(ConfigError, match="didn't find a registered load balancer"):
        L.create_lb(cluster({"load_balancing_policy": {"policies": [
            {"typed_extension_config": {"name": "x", "typed_config": {
                "@type": TP + "client_side_weighted_round_robin.v3.ClientSideWeightedRoundRobin"}}}
        ]}}), ps3())
    with pytest.raises(ConfigError, match="prime"):
        L.create_lb(cluster({"load_balancing_policy": {"policies": [{"typed_extension_config": {
            "name": "z", "typed_config": {"@type": TP + "maglev.v3.Maglev", "table_size": 100}}}]}}),
            ps3())


def test_registry_entries():
    for t in ("round_robin.v3.RoundRobin", "least_request.v3.LeastRequest", "random.v3.Random",
              "ring_hash.v3.RingHash", "maglev.v3.Maglev", "cluster_provided.v3.ClusterProvided"):
        assert callable(L.REGISTRY.lookup("lb_policy", "envoy.extensions.load_balancing_policies." + t))


def test_legacy_lb_policy_uses_the_registered_extension(monkeypatch):
    """The legacy ``lb_policy`` enum maps onto the same registry entries as the typed
    ``load_balancing_policy``: replacing the registered factory changes both."""
    from pyproxy.cluster.lb.base import PolicyFactory
    t = "envoy.extensions.load_balancing_policies.least_request.v3.LeastRequest"
    real = L.REGISTRY.lookup("lb_policy", t)
    assert isinstance(real, PolicyFactory)
    seen = []

    class Marked(LeastRequest):
        pass

    def legacy(c):
        seen.append(c.name)
        return Marked(3)
    monkeypatch.setitem(L.REGISTRY._by_type, ("lb_policy", t), PolicyFactory(real.typed, legacy))
    lb = L.create_lb(cluster({"lb_policy": "LEAST_REQUEST"}), ps3())
    assert isinstance(lb.policy, Marked) and lb.policy.choice_count == 3 and seen == ["c"]
    # every legacy enum value but LOAD_BALANCING_POLICY_CONFIG names a registered policy module
    for enum, mod in ((0, "round_robin"), (1, "least_request"), (2, "ring_hash"), (3, "random"),
                      (5, "maglev"), (6, "cluster_provided")):
        f = L.REGISTRY.lookup("lb_policy", L.LB_POLICY_TYPE + L._LEGACY_TYPES[enum])
        assert isinstance(f, PolicyFactory) and f.typed.__module__ == "pyproxy.cluster.lb." + mod
