"""The ``grpc-timeout`` header under both route timeout models, side by side with Envoy (review
finding F20). With a ``max_stream_duration`` block on the route (Istio's inbound routes:
``{max_stream_duration: 0s, grpc_timeout_header_max: 0s}``) the header sets the stream's duration
timer: an expired deadline is a DEADLINE_EXCEEDED local reply (``max_duration_timeout``, no
response flag, ``downstream_rq_max_duration_reached``), not an upstream timeout; the route's
``timeout`` is not read; the header the upstream gets says the time the stream has. With the
legacy ``max_grpc_timeout`` (Istio's outbound routes) the header is the router's timeout (UT,
UNAVAILABLE) and is rewritten to what the upstream gets. HTTP/1.1 and HTTP/2 (curl) clients; one
scripted upstream for both proxies; the upstream answers 1.2 s late against 0.3 s deadlines."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time

import pytest

from proxy_util import (ENVOY, Envoy, HttpBackend, Pyproxy, bootstrap, cluster, free_port, head_done,
                        http_listener, recv_until, route, route_config, simple_response, with_fresh_ports)
from log_util import file_access_log, hcm_config, last_log_line

pytestmark = pytest.mark.skipif(not ENVOY, reason="envoy not installed")

LOG_FMT = "%REQ(:PATH)% %RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS%\n"
INBOUND = {"max_stream_duration": "0s", "grpc_timeout_header_max": "0s"}  # (istiod's inbound routes)


def _handler(req, sock):
    m = re.search(r"sleep=([0-9.]+)", req.path)
    if m:
        time.sleep(float(m.group(1)))
    # what the upstream got, in response headers
    return simple_response(200, b"", [("content-type", "application/grpc"), ("grpc-status", "0"),
                                      ("x-got-gt", req.header("grpc-timeout", "none")),
                                      ("x-got-exp", req.header("x-envoy-expected-rq-timeout-ms", "none"))])


def _bs(be_port, log_path):
    rs = [
        route("/in/", "b", timeout="0s", max_stream_duration=INBOUND),
        route("/inoff/", "b", timeout="0s",
              max_stream_duration={"grpc_timeout_header_max": "0s", "grpc_timeout_header_offset": "0.1s"}),
        route("/incap/", "b", max_stream_duration={"grpc_timeout_header_max": "0.3s"}),
        route("/msd/", "b", max_stream_duration={"max_stream_duration": "0.3s"}),
        route("/msd2/", "b", max_stream_duration={"max_stream_duration": "2s"}),
        route("/msd0/", "b", max_stream_duration={"max_stream_duration": "0s"}),
        route("/gmax/", "b", max_stream_duration={"grpc_timeout_header_max": "10s"}),
        route("/rtmsd/", "b", timeout="0.3s", max_stream_duration={}),
        route("/out/", "b", timeout="0s", max_grpc_timeout="0s"),
        route("/outcap/", "b", max_grpc_timeout="0.5s"),
        route("/outoff/", "b", max_grpc_timeout="0s", grpc_timeout_offset="0.1s"),
    ]
    # the second listener's HCM has a max_stream_duration of its own
    bs = bootstrap([http_listener(free_port(), route_config(rs)),
                    http_listener(free_port(), route_config(rs), name="hcmmsd",
                                  common_http_protocol_options={"max_stream_duration": "5s"})],
                   [cluster("b", [be_port])])
    hcm_config(bs)["access_log"] = file_access_log(log_path, LOG_FMT)
    return bs


@pytest.fixture(scope="module")
def pair():
    be = HttpBackend(_handler)
    tmp = tempfile.mkdtemp(prefix="grpc-timeout-")
    procs = {}
    try:
        for name, cls in (("pyproxy", Pyproxy), ("envoy", Envoy)):
            log = os.path.join(tmp, name + ".log")
            open(log, "w").close()
            procs[name] = (cls(with_fresh_ports(_bs(be.port, log)), extra_args=["--file-flush-interval-msec", "100"]),
                           log)
        yield procs
    finally:
        for p, _ in procs.values():
            p.stop()
        be.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _h1(port, path, grpc_timeout=None, grpc=True):
    """(head lower-cased) of a POST over HTTP/1.1."""
    extra = "content-type: application/grpc\r\nte: trailers\r\n" if grpc else ""
    if grpc_timeout:
        extra += "grpc-timeout: %s\r\n" % grpc_timeout
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        s.sendall(("POST %s HTTP/1.1\r\nHost: x\r\n%scontent-length: 5\r\n\r\n" % (path, extra)).encode()
                  + b"\0" * 5)
        buf = recv_until(s, 5, head_done)[0]
    finally:
        s.close()
    return buf.split(b"\r\n\r\n", 1)[0].decode("latin-1").lower()


def _h2(port, path, grpc_timeout):
    cp = subprocess.run(["curl", "-s", "-i", "--http2-prior-knowledge", "--max-time", "5",
                         "-H", "content-type: application/grpc", "-H", "te: trailers",
                         "-H", "grpc-timeout: %s" % grpc_timeout, "--data-binary", "@-",
                         "http://127.0.0.1:%d%s" % (port, path)], input=b"\0" * 5, capture_output=True, timeout=10)
    return cp.stdout.decode("latin-1").lower()


def _hdr(head, name):
    m = re.search(r"^%s: ([^\r\n]*)" % re.escape(name), head, re.M)
    return m.group(1) if m else None


def _counters(p):
    st = p.stats()
    return {k: st.get(k, 0) for k in ("http.ingress.downstream_rq_max_duration_reached",
                                       "cluster.b.upstream_rq_timeout", "cluster.b.upstream_rq_504")}


def _each(pair, fn):
    """fn(proxy, log) for both proxies -> {name: result}."""
    return {name: fn(p, log) for name, (p, log) in pair.items()}


@pytest.mark.parametrize("proto", ["h1", "h2"])
def test_inbound_route_expired_grpc_timeout_is_deadline_exceeded(pair, proto):
    """Istio's inbound route shape: a 300 ms grpc-timeout against an upstream 1.2 s late."""
    if proto == "h2" and not shutil.which("curl"):
        pytest.skip("curl not installed")
    path = "/in/sleep=1.2"

    def run(p, log):
        n0 = len(open(log).read().splitlines())
        c0 = _counters(p)
        t0 = time.monotonic()
        head = _h1(p.port, path, "300m") if proto == "h1" else _h2(p.port, path, "300m")
        took = time.monotonic() - t0
        c1 = _counters(p)
        return (_hdr(head, "grpc-status"), _hdr(head, "grpc-message"), last_log_line(log, path, skip=n0),
                {k: c1[k] - c0[k] for k in c0}, took)

    res = _each(pair, run)
    for name, (status, msg, line, delta, took) in res.items():
        assert status == "4" and msg == "downstream duration timeout", (name, res)
        assert line == path + " 200 - max_duration_timeout", (name, line)
        assert delta == {"http.ingress.downstream_rq_max_duration_reached": 1,
                         "cluster.b.upstream_rq_timeout": 0, "cluster.b.upstream_rq_504": 0}, (name, delta)
        assert took < 1.0, (name, took)
    assert res["pyproxy"][:4] == res["envoy"][:4]


@pytest.mark.parametrize("path,gt", [("/incap/sleep=1.2", "5S"), ("/inoff/sleep=1.2", "400m"),
                                     ("/msd/sleep=1.2", None)])
def test_stream_duration_variants_are_deadline_exceeded(pair, path, gt):
    """The cap (0.3 s under a 5 s header), the offset (400 ms less 100 ms), and a route
    max_stream_duration without a header: the same DEADLINE_EXCEEDED reply on both."""
    def run(p, log):
        n0 = len(open(log).read().splitlines())
        head = _h1(p.port, path, gt)
        return _hdr(head, "grpc-status"), _hdr(head, "grpc-message"), last_log_line(log, path, skip=n0)

    res = _each(pair, run)
    assert res["pyproxy"] == res["envoy"] == ("4", "downstream duration timeout",
                                              path + " 200 - max_duration_timeout"), res


def test_outbound_route_expired_grpc_timeout_stays_upstream_timeout(pair):
    """Istio's outbound route shape (legacy max_grpc_timeout): the router's timeout, UNAVAILABLE, UT."""
    path = "/out/sleep=1.2"

    def run(p, log):
        n0 = len(open(log).read().splitlines())
        head = _h1(p.port, path, "300m")
        line = last_log_line(log, path, skip=n0)
        return _hdr(head, "grpc-status"), _hdr(head, "grpc-message"), line.split()[1:3]

    res = _each(pair, run)
    assert res["pyproxy"] == res["envoy"] == ("14", "upstream request timeout", ["200", "UT"]), res


@pytest.mark.parametrize("path,gt,grpc", [
    ("/in/", "1S", True),           # the stream's time, in Envoy's unit
    ("/in/", "1500001u", True),     # rounded up to whole ms
    ("/in/", "-5m", True),          # malformed: ignored, passed on as it is
    ("/in/", "123456789m", True),   # more than 8 digits: ignored
    ("/inoff/", "2S", True),        # less the offset
    ("/incap/", "5S", True),        # capped
    ("/msd2/", "5S", True),         # the route's max_stream_duration (no header max): its value
    ("/msd2/", None, True),
    ("/msd2/", None, False),        # not gRPC: no header
    ("/out/", "2S", True),          # legacy, no cap: as it is, in Envoy's unit
    ("/outcap/", "2S", True),       # legacy: capped, and announced
    ("/outcap/", None, True),       # legacy without a header: the cap
    ("/outoff/", "300m", True),     # legacy offset
    ("/outoff/", "50m", True),      # legacy offset larger than the header: not applied
    # under the HCM's max_stream_duration (5 s)
    ("hcm/msd0/", "1S", True),      # the route turns the HCM's timer off: the header goes
    ("hcm/gmax/", None, True),      # no header, no route max_stream_duration: the HCM's
    ("hcm/gmax/", "1S", True),
    ("hcm/out/", "1S", True),       # legacy route: the header is the router's business
    ("hcm/msd2/", None, True),
])
def test_grpc_timeout_the_upstream_gets(pair, path, gt, grpc):
    """What the upstream receives in grpc-timeout and x-envoy-expected-rq-timeout-ms."""
    def run(p, log):
        port = p.port
        if path.startswith("hcm/"):
            port = p.ports[1]
        head = _h1(port, path[3:] if path.startswith("hcm/") else path + "sleep=0", gt, grpc)
        return _hdr(head, ":status") or head.split("\r\n")[0], _hdr(head, "x-got-gt"), _hdr(head, "x-got-exp")

    res = _each(pair, run)
    assert res["pyproxy"] == res["envoy"], res


def test_route_timeout_not_read_under_max_stream_duration(pair):
    """A route with a max_stream_duration block has no router timeout: its ``timeout: 0.3s`` is
    not read (the upstream's answer 1 s late goes through on both)."""
    def run(p, log):
        head = _h1(p.port, "/rtmsd/sleep=1.0", None, grpc=False)
        return head.split("\r\n")[0], _hdr(head, "x-got-exp")

    res = _each(pair, run)
    assert res["pyproxy"] == res["envoy"] == ("http/1.1 200 ok", "none"), res
