import json
import socket

import pytest
from google.protobuf import json_format
from envoy.config.endpoint.v3 import endpoint_pb2

from pyproxy.cluster.endpoints import build_priority_set, diff_hosts
from pyproxy.cluster.host import DEGRADED, FAILED_OUTLIER_CHECK, HEALTHY, UNHEALTHY
from pyproxy.config.errors import ConfigError

ISTIO = "/work/shared/testdata/istio/"


def cla(d: dict):
    return json_format.ParseDict(d, endpoint_pb2.ClusterLoadAssignment())


def ep(addr, port=80, **kw):
    d = {"endpoint": {"address": {"socket_address": {"address": addr, "port_value": port}}}}
    d.update(kw)
    return d


def test_istio_sidecar_endpoints_dump():
    d = json.load(open(ISTIO + "sidecar-endpoints-configdump.json"))
    n = 0
    for cfg in d["configs"]:
        for k in ("static_endpoint_configs", "dynamic_endpoint_configs"):
            for e in cfg.get(k, []):
                body = dict(e["endpoint_config"])
                body.pop("@type")
                ps = build_priority_set(cla(body))
                n += 1
                if body["cluster_name"] == "outbound|9080||reviews.default.svc.cluster.local":
                    assert len(ps.all_hosts) == 3
                    h = ps.all_hosts[0]
                    assert h.metadata["envoy.transport_socket_match"]["tlsMode"] == "istio"
                    assert h.metadata["istio"]["workload"].startswith("reviews-")
                    assert h.port == 9080 and h.health == HEALTHY
                if body["cluster_name"] == "sds-grpc":
                    h = ps.all_hosts[0]
                    assert h.pipe == "./var/run/secrets/workload-spiffe-uds/socket"
                    assert h.family == socket.AF_UNIX
    assert n == 37  # 5 static + 32 dynamic


def test_priorities_localities_weights_health():
    ps = build_priority_set(cla({
        "endpoints": [
            {"locality": {"region": "r1", "zone": "z1", "sub_zone": "s1"},
             "load_balancing_weight": 3,
             "lb_endpoints": [
                 ep("10.0.0.1", load_balancing_weight=5, health_status="UNKNOWN"),
                 ep("10.0.0.2", health_status="DRAINING"),
                 ep("10.0.0.3", health_status="DEGRADED"),
                 ep("10.0.0.4", health_status="TIMEOUT"),
                 ep("10.0.0.5", health_status="UNHEALTHY"),
                 ep("10.0.0.6", health_status="HEALTHY"),
             ]},
            {"priority": 2, "locality": {"zone": "z2"},
             "lb_endpoints": [{"endpoint": {
                 "address": {"socket_address": {"address": "2001:db8::1", "port_value": 8080}},
                 "hostname": "backend.example"}}]},
        ],
        "policy": {"overprovisioning_factor": 200},
    }))
    assert ps.overprovisioning_factor == 200
    assert len(ps.priorities) == 3 and ps.priorities[1] == []  # Envoy accepts the gap
    p0 = ps.priorities[0]
    assert [h.health for h in p0] == [HEALTHY, UNHEALTHY, DEGRADED, UNHEALTHY, UNHEALTHY, HEALTHY]
    assert p0[0].weight == 5 and p0[1].weight == 1
    assert p0[0].locality == ("r1", "z1", "s1")
    assert ps.localities[0] == {("r1", "z1", "s1"): 3}
    assert ps.localities[2] == {("", "z2", ""): 0}
    h6 = ps.priorities[2][0]
    assert h6.family == socket.AF_INET6 and h6.key == "[2001:db8::1]:8080"
    assert h6.hostname == "backend.example" and h6.priority == 2
    assert p0[0].lb_endpoint.endpoint.address.socket_address.address == "10.0.0.1"


def test_default_overprovisioning_and_empty():
    ps = build_priority_set(cla({"cluster_name": "x"}))
    assert ps.overprovisioning_factor == 140 and ps.priorities == []


@pytest.mark.parametrize("body, field, text", [
    ({"endpoints": [{"lb_endpoints": [ep("foo.example.com")]}]},
     "endpoints[0].lb_endpoints[0].endpoint.address.socket_address.address",
     "malformed IP address: foo.example.com"),
    ({"endpoints": [{"lb_endpoints": [
        {"endpoint": {"address": {"socket_address": {"address": "10.0.0.1"}}}}]}]},
     "endpoints[0].lb_endpoints[0].endpoint.address.socket_address.port_value", "required"),
    ({"endpoints": [{"lb_endpoints": [ep("10.0.0.1"), ep("10.0.0.2", load_balancing_weight=0)]}]},
     "endpoints[0].lb_endpoints[1].load_balancing_weight", "greater than or equal to 1"),
    ({"endpoints": [{"lb_endpoints": [{"endpoint": {}}]}]},
     "endpoints[0].lb_endpoints[0].endpoint.address", "no address"),
    ({"endpoints": [{"lb_endpoints": [{"endpoint_name": "foo"}]}]},
     "endpoints[0].lb_endpoints[0].endpoint_name", "not supported"),
    ({"policy": {"overprovisioning_factor": 0}}, "policy.overprovisioning_factor", "greater than 0"),
])
def test_validation_errors(body, field, text):
    with pytest.raises(ConfigError) as ei:
        build_priority_set(cla(body))
    assert ei.value.field == field
    assert text in str(ei.value)


def test_hostnames_allowed_and_resolved():
    m = cla({"endpoints": [{"lb_endpoints": [ep("svc.local", 9000, load_balancing_weight=2),
                                              ep("10.1.1.1", 81)]}]})
    ps = build_priority_set(m, resolve_hostnames=True)
    assert ps.all_hosts[0].address == "svc.local"
    ps = build_priority_set(m, resolved={"svc.local": ["10.0.0.7", "::1"]})
    assert [h.key for h in ps.all_hosts] == ["10.0.0.7:9000", "[::1]:9000", "10.1.1.1:81"]
    assert ps.all_hosts[1].hostname == "svc.local" and ps.all_hosts[1].weight == 2
    assert ps.all_hosts[2].hostname == ""
    ps = build_priority_set(m, resolved={"svc.local": ["10.0.0.7", "::1"]}, logical=True)
    assert [h.key for h in ps.all_hosts] == ["10.0.0.7:9000", "10.1.1.1:81"]


def test_diff_hosts_keeps_identity():
    a = cla({"endpoints": [{"lb_endpoints": [ep("10.0.0.1"), ep("10.0.0.2"), ep("10.0.0.3")]}]})
    old = build_priority_set(a)
    h1, h2, h3 = old.all_hosts
    h1.rq_active = 7
    h2.cx_active = 3
    h2.set_flag(FAILED_OUTLIER_CHECK)
    # Same update again: nothing changed, same objects.
    up = diff_hosts(old, build_priority_set(a))
    assert not up.changed and up.added == [] and up.removed == []
    assert all(x is y for x, y in zip(up.priority_set.all_hosts, old.all_hosts))

    b = cla({"endpoints": [
        {"lb_endpoints": [ep("10.0.0.2", load_balancing_weight=4, health_status="DEGRADED",
                             metadata={"filter_metadata": {"istio": {"workload": "w"}}}),
                          ep("10.0.0.4")]},
        {"priority": 1, "lb_endpoints": [ep("10.0.0.1")]}]})
    up = diff_hosts(old, build_priority_set(b))
    assert up.changed
    p0, p1 = up.priority_set.priorities
    # an ejected host stays out of rotation whatever EDS says (Envoy's coarse health)
    assert p0[0] is h2 and h2.weight == 4 and h2.health == UNHEALTHY
    assert h2.flag_names() == ["failed_outlier_check", "degraded_eds_health"]
    h2.clear_flag(FAILED_OUTLIER_CHECK)
    assert h2.health == DEGRADED
    h2.set_flag(FAILED_OUTLIER_CHECK)
    assert h2.metadata == {"istio": {"workload": "w"}}
    assert h2.cx_active == 3 and h2.outlier_ejected  # state survives
    assert p1[0] is h1 and h1.priority == 1 and h1.rq_active == 7
    assert [h.key for h in up.added] == ["10.0.0.4:80"] and up.added[0] is p0[1]
    assert up.removed == [h3]


def test_diff_hosts_from_nothing_and_duplicates():
    m = cla({"endpoints": [{"lb_endpoints": [ep("10.0.0.1")]},
                           {"locality": {"zone": "b"}, "lb_endpoints": [ep("10.0.0.1")]}]})
    first = build_priority_set(m)
    up = diff_hosts(None, first)
    assert up.changed and up.added == first.all_hosts
    up2 = diff_hosts(first, build_priority_set(m))
    assert not up2.changed
    assert up2.priority_set.all_hosts[0] is first.all_hosts[0]
    assert up2.priority_set.all_hosts[1] is first.all_hosts[1]


def test_internal_address_endpoint_is_kept_but_unconnectable():
    """Waypoint configs point endpoints at internal listeners: accepted, never a real address."""
    from envoy.config.endpoint.v3 import endpoint_pb2
    from google.protobuf import json_format
    from pyproxy.cluster.endpoints import build_priority_set
    cla = json_format.ParseDict({"cluster_name": "c", "endpoints": [{"lb_endpoints": [{"endpoint": {
        "address": {"envoy_internal_address": {"server_listener_name": "connect_originate",
                                               "endpoint_id": "10.0.0.1:80"}}}}]}]},
        endpoint_pb2.ClusterLoadAssignment())
    ps = build_priority_set(cla)
    (h,) = ps.all_hosts
    assert h.pipe == "envoy_internal:connect_originate/10.0.0.1:80"
    assert not h.address and h.port == 0
