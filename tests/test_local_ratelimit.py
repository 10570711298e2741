"""HTTP and network ``local_ratelimit`` (what Istio users add with an EnvoyFilter), compared with
Envoy: which requests are refused, the reply, its headers and the stats."""

import time

import pytest

from tests.proxy_util import (ROUTER_TYPE, HttpBackend, bootstrap, cluster, free_port, http_listener, proxies,
                              request, route, route_config, tcp_listener, validate)

LRL = "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit"
NRL = "type.googleapis.com/envoy.extensions.filters.network.local_ratelimit.v3.LocalRateLimit"
IDS = dict(ids=lambda c: c.kind)


def lrl(prefix, max_tokens=None, fill="60s", enabled=100, enforced=100, **kw):
    d = {"@type": LRL, "stat_prefix": prefix}
    if max_tokens is not None:
        d["token_bucket"] = {"max_tokens": max_tokens, "tokens_per_fill": 1, "fill_interval": fill}
    if enabled is not None:
        d["filter_enabled"] = {"runtime_key": "rl_enabled", "default_value": {"numerator": enabled}}
    if enforced is not None:
        d["filter_enforced"] = {"runtime_key": "rl_enforced", "default_value": {"numerator": enforced}}
    d.update(kw)
    return d


def _bs(filter_cfg, routes, backend_port):
    port = free_port()
    filters = [{"name": "envoy.filters.http.local_ratelimit", "typed_config": filter_cfg},
               {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER_TYPE}}]
    return bootstrap([http_listener(port, route_config(routes), http_filters=filters)],
                     [cluster("b", [backend_port])])


def _get(port, path, headers):
    """(status, [(name, value)...] in order, body)"""
    import http.client
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        c.request("GET", path, headers=headers)
        r = c.getresponse()
        return r.status, [(k.lower(), v) for k, v in r.getheaders()], r.read()
    finally:
        c.close()


def _summary(resp):
    st, h, body = resp
    keep = [(k, v) for k, v in h if k in ("x-local-rate-limit", "x-ratelimit-limit",
                                                "x-ratelimit-remaining", "x-ratelimit-reset",
                                                "content-type", "grpc-status", "grpc-message",
                                                "x-backend", "x-envoy-ratelimited")]
    # the reset time is seconds until the next token, rounded down: 59 or 60 by a hair's breadth
    keep = [(k, "59|60" if k == "x-ratelimit-reset" and v in ("59", "60") else v) for k, v in keep]
    return st, sorted(keep), body


def _rl_stats(px):
    return {k: v for k, v in px.stats().items() if ".http_local_rate_limit." in k
            or k.startswith("local_rate_limit.")}


def _run(proxy_cls, filter_cfg, routes, reqs):
    with HttpBackend() as be:
        with proxy_cls(_bs(filter_cfg, routes, be.port)) as px:
            out = [_summary(_get(px.port, p, h)) for p, h in reqs]
            seen = [(r.path, r.header("x-rl-not-enforced")) for r in be.requests]
            return out, _rl_stats(px), seen


def _both(filter_cfg, routes, reqs):
    results = [_run(cls, filter_cfg, routes, reqs) for cls in proxies()]
    for r in results[1:]:
        assert r == results[0]
    return results[0]


def test_filter_bucket_route_bucket_and_headers_match_envoy():
    """A filter-level bucket of 2, a route with its own bucket of 1 and x-ratelimit headers, a
    gRPC request over the limit: same answers and stats as Envoy."""
    r_own = route("/r", "b")
    r_own["typed_per_filter_config"] = {"envoy.filters.http.local_ratelimit": lrl(
        "route_rl", 1, enable_x_ratelimit_headers="DRAFT_VERSION_03", status={"code": 503})}
    cfg = lrl("http_local_rate_limiter", 2, response_headers_to_add=[
        {"header": {"key": "x-local-rate-limit", "value": "true"}},
        {"header": {"key": "x-local-rate-limit", "value": "again"}, "append_action": "APPEND_IF_EXISTS_OR_ADD"}])
    reqs = [("/a", {}), ("/a", {}), ("/a", {}), ("/r", {}), ("/r", {}),
            ("/a", {"content-type": "application/grpc"})]
    out, stats, seen = _both(cfg, [r_own, route("/", "b")], reqs)
    assert [o[0] for o in out] == [200, 200, 429, 200, 503, 200]
    assert out[2][2] == b"local_rate_limited"
    assert ("x-ratelimit-remaining", "0") in out[4][1] and ("x-ratelimit-limit", "1") in out[4][1]
    assert ("x-local-rate-limit", "true") in out[2][1] and ("x-local-rate-limit", "again") in out[2][1]
    assert ("grpc-status", "14") in out[5][1]
    assert stats["http_local_rate_limiter.http_local_rate_limit.enforced"] == 2
    assert stats["route_rl.http_local_rate_limit.ok"] == 1
    assert [p for p, _ in seen] == ["/a", "/a", "/r"]


def test_not_enforced_disabled_and_resource_exhausted_match_envoy():
    """filter_enforced 0: over-limit requests go on with request_headers_to_add_when_not_enforced;
    a route whose config has no filter_enabled is not even counted; gRPC gets RESOURCE_EXHAUSTED
    when asked for."""
    r_off = route("/off", "b")
    r_off["typed_per_filter_config"] = {"envoy.filters.http.local_ratelimit": lrl(
        "off_rl", 1, enabled=None)}
    r_grpc = route("/g", "b")
    r_grpc["typed_per_filter_config"] = {"envoy.filters.http.local_ratelimit": lrl(
        "grpc_rl", 1, rate_limited_as_resource_exhausted=True)}
    cfg = lrl("shadow_rl", 1, enforced=0, request_headers_to_add_when_not_enforced=[
        {"header": {"key": "x-rl-not-enforced", "value": "yes"}}])
    reqs = [("/a", {}), ("/a", {}), ("/off", {}), ("/off", {}), ("/g", {}),
            ("/g", {"content-type": "application/grpc"})]
    out, stats, seen = _both(cfg, [r_off, r_grpc, route("/", "b")], reqs)
    assert [o[0] for o in out] == [200, 200, 200, 200, 200, 200]
    assert ("grpc-status", "8") in out[5][1]
    assert seen[:2] == [("/a", None), ("/a", "yes")]
    assert stats["shadow_rl.http_local_rate_limit.rate_limited"] == 1
    assert stats["shadow_rl.http_local_rate_limit.enforced"] == 0
    assert stats.get("off_rl.http_local_rate_limit.enabled") == 0


@pytest.mark.parametrize("proxy_cls", proxies(), **IDS)
def test_bucket_refills(proxy_cls):
    """One token per 200 ms: the second request at once is refused, one 300 ms later passes."""
    with HttpBackend() as be:
        with proxy_cls(_bs(lrl("refill", 1, fill="0.2s"), [route("/", "b")], be.port)) as px:
            assert request(px.port, "GET", "/")[0] == 200
            assert request(px.port, "GET", "/")[0] == 429
            time.sleep(0.3)
            assert request(px.port, "GET", "/")[0] == 200


def _keepalive_statuses(port, n):
    import http.client
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    out = []
    try:
        for _ in range(n):
            c.request("GET", "/")
            r = c.getresponse()
            r.read()
            out.append(r.status)
    finally:
        c.close()
    return out


@pytest.mark.parametrize("proxy_cls", proxies(), **IDS)
def test_per_downstream_connection_buckets(proxy_cls):
    """local_rate_limit_per_downstream_connection: each connection has its own bucket of 2."""
    cfg = lrl("perconn", 2, local_rate_limit_per_downstream_connection=True)
    with HttpBackend() as be:
        with proxy_cls(_bs(cfg, [route("/", "b")], be.port)) as px:
            assert _keepalive_statuses(px.port, 3) == [200, 200, 429]
            assert _keepalive_statuses(px.port, 3) == [200, 200, 429]


def _validate(filter_cfg, routes=None):
    r = validate(_bs(filter_cfg, routes or [route("/", "b")], 1))
    return r.returncode, r.stdout + r.stderr


@pytest.mark.parametrize("cfg,words", [
    (lrl("d", 1, descriptors=[{"entries": [{"key": "k", "value": "v"}],
                                "token_bucket": {"max_tokens": 1, "fill_interval": "1s"}}],
         rate_limits=[{"actions": [{"dynamic_metadata": {"descriptor_key": "k", "metadata_key": {
             "key": "a", "path": [{"key": "b"}]}}}]}]),
     "rate_limits[0].actions[0]: rate limit action 'dynamic_metadata' is not supported"),
    (lrl("d", 1, descriptors=[{"entries": [{"key": "k", "value": "v"}],
                                "token_bucket": {"max_tokens": 1, "fill_interval": "1s"}}] * 2),
     "duplicate descriptor"),
    (lrl("f", 1, fill="0.01s"), "must be >= 50ms"),
    (lrl("", 1), "stat_prefix"),
])
def test_rejected_configs(cfg, words):
    rc, out = _validate(cfg)
    assert rc == 1 and words in out, out


def _desc(entries, max_tokens):
    return {"entries": [{"key": k, "value": v} for k, v in entries],
            "token_bucket": {"max_tokens": max_tokens, "tokens_per_fill": 1, "fill_interval": "60s"}}


DESCRIPTORS = [_desc([("client", "a")], 1), _desc([("client", "")], 2),
               _desc([("generic_key", "slow"), ("path", "")], 1)]
DESC_REQS = [("/r", {"x-client": "a"}), ("/r", {"x-client": "a"}),
             ("/r", {"x-client": "b"}), ("/r", {"x-client": "b"}), ("/r", {"x-client": "b"}),
             ("/r", {"x-client": "c"}), ("/r", {}), ("/r", {}), ("/r", {}),
             ("/s", {"x-path": "/one"}), ("/s", {"x-path": "/one"}), ("/s", {"x-path": "/two"}),
             ("/s", {})]


def test_descriptors_from_route_rate_limits_match_envoy():
    """Route rate_limits make the descriptors: an exact one, a wildcard (a bucket per value) and
    the filter's bucket for requests that match none (and for all, by default)."""
    r = route("/r", "b", rate_limits=[{"actions": [{"request_headers": {
        "header_name": "x-client", "descriptor_key": "client"}}]}])
    s2 = route("/s", "b", rate_limits=[{"actions": [
        {"generic_key": {"descriptor_value": "slow"}},
        {"request_headers": {"header_name": "x-path", "descriptor_key": "path"}}]}])
    cfg = lrl("desc_rl", 8, descriptors=DESCRIPTORS, enable_x_ratelimit_headers="DRAFT_VERSION_03")
    out, stats, seen = _both(cfg, [r, s2, route("/", "b")], DESC_REQS)
    # the filter's bucket of 8 is taken by every allowed request too (and is empty at the end)
    assert [o[0] for o in out] == [200, 429, 200, 200, 429, 200, 200, 200, 200,
                                   200, 429, 429, 429]
    assert stats["desc_rl.http_local_rate_limit.rate_limited"] == 5


def test_descriptors_from_the_filters_rate_limits_match_envoy():
    """The filter's own rate_limits (header_value_match, remote_address) and
    always_consume_default_token_bucket off."""
    cfg = lrl("embedded_rl", 1, always_consume_default_token_bucket=False,
              descriptors=[_desc([("header_match", "admin")], 2), _desc([("remote_address", "")], 3)],
              rate_limits=[
                  {"actions": [{"header_value_match": {"descriptor_value": "admin", "headers": [
                      {"name": "x-role", "string_match": {"exact": "admin"}}]}}]},
                  {"actions": [{"remote_address": {}}]}])
    reqs = [("/", {"x-role": "admin"})] * 3 + [("/", {})] * 3
    out, stats, seen = _both(cfg, [route("/", "b")], reqs)
    # admin requests take from both buckets (the admin one first) until admin's 2 are gone; the
    # plain ones then have the remote address bucket's last token; the filter's own bucket of 1
    # is never taken (always_consume_default_token_bucket false)
    assert [o[0] for o in out] == [200, 200, 429, 200, 429, 429]


@pytest.mark.parametrize("proxy_cls", proxies(), **IDS)
def test_route_config_without_bucket_is_rejected_at_load(proxy_cls):
    """A per-route config without token_bucket rejects the route configuration when it loads
    (Envoy: "local rate limit token bucket must be set for per filter configs")."""
    r = route("/", "b")
    r["typed_per_filter_config"] = {"envoy.filters.http.local_ratelimit": lrl("nobucket")}
    bs = _bs(lrl("top", 1), [r], 1)
    with pytest.raises(RuntimeError) as ei:
        with proxy_cls(bs):
            pass
    assert "token bucket must be set for per filter configs" in str(ei.value)
    rc, out = _validate(lrl("top", 1), [r])
    assert rc == 1 and "typed_per_filter_config[envoy.filters.http.local_ratelimit]" in out, out


# ------------------------------------------------------------------------------------ network


def _tcp_bs(backend_port, prefix="tcp_rl", max_tokens=2, share_key="", two=False, enabled=True):
    listeners = []
    for i in range(2 if two else 1):
        port = free_port()
        l = tcp_listener(port, "b", name="tcp%d" % i)
        cfg = {"@type": NRL, "stat_prefix": prefix,
               "token_bucket": {"max_tokens": max_tokens, "fill_interval": "60s"},
               "runtime_enabled": {"runtime_key": "x", "default_value": enabled}}
        if share_key:
            cfg["share_key"] = share_key
        l["filter_chains"][0]["filters"].insert(0, {"name": "envoy.filters.network.local_ratelimit",
                                                    "typed_config": cfg})
        listeners.append(l)
    return bootstrap(listeners, [cluster("b", [backend_port])])


def _tcp_try(port):
    """True if an HTTP request over the TCP proxy gets an answer."""
    try:
        return request(port, "GET", "/")[0] == 200
    except (ConnectionError, OSError, Exception):
        return False


@pytest.mark.parametrize("proxy_cls", proxies(), **IDS)
def test_network_local_ratelimit(proxy_cls):
    with HttpBackend() as be:
        with proxy_cls(_tcp_bs(be.port)) as px:
            assert [_tcp_try(px.port) for _ in range(4)] == [True, True, False, False]
            assert px.stat("local_rate_limit.tcp_rl.rate_limited") == 2
            assert len(be.requests) == 2


@pytest.mark.parametrize("proxy_cls", proxies(), **IDS)
def test_network_local_ratelimit_share_key_and_disabled(proxy_cls):
    """Two listeners with the same share_key and bucket take from one bucket of 2; a filter
    turned off by runtime_enabled lets everything through."""
    with HttpBackend() as be:
        with proxy_cls(_tcp_bs(be.port, share_key="shared", two=True)) as px:
            a, b = px.ports
            assert [_tcp_try(a), _tcp_try(b), _tcp_try(a), _tcp_try(b)] == [True, True, False, False]
        with proxy_cls(_tcp_bs(be.port, enabled=False)) as px:
            assert all(_tcp_try(px.port) for _ in range(4))
            assert px.stat("local_rate_limit.tcp_rl.rate_limited") == 0


def test_descriptors_from_the_virtual_host_match_envoy():
    """vh_rate_limits OVERRIDE (the default): the virtual host's rate_limits count for a route
    without its own, not for one with its own; a route's include_vh_rate_limits adds them."""
    r_own = route("/own", "b", rate_limits=[{"actions": [{"generic_key": {"descriptor_value": "own"}}]}])
    r_inc = route("/inc", "b", include_vh_rate_limits=True,
                  rate_limits=[{"actions": [{"generic_key": {"descriptor_value": "own"}}]}])
    routes = [r_own, r_inc, route("/", "b")]
    cfg = lrl("vh_rl", 100, always_consume_default_token_bucket=False,
              descriptors=[_desc([("generic_key", "vh")], 2), _desc([("generic_key", "own")], 3)])
    port = free_port()
    filters = [{"name": "envoy.filters.http.local_ratelimit", "typed_config": cfg},
               {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER_TYPE}}]
    rc = route_config(routes, rate_limits=[{"actions": [{"generic_key": {"descriptor_value": "vh"}}]}])
    reqs = ["/x", "/x", "/x", "/own", "/own", "/inc", "/own"]
    results = []
    for cls in proxies():
        with HttpBackend() as be:
            bs = bootstrap([http_listener(port, rc, http_filters=filters)], [cluster("b", [be.port])])
            with cls(bs) as px:
                results.append([_get(px.port, p, {})[0] for p in reqs])
    assert all(r == results[0] for r in results)
    # /x: the vhost's 2; /own: its own 3 (twice); /inc takes own's third, then finds vh empty:
    # 429 (the token it took from own is gone); so the last /own finds own empty
    assert results[0] == [200, 200, 429, 200, 200, 429, 429]


def test_istio_envoyfilter_shape():
    """The shape Istio's EnvoyFilter docs use: the filter as a udpa TypedStruct, the limits on the
    route's typed_per_filter_config as a TypedStruct too."""
    ts = "type.googleapis.com/udpa.type.v1.TypedStruct"
    filt = {"@type": ts, "type_url": LRL, "value": {"stat_prefix": "http_local_rate_limiter"}}
    per_route = {"@type": ts, "type_url": LRL, "value": {
        "stat_prefix": "http_local_rate_limiter",
        "token_bucket": {"max_tokens": 2, "tokens_per_fill": 2, "fill_interval": "60s"},
        "filter_enabled": {"runtime_key": "local_rate_limit_enabled",
                           "default_value": {"numerator": 100, "denominator": "HUNDRED"}},
        "filter_enforced": {"runtime_key": "local_rate_limit_enforced",
                            "default_value": {"numerator": 100, "denominator": "HUNDRED"}},
        "response_headers_to_add": [{"append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                                     "header": {"key": "x-local-rate-limit", "value": "true"}}]}}
    r = route("/", "b")
    r["typed_per_filter_config"] = {"envoy.filters.http.local_ratelimit": per_route}
    reqs = [("/", {})] * 3
    out, stats, seen = _both(filt, [r], reqs)
    assert [o[0] for o in out] == [200, 200, 429]
    assert ("x-local-rate-limit", "true") in out[2][1]
    assert stats["http_local_rate_limiter.http_local_rate_limit.enforced"] == 1
