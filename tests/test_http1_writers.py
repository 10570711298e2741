"""HTTP/1 bytes are written and read by the HTTP/1.1 codec only (pyproxy/http/): the health
checker, the Zipkin collector client and the admin server use its pieces. A source scan fails if a
hand-built HTTP/1 message comes back elsewhere; the bytes these three put on the wire are checked
against Envoy's where Envoy can be observed doing the same thing."""

from __future__ import annotations

import ast
import json
import pathlib
import re
import threading
import time

import pytest

from tests.proxy_util import ENVOY, Envoy, Pyproxy, TcpBackend, bootstrap, free_port, raw, request, wait_until

ROOT = pathlib.Path(__file__).resolve().parent.parent / "pyproxy"

# An HTTP/1 start line (request line ending in the version, or a status line) or a header line
# ("name: value" followed by CRLF, or its %-template), in a str or bytes constant.
_START = re.compile(r"HTTP/1\.[01](\r\n| \d| %)")
_HEADER_LINE = re.compile(r"(^|\n)[A-Za-z0-9%-]+: [^\r\n]*\r\n")

# pyproxy/examples/backend.py is the example's stand-in application (the upstream a demo mesh
# calls), not a part of the proxy: it speaks HTTP/1 as any application may.
_EXEMPT = {ROOT / "examples" / "backend.py"}


def _docstrings(tree) -> set:
    out = set()
    for n in ast.walk(tree):
        if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and n.body:
            first = n.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def raw_http1_writers(root: pathlib.Path = ROOT, exempt=_EXEMPT) -> list:
    """``(file, line, what)`` for every HTTP/1 message piece or httptools import outside the
    codec's package (pyproxy/http/)."""
    found = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root)
        if rel.parts[0] == "http" or p in exempt:
            continue
        tree = ast.parse(p.read_text(), str(p))
        docs = _docstrings(tree)
        for n in ast.walk(tree):
            if isinstance(n, ast.Constant) and isinstance(n.value, (str, bytes)) and id(n) not in docs:
                v = n.value if isinstance(n.value, str) else n.value.decode("latin-1")
                if _START.search(v) or _HEADER_LINE.search(v):
                    found.append((str(rel), n.lineno, v[:60]))
            elif isinstance(n, ast.Import) and any(a.name.split(".")[0] == "httptools" for a in n.names):
                found.append((str(rel), n.lineno, "import httptools"))
            elif isinstance(n, ast.ImportFrom) and (n.module or "").split(".")[0] == "httptools":
                found.append((str(rel), n.lineno, "from httptools import"))
    return found


def test_no_raw_http1_writer_outside_the_codec():
    assert raw_http1_writers() == []


def test_the_scan_finds_what_it_forbids(tmp_path):
    """The three writers this replaced, as they were written: each is found."""
    (tmp_path / "admin.py").write_text(
        'def w(t, s, n):\n    t.write(b"HTTP/1.1 %d %s\\r\\n" % (s, b"OK"))\n'
        '    t.write(b"content-length: %d\\r\\nconnection: close\\r\\n\\r\\n" % n)\n')
    (tmp_path / "hc.py").write_text(
        'import httptools\n'
        'def h(m, p, host):\n    return "%s %s HTTP/1.1\\r\\nhost: %s\\r\\nuser-agent: Envoy/HC\\r\\n" % (m, p, host)\n')
    (tmp_path / "zipkin.py").write_text(
        'def z(e):\n    return ("POST %s HTTP/1.1\\r\\nhost: x\\r\\n" % e).encode()\n')
    (tmp_path / "ok.py").write_text('"""Plain HTTP/1.1, as a docstring says.\n\nGET / HTTP/1.1\\r\\n"""\n'
                                    'V = "HTTP/1.1"\nEOL = b"\\r\\n"\n')
    got = raw_http1_writers(tmp_path, set())
    assert sorted({f for f, _, _ in got}) == ["admin.py", "hc.py", "zipkin.py"], got
    assert ("hc.py", 1, "import httptools") in got


# ---------------------------------------------------------------------------------------------
# What goes on the wire

class Capture(TcpBackend):
    """A raw HTTP/1.1 server that records each request's bytes (head and content-length body) and
    answers ``answer`` to each; a connection is closed by the client, after an answer that says
    ``connection: close``, or at ``close()``. ``connections`` counts the connections."""

    def __init__(self, answer: bytes = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"):
        self.answer = answer
        self.requests: list = []
        self.cond = threading.Condition()
        super().__init__(self._serve)

    def _serve(self, c):
        buf = b""
        while True:
            d = c.recv(65536)
            if not d:
                return
            buf += d
            while b"\r\n\r\n" in buf:
                head, _, rest = buf.partition(b"\r\n\r\n")
                m = re.search(rb"\r\ncontent-length: *(\d+)", head, re.I)
                n = int(m.group(1)) if m else 0
                if len(rest) < n:
                    break
                with self.cond:
                    self.requests.append(head + b"\r\n\r\n" + rest[:n])
                    self.cond.notify_all()
                buf = rest[n:]
                c.sendall(self.answer)
                if b"connection: close" in self.answer.lower():
                    return  # (a close-delimited answer ends here)

    def wait(self, n: int, timeout: float = 10.0) -> list:
        deadline = time.monotonic() + timeout
        with self.cond:
            while len(self.requests) < n and time.monotonic() < deadline:
                self.cond.wait(0.1)
            return list(self.requests)


def _hc_bootstrap(port: int, reuse: bool) -> dict:
    c = {"name": "hc", "type": "STATIC", "connect_timeout": "1s",
         "load_assignment": {"cluster_name": "hc", "endpoints": [{"lb_endpoints": [{"endpoint": {
             "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]},
         "health_checks": [{"timeout": "2s", "interval": "0.3s", "no_traffic_interval": "0.3s", "unhealthy_threshold": 1, "healthy_threshold": 1,
                            "reuse_connection": reuse,
                            "http_health_check": {"path": "/healthz?probe=1", "host": "hc.example",
                                                  "request_headers_to_add": [
                                                      {"header": {"key": "x-probe", "value": "a b"}},
                                                      {"header": {"key": "X-Two", "value": "2"}}]}}]}
    return bootstrap([], [c])


@pytest.mark.parametrize("reuse", [True, False])
def test_health_check_request_bytes_as_envoy(reuse):
    """The HTTP health check's request, byte for byte as Envoy writes it (no ``connection: close``
    without reuse_connection: the old hand-built head added one, Envoy sends none); with
    reuse_connection the checks share one connection, without it each has its own."""
    heads = {}
    for cls in [Pyproxy] + ([Envoy] if ENVOY else []):
        cap = Capture()
        try:
            with cls(_hc_bootstrap(cap.port, reuse)):
                got = cap.wait(3)
            assert len(got) >= 3, (cls.kind, got)
            assert len(set(got)) == 1, got
            heads[cls.kind] = got[0]
            assert (cap.connections == 1) == reuse or not reuse and cap.connections >= 3, (cls.kind, cap.connections)
        finally:
            cap.close()
    assert heads["pyproxy"] == (b"GET /healthz?probe=1 HTTP/1.1\r\nhost: hc.example\r\nuser-agent: Envoy/HC\r\n"
                                b"x-probe: a b\r\nx-two: 2\r\n\r\n")
    if "envoy" in heads:
        assert heads["pyproxy"] == heads["envoy"]


@pytest.mark.parametrize("answer, healthy", [
    # close-delimited body: the answer ends with the connection (llhttp, through the codec)
    (b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nfine", True),
    # an interim 100 before the answer is skipped
    (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", True),
    (b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n", False),
    # a broken answer (two content-lengths) is a network failure, never a pass
    (b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nok", False),
    # a 204 with a body length is a protocol error (as upstream traffic: the codec's rule)
    (b"HTTP/1.1 204 No Content\r\ncontent-length: 5\r\n\r\nhello", False),
])
def test_health_check_answer_read_by_the_codec(answer, healthy):
    cap = Capture(answer)
    try:
        with Pyproxy(_hc_bootstrap(cap.port, True)) as p:
            assert len(cap.wait(2)) >= 2
            wait_until(lambda: sum(p.stats().get("cluster.hc.health_check." + k, 0)
                                   for k in ("success", "failure")) >= 2)
            st = p.stats()
            if healthy:
                assert st.get("cluster.hc.health_check.success", 0) >= 2, st
                assert st.get("cluster.hc.health_check.failure", 0) == 0, st
                assert st.get("cluster.hc.health_check.healthy") == 1
            else:
                assert st.get("cluster.hc.health_check.failure", 0) >= 2, st
                assert st.get("cluster.hc.health_check.success", 0) == 0, st
                assert st.get("cluster.hc.health_check.healthy") == 0
    finally:
        cap.close()


def _zipkin_bootstrap(port, backend, collector) -> dict:
    t = "type.googleapis.com/"
    hcm = {"@type": t + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
           "stat_prefix": "out",
           "tracing": {"random_sampling": {"value": 100}, "provider": {
               "name": "envoy.tracers.zipkin", "typed_config": {
                   "@type": t + "envoy.config.trace.v3.ZipkinConfig", "collector_cluster": "zipkin",
                   "collector_endpoint": "/api/v2/spans", "collector_hostname": "zipkin.example:9411",
                   "collector_endpoint_version": "HTTP_JSON"}}},
           "route_config": {"virtual_hosts": [{"name": "v", "domains": ["*"], "routes": [
               {"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "hi"}}}]}]},
           "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
               "@type": t + "envoy.extensions.filters.http.router.v3.Router"}}]}
    bs = bootstrap([{"name": "l", "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                     "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                     "typed_config": hcm}]}]}],
                   [{"name": "zipkin", "type": "STATIC", "connect_timeout": "1s", "load_assignment": {
                       "cluster_name": "zipkin", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                           "socket_address": {"address": "127.0.0.1", "port_value": collector}}}}]}]}}])
    return bs


@pytest.mark.parametrize("answer, reported", [
    (b"HTTP/1.1 202 Accepted\r\ncontent-length: 0\r\n\r\n", True),
    (b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\n\r\n", False),
    (b"HTTP/1.1 2xx Bad\r\n\r\n", False),  # not HTTP: parsed by the codec, refused
])
def test_zipkin_post_written_by_the_codec(answer, reported):
    """The collector's request: POST to collector_endpoint with the collector_hostname, a JSON body
    framed by its length (Envoy sends the same lines; it streams the body chunked and adds its
    router's x-envoy-* and x-forwarded-for headers); the answer's status decides reports_sent."""
    cap = Capture(answer)
    port = free_port()
    try:
        with Pyproxy(_zipkin_bootstrap(port, 0, cap.port)) as p:
            st, _, _ = request(port, "GET", "/")
            assert st == 200
            got = cap.wait(1)
            assert got, "no post"
            head, _, body = got[0].partition(b"\r\n\r\n")
            assert head == (b"POST /api/v2/spans HTTP/1.1\r\nhost: zipkin.example:9411\r\n"
                            b"content-type: application/json\r\ncontent-length: %d" % len(body))
            spans = json.loads(body)
            assert len(spans) == 1 and spans[0]["kind"] == "SERVER"
            name = "tracing.zipkin.reports_sent" if reported else "tracing.zipkin.reports_failed"
            wait_until(lambda: p.stats().get(name, 0) >= 1)
            st = p.stats()
            assert st.get(name) == 1, st
            assert st.get("tracing.zipkin.reports_sent" if not reported else "tracing.zipkin.reports_failed", 0) == 0
    finally:
        cap.close()


_DATE = re.compile(rb"date: [^\r]*\r\n")


@pytest.mark.skipif(not ENVOY, reason="envoy not installed")
@pytest.mark.parametrize("data", [
    b"GET /ready HTTP/1.0\r\n\r\n",                       # 426, as Envoy's admin codec
    b"GARBAGE\r\n\r\n",                                   # 400 Bad Request
    b"GET /ready HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    b"GET /ready HTTP/1.1\r\nHo st: x\r\n\r\n",
])
def test_admin_answers_bad_requests_as_envoy(data):
    """The admin server's answers to what its codec refuses are Envoy's admin's, byte for byte."""
    out = {}
    for cls in (Pyproxy, Envoy):
        with cls(bootstrap([], [])) as p:
            out[cls.kind] = _DATE.sub(b"date: D\r\n", raw(p.admin_port, data, timeout=2.0))
    assert out["pyproxy"] == out["envoy"], out
    assert out["pyproxy"].startswith(b"HTTP/1.1 4")
