"""Unit tests of the compiled route table (actions, policies, errors)."""


import pytest
import yaml
from google.protobuf import json_format

from envoy.config.route.v3 import route_pb2
from pyproxy.config.errors import ConfigError
from pyproxy.http.headers import Headers
from pyproxy.routing import (DIRECT_RESPONSE, REDIRECT, ROUTE, compile_re2,
                             compile_route_config, parse_retry_on)
from pyproxy.routing.hashing import xxh64
from pyproxy.stream_info import StreamInfo


def table(y):
    d = yaml.safe_load(y) if isinstance(y, str) else y
    rc = route_pb2.RouteConfiguration()
    json_format.ParseDict(d, rc)
    return compile_route_config(rc)


def req(path="/", host="h", method="GET", **extra):
    items = [(":method", method), (":scheme", "http"), (":authority", host), (":path", path)]
    for k, v in extra.items():
        items.append((k.replace("_", "-"), v))
    return Headers(items)


def one_route(route_yaml, vhost_extra="", rc_extra=""):
    return table("name: t\n%s\nvirtual_hosts:\n- name: vh\n  domains: ['*']\n%s\n  routes:\n%s"
                 % (rc_extra, vhost_extra, route_yaml))


def test_defaults_and_timeouts():
    t = one_route("  - match: {prefix: /}\n    route: {cluster: c}\n")
    e = t.find(req())
    assert e.kind == ROUTE and e.timeout == 15.0 and e.idle_timeout is None and e.retry is None
    assert e.select_cluster(req(), 0) == ("c", None)
    t = one_route("  - match: {prefix: /}\n    route: {cluster: c, timeout: 0s, idle_timeout: 2.5s,"
                  " max_stream_duration: {max_stream_duration: 3s, grpc_timeout_header_max: 0s}}\n")
    e = t.find(req())
    assert e.timeout == 0 and e.idle_timeout == 2.5
    assert e.max_stream_duration == 3 and e.grpc_timeout_header_max == 0 and e.new_timeouts
    assert e.max_grpc_timeout is None and e.duration
    # istio's deprecated max_grpc_timeout: the router's timeout
    t = one_route("  - match: {prefix: /}\n    route: {cluster: c, max_grpc_timeout: 0s}\n")
    e = t.find(req())
    assert e.max_grpc_timeout == 0 and e.grpc_timeout_header_max is None and not e.new_timeouts
    # with a max_stream_duration block the route timeout is not read (Envoy's usingNewTimeouts)
    t = one_route("  - match: {prefix: /}\n    route: {cluster: c, timeout: 5s, max_grpc_timeout: 1s,"
                  " max_stream_duration: {grpc_timeout_header_max: 1.5s}}\n")
    e = t.find(req())
    assert e.timeout == 0 and e.max_grpc_timeout is None and e.grpc_timeout_header_max == 1500


def test_weighted_clusters_and_choice_headers():
    t = one_route("""  - match: {prefix: /}
    route:
      weighted_clusters:
        clusters:
        - name: a
          weight: 1
          request_headers_to_add: [{header: {key: x-w, value: a}}]
        - name: b
          weight: 0
        - name: c
          weight: 3
          response_headers_to_add: [{header: {key: x-r, value: c}}]
""")
    e = t.find(req())
    picks = [e.select_cluster(req(), v)[0] for v in range(8)]
    assert picks == ["a", "c", "c", "c"] * 2
    name, choice = e.select_cluster(req(), 4)
    assert name == "a"
    h = req()
    e.finalize_request_headers(h, StreamInfo(), choice)
    assert h.get("x-w") == "a"
    name, choice = e.select_cluster(req(), 5)
    resp = Headers([(":status", "200")])
    e.finalize_response_headers(resp, StreamInfo(), choice)
    assert resp.get("x-r") == "c"


def test_cluster_header():
    t = one_route("  - match: {prefix: /}\n    route: {cluster_header: X-Cluster}\n")
    e = t.find(req())
    assert e.select_cluster(req(x_cluster="zz"), 0) == ("zz", None)
    assert e.select_cluster(req(), 0) == ("", None)


def test_retry_policy_and_vhost_override():
    vh = "  retry_policy: {retry_on: 5xx, num_retries: 7}"
    t = one_route("""  - match: {prefix: /a}
    route:
      cluster: c
      retry_policy:
        retry_on: "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes,bogus"
        retry_host_predicate: [{name: envoy.retry_host_predicates.previous_hosts}]
        host_selection_retry_max_attempts: 5
        retriable_status_codes: [503]
        per_try_timeout: 0.5s
        retry_back_off: {base_interval: 0.1s}
  - match: {prefix: /}
    route: {cluster: c}
""", vhost_extra=vh)
    r = t.find(req("/a")).retry
    assert r.retry_on == {"connect-failure", "refused-stream", "unavailable", "cancelled",
                          "retriable-status-codes"}
    assert r.num_retries == 1 and r.per_try_timeout == 0.5 and r.previous_hosts
    assert r.host_selection_max_attempts == 5
    assert (r.backoff_base, r.backoff_max) == (0.1, pytest.approx(1.0))
    assert r.should_retry_status(503, Headers()) and not r.should_retry_status(500, Headers())
    assert r.should_retry_grpc(14) and r.should_retry_grpc(1) and not r.should_retry_grpc(13)
    v = t.find(req("/b")).retry
    assert v.num_retries == 7 and v.should_retry_status(500) and not v.should_retry_status(409)
    assert (v.backoff_base, v.backoff_max) == (0.025, 0.25)
    # rate limited responses are only retried under envoy-ratelimited
    assert not v.should_retry_status(503, Headers([("x-envoy-ratelimited", "true")]))
    g = parse_retry_on("gateway-error, retriable-4xx,x")
    assert g == {"gateway-error", "retriable-4xx"}
    assert v.with_retry_on(g).should_retry_status(409)


def test_retriable_headers():
    t = one_route("""  - match: {prefix: /}
    route:
      cluster: c
      retry_policy:
        retry_on: retriable-headers
        retriable_headers: [{name: x-upstream-retry, string_match: {exact: "yes"}}]
""")
    r = t.find(req()).retry
    assert r.should_retry_status(200, Headers([("x-upstream-retry", "yes")]))
    assert not r.should_retry_status(200, Headers([("x-upstream-retry", "no")]))


def test_hash_policies():
    t = one_route("""  - match: {prefix: /}
    route:
      cluster: c
      hash_policy:
      - header: {header_name: x-user}
      - cookie: {name: sid}
        terminal: true
      - connection_properties: {source_ip: true}
""")
    e = t.find(req())
    assert e.hash_key(req(), None) is None
    assert e.hash_key(req(x_user="bob"), None) == xxh64(b"bob")
    both = e.hash_key(req(x_user="bob", cookie='a=1; sid="s1"'), "1.2.3.4:5")
    hb = xxh64(b"bob")
    assert both == (((hb << 1) | (hb >> 63)) & 0xFFFFFFFFFFFFFFFF) ^ xxh64(b"s1")
    assert e.hash_key(req(), "1.2.3.4:99") == xxh64(b"1.2.3.4")
    t = one_route("  - match: {prefix: /}\n    route: {cluster: c, hash_policy: "
                  "[{query_parameter: {name: u}}]}\n")
    assert t.find(req()).hash_key(req("/?u=7&u=8"), None) == xxh64(b"7")


def test_prefix_regex_and_host_rewrites():
    t = one_route("""  - match: {prefix: /old}
    route: {cluster: c, prefix_rewrite: /new, host_rewrite_literal: up.example}
  - match: {path: /exact}
    route: {cluster: c, prefix_rewrite: /other}
  - match: {prefix: /rx}
    route:
      cluster: c
      regex_rewrite: {pattern: {regex: "^/rx/([a-z]+)/(\\\\d+)$"}, substitution: "/\\\\2/\\\\1"}
      host_rewrite_header: x-host
      append_x_forwarded_host: true
  - match: {prefix: /auto}
    route: {cluster: c, auto_host_rewrite: true}
""")
    h = req("/old/x?q=1")
    e = t.find(h)
    e.rewrite_request(h)
    assert h.path == "/new/x?q=1" and h.host == "up.example"
    assert h.get("x-envoy-original-path") == "/old/x?q=1"
    h = req("/exact?z")
    t.find(h).rewrite_request(h)
    assert h.path == "/other?z"
    h = req("/rx/abc/42?k=v", x_host="other")
    t.find(h).rewrite_request(h)
    assert h.path == "/42/abc?k=v" and h.host == "other" and h.get("x-forwarded-host") == "h"
    assert t.find(req("/auto")).auto_host_rewrite


def test_request_header_order_and_most_specific_wins():
    route = """  - match: {prefix: /}
    route: {cluster: c}
    request_headers_to_add: [{header: {key: x-a, value: route}},
                             {header: {key: x-o, value: route}, append_action: OVERWRITE_IF_EXISTS_OR_ADD}]
    request_headers_to_remove: [x-drop]
"""
    vh = ("  request_headers_to_add: [{header: {key: x-a, value: vhost}},"
          " {header: {key: x-o, value: vhost}, append_action: OVERWRITE_IF_EXISTS_OR_ADD},"
          " {header: {key: x-ip, value: '%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%'}}]")
    rc = ("request_headers_to_add: [{header: {key: x-a, value: rc}},"
          " {header: {key: x-o, value: rc}, append_action: OVERWRITE_IF_EXISTS_OR_ADD}]")
    si = StreamInfo(downstream_remote_address="10.0.0.1:4444")
    for wins, order, o in ((False, ["route", "vhost", "rc"], "rc"),
                           (True, ["rc", "vhost", "route"], "route")):
        t = one_route(route, vhost_extra=vh,
                      rc_extra=rc + ("\nmost_specific_header_mutations_wins: true" if wins else ""))
        h = req(x_drop="1")
        t.find(h).finalize_request_headers(h, si, None)
        assert h.get_all("x-a") == order and h.get_all("x-o") == [o]
        assert "x-drop" not in h and h.get("x-ip") == "10.0.0.1"


def test_direct_response_and_redirect_kinds():
    t = one_route("""  - match: {prefix: /d}
    direct_response: {status: 418, body: {inline_string: teapot}}
  - match: {prefix: /r}
    redirect: {https_redirect: true}
""")
    e = t.find(req("/d"))
    assert e.kind == DIRECT_RESPONSE and e.direct_status == 418 and e.direct_body() == b"teapot"
    e = t.find(req("/r", host="a.com"))
    assert e.kind == REDIRECT and e.redirect_status == 301
    assert e.redirect_location(req("/r?x", host="a.com", x_forwarded_proto="http")) == \
        "https://a.com/r?x"


def test_require_tls():
    t = one_route("  - match: {prefix: /}\n    route: {cluster: c}\n", vhost_extra="  require_tls: ALL")
    e = t.find(req(x_forwarded_proto="http"))
    assert e.kind == REDIRECT
    assert e.redirect_location(req("/p", x_forwarded_proto="http")) == "https://h/p"
    assert t.find(req(x_forwarded_proto="https")).kind == ROUTE


def test_typed_per_filter_config_merge():
    any_ = {"@type": "type.googleapis.com/google.protobuf.Struct", "value": {"k": "%s"}}

    def a(v):
        return {"@type": any_["@type"], "value": {"k": v}}
    t = table({"name": "t", "typed_per_filter_config": {"f1": a("rc"), "f3": a("rc")},
               "virtual_hosts": [{"name": "v", "domains": ["*"],
                                  "typed_per_filter_config": {"f1": a("vh"), "f2": a("vh")},
                                  "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "c"},
                                              "typed_per_filter_config": {"f2": a("r")}}]}]})
    e = t.find(req())
    assert sorted(e.typed_per_filter_config) == ["f1", "f2", "f3"]
    assert b"vh" in e.per_filter_config("f1").value and b"r" in e.per_filter_config("f2").value


def test_connect_matcher():
    t = one_route("""  - match: {connect_matcher: {}}
    route: {cluster: tunnel, upgrade_configs: [{upgrade_type: CONNECT, connect_config: {}}]}
  - match: {prefix: /}
    route: {cluster: c}
""")
    h = Headers([(":method", "CONNECT"), (":authority", "x:443")])
    e = t.find(h)
    assert e.cluster == "tunnel" and e.upgrade_configs == {"connect": (True, True)}
    assert t.find(req()).cluster == "c"


@pytest.mark.parametrize("bad,field", [
    ("  - match: {prefix: /}\n    route: {cluster_specifier_plugin: x}\n", "cluster_specifier_plugin"),
    ("  - match: {prefix: /}\n    filter_action: {}\n", "filter_action"),
    ("  - match: {prefix: /, tls_context: {presented: true}}\n    route: {cluster: c}\n", "tls_context"),
    ("  - match: {safe_regex: {regex: '/a(?<=b)'}}\n    route: {cluster: c}\n", "safe_regex.regex"),
    ("  - match: {prefix: /, headers: [{name: x, safe_regex_match: {regex: '['}}]}\n"
     "    route: {cluster: c}\n", "headers[0].safe_regex_match.regex"),
    ("  - match: {prefix: /}\n    route: {cluster: c, retry_policy: {retry_back_off: "
     "{base_interval: 1s, max_interval: 0.5s}}}\n", "max_interval"),
    ("  - match: {prefix: /}\n    direct_response: {status: 200, body: {inline_string: '%s'}}\n"
     % ("x" * 5000), "direct_response.body"),
    ("  - match: {prefix: /}\n    route: {cluster: c}\n    request_headers_to_add: "
     "[{header: {key: x, value: '%NOPE%'}}]\n", "request_headers_to_add[0].header.value"),
])
def test_config_errors_name_the_field(bad, field):
    with pytest.raises(ConfigError) as ei:
        one_route(bad)
    assert field in str(ei.value) and "route configuration 't'" in str(ei.value)
    assert "virtual_hosts[0]" in str(ei.value)


def test_vhost_lookup_is_indexed():
    vhosts = [{"name": "v%d" % i, "domains": ["s%d.example" % i, "*.w%d.example" % i],
               "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "c%d" % i}}]}
              for i in range(2000)]
    t = table({"name": "big", "virtual_hosts": vhosts})
    assert t.find(req(host="s1999.example")).cluster == "c1999"
    assert t.find(req(host="a.w7.example")).cluster == "c7"
    assert t.find(req(host="nothing")) is None
    # one probe per distinct wildcard length, not per virtual host
    assert len(t._suffix) < 10


def test_regex_is_re2():
    assert compile_re2("a$").search("a\n") is None  # RE2 $ is end of text
    assert compile_re2("(?i)abc").fullmatch("ABC")
    assert compile_re2("a(?i)bc").fullmatch("aBC") and not compile_re2("a(?i)bc").fullmatch("ABC")
    assert compile_re2("(?<n>x)\\z").fullmatch("x")
    assert compile_re2("[[:digit:]]+").fullmatch("123")
    assert compile_re2("\\Qa.b\\E").fullmatch("a.b") and not compile_re2("\\Qa.b\\E").fullmatch("axb")
    assert compile_re2("\\d").fullmatch("\u0663") is None  # ASCII classes as RE2
    for bad in ("(?=x)", "(a)\\1", "a++", "(?>a)", "(?x)a", "[a", "a)", "a{1001}"):
        with pytest.raises(ConfigError):
            compile_re2(bad, "f")


def test_istio_route_configs_compile():
    import glob
    import json
    from pyproxy.config.registry import ensure_types_for_json
    n = 0

    def walk(o):
        nonlocal n
        if isinstance(o, dict):
            if "virtual_hosts" in o:
                d = {k: v for k, v in o.items() if k != "@type"}
                ensure_types_for_json(d)
                t = table(d)
                assert t.virtual_hosts
                n += 1
                return
            for v in o.values():
                walk(v)
        elif isinstance(o, list):
            for v in o:
                walk(v)
    for f in glob.glob("/work/shared/testdata/istio/*.json"):
        with open(f) as fh:
            walk(json.load(fh))
    if n == 0:
        pytest.skip("istio testdata not present")
    assert n > 10


def test_runtime_fraction_uses_random_value():
    t = one_route("""  - match: {prefix: /, runtime_fraction: {default_value: {numerator: 25, denominator: TEN_THOUSAND}}}
    route: {cluster: sampled}
  - match: {prefix: /}
    route: {cluster: rest}
""")
    got = [t.find(req(), None, v).cluster for v in (0, 24, 25, 9999, 10024, 10025)]
    assert got == ["sampled", "sampled", "rest", "rest", "sampled", "rest"]


def test_mirror_policies_and_weight_header():
    t = one_route("""  - match: {prefix: /}
    route:
      weighted_clusters:
        header_name: x-weight
        clusters: [{name: a, weight: 50}, {name: b, weight: 50}]
      request_mirror_policies:
      - cluster: shadow
        runtime_fraction: {default_value: {numerator: 10}}
""")
    e = t.find(req())
    assert e.select_cluster(req(x_weight="10"), 99)[0] == "a"
    assert e.select_cluster(req(x_weight="60"), 0)[0] == "b"
    (m,) = e.mirror_policies
    assert m.cluster == "shadow" and m.sampled(9) and not m.sampled(10)


def test_header_mutation_actions():
    t = one_route("""  - match: {prefix: /}
    route: {cluster: c}
    request_headers_to_add:
    - {header: {key: x-if-absent, value: new}, append_action: ADD_IF_ABSENT}
    - {header: {key: x-absent-too, value: new}, append_action: ADD_IF_ABSENT}
    - {header: {key: x-ow, value: new}, append_action: OVERWRITE_IF_EXISTS}
    - {header: {key: x-ow-missing, value: new}, append_action: OVERWRITE_IF_EXISTS}
    - {header: {key: x-empty, value: '%REQ(x-nothing)%'}}
    - {header: {key: x-keep, value: '%REQ(x-nothing)%'}, keep_empty_value: true}
    - {header: {key: x-raw, raw_value: cmF3}}
""")
    h = req(x_if_absent="old", x_ow="old")
    t.find(h).finalize_request_headers(h, StreamInfo(), None)
    assert h.get_all("x-if-absent") == ["old"] and h.get_all("x-absent-too") == ["new"]
    assert h.get_all("x-ow") == ["new"] and "x-ow-missing" not in h
    assert "x-empty" not in h and h.get("x-keep") == "" and h.get("x-raw") == "raw"
    with pytest.raises(ConfigError, match="Both append and append_action"):
        one_route("  - match: {prefix: /}\n    route: {cluster: c}\n    request_headers_to_add: "
                  "[{header: {key: x, value: y}, append: true, append_action: ADD_IF_ABSENT}]\n")


def test_first_match_wins_across_prefix_lookup_and_full_matchers():
    """Plain prefixes are looked up by dict; routes with more conditions must keep their order."""
    from google.protobuf import json_format
    from envoy.config.route.v3 import route_pb2
    from pyproxy.http.headers import Headers
    from pyproxy.routing import compile_route_config

    def rc(routes):
        return compile_route_config(json_format.ParseDict(
            {"virtual_hosts": [{"name": "v", "domains": ["*"], "routes": routes}]},
            route_pb2.RouteConfiguration()))

    def r(name, prefix, header=None):
        m = {"prefix": prefix}
        if header:
            m["headers"] = [{"name": header, "present_match": True}]
        return {"name": name, "match": m, "route": {"cluster": name}}

    t = rc([r("a", "/x/"), r("hdr", "/", "x-h"), r("b", "/x/y"), r("root", "/")])

    def pick(path, **hdr):
        h = Headers([(":method", "GET"), (":path", path), (":authority", "h")] + list(hdr.items()))
        e = t.find(h)
        return e.name if e else None

    assert pick("/x/y") == "a"                 # earliest plain prefix
    assert pick("/x/y", **{"x-h": "1"}) == "a"  # the header route comes after it
    assert pick("/z", **{"x-h": "1"}) == "hdr"  # the header route comes before "root"
    assert pick("/z") == "root"
    assert pick("/x/y?q=1") == "a"              # the query string is not part of the path
    t2 = rc([r("hdr", "/", "x-h"), r("a", "/x/")])
    assert t2.find(Headers([(":method", "GET"), (":path", "/x/1"), (":authority", "h"),
                                              ("x-h", "1")])).name == "hdr"


def test_indexed_lookup_equals_a_linear_scan():
    """The route index (prefix and exact-path maps, routes gated by their path) finds the same
    route as trying every route in order, over random tables and requests."""
    import random
    rnd = random.Random(7)
    segs = ["a", "b", "ab", "api", "v1", "x"]

    def rpath():
        return "/" + "/".join(rnd.choice(segs) for _ in range(rnd.randint(0, 3)))

    for _ in range(300):
        routes = []
        for i in range(rnd.randint(1, 14)):
            kind = rnd.choice(["prefix", "prefix", "path", "safe_regex", "path_separated_prefix"])
            if kind == "safe_regex":
                m = {"safe_regex": {"regex": rnd.choice(["/a.*", "/ab?/.*", ".*x", "/api/v1"])}}
            elif kind == "path_separated_prefix":
                m = {"path_separated_prefix": rnd.choice(["/a", "/api", "/ab"])}
            else:
                # (a '?', '#' or ';' in a route's path: the request path part never has it)
                m = {kind: rnd.choice([rpath(), rpath() + "/", "/", rpath() + rnd.choice("?#;")])}
            if rnd.random() < 0.2:
                m["case_sensitive"] = False
            if rnd.random() < 0.35:
                m["headers"] = [{"name": "x-t", "string_match": {"exact": rnd.choice(["1", "2"])}}]
            if rnd.random() < 0.15:
                m["query_parameters"] = [{"name": "q", "present_match": True}]
            routes.append({"match": m, "route": {"cluster": "c%d" % i}})
        strip = rnd.random() < 0.3  # ignore_path_parameters_in_path_matching
        t = table({"name": "t", "virtual_hosts": [{"name": "vh", "domains": ["*"], "routes": routes}],
                   "ignore_path_parameters_in_path_matching": strip})
        vh = t.virtual_hosts[0]
        for _ in range(40):
            p = rpath() + rnd.choice(["", "?q=1", "?z", "/", "#f", "#f?q=1"])
            if rnd.random() < 0.2:
                p = p.upper()
            if rnd.random() < 0.2:  # a path parameter in one segment
                i = rnd.randrange(len(p))
                p = p[:i] + ";p=1" + p[i:]
            extra = {"x_t": rnd.choice(["1", "2"])} if rnd.random() < 0.6 else {}
            h = req(p, **extra)
            got = t.find(h)
            # the HTTP/1.1 lane's entry point (authority and path given) finds the same
            assert t.find_for_path(h, "h", p) is got
            path_nq = p.split("?")[0].split("#")[0]
            if strip:
                path_nq = "/".join(seg.partition(";")[0] for seg in path_nq.split("/"))
            want = next((r for r in vh.routes if r.matches(h, p, path_nq, path_nq.lower(), False, 0, [None])),
                        None)
            assert got is want, (routes, p, extra, got and got.name, want and want.name)


def test_literal_header_mutation_shortcut_equals_the_general_rules():
    """HeaderMutation's shortcut for literal appends/overwrites gives the general rules' result."""
    import random
    from pyproxy.routing.header_mutation import (APPEND_IF_EXISTS_OR_ADD, OVERWRITE_IF_EXISTS_OR_ADD,
                                                 HeaderMutation)
    rnd = random.Random(3)
    names = ["x-a", "x-b", "x-c"]
    shortcut = 0
    for _ in range(400):
        action = rnd.choice([APPEND_IF_EXISTS_OR_ADD, OVERWRITE_IF_EXISTS_OR_ADD])
        picked = rnd.sample(names, rnd.randint(1, 3))
        adds = [(n, None, rnd.choice(["1", "2", ""]), action, rnd.random() < 0.3) for n in picked]
        m = HeaderMutation(adds)
        general = HeaderMutation(adds)
        general.literal = None
        shortcut += m.literal is not None
        h0 = [(":path", "/"), ("host", "h")] + [(rnd.choice(names + ["y"]), str(i)) for i in range(rnd.randint(0, 5))]
        a, b = Headers(h0), Headers(h0)
        m.apply(a)
        general.apply(b)
        assert a._h == b._h, (adds, h0, a._h, b._h)
    assert shortcut > 100


def test_first_route_shortcut_respects_query_fragment_and_path_parameters():
    """A first route whose prefix holds '?', '#' or ';' is not taken by ``startswith`` on the raw
    path: the route matches the path part (without query and fragment, and without parameters
    when ``ignore_path_parameters_in_path_matching``), which never contains them."""
    for prefix, path, strip in (("/a;", "/a;p=1/b", True), ("/a?", "/a?q=1", False),
                                ("/a#", "/a#f", False)):
        t = table({"name": "t", "ignore_path_parameters_in_path_matching": strip,
                   "virtual_hosts": [{"name": "vh", "domains": ["*"], "routes": [
                       {"name": "odd", "match": {"prefix": prefix}, "route": {"cluster": "c"}},
                       {"name": "rest", "match": {"prefix": "/"}, "route": {"cluster": "c"}}]}]})
        h = req(path)
        assert t.find(h).name == "rest" and t.find_for_path(h, "h", path).name == "rest", prefix
    # the plain case takes it
    t = one_route("  - match: {prefix: /a}\n    route: {cluster: c}\n")
    assert t.find(req("/ab?x#y")) is t.virtual_hosts[0].routes[0]
