"""An upstream HTTP/1.1 response that breaks the protocol (more header lines than the cluster's
``common_http_protocol_options.max_headers_count``, Transfer-Encoding with Content-Length, two
Content-Lengths) resets the request with the reason "protocol error": a 502 with response flag
UPE, as Envoy answers. Each case is compared with Envoy."""

from __future__ import annotations

import os

import pytest

from tests.proxy_util import (Envoy, HttpBackend, Pyproxy, bootstrap, cluster, free_port,
                              http_listener, raw, route, route_config, simple_response, wait_until,
                              with_fresh_ports)

MANY = simple_response(200, b"hello", [("x-h%d" % i, "v") for i in range(12)])
RESPONSES = {
    "too-many-headers": MANY,
    "te-and-cl": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"
                  b"a\r\n0123456789\r\n0\r\n\r\n"),
    "two-content-lengths": b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 5\r\n\r\nabcde",
}
FLUSH = ["--file-flush-interval-msec", "100"]
LOG_FORMAT = "flags=%RESPONSE_FLAGS% details=%RESPONSE_CODE_DETAILS%\n"


def _bootstrap(backend_port: int, log_path: str) -> dict:
    cl = cluster("b", [backend_port])
    cl["typed_extension_protocol_options"] = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "common_http_protocol_options": {"max_headers_count": 8},
        "explicit_http_config": {"http_protocol_options": {}}}}
    access_log = [{"name": "envoy.access_loggers.file", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
        "path": log_path, "log_format": {"text_format_source": {"inline_string": LOG_FORMAT}}}}]
    return bootstrap([http_listener(free_port(), route_config([route("/", "b")]), access_log=access_log)], [cl])


def _run(cls, case: str, tmp_path, env=None):
    be = HttpBackend(lambda req, sock: RESPONSES[case])
    log_path = str(tmp_path / ("%s-%s-%s.log" % (cls.__name__, case, "ref" if env else "")))
    try:
        with cls(with_fresh_ports(_bootstrap(be.port, log_path)), extra_args=FLUSH, env=env) as px:
            out = raw(px.port, b"GET / HTTP/1.1\r\nhost: a\r\n\r\n", until_close=False, settle=0.5, timeout=3)
            stats = px.stats()
            wait_until(lambda: os.path.exists(log_path) and os.path.getsize(log_path), 4, 0.1)  # (flushed every 100 ms)
    finally:
        be.close()
    log = open(log_path).read().strip() if os.path.exists(log_path) else ""
    head, _, body = out.partition(b"\r\n\r\n")
    return (head.split(b"\r\n")[0], body, stats.get("cluster.b.upstream_rq_502", 0), log)


@pytest.mark.parametrize("case", sorted(RESPONSES))
def test_upstream_protocol_error_matches_envoy(case, tmp_path):
    got = _run(Pyproxy, case, tmp_path)
    ref = _run(Pyproxy, case, tmp_path, env=dict(os.environ, PYPROXY_REFERENCE="1"))
    want = _run(Envoy, case, tmp_path)
    assert want[0] == b"HTTP/1.1 502 Bad Gateway", want  # (what Envoy answers: the test's premise)
    assert got == want, (got, want)
    assert ref == want, (ref, want)


def test_too_many_response_headers_from_an_http2_upstream_matches_envoy(tmp_path):
    """The cluster's ``max_headers_count`` bounds an HTTP/2 upstream's response heads too: the
    stream is reset, and Envoy reports it as a remote reset (503 UR), not a protocol error."""
    from tests.diff_util import ScriptedH2

    many = [(":status", "200")] + [("x-h%d" % i, "v") for i in range(12)]
    results = []
    for cls in (Pyproxy, Envoy):
        be = ScriptedH2(lambda headers, n: [("headers", many, True)])
        log_path = str(tmp_path / ("h2-%s.log" % cls.__name__))
        bs = _bootstrap(be.port, log_path)
        opts = bs["static_resources"]["clusters"][0]["typed_extension_protocol_options"]
        opts["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]["explicit_http_config"] = {
            "http2_protocol_options": {}}
        try:
            with cls(with_fresh_ports(bs), extra_args=FLUSH) as px:
                out = raw(px.port, b"GET / HTTP/1.1\r\nhost: a\r\n\r\n", until_close=False, settle=0.5, timeout=3)
                stats = px.stats()
                wait_until(lambda: os.path.exists(log_path) and os.path.getsize(log_path), 4, 0.1)
        finally:
            be.close()
        log = open(log_path).read().strip() if os.path.exists(log_path) else ""
        head, _, body = out.partition(b"\r\n\r\n")
        results.append((head.split(b"\r\n")[0], body, stats.get("cluster.b.upstream_rq_502", 0), log))
    got, want = results
    assert want[0] == b"HTTP/1.1 503 Service Unavailable" and b"remote reset" in want[1], want
    assert got == want, (got, want)
