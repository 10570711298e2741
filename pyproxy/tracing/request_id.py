"""The trace decision Envoy packs into ``x-request-id`` (``ConnectionManagerUtility::
mutateTracingRequestHeader`` with the UUID request-id extension), compiled once per HCM.

Only when the HCM has a ``tracing`` block and the request-id extension is UUID with
``pack_trace_reason`` and ``use_request_id_for_trace_sampling`` (both default true). Per request,
after the request id is set (``request_prep``):

- the id's first 8 hex digits, mod 10000, are the sampling value (no id, or not hex: nothing);
- character 14 of a 36-character id holds the reason: ``9`` sampled, ``a`` forced, ``b`` client;
  an id that already carries one keeps it;
- otherwise: ``x-client-trace-id`` and a ``client_sampling`` draw -> ``b``; else
  ``x-envoy-force-trace`` (only an internal request still has it) -> ``a``; else
  ``random_sampling`` (a percentage, out of 10000) over the sampling value -> ``9``;
- a traced request outside ``overall_sampling`` goes back to not traced (``4``).

Checked against Envoy 1.40 (tests/test_tracing_request_id.py).
"""

from __future__ import annotations

import random

from ..config import ConfigError

_SAMPLED, _FORCED, _CLIENT, _NOT = "9", "a", "b", "4"
_TRACED = frozenset((_SAMPLED, _FORCED, _CLIENT))


class TraceSampler:
    __slots__ = ("client", "random", "overall")

    def __init__(self, client: int, random_: int, overall: int):
        self.client = client     # out of 100 (a random draw, as Envoy's runtime featureEnabled)
        self.random = random_    # out of 10000, over the request id's value
        self.overall = overall   # out of 100, over the request id's value

    def fresh(self, rid: str) -> str:
        """A request id the proxy just generated, on a request with neither x-client-trace-id nor
        x-envoy-force-trace: only random and overall sampling apply."""
        try:
            result = int(rid[:8], 16) % 10000
        except ValueError:
            return rid
        if result < self.random and result % 100 < self.overall:
            return rid[:14] + _SAMPLED + rid[15:]
        return rid

    def apply(self, h: list, rid: str) -> str:
        """The full decision on a request's header list; returns the (possibly changed) id."""
        if len(rid) < 8:
            return rid
        try:
            result = int(rid[:8], 16) % 10000
        except ValueError:
            return rid
        full = len(rid) == 36
        reason = rid[14] if full and rid[14] in _TRACED else None
        if reason is None:
            client = force = False
            for k, _ in h:
                if k == "x-client-trace-id":
                    client = True
                elif k == "x-envoy-force-trace":
                    force = True
            if client and random.getrandbits(32) % 100 < self.client:
                reason = _CLIENT
            elif force:
                reason = _FORCED
            elif result < self.random:
                reason = _SAMPLED
        if reason is not None and not result % 100 < self.overall:
            reason = _NOT
        if reason is None or not full or rid[14] == reason:
            return rid
        new = rid[:14] + reason + rid[15:]
        for i, kv in enumerate(h):
            if kv[0] == "x-request-id":
                h[i] = ("x-request-id", new)
                break
        return new


def _pct_100(tracing, field) -> int:
    return int(getattr(tracing, field).value) if tracing.HasField(field) else 100


def compile_trace_sampler(hcm) -> TraceSampler | None:
    """The HCM's sampler, or None when nothing is written into x-request-id."""
    if not hcm.HasField("tracing"):
        return None
    if hcm.HasField("request_id_extension"):
        tc = hcm.request_id_extension.typed_config
        t = tc.type_url.rpartition("/")[2]
        if t != "envoy.extensions.request_id.uuid.v3.UuidRequestIdConfig":
            raise ConfigError("request id extension '%s' is not supported (only UuidRequestIdConfig)" % t,
                              field="request_id_extension")
        from envoy.extensions.request_id.uuid.v3 import uuid_pb2
        u = uuid_pb2.UuidRequestIdConfig()
        tc.Unpack(u)
        if u.HasField("pack_trace_reason") and not u.pack_trace_reason.value:
            return None
        if u.HasField("use_request_id_for_trace_sampling") and not u.use_request_id_for_trace_sampling.value:
            return None
    t = hcm.tracing
    rnd = int(round(t.random_sampling.value * 100)) if t.HasField("random_sampling") else 10000
    return TraceSampler(_pct_100(t, "client_sampling"), rnd, _pct_100(t, "overall_sampling"))
