"""The outbound half of an HTTP/2 stream, shared by the server (response) and client (request)
sides: DATA goes to the peer as far as its flow-control window allows and while the transport is
not above its high watermark; the rest waits in a bounded per-stream buffer whose high watermark
read-disables the producer until it drains to half.
"""

from __future__ import annotations

import collections

import h2.exceptions

from .h2_headers import trailers_to_h2
from .headers import Headers

class _NoPending(tuple):
    """The shared empty outbound buffer of streams that never had to wait (most of them)."""

    __slots__ = ()

    def clear(self) -> None:
        pass


_NO_PENDING = _NoPending()


class OutStream:
    """Outbound DATA of one stream: what the peer's window (or our transport) cannot take yet.

    Subclasses provide ``conn`` (with ``h2``, ``write_paused``, ``blocked``), ``sid`` and
    ``_ended()``/``_watermark(above)``, and set this state in their ``__init__`` (inline: one
    call less per request): ``pending = _NO_PENDING`` (a deque once something has to wait),
    ``pending_bytes = 0``, ``pending_end = False``, ``pending_trailers = None``, ``above = False``,
    ``read_off = 0``, ``unacked = 0``, ``local_ended = False``, ``closed = False``.
    """

    __slots__ = ()

    def _close_out(self) -> bool:
        """The stream is over: drop what still waits to be sent. False if it already was over."""
        if self.closed:
            return False
        self.closed = True
        if self.pending:
            self.pending.clear()
        self.pending_bytes = 0
        return True

    def read_disable(self, disable: bool) -> None:
        """Reference-counted: while reading is disabled, received DATA is not credited back to the
        peer (``unacked`` holds it); the credit goes back when the last disable is lifted."""
        if disable:
            self.read_off += 1
            return
        if not self.read_off:
            return
        self.read_off -= 1
        if not self.read_off and self.unacked and not self.closed:
            n, self.unacked = self.unacked, 0
            c = self.conn
            if c is not None and not c.closed:
                try:
                    c.h2.acknowledge_received_data(n, self.sid)
                except (h2.exceptions.ProtocolError, ValueError):
                    pass
                c.want_flush()

    def _send_data(self, data, end: bool) -> None:
        conn = self.conn
        n = len(data)
        if not self.pending and not conn.write_paused:
            h = conn.h2
            if conn.lean:
                if h.try_send_data(self.sid, data, end):
                    if end:
                        self._ended()
                    return
            elif n <= conn.max_frame and n <= h.local_flow_control_window(self.sid):
                h.send_data(self.sid, data, end_stream=end)
                if end:
                    self._ended()
                return
        if n:
            p = self.pending
            if p is _NO_PENDING:
                p = self.pending = collections.deque()
            p.append(data)
            self.pending_bytes += n
        if end:
            self.pending_end = True
        self.flush_pending()
        if not self.above and self.pending_bytes > conn.stream_high:
            self.above = True
            self._watermark(True)

    def _send_trailers(self, trailers: Headers) -> None:
        if self.pending:
            self.pending_trailers = trailers
            self.flush_pending()
            return
        self.conn.h2.send_headers(self.sid, trailers_to_h2(trailers), end_stream=True)
        self._ended()

    def flush_pending(self) -> None:
        """Send what the window allows; finish the stream once the buffer is empty."""
        conn = self.conn
        h = conn.h2
        sid = self.sid
        pending = self.pending
        try:
            while pending and not conn.write_paused:
                w = h.local_flow_control_window(sid)
                if w <= 0:
                    break
                if w > conn.max_frame:
                    w = conn.max_frame
                chunk = pending[0]
                if len(chunk) <= w:
                    pending.popleft()
                    h.send_data(sid, chunk)
                    self.pending_bytes -= len(chunk)
                else:
                    h.send_data(sid, chunk[:w])
                    pending[0] = chunk[w:]
                    self.pending_bytes -= w
        except h2.exceptions.StreamClosedError:
            pending.clear()
            self.pending_bytes = 0
            conn.blocked.discard(self)
            return
        if pending:
            conn.blocked.add(self)
        else:
            conn.blocked.discard(self)
            if self.pending_trailers is not None:
                t, self.pending_trailers = self.pending_trailers, None
                h.send_headers(sid, trailers_to_h2(t), end_stream=True)
                self._ended()
            elif self.pending_end:
                self.pending_end = False
                h.end_stream(sid)
                self._ended()
        if self.above and self.pending_bytes <= conn.stream_high // 2:
            self.above = False
            self._watermark(False)
        conn.want_flush()


def window_opened(conn, sid: int) -> None:
    """A WINDOW_UPDATE arrived (``sid`` 0: the connection's): streams waiting for window may send."""
    if conn.blocked:
        if sid == 0:
            flush_blocked(conn)
        else:
            s = conn.streams.get(sid)
            if s is not None and s.pending:
                s.flush_pending()


def flush_blocked(conn) -> None:
    for s in list(conn.blocked):
        if conn.write_paused:
            return
        s.flush_pending()

