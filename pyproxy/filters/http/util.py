"""Helpers shared by pyproxy's HTTP filters: per-HCM stats, per-route config lookup, percentages."""

from __future__ import annotations

import logging
import random

from ...config import ConfigError
from ...config.registry import unpack_any

log = logging.getLogger("pyproxy.filter")

_DENOMS = {0: 100, 1: 10000, 2: 1000000}  # FractionalPercent.DenominatorType


def fraction(fp, field: str, default=None):
    """``type.v3.FractionalPercent`` as a probability in [0, 1] (``default`` when unset)."""
    if fp is None:
        return default
    d = _DENOMS.get(fp.denominator)
    if d is None:
        raise ConfigError("unknown denominator %d" % fp.denominator, field=field + ".denominator")
    return min(1.0, fp.numerator / d)


def hit(p: float) -> bool:
    return p >= 1.0 or (p > 0.0 and random.random() < p)


class HcmStats:
    """Counters a filter keeps under ``http.<hcm stat_prefix>.<suffix>``, made on first use per HCM.

    HTTP filter factories are built without the HCM's stat prefix; the stream knows it
    (``stream.cfg.stat_prefix``), so counters are created on the first request and cached.
    """

    __slots__ = ("store", "suffix", "names", "_by_prefix")

    def __init__(self, store, suffix: str, names):
        self.store = store
        self.suffix = suffix
        self.names = tuple(names)
        self._by_prefix = {}

    def get(self, stream) -> dict:
        cfg = getattr(stream, "cfg", None)
        prefix = getattr(cfg, "stat_prefix", "") or "unknown"
        d = self._by_prefix.get(prefix)
        if d is None:
            scope = "http.%s.%s" % (prefix, self.suffix)
            d = self._by_prefix[prefix] = {n: self.store.counter(scope + n) for n in self.names}
        return d


class PerRoute:
    """Compiled per-route configs (``typed_per_filter_config[filter_name]``), cached by content."""

    __slots__ = ("filter_names", "compile", "_cache")

    def __init__(self, filter_names, compile_fn):
        self.filter_names = tuple(filter_names)
        self.compile = compile_fn  # (message) -> compiled object
        self._cache = {}

    def lookup(self, stream):
        """The compiled per-route config for the stream's route, or None."""
        route = getattr(stream, "route", None)
        if route is None:
            return None
        get = getattr(route, "per_filter_config", None)
        if get is None:
            return None
        for n in self.filter_names:
            a = get(n)
            if a is not None:
                break
        else:
            return None
        key = (a.type_url, a.value)
        c = self._cache.get(key)
        if c is None:
            if len(self._cache) > 4096:
                self._cache.clear()
            try:
                c = self.compile(_unwrap_config(a))
            except ConfigError as e:  # routes are compiled without their filters' per-route configs
                log.warning("invalid per-route config for %s on route '%s' ignored: %s",
                            self.filter_names[0], getattr(route, "name", ""), e)
                c = False
            self._cache[key] = c
        return c or None


def _unwrap_config(a):
    from ...config.registry import type_name_of
    if type_name_of(a) == "envoy.config.route.v3.FilterConfig":
        from envoy.config.route.v3 import route_components_pb2
        fc = route_components_pb2.FilterConfig()
        a.Unpack(fc)
        return unpack_any(fc.config)
    return unpack_any(a)
