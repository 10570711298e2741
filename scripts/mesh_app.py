#!/usr/bin/env python3
"""Demo workloads for the local meshes (docker-compose.yml and scripts/netns_mesh.py).

    mesh_app.py http PORT NAME     HTTP/1.1 server: every request gets JSON
                                   {"pod": NAME, "peer": client IP, "path": ..., "host": ...}
                                   (and "xfcc": the x-forwarded-client-cert header, if any);
                                   /slow?ms=N waits N ms first; /call?url=U fetches U and returns
                                   its status and body (how one service calls another)
    mesh_app.py echo PORT          TCP server echoing every byte back (for passthrough checks)
    mesh_app.py fast PORT NAME     HTTP/1.1 keep-alive server on one asyncio loop: every request
                                   gets {"pod": NAME, "peer": client IP} (benchmarks/mesh.py's
                                   backend: no thread switches in the measured latency)

Prints "ready" on stdout once listening. Standard library only.
"""

import json
import signal
import socket
import socketserver
import sys
import threading
import time
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def http(port: int, name: str) -> None:
    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True   # the head and the body are two writes: no 40 ms delayed-ACK stall

        def do_GET(self):
            u = urllib.parse.urlsplit(self.path)
            q = urllib.parse.parse_qs(u.query)
            if u.path == "/slow":
                time.sleep(min(float(q.get("ms", ["100"])[0]), 30000) / 1000.0)
            out = {"pod": name, "peer": self.client_address[0], "path": self.path,
                   "host": self.headers.get("host")}
            if self.headers.get("x-forwarded-client-cert"):      # the caller's identity (mTLS mesh)
                out["xfcc"] = self.headers.get("x-forwarded-client-cert")
            if u.path == "/call":
                try:
                    with urllib.request.urlopen(q["url"][0], timeout=5) as r:
                        out["upstream"] = {"status": r.status, "body": json.loads(r.read())}
                except Exception as e:  # report, don't crash the demo
                    out["upstream"] = {"error": str(e)}
            body = json.dumps(out).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    ThreadingHTTPServer.daemon_threads = True
    srv = ThreadingHTTPServer(("0.0.0.0", port), H)
    print("ready", flush=True)
    srv.serve_forever()


def fast(port: int, name: str) -> None:
    import asyncio

    class P(asyncio.Protocol):
        def connection_made(self, t):
            self.t, self.buf = t, b""
            body = json.dumps({"pod": name, "peer": t.get_extra_info("peername")[0]}).encode()
            self.resp = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
                         % len(body)) + body

        def data_received(self, data):
            self.buf += data
            if len(self.buf) > 65536:
                self.t.close()
                return
            while True:
                i = self.buf.find(b"\r\n\r\n")
                if i < 0:
                    return
                head, self.buf = self.buf[:i], self.buf[i + 4:]
                if b"\ncontent-length:" in head.lower() or b"\ntransfer-encoding:" in head.lower():
                    self.t.close()      # GET only: no request bodies
                    return
                self.t.write(self.resp)

    async def main():
        srv = await asyncio.get_running_loop().create_server(P, "0.0.0.0", port)
        print("ready", flush=True)
        await srv.serve_forever()

    asyncio.run(main())


def echo(port: int) -> None:
    class E(socketserver.BaseRequestHandler):
        def handle(self):
            s = self.request
            try:
                while True:
                    d = s.recv(65536)
                    if not d:
                        break
                    s.sendall(d)
                s.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    class S(socketserver.ThreadingTCPServer):
        allow_reuse_address = True
        daemon_threads = True

    srv = S(("0.0.0.0", port), E)
    print("ready", flush=True)
    srv.serve_forever()


if __name__ == "__main__":
    # SIGTERM (docker stop, docker-compose stop): exit 0 at once, as PID 1 in a container too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if len(sys.argv) >= 3 and sys.argv[1] == "http":
        http(int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else "app")
    elif len(sys.argv) >= 3 and sys.argv[1] == "fast":
        fast(int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else "app")
    elif len(sys.argv) == 3 and sys.argv[1] == "echo":
        echo(int(sys.argv[2]))
    else:
        sys.stderr.write(__doc__)
        sys.exit(2)
    threading.Event().wait()
