"""Smoke test of the benchmark harness (benchmarks/run.py) in a tiny mode.

Runs the real harness: nginx backend, nginx as proxy, the bare Python forwarder and the direct
path for 1 s each, a pyproxy
command that cannot start (the harness must report it and carry on), and, when Envoy is present,
a 50-resource xDS push. Checks the JSON holds sane numbers.
"""
import glob
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(ROOT, "benchmarks", "run.py")
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from bench import loadgen, report  # noqa: E402

WRK_SAMPLE = """Running 1s test @ http://127.0.0.1:1/r18/bench
  1 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   812.00us  300.00us   9.10ms   90.00%
    Req/Sec    60.00k     1.00k   62.00k    80.00%
  Latency Distribution
     50%  750.00us
     75%    0.90ms
     90%    1.10ms
     99%    2.50ms
  60123 requests in 1.00s, 65.00MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 7
Requests/sec:  60100.50
Transfer/sec:     65.00MB
"""


def test_parse_wrk():
    r = loadgen.parse_wrk(WRK_SAMPLE)
    assert r["rps"] == 60100.5
    assert r["requests"] == 60123
    assert r["duration_s"] == 1.0
    assert r["p50_ms"] == pytest.approx(0.75)
    assert r["p99_ms"] == pytest.approx(2.5)
    assert r["errors"] == 3
    assert r["non2xx"] == 7
    with pytest.raises(loadgen.LoadError):
        loadgen.parse_wrk("wrk: connection refused\n")


def test_summary_flags_bad_runs():
    t = {"status": "ok", "runs": [
        {"rps": 100.0, "p50_ms": 1.0, "p99_ms": 2.0, "cpu_s": 0.5, "requests": 1000,
         "duration_s": 10.0, "errors": 0, "non2xx": 0},
        {"rps": 300.0, "p50_ms": 3.0, "p99_ms": 4.0, "cpu_s": 1.0, "requests": 2000,
         "duration_s": 10.0, "errors": 0, "non2xx": 5}]}
    report.summarize(t)
    assert t["median"]["rps"] == 200.0
    assert t["median"]["cpu_s_per_1k_req"] == 0.5
    assert t["warnings"] and "not valid" in t["warnings"][0]


def _run(args, tmp_path, timeout):
    out = tmp_path / "results"
    cp = subprocess.run([sys.executable, RUN, "--no-plot", "--out", str(out)] + args,
                        capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    files = glob.glob(str(out / "*.json"))
    assert len(files) == 1, cp.stdout + cp.stderr
    with open(files[0]) as f:
        return cp, json.load(f)


@pytest.mark.skipif(not (shutil.which("wrk") and shutil.which("nginx")),
                    reason="wrk or nginx missing")
def test_harness_h1_direct_and_nginx(tmp_path):
    bogus = f"{sys.executable} -c 'import sys; sys.exit(3)'"
    cp, res = _run(["--only", "h1", "--chains", "router", "--targets", "direct,nginx,bare,pyproxy",
                    "--duration", "1", "--repeat", "1", "--warmup", "0", "--connections", "10",
                    "--pyproxy-cmd", bogus], tmp_path, timeout=60)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    h1 = res["modes"]["h1:router"]["targets"]
    assert h1["pyproxy"]["status"] == "failed to start"
    assert "exited with code 3" in h1["pyproxy"]["reason"]
    for name in ("direct", "nginx", "bare"):
        t = h1[name]
        assert t["status"] == "ok", t
        run = t["runs"][0]
        assert run["errors"] == 0 and run["non2xx"] == 0, run
        med = t["median"]
        assert med["rps"] > 100
        assert 0 < med["p50_ms"] <= med["p99_ms"] < 1000
    assert h1["direct"]["median"]["cpu_s_per_1k_req"] is None
    for name in ("nginx", "bare"):
        t = h1[name]
        assert 0 < t["median"]["cpu_s_per_1k_req"] < 10  # CPU-seconds per 1000 requests
        assert 1 < t["rss_mb"] < 1000
        assert 0 < t["ratios"]["rps_vs_direct"] < 10
    assert "failed to start" in cp.stdout
    if len(os.sched_getaffinity(0)) >= 2 and shutil.which("taskset"):
        assert res["meta"]["pinning"].startswith("proxy under test pinned to CPU")


@pytest.mark.skipif(not (shutil.which("wrk") and shutil.which("nginx")),
                    reason="wrk or nginx missing")
def test_harness_istio_chains(tmp_path):
    """The Istio chains' configs and checks: Envoy (the reference, when present) and nginx reach
    the backend's 200 only through the target service's virtual host and the misrouting check
    sees 421 for another service, and so does pyproxy (the checkout's); the telemetry chain adds
    pyproxy-nostats and leaves nginx out."""
    targets = "direct,nginx,pyproxy" + (",envoy" if shutil.which("envoy") else "")
    cp, res = _run(["--only", "h1", "--chains", "istio,istio-telemetry", "--targets", targets,
                    "--duration", "1", "--repeat", "1", "--warmup", "0", "--connections", "10"],
                   tmp_path, timeout=120)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    istio = res["modes"]["h1:istio"]["targets"]
    tel = res["modes"]["h1:istio-telemetry"]["targets"]
    assert "nginx" not in tel
    ok = [(istio, n) for n in ("direct", "nginx", "pyproxy")] + [(tel, "pyproxy"), (tel, "pyproxy-nostats")]
    if shutil.which("envoy"):
        ok += [(istio, "envoy"), (tel, "envoy")]
    for mode, name in ok:
        t = mode[name]
        assert t["status"] == "ok", (name, t)
        run = t["runs"][0]
        assert run["errors"] == 0 and run["non2xx"] == 0 and run["requests"] > 10, (name, run)
    assert "CAVEAT: Envoy runs this chain without" in cp.stdout
    assert "rps_vs_nostats" in tel["pyproxy"]["ratios"]


def test_istio_route_table_shape():
    """The Istio route table is istiod's shape: ten services, eight domains each, the default retry
    policy, decorators, timeout 0s, then allow_any."""
    from bench import configs
    rc = configs.istio_route_config()
    vhs = rc["virtual_hosts"]
    assert len(vhs) == 11 and vhs[-1]["domains"] == ["*"]
    assert [v["name"] for v in vhs[:-1]] == sorted(v["name"] for v in vhs[:-1])
    for v in vhs[:-1]:
        assert len(v["domains"]) == len(set(v["domains"])) == 8 and v["include_request_attempt_count"]
        (r,) = v["routes"]
        assert r["route"]["timeout"] == r["route"]["max_grpc_timeout"] == "0s"
        assert r["route"]["retry_policy"]["num_retries"] == 2
        assert r["decorator"]["operation"] == v["name"] + "/*"
    assert sum(configs.ISTIO_HOST in v["domains"] for v in vhs) == 1


def _control_plane_importable():
    from bench import ads
    return ads.control_plane_available(ROOT)


@pytest.mark.skipif(not shutil.which("envoy"), reason="envoy missing")
@pytest.mark.parametrize("server,api", [("builtin", "sotw"), ("control-plane", "sotw"),
                                        ("control-plane", "delta")])
def test_harness_xds_envoy(tmp_path, server, api):
    if server == "control-plane" and not _control_plane_importable():
        pytest.skip("pyproxy.control_plane not in this checkout")
    cp, res = _run(["--only", "xds", "--targets", "envoy", "--xds-count", "50",
                    "--xds-timeout", "20", "--xds-server", server, "--xds-api", api],
                   tmp_path, timeout=60)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    mode = res["modes"]["xds" if api == "sotw" else "xds_delta"]
    t = mode["targets"]["envoy"]
    assert t["status"] == "ok", t
    assert ("ControlPlane" in t["server"]) == (server == "control-plane")
    for ty in ("cds", "eds", "rds"):
        assert t["types"][ty]["nacks"] == []
        assert 0 <= t["types"][ty]["first_request_s"] <= t["types"][ty]["ack_s"]
        assert t["types"][ty]["ack_s"] <= t["all_acked_s"]
    assert t["types"]["cds"]["names_requested"] == 0  # wildcard
    assert t["types"]["eds"]["names_requested"] == 50
    assert t["types"]["rds"]["names_requested"] == 1
    assert 10 < t["rss_mb"] < 2000
