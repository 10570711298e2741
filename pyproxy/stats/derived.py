"""Counters whose value is read from other counters (nothing more per request): a mirror of one,
a sum of several, a difference of two. Admin ``/reset_counters`` resets what they read."""

from __future__ import annotations


class MirrorCounter:
    """A counter that reads another's value (``base``). Nothing on the data path touches it;
    resetting it is resetting its base."""

    __slots__ = ("name", "base")
    kind = "counter"

    def __init__(self, name: str, base):
        self.name = name
        self.base = base

    @property
    def value(self) -> int:
        return self.base.value

    @value.setter
    def value(self, v: int) -> None:
        pass  # (admin reset_counters resets the base)

    @property
    def used(self) -> bool:
        return self.base.value != 0


class SumCounter:
    """A counter that shows the sum of other counters (``parts``, nobody's by name) plus what
    parts that left counted (``residual``): Envoy's ``http.<prefix>.downstream_rq_<N>xx`` and
    ``listener.<address>.http.<prefix>.*`` are charged together for each request, and pyproxy
    charges one part per HCM config instead (nothing more per request)."""

    __slots__ = ("name", "parts", "residual")
    kind = "counter"

    def __init__(self, name: str):
        self.name = name
        self.parts: list = []
        self.residual = 0

    @property
    def value(self) -> int:
        v = self.residual
        for p in self.parts:
            v += p.value
        return v

    @value.setter
    def value(self, v: int) -> None:  # (admin reset_counters)
        self.residual = v
        for p in self.parts:
            p.value = 0

    @property
    def used(self) -> bool:
        return self.value != 0

    def add(self, part) -> None:
        if not any(p is part for p in self.parts):
            self.parts.append(part)

    def fold(self, part) -> None:
        """``part`` leaves (its HCM config is gone): what it counted stays in the sum."""
        for i, p in enumerate(self.parts):
            if p is part:
                del self.parts[i]
                self.residual += part.value
                return


class DiffCounter:
    """``base`` minus ``less``: Envoy's ``cluster.<c>.external.upstream_rq_*`` are what
    ``upstream_rq_*`` count for requests that are not internal (``x-envoy-internal``), and pyproxy
    charges the internal ones only (``internal.upstream_rq_*``, rare)."""

    __slots__ = ("name", "base", "less")
    kind = "counter"

    def __init__(self, name: str, base, less):
        self.name = name
        self.base = base
        self.less = less

    @property
    def value(self) -> int:
        return self.base.value - self.less.value

    @value.setter
    def value(self, v: int) -> None:
        pass  # (admin reset_counters resets both)

    @property
    def used(self) -> bool:
        return self.value != 0
