"""Python cost of one proxied HTTP/1.1 request, without sockets (for profiling the hot path).

Drives a real listener/HCM/router/pool stack compiled from a bootstrap with in-memory transports:
request bytes in downstream, request bytes out upstream, response bytes in upstream, response bytes
out downstream. Prints microseconds per request; ``--profile`` prints the top cProfile entries.

    python3 benchmarks/micro_h1.py [-n 20000] [--profile | --opcodes [TOP] [--by-module]] [--mesh]
                                   [--chain router|istio|istio-telemetry|istio-nostats | --istio]

``--chain`` builds the stack from the benchmark's own bootstrap for that chain
(benchmarks/bench/configs.py, the config run.py gives both proxies) and sends run.py's request
(the Istio chains: Host ``reviews.shop``); without it, the stack is this file's BOOTSTRAP (the
20-route table's first 18 routes, no response header), ``--istio`` that with Istio's chain in front.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BOOTSTRAP = """
static_resources:
  listeners:
  - name: l1
    address: {socket_address: {address: 127.0.0.1, port_value: 0}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress
          route_config:
            virtual_hosts:
            - name: b
              domains: ["*"]
              routes:
%s
              - match: {prefix: "/r18/"}
                route: {cluster: backend}
                request_headers_to_add: [{header: {key: x-bench-route, value: r18}}]
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
  clusters:
  - name: backend
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: backend
      endpoints:
      - lb_endpoints:
        - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 9}}}
""" % "\n".join(
    # the benchmark's routes before its late one (bench/configs.py): exact paths, prefixes with a
    # header condition, plain prefixes
    ("              - match: {path: \"/api/v1/items/%d\"}" % i if i <= 5 else
     "              - match: {prefix: \"/r%02d/\", headers: [{name: x-tenant, string_match: {exact: t%d}}]}"
     % (i, i) if i <= 10 else
     "              - match: {prefix: \"/r%02d/\"}" % i) + "\n                route: {cluster: backend}"
    for i in range(1, 18))



def istio_outbound_bootstrap() -> str:
    """``--istio``: BOOTSTRAP with the HTTP chain and HCM settings istiod renders for a sidecar's
    outbound listener (../shared/testdata/istio/sidecar-listeners-configdump.json), less the Istio
    extensions: grpc_stats (emit_filter_state), an empty fault, cors without a policy, router; uuid
    request ids, normalize_path, websocket upgrades, no stream idle timeout."""
    import json
    import yaml
    doc = yaml.safe_load(BOOTSTRAP)
    t = "type.googleapis.com/envoy.extensions.filters.http."
    hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"] = [
        {"name": "envoy.filters.http.grpc_stats", "typed_config": {
            "@type": t + "grpc_stats.v3.FilterConfig", "emit_filter_state": True, "stats_for_all_methods": False}},
        {"name": "envoy.filters.http.fault", "typed_config": {"@type": t + "fault.v3.HTTPFault"}},
        {"name": "envoy.filters.http.cors", "typed_config": {"@type": t + "cors.v3.Cors"}},
    ] + hcm["http_filters"]
    hcm.update({"normalize_path": True, "upgrade_configs": [{"upgrade_type": "websocket"}],
                "stream_idle_timeout": "0s", "request_id_extension": {"typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.request_id.uuid.v3.UuidRequestIdConfig",
                    "use_request_id_for_trace_sampling": True}}})
    return json.dumps(doc)


REQUEST = b"GET /r18/bench HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: wrk\r\n\r\n"
# --mesh: what a request arriving through another sidecar carries (the request preparation scans it)
MESH_REQUEST = (b"GET /r18/bench HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: wrk\r\n"
                b"X-Request-Id: 0b9b2c8e-6b1e-4c8e-9a51-3f3f7d0c1a2b\r\nX-Forwarded-Proto: http\r\n"
                b"X-Forwarded-For: 10.1.2.3\r\n\r\n")
BODY = b"x" * 1024
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Sat, 21 Nov 2026 21:00:00 GMT\r\n"
            b"Content-Type: text/plain\r\nContent-Length: 1024\r\nConnection: keep-alive\r\n\r\n" + BODY)


class FakeTransport:
    def __init__(self, peer, local):
        self.out = []
        self.extra = {"peername": peer, "sockname": local, "socket": None}

    def write(self, data):
        self.out.append(data)

    def get_extra_info(self, k, default=None):
        return self.extra.get(k, default)

    def set_write_buffer_limits(self, high=None, low=None):
        pass

    def pause_reading(self):
        pass

    def resume_reading(self):
        pass

    def close(self):
        pass

    def abort(self):
        pass

    def can_write_eof(self):
        return True

    def write_eof(self):
        pass

    def get_write_buffer_size(self):  # (the HTTP/2 codec asks)
        return 0


def chain_setup(chain: str):
    """``--chain``: (bootstrap JSON, request bytes, cluster name, bytes the upstream request must
    carry, bytes the downstream response must carry), from benchmarks/bench/configs.py."""
    import json
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench import configs
    boot = configs.envoy_bootstrap(0, 9, chain=chain, response_headers=True, misroute_port=10)
    if chain == "router":
        req = (b"GET %s HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: wrk\r\n\r\n"
               % configs.BENCH_PATH.encode())
        return (json.dumps(boot), req, "backend", b"x-bench-route: r18",
                ("%s: r18" % configs.RESPONSE_HEADER).encode())
    req = (b"GET %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: wrk\r\n\r\n"
           % (configs.ISTIO_PATH.encode(), configs.ISTIO_HOST.encode()))
    return (json.dumps(boot), req, configs.istio_cluster_name(configs.ISTIO_TARGET),
            b"x-envoy-attempt-count: 1", b"")


def build_stack(bootstrap: str, cluster_name: str = "backend"):
    """The compiled stack of a one-listener bootstrap, on a fresh uvloop loop:
    ``(loop, listener manager, active listener, cluster, its host, the host's pool)`` for the
    cluster ``cluster_name``."""
    import uvloop
    from pyproxy import extensions, access_log  # noqa: F401
    from pyproxy.config.bootstrap import load_bootstrap
    from pyproxy.listeners.manager import ActiveListener
    from pyproxy.server import Options, Server
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    server = Server(load_bootstrap(None, bootstrap), Options(), loop)
    (cfg,) = server.compile_static()
    lm = server.listener_manager
    cluster = server.cluster_manager.get(cluster_name)
    host = cluster.priority_set.all_hosts[0]
    return loop, lm, ActiveListener(lm, cfg), cluster, host, cluster.http_pool(host)


def connect(loop, lm, al, cluster, host, pool):
    """An idle upstream connection in ``pool`` and a downstream connection on ``al``, each over a
    FakeTransport: ``(upstream, its transport, downstream, its transport)``."""
    from pyproxy.cluster.pool import UpstreamConnection
    from pyproxy.listeners.connection import DownstreamConnection
    up = UpstreamConnection(pool, host)
    ut = FakeTransport(("127.0.0.1", 9), ("127.0.0.1", 40000))
    up.connection_made(ut)
    cluster.cx_total_active += 1
    pool._on_idle_or_pending(up)
    down = DownstreamConnection(lm, al)
    dt = FakeTransport(("127.0.0.1", 50000), ("127.0.0.1", 8080))

    async def made():  # (a listener filter's timer needs a running loop)
        down.connection_made(dt)
    loop.run_until_complete(made())
    return up, ut, down, dt


def profile(one, n: int, timer=None) -> None:
    """cProfile over ``n`` calls of ``one`` (``timer``: e.g. ``time.process_time``); the top 30
    functions by their own time."""
    import cProfile
    import pstats
    pr = cProfile.Profile(timer) if timer is not None else cProfile.Profile()
    pr.enable()
    for _ in range(n):
        one()
    pr.disable()
    pstats.Stats(pr).sort_stats("tottime").print_stats(30)


def count_opcodes(fn, calls_n: int, per_call: int, top: int, label: str = "",
                  by_module: bool = False) -> None:
    """Run ``fn`` ``calls_n`` times under a tracer and print the Python opcodes and calls per
    request (``per_call`` requests per ``fn`` call) and the ``top`` functions by opcodes
    (``by_module``: per source file, e.g. ``pyproxy/cluster/pool.py``, instead)."""
    import collections
    ops = collections.Counter()
    calls = collections.Counter()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep

    def key(code):
        if by_module:
            f = code.co_filename
            return f[len(root):] if f.startswith(root) else f
        return code.co_qualname

    def tracer(frame, event, arg):
        if event == "call":
            frame.f_trace_opcodes = True
            calls[key(frame.f_code)] += 1
        elif event == "opcode":
            ops[key(frame.f_code)] += 1
        return tracer
    sys.settrace(tracer)
    try:
        for _ in range(calls_n):
            fn()
    finally:
        sys.settrace(None)
    n = calls_n * per_call
    print("python opcodes per proxied %srequest: %d, python calls: %d" % (
        label, sum(ops.values()) // n, sum(calls.values()) // n))
    for name, k in ops.most_common(top):
        print("%7d %4d  %s" % (k // n, calls[name] // n, name))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=20000)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--opcodes", type=int, nargs="?", const=15, default=None, metavar="TOP",
                    help="count the Python opcodes and calls one request executes (deterministic, "
                         "unlike timings on a shared machine) and list the TOP functions")
    ap.add_argument("--by-module", action="store_true",
                    help="with --opcodes: list the source files by opcodes instead of functions")
    ap.add_argument("--mesh", action="store_true",
                    help="a request with x-request-id, x-forwarded-proto and x-forwarded-for")
    ap.add_argument("--istio", action="store_true",
                    help="Istio's outbound sidecar HTTP chain (grpc_stats, fault, cors, router) and HCM settings")
    ap.add_argument("--chain", choices=("router", "istio", "istio-telemetry", "istio-nostats"),
                    help="the benchmark's bootstrap for this chain (benchmarks/bench/configs.py)")
    a = ap.parse_args(argv)
    request = MESH_REQUEST if a.mesh else REQUEST
    up_must, down_must = b"x-bench-route: r18", b""
    if a.chain:
        boot, request, cname, up_must, down_must = chain_setup(a.chain)
        if a.mesh:
            extra = MESH_REQUEST.split(b"User-Agent: wrk\r\n")[1][:-2]  # x-request-id, x-forwarded-*
            request = request.replace(b"User-Agent: wrk\r\n", b"User-Agent: wrk\r\n" + extra)
        loop, lm, al, cluster, host, pool = build_stack(boot, cname)
    else:
        loop, lm, al, cluster, host, pool = build_stack(istio_outbound_bootstrap() if a.istio else BOOTSTRAP)
    up, ut, down, dt = connect(loop, lm, al, cluster, host, pool)

    def one():
        down.data_received(request)
        up.data_received(RESPONSE)

    for _ in range(200):
        one()
    assert dt.out and dt.out[-1].endswith(BODY), dt.out[-1:]
    assert up_must in ut.out[-1], ut.out[-1]
    assert down_must in b"".join(dt.out[-3:]), dt.out[-3:]
    dt.out.clear()
    ut.out.clear()

    def tidy():
        dt.out.clear()
        ut.out.clear()
        loop.run_until_complete(asyncio.sleep(0))
    return measure(a, one, tidy, by_module=a.by_module)


def measure(a, one, tidy, label: str = "", by_module: bool = False) -> int:
    """The measuring part of a micro benchmark, ``one()`` proxying one request: ``--opcodes``
    (count_opcodes), ``--profile`` (cProfile over ``-n`` calls), else the best of 5 timings of
    ``-n`` calls, ``tidy()`` every 1000 (dropping what the fake transports collected)."""
    import gc
    gc.collect()
    gc.freeze()
    if a.opcodes is not None:
        count_opcodes(one, 20, 1, a.opcodes, label, by_module=by_module)
        return 0
    if a.profile:
        profile(one, a.n)
        return 0
    best = None
    for _ in range(5):
        t = time.perf_counter()
        for i in range(a.n):
            one()
            if i % 1000 == 0:
                tidy()
        el = (time.perf_counter() - t) / a.n * 1e6
        best = el if best is None else min(best, el)
    print("python cost per proxied %srequest: %.1f us (best of 5 x %d)" % (label, best, a.n))
    return 0


if __name__ == "__main__":
    sys.exit(main())
