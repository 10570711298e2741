"""Wasm filters (``envoy.filters.http.wasm`` / ``envoy.filters.network.wasm``): pyproxy has no Wasm VM.

Istio ships its own extensions as *null-VM* plugins compiled into its Envoy build, referenced by name
(``vm_config.runtime: envoy.wasm.runtime.null``, ``code.local.inline_string: envoy.wasm.<plugin>``).
Those are telemetry/metadata plugins whose absence is safe; they are skipped with a reason. A plugin
with ``fail_open`` (or ``failure_policy: FAIL_OPEN``) tells the proxy to let traffic through when the
plugin cannot run, so it is skipped too. Any other Wasm plugin would change traffic in ways pyproxy
cannot reproduce: rejected with a message.
"""

from __future__ import annotations

from ..config import ConfigError
from ..config.registry import type_name_of

NULL_VM = "envoy.wasm.runtime.null"
# Istio's built-in null-VM plugins and why skipping each is safe
BUILTIN = {
    "envoy.wasm.metadata_exchange": "Istio's metadata exchange plugin: peer metadata is not exchanged "
                                    "(telemetry lacks peer labels); traffic is unchanged",
    "envoy.wasm.stats": "Istio's stats plugin: istio_* telemetry is not emitted yet",
    "envoy.wasm.attributegen": "Istio's attribute generation plugin: only feeds telemetry",
}
FAIL_OPEN = 1  # wasm.v3.FailurePolicy.FAIL_OPEN


class SkippedWasm:
    """A Wasm plugin that is known safe to skip: passes everything through; ``skip_reason`` says why."""

    __slots__ = ("skip_reason", "notes", "_noop")

    def __init__(self, reason: str, noop):
        self.skip_reason = reason
        self.notes = ()
        self._noop = noop

    def create(self, owner):
        return self._noop


def is_metadata_exchange(cfg) -> bool:
    """Istio's null-VM ``envoy.wasm.metadata_exchange`` (compiled as the HTTP peer_metadata filter)."""
    vm = cfg.config.vm_config
    if vm.runtime != NULL_VM or not vm.code.HasField("local"):
        return False
    loc = vm.code.local
    return loc.WhichOneof("specifier") == "inline_string" and loc.inline_string == "envoy.wasm.metadata_exchange"


def skip_reason(cfg, what: str) -> str:
    """Why the Wasm config ``cfg`` can be skipped; ConfigError when it cannot."""
    pc = cfg.config
    vm = pc.vm_config
    code = ""
    if vm.code.HasField("local"):
        loc = vm.code.local
        code = loc.inline_string if loc.WhichOneof("specifier") == "inline_string" else ""
    cfg_type = type_name_of(pc.configuration) if pc.HasField("configuration") and pc.configuration.type_url else ""
    if vm.runtime == NULL_VM and code in BUILTIN:
        return "%s (%s)" % (BUILTIN[code], code)
    if pc.fail_open or pc.failure_policy == FAIL_OPEN:
        return "Wasm plugin '%s' cannot run (no Wasm runtime in pyproxy); skipped because it is fail-open" \
            % (pc.name or code or cfg_type)
    raise ConfigError("Wasm plugin '%s' (runtime %s) cannot run: pyproxy has no Wasm runtime and only "
                      "skips Istio's built-in null-VM plugins or fail-open plugins"
                      % (pc.name or code or "?", vm.runtime or "?"), field="%s.config" % what)
