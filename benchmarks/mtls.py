#!/usr/bin/env python3
"""Istio mTLS on the inbound sidecar chain, pyproxy against Envoy.

    flock /tmp/pyproxy-bench.lock python3 benchmarks/mtls.py [--duration 5] [--repeat 3]
    python3 benchmarks/run.py --only mtls           # the same, from the harness

Each target (pyproxy, Envoy; one process each, ``--concurrency 1``, pinned to one core) is an
inbound sidecar as istiod renders it: ``tls_inspector``, a STRICT chain with the Istio
``DownstreamTlsContext`` (client certificate required, SPIFFE trust-domain SAN check, Istio's
cipher list), certificate and trust bundle from SDS (a pilot-agent-shaped server on the relative
``sds-grpc`` socket), the benchmark's 20-route table, to an nginx backend. Two figures:

- **keep-alive rps**: ``wrk -c50`` (plaintext) -> an Envoy client sidecar (upstream Istio mTLS,
  ALPN ``istio-http/1.1``, keep-alive pool) -> the target -> nginx. Measured over the middle
  seconds of each wrk run (requests counted by the client sidecar): when wrk stops, the client
  sidecar closes its connections with requests in flight and opens them again (new handshakes) at
  the next run's start; those are outside the window (the whole run's CPU per request, with them,
  is printed as well). The client Envoy, wrk and nginx
  share the other core; the target's CPU per 1000 requests is reported too, and the client
  sidecar's and nginx's (how the target changes its neighbours' work: a proxy that sends each
  upstream request as soon as it is ready wakes nginx once per request, one that sends a loop
  iteration's requests together wakes it once per burst, and rps follows the load core).
- **new TLS handshakes per second**: ``openssl s_time -new`` (TLS 1.3, a mesh client certificate)
  from several processes at once, full mTLS handshakes against the target, summed; and the
  target's CPU per handshake. The s_time processes share the load core, so on a busy machine the
  rate is often bound by them: CPU per handshake is the figure that says what a core can do.

Runs alternate between targets; medians and the pyproxy / Envoy ratios are printed.
``--what rps|handshakes`` measures only one of the two; ``--profile FILE`` runs pyproxy under
cProfile (CPU time, not wall time) and writes its stats to FILE when it exits (FILE.pyproxy-plain
for the plaintext twin). ``--plaintext``
adds each target's plaintext twin to the run (TLS off on the hop to it; the same client sidecar,
chain and request; keep-alive only), alternating with the others: the difference is what TLS costs
each proxy per request. ``--perf DIR``
(Linux ``perf``, root or perf_event_paranoid <= 1) counts each target's system calls per request
during the keep-alive runs (tracepoints: no slowdown) and, in the first run, samples where its CPU
goes (``perf record``; DIR/<target>.data, read with ``perf report -i``): the kernel, OpenSSL, the
interpreter.
"""

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from bench import configs, loadgen, procs  # noqa: E402

T = "type.googleapis.com/"


def _inbound(port, upstream, plaintext=False):
    from sds_util import istio_downstream_tls, sds_grpc_cluster
    boot = configs.envoy_bootstrap(port, upstream)
    boot["node"] = {"id": "sidecar~127.0.0.1~server.default~default.svc.cluster.local", "cluster": "server.default"}
    if plaintext:  # (--plaintext: the same sidecar without TLS, for the TLS layer's share)
        return boot
    lst = boot["static_resources"]["listeners"][0]
    lst["listener_filters"] = [{"name": "envoy.filters.listener.tls_inspector", "typed_config": {
        "@type": T + "envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"}}]
    chain = lst["filter_chains"][0]
    chain["filter_chain_match"] = {"transport_protocol": "tls"}
    chain["transport_socket"] = istio_downstream_tls()
    boot["static_resources"]["clusters"].append(sds_grpc_cluster())
    return boot


def _client(port, target_port, admin_port=None, plaintext=False):
    from sds_util import istio_upstream_tls, sds_grpc_cluster, spiffe
    boot = configs.envoy_bootstrap(port, target_port)
    if admin_port:
        boot["admin"] = {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}}
    if plaintext:
        return boot
    boot["node"] = {"id": "sidecar~127.0.0.1~client.default~default.svc.cluster.local", "cluster": "client.default"}
    cl = boot["static_resources"]["clusters"][0]
    cl["transport_socket"] = istio_upstream_tls([spiffe("default", "server")],
                                                "outbound_.80_._.server.default.svc.cluster.local",
                                                alpn=("istio-http/1.1", "istio", "http/1.1"))
    boot["static_resources"]["clusters"].append(sds_grpc_cluster())
    return boot


# pyproxy under cProfile counting CPU time (not wall time: the machine is shared), stats written at exit
_PROFILED = """
import cProfile, runpy, sys, time
out = sys.argv[1]
sys.argv = ["pyproxy"] + sys.argv[2:]
pr = cProfile.Profile(time.process_time)
pr.enable()
try:
    runpy.run_module("pyproxy", run_name="__main__", alter_sys=True)
finally:
    pr.disable()
    pr.dump_stats(out)
"""


def s_time(port, cert, key, ca, seconds, procs_n, cpu):
    """Full mTLS handshakes per second from ``procs_n`` concurrent ``openssl s_time -new``."""
    cmd = ["openssl", "s_time", "-connect", "127.0.0.1:%d" % port, "-new", "-tls1_3", "-time", str(seconds),
           "-cert", cert, "-key", key, "-CAfile", ca]
    ps = [subprocess.Popen(procs.pinned(cmd, cpu), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
          for _ in range(procs_n)]
    total = 0.0
    count = 0
    for p in ps:
        try:
            out, _ = p.communicate(timeout=seconds + 30)
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
        m = re.search(r"(\d+) connections in (\d+) real seconds", out)
        if m and int(m.group(2)):
            total += int(m.group(1)) / int(m.group(2))
            count += int(m.group(1))
    return total, count


SYSCALLS = ("read", "readv", "recvfrom", "recvmsg", "write", "writev", "sendto", "sendmsg", "epoll_wait",
            "epoll_pwait", "epoll_ctl", "futex", "clock_gettime")


def perf_start(pids, out_dir, name, record):
    """``perf stat`` on the target's system calls (and ``perf record`` when ``record``) until
    perf_stop; None without perf."""
    if not shutil.which("perf"):
        return None
    pid_list = ",".join(str(p) for p in pids)
    ev = ["raw_syscalls:sys_enter"] + ["syscalls:sys_enter_" + n for n in SYSCALLS]
    path = os.path.join(out_dir, "%s.stat" % name)
    stat = subprocess.Popen(["perf", "stat", "-x", ",", "-o", path, "-p", pid_list] +
                            [x for e in ev for x in ("-e", e)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ps = [(stat, path)]
    if record:
        data = os.path.join(out_dir, "%s.data" % name)
        ps.append((subprocess.Popen(["perf", "record", "-q", "-F", "2000", "-g", "-o", data, "-p", pid_list],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), data))
    return ps


def perf_stop(ps, requests):
    """Stop perf; the system calls per request it counted ({name: count / request})."""
    if not ps:
        return {}
    for p, _ in ps:
        p.send_signal(signal.SIGINT)
    for p, _ in ps:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    counts = {}
    try:
        with open(ps[0][1]) as f:
            for line in f:
                parts = line.strip().split(",")
                if len(parts) > 2 and parts[0].replace(".", "").isdigit():
                    counts[parts[2].split(":")[-1].replace("sys_enter_", "")] = float(parts[0])
    except OSError:
        return {}
    return {k: v / requests for k, v in counts.items() if v and requests}


def negotiated(admin_port):
    """The TLS versions, cipher suites, groups and ALPN the client sidecar's cluster negotiated."""
    import urllib.request
    try:
        with urllib.request.urlopen("http://127.0.0.1:%d/stats?filter=cluster.backend.ssl" % admin_port,
                                    timeout=5) as r:
            text = r.read().decode()
    except OSError as e:
        return "(admin: %s)" % e
    out = []
    for line in text.splitlines():
        name, _, v = line.partition(": ")
        for part in (".ssl.versions.", ".ssl.ciphers.", ".ssl.curves.", ".ssl.sigalgs."):
            if part in name and v.strip() not in ("0", ""):
                out.append("%s=%s" % (name.split(part)[1], v.strip()))
    return " ".join(out) or "(no ssl stats)"


def client_cx(admin_port):
    """The client sidecar's connections to the target so far: {stat: value} (total, closed by either side)."""
    import urllib.request
    want = ("upstream_cx_total", "upstream_cx_destroy_remote", "upstream_cx_destroy_local", "upstream_cx_connect_fail",
            "upstream_rq_total")
    try:
        with urllib.request.urlopen("http://127.0.0.1:%d/stats?filter=cluster.backend.upstream_(cx|rq)_" % admin_port,
                                    timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        name, _, v = line.partition(": ")
        short = name.rsplit(".", 1)[-1]
        if short in want:
            try:
                out[short] = int(v)
            except ValueError:
                pass
    return out


def keepalive_run(a, url, load_cpu, p, client_proc, be, aport, perf_dir, name, record):
    """One keep-alive run: wrk for ``a.duration`` + 2 s; the figures are taken over the middle
    ``a.duration`` seconds (requests counted by the client sidecar's ``upstream_rq_total``), so the
    client sidecar's new connections to the target at the start (it closes its in-flight ones when
    wrk stops, and opens them again at the next run: mTLS handshakes) and the teardown at the end
    are outside it. The whole run's CPU per request is returned too (``cpu_whole_us``)."""
    import threading
    import time
    box = {}

    def load():
        try:
            box["res"] = loadgen.wrk(url, a.duration + 2, 1, a.connections, load_cpu)
        except Exception as e:  # (re-raised below, in the caller's thread)
            box["err"] = e
    w0 = p.cpu_seconds()
    cx_a = client_cx(aport)
    th = threading.Thread(target=load, daemon=True)
    th.start()
    time.sleep(1.0)
    pf = perf_start(procs.tree_pids(p.pid), perf_dir, name, record) if perf_dir else None
    t0, c0, l0, b0, cx0 = time.monotonic(), p.cpu_seconds(), client_proc.cpu_seconds(), be.cpu_seconds(), client_cx(aport)
    time.sleep(a.duration)
    t1, c1, l1, b1, cx1 = time.monotonic(), p.cpu_seconds(), client_proc.cpu_seconds(), be.cpu_seconds(), client_cx(aport)
    n = cx1.get("upstream_rq_total", 0) - cx0.get("upstream_rq_total", 0)
    if pf:
        res_sc = perf_stop(pf, n)
    th.join(a.duration + 60)
    if "err" in box:
        raise box["err"]
    res = box["res"]
    w1 = p.cpu_seconds()
    cx_b = client_cx(aport)
    if pf:
        res["syscalls"] = res_sc
    res["cpu_whole_us"] = (w1 - w0) * 1e6 / res["requests"] if res["requests"] else float("nan")
    res["rps_run"] = res["rps"]
    res["new_cx_run"] = cx_b.get("upstream_cx_total", 0) - cx_a.get("upstream_cx_total", 0)
    res["new_cx_window"] = cx1.get("upstream_cx_total", 0) - cx0.get("upstream_cx_total", 0)
    if n <= 0:  # (the client sidecar's admin did not answer: the whole run's figures)
        print("  warning: no request count from the client sidecar's admin; whole-run figures", flush=True)
        res["requests_window"] = res["requests"]
        res["cpu_s"], res["client_s"], res["nginx_s"] = w1 - w0, float("nan"), float("nan")
        return res
    res["requests_window"] = n
    res["rps"] = n / (t1 - t0)
    res["cpu_s"], res["client_s"], res["nginx_s"] = c1 - c0, l1 - l0, b1 - b0
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--handshake-procs", type=int, default=4)
    ap.add_argument("--no-envoy", action="store_true")
    ap.add_argument("--profile", metavar="FILE", help="run pyproxy under cProfile, stats written to FILE at exit")
    ap.add_argument("--perf", metavar="DIR", help="count system calls per request (perf stat) and sample "
                    "CPU (perf record, first run) for each target, files in DIR")
    ap.add_argument("--plaintext", action="store_true",
                    help="also run each target without TLS on the hop to it (same topology, chain and request; "
                    "keep-alive only): what TLS adds per request, measured in the same run")
    ap.add_argument("--what", choices=("both", "rps", "handshakes"), default="both",
                    help="measure keep-alive rps, new handshakes, or both (default)")
    a = ap.parse_args(argv)
    return run(a)


def run(a):
    from sds_util import AgentSds, cert_secret, root_secret, spiffe
    from tls_certs import Pki
    if not shutil.which("envoy"):
        print("error: envoy not on PATH (the client sidecar is Envoy)", file=sys.stderr)
        return {"error": "envoy missing"}
    what = getattr(a, "what", "both")  # (run.py's namespace has neither of these two)
    profile = getattr(a, "profile", None)
    perf_dir = getattr(a, "perf", None)
    plaintext = getattr(a, "plaintext", False)
    if perf_dir:
        os.makedirs(perf_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="mtlsb", dir="/tmp")
    os.chmod(tmp, 0o755)
    proxy_cpu, load_cpu = procs.pinning()
    started, agents = [], []
    result = {}
    try:
        pki = Pki(os.path.join(tmp, "pki"))
        server_cert = pki.issue("server", uri=[spiffe("default", "server")])
        client_cert = pki.issue("client", uri=[spiffe("default", "client")])
        pods = {}
        for pod, cert in (("server", server_cert), ("client", client_cert)):
            d = os.path.join(tmp, pod)
            os.makedirs(d)
            ag = AgentSds(d, {"default": cert_secret("default", cert), "ROOTCA": root_secret("ROOTCA", pki.ca_pem)})
            ag.start()
            agents.append(ag)
            pods[pod] = d
        h1, h2 = procs.free_port(), procs.free_port()
        be = procs.Proc("backend", ["nginx", "-c", configs.nginx_backend_conf(tmp, h1, h2), "-p", tmp], tmp,
                        cpu=load_cpu)
        started.append(be)
        procs.wait_tcp(h1, be)
        kinds = ["pyproxy"] + ([] if a.no_envoy else ["envoy"])
        if plaintext:  # each target's plaintext twin, in the same run (keep-alive rps only)
            kinds += [k + "-plain" for k in kinds]
        targets = {}
        env = dict(os.environ, PYTHONPATH=ROOT)
        for i, k in enumerate(kinds):
            plain = k.endswith("-plain")
            port = procs.free_port()
            path = configs.write_yaml(os.path.join(tmp, "%s.yaml" % k), _inbound(port, h1, plain))
            if k.startswith("envoy"):
                cmd = ["envoy", "-c", path, "--concurrency", "1", "--base-id", str(5000 + os.getpid() % 1000 + i),
                       "--disable-hot-restart", "-l", "error"]
            else:
                cmd = [sys.executable] + (["-c", _PROFILED, profile if k == "pyproxy" else "%s.%s" % (profile, k)] if profile
                                          else ["-m", "pyproxy"]) + [
                    "-c", path, "--concurrency", "1", "-l", "error"]
            p = procs.Proc(k, cmd, tmp, cpu=proxy_cpu, cwd=pods["server"], env=env)
            started.append(p)
            procs.wait_tcp(port, p, timeout=20)
            cport, aport = procs.free_port(), procs.free_port()
            cpath = configs.write_yaml(os.path.join(tmp, "client-%s.yaml" % k), _client(cport, port, aport, plain))
            c = procs.Proc("client-" + k, ["envoy", "-c", cpath, "--concurrency", "1", "--base-id",
                                           str(6000 + os.getpid() % 1000 + i), "--disable-hot-restart", "-l", "error"],
                           tmp, cpu=load_cpu, cwd=pods["client"])
            started.append(c)
            procs.wait_tcp(cport, c, timeout=20)
            targets[k] = (p, port, cport, c, aport)
        rps = {k: [] for k in kinds}
        cpu_ms = {k: [] for k in kinds}
        load_ms = {k: [] for k in kinds}
        hs = {k: [] for k in kinds}
        hs_cpu = {k: [] for k in kinds}
        sysc = {k: [] for k in kinds}
        whole = {k: [] for k in kinds}
        for k in kinds:  # warm-up (and a check that mTLS works end to end)
            res = loadgen.wrk("http://127.0.0.1:%d%s" % (targets[k][2], configs.BENCH_PATH), 1, 1, a.connections,
                              load_cpu)
            if not res["requests"] or res.get("non2xx", 0):
                raise RuntimeError("%s: warm-up failed: %s\n%s" % (k, res, targets[k][0].tail()))
            # what the client sidecar negotiated with the target (the same client for both)
            print("  %-8s negotiated (client sidecar's upstream ssl stats): %s" % (k, negotiated(targets[k][4])),
                  flush=True)
        for r in range(a.repeat):
            for k in (kinds if r % 2 == 0 else list(reversed(kinds))):
                p, port, cport, client_proc, aport = targets[k]
                res = {"rps": 0.0, "requests": 0}
                n = 0
                if what != "handshakes":
                    res = keepalive_run(a, "http://127.0.0.1:%d%s" % (cport, configs.BENCH_PATH), load_cpu, p,
                                        client_proc, be, aport, perf_dir, "%s-%d" % (k, r + 1), r == 0)
                    n = res["requests_window"]
                    sc = res.get("syscalls")
                    if sc is not None:
                        sysc[k].append(sc)
                        print("  %-8s        system calls / request: %s" % (k, "  ".join(
                            "%s %.2f" % (name, v) for name, v in sorted(sc.items(), key=lambda x: -x[1]))), flush=True)
                    if n:  # the load core's other tenants, per request: does the target change their work?
                        load_ms[k].append((res["client_s"] * 1e6 / n, res["nginx_s"] * 1e6 / n))
                    whole[k].append(res["cpu_whole_us"])
                rps[k].append(res["rps"])
                cpu_ms[k].append(res["cpu_s"] * 1e6 / n if n else float("nan"))
                rate, count = 0.0, 0
                if what != "rps" and not k.endswith("-plain"):
                    c0 = p.cpu_seconds()
                    rate, count = s_time(port, client_cert.cert_path, client_cert.key_path, pki.ca_path,
                                         a.duration, a.handshake_procs, load_cpu)
                    c1 = p.cpu_seconds()
                hs[k].append(rate)
                hs_cpu[k].append((c1 - c0) * 1e6 / count if count else float("nan"))
                print("  %-8s run %d: %8.0f rps keep-alive mTLS  %5.1f ms CPU / 1000 req  errors %s  "
                      "%7.0f new mTLS handshakes/s  %6.0f us CPU / handshake" % (
                          k, r + 1, res["rps"], cpu_ms[k][-1], res.get("non2xx", 0) + res.get("errors", 0),
                          hs[k][-1], hs_cpu[k][-1]), flush=True)
                if load_ms[k]:
                    print("  %-8s        (load core, ms CPU / 1000 req: client sidecar %.1f, nginx %.1f; whole wrk run: "
                          "%.1f ms CPU / 1000 req, new connections to it %s, in the window %s)" % (
                              k, load_ms[k][-1][0], load_ms[k][-1][1], whole[k][-1], res["new_cx_run"],
                              res["new_cx_window"]), flush=True)
        med = {k: statistics.median(v) for k, v in rps.items()}
        cmed = {k: statistics.median(v) for k, v in cpu_ms.items()}
        hmed = {k: statistics.median(v) for k, v in hs.items()}
        hcmed = {k: statistics.median(v) for k, v in hs_cpu.items()}
        print("\nmedians (wrk -c%d through an Envoy client sidecar; s_time x%d; %d x %ds):" % (
            a.connections, a.handshake_procs, a.repeat, a.duration))
        for k in kinds:
            print("  %-8s %8.0f rps  %5.1f ms CPU / 1000 req  %7.0f handshakes/s  %6.0f us CPU / handshake" % (
                k, med[k], cmed[k], hmed[k], hcmed[k]))
        result = {"rps": med, "cpu_ms_per_1000": cmed, "handshakes_per_s": hmed, "cpu_us_per_handshake": hcmed}
        if plaintext:
            tls_us = {k: cmed[k] - cmed[k + "-plain"] for k in kinds if not k.endswith("-plain")}
            result["tls_us_per_request"] = tls_us
            print("TLS adds per request (median CPU / request, mTLS minus plaintext, same run): %s" % ", ".join(
                "%s %.1f us" % (k, v) for k, v in tls_us.items()))
        if "envoy" in med:
            nan = float("nan")
            result["ratios"] = {"rps": med["pyproxy"] / med["envoy"] if med["envoy"] else nan,
                                "cpu": cmed["pyproxy"] / cmed["envoy"] if cmed["envoy"] == cmed["envoy"] else nan,
                                "handshakes": hmed["pyproxy"] / hmed["envoy"] if hmed["envoy"] else nan,
                                "handshake_cpu": hcmed["pyproxy"] / hcmed["envoy"] if hcmed["envoy"] else nan}
            # per core: requests one core serves, 1 / CPU per request (the rps figure itself is
            # bounded by the load core, which runs the client sidecar, wrk and nginx)
            result["ratios"]["rps_per_core"] = 1 / result["ratios"]["cpu"] if result["ratios"]["cpu"] else nan
            if whole["pyproxy"] and whole["envoy"]:
                wm = {k: statistics.median(whole[k]) for k in ("pyproxy", "envoy")}
                result["ratios"]["cpu_whole_run"] = wm["pyproxy"] / wm["envoy"]
                print("  whole wrk runs (the client sidecar's reconnections and their handshakes included): "
                      "%.1f vs %.1f ms CPU / 1000 req, %.2fx" % (wm["pyproxy"], wm["envoy"], wm["pyproxy"] / wm["envoy"]))
            print("pyproxy / Envoy: %.2fx keep-alive rps (CPU per request %.2fx: %.2fx rps per core), "
                  "%.2fx new handshakes/s (CPU per handshake %.2fx)" % (
                      result["ratios"]["rps"], result["ratios"]["cpu"], result["ratios"]["rps_per_core"],
                      result["ratios"]["handshakes"], result["ratios"]["handshake_cpu"]))
    finally:
        for p in reversed(started):
            p.stop()
        for ag in agents:
            ag.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return result


if __name__ == "__main__":
    r = main()
    sys.exit(0 if r and "error" not in r else 1)
