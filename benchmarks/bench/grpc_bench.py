"""gRPC unary benchmark peers (grpcio, no generated code: raw bytes on /bench.Echo/Call).

  python3 grpc_bench.py server --port P [--expect-header r18]
  python3 grpc_bench.py client --target 127.0.0.1:P --duration 5 --concurrency 16 [--header r18]

The server answers a 1 KB payload, or FAILED_PRECONDITION when the route header added by the
proxy is missing or wrong. The client runs `concurrency` coroutines making unary calls until the
duration is up and prints one JSON line: requests, ok, errors, rps, p50_ms, p99_ms.
"""
import argparse
import asyncio
import json
import sys
import time

import grpc

METHOD = "/bench.Echo/Call"
HEADER = "x-bench-route"
PAYLOAD = b"g" * 1024


async def serve(port, expect):
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])

    async def call(request, context):
        if expect:
            got = dict(context.invocation_metadata()).get(HEADER)
            if got != expect:
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                    f"route header {HEADER}={got!r}, expected {expect!r}")
        return PAYLOAD

    handler = grpc.method_handlers_generic_handler("bench.Echo", {
        "Call": grpc.unary_unary_rpc_method_handler(call)})
    server.add_generic_rpc_handlers((handler,))
    if server.add_insecure_port(f"127.0.0.1:{port}") == 0:
        print(f"cannot bind 127.0.0.1:{port}", file=sys.stderr)
        sys.exit(1)
    await server.start()
    await server.wait_for_termination()


async def client(target, duration, concurrency, header, timeout):
    md = ((HEADER, header),) if header else None
    lat = []
    errors = {}
    async with grpc.aio.insecure_channel(target) as ch:
        call = ch.unary_unary(METHOD)
        try:
            await asyncio.wait_for(ch.channel_ready(), timeout=5)
        except asyncio.TimeoutError:
            print(json.dumps({"error": f"channel to {target} not ready in 5s"}))
            return 1
        end = time.perf_counter() + duration

        async def worker():
            while True:
                t0 = time.perf_counter()
                if t0 >= end:
                    return
                try:
                    await call(b"ping", metadata=md, timeout=timeout)
                    lat.append(time.perf_counter() - t0)
                except grpc.aio.AioRpcError as e:
                    key = f"{e.code().name}: {e.details()}"[:200]
                    errors[key] = errors.get(key, 0) + 1

        t_start = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))),
                               timeout=duration + timeout + 5)
        elapsed = time.perf_counter() - t_start
    lat.sort()

    def pct(q):
        return lat[min(len(lat) - 1, int(round(q / 100 * (len(lat) - 1))))] * 1000 if lat else None

    print(json.dumps({"requests": len(lat) + sum(errors.values()), "ok": len(lat),
                      "errors": sum(errors.values()), "error_kinds": errors,
                      "duration_s": elapsed, "rps": len(lat) / elapsed if elapsed else 0.0,
                      "p50_ms": pct(50), "p99_ms": pct(99)}))
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("server")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--expect-header", default="")
    c = sub.add_parser("client")
    c.add_argument("--target", required=True)
    c.add_argument("--duration", type=float, default=5.0)
    c.add_argument("--concurrency", type=int, default=16)
    c.add_argument("--header", default="")
    c.add_argument("--timeout", type=float, default=5.0)
    a = ap.parse_args(argv)
    if a.cmd == "server":
        asyncio.run(serve(a.port, a.expect_header))
        return 0
    return asyncio.run(client(a.target, a.duration, a.concurrency, a.header, a.timeout))


if __name__ == "__main__":
    sys.exit(main())
