"""``envoy.filters.http.wasm``: see ``pyproxy.filters.wasm_common`` (Istio's built-in plugins skipped)."""

from __future__ import annotations

from envoy.extensions.filters.http.wasm.v3 import wasm_pb2  # noqa: F401

from ...http.filter import HttpFilter
from ..wasm_common import SkippedWasm, is_metadata_exchange, skip_reason
from .peer_metadata import legacy_wasm_factory


class _Noop(HttpFilter):
    """Shared, stateless pass-through (never touches ``callbacks``)."""

    __slots__ = ()


_NOOP = _Noop(None)


def factory(cfg, ctx):
    if is_metadata_exchange(cfg):
        return legacy_wasm_factory(ctx)
    return SkippedWasm(skip_reason(cfg, "Wasm"), _NOOP)
