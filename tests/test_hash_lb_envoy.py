"""Consistent hashing that agrees with Envoy: the same endpoints and request keys land on the same
upstream under pyproxy and under Envoy (ring hash and Maglev, weighted hosts, locality weighting,
header / cookie / query-parameter hash policies).

Both proxies run the same bootstrap in front of the same backends; every request carries its own
key, and each backend answers with its name, so the key -> backend maps can be compared.
"""

from __future__ import annotations

import http.client

import pytest

from proxy_util import (ENVOY, Envoy, HttpBackend, Pyproxy, bootstrap, free_port, http_listener,
                        route, route_config, with_fresh_ports)

pytestmark = pytest.mark.skipif(not ENVOY, reason="envoy binary not available")

N_KEYS = 250
LBP = "type.googleapis.com/envoy.extensions.load_balancing_policies."


def _cluster(name, backends, *, weights=None, localities=None, **extra):
    """STATIC cluster; ``localities``: list of (zone, locality weight, [backend indexes])."""
    def ep(i):
        e = {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1",
                                                         "port_value": backends[i].port}}}}
        if weights:
            e["load_balancing_weight"] = weights[i]
        return e
    if localities:
        eps = [{"locality": {"region": "r", "zone": z}, "load_balancing_weight": lw,
                "lb_endpoints": [ep(i) for i in idx]} for z, lw, idx in localities]
    else:
        eps = [{"lb_endpoints": [ep(i) for i in range(len(backends))]}]
    c = {"name": name, "type": "STATIC", "connect_timeout": "1s",
         "load_assignment": {"cluster_name": name, "endpoints": eps}}
    c.update(extra)
    return c


def _choices(port, prefix, keys, kind):
    """key -> backend name, over one keep-alive connection."""
    out = {}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        for k in keys:
            path = prefix + "/"
            headers = {"Host": "example.com"}
            if kind == "header":
                headers["x-key"] = k
            elif kind == "cookie":
                headers["cookie"] = "a=1; session=%s; z=2" % k
            elif kind == "query":
                path = prefix + "/?user=" + k
            conn.request("GET", path, headers=headers)
            r = conn.getresponse()
            r.read()
            assert r.status == 200, (prefix, k, r.status)
            out[k] = r.getheader("x-backend")
    finally:
        conn.close()
    return out


CASES = [
    # (route prefix, hash policy kind, cluster factory kwargs)
    ("/ring", "header", dict(lb_policy="RING_HASH")),
    ("/ring-small-weighted", "header",
     dict(lb_policy="RING_HASH", weights=[1, 2, 3, 1, 5, 1, 2],
          ring_hash_lb_config={"minimum_ring_size": 64, "maximum_ring_size": 4096})),
    ("/maglev", "header", dict(lb_policy="MAGLEV")),
    ("/maglev-weighted", "header", dict(lb_policy="MAGLEV", weights=[3, 1, 1, 7, 2, 1, 4])),
    ("/maglev-small", "header", dict(lb_policy="MAGLEV", maglev_lb_config={"table_size": 307})),
    ("/maglev-cookie", "cookie", dict(lb_policy="MAGLEV")),
    ("/ring-typed", "query", dict(load_balancing_policy={"policies": [{"typed_extension_config": {
        "name": "envoy.load_balancing_policies.ring_hash",
        "typed_config": {"@type": LBP + "ring_hash.v3.RingHash", "minimum_ring_size": 128}}}]})),
    ("/maglev-locality", "header", dict(
        localities=[("z2", 3, [4, 5, 6]), ("z1", 1, [0, 1]), ("z3", 2, [2, 3])],
        load_balancing_policy={"policies": [{"typed_extension_config": {
            "name": "envoy.load_balancing_policies.maglev",
            "typed_config": {"@type": LBP + "maglev.v3.Maglev",
                             "locality_weighted_lb_config": {}}}}]})),
    ("/ring-locality", "header", dict(
        lb_policy="RING_HASH", weights=[1, 1, 2, 1, 1, 3, 1],
        localities=[("z2", 3, [4, 5, 6]), ("z1", 1, [0, 1]), ("z3", 2, [2, 3])],
        common_lb_config={"locality_weighted_lb_config": {}},
        ring_hash_lb_config={"minimum_ring_size": 200})),
]

_POLICY = {"header": {"header": {"header_name": "x-key"}},
           "cookie": {"cookie": {"name": "session"}},
           "query": {"query_parameter": {"name": "user"}}}


def test_host_choice_matches_envoy():
    backends = [HttpBackend(name="be%d" % i) for i in range(7)]
    try:
        clusters, routes = [], []
        for i, (prefix, kind, kw) in enumerate(CASES):
            name = "c%d" % i
            clusters.append(_cluster(name, backends, **kw))
            routes.append(route(prefix + "/", name, hash_policy=[_POLICY[kind]]))
        bs = bootstrap([http_listener(free_port(), route_config(routes))], clusters)
        keys = ["user-%d-%x" % (i, i * 2654435761 % 2 ** 32) for i in range(N_KEYS)]
        got = {}
        for cls, b in ((Pyproxy, bs), (Envoy, with_fresh_ports(bs))):
            with cls(b) as px:
                got[cls.kind] = {prefix: _choices(px.port, prefix, keys, kind)
                                 for prefix, kind, _ in CASES}
                got[cls.kind]["stats"] = {k: v for k, v in px.stats().items()
                                          if ".ring_hash_lb." in k or ".maglev_lb." in k}
        # the ring / table gauges agree too (ring size, hashes / entries per host)
        assert got["pyproxy"]["stats"] == got["envoy"]["stats"]
        assert got["envoy"]["stats"]["cluster.c0.ring_hash_lb.size"] == 1029
        for prefix, kind, _ in CASES:
            mine, envoys = got["pyproxy"][prefix], got["envoy"][prefix]
            diff = [k for k in keys if mine[k] != envoys[k]]
            assert not diff, "%s: %d of %d keys on another host than Envoy's, e.g. %s" % (
                prefix, len(diff), len(keys), [(k, mine[k], envoys[k]) for k in diff[:5]])
            # the keys are spread (the test would be void if every key went to one host)
            assert len(set(envoys.values())) >= 3, (prefix, set(envoys.values()))
    finally:
        for b in backends:
            b.close()
