#!/usr/bin/env python3
"""pyproxy benchmark harness: pyproxy vs Envoy vs nginx vs direct, one command.

    python3 benchmarks/run.py [--quick] [--only opcodes,h1,h1paced,h2,grpc,xds,mtls]
                              [--chains istio,istio-telemetry,router] [--targets ...]

See benchmarks/README.md for what each figure means.
"""
import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import http.client
import re

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from bench import configs, loadgen, procs, report  # noqa: E402

MODES = ("opcodes", "h1", "h1paced", "h2", "grpc", "xds", "mtls")
TARGETS = ("direct", "pyproxy", "envoy", "nginx", "bare")
CHAIN_TITLES = {
    "istio": "Istio's outbound chain (grpc_stats, fault, cors, router; route table \"80\": 10 "
             "services x 8 domains, Istio's retry policy, decorators, timeout 0s)",
    "istio-telemetry": "Istio's outbound chain with telemetry (istio.metadata_exchange, grpc_stats, "
                       "istio.alpn, fault, cors, istio.stats, router; same route table)",
    "router": "20 routes, router only, request + response header added by the matched route",
}
DEFAULT_TARGETS = ("direct", "pyproxy", "envoy", "nginx")
PROXIES = ("pyproxy", "envoy", "nginx")


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="short runs: 3 s per run, 1 repetition, 1 s warm-up")
    ap.add_argument("--only", default=",".join(MODES),
                    help=f"comma-separated modes out of {','.join(MODES)} (default: all)")
    ap.add_argument("--targets", default=",".join(DEFAULT_TARGETS),
                    help=f"comma-separated targets out of {','.join(TARGETS)} (default: "
                         f"{','.join(DEFAULT_TARGETS)}; `bare` is a minimal Python forwarder, "
                         f"HTTP/1.1 only, as a ceiling reference)")
    ap.add_argument("--duration", type=int, help="seconds per measured run (default 10, quick 3)")
    ap.add_argument("--repeat", type=int, help="repetitions per target (default 3, quick 1)")
    ap.add_argument("--warmup", type=int, help="warm-up seconds per target (default 2, quick 1)")
    ap.add_argument("--threads", type=int, default=1, help="wrk threads (default 1)")
    ap.add_argument("--connections", type=int, default=50, help="wrk connections (default 50)")
    ap.add_argument("--paced-connections", type=int, default=10)
    ap.add_argument("--paced-delay-ms", type=int, default=10)
    ap.add_argument("--h2-clients", type=int, default=10, help="h2load -c (default 10)")
    ap.add_argument("--h2-streams", type=int, default=10, help="h2load -m (default 10)")
    ap.add_argument("--grpc-concurrency", type=int, default=16)
    ap.add_argument("--xds-count", default=None,
                    help="clusters / assignments / virtual hosts pushed in the xds mode; a "
                         "comma-separated list (e.g. 2000,5000,10000) runs each size, to show "
                         "the growth (default 2000,5000,10000; --quick: 2000)")
    ap.add_argument("--xds-timeout", type=float, default=120.0)
    ap.add_argument("--xds-api", default="delta",
                    help="ADS flavours for the xds mode: sotw, delta (default delta, as Istio "
                         "uses; delta needs pyproxy.control_plane)")
    ap.add_argument("--xds-server", choices=("auto", "control-plane", "builtin"), default="auto",
                    help="ADS server: pyproxy.control_plane when importable (auto), or the "
                         "builtin SotW server in benchmarks/bench/ads.py")
    ap.add_argument("--pyproxy-root", default=os.path.dirname(HERE),
                    help="checkout to run `python3 -m pyproxy` from (default: this repo)")
    ap.add_argument("--pyproxy-cmd", default=f"{sys.executable} -m pyproxy",
                    help="command prefix for pyproxy (the bootstrap flags are appended)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"),
                    help="directory for <timestamp>.json and .png")
    ap.add_argument("--chains", "--chain", dest="chains", default=",".join(configs.CHAINS),
                    help="configs for the h1 and h2 modes, in order (default: "
                         f"{','.join(configs.CHAINS)}): istio = Istio's outbound sidecar chain and "
                         "route table (the headline), istio-telemetry = the same with Istio's "
                         "telemetry filters (adds target pyproxy-nostats), router = the 20-route "
                         "router-only table (bench/configs.py)")
    ap.add_argument("--paced-chains", default="istio",
                    help="configs for the h1paced mode (default: istio)")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--no-pin", action="store_true", help="do not pin with taskset")
    ap.add_argument("--keep-tmp", action="store_true", help="keep generated configs and logs")
    a = ap.parse_args(argv)
    a.duration = a.duration or (3 if a.quick else 10)
    a.repeat = a.repeat or (1 if a.quick else 3)
    if a.warmup is None:
        a.warmup = 1 if a.quick else 2
    a.modes = [m.strip() for m in a.only.split(",") if m.strip()]
    a.targets = [t.strip() for t in a.targets.split(",") if t.strip()]
    a.chains = [c.strip() for c in a.chains.split(",") if c.strip()]
    a.paced_chains = [c.strip() for c in a.paced_chains.split(",") if c.strip()]
    for c in a.chains + a.paced_chains:
        if c not in configs.CHAINS:
            ap.error(f"unknown chain {c!r} (known: {', '.join(configs.CHAINS)})")
    a.xds_apis = [x.strip() for x in a.xds_api.split(",") if x.strip()]
    if a.xds_count is None:
        a.xds_count = "2000" if a.quick else "2000,5000,10000"
    try:
        a.xds_counts = [int(x) for x in str(a.xds_count).split(",") if x.strip()]
    except ValueError:
        ap.error(f"--xds-count takes integers: {a.xds_count!r}")
    if not a.xds_counts or min(a.xds_counts) < 1:
        ap.error("--xds-count needs at least one size >= 1")
    for x in a.xds_apis:
        if x not in ("sotw", "delta"):
            ap.error(f"unknown --xds-api {x!r} (sotw, delta)")
    for m in a.modes:
        if m not in MODES:
            ap.error(f"unknown mode {m!r} (known: {', '.join(MODES)})")
    for t in a.targets:
        if t not in TARGETS:
            ap.error(f"unknown target {t!r} (known: {', '.join(TARGETS)})")
    if a.duration < 1 or a.repeat < 1 or a.warmup < 0:
        ap.error("--duration and --repeat must be >= 1, --warmup >= 0")
    return a


def _version(cmd):
    try:
        cp = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        return ((cp.stdout or "") + (cp.stderr or "")).strip().splitlines()[0][:200]
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


class SkipTarget(Exception):
    pass


class Bench:
    def __init__(self, args):
        self.a = args
        self.tmp = tempfile.mkdtemp(prefix="pyproxy-bench-")
        os.chmod(self.tmp, 0o755)  # nginx workers run as nobody
        self.procs = []
        self.base_id = 1000 + (os.getpid() % 5000) * 10
        if args.no_pin:
            self.proxy_cpu, self.load_cpu = None, None
        else:
            self.proxy_cpu, self.load_cpu = procs.pinning()
        if self.load_cpu is not None:
            os.sched_setaffinity(0, {self.load_cpu})  # the harness itself stays off the proxy core
            self.pin_short = f"proxy on CPU {self.proxy_cpu}, load on CPU {self.load_cpu}"
            self.pin_note = (f"proxy under test pinned to CPU {self.proxy_cpu}; wrk/h2load, the "
                             f"backend, gRPC peers, ADS server and this harness to CPU "
                             f"{self.load_cpu} (taskset), the same for every target")
        else:
            self.pin_short = "not pinned"
            self.pin_note = "no CPU pinning (fewer than 2 CPUs, taskset missing, or --no-pin)"
        self.backend = None

    # -- process helpers -------------------------------------------------------------------
    def start(self, name, cmd, cpu, cwd=None):
        p = procs.Proc(name, cmd, self.tmp, cpu=cpu, cwd=cwd)
        self.procs.append(p)
        return p

    def stop(self, p):
        if p is None:
            return
        p.stop()
        if p in self.procs:
            self.procs.remove(p)

    def stop_all(self):
        for p in list(reversed(self.procs)):
            try:
                self.stop(p)
            except Exception as e:  # keep stopping the others
                print(f"warning: stopping {p.name} (pid {p.pid}): {e}", file=sys.stderr)

    def cleanup(self):
        self.stop_all()
        if self.a.keep_tmp:
            print(f"kept {self.tmp}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def start_backend(self):
        if self.backend:
            return self.backend
        h1, h2 = procs.free_port(), procs.free_port()
        istio = {k: procs.free_port() for k in ("h1", "h2", "misroute_h1", "misroute_h2")}
        conf = configs.nginx_backend_conf(self.tmp, h1, h2, istio)
        p = self.start("backend", ["nginx", "-c", conf, "-p", self.tmp], self.load_cpu)
        for port in [h1, h2] + list(istio.values()):
            procs.wait_tcp(port, p)
        self.backend = {"proc": p, "h1": h1, "h2": h2, "istio": istio}
        return self.backend

    def start_proxy(self, name, tag, upstream_port, upstream_h2, late_prefix=None,
                    nginx_mode="h1", chain="router", misroute_port=None):
        """Start one proxy (target ``name``) on config ``chain``; returns (proc, port). Raises
        StartError. ``pyproxy-nostats`` is pyproxy on the telemetry chain without istio.stats;
        Envoy runs the telemetry chain without the Istio filters its build lacks."""
        kind = "pyproxy" if name.startswith("pyproxy") else name
        if kind == "bare" and (upstream_h2 or late_prefix or chain != "router"):
            raise SkipTarget("the bare forwarder speaks HTTP/1.1 and the 20-route table only")
        boot_chain = chain
        if chain == "istio-telemetry":
            boot_chain = {"pyproxy-nostats": "istio-nostats", "envoy": "istio-telemetry-envoy"}.get(
                name, chain)
        tag = f"{tag}-{chain}"
        port = procs.free_port()
        if kind == "bare":
            cmd = [sys.executable, os.path.join(HERE, "bench", "bare_forwarder.py"),
                   "--listen", str(port), "--upstream", str(upstream_port)]
            p = self.start(f"bare-{tag}", cmd, self.proxy_cpu)
            procs.wait_tcp(port, p, timeout=10)
            return p, port
        if kind == "nginx" and chain != "router":
            conf = configs.nginx_istio_conf(self.tmp, port, upstream_port, misroute_port,
                                            nginx_mode)
            p = self.start(f"nginx-{tag}", ["nginx", "-c", conf, "-p", self.tmp],
                           self.proxy_cpu)
            procs.wait_tcp(port, p, timeout=10)
            return p, port
        if kind == "nginx":
            conf = configs.nginx_proxy_conf(self.tmp, port, upstream_port, nginx_mode,
                                            late_prefix, response_headers=True)
            p = self.start(f"nginx-{tag}", ["nginx", "-c", conf, "-p", self.tmp],
                           self.proxy_cpu)
            procs.wait_tcp(port, p, timeout=10)
            return p, port
        boot = configs.envoy_bootstrap(port, upstream_port, upstream_h2, late_prefix, boot_chain,
                                       response_headers=True, misroute_port=misroute_port)
        path = configs.write_yaml(os.path.join(self.tmp, f"bootstrap-{tag}-{name}.yaml"), boot)
        if kind == "envoy":
            self.base_id += 1
            cmd = ["envoy", "-c", path, "--concurrency", "1", "--base-id", str(self.base_id),
                   "--disable-hot-restart", "-l", "error"]
            p = self.start(f"envoy-{tag}", cmd, self.proxy_cpu)
            procs.wait_tcp(port, p, timeout=20)
            return p, port
        cmd = shlex.split(self.a.pyproxy_cmd) + ["-c", path, "--concurrency", "1",
                                                 "--disable-hot-restart", "-l", "error"]
        p = self.start(f"{name}-{tag}", cmd, self.proxy_cpu, cwd=self.a.pyproxy_root)
        procs.wait_tcp(port, p, timeout=20)
        return p, port


# -- HTTP/1.1 -----------------------------------------------------------------------------

class ChainRequest:
    """What the load generator sends for one chain: path, headers (proxies / direct), the direct
    path's backend port, and a request that must be misrouted (421) as a negative check."""

    def __init__(self, chain, be, h2=False):
        self.chain = chain
        if chain == "router":
            self.path = configs.BENCH_PATH
            self.headers = ()
            self.direct_headers = (f"{configs.ROUTE_HEADER}: {configs.ROUTE_VALUE}",)
            self.direct_port = be["h2" if h2 else "h1"]
            self.response_header = (configs.RESPONSE_HEADER, configs.ROUTE_VALUE)
            # route 17 (prefix /r17/) adds x-bench-route: r17, which the backend refuses
            self.wrong = (f"/r{configs.LATE_ROUTE - 1:02d}/bench", {})
        else:
            host = ":authority" if h2 else "Host"
            self.path = configs.ISTIO_PATH
            self.headers = (f"{host}: {configs.ISTIO_HOST}",)
            self.direct_headers = self.headers + (f"{configs.ATTEMPT_HEADER}: 1",)
            self.direct_port = be["istio"]["h2" if h2 else "h1"]
            self.response_header = None
            other = [s for s in configs.ISTIO_SERVICES if s != configs.ISTIO_TARGET][0]
            self.wrong = (configs.ISTIO_PATH, {"Host": f"{other}.{configs.ISTIO_NS}"})

    def header_dict(self, direct):
        return dict(h.split(": ", 1) for h in (self.direct_headers if direct else self.headers))


def _get(port, path, headers):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        c.request("GET", path, headers=headers)
        r = c.getresponse()
        return r, r.read()
    finally:
        c.close()


def check_h1(port, req, direct):
    """The benchmark request (and, through a proxy, one that must be misrouted); returns an error
    string or None."""
    try:
        r, body = _get(port, req.path, req.header_dict(direct))
    except (OSError, http.client.HTTPException) as e:
        return f"request failed: {e!r}"
    if r.status != 200 or len(body) != configs.BODY_SIZE:
        return f"expected 200 with {configs.BODY_SIZE} bytes, got {r.status} with {len(body)} bytes"
    if req.response_header and not direct:
        got = r.getheader(req.response_header[0])
        if got != req.response_header[1]:
            return (f"expected response header {req.response_header[0]}: "
                    f"{req.response_header[1]}, got {got!r}")
    if not direct:
        try:
            r, body = _get(port, req.wrong[0], req.wrong[1])
        except (OSError, http.client.HTTPException) as e:
            return f"misrouting check: request failed: {e!r}"
        if r.status != 421:
            return (f"misrouting check: GET {req.wrong[0]} {req.wrong[1]} must reach the wrong "
                    f"route and get 421, got {r.status}")
    return None


def chain_targets(a, chain):
    """The targets of one chain: the bare forwarder only knows the 20-route table; the telemetry
    chain adds pyproxy without istio.stats and leaves out nginx (the istio chain's figures)."""
    out = [t for t in a.targets if chain == "router" or t != "bare"]
    if chain == "istio-telemetry":
        out = [t for t in out if t != "nginx"]
        if "pyproxy" in out:
            out.insert(out.index("pyproxy") + 1, "pyproxy-nostats")
    return out


def chain_notes(chain):
    notes = ["config: " + CHAIN_TITLES[chain]]
    if chain == "istio-telemetry":
        notes.append("CAVEAT: Envoy runs this chain without istio.metadata_exchange, istio.alpn "
                     "and istio.stats (its upstream build lacks them), i.e. the istio chain; "
                     "pyproxy-nostats = pyproxy's chain without istio.stats")
    if chain != "router":
        notes.append(f"request: GET {configs.ISTIO_PATH}, Host {configs.ISTIO_HOST} (virtual "
                     f"host {configs.ISTIO_TARGET} of {len(configs.ISTIO_SERVICES)} + allow_any); "
                     f"the backend answers 200 only on {configs.ISTIO_TARGET}'s cluster and with "
                     f"{configs.ATTEMPT_HEADER}: 1")
    return notes


def setup_targets(bench, mode_key, start_fn, check_fn, result, targets=None):
    """Start the proxies for one mode and check them; fills result['targets']."""
    live = {}
    for name in (bench.a.targets if targets is None else targets):
        t = result["targets"].setdefault(name, {})
        if name == "direct":
            t["status"], live[name] = "ok", None
            continue
        try:
            proc, port = start_fn(name)
        except SkipTarget as e:
            t["status"], t["reason"] = "skipped", str(e)
            print(f"  {name}: skipped, {e}", flush=True)
            continue
        except procs.StartError as e:
            t["status"], t["reason"] = "failed to start", str(e)[:1500]
            print(f"  {name}: failed to start: {str(e)[:300]}", flush=True)
            continue
        err = check_fn(name, port)
        if err:
            t["status"], t["reason"] = "failed check", err[:1500]
            print(f"  {name}: skipped, {err[:300]}", flush=True)
            bench.stop(proc)
            continue
        t["status"] = "ok"
        t["pid"] = proc.pid
        live[name] = (proc, port)
    return live


def measure_loop(bench, live, result, run_one, label):
    """Warm up each target, then repeat R times alternating targets (rotated order)."""
    names = [n for n in result["targets"] if n in live]
    if bench.a.warmup:
        for n in names:
            try:
                run_one(n, bench.a.warmup, warm=True)
            except loadgen.LoadError as e:
                print(f"  {label} {n}: warm-up failed: {e}", flush=True)
    for rep in range(bench.a.repeat):
        order = names[rep % len(names):] + names[:rep % len(names)] if names else []
        for n in order:
            t = result["targets"][n]
            if t.get("status") != "ok":
                continue
            proc = live[n][0] if live[n] else None
            if proc is not None and not proc.alive():
                t["status"], t["reason"] = "died", f"exited during the run: {proc.tail(600)}"
                print(f"  {label} {n}: died: {proc.tail(300)}", flush=True)
                continue
            cpu0 = proc.cpu_seconds() if proc else None
            try:
                r = run_one(n, bench.a.duration)
            except loadgen.LoadError as e:
                t.setdefault("errors", []).append(str(e)[:500])
                print(f"  {label} {n}: run failed: {str(e)[:300]}", flush=True)
                continue
            r["cpu_s"] = (proc.cpu_seconds() - cpu0) if proc else None
            t.setdefault("runs", []).append(r)
            cpu_txt = f", proxy CPU {r['cpu_s']:.2f}s" if r["cpu_s"] is not None else ""
            print(f"  {label} rep {rep + 1}/{bench.a.repeat} {n:<15} {r['rps']:9.0f} rps  "
                  f"p50 {r['p50_ms'] or 0:.2f} ms  p99 {r['p99_ms'] or 0:.2f} ms{cpu_txt}"
                  + (f"  ERRORS {r.get('errors')} non-2xx {r.get('non2xx')}"
                     if r.get("errors") or r.get("non2xx") else ""), flush=True)
    for n in names:
        t = result["targets"][n]
        if live[n] and live[n][0].alive():
            t["rss_mb"] = round(live[n][0].rss_bytes() / 2**20, 1)
        if t.get("status") == "ok" and not t.get("runs"):
            t["status"], t["reason"] = "error", "; ".join(t.get("errors", ["no runs"]))
        report.summarize(t)


def run_h1(bench, results):
    """The h1 and h1paced modes, each chain in turn (one set of proxies per chain; JSON keys
    ``h1:<chain>``, ``h1paced:<chain>``)."""
    a = bench.a
    chains = [c for c in a.chains if "h1" in a.modes]
    chains += [c for c in a.paced_chains if "h1paced" in a.modes and c not in chains]
    for chain in chains:
        run_h1_chain(bench, results, chain, want_h1="h1" in a.modes and chain in a.chains,
                     want_paced="h1paced" in a.modes and chain in a.paced_chains)


def run_h1_chain(bench, results, chain, want_h1, want_paced):
    a = bench.a
    be = bench.start_backend()
    req = ChainRequest(chain, be)
    print(f"  chain {chain}", flush=True)
    h1 = {"chain": chain, "targets": {}, "notes": chain_notes(chain) + [
        f"wrk -t{a.threads} -c{a.connections} -d{a.duration}s --latency, {a.repeat} run(s) "
        f"per target alternating, {a.warmup}s warm-up; backend nginx returns "
        f"{configs.BODY_SIZE} B", bench.pin_note]}
    paced = {"chain": chain, "targets": {}, "notes": chain_notes(chain)[:1] + [
        f"wrk -t1 -c{a.paced_connections} with a Lua delay() of {a.paced_delay_ms} ms per "
        f"connection (~{a.paced_connections * 1000 // max(1, a.paced_delay_ms)} rps offered), "
        f"-d{a.duration}s, {a.repeat} run(s)", bench.pin_note]}
    up = be["h1"] if chain == "router" else be["istio"]["h1"]
    mis = None if chain == "router" else be["istio"]["misroute_h1"]

    def start_fn(name):
        return bench.start_proxy(name, "h1", up, upstream_h2=False, chain=chain, misroute_port=mis)

    def check_fn(name, port):
        return check_h1(port, req, direct=False)

    # the h1 and paced modes share one set of proxies
    live = setup_targets(bench, "h1", start_fn, check_fn, h1, chain_targets(a, chain))
    try:
        err = check_h1(req.direct_port, req, direct=True)
        if err:
            raise RuntimeError(f"backend check failed: {err}")
        for n, t in h1["targets"].items():
            paced["targets"][n] = {k: v for k, v in t.items() if k in ("status", "reason", "pid")}
        urls = {n: f"http://127.0.0.1:{(req.direct_port if n == 'direct' else live[n][1])}"
                   f"{req.path}" for n in live}

        def hdrs(n):
            return req.direct_headers if n == "direct" else req.headers
        if want_h1:
            def run_one(n, duration, warm=False):
                return loadgen.wrk(urls[n], duration, a.threads, a.connections, bench.load_cpu,
                                   headers=hdrs(n))
            measure_loop(bench, live, h1, run_one, f"h1 {chain}")
            report.add_ratios(h1)
            results["modes"][f"h1:{chain}"] = h1
        if want_paced:
            script = loadgen.write_paced_script(bench.tmp, a.paced_delay_ms)

            def run_paced(n, duration, warm=False):
                return loadgen.wrk(urls[n], duration, 1, a.paced_connections, bench.load_cpu,
                                   headers=hdrs(n), script=script)
            measure_loop(bench, live, paced, run_paced, f"paced {chain}")
            report.add_ratios(paced)
            results["modes"][f"h1paced:{chain}"] = paced
    finally:
        for n, v in live.items():
            if v:
                bench.stop(v[0])


# -- HTTP/2 -------------------------------------------------------------------------------

def run_h2(bench, results):
    for chain in bench.a.chains:
        run_h2_chain(bench, results, chain)


def run_h2_chain(bench, results, chain):
    a = bench.a
    be = bench.start_backend()
    req = ChainRequest(chain, be, h2=True)
    print(f"  chain {chain}", flush=True)
    res = {"chain": chain, "targets": {}, "notes": chain_notes(chain) + [
        f"h2load -t1 -c{a.h2_clients} -m{a.h2_streams} -D {a.duration}, h2c prior knowledge "
        f"downstream, HTTP/2 (h2c) upstream to the nginx backend; nginx-as-proxy uses grpc_pass "
        f"for its HTTP/2 upstream; p50/p99 from h2load --log-file", bench.pin_note]}
    up = be["h2"] if chain == "router" else be["istio"]["h2"]
    mis = None if chain == "router" else be["istio"]["misroute_h2"]

    def start_fn(name):
        return bench.start_proxy(name, "h2", up, upstream_h2=True, nginx_mode="h2", chain=chain,
                                 misroute_port=mis)

    def check_fn(name, port):
        err = loadgen.h2load_check(f"http://127.0.0.1:{port}{req.path}", bench.load_cpu,
                                   headers=req.headers)
        if not err:  # a request for the wrong route must reach the backend's 421
            path, hd = req.wrong
            hd = tuple(f"{':authority' if k == 'Host' else k}: {v}" for k, v in hd.items())
            err = loadgen.h2load_check(f"http://127.0.0.1:{port}{path}", bench.load_cpu, n=5,
                                       headers=hd, want="4xx")
            err = err and f"misrouting check: {err}"
        if err and name.startswith("pyproxy"):
            return f"pyproxy cannot serve this HTTP/2 path yet: {err}"
        return err

    live = setup_targets(bench, "h2", start_fn, check_fn, res, chain_targets(a, chain))
    urls = {n: f"http://127.0.0.1:{(req.direct_port if n == 'direct' else live[n][1])}"
               f"{req.path}" for n in live}
    try:
        err = loadgen.h2load_check(urls["direct"], bench.load_cpu,
                                   headers=req.direct_headers) if "direct" in urls else None
        if err:
            raise RuntimeError(f"backend h2 check failed: {err}")

        def run_one(n, duration, warm=False):
            return loadgen.h2load(urls[n], duration, a.h2_clients, a.h2_streams, bench.load_cpu,
                                  bench.tmp, n,
                                  headers=req.direct_headers if n == "direct" else req.headers)
        measure_loop(bench, live, res, run_one, f"h2 {chain}")
        report.add_ratios(res)
        results["modes"][f"h2:{chain}"] = res
    finally:
        for n, v in live.items():
            if v:
                bench.stop(v[0])


# -- gRPC ---------------------------------------------------------------------------------

GRPC_SCRIPT = os.path.join(HERE, "bench", "grpc_bench.py")


def grpc_client(bench, port, duration, header=""):
    cmd = [sys.executable, GRPC_SCRIPT, "client", "--target", f"127.0.0.1:{port}",
           "--duration", str(duration), "--concurrency", str(bench.a.grpc_concurrency)]
    if header:
        cmd += ["--header", header]
    try:
        cp = procs.run_bounded(cmd, timeout=duration + 30, cpu=bench.load_cpu)
    except subprocess.TimeoutExpired as e:
        raise loadgen.LoadError("gRPC client timed out") from e
    try:
        out = json.loads(cp.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError) as e:
        raise loadgen.LoadError(f"gRPC client failed ({cp.returncode}): "
                                f"{(cp.stderr or cp.stdout).strip()[-400:]}") from e
    if "error" in out:
        raise loadgen.LoadError(out["error"])
    out["non2xx"] = 0
    return out


def run_grpc(bench, results):
    a = bench.a
    gport = procs.free_port()
    server = bench.start("grpc-server", [sys.executable, GRPC_SCRIPT, "server", "--port",
                                         str(gport), "--expect-header", configs.ROUTE_VALUE],
                         bench.load_cpu)
    res = {"targets": {}, "notes": [
        f"grpcio (python) unary client, {a.grpc_concurrency} concurrent calls on one channel, "
        f"grpc.aio server; route {configs.LATE_ROUTE} matches {configs.GRPC_SERVICE_PREFIX} and "
        f"adds the header the server requires; nginx uses grpc_pass. The python client/server "
        f"on one core are likely the ceiling: compare ratios, not absolute QPS", bench.pin_note]}
    live = {}
    try:
        procs.wait_tcp(gport, server)

        def start_fn(name):
            return bench.start_proxy(name, "grpc", gport, upstream_h2=True,
                                     late_prefix=configs.GRPC_SERVICE_PREFIX, nginx_mode="grpc")

        def check_fn(name, port):
            try:
                r = grpc_client(bench, port, 1)
            except loadgen.LoadError as e:
                r = {"ok": 0, "errors": 1, "error_kinds": str(e)}
            if r.get("ok", 0) > 0 and not r.get("errors"):
                return None
            msg = f"gRPC check: ok={r.get('ok')} errors={r.get('errors')} {r.get('error_kinds')}"
            return (f"pyproxy cannot proxy gRPC yet: {msg}" if name == "pyproxy" else msg)[:600]

        live = setup_targets(bench, "grpc", start_fn, check_fn, res)
        ports = {n: (gport if n == "direct" else live[n][1]) for n in live}

        def run_one(n, duration, warm=False):
            return grpc_client(bench, ports[n], duration,
                               header=configs.ROUTE_VALUE if n == "direct" else "")
        measure_loop(bench, live, res, run_one, "grpc")
        report.add_ratios(res)
        results["modes"]["grpc"] = res
    finally:
        for n, v in live.items():
            if v:
                bench.stop(v[0])
        bench.stop(server)


# -- xDS ----------------------------------------------------------------------------------

def _xds_server(bench, resources):
    from bench import ads
    choice = bench.a.xds_server
    if choice in ("auto", "control-plane") and ads.control_plane_available(bench.a.pyproxy_root):
        d = os.path.join(bench.tmp, "cp-empty")
        os.makedirs(d, exist_ok=True)
        return ads.ControlPlaneXds(resources, d)
    if choice == "control-plane":
        raise RuntimeError(f"pyproxy.control_plane not importable from {bench.a.pyproxy_root}")
    return ads.BuiltinXds(resources)


def xds_one(bench, name, api, resources, t):
    """Push the resources to one proxy over one ADS flavour; fills the target dict `t`."""
    from bench import ads
    a = bench.a
    srv = _xds_server(bench, resources)
    t["server"] = srv.name
    if api not in srv.apis:
        t["status"] = "skipped"
        t["reason"] = f"{api} ADS needs pyproxy.control_plane (the builtin server is SotW only)"
        print(f"  xds {api} {name}: {t['reason']}", flush=True)
        srv.stop()
        return
    proc = None
    try:
        port = srv.start(procs.free_port())
        node = f"bench-xds-{name}-{api}"
        boot = ads.bootstrap_api(ads.bootstrap(port, procs.free_port(), node_id=node), api)
        path = configs.write_yaml(os.path.join(bench.tmp, f"xds-{api}-{name}.yaml"), boot)
        if name == "envoy":
            bench.base_id += 1
            cmd = ["envoy", "-c", path, "--concurrency", "1", "--base-id", str(bench.base_id),
                   "--disable-hot-restart", "-l", "error"]
            proc = bench.start(f"envoy-xds-{api}", cmd, bench.proxy_cpu)
        else:
            cmd = shlex.split(a.pyproxy_cmd) + ["-c", path, "--concurrency", "1",
                                                "--disable-hot-restart", "-l", "error"]
            proc = bench.start(f"pyproxy-xds-{api}", cmd, bench.proxy_cpu, cwd=a.pyproxy_root)
        started = time.time() - (time.monotonic() - proc.started_at)
        need = (ads.CDS, ads.EDS, ads.RDS)
        deadline = time.monotonic() + a.xds_timeout
        prog = None
        while time.monotonic() < deadline and proc.alive():
            prog = srv.poll(node)
            if prog and all(prog["types"].get(k, {}).get("ack") for k in need):
                break
            time.sleep(0.05)
        if prog:
            ref = prog["opened"]
            t["types"] = {ads.SHORT.get(k, k): {
                "first_request_s": round(v["first_request"] - ref, 4),
                "ack_s": None if v["ack"] is None else round(v["ack"] - ref, 4),
                "nacks": v["nacks"][:5], "names_requested": v["names"],
                "responses": v["responses"]} for k, v in prog["types"].items()}
            t["process_start_to_stream_s"] = round(ref - started, 4)
        if not proc.alive():
            t["status"] = "failed to start" if prog is None else "died"
            t["reason"] = f"exited with {proc.popen.returncode}: {proc.tail(800)}"
            print(f"  xds {api} {name}: {t['status']}: {proc.tail(300)}", flush=True)
            return
        if prog is None:
            t["status"], t["reason"] = "error", f"no ADS stream within {a.xds_timeout:.0f}s"
            print(f"  xds {api} {name}: no ADS stream", flush=True)
            return
        if not all(prog["types"].get(k, {}).get("ack") for k in need):
            t["status"] = "error"
            t["reason"] = (f"not all of CDS/EDS/RDS ACKed within {a.xds_timeout:.0f}s: "
                           + json.dumps(t["types"])[:800])
            print(f"  xds {api} {name}: {t['reason'][:300]}", flush=True)
            return
        last = max(prog["types"][k]["ack"] for k in need)
        t["all_acked_s"] = round(last - ref, 4)
        t["process_start_to_all_s"] = round(last - started, 4)
        time.sleep(1.0)
        t["rss_mb"] = round(proc.rss_bytes() / 2**20, 1)
        t["status"] = "ok"
        nacks = sum(len(v["nacks"]) for v in prog["types"].values())
        if nacks:
            t.setdefault("warnings", []).append(f"{nacks} NACK(s) before the ACKs")
        print(f"  xds {api} {name}: all ACKed {t['all_acked_s']:.3f}s after stream start, "
              f"RSS {t['rss_mb']} MB", flush=True)
    finally:
        bench.stop(proc)
        srv.stop()


def run_xds(bench, results):
    """Each size of --xds-count, each ADS flavour; JSON keys ``xds``/``xds_delta`` for a single
    size, ``xds@N``/``xds_delta@N`` when several are run."""
    from bench import ads  # grpc + xds-protos only when needed
    a = bench.a
    for n in a.xds_counts:
        t0 = time.monotonic()
        resources = ads.build_resources(n, endpoint_port=procs.free_port())
        build_s = time.monotonic() - t0
        for api in a.xds_apis:
            res = {"targets": {}, "api": api, "count": n, "notes": [
                f"{api} ADS: {n} EDS clusters, {n} ClusterLoadAssignments and "
                f"one RouteConfiguration with {n} virtual hosts (RDS of a static "
                f"listener); times from the stream's first request to the ACK the server receives; "
                f"RSS of the proxy 1 s after all three ACKs", f"resources built in {build_s:.2f}s",
                bench.pin_note]}
            key = "xds" if api == "sotw" else f"xds_{api}"
            if len(a.xds_counts) > 1:
                key += f"@{n}"
            for name in [x for x in ("envoy", "pyproxy") if x in a.targets]:
                # --repeat runs; the one with the median all-ACKed time is reported, with every
                # run's time next to it (the machine is shared: one run says little)
                runs = []
                for _ in range(a.repeat):
                    t = {}
                    xds_one(bench, name, api, resources, t)
                    runs.append(t)
                    if t.get("status") != "ok":
                        break
                ok = sorted((t for t in runs if t.get("status") == "ok"), key=lambda t: t["all_acked_s"])
                best = ok[len(ok) // 2] if len(ok) == len(runs) else runs[-1]
                if len(runs) > 1:
                    best["runs_all_acked_s"] = [t.get("all_acked_s") for t in runs]
                    best["runs_rss_mb"] = [t.get("rss_mb") for t in runs]
                res["targets"][name] = best
            servers = {t.get("server") for t in res["targets"].values() if t.get("server")}
            res["notes"].insert(1, "server: " + ", ".join(sorted(servers)))
            e, p = res["targets"].get("envoy", {}), res["targets"].get("pyproxy", {})
            if e.get("status") == "ok" and p.get("status") == "ok":
                res["ratios"] = {
                    "all_acked_s_vs_envoy": round(p["all_acked_s"] / e["all_acked_s"], 3),
                    "rss_mb_vs_envoy": round(p["rss_mb"] / e["rss_mb"], 3)}
            results["modes"][key] = res
        del resources


# -- opcodes ------------------------------------------------------------------------------

OPCODES_RE = re.compile(r"opcodes per proxied (?:HTTP/2 )?request: (\d+), python calls: (\d+)")


def run_opcodes(bench, results):
    """Python opcodes and calls per request (benchmarks/micro_h1.py and micro_h2.py --opcodes) for
    each chain's pyproxy config: a deterministic figure the machine's noise cannot move."""
    a = bench.a
    chains = list(dict.fromkeys(a.chains + a.paced_chains))
    if "istio-telemetry" in chains:
        chains.insert(chains.index("istio-telemetry") + 1, "istio-nostats")
    res = {"configs": {}, "notes": [
        "benchmarks/micro_h1.py / micro_h2.py --chain C --opcodes: the bootstrap run.py gives "
        "pyproxy for chain C, driven with in-memory transports; HTTP/2: 10 requests per read "
        "(h2load -m10); istio-nostats = istio-telemetry without istio.stats"]}
    for chain in chains:
        row = res["configs"].setdefault(chain, {})
        for proto, script in (("h1", "micro_h1.py"), ("h2", "micro_h2.py")):
            cmd = [sys.executable, os.path.join(HERE, script), "--chain", chain, "--opcodes", "0"]
            try:
                cp = procs.run_bounded(cmd, timeout=180, cpu=bench.load_cpu)
            except subprocess.TimeoutExpired:
                row[proto] = {"error": "timed out"}
                continue
            m = OPCODES_RE.search(cp.stdout)
            if cp.returncode != 0 or not m:
                row[proto] = {"error": (cp.stderr or cp.stdout).strip()[-400:]}
                print(f"  opcodes {chain} {proto}: failed: {row[proto]['error'][-200:]}", flush=True)
                continue
            row[proto] = {"opcodes": int(m.group(1)), "calls": int(m.group(2))}
            print(f"  opcodes {chain:<16} {proto}: {m.group(1)} opcodes, {m.group(2)} calls per "
                  f"request", flush=True)
    results["modes"]["opcodes"] = res


# -- main ---------------------------------------------------------------------------------

def run_mtls(bench, results):
    """Istio mTLS inbound chain: keep-alive rps and new handshakes/s (benchmarks/mtls.py)."""
    import mtls
    a = bench.a
    ns = argparse.Namespace(duration=a.duration, repeat=a.repeat, connections=a.connections,
                            handshake_procs=4, no_envoy="envoy" not in a.targets)
    results["modes"]["mtls"] = mtls.run(ns)


def check_tools(a):
    need = {"opcodes": [], "h1": ["wrk", "nginx"], "h1paced": ["wrk", "nginx"], "h2": ["h2load", "nginx"],
            "grpc": [], "xds": [], "mtls": ["wrk", "nginx", "openssl", "envoy"]}
    if "envoy" in a.targets:
        for m in a.modes:
            need[m] = need[m] + ["envoy"]
    missing = sorted({tool for m in a.modes for tool in need[m] if not shutil.which(tool)})
    return missing


def _terminate(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None):
    a = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)  # so the finally blocks stop what we started
    missing = check_tools(a)
    if missing:
        print(f"error: missing tools on PATH: {', '.join(missing)}", file=sys.stderr)
        return 2
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    bench = Bench(a)
    results = {"meta": {
        "timestamp": stamp, "argv": sys.argv[1:] if argv is None else list(argv),
        "host": platform.node(), "python": platform.python_version(),
        "cpus": sorted(os.sched_getaffinity(0)), "pinning": bench.pin_note, "pin_short": bench.pin_short,
        "loadavg_start": os.getloadavg(),
        "versions": {"envoy": _version(["envoy", "--version"]), "nginx": _version(["nginx", "-v"]),
                     "wrk": _version(["wrk", "-v"]), "h2load": _version(["h2load", "--version"])},
        "pyproxy_root": a.pyproxy_root,
        "pyproxy_commit": _version(["git", "-C", a.pyproxy_root, "rev-parse", "HEAD"]),
        "duration_s": a.duration, "repeat": a.repeat, "warmup_s": a.warmup,
    }, "modes": {}}
    print(f"pyproxy benchmark {stamp}: modes {','.join(a.modes)}; targets "
          f"{','.join(a.targets)}\n  {bench.pin_note}\n  machine is shared: loadavg "
          f"{results['meta']['loadavg_start']}", flush=True)
    runners = [("opcodes", run_opcodes), ("h1", run_h1), ("h2", run_h2), ("grpc", run_grpc),
               ("xds", run_xds), ("mtls", run_mtls)]
    failed = False
    try:
        for key, fn in runners:
            if key not in a.modes and not (key == "h1" and "h1paced" in a.modes):
                continue
            print(f"\n-- {key}{'+paced' if key == 'h1' and 'h1paced' in a.modes else ''}",
                  flush=True)
            try:
                fn(bench, results)
            except (RuntimeError, procs.StartError, loadgen.LoadError, OSError) as e:
                failed = True
                results["modes"].setdefault(key, {"targets": {}})["error"] = str(e)[:1500]
                print(f"  {key}: ERROR {str(e)[:500]}", flush=True)
    except KeyboardInterrupt:
        print("interrupted; cleaning up", file=sys.stderr)
        failed = True
    finally:
        bench.cleanup()
    results["meta"]["loadavg_end"] = os.getloadavg()

    titles = {"h1": "HTTP/1.1 closed loop", "h1paced": "HTTP/1.1 paced", "h2": "HTTP/2 h2load",
              "grpc": "gRPC unary"}
    for key, mode in results["modes"].items():
        kind = key.split(":")[0]
        if kind in titles and "targets" in mode:
            title = titles[kind] + (f", chain {mode['chain']}" if mode.get("chain") else "")
            report.print_throughput(title, mode, paced=(kind == "h1paced"))
    for key, mode in results["modes"].items():
        if key.startswith("xds") and "targets" in mode:
            report.print_xds(mode)
    xds_sizes = [m for k, m in results["modes"].items() if k.startswith("xds") and "count" in m]
    if len({m["count"] for m in xds_sizes}) > 1:
        report.print_xds_growth(xds_sizes)
    if "opcodes" in results["modes"]:
        report.print_opcodes(results["modes"]["opcodes"])
    report.print_summary(results)

    os.makedirs(a.out, exist_ok=True)
    jpath = os.path.join(a.out, f"{stamp}.json")
    with open(jpath, "w") as f:
        json.dump(results, f, indent=2, default=str)
    print(f"\nresults: {jpath}")
    if not a.no_plot:
        png = report.plot(results, os.path.join(a.out, f"{stamp}.png"))
        if png:
            print(f"plot:    {png}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
