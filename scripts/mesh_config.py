#!/usr/bin/env python3
"""Istio-shaped sidecar configuration for a small mesh, as istiod would push it.

The same resources go to every sidecar (one ADS server, wildcard LDS/CDS), like a namespace with no
``Sidecar`` resource: ``virtualOutbound`` (0.0.0.0:15001, ``use_original_dst``), one
``bind_to_port: false`` listener per service port (``0.0.0.0_<port>``, tls/http inspectors, HTTP
chain with RDS ``<port>``, TCP passthrough default chain), ``virtualInbound`` (0.0.0.0:15006, original
destination + inspectors, chains per application port, catch-alls to the inbound passthrough
cluster with source 127.0.0.6), ``BlackHoleCluster``, ``PassthroughCluster``,
``InboundPassthroughClusterIpv4``, ``inbound|<port>||`` and EDS ``outbound|<port>|<subset>|<host>``
clusters with their ClusterLoadAssignments, and a route per port (the canary: weighted clusters).

    python3 scripts/mesh_config.py docker/    # regenerates docker-compose.yml's config files

Standard library only; the output is JSON the project's control plane reads
(``python3 -m pyproxy control-plane --config-dir OUT_DIR``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

T = "type.googleapis.com/"
HCM = T + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
TCP = T + "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
ROUTER = T + "envoy.extensions.filters.http.router.v3.Router"
TLS_I = T + "envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"
HTTP_I = T + "envoy.extensions.filters.listener.http_inspector.v3.HttpInspector"
ODST = T + "envoy.extensions.filters.listener.original_dst.v3.OriginalDst"
FILE_LOG = T + "envoy.extensions.access_loggers.file.v3.FileAccessLog"

INBOUND_SOURCE = "127.0.0.6"
DOMAIN = "svc.cluster.local"
MAX = 4294967295


def _tcp(stat, cluster):
    return {"name": "envoy.filters.network.tcp_proxy",
            "typed_config": {"@type": TCP, "stat_prefix": stat, "cluster": cluster}}


def _router():
    return {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}}


def _hcm(stat, *, rds=None, route_config=None, direction="outbound", mtls=False):
    c = {"@type": HCM, "stat_prefix": stat, "codec_type": "AUTO", "use_remote_address": direction == "inbound",
         "normalize_path": True, "path_with_escaped_slashes_action": "KEEP_UNCHANGED",
         "request_id_extension": None, "stream_idle_timeout": "0s", "http_filters": [_router()],
         "upgrade_configs": [{"upgrade_type": "websocket"}],
         "forward_client_cert_details": "APPEND_FORWARD" if direction == "inbound" else None,
         "access_log": [{"name": "envoy.access_loggers.file", "typed_config": {"@type": FILE_LOG, "path": "/dev/stdout"}}]}
    c = {k: v for k, v in c.items() if v is not None}
    if mtls and direction == "inbound":   # the app sees the caller's identity (Istio's inbound HCM)
        c["set_current_client_cert_details"] = {"subject": True, "dns": True, "uri": True}
    if rds:
        c["rds"] = {"config_source": {"ads": {}, "initial_fetch_timeout": "0s", "resource_api_version": "V3"},
                    "route_config_name": rds}
    else:
        c["route_config"] = route_config
    return {"name": "envoy.filters.network.http_connection_manager", "typed_config": c}


def _passthrough_cluster(name, source=None):
    c = {"@type": T + "envoy.config.cluster.v3.Cluster", "name": name, "type": "ORIGINAL_DST",
         "connect_timeout": "10s", "lb_policy": "CLUSTER_PROVIDED",
         "circuit_breakers": {"thresholds": [{"max_connections": MAX, "max_pending_requests": MAX,
                                              "max_requests": MAX, "max_retries": MAX}]},
         "common_lb_config": {}, "filter_metadata": None}
    c.pop("filter_metadata")
    if source:
        c["upstream_bind_config"] = {"source_address": {"address": source, "port_value": 0}}
    return c


def _eds_cluster(name):
    return {"@type": T + "envoy.config.cluster.v3.Cluster", "name": name, "type": "EDS",
            "eds_cluster_config": {"eds_config": {"ads": {}, "initial_fetch_timeout": "0s",
                                                  "resource_api_version": "V3"}, "service_name": name},
            "connect_timeout": "10s", "lb_policy": "LEAST_REQUEST",
            "circuit_breakers": {"thresholds": [{"max_connections": MAX, "max_pending_requests": MAX,
                                                 "max_requests": MAX, "max_retries": MAX}]}}


def _cla(name, endpoints, mtls=False):
    def metadata(workload):
        md = {"istio": {"workload": workload}}
        if mtls:   # istiod labels endpoints whose pod has a sidecar: auto-mTLS picks ISTIO_MUTUAL for them
            md["envoy.transport_socket_match"] = {"tlsMode": "istio"}
        return {"filter_metadata": md}
    return {"@type": T + "envoy.config.endpoint.v3.ClusterLoadAssignment", "cluster_name": name,
            "endpoints": [{"locality": {}, "lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": ip, "port_value": port}}},
                 "metadata": metadata(wl), "load_balancing_weight": 1}
                for ip, port, wl in endpoints]}]}


TRUST_DOMAIN = "cluster.local"
TLS = T + "envoy.extensions.transport_sockets.tls.v3."
INBOUND_ALPN = ["istio-peer-exchange", "istio", "istio-http/1.0", "istio-http/1.1", "istio-h2"]
INBOUND_CIPHERS = ["ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384", "ECDHE-ECDSA-AES128-GCM-SHA256",
                   "ECDHE-RSA-AES128-GCM-SHA256", "AES256-GCM-SHA384", "AES128-GCM-SHA256"]


def spiffe(sa: str, ns: str = "default") -> str:
    return "spiffe://%s/ns/%s/sa/%s" % (TRUST_DOMAIN, ns, sa)


def _sds(name):
    """An SdsSecretConfig as istiod renders it: the agent's ``sds-grpc`` cluster."""
    return {"name": name, "sds_config": {
        "api_config_source": {"api_type": "GRPC", "grpc_services": [{"envoy_grpc": {"cluster_name": "sds-grpc"}}],
                              "set_node_on_first_message_only": True, "transport_api_version": "V3"},
        "initial_fetch_timeout": "0s", "resource_api_version": "V3"}}


def _upstream_tls(sans, sni):
    """ISTIO_MUTUAL: the workload certificate and root from SDS, the server's SPIFFE identity checked."""
    return {"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": TLS + "UpstreamTlsContext", "sni": sni,
        "common_tls_context": {
            "tls_params": {"tls_minimum_protocol_version": "TLSv1_2", "tls_maximum_protocol_version": "TLSv1_3"},
            "alpn_protocols": ["istio-peer-exchange", "istio"],
            "tls_certificate_sds_secret_configs": [_sds("default")],
            "combined_validation_context": {
                "default_validation_context": {"match_subject_alt_names": [{"exact": x} for x in sans]},
                "validation_context_sds_secret_config": _sds("ROOTCA")}}}}


def _downstream_tls():
    """Inbound STRICT: a client certificate from the mesh's root, any identity of the trust domain."""
    return {"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": TLS + "DownstreamTlsContext", "require_client_certificate": True,
        "common_tls_context": {
            "tls_params": {"tls_minimum_protocol_version": "TLSv1_2", "tls_maximum_protocol_version": "TLSv1_3",
                           "cipher_suites": INBOUND_CIPHERS},
            "alpn_protocols": ["h2", "http/1.1"],
            "tls_certificate_sds_secret_configs": [_sds("default")],
            "combined_validation_context": {
                "default_validation_context": {"match_typed_subject_alt_names": [
                    {"san_type": "URI", "matcher": {"prefix": "spiffe://%s/" % TRUST_DOMAIN}}]},
                "validation_context_sds_secret_config": _sds("ROOTCA")}}}}


def resources(services: dict, app_ports: list[int], mtls: bool = False) -> list[dict]:
    """Istio-shaped resources.

    ``services``: ``{host: {"port": N, "vip": "10.x" | None, "subsets": {subset: [(ip, port, workload)]},
    "weights": {subset: w} | None}}``; a subset named ``""`` is the plain service cluster.
    ``app_ports``: the ports the workloads listen on (virtualInbound chains + ``inbound|port||``).
    ``mtls``: the mesh runs mTLS STRICT as istiod renders it with PeerAuthentication STRICT and
    auto-mTLS: outbound clusters pick ISTIO_MUTUAL for endpoints labelled ``tlsMode: istio``
    (``transport_socket_matches``; the server's identity ``spiffe://cluster.local/ns/default/sa/<sa>``
    from the service's ``"sa"``), and every virtualInbound chain takes only TLS with a client
    certificate of the mesh (plaintext matches no chain and is closed). Certificates come over SDS
    from the agent's ``sds-grpc`` (``default`` and ``ROOTCA``).
    """
    out = []
    bh = {"@type": T + "envoy.config.cluster.v3.Cluster", "name": "BlackHoleCluster", "type": "STATIC",
          "connect_timeout": "10s"}
    out += [bh, _passthrough_cluster("PassthroughCluster"),
            _passthrough_cluster("InboundPassthroughClusterIpv4", INBOUND_SOURCE)]
    for p in sorted(set(app_ports)):
        out.append(_passthrough_cluster("inbound|%d||" % p, INBOUND_SOURCE))
    by_port: dict[int, list] = {}
    for host, svc in sorted(services.items()):
        fqdn = "%s.default.%s" % (host, DOMAIN)
        port = svc["port"]
        by_port.setdefault(port, []).append((host, fqdn, svc))
        for subset, eps in sorted(svc["subsets"].items()):
            name = "outbound|%d|%s|%s" % (port, subset, fqdn)
            c = _eds_cluster(name)
            if mtls:
                c["transport_socket_matches"] = [
                    {"name": "tlsMode-istio", "match": {"tlsMode": "istio"},
                     "transport_socket": _upstream_tls([spiffe(svc.get("sa", host))],
                                                       "outbound_.%d_.%s_.%s" % (port, subset, fqdn))},
                    {"name": "tlsMode-disabled", "match": {}, "transport_socket": {
                        "name": "envoy.transport_sockets.raw_buffer",
                        "typed_config": {"@type": T + "envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"}}}]
            out.append(c)
            out.append(_cla(name, eps, mtls))
    # outbound: one bind_to_port:false listener per service port, a route per port
    for port, svcs in sorted(by_port.items()):
        vhosts = []
        for host, fqdn, svc in svcs:
            domains = [fqdn, "%s:%d" % (fqdn, port), host, "%s:%d" % (host, port),
                       "%s.default" % host, "%s.default:%d" % (host, port)]
            for ip in sorted({ip for eps in svc["subsets"].values() for ip, _, _ in eps} |
                             ({svc["vip"]} if svc.get("vip") else set())):
                domains += [ip, "%s:%d" % (ip, port)]
            weights = svc.get("weights")
            if weights:
                action = {"weighted_clusters": {"clusters": [
                    {"name": "outbound|%d|%s|%s" % (port, s, fqdn), "weight": w} for s, w in weights.items()]},
                    "timeout": "0s", "retry_policy": {"retry_on": "connect-failure,refused-stream,unavailable,"
                                                      "cancelled,retriable-status-codes", "num_retries": 2,
                                                      "retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts",
                                                                                "typed_config": {"@type": T + "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"}}],
                                                      "host_selection_retry_max_attempts": "5"}}
            else:
                action = {"cluster": "outbound|%d||%s" % (port, fqdn), "timeout": "0s"}
            vhosts.append({"name": "%s:%d" % (fqdn, port), "domains": domains,
                           "routes": [{"name": "default", "match": {"prefix": "/"}, "route": action}]})
        vhosts.append({"name": "allow_any", "domains": ["*"], "include_request_attempt_count": True,
                       "routes": [{"name": "allow_any", "match": {"prefix": "/"},
                                   "route": {"cluster": "PassthroughCluster", "timeout": "0s"}}]})
        out.append({"@type": T + "envoy.config.route.v3.RouteConfiguration", "name": str(port),
                    "virtual_hosts": vhosts, "validate_clusters": False, "ignore_port_in_host_matching": True})
        out.append({
            "@type": T + "envoy.config.listener.v3.Listener", "name": "0.0.0.0_%d" % port,
            "address": {"socket_address": {"address": "0.0.0.0", "port_value": port}},
            "bind_to_port": False, "traffic_direction": "OUTBOUND",
            "listener_filters": [{"name": "envoy.filters.listener.tls_inspector", "typed_config": {"@type": TLS_I}},
                                 {"name": "envoy.filters.listener.http_inspector", "typed_config": {"@type": HTTP_I}}],
            "listener_filters_timeout": "0s", "continue_on_listener_filters_timeout": True,
            "filter_chains": [{"filter_chain_match": {"transport_protocol": "raw_buffer",
                                                      "application_protocols": ["http/1.1", "h2c"]},
                               "filters": [_hcm("outbound_0.0.0.0_%d" % port, rds=str(port))]}],
            "default_filter_chain": {"name": "PassthroughFilterChain",
                                     "filters": [_tcp("PassthroughCluster", "PassthroughCluster")]},
        })
    out.append({
        "@type": T + "envoy.config.listener.v3.Listener", "name": "virtualOutbound",
        "address": {"socket_address": {"address": "0.0.0.0", "port_value": 15001}},
        "use_original_dst": True, "traffic_direction": "OUTBOUND",
        "filter_chains": [
            {"name": "virtualOutbound-blackhole", "filter_chain_match": {"destination_port": 15001},
             "filters": [_tcp("BlackHoleCluster", "BlackHoleCluster")]},
            {"name": "virtualOutbound-catchall-tcp", "filters": [_tcp("PassthroughCluster", "PassthroughCluster")]}],
    })
    inbound_route = lambda cluster: {"name": "inbound|http", "validate_clusters": False, "virtual_hosts": [  # noqa: E731
        {"name": "inbound|http", "domains": ["*"], "routes": [
            {"name": "default", "match": {"prefix": "/"}, "route": {"cluster": cluster, "timeout": "0s"}}]}]}
    # STRICT: TLS with the mesh's client certificate on every chain (the HTTP ones: Istio's ALPNs)
    transport = "tls" if mtls else "raw_buffer"
    http_alpn = ["istio-http/1.0", "istio-http/1.1", "istio-h2"] if mtls else ["http/1.1", "h2c"]

    def secured(chain):
        if mtls:
            chain["transport_socket"] = _downstream_tls()
        return chain

    chains = [
        {"name": "virtualInbound-blackhole", "filter_chain_match": {"destination_port": 15006},
         "filters": [_tcp("BlackHoleCluster", "BlackHoleCluster")]},
        secured({"name": "virtualInbound-catchall-http",
                 "filter_chain_match": {"prefix_ranges": [{"address_prefix": "0.0.0.0", "prefix_len": 0}],
                                        "transport_protocol": transport, "application_protocols": http_alpn},
                 "filters": [_hcm("inbound_0.0.0.0_15006", route_config=inbound_route("InboundPassthroughClusterIpv4"),
                                  direction="inbound", mtls=mtls)]}),
        secured({"name": "virtualInbound",
                 "filter_chain_match": {"prefix_ranges": [{"address_prefix": "0.0.0.0", "prefix_len": 0}],
                                        "transport_protocol": transport},
                 "filters": [_tcp("InboundPassthroughClusterIpv4", "InboundPassthroughClusterIpv4")]}),
    ]
    for p in sorted(set(app_ports)):
        chains.append(secured({"name": "0.0.0.0_%d" % p,
                               "filter_chain_match": {"destination_port": p, "transport_protocol": transport},
                               "filters": [_hcm("inbound_0.0.0.0_%d" % p, route_config=inbound_route("inbound|%d||" % p),
                                                direction="inbound", mtls=mtls)]}))
    out.append({
        "@type": T + "envoy.config.listener.v3.Listener", "name": "virtualInbound",
        "address": {"socket_address": {"address": "0.0.0.0", "port_value": 15006}},
        "traffic_direction": "INBOUND",
        "listener_filters": [
            {"name": "envoy.filters.listener.original_dst", "typed_config": {"@type": ODST}},
            {"name": "envoy.filters.listener.tls_inspector", "typed_config": {"@type": TLS_I},
             "filter_disabled": {"destination_port_range": {"start": 15006, "end": 15007}}},
            {"name": "envoy.filters.listener.http_inspector", "typed_config": {"@type": HTTP_I},
             "filter_disabled": {"destination_port_range": {"start": 15006, "end": 15007}}}],
        "listener_filters_timeout": "0s", "continue_on_listener_filters_timeout": True,
        "filter_chains": chains,
    })
    return out


# pilot-agent's stats inclusion list (Istio 1.24, as in testdata/istio/sidecar-bootstrap-envoy-rev.json):
# what a sidecar creates and exports unless the pod asks for more
STATS_INCLUSION_PREFIXES = ("reporter=", "cluster_manager", "listener_manager", "server", "cluster.xds-grpc", "wasm")
STATS_INCLUSION_SUFFIXES = ("rbac.allowed", "rbac.denied", "shadow_allowed", "shadow_denied")
STATS_INCLUSION_REGEXPS = (r"vhost\..*\.route\..*",)
STATS_INCLUSION_TAIL = ("component", "istio")


def stats_matcher(prefixes=(), suffixes=(), regexps=()) -> dict:
    """``stats_config.stats_matcher`` as pilot-agent renders it: its defaults, plus what the pod's
    ``proxyStatsMatcher`` (``sidecar.istio.io/statsInclusionPrefixes`` / ``...Suffixes`` /
    ``...Regexps`` annotations) adds."""
    pats = [{"prefix": p} for p in STATS_INCLUSION_PREFIXES + tuple(prefixes)]
    pats += [{"suffix": s} for s in STATS_INCLUSION_SUFFIXES + tuple(suffixes)]
    pats += [{"safe_regex": {"regex": r}} for r in STATS_INCLUSION_REGEXPS + tuple(regexps)]
    pats += [{"prefix": p} for p in STATS_INCLUSION_TAIL]
    return {"inclusion_list": {"patterns": pats}}


def bootstrap(node_id: str, xds_path: str, *, admin_port: int = 15000, prometheus_port: int = 15090,
              status_port: int = 15021, agent_port: int = 15020, cluster: str = "istio-proxy",
              instance_ips: str = "", sds_path: str = "./var/run/secrets/workload-spiffe-uds/socket",
              stats_inclusion_prefixes=()) -> dict:
    """A sidecar bootstrap in the shape pilot-agent renders (envoy-rev.json): node metadata, admin on
    127.0.0.1, delta ADS over the agent's unix socket, static clusters prometheus_stats / agent /
    sds-grpc / xds-grpc, static listeners 15090 (/stats/prometheus -> admin) and 15021
    (/healthz/ready -> agent), and pilot-agent's stats inclusion list: as with Envoy, a sidecar
    creates per-cluster, per-listener and HCM stats only for the prefixes the pod asks for
    (``stats_inclusion_prefixes``, its ``sidecar.istio.io/statsInclusionPrefixes`` annotation)."""
    def static(name, addr, timeout="0.250s", **kw):
        c = {"name": name, "alt_stat_name": name + ";", "type": "STATIC", "connect_timeout": timeout,
             "lb_policy": "ROUND_ROBIN",
             "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": addr}}]}]}}
        c.update(kw)
        return c

    def sock(port):
        return {"socket_address": {"protocol": "TCP", "address": "127.0.0.1", "port_value": port}}

    h2 = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": T + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": {"http2_protocol_options": {}}}}

    def static_listener(port, prefix, cluster, stat):
        return {"name": "0.0.0.0_%d" % port,
                "address": {"socket_address": {"protocol": "TCP", "address": "0.0.0.0", "port_value": port}},
                "ignore_global_conn_limit": True, "bypass_overload_manager": True,
                "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": {
                    "@type": HCM, "codec_type": "AUTO", "stat_prefix": stat,
                    "route_config": {"virtual_hosts": [{"name": "backend", "domains": ["*"], "routes": [
                        {"match": {"prefix": prefix}, "route": {"cluster": cluster}}]}]},
                    "http_filters": [_router()]}}]}]}

    return {
        "node": {"id": node_id, "cluster": cluster, "locality": {},
                 "metadata": {"ENVOY_PROMETHEUS_PORT": prometheus_port, "ENVOY_STATUS_PORT": status_port,
                              "INSTANCE_IPS": instance_ips, "ISTIO_VERSION": "1.24.3",
                              "PROXY_CONFIG": {"binaryPath": "/usr/local/bin/envoy", "proxyAdminPort": admin_port,
                                               "statusPort": agent_port, "drainDuration": "45s"}}},
        "stats_config": {"use_all_default_tags": False,
                         "stats_matcher": stats_matcher(prefixes=stats_inclusion_prefixes)},
        "admin": {"access_log": [{"name": "envoy.access_loggers.file",
                                  "typed_config": {"@type": FILE_LOG, "path": "/dev/null"}}],
                  "address": sock(admin_port)},
        "dynamic_resources": {
            "lds_config": {"ads": {}, "initial_fetch_timeout": "0s", "resource_api_version": "V3"},
            "cds_config": {"ads": {}, "initial_fetch_timeout": "0s", "resource_api_version": "V3"},
            "ads_config": {"api_type": "DELTA_GRPC", "set_node_on_first_message_only": True,
                           "transport_api_version": "V3",
                           "grpc_services": [{"envoy_grpc": {"cluster_name": "xds-grpc"}}]}},
        "static_resources": {
            "clusters": [
                static("prometheus_stats", sock(admin_port)),
                static("agent", sock(agent_port)),
                static("sds-grpc", {"pipe": {"path": sds_path}}, "1s", typed_extension_protocol_options=h2),
                static("xds-grpc", {"pipe": {"path": xds_path}}, "1s", typed_extension_protocol_options=h2,
                       max_requests_per_connection=1,
                       circuit_breakers={"thresholds": [
                           {"priority": "DEFAULT", "max_connections": 100000, "max_pending_requests": 100000,
                            "max_requests": 100000},
                           {"priority": "HIGH", "max_connections": 100000, "max_pending_requests": 100000,
                            "max_requests": 100000}]},
                       upstream_connection_options={"tcp_keepalive": {"keepalive_time": 300}}),
            ],
            "listeners": [static_listener(prometheus_port, "/stats/prometheus", "prometheus_stats", "stats"),
                          static_listener(status_port, "/healthz/ready", "agent", "agent")],
        },
    }


def demo(kind: str) -> list[dict]:
    """The demo meshes: ``compose`` (docker-compose.yml's addresses) and ``netns``."""
    if kind == "compose":
        a, b1, b2 = "198.18.10.11", "198.18.10.12", "198.18.10.13"
        services = {
            "svc-a": {"port": 8080, "sa": "svc-a", "subsets": {"": [(a, 8080, "svc-a")]}},
            # the seeds' canary: 90% to v1, 10% to v2
            "svc-b": {"port": 8080, "sa": "svc-b", "subsets": {"": [(b1, 8080, "svc-b-v1"), (b2, 8080, "svc-b-v2")],
                                                "v1": [(b1, 8080, "svc-b-v1")], "v2": [(b2, 8080, "svc-b-v2")]},
                      "weights": {"v1": 90, "v2": 10}},
        }
        return resources(services, [8080], mtls=True)   # PeerAuthentication STRICT, auto-mTLS
    raise SystemExit("unknown demo %r" % kind)


COMPOSE_PODS = (("svc-a", "198.18.10.11"), ("svc-b-v1", "198.18.10.12"), ("svc-b-v2", "198.18.10.13"))
# the compose pods' sidecar.istio.io/statsInclusionPrefixes: the per-service cluster and HCM stats
# tests/test_compose_mesh.py reads (and docker/README.md shows)
COMPOSE_STATS_PREFIXES = ("cluster.outbound|", "cluster.inbound|", "http.outbound_")


def write_compose(out_dir: str) -> list[str]:
    """docker-compose.yml's files: ``mesh/mesh.json`` (the control plane's config dir) and one
    bootstrap per sidecar, ``sidecar-<pod>.json`` (xDS on the shared ``/etc/istio/proxy/XDS``)."""
    written = [os.path.join(out_dir, "mesh", "mesh.json")]
    write(written[0], demo("compose"))
    for pod, ip in COMPOSE_PODS:
        path = os.path.join(out_dir, "sidecar-%s.json" % pod)
        bs = bootstrap("sidecar~%s~%s.default~default.svc.cluster.local" % (ip, pod), "./etc/istio/proxy/XDS",
                       instance_ips=ip, stats_inclusion_prefixes=COMPOSE_STATS_PREFIXES)
        with open(path + ".tmp", "w") as f:
            json.dump(bs, f, indent=1, sort_keys=True)
            f.write("\n")
        os.replace(path + ".tmp", path)
        written.append(path)
    return written


def write(path: str, res: list[dict]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"resources": res}, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir", help="where to write (docker/ for docker-compose.yml)")
    a = p.parse_args(argv)
    for path in write_compose(a.out_dir):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
