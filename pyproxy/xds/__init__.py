"""xDS: dynamic resources turned into installed runtime objects.

- ``manager.XdsManager``: the ADS client's handler; dispatches each response by type URL, keeps the
  per-type stats, versions and error states, forwards accepted resources to the workers.
- One handler per type URL: ``clusters`` (CDS), ``endpoints`` (EDS), ``listeners`` (LDS),
  ``routes`` (RDS, with the ``RouteProvider`` HCMs read), ``secrets`` (SDS over ADS).
- ``warming.Warming``: listeners waiting for their routes and secrets, EDS clusters for their
  endpoints, CDS/LDS for their first response (Envoy's init managers).
- ``sources``: the ADS client(s) from the bootstrap's ``dynamic_resources``; ``sds``: the SDS
  subscriptions of secrets whose ``sds_config`` is a config source of their own (``SdsManager``).
- Each handler dumps its own /config_dump section (``XdsManager.config_dumps``); without xDS,
  ``static_config_dumps`` gives the same sections from the managers alone.

Applying an update costs time linear in its size (tests/test_xds_apply_cost.py).
"""

from __future__ import annotations

from .endpoints import endpoints_config_dump
from .manager import XdsManager
from .routes import RouteProvider, routes_config_dump
from .sources import has_dynamic_resources, start_xds

__all__ = ("XdsManager", "RouteProvider", "has_dynamic_resources", "start_xds", "static_config_dumps")


def static_config_dumps(server, include_eds: bool = False) -> list:
    """/config_dump's clusters, listeners, routes (and endpoints) sections of a server without xDS."""
    out = [server.cluster_manager.config_dump(), server.listener_manager.config_dump(),
           routes_config_dump(server.listener_manager)]
    if include_eds:
        out.append(endpoints_config_dump(server.cluster_manager))
    return out
