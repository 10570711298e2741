"""Helpers for the xDS client and control plane tests: resources, handlers, processes, waiting."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

import grpc
from envoy.config.core.v3 import base_pb2

from pyproxy.config.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(coro, timeout: float = 20.0):
    """Run a coroutine on a fresh loop with an overall deadline."""
    async def bounded():
        return await asyncio.wait_for(coro, timeout)
    return asyncio.run(bounded())


async def wait_until(cond, timeout: float = 5.0, what: str = "condition", interval: float = 0.01):
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for %s" % what)
        await asyncio.sleep(interval)


def node(node_id: str = "sidecar~10.0.0.1~pod.ns~ns.svc.cluster.local") -> base_pb2.Node:
    n = base_pb2.Node(id=node_id, cluster="test", user_agent_name="pyproxy")
    n.metadata.fields["ISTIO_VERSION"].string_value = "1.0"
    return n


# ------------------------------------------------------------------ resources (file format dicts)

def cluster(name: str) -> dict:
    return {"@type": "Cluster", "name": name, "type": "EDS", "connect_timeout": "1s",
            "eds_cluster_config": {"eds_config": {"ads": {}, "resource_api_version": "V3"}}}


def endpoints(name: str, *ports: int) -> dict:
    return {"@type": "ClusterLoadAssignment", "cluster_name": name,
            "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1",
                                                             "port_value": p}}}}
                for p in ports]}]}


def listener(name: str, port: int, route: str) -> dict:
    return {
        "@type": "Listener", "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network."
                         "http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": name,
                "rds": {"route_config_name": route,
                        "config_source": {"ads": {}, "resource_api_version": "V3"}},
                "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
            }}]}],
    }


def route(name: str, cluster_name: str, prefix: str = "/") -> dict:
    return {"@type": "RouteConfiguration", "name": name, "virtual_hosts": [{
        "name": "all", "domains": ["*"],
        "routes": [{"match": {"prefix": prefix}, "route": {"cluster": cluster_name}}]}]}


def write_json(path: str, obj) -> None:
    """Atomic write (temp file + rename) so the poller never sees half a file."""
    tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


# ------------------------------------------------------------------ handler

class RecordingHandler:
    """An XdsHandler that records every call; ``reject`` decides which responses to NACK."""

    def __init__(self, reject=None, on_call=None):
        self.calls: list[tuple] = []          # (type_url, version, {name: msg}, removed, sotw)
        self.states: list[bool] = []
        self.reject = reject                  # callable(type_url, added) -> str | None
        self.on_call = on_call                # callable(type_url, added, removed) (e.g. subscribe)
        self.state: dict[str, dict] = {}      # type_url -> {name: msg} as applied

    def on_resources(self, type_url, version_info, added, removed, sotw):
        if self.reject is not None:
            why = self.reject(type_url, added)
            if why:
                raise ConfigError(why)
        self.calls.append((type_url, version_info, dict(added), set(removed), sotw))
        st = self.state.setdefault(type_url, {})
        if sotw and removed is not None:
            for n in removed:
                st.pop(n, None)
        else:
            for n in removed:
                st.pop(n, None)
        st.update(added)
        if self.on_call is not None:
            self.on_call(type_url, added, removed)

    def on_connection_state(self, connected):
        self.states.append(connected)

    def calls_for(self, type_url):
        return [c for c in self.calls if c[0] == type_url]

    def names(self, type_url) -> set:
        return set(self.state.get(type_url, {}))


# ------------------------------------------------------------------ control plane subprocess

class ControlPlaneProcess:
    """``python3 -m pyproxy.control_plane`` as a child process, killed by PID."""

    def __init__(self, config_dir: str, status_file: str, port: int | None = 0,
                 uds: str | None = None, poll_interval: float = 0.05):
        self.args = [sys.executable, "-m", "pyproxy.control_plane", "--config-dir", config_dir,
                     "--status-file", status_file, "--poll-interval", str(poll_interval),
                     "--log-level", "warning"]
        if port is not None:
            self.args += ["--port", str(port)]
        if uds:
            self.args += ["--uds", uds]
        self.status_file = status_file
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None

    def start(self, timeout: float = 10.0) -> "ControlPlaneProcess":
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.log_path = self.status_file + ".log"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=log,
                                         env=env, cwd=ROOT, text=True)
        deadline = time.monotonic() + timeout
        import selectors
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        try:
            while time.monotonic() < deadline:
                if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
                    continue
                line = self.proc.stdout.readline()
                if not line:
                    break
                if line.startswith("listening"):
                    port = line.split("port=")[1].split()[0]
                    self.port = int(port) if port != "None" else None
                    return self
        finally:
            sel.close()
        self.kill()
        raise AssertionError("control plane did not start: %s" % self.stderr_text())

    def stderr_text(self) -> str:
        try:
            with open(self.log_path) as f:
                return f.read()[-4000:]
        except OSError:
            return ""

    def status(self) -> dict:
        try:
            with open(self.status_file) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def kill(self) -> None:
        p = self.proc
        if p is None:
            return
        if p.poll() is None:
            p.kill()           # by PID: this object's own child
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        try:
            p.stdout.close()
        except Exception:
            pass
        self.proc = None


class AdsScript:
    """The stream side of an ADS server whose responses a test writes by hand (SotW or delta):
    each stream's requests are recorded as (stream id, request); the items put on ``out`` are
    written in order, ``"abort"`` ending the stream with UNAVAILABLE and ``"end"`` with OK (the
    client sees EOF)."""

    def __init__(self):
        self.requests: list = []     # (stream id, request)
        self.streams = 0
        self.out: asyncio.Queue | None = None

    async def StreamAggregatedResources(self, request_iterator, context):
        await self._serve(context)

    async def DeltaAggregatedResources(self, request_iterator, context):
        await self._serve(context)

    async def _serve(self, context):
        self.streams += 1
        sid = self.streams
        q = self.out = asyncio.Queue()

        async def reader():
            while True:
                r = await context.read()
                if r is grpc.aio.EOF:
                    return
                self.requests.append((sid, r))
        rt = asyncio.get_running_loop().create_task(reader())
        try:
            while True:
                item = await q.get()
                if item == "abort":
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "going away")
                if item == "end":
                    return
                await context.write(item)
        finally:
            rt.cancel()

    def reqs(self, type_url=None, stream=None):
        return [r for s, r in list(self.requests)
                if (type_url is None or r.type_url == type_url) and (stream is None or s == stream)]
