"""Envoy's ``cluster.<c>.circuit_breakers.<priority>.{cx_open,rq_pending_open,rq_open,rq_retry_open,
cx_pool_open}`` gauges: 1 while that resource is at its limit. Read from the cluster's counts when
the stats are shown (``FuncGauge``), so nothing on the data path updates them. pyproxy's requests
are all of the default priority, so the high ones stay 0; it has no ``max_connection_pools`` limit,
so ``cx_pool_open`` stays 0."""

from __future__ import annotations


class FuncGauge:
    """A gauge read from ``fn()`` when shown; nothing sets it."""

    __slots__ = ("name", "fn", "accumulate")
    kind = "gauge"
    used = True

    def __init__(self, name: str, fn, accumulate: bool = False):
        self.name = name
        self.fn = fn
        self.accumulate = accumulate

    @property
    def value(self) -> int:
        return int(self.fn())

    @value.setter
    def value(self, v: int) -> None:
        pass

    def set(self, v: int) -> None:
        pass

    inc = dec = set


def _retry_open(c) -> bool:
    b = c.retry_budget
    if b is None:
        return c.retries_active >= c.max_retries
    return c.retries_active >= max(int(b[0] / 100.0 * (c.rq_active_total - c.retries_in_backoff)), b[1])


def _func_gauge(scope, name: str, fn) -> None:
    store = scope.store
    full = scope.prefix + name
    g = store.gauges.get(full)
    if g is None:
        if store.rejects is not None and store.rejects(full):
            return  # (stats_config.stats_matcher)
        g = store.gauges[full] = FuncGauge(full, fn)
    elif g.__class__ is FuncGauge:
        g.fn = fn  # (a cluster updated in place of its predecessor: read the new one)
    if scope.owned is not None:
        scope.owned.own(g)


def breaker_gauges(c, scope) -> None:
    for n, fn in (("cx_open", lambda: c.cx_total_active >= c.max_connections),
                  ("rq_pending_open", lambda: c.pending_total >= c.max_pending_requests),
                  ("rq_open", lambda: c.rq_attached >= c.max_requests),
                  ("rq_retry_open", lambda: _retry_open(c)), ("cx_pool_open", int)):
        _func_gauge(scope, "circuit_breakers.default." + n, fn)
        _func_gauge(scope, "circuit_breakers.high." + n, int)
    # track_remaining (Istio sets it on every cluster): remaining_* per priority, decided here
    track = {"default": False, "high": False}
    for t in c.proto.circuit_breakers.thresholds:
        if t.track_remaining:
            track["high" if t.priority else "default"] = True
    if track["default"]:
        for n, fn in _remaining(c):
            _func_gauge(scope, "circuit_breakers.default." + n, fn)
    if track["high"]:
        th = c.thresholds["high"]  # (no request is of the high priority: nothing in use)
        for n, v in (("remaining_cx", th[0]), ("remaining_pending", th[1]), ("remaining_rq", th[2]),
                     ("remaining_retries", th[3]), ("remaining_cx_pools", _U64_MAX)):
            _func_gauge(scope, "circuit_breakers.high." + n, lambda v=v: v)


_U64_MAX = (1 << 64) - 1  # (max_connection_pools unset: no limit)


def _retry_limit(c) -> int:
    b = c.retry_budget
    if b is None:
        return c.max_retries
    return max(int(b[0] / 100.0 * (c.rq_active_total - c.retries_in_backoff)), b[1])


def _remaining(c):
    """Envoy's remaining_* gauges of the default priority: limit less what is in use."""
    def pools():
        return len(c.pools) + len(c.__dict__.get("alpn_pools", ()))
    return (("remaining_cx", lambda: max(0, c.max_connections - c.cx_total_active)),
            ("remaining_pending", lambda: max(0, c.max_pending_requests - c.pending_total)),
            ("remaining_rq", lambda: max(0, c.max_requests - c.rq_attached)),
            ("remaining_retries", lambda: max(0, _retry_limit(c) - c.retries_active)),
            ("remaining_cx_pools", lambda: _U64_MAX - pools()))
