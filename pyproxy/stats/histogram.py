"""The fixed-bucket ``Histogram`` of the stats store (``pyproxy.stats``), with a data-path
``record`` of a few opcodes."""

from __future__ import annotations

import bisect
import math

# Envoy's default histogram buckets (milliseconds or whatever unit the stat uses).
DEFAULT_BUCKETS = (0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000,
                   300000, 600000, 1800000, 3600000)
PENDING = 256  # values a histogram holds before folding them into its buckets
QUANTILES = (0, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999, 1)


class Histogram:
    """Fixed-bucket histogram; quantiles are interpolated inside buckets as Envoy's summary does.

    ``record`` only appends the value to a short pending list (a few opcodes on the data path);
    the values are folded into the buckets, sum, count, min and max in C-level batches (a sort and
    one bisection per bucket bound) when the list is full (``PENDING`` values, so memory stays
    bounded) and before anything reads them (``counts``, ``total``, ``count``, ``samples_min``,
    ``samples_max``, ``quantile``, ``merge_from``)."""

    __slots__ = ("name", "unit", "_counts", "_total", "_count", "_min", "_max", "buckets", "pending")
    kind = "histogram"

    def __init__(self, name: str, unit: str = "ms", buckets: tuple = DEFAULT_BUCKETS):
        self.name = name
        self.unit = unit
        self.buckets = buckets  # upper bounds (the bootstrap's histogram_bucket_settings, else Envoy's)
        self._counts = [0] * (len(buckets) + 1)
        self._total = 0.0
        self._count = 0
        self._min = math.inf
        self._max = 0.0
        self.pending: list = []

    def record(self, v: float) -> None:
        p = self.pending
        p.append(v)
        if len(p) >= PENDING:
            self.fold()

    def fold(self) -> None:
        """Move the pending values into the buckets (a value ``v`` counts in the first bucket whose
        bound is ``>= v``, the last one past every bound)."""
        p = self.pending
        if not p:
            return
        self.pending = []
        self._total = _sum(p, self._total)  # (in recording order, as one addition per value)
        p.sort()
        n = len(p)
        counts = self._counts
        prev = 0
        i = 0
        for b in self.buckets:
            at = _bisect_right(p, b, prev)
            if at != prev:
                counts[i] += at - prev
                prev = at
            i += 1
        if prev != n:
            counts[i] += n - prev
        self._count += n
        if p[0] < self._min:
            self._min = p[0]
        if p[-1] > self._max:
            self._max = p[-1]

    # the folded state (read by the admin renderers, the workers' stats merge and tests)
    @property
    def counts(self) -> list:
        if self.pending:
            self.fold()
        return self._counts

    @counts.setter
    def counts(self, v) -> None:
        self.fold()
        self._counts = v

    @property
    def total(self) -> float:
        if self.pending:
            self.fold()
        return self._total

    @total.setter
    def total(self, v) -> None:
        self.fold()
        self._total = v

    @property
    def count(self) -> int:
        if self.pending:
            self.fold()
        return self._count

    @count.setter
    def count(self, v) -> None:
        self.fold()
        self._count = v

    @property
    def samples_min(self) -> float:
        if self.pending:
            self.fold()
        return self._min

    @samples_min.setter
    def samples_min(self, v) -> None:
        self.fold()
        self._min = v

    @property
    def samples_max(self) -> float:
        if self.pending:
            self.fold()
        return self._max

    @samples_max.setter
    def samples_max(self, v) -> None:
        self.fold()
        self._max = v

    @property
    def used(self) -> bool:
        return self._count != 0 or bool(self.pending)

    def quantile(self, q: float) -> float:
        if not self.count:
            return math.nan
        if q <= 0:
            return self._min
        if q >= 1:
            return self._max
        rank = q * self._count
        seen = 0
        lower = 0.0
        b = self.buckets
        for i, c in enumerate(self._counts):
            upper = b[i] if i < len(b) else self._max
            if c and seen + c >= rank:
                frac = (rank - seen) / c
                lo = max(lower, self._min)
                hi = min(upper, self._max)
                return lo + (hi - lo) * frac
            seen += c
            lower = upper
        return self._max

    def merge_from(self, other: "Histogram") -> None:
        self.fold()
        counts = self._counts
        for i, c in enumerate(other.counts):
            counts[i] += c
        self._total += other.total
        self._count += other.count
        self._min = min(self._min, other.samples_min)
        self._max = max(self._max, other.samples_max)


_bisect_right = bisect.bisect_right
_sum = sum
