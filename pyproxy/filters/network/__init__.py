"""Network (L4) filters, one module per Envoy extension."""

from __future__ import annotations

from ...http.filter import CONTINUE


class NetworkFilter:
    """What a network filter does where it has nothing to do: it lets the connection and its
    bytes through and has nothing to release on close. ``f`` is the filter's compiled config."""

    __slots__ = ("conn", "f")

    def __init__(self, conn, f):
        self.conn = conn
        self.f = f

    def on_new_connection(self):
        return CONTINUE

    def on_data(self, data, end_stream):
        return CONTINUE

    def on_close(self, exc):
        pass
