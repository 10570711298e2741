"""The stats Histogram's batched recording: the same buckets, sum, count, min and max as recording
each value at once (Envoy's bucket rule: a value counts in the first bucket whose bound is >= it),
whatever reads it and whenever; the pending list stays bounded."""

import bisect
import math
import random

from pyproxy.stats import DEFAULT_BUCKETS, Histogram, Store
from pyproxy.stats.histogram import PENDING


def _reference(values, buckets=DEFAULT_BUCKETS):
    counts = [0] * (len(buckets) + 1)
    total, lo, hi = 0.0, math.inf, 0.0
    for v in values:
        counts[bisect.bisect_left(buckets, v)] += 1
        total += v
        lo = v if v < lo else lo
        hi = v if v > hi else hi
    return counts, total, len(values), lo, hi


def _state(h):
    return h.counts, h.total, h.count, h.samples_min, h.samples_max


def test_batched_equals_one_by_one():
    rnd = random.Random(7)
    pool = [0, 0.5, 1, 1.0000001, 5, 10, 25, 3600000, 3600001, 1e9]
    for n in (0, 1, PENDING - 1, PENDING, PENDING + 1, 3 * PENDING + 17):
        values = [rnd.choice(pool) if rnd.random() < 0.5 else rnd.random() * 10 ** rnd.randint(0, 7)
                  for _ in range(n)]
        h = Histogram("x")
        for i, v in enumerate(values):
            h.record(v)
            assert len(h.pending) < PENDING
            if i == n // 2:  # a read in the middle folds what is pending; recording goes on
                assert h.count == i + 1
        assert _state(h) == _reference(values)


def test_custom_buckets_and_bounds():
    buckets = (1, 2, 3)
    h = Histogram("x", buckets=buckets)
    values = [0, 1, 1, 2, 2.5, 3, 3.5, 100]
    for v in values:
        h.record(v)
    assert h.counts == [3, 1, 2, 2]
    assert _state(h) == _reference(values, buckets)


def test_quantiles_and_merge_see_pending_values():
    a, b = Histogram("a"), Histogram("b")
    for v in (1, 2, 3, 4):
        a.record(v)
    for v in (100, 200):
        b.record(v)
    assert a.used and a.quantile(1) == 4 and a.quantile(0) == 1
    a.merge_from(b)
    assert a.count == 6 and a.total == 310 and a.samples_max == 200 and not b.pending


def test_setters_fold_first():
    h = Histogram("x")
    h.record(7)
    h.count = 5  # (the workers' stats merge sets the folded state)
    assert h.count == 5 and not h.pending and h.total == 7


def test_store_prometheus_counts_pending():
    st = Store()
    h = st.histogram("cluster.c.upstream_rq_time")
    for v in (3, 30, 300):
        h.record(v)
    lines = st.prometheus().splitlines()
    assert [ln.rsplit(" ", 1)[1] for ln in lines if ln.startswith("envoy_cluster_upstream_rq_time_count")] == ["3"]
    assert [ln.rsplit(" ", 1)[1] for ln in lines if 'le="50"' in ln] == ["2"]
    assert [ln.rsplit(" ", 1)[1] for ln in lines if ln.startswith("envoy_cluster_upstream_rq_time_sum")] == ["333"]
