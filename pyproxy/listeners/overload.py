"""Downstream connection limits, as Envoy's overload manager and listener limits apply them.

* Global: the overload manager's resource monitor ``envoy.resource_monitors.global_downstream_max_connections``
  (``DownstreamConnectionsConfig.max_active_downstream_connections``), or, without it, the runtime
  key ``overload.global_downstream_max_connections`` (a static layer of ``layered_runtime``).
  Every listener counts towards it and is limited by it, except those with
  ``ignore_global_conn_limit``. Counted per accepted socket: a connection handed from
  virtualOutbound to the listener of its original destination counts once.
* Per listener: the runtime key ``envoy.resource_limits.listener.<listener name>.connection_limit``.

A connection over a limit is reset as it is accepted (before any listener filter) and counted as
``listener.<prefix>.downstream_global_cx_overflow`` or ``listener.<prefix>.downstream_cx_overflow``.
With ``--concurrency N`` each process enforces the limits on its own connections. The admin
listener is never limited (Envoy limits it too under the runtime key, not under the monitor).
"""

from __future__ import annotations

import logging

from ..config import ConfigError
from ..config.runtime import static_uint

log = logging.getLogger("pyproxy.config")

GLOBAL_RUNTIME_KEY = "overload.global_downstream_max_connections"
LISTENER_RUNTIME_KEY = "envoy.resource_limits.listener.%s.connection_limit"


def downstream_connections(cfg, server) -> None:
    """Resource monitor factory for ``DownstreamConnectionsConfig``: the global limit."""
    n = cfg.max_active_downstream_connections
    if n <= 0:
        raise ConfigError("max_active_downstream_connections must be greater than 0",
                          field="overload_manager.resource_monitors")
    server.listener_manager.global_limit = n
    log.info("overload: at most %d active downstream connections (resource monitor)", n)


def configure_runtime(server) -> None:
    """The runtime keys: the global limit (when no resource monitor set one) and, for each
    listener as it is installed, its own limit."""
    lm = server.listener_manager
    lm.runtime_bootstrap = server.bootstrap
    if lm.global_limit is None:
        n = static_uint(server.bootstrap, GLOBAL_RUNTIME_KEY)
        if n is not None:
            lm.global_limit = n
            log.info("overload: at most %d active downstream connections (runtime %s)", n,
                     GLOBAL_RUNTIME_KEY)


def listener_limit(bootstrap, name: str) -> int | None:
    return static_uint(bootstrap, LISTENER_RUNTIME_KEY % name)
