"""What the admin server reads from, and asks of, the rest of the process.

The server owns nothing: the process layer passes an object satisfying ``AdminContext``. Every
method is called on the event loop that runs the admin server and must not block; the ones that
start work (quit, drain) schedule it and return.

Shapes (plain dicts, so the context needs no admin imports):

``server_info()`` -> dict merged over the admin's defaults; usually ``command_line_options``
(Envoy's names: ``concurrency``, ``config_path``, ``log_level``, ``drain_time`` ("45s")...)
and ``node`` (the bootstrap node as JSON). ``version``, ``state``, ``uptime_current_epoch``,
``uptime_all_epochs`` and ``hot_restart_version`` are filled in when absent.

``config_dump(resource, include_eds)`` -> ``{"configs": [...]}`` as Envoy's ConfigDump JSON with
proto field names (``json_format.MessageToDict(dump, preserving_proto_field_name=True)``):
Bootstrap, Clusters, Listeners, ScopedRoutes, Routes, Secrets dumps (+ Endpoints when
``include_eds``). ``resource`` is a hint only: the admin applies resource/mask/name_regex itself.

``clusters_status()`` -> list of::

    {"name": "c1", "observability_name": "c1", "added_via_api": False,
     "circuit_breakers": {"default": {"max_connections": 1024, "max_pending_requests": 1024,
                                      "max_requests": 1024, "max_retries": 3},
                          "high": {...}},                    # missing -> Envoy's defaults
     "hosts": [{"address": "10.0.0.1", "port": 8080,           # port None -> a pipe path
                "hostname": "", "stats": {"cx_active": 0, "cx_connect_fail": 0, "cx_total": 0,
                "rq_active": 0, "rq_error": 0, "rq_pending_active": 0, "rq_success": 0,
                "rq_timeout": 0, "rq_total": 0},
                "health_flags": [],          # Envoy flag names: "failed_active_hc",
                                             # "failed_outlier_check", "failed_eds_health",
                                             # "degraded_active_hc", "degraded_eds_health",
                                             # "pending_dynamic_removal", "pending_active_hc",
                                             # "excluded_via_immediate_hc_fail",
                                             # "active_hc_timeout", "eds_status_draining"
                "weight": 1, "region": "", "zone": "", "sub_zone": "", "canary": False,
                "priority": 0, "success_rate": -1, "local_origin_success_rate": -1}]}

``listeners_status()`` -> list of ``{"name": "l1", "local_address": "127.0.0.1:15001",
"additional_local_addresses": ["[::]:15001"]}`` (the last key optional).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from pyproxy.stats import Store

# Envoy's server states, as /ready and server_info print them; ``server.state`` gauge values.
STATES = {"LIVE": 0, "DRAINING": 1, "PRE_INITIALIZING": 2, "INITIALIZING": 3}


@runtime_checkable
class AdminContext(Protocol):
    stats: Store

    def state(self) -> str:
        """``"LIVE"`` | ``"DRAINING"`` | ``"PRE_INITIALIZING"`` | ``"INITIALIZING"``."""

    def server_info(self) -> dict: ...

    def config_dump(self, resource: str | None, include_eds: bool) -> dict: ...

    def clusters_status(self) -> list: ...

    def listeners_status(self) -> list: ...

    def quit(self) -> None:
        """Begin shutdown (called after ``/quitquitquit`` has been answered)."""

    def drain_listeners(self, inbound_only: bool, graceful: bool, skip_exit: bool) -> None: ...

    def set_healthcheck_failed(self, failed: bool) -> None: ...

    def reset_counters(self) -> None: ...
