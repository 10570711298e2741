"""Every regex runs on RE2: pathological patterns on the admin API (directly and through a
15090-style listener routed to the admin port) and in routes answer within a second, `/ready` keeps
answering, and RE2's program-size limits apply as in Envoy. The end-to-end cases run on pyproxy and
on Envoy with the same bootstrap."""

from __future__ import annotations

import time
import urllib.parse

import pytest
from envoy.config.bootstrap.v3 import bootstrap_pb2
from google.protobuf import json_format

from pyproxy.config import ConfigError
from pyproxy.routing.regex import (DEFAULT_ERROR_LEVEL, check_re2, compile_re2, limits_from_bootstrap,
                                   re2_substitution, set_program_size_limits)
from proxy_util import bootstrap, cluster, free_port, http_listener, proxies, request, route_config

PATHOLOGICAL = ["(a+)+$", "(.*.*)*#"]


@pytest.fixture(autouse=True)
def _default_limits():
    set_program_size_limits()
    yield
    set_program_size_limits()


# -- units --------------------------------------------------------------------------------------------

def test_pathological_patterns_run_in_linear_time():
    for p in PATHOLOGICAL:
        rx = compile_re2(p)
        t = time.monotonic()
        assert rx.fullmatch("a" * 200000 + "!") is None
        assert rx.search("x" * 200000) is None
        assert time.monotonic() - t < 0.5


def test_program_size_limit_default_and_runtime():
    big = "[a-z]{150}"  # RE2 program size ~150: over Envoy's default error level of 100
    with pytest.raises(ConfigError) as ei:
        compile_re2(big, "route.match.safe_regex.regex")
    msg = str(ei.value)
    assert "RE2 program size of" in msg and "> max program size of 100 set for the error level" in msg
    assert "route.match.safe_regex.regex" in msg
    bs = json_format.ParseDict({"layered_runtime": {"layers": [
        {"name": "global config", "static_layer": {"re2.max_program_size.error_level": "32768"}},
        {"name": "admin", "admin_layer": {}}]}}, bootstrap_pb2.Bootstrap())
    assert limits_from_bootstrap(bs) == (32768, None)
    set_program_size_limits(*limits_from_bootstrap(bs))
    assert compile_re2(big).fullmatch("a" * 150)
    # nested form, and a later layer wins
    bs = json_format.ParseDict({"layered_runtime": {"layers": [
        {"name": "a", "static_layer": {"re2": {"max_program_size": {"error_level": 10, "warn_level": 5}}}},
        {"name": "b", "static_layer": {"re2.max_program_size.error_level": 20}}]}}, bootstrap_pb2.Bootstrap())
    assert limits_from_bootstrap(bs) == (20, 5)
    assert limits_from_bootstrap(bootstrap_pb2.Bootstrap()) == (DEFAULT_ERROR_LEVEL, None)


def test_warn_level_logs(caplog):
    set_program_size_limits(1000, 10)
    with caplog.at_level("WARNING", logger="pyproxy"):
        compile_re2("[a-z]{20}")
    assert any("set for the warn level threshold" in r.getMessage() for r in caplog.records)


def test_deprecated_max_program_size_in_regex_matcher():
    from envoy.type.matcher.v3 import regex_pb2
    from pyproxy.routing.regex import compile_regex_matcher
    m = regex_pb2.RegexMatcher(regex="[a-z]{20}")
    m.google_re2.max_program_size.value = 10
    with pytest.raises(ConfigError, match="max program size of 10. Increase"):
        compile_regex_matcher(m)


def test_rejected_syntax_and_rewrites():
    for bad in ("(?=x)", "(?<!x)y", "(a)\\1", "a++", "[z-a]", "(", "a{2000}"):
        with pytest.raises(ConfigError, match="invalid regex"):
            compile_re2(bad, "f")
    with pytest.raises(ConfigError):
        re2_substitution("\\x")
    rx = compile_re2("/(a+)/(b+)")
    assert rx.sub(re2_substitution("/\\2/\\1/\\0"), "/aa/bb/c") == "/bb/aa//aa/bb/c"
    assert rx.sub(re2_substitution("\\3"), "/aa/bb") == "/aa/bb"  # no group 3: unchanged, as RE2
    assert compile_re2("x*").sub(re2_substitution("-"), "abxd") == "-a-b-d-"  # RE2 GlobalReplace
    # raw bytes semantics: a latin-1 decoded header value matches as Envoy sees its bytes
    assert compile_re2("caf\u00e9").fullmatch("caf\u00c3\u00a9")
    with pytest.raises(Exception):
        check_re2("(")


# -- end to end ---------------------------------------------------------------------------------------

def _bs(admin_port):
    """Admin on a fixed port; a 15090-style listener routing /stats/prometheus (and all of
    /stats) to it; a listener whose routes and header matchers carry pathological regexes."""
    prom_port, port = free_port(), free_port()
    prom_rc = route_config([{"match": {"prefix": "/stats"}, "route": {"cluster": "prometheus_stats"}}])
    routes = [
        {"match": {"safe_regex": {"regex": "/(a+)+$"}}, "direct_response": {"status": 201}},
        {"match": {"prefix": "/h", "headers": [{"name": "x-h", "string_match": {
            "safe_regex": {"regex": "(.*.*)*#"}}}]}, "direct_response": {"status": 202}},
        {"match": {"prefix": "/"}, "direct_response": {"status": 404}},
    ]
    bs = bootstrap([http_listener(prom_port, prom_rc, name="prometheus"),
                    http_listener(port, route_config(routes), name="routes")],
                   [cluster("prometheus_stats", [admin_port])])
    bs["admin"]["address"]["socket_address"]["port_value"] = admin_port
    return bs, prom_port, port


@pytest.mark.parametrize("kind", proxies(), ids=lambda k: k.kind)
def test_pathological_regexes_answer_fast(kind):
    admin_port = free_port()
    bs, prom_port, port = _bs(admin_port)
    with kind(bs) as px:
        for pat in PATHOLOGICAL:
            q = urllib.parse.quote(pat, safe="")
            for p, path in ((admin_port, "/stats?filter=" + q), (prom_port, "/stats/prometheus?filter=" + q),
                            (admin_port, "/stats/prometheus?filter=" + q),
                            (admin_port, "/config_dump?name_regex=" + q), (admin_port, "/clusters?filter=" + q)):
                t = time.monotonic()
                st, _, _ = request(p, "GET", path, timeout=5)
                assert st == 200 and time.monotonic() - t < 1.0, (path, st)
        t = time.monotonic()
        assert request(port, "GET", "/" + "a" * 20000 + "!", timeout=5)[0] == 404
        assert request(port, "GET", "/" + "a" * 20000, timeout=5)[0] == 201
        assert request(port, "GET", "/h", headers={"x-h": "x" * 20000}, timeout=5)[0] == 404
        assert request(port, "GET", "/h", headers={"x-h": "x" * 100 + "#"}, timeout=5)[0] == 202
        assert time.monotonic() - t < 1.0 * 4
        assert request(admin_port, "GET", "/ready", timeout=2)[0] == 200


def test_bad_admin_regexes_are_400_like_envoy():
    kinds = proxies()
    got = {}
    for kind in kinds:
        admin_port = free_port()
        bs, prom_port, _ = _bs(admin_port)
        with kind(bs) as px:
            out = []
            for path in ("/stats?filter=(", "/stats/prometheus?filter=a%2B%2B", "/clusters?filter=(",
                         "/config_dump?name_regex=(", "/config_dump?name_regex=%5Ba-z%5D%7B150%7D"):
                st, _, body = request(admin_port, "GET", path)
                out.append((path, st, body.decode().strip()))
            st, _, body = request(prom_port, "GET", "/stats/prometheus?filter=(")
            out.append(("via listener", st, body.decode().strip()))
            got[kind.kind] = out
    py = got["pyproxy"]
    assert all(st == 400 for _, st, _ in py), py
    assert py[0][2] == "Invalid re2 regex: missing ): ("
    assert py[3][2] == "INVALID_ARGUMENT: Error while parsing name_regex from (: missing ): ("
    assert "RE2 program size of" in py[4][2]
    if "envoy" in got:
        assert [(p, s) for p, s, _ in got["envoy"]] == [(p, s) for p, s, _ in py]
        for (p, _, eb), (_, _, pb) in zip(got["envoy"], py):
            assert eb == pb, (p, eb, pb)


def test_route_regex_over_program_size_is_rejected_at_startup(tmp_path):
    from proxy_util import run_pyproxy
    import json
    rc = route_config([{"match": {"safe_regex": {"regex": "/[a-z]{150}"}}, "direct_response": {"status": 200}}])
    bs = bootstrap([http_listener(free_port(), rc)], [])
    p = tmp_path / "bs.json"
    p.write_text(json.dumps(bs))
    r = run_pyproxy(["--mode", "validate", "-c", str(p)])
    assert r.returncode == 1 and "RE2 program size of" in r.stderr and "safe_regex.regex" in r.stderr
    # Istio's bootstrap raises the error level: then it is accepted
    bs["layered_runtime"] = {"layers": [{"name": "g", "static_layer": {"re2.max_program_size.error_level": "32768"}}]}
    p.write_text(json.dumps(bs))
    r = run_pyproxy(["--mode", "validate", "-c", str(p)])
    assert r.returncode == 0, r.stderr
    r = run_pyproxy(["validate", str(p)])
    assert r.returncode == 0, r.stdout


def test_stats_tag_regexes_from_config_run_on_re2():
    """Istio's stats_tags: every one on RE2 but the look-ahead RE2 refuses (Envoy runs these on
    std::regex), which only ever sees stat names."""
    import json
    import os
    import re
    from pyproxy.stats import Store
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared",
                        "testdata", "istio", "sidecar-bootstrap-envoy-rev.json")
    if not os.path.exists(path):
        path = "/work/shared/testdata/istio/sidecar-bootstrap-envoy-rev.json"
    b = json.load(open(path))
    tags = [(t["tag_name"], t["regex"]) for t in b["stats_config"]["stats_tags"]]
    st = Store(tags, use_default_tags=False)
    engines = {e.name: type(e.regex).__module__ for e in st.extractors}
    assert len(engines) == len(tags)
    assert [n for n, m in engines.items() if m != "re2"] == ["http_conn_manager_listener_prefix"]
    assert "(?=" in dict(tags)["http_conn_manager_listener_prefix"]
    t = time.monotonic()
    st2 = Store([("t", "((a+)+$)")], use_default_tags=False)
    assert st2.extractors[0].extract("a" * 50000 + "!") is None and time.monotonic() - t < 0.5


def test_pem_parsing_is_linear():
    """A secret (from SDS, i.e. the network) full of BEGIN lines without an END is refused at once."""
    from pyproxy.tls.context import _pem_blocks, parse_cert_chain
    t = time.monotonic()
    with pytest.raises(ConfigError, match="no PEM certificate"):
        parse_cert_chain(b"-----BEGIN CERTIFICATE-----x" * 40000, "trusted_ca")
    assert time.monotonic() - t < 0.5
    two = b"junk-----BEGIN CERTIFICATE-----\nA\n-----END CERTIFICATE-----\n-----BEGIN CERTIFICATE-----B-----END CERTIFICATE-----"
    assert _pem_blocks(two) == [b"-----BEGIN CERTIFICATE-----\nA\n-----END CERTIFICATE-----",
                                b"-----BEGIN CERTIFICATE-----B-----END CERTIFICATE-----"]
    assert _pem_blocks(b"-----BEGIN CERTIFICATE----------END CERTIFICATE-----") == []  # as the regex: one char at least


@pytest.mark.parametrize("kind", proxies(), ids=lambda k: k.kind)
def test_pathological_regexes_in_rbac_answer_fast(kind):
    """RBAC policies whose header and url_path matchers carry backtracking-prone patterns decide in
    linear time: a DENY on ``x-h`` matching ``(a+)+$`` and on a path matching ``/(x*x*)*z``."""
    port = free_port()
    rbac = {"@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC", "rules": {
        "action": "DENY", "policies": {"p": {"principals": [{"any": True}], "permissions": [
            {"header": {"name": "x-h", "string_match": {"safe_regex": {"regex": "(a+)+$"}}}},
            {"url_path": {"path": {"safe_regex": {"regex": "/(x*x*)*z"}}}}]}}}}
    rc = route_config([{"match": {"prefix": "/"}, "direct_response": {"status": 200}}])
    filters = [{"name": "envoy.filters.http.rbac", "typed_config": rbac},
               {"name": "envoy.filters.http.router",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]
    with kind(bootstrap([http_listener(port, rc, http_filters=filters)], [])):
        t = time.monotonic()
        assert request(port, "GET", "/", headers={"x-h": "a" * 20000 + "!"}, timeout=5)[0] == 200
        assert request(port, "GET", "/", headers={"x-h": "a" * 20000}, timeout=5)[0] == 403
        assert request(port, "GET", "/" + "x" * 20000, timeout=5)[0] == 200
        assert request(port, "GET", "/" + "x" * 100 + "z", timeout=5)[0] == 403
        assert time.monotonic() - t < 4.0
