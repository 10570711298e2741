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
- a traced request outside ``overall_sampling`` goes back to not traced (``4``);
- a route with a ``tracing`` block replaces the three rates with its own (each 100% when unset).

Checked against Envoy 1.40 (tests/test_tracing_request_id.py).
"""

from __future__ import annotations

import itertools
import os
import random

from ..config import ConfigError
from ..http.headers import Headers

_new = object.__new__

# -- request ids -----------------------------------------------------------------------------------
# Random (version 4) UUIDs, made in batches: one big random number, masked for the version and
# variant bits of every id at once, hex-encoded, and laid out as ``8-4-4-4-12`` by strided slice
# copies (a fixed number of C-level operations per batch). A request takes the next one.
# The bits come from the operating system's CSPRNG (``os.urandom``, as ``uuid.uuid4`` and Envoy's
# ``RAND_bytes``): request ids must not be predictable from ids a client has seen, so never from
# ``random``'s Mersenne Twister, whose state a few hundred observed ids would give away.
_BATCH = 256
_KEEP = 0xffffffffffff0fff3fffffffffffffff  # clears the version nibble and the variant's top bits
_SET = 0x00000000000040008000000000000000   # version 4, variant 10xx (RFC 9562)
_KEEP_N = sum(_KEEP << (128 * i) for i in range(_BATCH))
_SET_N = sum(_SET << (128 * i) for i in range(_BATCH))
# (column of a 32-digit hex id, column in its 37-byte "8-4-4-4-12\n" line)
_COLUMNS = tuple((c, c + (c >= 8) + (c >= 12) + (c >= 16) + (c >= 20)) for c in range(32))
_urandom = os.urandom
_from_bytes = int.from_bytes
_batch_ids: list = []  # the batch being drawn from


def _batch(_=None) -> list:
    """The next ``_BATCH`` ids."""
    global _batch_ids
    n = _BATCH
    digits = (_from_bytes(_urandom(16 * n), "big") & _KEEP_N | _SET_N).to_bytes(16 * n, "big").hex().encode()
    out = bytearray(b"-" * (37 * n))
    for c, d in _COLUMNS:
        out[d::37] = digits[c::32]
    out[36::37] = b"\n" * n
    ids = out.decode("ascii").split("\n")
    ids.pop()  # (after the last newline)
    _batch_ids = ids
    return ids


# ``uuid4()``: a random (version 4) UUID in its canonical lower-case form, for ``x-request-id``:
# the next id of an endless chain of batches, each made when the one before is used up (a call
# made in C: no Python frame per request id)
uuid4 = itertools.chain.from_iterable(map(_batch, itertools.repeat(None))).__next__


def _forget_ids() -> None:
    # a forked worker draws its own: the batch in progress is emptied, so the chain goes on to a
    # batch made in the child (a batch is never shared with the parent)
    _batch_ids.clear()


os.register_at_fork(after_in_child=_forget_ids)

_SAMPLED, _FORCED, _CLIENT, _NOT = "9", "a", "b", "4"
_TRACED = frozenset((_SAMPLED, _FORCED, _CLIENT))


class TraceSampler:
    """Each rate is a ``(numerator, denominator)`` pair, Envoy's ``featureEnabled`` over a value:
    ``value % denominator < numerator``. ``routes``: the HCM's route provider; when its current
    table has a route with a ``tracing`` block (``RouteTable.trace_routes``), the request's route is
    looked up here and its rates replace the HCM's (Envoy's ``mutateTracingRequestHeader``)."""

    __slots__ = ("client", "random", "overall", "routes")

    def __init__(self, client, random_, overall, routes=None):
        self.client = client     # a random draw (Envoy's runtime featureEnabled)
        self.random = random_    # over the request id's value (first 8 hex digits mod 10000)
        self.overall = overall   # over the request id's value
        self.routes = routes

    def _for_route(self, h):
        """The sampler for this request: its route's, when it has one, else this HCM's."""
        table = self.routes.table if self.routes is not None else None
        if table is None or not table.trace_routes:
            return self
        hd = _new(Headers)
        hd._h = h
        route = table.find(hd, None, 0)
        rt = route.trace if route is not None else None
        return rt.sampler if rt is not None else self

    def fresh(self, rid: str, h=None) -> str:
        """A request id the proxy just generated, on a request with neither x-client-trace-id nor
        x-envoy-force-trace: only random and overall sampling apply."""
        s = self._for_route(h) if h is not None and self.routes is not None else self
        try:
            result = int(rid[:8], 16) % 10000
        except ValueError:
            return rid
        r, o = s.random, s.overall
        if result % r[1] < r[0] and result % o[1] < o[0]:
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
        s = self._for_route(h) if self.routes is not None else self
        full = len(rid) == 36
        reason = rid[14] if full and rid[14] in _TRACED else None
        if reason is None:
            client = force = False
            for k, _ in h:
                if k == "x-client-trace-id":
                    client = True
                elif k == "x-envoy-force-trace":
                    force = True
            c, r = s.client, s.random
            if client and random.getrandbits(32) % c[1] < c[0]:
                reason = _CLIENT
            elif force:
                reason = _FORCED
            elif result % r[1] < r[0]:
                reason = _SAMPLED
        o = s.overall
        if reason is not None and not result % o[1] < o[0]:
            reason = _NOT
        if reason is None or not full or rid[14] == reason:
            return rid
        new = rid[:14] + reason + rid[15:]
        for i, kv in enumerate(h):
            if kv[0] == "x-request-id":
                h[i] = ("x-request-id", new)
                break
        return new


class RouteTrace:
    """A route's ``tracing`` block (``config.route.v3.Tracing``), compiled with the route: its
    sampling rates (each defaults to 100%; together they replace the HCM's for requests on the
    route) and its custom tags (set on the span after the HCM's)."""

    __slots__ = ("sampler", "tags")

    def __init__(self, sampler, tags):
        self.sampler = sampler
        self.tags = tags


_DENOMINATORS = (100, 10000, 1000000)  # type.v3.FractionalPercent.DenominatorType


def _fraction(t, field: str):
    if not t.HasField(field):
        return (100, 100)
    f = getattr(t, field)
    if f.denominator >= len(_DENOMINATORS):
        raise ConfigError("unknown denominator %d" % f.denominator, field=field + ".denominator")
    return (f.numerator, _DENOMINATORS[f.denominator])


def compile_route_trace(t) -> RouteTrace:
    """``config.route.v3.Tracing`` -> ``RouteTrace``; ``ConfigError`` for what is not acted on."""
    from .custom_tags import compile_custom_tags
    if t.operation:
        raise ConfigError("tracing.operation (a span name format) is not supported", field="operation")
    if t.upstream_operation:
        raise ConfigError("tracing.upstream_operation is not supported (no upstream spans)",
                          field="upstream_operation")
    sampler = TraceSampler(_fraction(t, "client_sampling"), _fraction(t, "random_sampling"),
                           _fraction(t, "overall_sampling"))
    return RouteTrace(sampler, tuple(compile_custom_tags(t.custom_tags, "custom_tags")))


def _pct_100(tracing, field) -> int:
    return int(getattr(tracing, field).value) if tracing.HasField(field) else 100


def compile_trace_sampler(hcm, routes=None) -> TraceSampler | None:
    """The HCM's sampler, or None when nothing is written into x-request-id. ``routes``: the
    HCM's route provider (its ``table`` is read per request for route-level overrides)."""
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
    return TraceSampler((_pct_100(t, "client_sampling"), 100), (rnd, 10000),
                        (_pct_100(t, "overall_sampling"), 100), routes)
