"""xDS config sources: the ADS client(s) from the bootstrap's ``dynamic_resources``, the node they
announce and their reconnect pacing."""

from __future__ import annotations

import logging

from ..config import ConfigError, duration_s
from ..config.bootstrap import check_config_source
from ..xds_client import CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET, XdsClient
from ..xds_client.target import keepalive_note, target_from_grpc_service

log = logging.getLogger("pyproxy.xds")


def has_dynamic_resources(bs) -> bool:
    dr = bs.dynamic_resources
    return dr.HasField("ads_config") or dr.HasField("cds_config") or dr.HasField("lds_config")


def node_for_xds(server):
    from envoy.config.core.v3 import base_pb2
    node = base_pb2.Node()
    node.CopyFrom(server.node)
    if not node.user_agent_name:
        node.user_agent_name = "envoy"
    if not node.HasField("user_agent_build_version"):
        node.user_agent_build_version.version.major_number = 1
        node.user_agent_build_version.version.minor_number = 40
        node.user_agent_build_version.metadata.fields["pyproxy"].string_value = "true"
    for feat in ("envoy.lb.does_not_support_overprovisioning", "envoy.lrs.supports_send_all_clusters",
                 "envoy.config.require-any-fields-contain-struct"):
        if feat not in node.client_features:
            node.client_features.append(feat)
    return node


async def start_xds(server):
    """Create the ADS client(s) from ``dynamic_resources`` and subscribe to LDS/CDS; returns the
    server's ``XdsManager``."""
    bs = server.bootstrap
    dr = bs.dynamic_resources
    xds = server.xds_manager()
    clusters = {c.name: c for c in bs.static_resources.clusters}
    node = node_for_xds(server)
    ads = None
    if dr.HasField("ads_config"):
        a = dr.ads_config
        from envoy.config.core.v3 import config_source_pb2
        api_name = config_source_pb2.ApiConfigSource.ApiType.Name(a.api_type)
        if api_name not in ("GRPC", "DELTA_GRPC", "AGGREGATED_GRPC", "AGGREGATED_DELTA_GRPC"):
            raise ConfigError("ads_config.api_type %s is not supported" % api_name,
                              field="dynamic_resources.ads_config")
        api = "DELTA_GRPC" if "DELTA" in api_name else "GRPC"
        if not a.grpc_services:
            raise ConfigError("ads_config needs grpc_services", field="dynamic_resources.ads_config")
        target = target_from_grpc_service(a.grpc_services[0], clusters)
        note = keepalive_note(a.grpc_services[0], clusters)
        if note:
            log.warning("%s", note)  # (once: the ADS client is made once)
        ads = XdsClient(target=target, node=node, api_type=api, handler=xds, stats=server.stats,
                        set_node_on_first_message_only=a.set_node_on_first_message_only,
                        **backoff(a.grpc_services[0]))
        xds.clients.append(ads)
    for t, src_name in ((CLUSTER, "cds_config"), (LISTENER, "lds_config")):
        if not dr.HasField(src_name):
            continue
        src = getattr(dr, src_name)
        check_config_source(dr, src_name)     # only ADS; ads is set whenever ads_config is present
        client = ads
        xds.client_for_type[t] = client
        client.subscribe(t, None)
        xds.st[t][0].inc()        # as Envoy: a subscription's start counts as an update attempt
        xds.warming.want_type(t, src)
    # EDS, RDS and SDS ride on the ADS stream (or the CDS/LDS source when there is no ADS)
    xds.client_for_type.setdefault(ENDPOINT, ads or xds.client_for_type.get(CLUSTER))
    xds.client_for_type.setdefault(ROUTE, ads or xds.client_for_type.get(LISTENER))
    xds.client_for_type.setdefault(SECRET, ads)
    xds.client_for_type = {k: v for k, v in xds.client_for_type.items() if v is not None}
    xds.rds.update_subscription()   # static listeners' RDS routes (and their fetch timers)
    for c in xds.clients:
        c.start()
    return xds


def backoff(grpc_service) -> dict:
    """Reconnect pacing from ``envoy_grpc.retry_policy.retry_back_off`` (Envoy: 0.5 s base, max 10x
    the base when only the base is given, 30 s by default)."""
    if grpc_service.WhichOneof("target_specifier") != "envoy_grpc":
        return {}
    rp = grpc_service.envoy_grpc.retry_policy
    if not grpc_service.envoy_grpc.HasField("retry_policy") or not rp.HasField("retry_back_off"):
        return {}
    bo = rp.retry_back_off
    base = duration_s(bo, "base_interval", 0.5) or 0.5
    cap = duration_s(bo, "max_interval", None)
    if cap is None:
        cap = base * 10
    if cap < base:
        raise ConfigError("retry_back_off.max_interval must be >= base_interval",
                          field="envoy_grpc.retry_policy.retry_back_off")
    return {"initial_backoff": base, "max_backoff": cap}
