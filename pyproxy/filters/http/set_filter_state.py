"""``envoy.filters.http.set_filter_state``: formatted values into the stream's filter state
(``on_request_headers``), as strings. See the network filter for what is not modelled."""

from __future__ import annotations

from envoy.extensions.filters.http.set_filter_state.v3 import set_filter_state_pb2  # noqa: F401

from ...http.filter import CONTINUE, HttpFilter
from ..set_filter_state_common import apply, compile_values


class SetFilterStateFactory:
    def __init__(self, cfg, ctx):
        self.values = compile_values(cfg.on_request_headers, "Config.on_request_headers")
        self.notes = []
        if any(v.shared for v in self.values):
            self.notes.append("shared_with_upstream is not implemented")

    def create(self, stream):
        return SetFilterStateFilter(stream, self)


class SetFilterStateFilter(HttpFilter):
    __slots__ = ("f",)

    def __init__(self, callbacks, f):
        self.callbacks = callbacks
        self.f = f

    def decode_headers(self, headers, end_stream):
        si = self.callbacks.stream_info
        apply(self.f.values, si, si.filter_state, headers)
        return CONTINUE


def factory(cfg, ctx):
    return SetFilterStateFactory(cfg, ctx)
