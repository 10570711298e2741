"""``envoy.filters.network.set_filter_state``: put formatted values into the connection's filter state.

Each ``on_new_connection`` value is a ``%COMMAND%`` format evaluated when the connection is set up and
stored as a string under ``object_key`` (what ``%FILTER_STATE(key)%`` and RBAC's ``filter_state``
principals read). ``factory_key`` object types are not modelled: values are plain strings; sharing
with upstream is not implemented (reported as an ignored part).
"""

from __future__ import annotations

from envoy.extensions.filters.network.set_filter_state.v3 import set_filter_state_pb2  # noqa: F401

from ...config import ConfigError
from ..set_filter_state_common import apply, compile_values

from ...http.filter import CONTINUE
from . import NetworkFilter


class SetFilterStateFactory:
    def __init__(self, cfg, ctx):
        self.values = compile_values(cfg.on_new_connection, "Config.on_new_connection")
        self.notes = []
        if any(v.shared for v in self.values):
            self.notes.append("shared_with_upstream is not implemented (values stay on the downstream connection)")

    def create(self, conn):
        return SetFilterStateFilter(conn, self)


class SetFilterStateFilter(NetworkFilter):
    __slots__ = ()

    def on_new_connection(self):
        c = self.conn
        si = c.stream_info
        apply(self.f.values, si, si.filter_state)
        c.filter_state.update(si.filter_state)
        return CONTINUE


def factory(cfg, ctx, terminal=False):
    if terminal:
        raise ConfigError("set_filter_state must not be the last network filter")
    return SetFilterStateFactory(cfg, ctx)
