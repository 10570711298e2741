"""A scripted HTTP/2 upstream for tests: h2c on 127.0.0.1:0, the h2 library, a thread per
connection. A subclass says what each request gets (``on_request``) and, optionally, what happens
between reads (``on_tick``, every ``poll`` seconds), to other frames' events (``on_event``) and when a
connection starts (``on_connect``, with the connection's own ``state``: ``state["sock"]`` is its
socket); ``settings`` are its SETTINGS values. The socket, accept loop, read loop and shutdown live
here once."""

from __future__ import annotations

import socket
import threading

import h2.config
import h2.connection
import h2.events as E
import h2.exceptions
import h2.settings

try:
    from proxy_util import listen_local
except ImportError:  # imported as tests.<module>
    from tests.proxy_util import listen_local


class ThreadedH2Upstream:
    poll = 10.0  # read timeout: how often on_tick runs on a quiet connection
    settings = None  # {SettingCodes.X: value} announced in the server's SETTINGS, or None

    def __init__(self, backlog: int = 16):
        self.lock = threading.Lock()
        self.sock = listen_local(backlog)
        self.port = self.sock.getsockname()[1]
        self.stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    # -- what a subclass writes -------------------------------------------------------------------
    def on_request(self, conn, event, state: dict) -> bool:
        """Answer (or not) ``event`` (h2 RequestReceived); False closes the connection."""
        answer(conn, event.stream_id)
        return True

    def on_tick(self, conn, state: dict) -> None:
        """Called after every read or read timeout."""

    def on_event(self, conn, event, state: dict) -> None:
        """Any event but RequestReceived."""

    def on_connect(self, state: dict) -> None:
        """A new connection (before the server's preface is sent)."""

    # -- the loop -------------------------------------------------------------------------------
    def _accept(self):
        self.sock.settimeout(0.2)
        while not self.stop:
            try:
                c, _ = self.sock.accept()
            except OSError:
                continue
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c):
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
        if self.settings:
            conn.local_settings = h2.settings.Settings(client=False, initial_values=self.settings)
        state = {"sock": c}
        self.on_connect(state)
        conn.initiate_connection()
        c.sendall(conn.data_to_send())
        c.settimeout(self.poll)
        try:
            while not self.stop:
                try:
                    data = c.recv(65536)
                    if not data:
                        return
                    events = conn.receive_data(data)
                except socket.timeout:
                    events = []
                for e in events:
                    if isinstance(e, E.RequestReceived):
                        if not self.on_request(conn, e, state):
                            return
                    else:
                        self.on_event(conn, e, state)
                self.on_tick(conn, state)
                out = conn.data_to_send()
                if out:
                    c.sendall(out)
        except (OSError, h2.exceptions.ProtocolError):
            return
        finally:
            c.close()

    def close(self):
        self.stop = True
        self.sock.close()


class ResetRecordingUpstream(ThreadedH2Upstream):
    """A scripted upstream that records the error code of each RST_STREAM the proxy sends it
    (``resets``; ``got`` is set at the first)."""

    poll = 0.05

    def __init__(self):
        super().__init__()
        self.resets = []
        self.got = threading.Event()

    def on_event(self, conn, ev, state):
        if isinstance(ev, E.StreamReset):
            self.resets.append(int(ev.error_code))
            self.got.set()


def answer(conn, sid, body: bytes = b"ok") -> None:
    conn.send_headers(sid, [(":status", "200"), ("content-length", str(len(body)))])
    conn.send_data(sid, body, end_stream=True)
