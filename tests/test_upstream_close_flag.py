"""An HTTP/1.1 upstream that closes its connection before answering is a "connection termination" reset: Envoy logs response flag UC
(UpstreamConnectionTermination), not UR, with the same response code details (a close in the
middle of a content-length body is a protocol error: UPE). Each case is
compared with Envoy through a file access log, on both of pyproxy's request paths."""

from __future__ import annotations

import os
import time

import pytest

from tests.proxy_util import (Envoy, HttpBackend, Pyproxy, bootstrap, cluster, free_port,
                              http_listener, raw, route, route_config, wait_until, with_fresh_ports)

FLUSH = ["--file-flush-interval-msec", "100"]
LOG_FORMAT = "code=%RESPONSE_CODE% flags=%RESPONSE_FLAGS% details=%RESPONSE_CODE_DETAILS%\n"


def _close(req, sock):
    return "close"


def _partial(req, sock):
    sock.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")
    time.sleep(0.3)
    return "close"


HANDLERS = {"close-before-answer": _close, "close-mid-body": _partial}


def _run(cls, case, tmp_path, env=None):
    be = HttpBackend(HANDLERS[case])
    log_path = str(tmp_path / ("%s-%s-%s.log" % (cls.__name__, case, "ref" if env else "")))
    access_log = [{"name": "envoy.access_loggers.file", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
        "path": log_path, "log_format": {"text_format_source": {"inline_string": LOG_FORMAT}}}}]
    bs = bootstrap([http_listener(free_port(), route_config([route("/", "b")]), access_log=access_log)],
                   [cluster("b", [be.port])])
    try:
        with cls(with_fresh_ports(bs), extra_args=FLUSH, env=env) as px:
            out = raw(px.port, b"GET / HTTP/1.1\r\nhost: a\r\n\r\n", until_close=False, settle=0.8, timeout=4)
            stats = px.stats()
            wait_until(lambda: os.path.exists(log_path) and os.path.getsize(log_path), 4, 0.1)  # (flushed every 100 ms)
    finally:
        be.close()
    log = open(log_path).read().strip() if os.path.exists(log_path) else ""
    return (out.split(b"\r\n")[0], stats.get("cluster.b.upstream_rq_503", 0), log)


@pytest.mark.parametrize("case", sorted(HANDLERS))
def test_upstream_connection_termination_flag_matches_envoy(case, tmp_path):
    want = _run(Envoy, case, tmp_path)
    # (what Envoy logs, the test's premise: UC before the answer; a body cut short by the close is
    # a protocol error, UPE)
    assert ("flags=UC " if case == "close-before-answer" else "flags=UPE ") in want[2], want
    got = _run(Pyproxy, case, tmp_path)
    assert got == want, (got, want)
    ref = _run(Pyproxy, case, tmp_path, env=dict(os.environ, PYPROXY_REFERENCE="1"))
    assert ref == want, (ref, want)
