"""gRPC target strings for the xDS server, from the bootstrap's ``ads_config``.

* ``envoy_grpc.cluster_name`` names a static cluster; its first endpoint is the server: a
  ``socket_address`` gives ``host:port``, a ``pipe`` gives ``unix:<absolute path>`` (Istio's agent
  serves xDS on the relative ``./etc/istio/proxy/XDS``, resolved against the current directory now so
  a later ``chdir`` changes nothing), an abstract socket ``@name`` gives ``unix-abstract:name``.
* ``google_grpc.target_uri`` is taken as gRPC's own target syntax, relative ``unix:`` paths resolved.

Only plaintext channels are made; TLS to the xDS server (``google_grpc.channel_credentials`` or a
cluster ``transport_socket``) is not supported and is reported as a ``ConfigError``.
"""

from __future__ import annotations

import logging
import os

from pyproxy.config.errors import ConfigError

log = logging.getLogger("pyproxy.xds")


def _unix_target(path: str) -> str:
    if path.startswith("@"):
        return "unix-abstract:" + path[1:]
    full = os.path.abspath(path)
    if len(full.encode()) > 107 and not os.path.isabs(path):
        # sun_path holds 107 bytes: keep a relative path relative (pyproxy never changes its
        # working directory), as Envoy hands it to connect()
        return "unix:" + os.path.normpath(path)
    return "unix:" + full


def target_from_address(addr) -> str:
    """``envoy.config.core.v3.Address`` -> gRPC target."""
    if addr.HasField("pipe"):
        if not addr.pipe.path:
            raise ConfigError("pipe address has an empty path")
        return _unix_target(addr.pipe.path)
    if addr.HasField("socket_address"):
        sa = addr.socket_address
        if sa.protocol != 0:
            raise ConfigError("xDS server address must be TCP", field="socket_address.protocol")
        if sa.WhichOneof("port_specifier") != "port_value" or not sa.port_value:
            raise ConfigError("xDS server address needs a port_value", field="socket_address")
        host = sa.address
        if ":" in host:
            return "ipv6:[%s]:%d" % (host, sa.port_value)
        return "%s:%d" % (host, sa.port_value)
    raise ConfigError("unsupported address kind for the xDS server")


def target_from_cluster(cluster) -> str:
    """The gRPC target of a static cluster (``envoy.config.cluster.v3.Cluster``)."""
    name = cluster.name
    if cluster.HasField("transport_socket"):
        raise ConfigError("TLS to the xDS server is not supported", field="transport_socket",
                          resource="cluster '%s'" % name)
    addrs = []
    for le in cluster.load_assignment.endpoints:
        for lb in le.lb_endpoints:
            if lb.HasField("endpoint"):
                addrs.append(lb.endpoint.address)
    if not addrs:
        raise ConfigError("has no endpoints", field="load_assignment",
                          resource="cluster '%s'" % name)
    if len(addrs) > 1:
        log.warning("xDS cluster '%s' has %d endpoints; using the first", name, len(addrs))
    try:
        return target_from_address(addrs[0])
    except ConfigError as e:
        raise e.within("cluster '%s'" % name, "load_assignment.endpoints[0].lb_endpoints[0]")


def target_from_grpc_service(grpc_service, clusters_by_name: dict) -> str:
    """``envoy.config.core.v3.GrpcService`` -> gRPC target; clusters looked up by name."""
    kind = grpc_service.WhichOneof("target_specifier")
    if kind == "envoy_grpc":
        cname = grpc_service.envoy_grpc.cluster_name
        cluster = clusters_by_name.get(cname)
        if cluster is None:
            raise ConfigError("unknown cluster '%s'" % cname, field="envoy_grpc.cluster_name")
        return target_from_cluster(cluster)
    if kind == "google_grpc":
        g = grpc_service.google_grpc
        if g.HasField("channel_credentials") and g.channel_credentials.WhichOneof(
                "credential_specifier") not in (None, "local_credentials"):
            raise ConfigError("TLS/credentials to the xDS server are not supported",
                              field="google_grpc.channel_credentials")
        uri = g.target_uri
        if not uri:
            raise ConfigError("empty target_uri", field="google_grpc.target_uri")
        if uri.startswith("unix:") and not uri.startswith("unix://"):
            return _unix_target(uri[5:])
        return uri
    raise ConfigError("grpc_service has no envoy_grpc or google_grpc")


def keepalive_note(grpc_service, clusters_by_name: dict):
    """What is not done of the xDS cluster's ``upstream_connection_options.tcp_keepalive`` (Istio's
    bootstrap sets it on ``xds-grpc``), or None: the xDS client's channel is grpcio's, which sets no
    SO_KEEPALIVE on its TCP socket (its keepalive is HTTP/2 PINGs, a different contract), so a TCP
    xDS server gets no TCP keepalive probes. (A unix-socket server, as Istio's agent, has none to get.)"""
    if grpc_service.WhichOneof("target_specifier") != "envoy_grpc":
        return None
    cluster = clusters_by_name.get(grpc_service.envoy_grpc.cluster_name)
    if cluster is None or not cluster.upstream_connection_options.HasField("tcp_keepalive"):
        return None
    try:
        target = target_from_cluster(cluster)
    except ConfigError:
        return None
    if target.startswith(("unix:", "unix-abstract:")):
        return None
    return ("cluster '%s': upstream_connection_options.tcp_keepalive is not applied to the xDS client's own "
            "gRPC channel (grpcio sets no SO_KEEPALIVE); the proxy's connections through the cluster get it"
            % cluster.name)


def target_from_api_config_source(api_config_source, clusters_by_name: dict) -> str:
    """The first ``grpc_services`` entry of an ``ApiConfigSource`` (ads_config)."""
    if not api_config_source.grpc_services:
        raise ConfigError("no grpc_services", field="ads_config.grpc_services")
    try:
        return target_from_grpc_service(api_config_source.grpc_services[0], clusters_by_name)
    except ConfigError as e:
        raise e.within(field="ads_config.grpc_services[0]")
