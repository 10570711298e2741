"""Load generators: wrk (HTTP/1.1, closed loop and paced) and h2load (HTTP/2, h2c prior knowledge).

Each run returns a dict with rps, requests, duration_s, p50_ms, p99_ms, errors, non2xx.
"""
import os
import re
import subprocess

from . import procs

_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}

PACED_LUA = """-- paced: every connection waits {delay_ms} ms after each response
function delay()
  return {delay_ms}
end
"""


class LoadError(Exception):
    pass


def _ms(text):
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not m:
        raise LoadError(f"cannot parse latency {text!r}")
    return float(m.group(1)) * _UNITS_MS[m.group(2)]


def parse_wrk(out):
    """Parse `wrk --latency` output."""
    res = {}
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not m:
        raise LoadError("wrk printed no Requests/sec line:\n" + out[-800:])
    res["rps"] = float(m.group(1))
    m = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m),", out)
    if not m:
        raise LoadError("wrk printed no request count:\n" + out[-800:])
    res["requests"] = int(m.group(1))
    res["duration_s"] = _ms(m.group(2) + m.group(3)) / 1000.0
    for pct in ("50", "75", "90", "99"):
        m = re.search(rf"^\s+{pct}%\s+(\S+)", out, re.M)
        if m:
            res[f"p{pct}_ms"] = _ms(m.group(1))
    if "p50_ms" not in res or "p99_ms" not in res:
        raise LoadError("wrk printed no latency distribution (was --latency given?)")
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    res["errors"] = sum(int(x) for x in m.groups()) if m else 0
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    res["non2xx"] = int(m.group(1)) if m else 0
    return res


def wrk(url, duration, threads, connections, cpu, headers=(), script=None, timeout_extra=20):
    cmd = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--latency",
           "--timeout", "5s"]
    for h in headers:
        cmd += ["-H", h]
    if script:
        cmd += ["-s", script]
    cmd.append(url)
    try:
        cp = procs.run_bounded(cmd, timeout=duration + timeout_extra, cpu=cpu)
    except subprocess.TimeoutExpired as e:
        raise LoadError(f"wrk did not finish within {duration + timeout_extra}s") from e
    if cp.returncode != 0:
        raise LoadError(f"wrk exited {cp.returncode}: {cp.stderr.strip()[-400:]}")
    return parse_wrk(cp.stdout)


def write_paced_script(tmp, delay_ms):
    path = os.path.join(tmp, f"paced-{delay_ms}.lua")
    with open(path, "w") as f:
        f.write(PACED_LUA.format(delay_ms=int(delay_ms)))
    return path


def _percentile(sorted_vals, q):
    if not sorted_vals:
        return None
    k = min(len(sorted_vals) - 1, max(0, int(round(q / 100.0 * (len(sorted_vals) - 1)))))
    return sorted_vals[k]


def parse_h2load(out, log_path=None):
    res = {}
    m = re.search(r"finished in ([\d.]+)(us|ms|s|m), ([\d.]+) req/s", out)
    if not m:
        raise LoadError("h2load printed no 'finished in' line:\n" + out[-800:])
    res["duration_s"] = _ms(m.group(1) + m.group(2)) / 1000.0
    res["rps"] = float(m.group(3))
    m = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
                  r"(\d+) failed, (\d+) errored, (\d+) timeout", out)
    if not m:
        raise LoadError("h2load printed no requests line:\n" + out[-800:])
    total, started, done, ok, failed, errored, tmo = (int(x) for x in m.groups())
    res["requests"] = done
    res["succeeded"] = ok
    res["errors"] = failed + errored + tmo
    m = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    res["non2xx"] = sum(int(x) for x in m.groups()[1:]) if m else 0
    if log_path and os.path.exists(log_path):
        lat = []
        with open(log_path) as f:
            for line in f:
                parts = line.split("\t")
                if len(parts) >= 3:
                    try:
                        lat.append(int(parts[2]) / 1000.0)
                    except ValueError:
                        pass
        lat.sort()
        res["p50_ms"] = _percentile(lat, 50)
        res["p99_ms"] = _percentile(lat, 99)
    else:
        m = re.search(r"time for request:\s+(\S+)\s+(\S+)\s+(\S+)", out)
        res["p50_ms"] = _ms(m.group(3)) if m else None  # mean, when no log is available
        res["p99_ms"] = None
    return res


def h2load(url, duration, clients, streams, cpu, tmp, tag, headers=(), warmup=0.0):
    log_path = os.path.join(tmp, f"h2load-{tag}.log")
    cmd = ["h2load", "-t1", f"-c{clients}", f"-m{streams}", "-D", str(int(max(1, duration))),
           f"--log-file={log_path}"]
    if warmup > 0:
        cmd.append(f"--warm-up-time={warmup}")
    for h in headers:
        cmd += ["-H", h]
    cmd.append(url)
    try:
        cp = procs.run_bounded(cmd, timeout=duration + warmup + 20, cpu=cpu)
    except subprocess.TimeoutExpired as e:
        raise LoadError(f"h2load did not finish within {duration + warmup + 20}s") from e
    try:
        if cp.returncode != 0 and "finished in" not in cp.stdout:
            raise LoadError(f"h2load exited {cp.returncode}: "
                            f"{(cp.stderr or cp.stdout).strip()[-400:]}")
        return parse_h2load(cp.stdout, log_path)
    finally:
        try:
            os.unlink(log_path)
        except OSError:
            pass


def h2load_check(url, cpu, n=20, headers=(), want="2xx"):
    """A few h2c requests; returns an error string or None when all got ``want`` (2xx or 4xx)."""
    cmd = ["h2load", "-n", str(n), "-c1", "-m1"]
    for h in headers:
        cmd += ["-H", h]
    try:
        cp = procs.run_bounded(cmd + [url], timeout=15, cpu=cpu)
    except subprocess.TimeoutExpired:
        return "h2load check timed out"
    m = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx", cp.stdout)
    got = None if not m else int(m.group({"2xx": 1, "4xx": 3}[want]))
    if got != n:
        return (f"HTTP/2 check failed (want {n} {want}): "
                + (cp.stdout.strip().splitlines() or [cp.stderr])[-1][-300:])
    return None
