"""``pyproxy example``: a 90/10 canary in one command, to see pyproxy route real traffic.

Starts, as child processes of this one:
  * two "reviews" backends, v1 and v2 (``pyproxy/examples/backend.py``, ephemeral ports),
  * pyproxy on the bundled Envoy v3 bootstrap ``pyproxy/examples/canary.yaml`` (listener on
    127.0.0.1:``--port``, admin on 127.0.0.1:``--admin-port``): ``/reviews`` is split 90/10 between
    the clusters ``reviews-v1`` and ``reviews-v2``, gets a request header added, ``/hello`` is a
    direct response, and every request is written to the access log on stdout.
Then (unless ``--serve-only``) it sends ``--requests`` requests itself, prints the split it observed,
the clusters' ``/stats`` lines and some curl commands, and keeps serving until Ctrl-C (or exits at
once with ``--exit``). Children are stopped by PID on every exit path; if this process is killed
outright, they get SIGTERM from the kernel (``PR_SET_PDEATHSIG``).

Exit status: 0 on success; 1 if a port is taken, a child fails to start or dies, or a request of
the demo fails.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import errno
import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from importlib import resources

import yaml

HOST = "127.0.0.1"
READY_TIMEOUT = 20.0
REQUEST_TIMEOUT = 5.0
STOP_TIMEOUT = 3.0
WEIGHTS = {"v1": 90, "v2": 10}
STATS_FILTER = r"^cluster\.reviews-v[12]\.(upstream_rq_total|upstream_rq_2xx|upstream_cx_total|upstream_cx_active)$"


class ExampleError(Exception):
    """A problem to report in one line, then exit 1."""


class _Stopped(Exception):
    """SIGTERM/SIGINT while running: clean up and exit."""


def _raise_stopped(signum, frame):
    raise _Stopped()


# -- children ------------------------------------------------------------------------------------

def _die_with_parent():  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class Children:
    """The processes this run started; ``stop()`` ends each by its PID (TERM, then KILL)."""

    def __init__(self):
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def spawn(self, name: str, argv: list, **kw) -> subprocess.Popen:
        p = subprocess.Popen(argv, start_new_session=True, preexec_fn=_die_with_parent,
                             stdin=subprocess.DEVNULL, **kw)
        self.procs.append((name, p))
        return p

    def dead(self):
        """``(name, returncode)`` of the first child that has exited, or None."""
        for name, p in self.procs:
            rc = p.poll()
            if rc is not None:
                return name, rc
        return None

    def stop(self) -> None:
        for _, p in self.procs:
            if p.poll() is None:
                try:
                    os.kill(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + STOP_TIMEOUT
        for _, p in self.procs:
            try:
                p.wait(max(0.05, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.kill(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(STOP_TIMEOUT)


class LineReader(threading.Thread):
    """Reads a child's output line by line: kept quietly (``live`` False) or printed with a prefix."""

    def __init__(self, stream, out, prefix: str = "", live: bool = False, keep: int = 5):
        super().__init__(daemon=True)
        self.stream = stream
        self.out = out
        self.prefix = prefix
        self.live = live
        self.count = 0
        self.last = collections.deque(maxlen=keep)
        self.lock = threading.Lock()

    def run(self):
        for raw in iter(self.stream.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\n")
            with self.lock:
                self.count += 1
                self.last.append(line)
                live = self.live
            if live:
                try:
                    self.out.write(self.prefix + line + "\n")
                    self.out.flush()
                except (OSError, ValueError):
                    pass

    def snapshot(self):
        with self.lock:
            return self.count, list(self.last)

    def go_live(self):
        with self.lock:
            self.live = True


# -- config ----------------------------------------------------------------------------------------

def bundled_config_text() -> str:
    return resources.files("pyproxy.examples").joinpath("canary.yaml").read_text()


def build_config(port: int, admin_port: int, backend_ports: dict) -> dict:
    """The bundled bootstrap with this run's ports (everything else exactly as shipped)."""
    cfg = yaml.safe_load(bundled_config_text())
    cfg["admin"]["address"]["socket_address"]["port_value"] = admin_port
    listeners = cfg["static_resources"]["listeners"]
    listeners[0]["address"]["socket_address"]["port_value"] = port
    seen = set()
    for c in cfg["static_resources"]["clusters"]:
        version = c["name"].rpartition("-")[2]
        if version in backend_ports:
            for le in c["load_assignment"]["endpoints"][0]["lb_endpoints"]:
                le["endpoint"]["address"]["socket_address"]["port_value"] = backend_ports[version]
            seen.add(version)
    if seen != set(backend_ports):  # pragma: no cover - the shipped file is tested
        raise ExampleError("canary.yaml lacks the clusters reviews-v1/reviews-v2")
    return cfg


def check_port_free(port: int, flag: str) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((HOST, port))
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise ExampleError("%s:%d is already in use (another pyproxy example, Envoy or istio-proxy?); "
                               "pick a free port with %s N" % (HOST, port, flag)) from None
        raise ExampleError("cannot use %s:%d (%s): %s" % (HOST, port, flag, e.strerror or e)) from None
    finally:
        s.close()


# -- talking to the proxy ---------------------------------------------------------------------------

def http_get(port: int, path: str, timeout: float = REQUEST_TIMEOUT):
    c = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        c.request("GET", path)
        r = c.getresponse()
        return r.status, r.read().decode("utf-8", "replace")
    finally:
        c.close()


def wait_ready(admin_port: int, children: Children) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    last = "no answer"
    while time.monotonic() < deadline:
        dead = children.dead()
        if dead:
            raise ExampleError("%s exited during startup with status %d (its messages are above)" % dead)
        try:
            status, body = http_get(admin_port, "/ready", timeout=1.0)
            if status == 200:
                return
            last = "%d %s" % (status, body.strip())
        except OSError as e:
            last = str(e)
        time.sleep(0.1)
    raise ExampleError("pyproxy did not become ready within %.0fs (admin /ready: %s)" % (READY_TIMEOUT, last))


def send_requests(port: int, n: int) -> tuple[collections.Counter, list]:
    """``n`` GET /reviews over keep-alive connections; counts by the backend version that answered."""
    counts: collections.Counter = collections.Counter()
    errors = []
    conn = None
    for _ in range(n):
        try:
            if conn is None:
                conn = http.client.HTTPConnection(HOST, port, timeout=REQUEST_TIMEOUT)
            conn.request("GET", "/reviews")
            r = conn.getresponse()
            body = r.read()
            if r.status != 200:
                errors.append("status %d: %s" % (r.status, body[:100].decode("utf-8", "replace").strip()))
            else:
                counts[r.getheader("x-reviews-version") or "unknown"] += 1
            if r.will_close:
                conn.close()
                conn = None
        except (OSError, http.client.HTTPException) as e:
            errors.append("%s: %s" % (type(e).__name__, e))
            if conn is not None:
                conn.close()
            conn = None
    if conn is not None:
        conn.close()
    return counts, errors


def cluster_stats(admin_port: int) -> list:
    try:
        status, body = http_get(admin_port, "/stats?filter=" + urllib.parse.quote(STATS_FILTER))
    except OSError as e:
        return ["(admin /stats failed: %s)" % e]
    if status != 200:
        return ["(admin /stats answered %d)" % status]
    return [line for line in body.splitlines() if line.strip()]


# -- output ------------------------------------------------------------------------------------------

def print_split(port: int, n: int, counts, errors) -> None:
    total = sum(counts.values())
    print("\nSent %d requests to http://%s:%d/reviews through pyproxy:" % (n, HOST, port))
    for v in sorted(set(WEIGHTS) | set(counts)):
        k = counts.get(v, 0)
        pct = 100.0 * k / total if total else 0.0
        want = ("  (configured weight %d%%)" % WEIGHTS[v]) if v in WEIGHTS else ""
        print("  reviews %-3s %5d  %5.1f%%  %-50s%s" % (v, k, pct, "#" * round(pct / 2), want))
    if errors:
        print("  failed: %d (first: %s)" % (len(errors), errors[0]))


def print_instructions(port: int, admin_port: int, config_path: str) -> None:
    base = "http://%s:%d" % (HOST, port)
    admin = "http://%s:%d" % (HOST, admin_port)
    print("""
Try it yourself:
  curl -s %(b)s/reviews                  # 90%% reviews v1, 10%% reviews v2
  for i in $(seq 50); do curl -s %(b)s/reviews; done | sort | uniq -c
  curl -s %(b)s/hello                    # a direct_response route, no backend
  curl -si %(b)s/nope                    # the catch-all 404 route
  curl -s '%(a)s/stats?filter=cluster.reviews'
  curl -s %(a)s/clusters
  curl -s %(a)s/config_dump              # the running config, as Envoy prints it
  curl -s %(a)s/help                     # all admin endpoints
The config: %(o)s
  (this run's copy, with its ports: %(c)s)""" % {
        "b": base, "a": admin, "c": config_path, "o": resources.files("pyproxy.examples").joinpath("canary.yaml")})


# -- main ---------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pyproxy example",
        description="Run a 90/10 canary for a 'reviews' service: two bundled backends (v1, v2) behind "
                    "pyproxy on pyproxy/examples/canary.yaml, send traffic, show the split, keep serving.")
    p.add_argument("--port", type=int, default=10000, help="listener port on 127.0.0.1 (default 10000)")
    p.add_argument("--admin-port", type=int, default=15000, help="admin port on 127.0.0.1 (default 15000)")
    p.add_argument("--requests", type=int, default=200, help="requests the demo sends (default 200)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--exit", action="store_true", help="exit after the demo instead of serving")
    g.add_argument("--serve-only", action="store_true", help="send no demo traffic, just serve")
    p.add_argument("-l", "--log-level", default="warning",
                   help="pyproxy's log level (default warning; info shows startup)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    for flag, v in (("--port", args.port), ("--admin-port", args.admin_port)):
        if not 1 <= v <= 65535:
            print("error: %s must be between 1 and 65535" % flag, file=sys.stderr)
            return 1
    if args.port == args.admin_port:
        print("error: --port and --admin-port must differ", file=sys.stderr)
        return 1
    if args.requests < 1 and not args.serve_only:
        print("error: --requests must be at least 1", file=sys.stderr)
        return 1
    old = {s: signal.signal(s, _raise_stopped) for s in (signal.SIGINT, signal.SIGTERM)}
    children = Children()
    tmpdir = tempfile.mkdtemp(prefix="pyproxy-example-")
    readers = []
    try:
        return _run(args, children, tmpdir, readers)
    except ExampleError as e:
        print("error: %s" % e, file=sys.stderr)
        return 1
    except BrokenPipeError:  # e.g. `pyproxy example | head`: stdout went away; stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 1
    except (_Stopped, KeyboardInterrupt):
        print("\nstopping: pyproxy and the backends", file=sys.stderr)
        return 0
    finally:
        # a second Ctrl-C must not interrupt the cleanup
        for s in old:
            signal.signal(s, signal.SIG_IGN)
        for r in readers:
            r.live = False  # pyproxy's own "caught SIGTERM" is not news here
        children.stop()
        for r in readers:
            r.join(1.0)
        shutil.rmtree(tmpdir, ignore_errors=True)
        for s, h in old.items():
            signal.signal(s, h)


def _run(args, children: Children, tmpdir: str, readers: list) -> int:
    check_port_free(args.port, "--port")
    check_port_free(args.admin_port, "--admin-port")

    # The backends: listening sockets made here (so their ports are known and nothing races),
    # handed to the children.
    backend_ports = {}
    for version in WEIGHTS:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.bind((HOST, 0))
            s.listen(128)
            backend_ports[version] = s.getsockname()[1]
            children.spawn("reviews " + version,
                           [sys.executable, "-m", "pyproxy.examples.backend", "--version", version,
                            "--fd", str(s.fileno())], pass_fds=(s.fileno(),))
        finally:
            s.close()

    cfg = build_config(args.port, args.admin_port, backend_ports)
    config_path = os.path.join(tmpdir, "canary.yaml")
    with open(config_path, "w") as f:
        f.write("# pyproxy/examples/canary.yaml with the ports of one `pyproxy example` run\n")
        yaml.safe_dump(cfg, f, sort_keys=False)

    px = children.spawn("pyproxy", [sys.executable, "-m", "pyproxy", "-c", config_path,
                                    "-l", args.log_level, "--file-flush-interval-msec", "100",
                                    "--drain-time-s", "1"],
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    access = LineReader(px.stdout, sys.stdout, prefix="[access] ", live=args.serve_only, keep=3)
    logs = LineReader(px.stderr, sys.stderr, prefix="[pyproxy] ", live=True)
    readers += [access, logs]
    access.start()
    logs.start()
    print("pyproxy example: %s; pyproxy (pid %d) on %s:%d, admin on %s:%d" % (
        ", ".join("%s (pid %d) on %s:%d" % (name, p.pid, HOST, backend_ports[name.rpartition(" ")[2]])
                  for name, p in children.procs if name.startswith("reviews")),
        px.pid, HOST, args.port, HOST, args.admin_port), flush=True)
    wait_ready(args.admin_port, children)

    rc = 0
    if not args.serve_only:
        t0 = time.monotonic()
        counts, errors = send_requests(args.port, args.requests)
        elapsed = time.monotonic() - t0
        print_split(args.port, args.requests, counts, errors)
        print("  (%.2fs, %.0f requests/s, one client connection)" % (elapsed, args.requests / max(elapsed, 1e-6)))
        print("\n/stats of the two clusters (%s:%d/stats?filter=cluster.reviews):" % (HOST, args.admin_port))
        for line in cluster_stats(args.admin_port):
            print("  " + line)
        # the access log is flushed every 100 ms; show the last lines of this burst
        deadline = time.monotonic() + 2.0
        while access.snapshot()[0] < args.requests and time.monotonic() < deadline:
            time.sleep(0.05)
        n, last = access.snapshot()
        print("\nAccess log (pyproxy's stdout), %d lines; the last %d:" % (n, len(last)))
        for line in last:
            print("  " + line)
        if errors:
            rc = 1
    print_instructions(args.port, args.admin_port, config_path)
    if args.exit:
        sys.stdout.flush()
        return rc
    print("\nServing until Ctrl-C; access log lines follow.", flush=True)
    access.go_live()
    while True:
        dead = children.dead()
        if dead:
            raise ExampleError("%s exited unexpectedly with status %d" % dead)
        time.sleep(0.5)
