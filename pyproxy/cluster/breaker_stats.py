"""Envoy's ``cluster.<c>.circuit_breakers.<priority>.{cx_open,rq_pending_open,rq_open,rq_retry_open,
cx_pool_open}`` gauges: 1 while that resource is at its limit. Read from the cluster's counts when
the stats are shown (``FuncGauge``), so nothing on the data path updates them. pyproxy's requests
are all of the default priority, so the high ones stay 0; it has no ``max_connection_pools`` limit,
so ``cx_pool_open`` stays 0."""

from __future__ import annotations


def _retry_open(c) -> bool:
    b = c.retry_budget
    if b is None:
        return c.retries_active >= c.max_retries
    return c.retries_active >= max(int(b[0] / 100.0 * (c.rq_active_total - c.retries_in_backoff)), b[1])


def breaker_gauges(c, scope) -> None:
    for n, fn in (("cx_open", lambda: c.cx_total_active >= c.max_connections),
                  ("rq_pending_open", lambda: c.pending_total >= c.max_pending_requests),
                  ("rq_open", lambda: c.rq_attached >= c.max_requests),
                  ("rq_retry_open", lambda: _retry_open(c)), ("cx_pool_open", int)):
        scope.func_gauge("circuit_breakers.default." + n, fn)
        scope.func_gauge("circuit_breakers.high." + n, int)
