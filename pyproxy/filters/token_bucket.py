"""The token bucket of Envoy's local rate limits (HTTP and network ``local_ratelimit``).

Envoy's ``AtomicTokenBucketImpl``: the bucket refills continuously at ``tokens_per_fill /
fill_interval`` tokens per second up to ``max_tokens`` and starts full. Its whole state is one
time: the moment at which the bucket would have been empty, so taking a token moves that moment
forward by ``1 / rate`` and no timer runs. One event loop per process (workers are processes), so
no locking.
"""

from __future__ import annotations

import math
import time

from ..config import ConfigError, duration_s

_now = time.monotonic

MIN_FILL_INTERVAL = 0.05  # Envoy: "local rate limit token bucket fill timer must be >= 50ms"


class TokenBucket:
    __slots__ = ("max_tokens", "rate", "empty_at", "__weakref__")

    def __init__(self, max_tokens: int, tokens_per_fill: int, fill_interval: float):
        self.max_tokens = float(max_tokens)
        self.rate = max(tokens_per_fill / fill_interval, 1e-9)
        self.empty_at = _now() - self.max_tokens / self.rate  # full

    def _level(self, now: float) -> float:
        return min(self.max_tokens, (now - self.empty_at) * self.rate)

    def consume(self, n: int = 1) -> bool:
        now = _now()
        if now <= self.empty_at:
            return False
        level = self._level(now)
        if level < n:
            return False
        self.empty_at = now - (level - n) / self.rate
        return True

    def remaining(self) -> int:
        now = _now()
        return int(self._level(now)) if now > self.empty_at else 0

    def reset_seconds(self) -> int:
        """Envoy's ``x-ratelimit-reset``: whole seconds until the next token (rounded down)."""
        now = _now()
        level = self._level(now) if now > self.empty_at else 0.0
        if level >= 1:
            return 0
        return int(math.ceil((1 - level) / self.rate * 1000)) // 1000


def compile_token_bucket(tb, field: str, required_interval: bool = True) -> TokenBucket:
    """``type.v3.TokenBucket`` (max_tokens >= 1, fill_interval >= 50 ms, tokens_per_fill >= 1)."""
    if tb.max_tokens < 1:
        raise ConfigError("max_tokens must be greater than 0", field=field + ".max_tokens")
    interval = duration_s(tb, "fill_interval", None)
    if interval is None or interval <= 0:
        raise ConfigError("fill_interval is required and must be greater than 0",
                          field=field + ".fill_interval")
    if interval < MIN_FILL_INTERVAL:
        raise ConfigError("local rate limit token bucket fill timer must be >= 50ms",
                          field=field + ".fill_interval")
    per_fill = tb.tokens_per_fill.value if tb.HasField("tokens_per_fill") else 1
    if per_fill < 1:
        raise ConfigError("tokens_per_fill must be greater than 0", field=field + ".tokens_per_fill")
    return TokenBucket(tb.max_tokens, per_fill, interval)
