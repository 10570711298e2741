"""``envoy.filters.network.wasm``: see ``pyproxy.filters.wasm_common`` (Istio's built-in plugins skipped)."""

from __future__ import annotations

from envoy.extensions.filters.network.wasm.v3 import wasm_pb2  # noqa: F401

from ...config import ConfigError
from ..wasm_common import SkippedWasm, skip_reason


class _Noop:
    __slots__ = ()

    def on_new_connection(self):
        return 0

    def on_data(self, data, end_stream):
        return 0

    def on_close(self, exc):
        pass


def factory(cfg, ctx, terminal=False):
    if terminal:
        raise ConfigError("a Wasm network filter cannot be the last filter here")
    return SkippedWasm(skip_reason(cfg, "Wasm"), _Noop())
