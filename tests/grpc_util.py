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
import pytest
import yaml

try:
    from proxy_util import free_port  # noqa: F401 (re-exported to the suites)
except ImportError:  # imported as tests.<module>
    from tests.proxy_util import free_port  # noqa: F401


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module", autouse=True, params=["lean", "h2"])
def h2_engines(request):
    """A module that imports this fixture runs every test on both HTTP/2 engines (pyproxy's
    h2engine and the h2 library): the proxies started meanwhile inherit PYPROXY_H2_ENGINE."""
    old = os.environ.get("PYPROXY_H2_ENGINE")
    os.environ["PYPROXY_H2_ENGINE"] = request.param
    try:
        yield request.param
    finally:
        if old is None:
            os.environ.pop("PYPROXY_H2_ENGINE", None)
        else:
            os.environ["PYPROXY_H2_ENGINE"] = old


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


# -- a raw HTTP/2 client (h2 library over a blocking socket) ------------------------------------


class H2Raw:
    """Just enough of an HTTP/2 client to look at frames: events until a condition, bounded."""

    def __init__(self, port: int, window: int | None = None, rcvbuf: int | None = None):
        import h2.config
        import h2.connection
        self.sock = socket.socket()
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.connect(("127.0.0.1", port))
        self.sock.settimeout(5)
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.h2.initiate_connection()
        if window:
            from h2.settings import SettingCodes
            self.h2.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: window})
        self.flush()
        self.events = []
        self.closed = False

    def flush(self):
        d = self.h2.data_to_send()
        if d:
            self.sock.sendall(d)

    def request(self, path, method="GET", headers=(), body=None, end=True):
        sid = self.h2.get_next_available_stream_id()
        h = [(":method", method), (":path", path), (":scheme", "http"), (":authority", "test")] + list(headers)
        self.h2.send_headers(sid, h, end_stream=end and body is None)
        if body is not None:
            self.h2.send_data(sid, body, end_stream=end)
        self.flush()
        return sid

    def read_events(self, until, timeout=5.0, ack=True, quiet=False):
        """Read until ``until(events)`` is true (or the peer closes); returns all events so far."""
        import h2.events
        import h2.exceptions
        end = time.monotonic() + timeout
        while not until(self.events) and not self.closed:
            if time.monotonic() > end:
                if quiet:
                    break
                raise TimeoutError("no matching events; got %r" % self.events[-5:])
            self.sock.settimeout(max(0.01, end - time.monotonic()))
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except ConnectionResetError:
                self.closed = True
                break
            if not data:
                self.closed = True
                break
            try:
                evs = self.h2.receive_data(data)
            except h2.exceptions.ProtocolError:
                self.closed = True
                break
            for e in evs:
                if ack and isinstance(e, h2.events.DataReceived) and e.flow_controlled_length:
                    self.h2.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
            self.events.extend(evs)
            try:
                self.flush()
            except OSError:
                self.closed = True
        return self.events

    def response(self, sid, timeout=5.0):
        """(headers, body, trailers, reset_code) of stream ``sid``."""
        import h2.events as E

        def done(evs):
            return any((isinstance(e, (E.StreamEnded, E.StreamReset)) and e.stream_id == sid)
                       or isinstance(e, E.ConnectionTerminated) for e in evs)
        evs = self.read_events(done, timeout)
        headers, body, trailers, reset = None, b"", None, None
        for e in evs:
            if getattr(e, "stream_id", None) != sid:
                continue
            if isinstance(e, E.ResponseReceived):
                headers = dict(e.headers)
            elif isinstance(e, E.DataReceived):
                body += e.data
            elif isinstance(e, E.TrailersReceived):
                trailers = dict(e.headers)
            elif isinstance(e, E.StreamReset):
                reset = e.error_code
        return headers, body, trailers, reset

    def goaway(self):
        import h2.events as E
        for e in self.events:
            if isinstance(e, E.ConnectionTerminated):
                return e
        return None

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def grpc_frame(msg: bytes) -> bytes:
    return b"\x00" + len(msg).to_bytes(4, "big") + msg


class RawH2:
    """Raw frames in and out (hyperframe/hpack), no client state machine: for attack tests."""

    PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

    def __init__(self, port: int, rcvbuf: int | None = None):
        from hpack import Decoder, Encoder
        from hyperframe.frame import SettingsFrame
        self.sock = socket.socket()
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.connect(("127.0.0.1", port))
        self.enc = Encoder()
        self.dec = Decoder()
        self.buf = b""
        self.frames = []
        self.closed = False
        self.sock.sendall(self.PREFACE + SettingsFrame(0).serialize())

    def headers_block(self, path="/index.html", extra=()):
        return self.enc.encode([(":method", "GET"), (":path", path), (":scheme", "http"),
                                (":authority", "t")] + list(extra))

    def headers(self, sid, path="/index.html", end_stream=True, end_headers=True, extra=()):
        from hyperframe.frame import HeadersFrame
        f = HeadersFrame(sid)
        f.data = self.headers_block(path, extra)
        f.flags = set()
        if end_headers:
            f.flags.add("END_HEADERS")
        if end_stream:
            f.flags.add("END_STREAM")
        return f.serialize()

    def send(self, data: bytes) -> bool:
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            return False

    def read(self, until, timeout=3.0):
        """Parse frames until ``until(frames)`` or close/timeout; returns the frames."""
        from hyperframe.frame import Frame
        end = time.monotonic() + timeout
        while not self.closed and not until(self.frames):
            left = end - time.monotonic()
            if left <= 0:
                break
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(1 << 16)
            except socket.timeout:
                break
            except OSError:
                self.closed = True
                break
            if not data:
                self.closed = True
                break
            self.buf += data
            while len(self.buf) >= 9:
                f, length = Frame.parse_frame_header(memoryview(self.buf[:9]))
                if len(self.buf) < 9 + length:
                    break
                f.parse_body(memoryview(self.buf[9:9 + length]))
                self.buf = self.buf[9 + length:]
                self.frames.append(f)
        return self.frames

    def goaway(self):
        for f in self.frames:
            if f.type == 0x7:
                return f
        return None

    def resets(self):
        return [(f.stream_id, f.error_code) for f in self.frames if f.type == 0x3]

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass
