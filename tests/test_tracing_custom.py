"""Tracing custom tags of every kind (literal, environment, request header, and metadata of kind
request, route, cluster and host) as the Zipkin collector receives them, and route-level
``tracing`` overrides (sampling and custom tags)."""

from __future__ import annotations

import copy
import json

from tests.proxy_util import Pyproxy, free_port, request
from tests.test_tracing_zipkin import Collector, _bootstrap, _wait_span, servers  # noqa: F401

T = "type.googleapis.com/"


def _md_tag(tag, kind, key, path, default=""):
    t = {"tag": tag, "metadata": {"kind": {kind: {}}, "metadata_key": {"key": key, "path": [{"key": p} for p in path]}}}
    if default:
        t["metadata"]["default_value"] = default
    return t


def _hcm(bs):
    return bs["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]


def _metadata_bootstrap(port, backend, collector):
    bs = _bootstrap(port, backend, collector)
    hcm = _hcm(bs)
    hcm["tracing"]["custom_tags"] = [
        {"tag": "lit", "literal": {"value": "L"}},
        {"tag": "env", "environment": {"name": "PYPROXY_TEST_TRACE_ENV", "default_value": "env-default"}},
        {"tag": "env.missing", "environment": {"name": "PYPROXY_TEST_TRACE_NONE", "default_value": "env-dflt"}},
        {"tag": "hdr", "request_header": {"name": "X-Tenant", "default_value": "none"}},
        # Istio's dry-run RBAC tags: dynamic metadata written by the RBAC filter's shadow rules
        _md_tag("istio.authorization.dry_run.allow_policy.name", "request", "envoy.filters.http.rbac",
                ["istio_dry_run_allow_shadow_effective_policy_id"]),
        _md_tag("istio.authorization.dry_run.allow_policy.result", "request", "envoy.filters.http.rbac",
                ["istio_dry_run_allow_shadow_engine_result"]),
        _md_tag("req.missing", "request", "envoy.filters.http.rbac", ["nope"], "req-default"),
        _md_tag("route.team", "route", "acme", ["team"]),
        _md_tag("route.nested", "route", "acme", ["owner", "name"]),
        _md_tag("route.obj", "route", "acme", ["owner"]),
        _md_tag("route.flag", "route", "acme", ["canary"]),
        _md_tag("route.num", "route", "acme", ["weight"]),
        _md_tag("route.missing", "route", "acme", ["absent"], "route-default"),
        _md_tag("route.missing.nodefault", "route", "acme", ["absent"]),
        _md_tag("cluster.tier", "cluster", "acme", ["tier"]),
        _md_tag("cluster.missing", "cluster", "other", ["tier"], "cluster-default"),
        _md_tag("host.zone", "host", "acme", ["zone"]),
        _md_tag("host.list", "host", "acme", ["tags"]),
    ]
    hcm["http_filters"].insert(0, {"name": "envoy.filters.http.rbac", "typed_config": {
        "@type": T + "envoy.extensions.filters.http.rbac.v3.RBAC",
        "shadow_rules_stat_prefix": "istio_dry_run_allow_",
        "shadow_rules": {"action": "ALLOW", "policies": {"ns[default]-policy[dry]-rule[0]": {
            "permissions": [{"any": True}], "principals": [{"any": True}]}}}}})
    route = hcm["route_config"]["virtual_hosts"][0]["routes"][0]
    route["metadata"] = {"filter_metadata": {"acme": {
        "team": "payments", "owner": {"name": "ann"}, "canary": True, "weight": 5}}}
    # the route's own tracing block: its tags after the HCM's (same name: the route's wins)
    route["tracing"] = {"custom_tags": [{"tag": "lit", "literal": {"value": "route-L"}},
                                        {"tag": "rt.hdr", "request_header": {"name": "x-tenant"}}]}
    clusters = bs["static_resources"]["clusters"]
    b = clusters[0]
    b["metadata"] = {"filter_metadata": {"acme": {"tier": "gold"}}}
    b["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["metadata"] = {
        "filter_metadata": {"acme": {"zone": "z1", "tags": ["a", "b"]}}}
    return bs


def test_custom_tags_all_kinds(servers, monkeypatch):  # noqa: F811
    backend, collector = servers
    port = free_port()
    monkeypatch.setenv("PYPROXY_TEST_TRACE_ENV", "from-env")
    with Pyproxy(_metadata_bootstrap(port, backend, collector)):
        st, _, body = request(port, "GET", "/m", headers={"x-tenant": "t9"}, host="svc-b")
        assert st == 200
        tid = {k.lower(): v for k, v in json.loads(body)["headers"].items()}["x-b3-traceid"]
        spans = _wait_span(lambda s: s["traceId"] == tid)
        assert spans, Collector.spans
        tags = spans[0]["tags"]
    want = {
        "lit": "route-L", "rt.hdr": "t9", "env": "from-env", "env.missing": "env-dflt", "hdr": "t9",
        "istio.authorization.dry_run.allow_policy.name": "ns[default]-policy[dry]-rule[0]",
        "istio.authorization.dry_run.allow_policy.result": "allowed",
        "req.missing": "req-default",
        "route.team": "payments", "route.nested": "ann", "route.obj": '{"name":"ann"}',
        "route.flag": "true", "route.num": "5", "route.missing": "route-default",
        "cluster.tier": "gold", "cluster.missing": "cluster-default",
        "host.zone": "z1", "host.list": '["a","b"]',
    }
    assert {k: tags.get(k) for k in want} == want
    assert "route.missing.nodefault" not in tags  # an empty value sets no tag (Envoy)


def test_custom_tag_bad_config_rejected(servers):  # noqa: F811
    from pyproxy.config import ConfigError
    from pyproxy.tracing.custom_tags import compile_custom_tags
    from envoy.type.tracing.v3 import custom_tag_pb2
    t = custom_tag_pb2.CustomTag(tag="x")
    t.metadata.kind.request.SetInParent()
    try:
        compile_custom_tags([t], "tracing.custom_tags")
    except ConfigError as e:
        assert "metadata_key.key is required" in str(e)
    else:
        raise AssertionError("accepted a metadata tag without a key")
