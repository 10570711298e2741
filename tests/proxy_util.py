"""Shared helpers for end-to-end tests: bootstraps, proxies (pyproxy / envoy) as subprocesses, small
real backends (threads on 127.0.0.1 port 0), raw HTTP clients and stats.

    bs = bootstrap([http_listener(free_port(), route_config([route("/", "b")]))], [cluster("b", [be.port])])
    with Pyproxy(bs) as px:                # or Envoy(bs); both(bs) yields each in turn
        status, headers, body = request(px.port, "GET", "/")

Everything started here is stopped by PID (processes) or by closing its sockets (threads); every
wait is bounded.
"""

from __future__ import annotations

import collections
import http.client
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import httptools

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENVOY = shutil.which("envoy")
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)

HCM_TYPE = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER_TYPE = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
TCP_TYPE = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"


_FREE_LO, _FREE_HI = 20000, 32767  # below Linux's ephemeral range (32768-60999)
_handed_out: set = set()


def free_port() -> int:
    """A TCP port free right now, for a process the test starts next.

    Not the kernel's port 0: that comes from the ephemeral range, which every outgoing connection
    on the machine (load generators, proxies' upstream connections, other test runs) also draws
    from, so a port released here could be taken by someone's connect() before the process under
    test binds it. Ports below that range are never handed out implicitly; a port is drawn at
    random there, not twice in one test run, and checked bindable on all addresses."""
    import random
    for _ in range(200):
        p = random.randrange(_FREE_LO, _FREE_HI)
        if p in _handed_out:
            continue
        s = socket.socket()
        try:
            s.bind(("0.0.0.0", p))
        except OSError:
            continue
        finally:
            s.close()
        _handed_out.add(p)
        return p
    raise RuntimeError("no free TCP port found in %d-%d" % (_FREE_LO, _FREE_HI))


# ---------------------------------------------------------------------------------- bootstraps

def cluster(name: str, ports, *, lb_policy: str = "ROUND_ROBIN", connect_timeout: str = "1s",
            **extra) -> dict:
    c = {"name": name, "type": "STATIC", "connect_timeout": connect_timeout, "lb_policy": lb_policy,
         "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
             {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}}
             for p in ports]}]}}
    c.update(extra)
    return c


def route(prefix: str = "/", cluster_name: str | None = "b", **action) -> dict:
    """A prefix route to ``cluster_name`` with extra RouteAction fields (timeout, retry_policy...)."""
    r = {"match": {"prefix": prefix}}
    a = dict(action)
    if cluster_name is not None and "weighted_clusters" not in a and "cluster_header" not in a:
        a["cluster"] = cluster_name
    r["route"] = a
    return r


def route_config(routes, domains=("*",), **vh_extra) -> dict:
    vh = {"name": "vh", "domains": list(domains), "routes": list(routes)}
    vh.update(vh_extra)
    return {"name": "rc", "virtual_hosts": [vh]}


def hcm(rc: dict, stat_prefix: str = "ingress", **extra) -> dict:
    h = {"@type": HCM_TYPE, "stat_prefix": stat_prefix, "codec_type": "AUTO", "route_config": rc,
         "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER_TYPE}}]}
    h.update(extra)
    return h


def http_listener(port: int, rc: dict, name: str = "http", **hcm_extra) -> dict:
    return {"name": name, "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                            "typed_config": hcm(rc, **hcm_extra)}]}]}


def tcp_listener(port: int, cluster_name: str | None = None, name: str = "tcp", weighted=None,
                 **extra) -> dict:
    tc = {"@type": TCP_TYPE, "stat_prefix": name}
    if weighted:
        tc["weighted_clusters"] = {"clusters": [{"name": n, "weight": w} for n, w in weighted]}
    else:
        tc["cluster"] = cluster_name
    tc.update(extra)
    return {"name": name, "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [{"filters": [{"name": "envoy.filters.network.tcp_proxy", "typed_config": tc}]}]}


def bootstrap(listeners, clusters, admin: bool = True) -> dict:
    bs = {"static_resources": {"listeners": list(listeners), "clusters": list(clusters)}}
    if admin:
        bs["admin"] = {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}}
    return bs


def with_fresh_ports(bs: dict) -> dict:
    """A copy of ``bs`` whose listeners bind new free ports (to run two proxies side by side)."""
    import copy
    bs = copy.deepcopy(bs)
    for l in bs.get("static_resources", {}).get("listeners", []):
        l["address"]["socket_address"]["port_value"] = free_port()
    return bs


def one_route_bootstrap(backend_ports, *, route_extra=None, hcm_extra=None, cluster_extra=None,
                        vh_extra=None):
    """The common case: one HTTP listener, one route "/" -> cluster "b". Returns (bootstrap, port)."""
    port = free_port()
    rc = route_config([route("/", "b", **(route_extra or {}))], **(vh_extra or {}))
    bs = bootstrap([http_listener(port, rc, **(hcm_extra or {}))],
                   [cluster("b", backend_ports, **(cluster_extra or {}))])
    return bs, port


# ---------------------------------------------------------------------------------- processes

def kill_process(proc: subprocess.Popen, wait: float = 5.0) -> None:
    """SIGKILL ``proc`` (by its PID) if it still runs, then reap it (bounded)."""
    if proc.poll() is None:
        try:
            os.kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            pass


class _Proc:
    """A proxy subprocess on a bootstrap; context manager; killed by PID."""

    kind = "?"

    def __init__(self, bs: dict, extra_args=(), wait_ready: bool = True, env=None, cwd=None):
        self.bs = bs
        self.tmp = tempfile.mkdtemp(prefix="px-%s-" % self.kind)
        self.config_path = os.path.join(self.tmp, "bootstrap.json")
        with open(self.config_path, "w") as f:
            json.dump(bs, f)
        self.admin_path = os.path.join(self.tmp, "admin-address")
        self.log_path = os.path.join(self.tmp, "log")
        self.admin_port = None
        self.ports = [l["address"]["socket_address"]["port_value"]
                      for l in bs.get("static_resources", {}).get("listeners", [])]
        self.port = self.ports[0] if self.ports else None
        self._log = open(self.log_path, "w")
        if cwd is not None:  # e.g. Istio's relative unix socket paths: the package from ROOT still
            env = dict(os.environ if env is None else env)
            env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
        self.proc = subprocess.Popen(self.command(list(extra_args)), stdout=self._log,
                                     stderr=subprocess.STDOUT, cwd=cwd or ROOT, env=env)
        self.pid = self.proc.pid
        if wait_ready:
            try:
                self.wait_ready()
            except BaseException:
                self.stop()
                raise

    def command(self, extra):
        raise NotImplementedError

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def wait_ready(self, timeout: float = 15.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("%s exited with %s:\n%s" % (self.kind, self.proc.returncode, self.log()[-3000:]))
            if self.admin_port is None and os.path.exists(self.admin_path):
                addr = open(self.admin_path).read().strip()
                if addr:
                    self.admin_port = int(addr.rpartition(":")[2])
            if self.admin_port is not None:
                try:
                    st, _, _ = request(self.admin_port, "GET", "/ready", timeout=1)
                except OSError:
                    st = 0
                # LIVE means the listeners are bound (no probe connection: it would be counted)
                if st == 200:
                    return
            time.sleep(0.03)
        raise RuntimeError("%s not ready in %ss:\n%s" % (self.kind, timeout, self.log()[-3000:]))

    def stats(self) -> dict:
        """Counters and gauges from the admin ``/stats`` (text format) as name -> int."""
        _, _, body = request(self.admin_port, "GET", "/stats", timeout=5)
        out = {}
        for line in body.decode().splitlines():
            name, sep, v = line.partition(": ")
            if sep:
                try:
                    out[name] = int(v)
                except ValueError:
                    pass
        return out

    def stat(self, name: str) -> int:
        return self.stats().get(name, 0)

    def rss_kb(self) -> int:
        with open("/proc/%d/status" % self.pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def signal(self, sig) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, sig)

    def stop(self) -> None:
        kill_process(self.proc)
        self._log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


class Pyproxy(_Proc):
    kind = "pyproxy"

    def command(self, extra):
        return [sys.executable, "-m", "pyproxy", "-c", self.config_path, "--admin-address-path",
                self.admin_path, "-l", "warning", "--concurrency", "1"] + extra


class Envoy(_Proc):
    kind = "envoy"

    def command(self, extra):
        return [ENVOY, "-c", self.config_path, "--base-id", str(random.randint(1000, 60000)),
                "--disable-hot-restart", "--concurrency", "1", "--admin-address-path",
                self.admin_path, "-l", "warning"] + extra


def proxies(with_envoy: bool = True):
    """The proxy classes a comparison test runs on (Envoy only if the binary is present)."""
    return [Pyproxy] + ([Envoy] if with_envoy and ENVOY else [])


REFERENCE_ENV = dict(os.environ, PYPROXY_REFERENCE="1")  # (the plain filter-by-filter reference mode)


def both_ways(bs: dict):
    """Generator for a fixture: ``bs`` run (each on fresh ports) by pyproxy and by Envoy; yields
    {"pyproxy": (proxy, listener port), "envoy": (proxy, listener port)} and stops them."""
    procs = {}
    try:
        for name, cls in (("pyproxy", Pyproxy), ("envoy", Envoy)):
            b = with_fresh_ports(bs)
            procs[name] = (cls(b), b["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"])
        yield procs
    finally:
        for p, _ in procs.values():
            p.stop()


def three_ways(bs: dict):
    """Generator for a fixture: ``bs`` run (each on fresh ports) by pyproxy, by pyproxy in its
    reference mode and by Envoy; yields {"pyproxy": p, "reference": p, "envoy": p} and stops them."""
    out = {}
    try:
        out["pyproxy"] = Pyproxy(with_fresh_ports(bs))
        out["reference"] = Pyproxy(with_fresh_ports(bs), env=REFERENCE_ENV)
        out["envoy"] = Envoy(with_fresh_ports(bs))
        yield out
    finally:
        for p in out.values():
            p.stop()


def wait_until(pred, timeout: float = 5.0, interval: float = 0.05):
    """Poll ``pred()`` until it returns something true or ``timeout`` passes (bounded); returns its
    last value."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v or time.monotonic() >= deadline:
            return v
        time.sleep(interval)


def _can_connect(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def run_pyproxy(args, timeout: float = 20.0, **kw) -> subprocess.CompletedProcess:
    """``python3 -m pyproxy ARGS`` to completion (for validate / CLI errors)."""
    return subprocess.run([sys.executable, "-m", "pyproxy"] + list(args), capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, **kw)


def validate(bs: dict) -> subprocess.CompletedProcess:
    """``pyproxy validate`` on the bootstrap ``bs`` (written to a temporary file, removed after)."""
    d = tempfile.mkdtemp(prefix="px-validate-")
    try:
        p = os.path.join(d, "bs.json")
        with open(p, "w") as f:
            json.dump(bs, f)
        return run_pyproxy(["validate", p])
    finally:
        shutil.rmtree(d, ignore_errors=True)


def cyclic_garbage(monkeypatch, harness: str, args) -> "collections.Counter":
    """Run the socket-free benchmark harness ``benchmarks/<harness>.py`` (its ``main(args)`` must
    return 0) with the collector keeping whatever it finds in reference cycles from the harness's
    ``gc.freeze()`` on (after its setup); returns those objects counted by type name."""
    import gc
    import importlib
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    mod = importlib.import_module(harness)
    freeze = gc.freeze
    monkeypatch.setattr(gc, "freeze", lambda: (freeze(), gc.set_debug(gc.DEBUG_SAVEALL)))
    try:
        assert mod.main(list(args)) == 0
        gc.collect()
        return collections.Counter(type(o).__name__ for o in gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.unfreeze()


# ---------------------------------------------------------------------------------- backends

class Closing:
    """``with`` support for a test server: ``close()`` at the end of the block."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def listen_local(backlog: int = 16) -> socket.socket:
    """A TCP socket listening on 127.0.0.1, on a port the kernel picks (SO_REUSEADDR)."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    s.listen(backlog)
    return s

class Request:
    __slots__ = ("method", "path", "headers", "body", "version", "conn_id")

    def __init__(self):
        self.method = ""
        self.path = ""
        self.headers = []
        self.body = b""
        self.version = ""
        self.conn_id = 0

    def header(self, name: str, default=None):
        name = name.lower()
        for k, v in self.headers:
            if k == name:
                return v
        return default

    def header_all(self, name: str):
        name = name.lower()
        return [v for k, v in self.headers if k == name]


class _ReqCollector:
    def __init__(self):
        self.done = []
        self.cur = None
        self.upgrade = False

    def on_message_begin(self):
        self.cur = Request()
        self._body = []
        self._url = b""

    def on_url(self, url):
        self._url += url

    def on_header(self, name, value):
        self.cur.headers.append((name.decode("latin-1").lower(), value.decode("latin-1")))

    def on_headers_complete(self):
        pass

    def on_body(self, body):
        self._body.append(body)

    def on_message_complete(self):
        self.cur.body = b"".join(self._body)
        self.cur.path = self._url.decode("latin-1")
        self.done.append(self.cur)


def simple_response(status: int = 200, body: bytes = b"ok", headers=(), reason: str = "X") -> bytes:
    h = "".join("%s: %s\r\n" % kv for kv in headers)
    if not any(k.lower() in ("content-length", "transfer-encoding") for k, _ in headers):
        h += "content-length: %d\r\n" % len(body)
    return ("HTTP/1.1 %d %s\r\n%s\r\n" % (status, reason, h)).encode() + body


class HttpBackend(Closing):
    """A threaded HTTP/1.1 server on 127.0.0.1:0 that records every request it parses.

    ``handler(req, sock)`` returns the response bytes (or None if it wrote itself, or the string
    "close" to close without answering, or "websocket" after writing a 101 to echo bytes raw).
    The default answers 200 with a body naming the backend and echoing the request body length.
    """

    def __init__(self, handler=None, name: str = "b"):
        self.name = name
        self.handler = handler or self._default
        self.requests: list[Request] = []
        self.raw = bytearray()
        self.connections = 0
        self.lock = threading.Lock()
        self.lsock = listen_local(128)
        self.port = self.lsock.getsockname()[1]
        self.socks = set()
        self.closed = False
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _default(self, req, sock):
        body = ("%s %s %s %d" % (self.name, req.method, req.path, len(req.body))).encode()
        return simple_response(200, body, [("content-type", "text/plain"), ("x-backend", self.name)])

    def _accept(self):
        while not self.closed:
            try:
                s, _ = self.lsock.accept()
            except OSError:
                return
            with self.lock:
                self.connections += 1
                cid = self.connections
                self.socks.add(s)
            threading.Thread(target=self._serve, args=(s, cid), daemon=True).start()

    def _serve(self, s, cid):
        col = _ReqCollector()
        parser = httptools.HttpRequestParser(col)
        s.settimeout(30)
        try:
            while True:
                try:
                    data = s.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                with self.lock:
                    self.raw += data
                upgraded_rest = None
                try:
                    parser.feed_data(data)
                except httptools.HttpParserUpgrade as u:
                    upgraded_rest = data[u.args[0]:]
                except httptools.HttpParserError:
                    s.sendall(simple_response(400, b"backend: bad request", [("connection", "close")]))
                    return
                while col.done:
                    req = col.done.pop(0)
                    req.method = parser.get_method().decode()
                    req.version = parser.get_http_version()
                    req.conn_id = cid
                    with self.lock:
                        self.requests.append(req)
                    out = self.handler(req, s)
                    if out == "close":
                        return
                    if out == "websocket":
                        if upgraded_rest:
                            s.sendall(upgraded_rest)
                        self._echo(s)
                        return
                    if out:
                        s.sendall(out)
                if upgraded_rest is not None and col.cur is not None and col.cur not in self.requests:
                    # an upgrade request: llhttp stops at the end of its head
                    req = col.cur
                    req.method = parser.get_method().decode()
                    req.path = col._url.decode("latin-1")
                    req.conn_id = cid
                    with self.lock:
                        self.requests.append(req)
                    out = self.handler(req, s)
                    if out == "websocket":
                        if upgraded_rest:
                            s.sendall(upgraded_rest)
                        self._echo(s)
                    return
        except OSError:
            return
        finally:
            with self.lock:
                self.socks.discard(s)
            try:
                s.close()
            except OSError:
                pass

    @staticmethod
    def _echo(s):
        while True:
            try:
                d = s.recv(65536)
            except OSError:
                return
            if not d:
                try:
                    s.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return
            s.sendall(d)

    def close(self):
        self.closed = True
        try:
            self.lsock.close()
        except OSError:
            pass
        with self.lock:
            socks = list(self.socks)
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass


class HoldingBackend(HttpBackend):
    """An HttpBackend that holds each request for ``/hold`` until ``release()`` (10 s at most) and
    answers the others at once: requests in flight on demand."""

    HOLD = b"GET /hold HTTP/1.1\r\nhost: h\r\nconnection: close\r\n\r\n"

    def __init__(self):
        self.released = threading.Event()
        self.clients: list = []
        super().__init__(self._hold)

    def _hold(self, req, sock):
        if req.path == "/hold":
            self.released.wait(10)
        return simple_response(200, b"ok")

    def hold(self, port: int, timeout: float = 5.0) -> None:
        """Send ``GET /hold`` to ``port`` (from a thread) and wait until it is held here (bounded)."""
        t = threading.Thread(target=raw, args=(port, self.HOLD), kwargs={"timeout": 12}, daemon=True)
        t.start()
        self.clients.append(t)
        deadline = time.monotonic() + timeout
        while not any(r.path == "/hold" for r in self.requests) and time.monotonic() < deadline:
            time.sleep(0.02)

    def release(self) -> None:
        """Answer the held requests and wait for their clients (bounded)."""
        self.released.set()
        for t in self.clients:
            t.join(5)

    def close(self):
        self.release()
        super().close()


class TcpBackend(Closing):
    """A threaded TCP server; ``handler(sock)`` runs per connection (default: echo until EOF)."""

    def __init__(self, handler=None):
        self.handler = handler or HttpBackend._echo
        self.lsock = listen_local(64)
        self.port = self.lsock.getsockname()[1]
        self.connections = 0
        self.closed = False
        self.socks = []
        self.results = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.closed:
            try:
                s, _ = self.lsock.accept()
            except OSError:
                return
            self.connections += 1
            self.socks.append(s)
            threading.Thread(target=self._run, args=(s,), daemon=True).start()

    def _run(self, s):
        try:
            s.settimeout(30)
            r = self.handler(s)
            if r is not None:
                self.results.append(r)
        except OSError:
            pass
        finally:
            try:
                s.close()
            except OSError:
                pass

    def close(self):
        self.closed = True
        self.lsock.close()
        for s in self.socks:
            try:
                s.close()
            except OSError:
                pass


class Nginx(Closing):
    """Debian's nginx serving a directory on 127.0.0.1:<free port> (killed by PID)."""

    def __init__(self, root: str, extra_conf: str = ""):
        self.tmp = tempfile.mkdtemp(prefix="px-nginx-")
        self.port = free_port()
        conf = os.path.join(self.tmp, "nginx.conf")
        with open(conf, "w") as f:
            f.write("""daemon off; worker_processes 1; error_log %(t)s/error.log warn; pid %(t)s/nginx.pid;
events { worker_connections 1024; }
http { access_log off; client_body_temp_path %(t)s/body; proxy_temp_path %(t)s/proxy;
  fastcgi_temp_path %(t)s/fcgi; uwsgi_temp_path %(t)s/uwsgi; scgi_temp_path %(t)s/scgi;
  keepalive_requests 100000;
  server { listen 127.0.0.1:%(p)d; root %(r)s; %(x)s
    location = /echo-len { client_max_body_size 64m; return 200 "$content_length"; } } }
""" % {"t": self.tmp, "p": self.port, "r": root, "x": extra_conf})
        self.proc = subprocess.Popen([NGINX, "-c", conf, "-p", self.tmp], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not _can_connect(self.port):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.close()
                raise RuntimeError("nginx did not start")
            time.sleep(0.02)

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        shutil.rmtree(self.tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------- clients

def request(port: int, method: str = "GET", path: str = "/", body=None, headers=None,
            timeout: float = 5.0, host: str = "example.com"):
    """One request on a fresh connection with http.client: (status, headers dict (lower), body)."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        hs = {"Host": host}
        hs.update(headers or {})
        c.request(method, path, body=body, headers=hs)
        r = c.getresponse()
        data = r.read()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, data
    finally:
        c.close()


def health_flags(admin_port: int) -> dict:
    """``(cluster, host) -> health_flags`` from the text ``/clusters`` of the admin on ``admin_port``."""
    _, _, body = request(admin_port, "GET", "/clusters")
    out = {}
    for line in body.decode().splitlines():
        parts = line.split("::")
        if len(parts) == 4 and parts[2] == "health_flags":
            out[(parts[0], parts[1])] = parts[3]
    return out


def recv_until(s: socket.socket, timeout: float, done=None, buf: bytes = b"", resets: bool = False):
    """Read from ``s`` (after ``buf``, bytes already read) until the peer closes, ``timeout`` seconds
    pass or ``done(bytes read)`` holds (checked before each read). Returns (bytes, how it ended:
    "eof", "reset" or None while open). A reset raises ConnectionResetError unless ``resets``.
    The socket's own timeout is left as it was."""
    old = s.gettimeout()
    end = time.monotonic() + timeout
    try:
        while (done is None or not done(buf)) and time.monotonic() < end:
            s.settimeout(max(0.01, end - time.monotonic()))
            try:
                d = s.recv(65536)
            except socket.timeout:
                break
            except ConnectionResetError:
                if not resets:
                    raise
                return buf, "reset"
            if not d:
                return buf, "eof"
            buf += d
        return buf, None
    finally:
        s.settimeout(old)


def until_close(port: int, data: bytes, timeout: float = 5.0, resets: bool = False, source: str | None = None) -> bytes:
    """Send ``data`` on a new connection (from ``source``, an address of this host, if given) and
    read until the peer closes it: everything read. A peer that has not closed within ``timeout``
    seconds (socket.timeout) or resets the connection (ConnectionResetError; unless ``resets``: a
    close) is an error."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                 source_address=(source, 0) if source else None)
    try:
        s.sendall(data)
        buf, how = recv_until(s, timeout, resets=resets)
        if how is None:
            raise socket.timeout("the peer did not close within %.1f s (read %r)" % (timeout, buf[:200]))
        return buf
    finally:
        s.close()


def get_close(path: str) -> bytes:
    """A GET of ``path`` that asks the proxy to close the connection after the response."""
    return ("GET %s HTTP/1.1\r\nHost: x\r\nconnection: close\r\n\r\n" % path).encode()


def recv_settled(s: socket.socket, timeout: float, done, settle: float, buf: bytes = b""):
    """Read from ``s`` until the peer closes, or ``done(bytes read)`` holds and ``settle`` seconds
    then pass with nothing more (late bytes are read too: an extra response, a close), or
    ``timeout`` passes. Returns (bytes, how it ended: "eof", "reset" or None while open)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ok = done(buf)
        s.settimeout(settle if ok else max(0.01, deadline - time.monotonic()))
        try:
            d = s.recv(65536)
        except socket.timeout:
            if ok:
                break
            continue
        except ConnectionResetError:
            return buf, "reset"
        if not d:
            return buf, "eof"
        buf += d
    return buf, None


def head_done(buf: bytes) -> bool:
    """``recv_until``'s ``done`` for an HTTP/1 head: the blank line is there."""
    return b"\r\n\r\n" in buf


def raw(port: int, data: bytes, timeout: float = 3.0, shut_write: bool = False, until_close: bool = True,
        settle: float = 0.0) -> bytes:
    """Send raw bytes; read until the server closes (or the timeout). Returns everything read."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        s.sendall(data)
        if shut_write:
            s.shutdown(socket.SHUT_WR)
        out = bytearray()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                d = s.recv(65536)
            except socket.timeout:
                break
            except ConnectionResetError:
                break
            if not d:
                break
            out += d
            if not until_close and settle:
                s.settimeout(settle)
                try:
                    d = s.recv(65536)
                except socket.timeout:
                    break
                if not d:
                    break
                out += d
        return bytes(out)
    finally:
        s.close()


def exchange(port: int, data: bytes, n: int = 1, timeout: float = 3.0, methods=None,
             settle: float = 0.3, chunks=None):
    """Send ``data`` (or the byte strings in ``chunks``, one write each), read until ``n`` complete
    responses arrived (or the peer closed). Returns (responses, closed, raw_bytes)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        for c in (chunks if chunks is not None else [data]):
            try:
                s.sendall(c)
            except (BrokenPipeError, ConnectionResetError):
                break  # the peer gave up on us; read what it said
        def done(buf):
            try:
                rs = parse_responses(buf, methods)
            except (ValueError, IndexError):
                return False
            return len([r for r in rs if r.status >= 200 or r.status == 101]) >= n

        buf, how = recv_settled(s, timeout, done, settle)
        try:
            rs = parse_responses(buf, methods)
        except (ValueError, IndexError):
            rs = []
        return rs, how is not None, buf
    finally:
        s.close()


def one_response(port: int, req: bytes, method: str, timeout: float = 5.0):
    """Send one request ``req`` on a new connection and read its final response (a 1xx is read
    past); then whether the proxy closes the connection within 0.2 s. Returns ``(bytes read,
    closed)``; AssertionError when no complete response came within ``timeout``."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        s.sendall(req)
        buf = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                rs = parse_responses(buf, [method])
                if rs and rs[0].status >= 200:
                    # complete: see whether the proxy closes (it must, or must not, the same way)
                    s.settimeout(0.2)
                    try:
                        more = s.recv(65536)
                        closed = not more
                        buf += more
                    except socket.timeout:
                        closed = False
                    return buf, closed
            except (ValueError, IndexError):
                pass
            s.settimeout(max(0.01, deadline - time.monotonic()))
            d = s.recv(65536)
            if not d:
                return buf, True
            buf += d
        raise AssertionError("no complete response to %r: %r" % (req.split(b"\r\n", 1)[0], buf))
    finally:
        s.close()


def read_head(s: socket.socket):
    """Read until the end of an HTTP head: ``(head without the blank line, the bytes after it)``,
    or None if the peer closed first (the socket's timeout bounds each read)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        d = s.recv(4096)
        if not d:
            return None
        buf += d
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head, rest


def closed_by_peer(s: socket.socket, timeout: float = 3.0) -> bool:
    """True if the peer closes ``s`` (EOF or reset) within the timeout (data is drained)."""
    s.settimeout(timeout)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            d = s.recv(65536)
            if not d:
                return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False
    return False


class Response:
    __slots__ = ("status", "headers", "body", "reason")

    def __init__(self, status, reason, headers, body):
        self.status = status
        self.reason = reason
        self.headers = headers
        self.body = body

    def header(self, name, default=None):
        for k, v in self.headers:
            if k == name:
                return v
        return default

    def __repr__(self):
        return "<%d %r %r>" % (self.status, self.headers, self.body[:80])


def parse_responses(data: bytes, methods=None):
    """Split a byte stream into HTTP/1.1 responses (content-length, chunked, or to the end).
    ``methods`` lists the request methods in order (HEAD responses have no body)."""
    out = []
    i = 0
    n = 0
    methods = list(methods or [])
    while i < len(data):
        end = data.find(b"\r\n\r\n", i)
        if end < 0:
            raise ValueError("truncated response head at %d: %r" % (i, data[i:i + 200]))
        head = data[i:end].decode("latin-1").split("\r\n")
        _, code, reason = (head[0].split(" ", 2) + [""])[:3]
        hdrs = []
        for line in head[1:]:
            k, _, v = line.partition(":")
            hdrs.append((k.strip().lower(), v.strip()))
        status = int(code)
        i = end + 4
        method = methods[n] if n < len(methods) else "GET"
        h = dict(hdrs)
        if status < 200 and status != 101:
            out.append(Response(status, reason, hdrs, b""))
            continue
        n += 1
        if method == "HEAD" or status in (204, 304) or status == 101:
            body = b""
        elif "content-length" in h:
            ln = int(h["content-length"])
            body = data[i:i + ln]
            if len(body) < ln:
                raise ValueError("truncated body")
            i += ln
        elif h.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while True:
                le = data.index(b"\r\n", i)
                size = int(data[i:le].split(b";")[0], 16)
                i = le + 2
                if size == 0:
                    te = data.index(b"\r\n\r\n", i - 2)
                    i = te + 4
                    break
                parts.append(data[i:i + size])
                i += size + 2
            body = b"".join(parts)
        else:
            body = data[i:]
            i = len(data)
        out.append(Response(status, reason, hdrs, body))
    return out
