"""Peers for the CONNECT-over-HTTP/2 tests: upstream servers on real sockets (threads, bounded
waits) and an HTTP/2 client that opens CONNECT / extended CONNECT streams (``h2`` library).

- ``Http1TunnelServer``: HTTP/1.1 upstream. ``CONNECT host:port`` -> ``200`` then echoes bytes;
  ``GET`` with ``Upgrade: websocket`` -> ``101`` then echoes; on the client's half-close it
  writes ``bye`` and half-closes too; ``RESET`` as a read aborts the connection (RST). Records each request head it got (``heads``).
  ``status`` overrides the answer (e.g. 403 -> refused, no tunnel).
- ``H2TunnelServer``: HTTP/2 upstream (h2c prior knowledge) that answers CONNECT (and extended
  CONNECT when ``enable_connect``) with 200 and echoes DATA; END_STREAM from the client -> it
  sends ``bye`` and END_STREAM. Records request headers (``requests``).
- ``H2ConnectClient``: CONNECT streams to the proxy; ``open()``, ``send()``, ``read_until()``.
"""

from __future__ import annotations

import socket
import threading
import time

import h2.config
import h2.connection
import h2.events as E
import h2.exceptions
import h2.settings
from h2.settings import SettingCodes

from proxy_util import read_head


class _Server:
    def __init__(self):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(32)
        self.port = self.sock.getsockname()[1]
        self.stopped = False
        self.conns = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while not self.stopped:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(c)
            threading.Thread(target=self._serve_safe, args=(c,), daemon=True).start()

    def _serve_safe(self, c):
        try:
            c.settimeout(10)
            self.serve(c)
        except (OSError, h2.exceptions.ProtocolError):
            pass
        finally:
            try:
                c.close()
            except OSError:
                pass

    def stop(self):
        self.stopped = True
        try:
            self.sock.close()
        except OSError:
            pass
        for c in self.conns:
            try:
                c.close()
            except OSError:
                pass


class Http1TunnelServer(_Server):
    def __init__(self, status: int = 0):
        self.status = status
        self.heads = []
        super().__init__()

    def serve(self, c):
        r = read_head(c)
        if r is None:
            return
        head, rest = r
        self.heads.append(head.decode("latin-1"))
        first = head.split(b"\r\n")[0]
        if self.status:
            c.sendall(b"HTTP/1.1 %d Nope\r\ncontent-length: 4\r\n\r\nnope" % self.status)
            return
        if first.startswith(b"CONNECT "):
            c.sendall(b"HTTP/1.1 200 OK\r\n\r\n")
        elif b"upgrade: websocket" in head.lower():
            c.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n")
        else:
            c.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nplain")
            return
        if rest:
            c.sendall(rest)
        while True:
            d = c.recv(65536)
            if not d:
                break
            if d == b"RESET":  # abort the connection (RST)
                c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                return
            c.sendall(d)
        c.sendall(b"bye")
        c.shutdown(socket.SHUT_WR)
        time.sleep(0.2)


class H2TunnelServer(_Server):
    def __init__(self, enable_connect: bool = False):
        self.enable_connect = enable_connect
        self.requests = []
        self.resets = []
        super().__init__()

    def serve(self, c):
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
        if self.enable_connect:
            # in the first SETTINGS frame: the proxy may send its first request right after it
            conn.local_settings = h2.settings.Settings(client=False, initial_values={
                SettingCodes.MAX_CONCURRENT_STREAMS: 100, SettingCodes.ENABLE_CONNECT_PROTOCOL: 1})
        conn.initiate_connection()
        c.sendall(conn.data_to_send())
        while True:
            d = c.recv(65536)
            if not d:
                return
            for e in conn.receive_data(d):
                if isinstance(e, E.RequestReceived):
                    h = dict(e.headers)
                    self.requests.append(h)
                    if h.get(":method") == "CONNECT":
                        conn.send_headers(e.stream_id, [(":status", "200")])
                    else:
                        conn.send_headers(e.stream_id, [(":status", "200"), ("content-length", "5")])
                        conn.send_data(e.stream_id, b"plain", end_stream=True)
                elif isinstance(e, E.DataReceived):
                    conn.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
                    if e.data:
                        conn.send_data(e.stream_id, e.data)
                    if e.stream_ended is not None:
                        conn.send_data(e.stream_id, b"bye", end_stream=True)
                elif isinstance(e, E.StreamEnded):
                    pass
                elif isinstance(e, E.StreamReset):
                    self.resets.append((e.stream_id, e.error_code))
            out = conn.data_to_send()
            if out:
                c.sendall(out)


class H2ConnectClient:
    """An HTTP/2 client on a blocking socket; events are collected per stream."""

    def __init__(self, port: int, window: int | None = None):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8",
                                                                       validate_outbound_headers=False))
        self.h2.initiate_connection()
        self.ack = True  # credit received DATA back at once
        if window:
            self.h2.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: window})
        self.flush()
        self.events = []
        self.frames = []  # (type, flags, stream id, payload) of every frame received
        self.buf = b""
        self.closed = False

    def flush(self):
        d = self.h2.data_to_send()
        if d:
            self.sock.sendall(d)

    def _frames(self, d: bytes) -> None:
        self.buf += d
        while len(self.buf) >= 9:
            n = int.from_bytes(self.buf[:3], "big")
            if len(self.buf) < 9 + n:
                break
            self.frames.append((self.buf[3], self.buf[4], int.from_bytes(self.buf[5:9], "big") & 0x7FFFFFFF,
                                self.buf[9:9 + n]))
            self.buf = self.buf[9 + n:]

    def goaway_code(self):
        for t, _, _, p in self.frames:
            if t == 7:
                return int.from_bytes(p[4:8], "big")
        return None

    def rst_codes(self):
        return [(sid, int.from_bytes(p, "big")) for t, _, sid, p in self.frames if t == 3]

    def open(self, authority="backend:443", protocol=None, path="/ws", extra=(), end=False) -> int:
        sid = self.h2.get_next_available_stream_id()
        if protocol is None:
            h = [(":method", "CONNECT"), (":authority", authority)]
        else:
            h = [(":method", "CONNECT"), (":protocol", protocol), (":scheme", "http"), (":path", path),
                 (":authority", authority)]
        self.h2.send_headers(sid, h + list(extra), end_stream=end)
        self.flush()
        return sid

    def send(self, sid, data: bytes, end: bool = False):
        self.h2.send_data(sid, data, end_stream=end)
        self.flush()

    def end(self, sid):
        self.h2.end_stream(sid)
        self.flush()

    def reset(self, sid, code=0x8):
        self.h2.reset_stream(sid, code)
        self.flush()

    def read_until(self, cond, timeout=5.0):
        end = time.monotonic() + timeout
        while not cond() and not self.closed:
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError("no matching events; last %r" % self.events[-6:])
            self.sock.settimeout(left)
            try:
                d = self.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                self.closed = True
                break
            if not d:
                self.closed = True
                break
            self._frames(d)
            try:
                evs = self.h2.receive_data(d)
            except h2.exceptions.ProtocolError:
                self.closed = True
                break
            for e in evs:
                if self.ack and isinstance(e, E.DataReceived) and e.flow_controlled_length:
                    self.h2.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
                self.events.append(e)
            self.flush()

    # per-stream views
    def headers(self, sid):
        for e in self.events:
            if isinstance(e, E.ResponseReceived) and e.stream_id == sid:
                return dict(e.headers)
        return None

    def body(self, sid) -> bytes:
        return b"".join(e.data for e in self.events if isinstance(e, E.DataReceived) and e.stream_id == sid)

    def ended(self, sid) -> bool:
        return any(isinstance(e, E.StreamEnded) and e.stream_id == sid for e in self.events)

    def reset_code(self, sid):
        for e in self.events:
            if isinstance(e, E.StreamReset) and e.stream_id == sid:
                return e.error_code
        return None

    def done(self, sid) -> bool:
        return self.ended(sid) or self.reset_code(sid) is not None or self.closed

    def response(self, sid, timeout=5.0):
        """Status (or None), body so far, reset code once the headers (or a reset) arrived."""
        self.read_until(lambda: self.headers(sid) is not None or self.reset_code(sid) is not None, timeout)
        if self.headers(sid) is not None and self.headers(sid).get(":status", "")[:1] != "2":
            self.read_until(lambda: self.done(sid), timeout)
        h = self.headers(sid)
        return (int(h[":status"]) if h else None), self.body(sid), self.reset_code(sid)

    def remote_settings(self):
        return self.h2.remote_settings

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass
