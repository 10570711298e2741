"""Summaries, ratio tables, JSON and the PNG plot."""
import importlib
import statistics
import subprocess
import sys

ORDER = ("direct", "pyproxy", "pyproxy-nostats", "envoy", "nginx", "bare")
W = 16  # width of the target column


def median(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def summarize(target):
    """Fill target['median'] from target['runs'] (throughput modes)."""
    runs = target.get("runs") or []
    if not runs:
        return
    med = {k: median([r.get(k) for r in runs])
           for k in ("rps", "p50_ms", "p99_ms", "cpu_s", "requests", "duration_s")}
    per_k = [r["cpu_s"] * 1000.0 / r["requests"] for r in runs
             if r.get("cpu_s") is not None and r.get("requests")]
    med["cpu_s_per_1k_req"] = median(per_k)
    # CPU-seconds per 1000 requests == vCPU per 1000 requests/second; both names are kept.
    med["vcpu_per_1k_rps"] = med["cpu_s_per_1k_req"]
    util = [r["cpu_s"] / r["duration_s"] for r in runs
            if r.get("cpu_s") is not None and r.get("duration_s")]
    med["cpu_cores_used"] = median(util)
    target["median"] = med
    bad = [i for i, r in enumerate(runs) if r.get("errors") or r.get("non2xx")]
    if bad:
        target.setdefault("warnings", []).append(
            f"runs {bad} had socket errors or non-2xx responses: the figures are not valid")


def add_ratios(mode):
    targets = mode["targets"]

    def m(name, key):
        t = targets.get(name)
        if not t or t.get("status") != "ok" or "median" not in t:
            return None
        return t["median"].get(key)

    for name, t in targets.items():
        if t.get("status") != "ok" or "median" not in t:
            continue
        r = {}
        for ref in ("envoy", "direct"):
            for key in ("rps", "p99_ms", "cpu_s_per_1k_req"):
                a, b = m(name, key), m(ref, key)
                if a is not None and b:
                    r[f"{key}_vs_{ref}"] = round(a / b, 3)
        a, b = m(name, "p99_ms"), m("direct", "p99_ms")
        if a is not None and b is not None:
            r["added_p99_ms_vs_direct"] = round(a - b, 3)
        if name == "pyproxy":  # istio.stats on / off (the telemetry chain)
            for key in ("rps", "cpu_s_per_1k_req"):
                a, b = m(name, key), m("pyproxy-nostats", key)
                if a is not None and b:
                    r[f"{key}_vs_nostats"] = round(a / b, 3)
        t["ratios"] = r
    e, p = targets.get("envoy", {}), targets.get("pyproxy", {})
    for key in ("added_p99_ms_vs_direct",):
        a, b = p.get("ratios", {}).get(key), e.get("ratios", {}).get(key)
        if a is not None and b is not None and b > 0:
            p["ratios"]["added_p99_vs_envoy"] = round(a / b, 3)
    if p.get("rss_mb") and e.get("rss_mb") and p.get("status") == "ok":
        p.setdefault("ratios", {})["rss_mb_vs_envoy"] = round(p["rss_mb"] / e["rss_mb"], 3)


def _fmt(v, spec):
    if v is None:
        width = "".join(ch for ch in spec.split(".")[0] if ch.isdigit())
        return "-".rjust(int(width) if width else 1)
    return format(v, spec)


def print_throughput(title, mode, paced=False):
    print(f"\n== {title} ==")
    for line in mode.get("notes", []):
        print(f"   {line}")
    if paced:
        hdr = (f"{'target':<{W}}{'rps':>9}{'p50 ms':>9}{'p99 ms':>9}{'+p99 ms':>9}"
               f"{'vCPU/1k rps':>13}{'x envoy':>9}{'RSS MB':>9}")
    else:
        hdr = (f"{'target':<{W}}{'rps':>10}{'x envoy':>9}{'x direct':>9}{'p50 ms':>9}"
               f"{'p99 ms':>9}{'CPU ms/1k req':>15}{'x envoy':>9}{'RSS MB':>9}")
    print(hdr)
    for name in ORDER:
        t = mode["targets"].get(name)
        if t is None:
            continue
        if t.get("status") != "ok" or "median" not in t:
            print(f"{name:<{W}}{t.get('status', '?')}: {t.get('reason', '')[:200]}")
            continue
        md, r = t["median"], t.get("ratios", {})
        cpu = md.get("cpu_s_per_1k_req")
        rss = t.get("rss_mb")
        if paced:
            print(f"{name:<{W}}{_fmt(md['rps'], '9.0f')}{_fmt(md['p50_ms'], '9.2f')}"
                  f"{_fmt(md['p99_ms'], '9.2f')}{_fmt(r.get('added_p99_ms_vs_direct'), '+9.2f')}"
                  f"{_fmt(cpu, '13.3f')}{_fmt(r.get('cpu_s_per_1k_req_vs_envoy'), '9.2f')}"
                  f"{_fmt(rss, '9.1f')}")
        else:
            print(f"{name:<{W}}{_fmt(md['rps'], '10.0f')}{_fmt(r.get('rps_vs_envoy'), '9.2f')}"
                  f"{_fmt(r.get('rps_vs_direct'), '9.2f')}{_fmt(md['p50_ms'], '9.2f')}"
                  f"{_fmt(md['p99_ms'], '9.2f')}"
                  f"{_fmt(None if cpu is None else cpu * 1000, '15.1f')}"
                  f"{_fmt(r.get('cpu_s_per_1k_req_vs_envoy'), '9.2f')}{_fmt(rss, '9.1f')}")
        for w in t.get("warnings", []):
            print(f"{'':<{W}}WARNING: {w}")
    r = (mode["targets"].get("pyproxy") or {}).get("ratios", {})
    if "rps_vs_nostats" in r:
        print(f"   istio.stats on / off (pyproxy / pyproxy-nostats): rps {r['rps_vs_nostats']:.3f}x, "
              f"CPU per request {_fmt(r.get('cpu_s_per_1k_req_vs_nostats'), '.3f')}x")


def print_opcodes(mode):
    print("\n== Python opcodes and calls per request (micro_h1 / micro_h2 --opcodes) ==")
    for line in mode.get("notes", []):
        print(f"   {line}")
    print(f"{'config':<18}{'h1 opcodes':>12}{'h1 calls':>10}{'h2 opcodes':>12}{'h2 calls':>10}")
    for chain, row in mode.get("configs", {}).items():
        cells = []
        for proto in ("h1", "h2"):
            v = row.get(proto, {})
            cells += [_fmt(v.get("opcodes"), "12d"), _fmt(v.get("calls"), "10d")]
        print(f"{chain:<18}" + "".join(cells))


# the issues' targets (#10, #13): (mode key, label, [(ratio key in pyproxy's ratios, target, "<=" or ">=")])
TARGETS = (
    ("h1:istio", "h1 istio", [("rps_vs_envoy", 1.25, ">="), ("cpu_s_per_1k_req_vs_envoy", 0.8, "<=")]),
    ("h2:istio", "h2 istio", [("rps_vs_envoy", 1.0, ">=")]),
    ("h1:router", "h1 router (20 routes, req+resp hdr)", [("rps_vs_envoy", 1.5, ">=")]),
    ("h1:istio-telemetry", "h1 istio-telemetry", [("rps_vs_envoy", 1.1, ">="), ("rps_vs_nostats", 0.9, ">=")]),
    ("h2:router", "h2 router", []),
    ("h2:istio-telemetry", "h2 istio-telemetry", []),
    ("h1paced:istio", "paced ~1000 rps istio", [("cpu_s_per_1k_req_vs_envoy", 1.0, "<="),
                                               ("added_p99_vs_envoy", 1.0, "<="),
                                               ("rss_mb_vs_envoy", 1.0, "<=")]),
)


def print_summary(results):
    """One line per mode and chain: pyproxy / Envoy ratios, with the issues' targets."""
    modes = results["modes"]
    lines = []
    for key, label, targets in TARGETS:
        m = modes.get(key)
        p = (m or {}).get("targets", {}).get("pyproxy")
        if not p:
            continue
        r = p.get("ratios", {})
        if p.get("status") != "ok" or not r:
            lines.append(f"{label:<38}pyproxy {p.get('status')}: {p.get('reason', '')[:120]}")
            continue
        bad = " (figures NOT valid: see the warnings)" if p.get("warnings") else ""
        cells = [f"rps {_fmt(r.get('rps_vs_envoy'), '.2f')}x",
                 f"CPU/req {_fmt(r.get('cpu_s_per_1k_req_vs_envoy'), '.2f')}x"]
        if key.startswith("h1paced"):
            cells += [f"+p99 {_fmt(r.get('added_p99_ms_vs_direct'), '.2f')} ms vs envoy "
                      f"{_fmt((m['targets'].get('envoy') or {}).get('ratios', {}).get('added_p99_ms_vs_direct'), '.2f')} ms",
                      f"RSS {_fmt(r.get('rss_mb_vs_envoy'), '.2f')}x"]
        if "rps_vs_nostats" in r:
            cells.append(f"stats on/off rps {r['rps_vs_nostats']:.2f}x")
        verdict = []
        for rk, want, op in targets:
            v = r.get(rk)
            if v is None:
                verdict.append(f"{rk} ?")
                continue
            ok = v >= want if op == ">=" else v <= want
            verdict.append(f"{rk} {op} {want}: {'met' if ok else 'NOT met'}")
        lines.append(f"{label:<38}" + ", ".join(cells) + bad
                     + (f"\n{'':<38}target: " + "; ".join(verdict) if verdict else ""))
    for key in sorted(k for k in modes if k.startswith("xds")):
        m = modes[key]
        r = m.get("ratios")
        if not r:
            continue
        big = m.get("count") == 10000
        verdict = ""
        if big:
            verdict = (f"\n{'':<38}target: time <= 1: {'met' if r['all_acked_s_vs_envoy'] <= 1 else 'NOT met'}; "
                       f"RSS <= 2: {'met' if r['rss_mb_vs_envoy'] <= 2 else 'NOT met'}")
        lines.append(f"{'xds ' + m.get('api', '') + ' N=' + str(m.get('count', '')):<38}"
                     f"time {r['all_acked_s_vs_envoy']:.2f}x, RSS {r['rss_mb_vs_envoy']:.2f}x" + verdict)
    if "grpc" in modes:
        r = (modes["grpc"].get("targets", {}).get("pyproxy") or {}).get("ratios", {})
        if r:
            lines.append(f"{'grpc unary (router)':<38}rps {_fmt(r.get('rps_vs_envoy'), '.2f')}x, "
                         f"CPU/req {_fmt(r.get('cpu_s_per_1k_req_vs_envoy'), '.2f')}x")
    if not lines:
        return
    print("\n== Summary: pyproxy / Envoy, same run (medians) ==")
    for line in lines:
        print(line)


def print_xds_growth(modes):
    """One line per (flavour, size): all-ACKed seconds and RSS of each proxy, and the ratios."""
    print("\n== xDS apply growth (N clusters + N assignments + N virtual hosts) ==")
    print(f"{'api':<7}{'N':>7}{'pyproxy s':>11}{'envoy s':>9}{'ratio':>7}"
          f"{'pyproxy MB':>12}{'envoy MB':>10}{'ratio':>7}")
    for m in sorted(modes, key=lambda m: (m.get("api", ""), m["count"])):
        p, e = m["targets"].get("pyproxy", {}), m["targets"].get("envoy", {})
        r = m.get("ratios", {})
        print(f"{m.get('api', ''):<7}{m['count']:>7}{_fmt(p.get('all_acked_s'), '11.2f')}"
              f"{_fmt(e.get('all_acked_s'), '9.2f')}{_fmt(r.get('all_acked_s_vs_envoy'), '7.2f')}"
              f"{_fmt(p.get('rss_mb'), '12.1f')}{_fmt(e.get('rss_mb'), '10.1f')}"
              f"{_fmt(r.get('rss_mb_vs_envoy'), '7.2f')}")


def print_xds(mode):
    api = {"sotw": "SotW", "delta": "delta"}.get(mode.get("api", "sotw"), mode.get("api"))
    n = f", N = {mode['count']}" if "count" in mode else ""
    print(f"\n== xDS apply ({api} ADS{n}, time from stream start to ACK) ==")
    for line in mode.get("notes", []):
        print(f"   {line}")
    print(f"{'target':<9}{'CDS ack s':>11}{'EDS ack s':>11}{'RDS ack s':>11}{'all s':>9}"
          f"{'start->all s':>14}{'RSS MB':>9}")
    for name in ("pyproxy", "envoy"):
        t = mode["targets"].get(name)
        if t is None:
            continue
        if t.get("status") != "ok":
            print(f"{name:<9}{t.get('status')}: {t.get('reason', '')[:200]}")
            continue
        ty = t["types"]
        print(f"{name:<9}{_fmt(ty.get('cds', {}).get('ack_s'), '11.3f')}"
              f"{_fmt(ty.get('eds', {}).get('ack_s'), '11.3f')}"
              f"{_fmt(ty.get('rds', {}).get('ack_s'), '11.3f')}"
              f"{_fmt(t.get('all_acked_s'), '9.3f')}{_fmt(t.get('process_start_to_all_s'), '14.3f')}"
              f"{_fmt(t.get('rss_mb'), '9.1f')}")
        for w in t.get("warnings", []):
            print(f"{'':<9}WARNING: {w}")
    r = mode.get("ratios")
    if r:
        print("   pyproxy vs envoy: " + ", ".join(f"{k}={v}" for k, v in r.items()))


def _label(v):
    if v is None:
        return "n/a"
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"


def ensure_matplotlib():
    try:
        return importlib.import_module("matplotlib")
    except ImportError:
        pass
    print("matplotlib missing: pip install matplotlib ...", flush=True)
    try:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "matplotlib"],
                       timeout=600, check=True)
    except (subprocess.SubprocessError, OSError) as e:
        print(f"could not install matplotlib ({e}); no plot")
        return None
    importlib.invalidate_caches()
    try:
        return importlib.import_module("matplotlib")
    except ImportError:
        return None


def plot(results, path):
    mpl = ensure_matplotlib()
    if mpl is None:
        return None
    mpl.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    titles = {"h1": "HTTP/1.1", "h2": "HTTP/2 (h2load)", "grpc": "gRPC unary"}
    for key, mode in results["modes"].items():
        kind, _, chain = key.partition(":")
        if kind in titles and "targets" in mode:
            panels.append((key, titles[kind] + (f" {chain}" if chain else ""),
                           [("rps", "requests/s"), ("p99_ms", "p99 latency (ms)")]))
        elif kind == "h1paced" and "targets" in mode:
            panels.append((key, f"HTTP/1.1 paced ~1000 rps {chain}",
                           [("vcpu_per_1k_rps", "vCPU per 1000 rps"), ("p99_ms", "p99 latency (ms)")]))
    for key in [k for k in results["modes"] if k.startswith("xds")]:
        if "targets" in results["modes"][key]:
            panels.append((key, f"xDS apply ({results['modes'][key].get('api', 'sotw')}"
                                f"{', N=%s' % results['modes'][key]['count'] if '@' in key else ''})",
                           [("all_acked_s", "s to ACK all types"),
                            ("rss_mb", "RSS after apply (MB)")]))
    if not panels:
        return None
    colors = {"direct": "#888888", "pyproxy": "#3572A5", "pyproxy-nostats": "#7FA7D0", "envoy": "#AC1F2D",
              "nginx": "#009639", "bare": "#E8A33D"}
    fig, axes = plt.subplots(len(panels), 2, figsize=(10, 3.2 * len(panels)), squeeze=False)
    for row, (key, title, metrics) in enumerate(panels):
        mode = results["modes"][key]
        for col, (metric, label) in enumerate(metrics):
            ax = axes[row][col]
            names, vals = [], []
            for name in ORDER:
                t = mode["targets"].get(name)
                if not t:
                    continue
                if key.startswith("xds"):
                    v = t.get(metric) if t.get("status") == "ok" else None
                else:
                    v = (t.get("median") or {}).get(metric) if t.get("status") == "ok" else None
                names.append(name)
                vals.append(v)
            xs = range(len(names))
            ax.bar(xs, [v or 0 for v in vals], color=[colors.get(n, "#555") for n in names])
            for x, v in zip(xs, vals):
                ax.text(x, v or 0, _label(v), ha="center",
                        va="bottom", fontsize=8)
            ax.set_xticks(list(xs))
            ax.set_xticklabels(names)
            ax.set_title(f"{title}: {label}", fontsize=9)
    fig.suptitle(f"pyproxy benchmark {results['meta']['timestamp']} "
                 f"({results['meta'].get('pin_short', '')})", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / (3.2 * len(panels))))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
