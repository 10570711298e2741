"""``envoy.filters.network.local_ratelimit``: a token bucket of new connections.

Each new connection takes a token; with none left it is closed at once (no flush), before any
later network filter sees it, counted in ``local_rate_limit.<stat_prefix>.rate_limited``, with
Envoy's response flag (``URX``) and termination details (``local_ratelimit_close_over_limit``).
``runtime_enabled`` (its ``default_value``; pyproxy's runtime is static) turns the check off.
Filters with the same ``share_key`` and token bucket share one bucket, as in Envoy; without a
share key each filter config has its own. The bucket refills continuously
(``filters/token_bucket.py``).
"""

from __future__ import annotations

import weakref

from envoy.extensions.filters.network.local_ratelimit.v3 import local_rate_limit_pb2

from ...config import ConfigError
from ...http.filter import CONTINUE, STOP
from ..token_bucket import compile_token_bucket
from . import NetworkFilter

# (share_key, serialized token bucket) -> bucket, while some filter config uses it
_SHARED = weakref.WeakValueDictionary()


class LocalRateLimitNetworkFactory:
    __slots__ = ("bucket", "enabled", "st_rate_limited")

    def __init__(self, cfg, ctx):
        if not cfg.stat_prefix:
            raise ConfigError("stat_prefix must not be empty", field="LocalRateLimit.stat_prefix")
        if not cfg.HasField("token_bucket"):
            raise ConfigError("token_bucket is required", field="LocalRateLimit.token_bucket")
        key = None
        if cfg.share_key:
            key = (cfg.share_key, cfg.token_bucket.SerializeToString(deterministic=True))
            b = _SHARED.get(key)
        else:
            b = None
        if b is None:
            b = compile_token_bucket(cfg.token_bucket, "LocalRateLimit.token_bucket")
            if key is not None:
                _SHARED[key] = b
        self.bucket = b
        self.enabled = cfg.runtime_enabled.default_value.value if cfg.HasField("runtime_enabled") \
            else True
        self.st_rate_limited = ctx.stats.counter("local_rate_limit.%s.rate_limited" % cfg.stat_prefix)

    def create(self, conn):
        return LocalRateLimitNetworkFilter(conn, self)


class LocalRateLimitNetworkFilter(NetworkFilter):
    __slots__ = ()

    def on_new_connection(self):
        f = self.f
        if not f.enabled or f.bucket.consume():
            return CONTINUE
        f.st_rate_limited.value += 1
        conn = self.conn
        si = conn.stream_info
        si.response_flags.add("URX")
        si.connection_termination_details = "local_ratelimit_close_over_limit"
        conn.close(flush=False)
        return STOP


def factory(cfg, ctx, terminal=False):
    if terminal:
        raise ConfigError("the local_ratelimit network filter must not be the last filter")
    if not isinstance(cfg, local_rate_limit_pb2.LocalRateLimit):
        raise ConfigError("expected envoy.extensions.filters.network.local_ratelimit.v3.LocalRateLimit")
    return LocalRateLimitNetworkFactory(cfg, ctx)
