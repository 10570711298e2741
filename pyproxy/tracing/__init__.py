"""Tracing. For now: Envoy's trace decision in ``x-request-id`` (what every Istio sidecar does,
since each of its HCMs carries a provider-less ``tracing`` block and no tracer is installed by
default). No span is produced or exported: an HCM whose ``tracing.provider`` names a tracer is
reported as such by ``pyproxy validate`` and at load.
"""
