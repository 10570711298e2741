"""A bare HTTP/1.1 forwarder: the ceiling a pure-Python proxy can reach on this machine.

    python3 bare_forwarder.py --listen PORT --upstream PORT

uvloop + asyncio.Protocol + httptools, one upstream connection per downstream connection,
first-match over the benchmark's 20 route prefixes, adds `x-bench-route`, relays the response
bytes, with the matched route's `x-bench-matched` response header spliced in after the status line. No pipelining, no request bodies, no timeouts, no config: it only exists as the
reference point (optional target `bare` in run.py) for what pyproxy's hot path costs on top.
"""
import argparse
import asyncio
import os
import sys

import httptools
import uvloop

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import configs  # noqa: E402

ROUTES = []
for _r in configs.routes():
    _m = _r["match"]
    _v = _r['request_headers_to_add'][0]['header']['value']
    _hdr = (f"{configs.ROUTE_HEADER}: {_v}\r\n".encode(), f"{configs.RESPONSE_HEADER}: {_v}\r\n".encode())
    if "path" in _m:
        ROUTES.append((True, _m["path"].encode(), None, _hdr))
    else:
        h = _m.get("headers")
        need = ((h[0]["name"].encode(), h[0]["string_match"]["exact"].encode()) if h else None)
        ROUTES.append((False, _m["prefix"].encode(), need, _hdr))


class Upstream(asyncio.Protocol):
    __slots__ = ("down", "transport", "parser", "pending", "add")

    def __init__(self, down):
        self.down = down
        self.transport = None
        self.pending = None
        self.add = None  # the response header line to splice into the next response's head
        self.parser = httptools.HttpResponseParser(self)

    def connection_made(self, transport):
        self.transport = transport
        if self.pending:
            transport.write(self.pending)
            self.pending = None

    def data_received(self, data):
        if self.add is not None:
            i = data.find(b"\r\n")  # the status line (a 1 KB response's head comes in one read)
            if i >= 0:
                data = b"".join((data[:i + 2], self.add, data[i + 2:]))
                self.add = None
        self.down.transport.write(data)
        self.parser.feed_data(data)

    def on_message_complete(self):
        self.parser = httptools.HttpResponseParser(self)

    def connection_lost(self, exc):
        self.transport = None
        if self.down.transport is not None:
            self.down.transport.close()

    def send(self, data):
        if self.transport is None:
            self.pending = (self.pending or b"") + data
        else:
            self.transport.write(data)


class Downstream(asyncio.Protocol):
    __slots__ = ("transport", "parser", "url", "headers", "up", "upstream_port")

    def __init__(self, upstream_port):
        self.upstream_port = upstream_port
        self.transport = None
        self.up = None
        self.headers = []
        self.url = b""
        self.parser = httptools.HttpRequestParser(self)

    def connection_made(self, transport):
        self.transport = transport
        self.up = Upstream(self)
        loop = asyncio.get_running_loop()
        loop.create_task(loop.create_connection(lambda: self.up, "127.0.0.1",
                                                self.upstream_port))

    def data_received(self, data):
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n"
                                 b"connection: close\r\n\r\n")
            self.transport.close()

    def on_message_begin(self):
        self.headers = []
        self.url = b""

    def on_url(self, url):
        self.url += url

    def on_header(self, name, value):
        self.headers.append((name, value))

    def on_message_complete(self):
        path = self.url
        add = None
        for exact, key, need, hdr in ROUTES:
            if (path == key) if exact else path.startswith(key):
                if need is None or any(n.lower() == need[0] and v == need[1]
                                       for n, v in self.headers):
                    add = hdr
                    break
        if add is None:
            self.transport.write(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
            return
        out = [self.parser.get_method(), b" ", path, b" HTTP/1.1\r\n"]
        for n, v in self.headers:
            if n.lower() != configs.ROUTE_HEADER.encode():
                out += [n, b": ", v, b"\r\n"]
        out += [add[0], b"\r\n"]
        self.up.add = add[1]
        self.up.send(b"".join(out))

    def connection_lost(self, exc):
        self.transport = None
        if self.up is not None and self.up.transport is not None:
            self.up.transport.close()


async def main(listen, upstream):
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Downstream(upstream), "127.0.0.1", listen,
                                      backlog=4096)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--listen", type=int, required=True)
    ap.add_argument("--upstream", type=int, required=True)
    a = ap.parse_args()
    uvloop.run(main(a.listen, a.upstream))
