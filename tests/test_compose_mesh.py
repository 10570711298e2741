"""docker-compose.yml for real: the images built with no registry (docker/local-images.sh), the mesh
brought up on them, traffic from svc-a to svc-b through both captured sidecars, and
`docker-compose stop` under load.

Needs root and Debian's docker.io, docker-compose and debootstrap (tests/run.sh installs them);
skipped otherwise, and with CI=true a skip is a failure. Uses the dockerd that answers on
DOCKER_HOST (or the default socket); if none does, starts one with its own data root, exec root,
socket, pidfile and bridge address (198.19.254.1/24), without touching the host's iptables, and
afterwards stops it by PID and removes what it made. The images get test tags and are removed at
the end (unless they existed before); the debootstrap root file system stays cached under
/var/cache/pyproxy-images (docker/local-images.sh).
"""

import datetime
import json
import os
import re
import select
import shutil
import signal
import subprocess
import time
import urllib.request

import pytest

from scripts import mesh_config
from scripts.local_dockerd import LocalDockerd, docker_answers
from tests.test_sidecar_agent import AGENT_FLAGS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
BASE_IMAGE = "pyproxy/debian-python:compose-test"
MESH_IMAGE = "pyproxy/mesh:compose-test"
PROJECT = "pyproxymeshtest"
PODS = dict(mesh_config.COMPOSE_PODS)           # pod -> IP
BUILD_TIMEOUT = 900
V1 = "outbound|8080|v1|svc-b.default.svc.cluster.local"
V2 = "outbound|8080|v2|svc-b.default.svc.cluster.local"
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _unavailable(why):
    if CI:
        pytest.fail("CI=true: the compose mesh test must run here, but " + why)
    pytest.skip(why)


def _run(argv, env, timeout, check=True, **kw):
    p = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise AssertionError("%s: exit %d\n%s\n%s" % (" ".join(argv), p.returncode, p.stdout[-4000:], p.stderr[-4000:]))
    return p


class Mesh:
    def __init__(self, env, docker, compose):
        self.env, self.docker, self.compose = env, docker, compose

    def dc(self, *args, timeout=120, check=True):
        return _run([self.compose, "-p", PROJECT, "-f", os.path.join(REPO, "docker-compose.yml")] + list(args),
                    self.env, timeout, check=check, cwd=REPO)

    def dc_argv(self, *args):
        return [self.compose, "-p", PROJECT, "-f", os.path.join(REPO, "docker-compose.yml")] + list(args)

    def exec_py(self, service, script, *args, timeout=120):
        p = self.dc("exec", "-T", service, "python3", "-c", script, *args, timeout=timeout)
        return p.stdout

    def stats(self, service, regex):
        out = self.dc("exec", "-T", service, "curl", "-sS", "--max-time", "5",
                      "http://127.0.0.1:15000/stats?filter=" + urllib.request.quote(regex)).stdout
        s = {}
        for line in out.splitlines():
            name, _, value = line.rpartition(": ")
            if value.strip().isdigit():
                s[name] = int(value)
        return s

    def container(self, service):
        cid = self.dc("ps", "-q", service).stdout.strip()
        assert cid, "no container for " + service
        out = _run([self.docker, "inspect", cid], self.env, 30).stdout
        return json.loads(out)[0]


def _ready(ip):
    try:
        with NO_PROXY.open("http://%s:15021/healthz/ready" % ip, timeout=3) as r:
            return r.status == 200
    except Exception:
        return False


@pytest.fixture(scope="module")
def mesh():
    if os.geteuid() != 0:
        _unavailable("needs root (dockerd, debootstrap)")
    docker, compose, dockerd_exe = shutil.which("docker"), shutil.which("docker-compose"), shutil.which("dockerd")
    for name, exe in (("docker", docker), ("docker-compose", compose), ("dockerd", dockerd_exe),
                      ("debootstrap", shutil.which("debootstrap"))):
        if exe is None:
            _unavailable("%s is not installed (apt-get install docker.io docker-compose debootstrap)" % name)
    env = dict(os.environ, PYPROXY_BASE_IMAGE=BASE_IMAGE, PYPROXY_MESH_IMAGE=MESH_IMAGE, DOCKER=docker)
    env.pop("MESH_PROXY", None)
    own = None
    if not docker_answers(env, docker):
        own = LocalDockerd.start(docker, exe=dockerd_exe)
        env["DOCKER_HOST"] = own.host
    m = Mesh(env, docker, compose)
    existing = set()
    try:
        for image in (BASE_IMAGE, MESH_IMAGE):
            if subprocess.run([docker, "image", "inspect", image], env=env, capture_output=True,
                              timeout=30).returncode == 0:
                existing.add(image)
        t0 = time.monotonic()
        p = _run(["bash", os.path.join(REPO, "docker", "local-images.sh")], env, BUILD_TIMEOUT, check=False)
        assert p.returncode == 0, "docker/local-images.sh failed:\n%s\n%s" % (p.stdout[-3000:], p.stderr[-3000:])
        m.build_seconds = time.monotonic() - t0
        m.build_output = p.stdout
        m.dc("down", "-v", "--remove-orphans", check=False)
        m.dc("up", "-d", "--no-build", timeout=300)
        deadline = time.monotonic() + 120
        pending = dict(PODS)
        while pending and time.monotonic() < deadline:
            for pod, ip in list(pending.items()):
                if _ready(ip):
                    del pending[pod]
            time.sleep(0.5)
        if pending:
            logs = m.dc("logs", "--no-color", "--tail", "40", check=False).stdout
            raise AssertionError("sidecars not ready on 15021 after 120 s: %s\n%s" % (sorted(pending), logs[-6000:]))
        yield m
    finally:
        try:
            m.dc("down", "-v", "--remove-orphans", "--timeout", "5", check=False, timeout=180)
            if own is None:
                for image in (MESH_IMAGE, BASE_IMAGE):
                    if image not in existing:
                        subprocess.run([docker, "image", "rm", "-f", image], env=env, capture_output=True, timeout=120)
        finally:
            if own is not None:
                own.stop()


SPLIT = r"""
import http.client, json, sys
n = int(sys.argv[1])
pods, peers, xfcc, bad, c = {}, {}, {}, [], None
for i in range(n):
    try:
        if c is None:
            c = http.client.HTTPConnection("svc-b", 8080, timeout=10)
        c.request("GET", "/split/%d" % i)
        r = c.getresponse()
        body = r.read()
        if r.status != 200:
            bad.append([i, r.status])
            continue
        d = json.loads(body)
        pods[d["pod"]] = pods.get(d["pod"], 0) + 1
        peers[d["peer"]] = peers.get(d["peer"], 0) + 1
        x = d.get("xfcc", "")
        xfcc[x] = xfcc.get(x, 0) + 1
        if i % 10 == 9:            # new connections too, not only keep-alive
            c.close()
            c = None
    except Exception as e:
        bad.append([i, repr(e)])
        c = None
print(json.dumps({"pods": pods, "peers": peers, "xfcc": xfcc, "bad": bad}))
"""


def test_split_and_capture(mesh):
    """500 requests from svc-a's app to svc-b: all succeed, about 90/10 between v1 and v2, the
    sidecars count them (svc-a's outbound clusters, svc-b's inbound cluster), svc-b's app sees
    the inbound sidecar's 127.0.0.6 as the peer and svc-a's SPIFFE identity in
    x-forwarded-client-cert (the hop between the sidecars is mTLS)."""
    stat_re = r"^(cluster\.outbound\|8080\|v[12]\|svc-b\.default\.svc\.cluster\.local\.upstream_rq_total" \
              r"|http\.outbound_0\.0\.0\.0_8080\.downstream_rq_total|cluster\.inbound\|8080\|\|\.upstream_rq_total)$"
    before = {pod: mesh.stats(pod, stat_re) for pod in PODS}
    out = json.loads(mesh.exec_py("svc-a", SPLIT, "500"))
    after = {pod: mesh.stats(pod, stat_re) for pod in PODS}
    assert out["bad"] == [], out["bad"][:5]
    pods = out["pods"]
    assert set(pods) <= {"svc-b-v1", "svc-b-v2"} and sum(pods.values()) == 500, pods
    v2 = pods.get("svc-b-v2", 0)
    # binomial(500, 0.1): mean 50, sd 6.7; 4.5 sd either side (a false alarm about once in 10^5 runs)
    assert 20 <= v2 <= 80, pods
    assert out["peers"] == {"127.0.0.6": 500}, out["peers"]
    # mTLS STRICT: svc-b's sidecar verified svc-a's certificate (SDS from pod-agent) and says so
    assert sum(out["xfcc"].values()) == 500 and len(out["xfcc"]) == 1, out["xfcc"]
    xfcc = next(iter(out["xfcc"]))
    assert xfcc.startswith("By=spiffe://cluster.local/ns/default/sa/svc-b;Hash=") and \
        xfcc.endswith(";URI=spiffe://cluster.local/ns/default/sa/svc-a"), xfcc

    def delta(pod, name):
        return after[pod].get(name, 0) - before[pod].get(name, 0)

    # capture: every request went through svc-a's outbound listener and svc-b's inbound one
    assert delta("svc-a", "http.outbound_0.0.0.0_8080.downstream_rq_total") == 500
    assert delta("svc-a", "cluster.%s.upstream_rq_total" % V1) == pods.get("svc-b-v1", 0)
    assert delta("svc-a", "cluster.%s.upstream_rq_total" % V2) == v2
    assert delta("svc-b-v1", "cluster.inbound|8080||.upstream_rq_total") == pods.get("svc-b-v1", 0)
    assert delta("svc-b-v2", "cluster.inbound|8080||.upstream_rq_total") == v2
    # pilot-agent's stats inclusion list (plus the pods' statsInclusionPrefixes): no listener stats
    # are created, as with Envoy; the readiness stats the agent reads are
    assert mesh.stats("svc-a", r"^listener\.") == {}
    assert mesh.stats("svc-a", r"^server\.state$") == {"server.state": 0}


def test_local_images_is_idempotent(mesh):
    """The first run printed what it built; a second one keeps both images and builds nothing."""
    assert "docker import %s" % BASE_IMAGE in mesh.build_output or "%s exists" % BASE_IMAGE in mesh.build_output
    assert "built %s" % MESH_IMAGE in mesh.build_output or "%s exists" % MESH_IMAGE in mesh.build_output
    p = _run(["bash", os.path.join(REPO, "docker", "local-images.sh")], mesh.env, 300)
    lines = p.stdout.splitlines()
    assert len(lines) == 2 and lines[0] == "local-images: %s exists" % BASE_IMAGE, p.stdout
    assert re.fullmatch(r"local-images: %s exists \(sources [0-9a-f]{16}\)" % re.escape(MESH_IMAGE), lines[1]), p.stdout


def test_strict_mtls_refuses_plaintext(mesh):
    """PeerAuthentication STRICT: plaintext to a pod's application port (captured to 15006) matches
    no inbound chain and is closed without an answer; so is TLS without a mesh client certificate."""
    import http.client
    import socket
    import ssl
    for pod in ("svc-b-v1", "svc-a"):
        c = http.client.HTTPConnection(PODS[pod], 8080, timeout=5)
        with pytest.raises((http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)):
            c.request("GET", "/plaintext")
            c.getresponse()
        c.close()
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ctx.set_alpn_protocols(["istio-http/1.1"])
    with socket.create_connection((PODS["svc-b-v1"], 8080), timeout=5) as raw:
        with pytest.raises((ssl.SSLError, ConnectionResetError, OSError)):
            with ctx.wrap_socket(raw) as s:
                s.sendall(b"GET / HTTP/1.1\r\nhost: svc-b\r\n\r\n")
                if not s.recv(100):
                    raise ConnectionResetError("closed without an answer")
    # the sidecars still serve their own ports (15021 is not captured)
    assert all(_ready(ip) for ip in PODS.values())


def test_documented_commands(mesh):
    """The commands in docker-compose.yml's header work as written."""
    body = json.loads(mesh.dc("exec", "-T", "svc-a", "curl", "-sS", "http://svc-b:8080/hello").stdout)
    assert body["pod"] in ("svc-b-v1", "svc-b-v2") and body["peer"] == "127.0.0.6"
    body = json.loads(mesh.dc("exec", "-T", "svc-a", "curl", "-sS",
                              "localhost:8080/call?url=http://svc-b:8080/x").stdout)
    assert body["upstream"]["status"] == 200 and body["upstream"]["body"]["pod"].startswith("svc-b-v")
    # the init containers ran istio-iptables with the injected flags and exited 0; uid 1337 sidecars
    for pod in PODS:
        init = mesh.container(pod + "-init")
        assert init["State"]["Status"] == "exited" and init["State"]["ExitCode"] == 0
        proxy = mesh.container(pod + "-proxy")
        assert proxy["Config"]["User"] == "1337:1337" and proxy["State"]["Running"]
        ps = mesh.dc("exec", "-T", pod + "-proxy", "ps", "-o", "uid=,args=", "-u", "1337").stdout
        assert re.search(r"^\s*1337 /usr/local/bin/python3 -m pyproxy -c /etc/pyproxy/sidecar-%s\.json "
                         r"--drain-time-s 45 " % pod, ps, re.M), ps


def test_image_launcher_and_agent_command_line(mesh):
    """In the image: /usr/local/bin/envoy (the launcher, as in the proxyv2 Dockerfile) runs pyproxy;
    `--version` through it, and pilot-agent's whole command line for envoy validates a sidecar
    bootstrap; Envoy (envoy-cpp) is there too; the base was built here (no registry)."""
    def run(*argv, entrypoint="/usr/local/bin/envoy"):
        return _run([mesh.docker, "run", "--rm", "--network", "none", "-v", os.path.join(REPO, "docker") + ":/etc/pyproxy:ro",
                     "--entrypoint", entrypoint, MESH_IMAGE] + list(argv), mesh.env, 120)
    assert re.search(r"^pyproxy\s+version: \S+/Clean/RELEASE/", run("--version").stdout, re.M)
    p = run("--mode", "validate", "-c", "/etc/pyproxy/sidecar-svc-a.json", *AGENT_FLAGS)
    assert "OK" in p.stdout, p.stdout + p.stderr
    assert re.search(r"version: \S+/1\.\d+\.\d+/Clean/RELEASE/BoringSSL", run("--version", entrypoint="/usr/local/bin/envoy-cpp").stdout)
    assert "python3 -m pyproxy" in run("/usr/local/bin/envoy", entrypoint="/bin/cat").stdout
    assert run("-u", entrypoint="/usr/bin/id").stdout.strip() == "1337"
    info = json.loads(_run([mesh.docker, "image", "inspect", BASE_IMAGE], mesh.env, 30).stdout)[0]
    assert "debootstrap --variant=minbase" in info["Comment"], info["Comment"]


LOAD = r"""
import http.client, json, sys, threading, time
workers, ms = int(sys.argv[1]), sys.argv[2]
stop, lock, results = threading.Event(), threading.Lock(), []
def worker(i):
    c = None
    time.sleep(i * int(ms) / 1000.0 / workers)        # staggered: a request is always in flight
    while not stop.is_set():
        t0 = time.time()
        try:
            if c is None:
                c = http.client.HTTPConnection("svc-b", 8080, timeout=30)
            c.request("GET", "/slow?ms=" + ms)
            r = c.getresponse()
            body = r.read()
            ok = r.status == 200 and json.loads(body)["pod"].startswith("svc-b-v")
            if (r.getheader("connection") or "").lower() == "close":
                c.close()
                c = None
            res = [t0, time.time(), r.status, ok]
        except Exception as e:
            res = [t0, time.time(), 0, False, repr(e)]
            c = None
        with lock:
            results.append(res)
    if c is not None:
        c.close()
threads = [threading.Thread(target=worker, args=(i,)) for i in range(workers)]
for t in threads:
    t.start()
print("started", flush=True)
sys.stdin.readline()          # the pod is terminating: start no new request
stop.set()
for t in threads:
    t.join(60)
print(json.dumps(results), flush=True)
"""


def _log_time(text, what):
    """The timestamp of the first log line containing `what` (pyproxy logs UTC in the container)."""
    for line in text.splitlines():
        if what in line:
            m = re.search(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+)\]", line)
            if m:
                return datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S.%f").replace(
                    tzinfo=datetime.timezone.utc).timestamp()
    return None


def _docker_time(s):
    s = re.sub(r"(\.\d{6})\d*", r"\1", s.replace("Z", "+00:00"))
    return datetime.datetime.fromisoformat(s).timestamp()


def test_stop_under_load_drains(mesh):
    """`docker-compose stop` while svc-a has slow requests to svc-b in flight: every sidecar gets
    SIGTERM, drains, and exits 0 by itself once its connections are done; no request fails."""
    load = subprocess.Popen(mesh.dc_argv("exec", "-T", "svc-a", "python3", "-c", LOAD, "6", "3000"), env=mesh.env,
                            cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    stop = None
    try:
        ready, _, _ = select.select([load.stdout], [], [], 60)
        assert ready and load.stdout.readline().strip() == "started", load.stderr.read() if load.poll() else ""
        time.sleep(4.0)                       # ~6 requests in flight at any time
        load.stdin.write("stop\n")
        load.stdin.flush()
        t_stop = time.time()
        stop = subprocess.run(mesh.dc_argv("stop"), env=mesh.env, cwd=REPO, capture_output=True, text=True,
                              timeout=180)
        t_stopped = time.time()
        out, err = load.communicate(timeout=60)
    finally:
        if load.poll() is None:
            os.killpg(load.pid, signal.SIGKILL)
            load.wait(10)
    assert stop.returncode == 0, stop.stderr
    assert load.returncode == 0, err
    results = json.loads(out.strip().splitlines()[-1])
    failed = [r for r in results if not r[3]]
    assert failed == [], failed[:5]
    logs = mesh.dc("logs", "--no-color", check=False).stdout
    for pod in PODS:
        proxy = mesh.container(pod + "-proxy")
        state = proxy["State"]
        assert state["Status"] == "exited" and state["ExitCode"] == 0, (pod, state)
        own = "\n".join(line.split("|", 1)[1] for line in logs.splitlines() if line.startswith(pod + "-proxy_"))
        t_term = _log_time(own, "caught SIGTERM")
        assert t_term is not None and t_stop <= t_term + 0.5, (pod, own[-2000:])
        # drained, then exited by itself: well before the 45 s drain time / 50 s grace period
        assert _docker_time(state["FinishedAt"]) - t_term < 10.0, (pod, state["FinishedAt"], t_term)
        if pod == "svc-a":
            in_flight = [r for r in results if r[0] < t_term < r[1]]
            # (at least one slow request was in flight when SIGTERM came: on a loaded machine
            # `docker-compose stop` may take seconds to deliver it, after most had finished)
            assert len(results) >= 6 and len(in_flight) >= 1, (len(results), len(in_flight))
    assert t_stopped - t_stop < 60
