"""Envoy's internal/external split of a cluster's response-code stats, and the
``x-envoy-upstream-alt-stat-name`` stats of an internal request.

``cluster.<c>.external.upstream_rq_<code>`` / ``_<N>xx`` / ``_completed`` are made with the
cluster's own counter of a code (at its first response) and read it less the internal ones
(``DiffCounter``), so a request that is not internal costs nothing more. An internal request
(``x-envoy-internal: true``, which the proxy sets for requests from ``internal_address_config``
addresses; it always goes through the router, ``Prepared.ctl``) is charged here, once per response:
``internal.upstream_rq_*``, and with an ``x-envoy-upstream-alt-stat-name: <alt>`` header (consumed by
the request preparation) ``<alt>.upstream_rq_*`` and ``<alt>.internal.upstream_rq_*``, as Envoy's
router charges them. The counters of a (code, alt) are made once and kept on the cluster;
distinct alt names per cluster are bounded (``MAX_ALT_NAMES``; others are not charged)."""

from __future__ import annotations

from ..stats import Counter, DiffCounter

ALT_HEADER = "x-envoy-upstream-alt-stat-name"
MAX_ALT_NAMES = 64
MAX_ALT_LEN = 128
_ZERO = Counter("(never charged)")


def rq_class(cluster, k: int):
    """The cluster's ``upstream_rq_<k>xx`` (made on first use, as Envoy's), or None outside 1-5."""
    c = cluster.st_rq_class.get(k)
    if c is None and 1 <= k <= 5:
        c = cluster.st_rq_class[k] = cluster.scope.counter("upstream_rq_%dxx" % k)
    return c


def make_external(cluster, status: int, cs) -> None:
    """The ``external.*`` counters of ``status`` (``cs``: its code and class counters), made with
    the first response of that code."""
    sc = cluster.scope
    store = sc.store
    for name, base in (("upstream_rq_%d" % status, cs[0]),
                       ("upstream_rq_%dxx" % (status // 100), cs[1]),
                       ("upstream_rq_completed", cluster.st_rq_completed)):
        if base is None:
            continue
        full = sc.prefix + "external." + name
        if full in store.counters:
            continue
        internal = store.counters.get(sc.prefix + "internal." + name)
        c = DiffCounter(full, base, internal if internal is not None else _ZERO)
        if store.rejects is None or not store.rejects(full):
            store.counters[full] = c
            if sc.owned is not None:
                sc.owned.own(c)


def _names(status: int) -> tuple:
    k = status // 100
    return ("upstream_rq_%d" % status,) + (("upstream_rq_%dxx" % k,) if 1 <= k <= 5 else ()) + ("upstream_rq_completed",)


def _counters(cluster, status: int, alt) -> tuple:
    d = cluster.__dict__
    cache = d.get("_internal_codes")
    if cache is None:
        cache = d["_internal_codes"] = {}
        d["_alt_names"] = set()
    got = cache.get((status, alt))
    if got is not None:
        return got
    alts = d["_alt_names"]
    if alt is not None and alt not in alts:
        if len(alts) >= MAX_ALT_NAMES:
            return _counters(cluster, status, None)
        alts.add(alt)
    sc = cluster.scope
    store = sc.store
    out = []
    for name in _names(status):
        c = sc.counter("internal." + name)
        out.append(c)
        ext = store.counters.get(sc.prefix + "external." + name)
        if type(ext) is DiffCounter:
            ext.less = c
    if alt is not None:
        for name in _names(status):
            out.append(sc.counter("%s.%s" % (alt, name)))
            out.append(sc.counter("%s.internal.%s" % (alt, name)))
    got = cache[(status, alt)] = tuple(out)
    return got


def charge_internal(cluster, status: int, ctl: dict) -> None:
    """An internal request's response of ``status`` (after ``Cluster.count_response``)."""
    alt = ctl.get(ALT_HEADER) if ctl else None
    if alt is not None and (not alt or len(alt) > MAX_ALT_LEN):
        alt = None
    for c in _counters(cluster, status, alt):
        c.value += 1
