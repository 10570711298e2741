#!/usr/bin/env python3
"""A two-pod sidecar mesh made of network namespaces: docker-compose.yml's topology, for real,
without a container engine.

    sudo scripts/netns_mesh.py up [--workdir DIR]     # bring it up, print the pods, wait for ^C
    sudo scripts/netns_mesh.py up --detach            # bring it up and return (state in DIR)
    sudo scripts/netns_mesh.py down [--workdir DIR]   # tear down what state.json lists

Topology (addresses from 198.18.0.0/15, RFC 2544):
- pods ``a`` and ``b``: one network namespace each, joined by a veth pair (a /30);
- in each pod, as uid 1000: the app (``mesh_app.py http 8080``; pod b also ``echo 9999``);
  as uid 1337: pyproxy started with pilot-agent's command line and an Istio-shaped bootstrap
  (delta ADS over a unix socket), behind ``init/istio-iptables`` with the injected flags;
- one control plane (the agent's role: xDS on a unix socket), uid 1337, serving
  ``scripts/mesh_config.py``'s resources for the two services ``svc-a`` and ``svc-b``.

uid 1337 must read the checkout and Python wherever they are (a CI clone under /root, pyenv...):
the processes get the CAP_DAC_READ_SEARCH ambient capability (read/search only, no write), so no
file or directory permissions change. Everything started is recorded (namespace names, PIDs) and
removed by PID on ``down``, on ^C, and on any failure during ``up``.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import mesh_config  # noqa: E402

PROXY_UID = 1337
APP_UID = 1000
TEST_NET = ipaddress.ip_network("198.18.0.0/15")
AGENT_FLAGS = ["--drain-time-s", "5", "--drain-strategy", "immediate", "--local-address-ip-version", "v4",
               "--file-flush-interval-msec", "1000", "--disable-hot-restart", "--allow-unknown-static-fields",
               "-l", "warning"]
IPTABLES_FLAGS = ["-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "",
                  "-b", "*", "-d", "15090,15021,15020"]
CMD_TIMEOUT = 30


def _run(argv, check=True, timeout=CMD_TIMEOUT, **kw):
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise RuntimeError("%s failed (%d): %s" % (" ".join(argv), p.returncode, (p.stderr or p.stdout).strip()))
    return p


def as_user(uid: int) -> list[str]:
    """setpriv prefix: uid/gid ``uid``, no supplementary groups, read/search anywhere."""
    return ["setpriv", "--reuid=%d" % uid, "--regid=%d" % uid, "--clear-groups",
            "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search", "--"]


class Pod:
    def __init__(self, name, ns, ip, workdir):
        self.name = name
        self.ns = ns
        self.ip = ip
        self.dir = workdir
        self.admin = "http://127.0.0.1:15000"

    def argv(self, argv, uid=None):
        return ["ip", "netns", "exec", self.ns] + (as_user(uid) if uid is not None else []) + list(argv)

    def run(self, argv, uid=None, check=True, timeout=CMD_TIMEOUT, **kw):
        return _run(self.argv(argv, uid), check=check, timeout=timeout, **kw)

    def curl(self, url, *extra, timeout=5, uid=APP_UID):
        """(status, body) of an HTTP request made from inside the pod (as the app's uid)."""
        p = self.run(["curl", "-sS", "--max-time", str(timeout), "-o", "-", "-w", "\n%{http_code}"] + list(extra) + [url],
                     uid=uid, check=False, timeout=timeout + 5)
        body, _, code = p.stdout.rpartition("\n")
        return int(code or 0), body

    def stats(self, regex="") -> dict:
        """The proxy's counters and gauges (admin /stats text) as a dict."""
        q = "?filter=" + regex if regex else ""
        code, body = self.curl(self.admin + "/stats" + q, uid=None)
        out = {}
        for line in body.splitlines():
            k, _, v = line.partition(": ")
            if v.strip().isdigit():
                out[k] = int(v)
        return out


# the pods' sidecar.istio.io/statsInclusionPrefixes (pilot-agent adds them to its inclusion list):
# the listener and catch-all cluster stats tests/test_sidecar_e2e.py reads; the other per-service
# stats (cluster.outbound|..., http.*) are not created, as with Envoy under Istio's bootstrap
STATS_PREFIXES = ("listener.0.0.0.0_", "cluster.inbound|", "cluster.PassthroughCluster",
                  "cluster.InboundPassthroughCluster", "cluster.BlackHoleCluster")


class Mesh:
    def __init__(self, workdir=None, python=sys.executable, tag=None):
        self.python = python
        self.own_dir = workdir is None
        self.workdir = os.path.abspath(workdir or tempfile.mkdtemp(prefix="pyproxy-mesh-"))
        self.tag = tag or "pxm%d" % (os.getpid() % 100000)
        self.pods: dict[str, Pod] = {}
        self.procs: list[dict] = []   # {"name", "pid", "pod"}
        self.popen: dict[str, subprocess.Popen] = {}
        self.namespaces: list[str] = []
        self.links: list[str] = []
        self.env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
                        PYTHONUNBUFFERED="1")

    # -- state --------------------------------------------------------------------------------
    def _save(self):
        state = {"workdir": self.workdir, "namespaces": self.namespaces, "links": self.links,
                 "procs": self.procs, "pods": {n: {"ns": p.ns, "ip": p.ip} for n, p in self.pods.items()}}
        with open(os.path.join(self.workdir, "state.json"), "w") as f:
            json.dump(state, f, indent=1)

    def spawn(self, name, argv, pod=None, uid=None, cwd=None):
        log = open(os.path.join(self.workdir, "%s.log" % name.replace("/", "_")), "w")
        full = pod.argv(argv, uid) if pod is not None else (as_user(uid) if uid is not None else []) + list(argv)
        p = subprocess.Popen(full, cwd=cwd or self.workdir, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        self.popen[name] = p
        self.procs.append({"name": name, "pid": p.pid, "pod": pod.name if pod else ""})
        self._save()
        return p

    def log(self, name) -> str:
        try:
            with open(os.path.join(self.workdir, "%s.log" % name)) as f:
                return f.read()
        except OSError:
            return ""

    # -- bring up -----------------------------------------------------------------------------
    def _subnet(self):
        block = (os.getpid() % 4096) * 4
        return ipaddress.ip_network((int(TEST_NET.network_address) + 65536 + block * 4, 30))

    def up(self, timeout=30.0):
        try:
            self._up(timeout)
        except BaseException:
            self.down()
            raise
        return self

    def _up(self, timeout):
        os.makedirs(self.workdir, exist_ok=True)
        os.chown(self.workdir, PROXY_UID, PROXY_UID)
        net = self._subnet()
        ips = [str(h) for h in net.hosts()]
        for i, name in enumerate(("a", "b")):
            ns = "%s%s" % (self.tag, name)
            _run(["ip", "netns", "add", ns])
            self.namespaces.append(ns)
            d = os.path.join(self.workdir, "pod-" + name)
            os.makedirs(d, exist_ok=True)
            pod = self.pods[name] = Pod(name, ns, ips[i], d)
            pod.run(["ip", "link", "set", "lo", "up"])
        self._save()
        va, vb = "%sva" % self.tag, "%svb" % self.tag
        _run(["ip", "link", "add", va, "type", "veth", "peer", "name", vb])
        self.links.append(va)
        self._save()
        for pod, link in ((self.pods["a"], va), (self.pods["b"], vb)):
            _run(["ip", "link", "set", link, "netns", pod.ns])
            pod.run(["ip", "addr", "add", "%s/%d" % (pod.ip, net.prefixlen), "dev", link])
            pod.run(["ip", "link", "set", link, "up"])
        # istio-init: the injected command line, in each pod
        for pod in self.pods.values():
            pod.run([self.python, os.path.join(REPO, "init", "istio-iptables")] + IPTABLES_FLAGS)
        # control plane (the agent's xDS server) on a unix socket, as uid 1337
        a, b = self.pods["a"].ip, self.pods["b"].ip
        xds_dir = os.path.join(self.workdir, "xds")
        os.makedirs(xds_dir, exist_ok=True)
        services = {"svc-a": {"port": 8080, "subsets": {"": [(a, 8080, "svc-a")]}},
                    "svc-b": {"port": 8080, "subsets": {"": [(b, 8080, "svc-b")]}}}
        mesh_config.write(os.path.join(xds_dir, "mesh.json"), mesh_config.resources(services, [8080]))
        sock = os.path.join(self.workdir, "XDS")
        self.spawn("control-plane", [self.python, "-m", "pyproxy", "control-plane", "--config-dir", xds_dir,
                                     "--uds", sock, "--status-file", os.path.join(self.workdir, "cp-status.json")],
                   uid=PROXY_UID)
        _wait(lambda: os.path.exists(sock), 15, "control plane socket", self.popen["control-plane"],
              lambda: self.log("control-plane"))
        # apps (uid 1000) and sidecars (uid 1337)
        for pod in self.pods.values():
            os.chown(pod.dir, PROXY_UID, PROXY_UID)
            bs = mesh_config.bootstrap("sidecar~%s~%s.default~default.svc.cluster.local" % (pod.ip, pod.name),
                                       sock, instance_ips=pod.ip, stats_inclusion_prefixes=STATS_PREFIXES)
            with open(os.path.join(pod.dir, "envoy-rev.json"), "w") as f:
                json.dump(bs, f, indent=1)
            self.spawn("app-%s" % pod.name, [self.python, os.path.join(HERE, "mesh_app.py"), "http", "8080",
                                             "svc-" + pod.name], pod=pod, uid=APP_UID)
            if pod.name == "b":
                self.spawn("echo-b", [self.python, os.path.join(HERE, "mesh_app.py"), "echo", "9999"],
                           pod=pod, uid=APP_UID)
            self.start_proxy(pod)
        for pod in self.pods.values():
            self.wait_ready(pod, timeout)
            for app in ("app-%s" % pod.name,) + (("echo-b",) if pod.name == "b" else ()):
                _wait(lambda: "ready" in self.log(app), 10, app, self.popen[app], lambda: self.log(app))
        self._save()

    def start_proxy(self, pod):
        name = "proxy-%s" % pod.name
        return self.spawn(name, [self.python, "-m", "pyproxy", "-c", "envoy-rev.json"] + AGENT_FLAGS,
                          pod=pod, uid=PROXY_UID, cwd=pod.dir)

    def wait_ready(self, pod, timeout=30.0):
        """As pilot-agent decides readiness: server.state 0, workers started, CDS and LDS updated."""
        def ready():
            s = pod.stats(r"^(server\.state|listener_manager\.workers_started|cluster_manager\.cds\.update_success"
                          r"|listener_manager\.lds\.update_success)$")
            return (s.get("server.state") == 0 and s.get("listener_manager.workers_started") == 1
                    and s.get("cluster_manager.cds.update_success", 0) > 0
                    and s.get("listener_manager.lds.update_success", 0) > 0)
        name = "proxy-%s" % pod.name
        _wait(ready, timeout, "%s ready" % name, self.popen.get(name), lambda: self.log(name))

    # -- tear down ----------------------------------------------------------------------------
    def down(self):
        for pr in reversed(self.procs):
            _kill_group(pr["pid"], self.popen.get(pr["name"]))
        self.procs = []
        for link in self.links:
            subprocess.run(["ip", "link", "del", link], capture_output=True, timeout=CMD_TIMEOUT)
        for ns in self.namespaces:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=CMD_TIMEOUT)
        self.links, self.namespaces = [], []
        if self.own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        elif os.path.isdir(self.workdir):
            self._save()

    @classmethod
    def from_state(cls, workdir):
        with open(os.path.join(workdir, "state.json")) as f:
            st = json.load(f)
        m = cls(workdir)
        m.namespaces, m.links, m.procs = st["namespaces"], st["links"], st["procs"]
        return m


def _kill_group(pid, popen=None, sig=signal.SIGKILL):
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
    if popen is not None:
        try:
            popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


def _wait(pred, timeout, what, proc=None, logs=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError("%s: process exited (%s)\n%s" % (what, proc.returncode, (logs() if logs else "")[-2000:]))
        time.sleep(0.1)
    raise RuntimeError("timed out waiting for %s\n%s" % (what, (logs() if logs else "")[-2000:]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="two pods with pyproxy sidecars in network namespaces")
    p.add_argument("action", choices=["up", "down"])
    p.add_argument("--workdir", default="/tmp/pyproxy-mesh")
    p.add_argument("--detach", action="store_true", help="up: return once ready, leaving it running")
    a = p.parse_args(argv)
    if os.geteuid() != 0:
        print("netns_mesh: needs root (network namespaces, iptables)", file=sys.stderr)
        return 2
    if a.action == "down":
        if not os.path.exists(os.path.join(a.workdir, "state.json")):
            print("netns_mesh: nothing to tear down in %s" % a.workdir)
            return 0
        Mesh.from_state(a.workdir).down()
        print("netns_mesh: down")
        return 0
    m = Mesh(a.workdir)
    m.up()
    for pod in m.pods.values():
        print("pod %s: netns %s ip %s  (ip netns exec %s curl -s %s/stats)" % (pod.name, pod.ns, pod.ip, pod.ns, pod.admin))
    print("try: ip netns exec %s setpriv --reuid=%d --regid=%d --clear-groups curl -s http://%s:8080/hello"
          % (m.pods["a"].ns, APP_UID, APP_UID, m.pods["b"].ip))
    if a.detach:
        return 0
    stop = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.append(1))
    try:
        while not stop:
            time.sleep(0.5)
    finally:
        m.down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
