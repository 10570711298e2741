"""Helpers for the end-to-end xDS tests (no tests here): a real pyproxy process, real backends,
an ADS server on its own thread (the project's control plane, in-process or as a process, or a
scripted test-local one), and bounded waits. Everything started is stopped by PID / handle."""

from __future__ import annotations

import asyncio
import http.client
import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import grpc
import pytest
from envoy.service.discovery.v3 import discovery_pb2

try:
    from proxy_util import free_port, kill_process  # noqa: F401 (free_port: re-exported to the suites)
    from xds_util import AdsScript
except ImportError:  # imported as tests.<module>
    from tests.proxy_util import free_port, kill_process  # noqa: F401
    from tests.xds_util import AdsScript
from pyproxy.control_plane import ControlPlane

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENVOY = shutil.which("envoy")

CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"


def wait_for(cond, timeout=8.0, what="condition", interval=0.02):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = cond()
        except Exception as e:  # noqa: BLE001 - keep polling; reported on timeout
            last = e
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError("timed out waiting for %s (last: %r)" % (what, last))


def short_tmpdir() -> str:
    """unix socket paths must stay under 108 bytes: a short directory in /tmp."""
    return tempfile.mkdtemp(prefix="xe-", dir="/tmp")


# ------------------------------------------------------------------ resources (control plane format)

def eds_cluster(name, timeout=None):
    src = {"ads": {}, "resource_api_version": "V3"}
    if timeout is not None:
        src["initial_fetch_timeout"] = timeout
    return {"@type": "Cluster", "name": name, "type": "EDS", "connect_timeout": "1s",
            "eds_cluster_config": {"eds_config": src}}


def cla(name, *ports):
    return {"@type": "ClusterLoadAssignment", "cluster_name": name,
            "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}}
                for p in ports]}]}


def hcm(stat_prefix, rds=None, route_config=None, rds_timeout=None):
    cfg = {"@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager."
                    "v3.HttpConnectionManager",
           "stat_prefix": stat_prefix,
           "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
               "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}
    if rds is not None:
        src = {"ads": {}, "resource_api_version": "V3"}
        if rds_timeout is not None:
            src["initial_fetch_timeout"] = rds_timeout
        cfg["rds"] = {"route_config_name": rds, "config_source": src}
    else:
        cfg["route_config"] = route_config
    return {"name": "envoy.filters.network.http_connection_manager", "typed_config": cfg}


def http_listener(name, port, rds=None, route_config=None, rds_timeout=None, stat_prefix=None):
    return {"@type": "Listener", "name": name,
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [{"filters": [hcm(stat_prefix or name, rds, route_config, rds_timeout)]}]}


def route_config(name, *routes, vh="all"):
    """routes: (prefix, cluster) pairs."""
    rc = {"name": name, "virtual_hosts": [{
        "name": vh, "domains": ["*"],
        "routes": [{"match": {"prefix": p}, "route": {"cluster": c}} for p, c in routes]}]}
    return rc


def rds_route(name, *routes):
    return dict(route_config(name, *routes), **{"@type": "RouteConfiguration"})


# ------------------------------------------------------------------ backends

class Backend:
    """HTTP/1.1 keep-alive server on 127.0.0.1:0 answering ``<name> <path>``; records the peer port
    of every request (to tell upstream connections apart). ``/slow/<secs>`` sleeps first."""

    def __init__(self, name: str):
        self.name = name
        self.peers: list[tuple[int, str]] = []
        backend = self

        class H(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                backend.peers.append((self.client_address[1], self.path))
                if self.path.startswith("/slow/"):
                    time.sleep(float(self.path.split("/")[2]))
                body = ("%s %s" % (backend.name, self.path)).encode()
                self.send_response(200)
                self.send_header("content-length", str(len(body)))
                self.send_header("x-backend", backend.name)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def get(port, path="/", conn=None, timeout=5.0, host="example.com"):
    """One GET; returns (status, body str, headers dict). ``conn`` reuses a keep-alive connection."""
    c = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request("GET", path, headers={"host": host})
        r = c.getresponse()
        body = r.read().decode(errors="replace")
        return r.status, body, {k.lower(): v for k, v in r.getheaders()}
    finally:
        if conn is None:
            c.close()


def try_get(port, path="/", **kw):
    try:
        return get(port, path, **kw)
    except (OSError, http.client.HTTPException) as e:
        return None, repr(e), {}


# ------------------------------------------------------------------ an asyncio loop on a thread

class LoopThread:
    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout=10.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn, *a, timeout=10.0):
        async def c():
            return fn(*a)
        return self.run(c(), timeout)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class InProcessCP:
    """The project's ControlPlane on a LoopThread; ``set(resources)`` pushes a new snapshot."""

    def __init__(self, lt: LoopThread, config_dir: str, uds: str | None = None, tcp: bool = True):
        self.lt = lt
        self.cp = ControlPlane(config_dir, port=0 if tcp else None, uds=uds, poll_interval=5.0)
        lt.run(self.cp.start())

    @property
    def port(self):
        return self.cp.port

    def set(self, resources):
        return self.lt.call(self.cp.set_resources, resources)

    def acks(self, type_url=None):
        return [a for a in list(self.cp.acks) if type_url is None or a["type_url"] == type_url]

    def nacks(self, type_url=None):
        return [a for a in list(self.cp.nacks) if type_url is None or a["type_url"] == type_url]

    def acked_version(self, type_url):
        """Latest version ACKed for a type (SotW: version_info; delta: snapshot version)."""
        a = self.acks(type_url)
        return a[-1]["version"] if a else None

    def wait_acked(self, *type_urls, timeout=8.0):
        v = str(self.cp.version)
        for t in type_urls:
            wait_for(lambda: self.acked_version(t) == v, timeout, "ACK of %s version %s" % (t, v))

    def stop(self):
        self.lt.run(self.cp.stop())


def _ser(item):
    return item if isinstance(item, bytes) else item.SerializeToString()


class ScriptedAds(AdsScript):
    """A test-local ADS server (on a LoopThread) whose responses the test writes by hand; ``bytes``
    items go on the wire as they are (a malformed response)."""

    def __init__(self, lt: LoopThread, uds: str | None = None):
        super().__init__()
        self.lt = lt

        async def start():
            srv = grpc.aio.server()
            handlers = {
                "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(
                    self.StreamAggregatedResources,
                    request_deserializer=discovery_pb2.DiscoveryRequest.FromString,
                    response_serializer=_ser),
                "DeltaAggregatedResources": grpc.stream_stream_rpc_method_handler(
                    self.DeltaAggregatedResources,
                    request_deserializer=discovery_pb2.DeltaDiscoveryRequest.FromString,
                    response_serializer=_ser)}
            srv.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
                "envoy.service.discovery.v3.AggregatedDiscoveryService", handlers),))
            port = srv.add_insecure_port("127.0.0.1:0")
            if uds:
                srv.add_insecure_port("unix:" + uds)
            await srv.start()
            return srv, port
        self.srv, self.port = lt.run(start())

    def send(self, *items):
        def put():
            for it in items:
                self.out.put_nowait(it)
        self.lt.loop.call_soon_threadsafe(put)

    def stop(self):
        self.lt.run(self.srv.stop(None))


# ------------------------------------------------------------------ pyproxy as a process

def bootstrap(api="GRPC", *, port=None, pipe=None, cds_timeout="0s", lds_timeout="0s",
              node_id="sidecar~127.0.0.1~app.ns~ns.svc.cluster.local", static_listeners=()):
    if pipe is not None:
        addr = {"pipe": {"path": pipe}}
    else:
        addr = {"socket_address": {"address": "127.0.0.1", "port_value": port}}
    cds = {"ads": {}, "resource_api_version": "V3"}
    lds = {"ads": {}, "resource_api_version": "V3"}
    if cds_timeout is not None:
        cds["initial_fetch_timeout"] = cds_timeout
    if lds_timeout is not None:
        lds["initial_fetch_timeout"] = lds_timeout
    return {
        "node": {"id": node_id, "cluster": "app.ns", "metadata": {"ISTIO_VERSION": "1.24.0"}},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "dynamic_resources": {
            "ads_config": {"api_type": api, "transport_api_version": "V3",
                           "set_node_on_first_message_only": True,
                           "grpc_services": [{"envoy_grpc": {
                               "cluster_name": "xds-grpc",
                               "retry_policy": {"retry_back_off": {"base_interval": "0.1s",
                                                                   "max_interval": "0.4s"}}}}]},
            "cds_config": cds, "lds_config": lds},
        "static_resources": {
            "listeners": list(static_listeners),
            "clusters": [{
                "name": "xds-grpc", "type": "STATIC", "connect_timeout": "1s",
                "typed_extension_protocol_options": {
                    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                        "explicit_http_config": {"http2_protocol_options": {}}}},
                "load_assignment": {"cluster_name": "xds-grpc", "endpoints": [{"lb_endpoints": [
                    {"endpoint": {"address": addr}}]}]}}]},
    }


class Proxy:
    """``python3 -m pyproxy -c bootstrap.json`` in ``cwd``; killed by PID."""

    def __init__(self, boot: dict, cwd: str, drain_time=2, binary=None, extra=()):
        self.cwd = cwd
        self.boot_path = os.path.join(cwd, "bootstrap.json")
        with open(self.boot_path, "w") as f:
            json.dump(boot, f)
        self.admin_path = os.path.join(cwd, "admin-address")
        if os.path.exists(self.admin_path):
            os.unlink(self.admin_path)
        self.log_path = os.path.join(cwd, "proxy.log")
        cmd = [sys.executable, "-m", "pyproxy"] if binary is None else [binary]
        cmd += ["-c", self.boot_path, "--admin-address-path", self.admin_path,
                "--drain-time-s", str(drain_time), "--drain-strategy", "immediate", "-l", "info",
                "--disable-hot-restart", *extra]
        if binary is not None:
            cmd += ["--use-dynamic-base-id", "--concurrency", "1"]
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=self.log, stderr=self.log)
        try:
            wait_for(lambda: self._admin_port(), 10, "admin address of %s" % cmd[0])
        except AssertionError:
            self.kill()
            raise AssertionError("proxy did not start:\n" + self.log_text())

    def _admin_port(self):
        if self.proc.poll() is not None:
            raise AssertionError("proxy exited with %s:\n%s" % (self.proc.returncode, self.log_text()))
        try:
            with open(self.admin_path) as f:
                t = f.read().strip()
        except OSError:
            return None
        if not t:
            return None
        self.admin_port = int(t.rsplit(":", 1)[1])
        return self.admin_port

    def log_text(self):
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-6000:]
        except OSError:
            return ""

    def admin(self, path, method="GET"):
        req = urllib.request.Request("http://127.0.0.1:%d%s" % (self.admin_port, path), method=method)
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def stats(self, filt=None) -> dict:
        path = "/stats" + ("?filter=" + urllib.request.quote(filt) if filt else "")
        out = {}
        for line in self.admin(path)[1].splitlines():
            k, sep, v = line.partition(": ")
            if sep:
                v = v.strip()
                try:
                    out[k] = int(v)
                except ValueError:
                    out[k] = v
        return out

    def config_dump(self, query="") -> dict:
        return json.loads(self.admin("/config_dump" + query)[1])

    def ready(self) -> str:
        return self.admin("/ready")[1].strip()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self):
        kill_process(self.proc)
        self.log.close()


def dump_section(dump: dict, short: str) -> dict:
    for c in dump["configs"]:
        if c["@type"].endswith("." + short):
            return c
    return {}


def dynamic_names(dump: dict) -> dict:
    """{"clusters": {name: version}, "warming_clusters": ..., "listeners": ..., "warming_listeners":
    ..., "routes": ...} from a /config_dump."""
    cl = dump_section(dump, "ClustersConfigDump")
    ls = dump_section(dump, "ListenersConfigDump")
    rs = dump_section(dump, "RoutesConfigDump")
    out = {
        "clusters": {e["cluster"]["name"]: e.get("version_info") for e in cl.get("dynamic_active_clusters", [])
                     if "cluster" in e},
        "warming_clusters": {e["cluster"]["name"]: e.get("version_info")
                             for e in cl.get("dynamic_warming_clusters", []) if "cluster" in e},
        "listeners": {e["name"]: e["active_state"].get("version_info")
                      for e in ls.get("dynamic_listeners", []) if "active_state" in e},
        "warming_listeners": {e["name"]: e["warming_state"].get("version_info")
                              for e in ls.get("dynamic_listeners", []) if "warming_state" in e},
        "routes": {e["route_config"]["name"]: e.get("version_info")
                   for e in rs.get("dynamic_route_configs", []) if "route_config" in e},
    }
    return out


# ------------------------------------------------------------------ fixture

@pytest.fixture
def env():
    """Backends, a loop thread for the control plane, a short tmp dir; everything torn down."""
    made = {"backends": [], "proxies": [], "cps": []}
    lt = LoopThread()
    tmp = short_tmpdir()

    class Env:
        loop = lt
        dir = tmp

        def backend(self, name):
            b = Backend(name)
            made["backends"].append(b)
            return b

        def cp(self, **kw):
            os.makedirs(os.path.join(tmp, "cfg"), exist_ok=True)
            c = InProcessCP(lt, os.path.join(tmp, "cfg"), **kw)
            made["cps"].append(c)
            return c

        def proxy(self, boot, cwd=None, **kw):
            if cwd:
                os.makedirs(cwd, exist_ok=True)
            p = Proxy(boot, cwd or tmp, **kw)
            made["proxies"].append(p)
            return p
    try:
        yield Env()
    finally:
        for p in made["proxies"]:
            p.kill()
        for c in made["cps"]:
            try:
                c.stop()
            except Exception:
                pass
        for b in made["backends"]:
            b.close()
        lt.close()
        shutil.rmtree(tmp, ignore_errors=True)


def xds_bootstrap(env, cp, api, transport):
    if transport == "uds":
        # relative pipe path resolved against pyproxy's cwd, as Istio's ./etc/istio/proxy/XDS
        return bootstrap(api, pipe="./etc/istio/proxy/XDS")
    return bootstrap(api, port=cp.port)


def make_cp(env, transport):
    if transport == "uds":
        os.makedirs(os.path.join(env.dir, "etc", "istio", "proxy"), exist_ok=True)
        return env.cp(uds=os.path.join(env.dir, "etc", "istio", "proxy", "XDS"), tcp=False)
    return env.cp()


def body(port, path="/"):
    st, b, _ = get(port, path)
    assert st == 200, (st, b)
    return b.split()[0]
