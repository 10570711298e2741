"""The retry buffer of an HTTP/2 downstream stream is the stream's flow-control window (16 MiB by
default), not the listener's 1 MiB buffer limit, side by side with Envoy (review finding F47): a
POST of 1 MiB + 1 KiB (retry_on 5xx; the upstream answers 503 to the first attempt) is retried from an
HTTP/2 client and not from an HTTP/1.1 one, on both proxies. curl clients; one upstream per proxy."""

from __future__ import annotations

import collections
import shutil
import subprocess
import threading

import pytest

from proxy_util import (ENVOY, Envoy, HttpBackend, Pyproxy, bootstrap, cluster, free_port, http_listener, route,
                        route_config, simple_response, with_fresh_ports)

pytestmark = [pytest.mark.skipif(not ENVOY, reason="envoy not installed"),
              pytest.mark.skipif(not shutil.which("curl"), reason="curl not installed")]
SIZE = 1049600


def test_h2_stream_retries_a_body_above_the_listener_limit():
    out = {}
    for name, cls in (("pyproxy", Pyproxy), ("envoy", Envoy)):
        lock = threading.Lock()
        seen = collections.defaultdict(list)

        def handler(req, sock):
            with lock:
                seen[req.path].append(len(req.body))
                n = len(seen[req.path])
            return simple_response(503 if n == 1 else 200, b"r%d" % n)

        be = HttpBackend(handler)
        try:
            bs = bootstrap([http_listener(free_port(), route_config([route("/", "b", timeout="10s", retry_policy={
                "retry_on": "5xx", "num_retries": 1})]))], [cluster("b", [be.port])])
            with cls(with_fresh_ports(bs)) as p:
                res = {}
                for flag, path in (("--http1.1", "/h1"), ("--http2-prior-knowledge", "/h2")):
                    cp = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", flag, "--max-time", "8",
                                         "--data-binary", "@-", "http://127.0.0.1:%d%s" % (p.port, path)],
                                        input=b"z" * SIZE, capture_output=True, timeout=15)
                    with lock:
                        res[path] = (cp.stdout.decode(), list(seen[path]))
                st = p.stats()
                # (the HTTP/1.1 request's retry was abandoned for its size: Envoy counts that, not
                # a retry limit reached)
                res["stats"] = {k: st.get("cluster.b." + k, 0) for k in (
                    "retry_or_shadow_abandoned", "upstream_rq_retry_limit_exceeded", "upstream_rq_retry")}
                out[name] = res
        finally:
            be.close()
    assert out["pyproxy"] == out["envoy"], out
    assert out["envoy"] == {"/h1": ("503", [SIZE]), "/h2": ("200", [SIZE, SIZE]), "stats": {
        "retry_or_shadow_abandoned": 1, "upstream_rq_retry_limit_exceeded": 0, "upstream_rq_retry": 1}}, out
