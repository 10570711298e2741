"""Helpers for the HTTP/2 and gRPC tests: ports, processes killed by PID, a pyproxy (or Envoy)
process from a bootstrap dict, and a gRPC echo service built with grpcio's generic handlers (raw
bytes, no generated code).

Service ``test.Echo``:
- ``Unary``: echoes the request; a request starting with ``b"status:N:msg"`` aborts with status N;
  ``b"sleep:S"`` sleeps S seconds first; ``b"big:N"`` answers N bytes; ``b"flaky:K"`` fails with
  UNAVAILABLE for the first K calls carrying the same ``x-flaky-key`` metadata;
- ``Collect`` (client streaming): answers the concatenation of all requests;
- ``Spread`` (server streaming): ``b"n:N:S"`` answers N messages of S bytes;
- ``Chat`` (bidi): echoes each message as it comes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent import futures

import grpc
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_port(port: int, timeout: float = 10.0, proc=None) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError("process exited with %s" % proc.returncode)
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError("port %d not listening after %.1fs" % (port, timeout))


def kill(proc) -> None:
    """Stop a process we started, by its PID."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=3)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=3)


def rss_kb(pid: int) -> int:
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


# -- bootstrap builders ------------------------------------------------------------------------


def cluster(name, port, h2=False, h2_opts=None, extra=None):
    c = {"name": name, "connect_timeout": "1s", "type": "STATIC",
         "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
             {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]}}
    if h2:
        c["typed_extension_protocol_options"] = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": h2_opts or {}}}}
    if extra:
        c.update(extra)
    return c


def hcm_listener(name, port, routes, *, codec="AUTO", http2_opts=None, filters=None, hcm_extra=None,
                 buffer_limit=None):
    hcm = {"@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
           "stat_prefix": name, "codec_type": codec,
           "route_config": {"name": name, "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes}]},
           "http_filters": (filters or []) + [{"name": "envoy.filters.http.router", "typed_config": {
               "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}
    if http2_opts is not None:
        hcm["http2_protocol_options"] = http2_opts
    if hcm_extra:
        hcm.update(hcm_extra)
    lst = {"name": name, "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
           "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                           "typed_config": hcm}]}]}
    if buffer_limit:
        lst["per_connection_buffer_limit_bytes"] = buffer_limit
    return lst


GRPC_STATS = {"name": "envoy.filters.http.grpc_stats", "typed_config": {
    "@type": "type.googleapis.com/envoy.extensions.filters.http.grpc_stats.v3.FilterConfig",
    "emit_filter_state": True, "stats_for_all_methods": False}}


def bootstrap(admin_port, listeners, clusters):
    return {"admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
            "static_resources": {"listeners": listeners, "clusters": clusters}}


class Proxy:
    """pyproxy (or Envoy with ``envoy=True``) running a bootstrap, killed by PID on stop()."""

    def __init__(self, bs: dict, tmpdir: str, envoy: bool = False, wait_ports=()):
        self.admin_port = bs["admin"]["address"]["socket_address"]["port_value"]
        path = os.path.join(tmpdir, "envoy.yaml" if envoy else "pyproxy.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(bs, f)
        self.log = open(os.path.join(tmpdir, "envoy.log" if envoy else "pyproxy.log"), "w+")
        if envoy:
            cmd = [shutil.which("envoy"), "-c", path, "--concurrency", "1", "-l", "error",
                   "--base-id", str(admin_port_base(self.admin_port))]
        else:
            cmd = [sys.executable, "-m", "pyproxy", "-c", path, "-l", "warning"]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            wait_port(self.admin_port, 15, self.proc)
            for p in wait_ports:
                wait_port(p, 10, self.proc)
        except Exception:
            self.stop()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stats(self) -> dict:
        with urllib.request.urlopen("http://127.0.0.1:%d/stats?format=json" % self.admin_port, timeout=5) as r:
            data = json.loads(r.read())
        out = {}
        for s in data.get("stats", []):
            if "name" in s:
                out[s["name"]] = s.get("value")
        return out

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> None:
        kill(self.proc)
        self.log.close()


def admin_port_base(port: int) -> int:
    return port % 10000 + 1000


# -- gRPC echo service ---------------------------------------------------------------------------

_flaky = {}
_flaky_lock = threading.Lock()


def _unary(req: bytes, ctx):
    if req.startswith(b"status:"):
        _, code, msg = req.decode().split(":", 2)
        ctx.abort(grpc.StatusCode(_code(int(code))), msg)
    if req.startswith(b"sleep:"):
        t = float(req.decode().split(":")[1])
        end = time.monotonic() + t
        while time.monotonic() < end and ctx.is_active():
            time.sleep(0.02)
        return b"slept"
    if req.startswith(b"big:"):
        return b"x" * int(req.decode().split(":")[1])
    if req.startswith(b"flaky:"):
        key = dict(ctx.invocation_metadata()).get("x-flaky-key", "")
        with _flaky_lock:
            n = _flaky[key] = _flaky.get(key, 0) + 1
        if n <= int(req.decode().split(":")[1]):
            ctx.abort(grpc.StatusCode.UNAVAILABLE, "try again (%d)" % n)
        return b"ok after %d" % n
    ctx.set_trailing_metadata((("x-trailer", "t1"),))
    return req


def flaky_count(key: str) -> int:
    with _flaky_lock:
        return _flaky.get(key, 0)


def _code(n: int):
    for c in grpc.StatusCode:
        if c.value[0] == n:
            return c.value
    raise ValueError(n)


def _collect(it, ctx):
    return b"".join(it)


def _spread(req, ctx):
    _, n, size = req.decode().split(":")
    for i in range(int(n)):
        yield bytes([65 + i % 26]) * int(size)


def _chat(it, ctx):
    for m in it:
        yield m


def start_grpc_server(port: int = 0, max_msg: int = 64 * 1024 * 1024):
    """A threaded grpcio server with ``test.Echo``; returns (server, port)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16),
                         options=[("grpc.max_receive_message_length", max_msg),
                                  ("grpc.max_send_message_length", max_msg)])
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(_unary),
        "Collect": grpc.stream_unary_rpc_method_handler(_collect),
        "Spread": grpc.unary_stream_rpc_method_handler(_spread),
        "Chat": grpc.stream_stream_rpc_method_handler(_chat),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Echo", handlers),))
    port = server.add_insecure_port("127.0.0.1:%d" % port)
    server.start()
    return server, port


def channel(port: int, max_msg: int = 64 * 1024 * 1024):
    return grpc.insecure_channel("127.0.0.1:%d" % port,
                                 options=[("grpc.max_receive_message_length", max_msg),
                                          ("grpc.max_send_message_length", max_msg),
                                          ("grpc.enable_retries", 0)])
