"""``envoy.filters.http.wasm``: see ``pyproxy.filters.wasm_common`` (Istio's built-in plugins skipped)."""

from __future__ import annotations

from envoy.extensions.filters.http.wasm.v3 import wasm_pb2  # noqa: F401

from ...http.filter import HttpFilter
from ..wasm_common import SkippedWasm, skip_reason


class _Noop(HttpFilter):
    """Shared, stateless pass-through (never touches ``callbacks``)."""

    __slots__ = ()


_NOOP = _Noop(None)


def factory(cfg, ctx):
    return SkippedWasm(skip_reason(cfg, "Wasm"), _NOOP)
