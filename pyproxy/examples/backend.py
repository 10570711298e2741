"""A tiny "reviews" backend for the example: an asyncio HTTP/1.1 server answering its version.

    python3 -m pyproxy.examples.backend --version v1 --port 18081
    curl -s localhost:18081/reviews          ->  reviews v1

Every request gets ``200`` with ``reviews <version>`` (plus the ``x-pyproxy-example`` request header
when the proxy added it) and a ``x-reviews-version`` response header. Keep-alive, ``Content-Length``
and chunked request bodies are understood; anything malformed gets ``400`` and the connection closes.
``--fd N`` serves on an already-listening socket handed over by ``pyproxy example``.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import sys

MAX_HEAD = 16 * 1024
MAX_BODY = 1024 * 1024
IDLE_TIMEOUT = 60.0


class BadRequest(Exception):
    pass


def parse_head(head: bytes):
    """``(method, target, version, headers dict)`` from a request head (without the blank line)."""
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes everything
        raise BadRequest("undecodable head")
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise BadRequest("bad request line")
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise BadRequest("bad header line")
        headers[name.lower()] = value.strip()
    return parts[0], parts[1], parts[2], headers


async def read_body(reader, headers) -> None:
    """Read and discard the request body (bounded)."""
    if headers.get("transfer-encoding", "").lower() == "chunked":
        total = 0
        while True:
            size_line = await reader.readuntil(b"\r\n")
            try:
                size = int(size_line.split(b";")[0].strip(), 16)
            except ValueError:
                raise BadRequest("bad chunk size")
            total += size
            if total > MAX_BODY:
                raise BadRequest("body too large")
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                    pass
                return
            await reader.readexactly(size + 2)
    cl = headers.get("content-length")
    if cl:
        if not cl.isdigit() or int(cl) > MAX_BODY:
            raise BadRequest("bad content-length")
        await reader.readexactly(int(cl))


def response(status: str, body: bytes, extra: str, keep_alive: bool, head_only: bool) -> bytes:
    head = ("HTTP/1.1 %s\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n%s%s\r\n"
            % (status, len(body), extra, "" if keep_alive else "connection: close\r\n"))
    return head.encode("latin-1") + (b"" if head_only else body)


def make_handler(version: str, writers: set):
    version_header = "x-reviews-version: %s\r\n" % version

    async def handle(reader, writer):
        writers.add(writer)
        try:
            while True:
                try:
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), IDLE_TIMEOUT)
                except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError):
                    return
                except asyncio.LimitOverrunError:
                    writer.write(response("431 Request Header Fields Too Large", b"", "", False, False))
                    return
                try:
                    method, _target, http_version, headers = parse_head(head[:-4])
                    await read_body(reader, headers)
                except BadRequest as e:
                    writer.write(response("400 Bad Request", (str(e) + "\n").encode(), "", False, False))
                    return
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return
                conn = headers.get("connection", "").lower()
                keep_alive = conn != "close" and (http_version == "HTTP/1.1" or conn == "keep-alive")
                added = headers.get("x-pyproxy-example")
                text = "reviews %s" % version
                if added is not None:
                    text += " (x-pyproxy-example: %s)" % added
                writer.write(response("200 OK", (text + "\n").encode("utf-8", "replace"), version_header,
                                      keep_alive, method == "HEAD"))
                await writer.drain()
                if not keep_alive:
                    return
        except ConnectionError:
            return
        finally:
            writers.discard(writer)
            writer.close()

    return handle


async def serve(version: str, sock: socket.socket) -> None:
    writers: set = set()
    server = await asyncio.start_server(make_handler(version, writers), sock=sock, limit=MAX_HEAD)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()
    # end open keep-alive connections so their handlers finish on EOF (not by cancellation)
    for w in list(writers):
        w.transport.abort()
    for _ in range(20):
        if not writers:
            break
        await asyncio.sleep(0.01)


def listening_socket(host: str, port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port))
    s.listen(128)
    return s


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m pyproxy.examples.backend",
                                description="a tiny 'reviews' backend that answers its version")
    p.add_argument("--version", required=True, help="the version it answers, e.g. v1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--fd", type=int, default=-1, help="serve on this inherited listening socket")
    a = p.parse_args(argv)
    try:
        if a.fd >= 0:
            sock = socket.socket(fileno=a.fd)
        else:
            sock = listening_socket(a.host, a.port)
    except OSError as e:
        sys.stderr.write("reviews %s: cannot listen on %s:%d: %s\n" % (a.version, a.host, a.port, e.strerror or e))
        return 1
    if a.fd < 0:
        print("reviews %s listening on %s:%d" % (a.version, a.host, sock.getsockname()[1]), flush=True)
    try:
        asyncio.run(serve(a.version, sock))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
