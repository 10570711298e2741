"""Config generation: the Envoy v3 bootstraps (each given unchanged to pyproxy and Envoy), the
equivalent nginx proxy configs, and the fixed nginx backend.

Chains (``envoy_bootstrap(chain=...)``):
- ``router``: one virtual host with ROUTE_COUNT routes of mixed match kinds; the benchmark path
  matches route LATE_ROUTE (the 18th of 20). Every route adds the request header
  `x-bench-route: rNN` and (with ``response_headers=True``, as run.py asks) the response header
  `x-bench-matched: rNN`. The backend answers 200 with a fixed body only when `x-bench-route` is
  exactly `r18`, otherwise 421 — so a proxy that matches the wrong route, or does not add the
  header, shows up as non-2xx responses.
- ``istio``: what istiod sends a sidecar for its outbound HTTP listener on port 80: the HTTP filters
  both proxies have (grpc_stats, fault, cors, router), istiod's HCM settings, and the route
  configuration "80": ten services of another namespace, one virtual host each with the eight
  domains istiod renders for them, one route with Istio's default retry policy, timeout 0s,
  max_grpc_timeout 0s and a decorator, then the `allow_any` catch-all to the PassthroughCluster;
  one cluster per service (``istio_route_config``). The request names the service ISTIO_TARGET by
  Host. Each service's cluster points at its own backend port: only ISTIO_TARGET's port answers
  200, and only when the request carries `x-envoy-attempt-count: 1` (the virtual host's
  include_request_attempt_count); every other cluster, PassthroughCluster included, points at a port
  that answers 421 — so a wrong virtual host shows as non-2xx responses.
- ``istio-telemetry``: the ``istio`` chain with Istio's telemetry filters as istiod renders them
  (istio.metadata_exchange with the peer_metadata outbound config first, istio.alpn after
  grpc_stats, istio.stats before the router), Istio's node metadata and the clusters' `istio`
  metadata. Envoy's upstream build has none of the three: it gets ``istio-telemetry-envoy`` (the
  ``istio`` chain with the same node and cluster metadata). ``istio-nostats`` is the telemetry chain
  without istio.stats (pyproxy's stats on/off comparison).
"""
import os

import yaml

ROUTE_COUNT = 20
LATE_ROUTE = 18
ROUTE_HEADER = "x-bench-route"
ROUTE_VALUE = f"r{LATE_ROUTE:02d}"
BENCH_PATH = f"/r{LATE_ROUTE:02d}/bench"
GRPC_SERVICE_PREFIX = "/bench.Echo/"
GRPC_METHOD = "/bench.Echo/Call"
BODY_SIZE = 1024
BODY = ("pyproxy-bench-" * 100)[:BODY_SIZE - 1] + "\n"

HCM_TYPE = ("type.googleapis.com/envoy.extensions.filters.network."
            "http_connection_manager.v3.HttpConnectionManager")
ROUTER_TYPE = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
HPO_KEY = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
HPO_TYPE = "type.googleapis.com/" + HPO_KEY
RESPONSE_HEADER = "x-bench-matched"

CHAINS = ("istio", "istio-telemetry", "router")
# the Istio chains: ten services of namespace ISTIO_NS (the client sidecar is in CLIENT_NS), port 80
ISTIO_NS = "shop"
CLIENT_NS = "default"
ISTIO_PORT = 80
ISTIO_SERVICES = ("cart", "checkout", "currency", "details", "email", "payment", "productpage",
                  "ratings", "reviews", "shipping")
ISTIO_TARGET = "reviews"  # the 9th of the 10 virtual hosts (istiod sorts them by name)
ISTIO_HOST = f"{ISTIO_TARGET}.{ISTIO_NS}"  # the Host a client calling http://reviews.shop/ sends
ISTIO_PATH = "/reviews/0"
ATTEMPT_HEADER = "x-envoy-attempt-count"
ISTIO_RETRY_POLICY = {
    "retry_on": "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes",
    "num_retries": 2,
    "retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"}}],
    "host_selection_retry_max_attempts": "5",
    "retriable_status_codes": [503],
}


def _route_match(i, late_prefix):
    """Routes 1-5: exact paths; 6-10: prefix + header match; 11-19: prefixes; 20: catch-all."""
    if i == LATE_ROUTE:
        return {"prefix": late_prefix}
    if i <= 5:
        return {"path": f"/api/v1/items/{i}"}
    if i <= 10:
        return {"prefix": f"/r{i:02d}/",
                "headers": [{"name": "x-tenant",
                             "string_match": {"exact": f"tenant-{i}"}}]}
    if i == ROUTE_COUNT:
        return {"prefix": "/"}
    return {"prefix": f"/r{i:02d}/"}


def routes(late_prefix=None, response_headers=False):
    late_prefix = late_prefix or f"/r{LATE_ROUTE:02d}/"
    out = []
    for i in range(1, ROUTE_COUNT + 1):
        r = {
            "name": f"route-{i:02d}",
            "match": _route_match(i, late_prefix),
            "route": {"cluster": "backend", "timeout": "15s"},
            "request_headers_to_add": [{
                "header": {"key": ROUTE_HEADER, "value": f"r{i:02d}"},
                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
            }],
        }
        if response_headers:
            r["response_headers_to_add"] = [{
                "header": {"key": RESPONSE_HEADER, "value": f"r{i:02d}"},
                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
            }]
        out.append(r)
    return out


def istio_fqdn(name):
    return f"{name}.{ISTIO_NS}.svc.cluster.local"


def istio_cluster_name(name):
    return f"outbound|{ISTIO_PORT}||{istio_fqdn(name)}"


def istio_cluster_ip(i):
    return f"10.96.{10 + i}.{100 + 7 * i}"


def istio_domains(i, name):
    """The domains istiod renders for service ``name`` (ClusterIP ``istio_cluster_ip(i)``) on port
    80, for a sidecar of another namespace: the FQDN, ``name.ns``, ``name.ns.svc`` and the
    ClusterIP, each without and with ``:80`` (istiod's generateVirtualHostDomains; the same
    namespace would add ``name`` and ``name:80``; istiod releases that set the route table's
    ignore_port_in_host_matching drop the ``:port`` forms)."""
    fqdn, short = istio_fqdn(name), f"{name}.{ISTIO_NS}"
    out = []
    for d in (fqdn, short, short + ".svc", istio_cluster_ip(i)):
        out += [d, f"{d}:{ISTIO_PORT}"]
    return out


def istio_route_config():
    """Route configuration "80" as istiod renders it for a sidecar (no VirtualService): one
    virtual host per service, sorted by name, then the allow_any catch-all."""
    vhosts = []
    for i, name in enumerate(ISTIO_SERVICES):
        fqdn = istio_fqdn(name)
        vhosts.append({
            "name": f"{fqdn}:{ISTIO_PORT}",
            "domains": istio_domains(i, name),
            "routes": [{
                "name": "default",
                "match": {"prefix": "/"},
                "route": {"cluster": istio_cluster_name(name), "timeout": "0s",
                          "retry_policy": ISTIO_RETRY_POLICY, "max_grpc_timeout": "0s"},
                "decorator": {"operation": f"{fqdn}:{ISTIO_PORT}/*"},
            }],
            "include_request_attempt_count": True,
        })
    vhosts.append({
        "name": "allow_any",
        "domains": ["*"],
        "routes": [{
            "name": "allow_any",
            "match": {"prefix": "/"},
            "route": {"cluster": "PassthroughCluster", "timeout": "0s", "max_grpc_timeout": "0s"},
        }],
        "include_request_attempt_count": True,
    })
    return {"name": str(ISTIO_PORT), "virtual_hosts": vhosts, "validate_clusters": False}


def istio_node():
    """The node pilot-agent gives a sidecar of CLIENT_NS (the metadata the Istio filters read)."""
    return {"id": f"sidecar~10.244.0.17~bench-client-7d4f8b9c6-x2x7q.{CLIENT_NS}~{CLIENT_NS}.svc.cluster.local",
            "cluster": f"bench-client.{CLIENT_NS}",
            "metadata": {"NAME": "bench-client-7d4f8b9c6-x2x7q", "NAMESPACE": CLIENT_NS,
                         "CLUSTER_ID": "Kubernetes", "MESH_ID": "cluster.local",
                         "WORKLOAD_NAME": "bench-client", "ISTIO_VERSION": "1.28.0",
                         "SERVICE_ACCOUNT": "bench-client",
                         "OWNER": f"kubernetes://apis/apps/v1/namespaces/{CLIENT_NS}/deployments/bench-client",
                         "LABELS": {"app": "bench-client", "version": "v1",
                                    "service.istio.io/canonical-name": "bench-client",
                                    "service.istio.io/canonical-revision": "v1"}}}


def istio_clusters(target_port, misroute_port, upstream_h2):
    """One cluster per service, with istiod's outbound cluster settings (connect_timeout 10s,
    LEAST_REQUEST, unlimited circuit breakers, `istio` metadata; STATIC here where istiod uses
    EDS, and plaintext), and the PassthroughCluster."""
    out = []
    for name in ISTIO_SERVICES + ("PassthroughCluster",):
        port = target_port if name == ISTIO_TARGET else misroute_port
        cname = name if name == "PassthroughCluster" else istio_cluster_name(name)
        c = {
            "name": cname,
            "type": "STATIC",
            "connect_timeout": "10s",
            "lb_policy": "LEAST_REQUEST",
            "circuit_breakers": {"thresholds": [{
                "max_connections": 4294967295, "max_pending_requests": 4294967295,
                "max_requests": 4294967295, "max_retries": 4294967295, "track_remaining": True}]},
            "load_assignment": {"cluster_name": cname, "endpoints": [{"lb_endpoints": [{"endpoint": {
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]},
        }
        if name != "PassthroughCluster":
            c["metadata"] = {"filter_metadata": {"istio": {
                "default_original_port": ISTIO_PORT,
                "services": [{"host": istio_fqdn(name), "name": name, "namespace": ISTIO_NS}]}}}
        if upstream_h2:
            c["typed_extension_protocol_options"] = {HPO_KEY: {
                "@type": HPO_TYPE, "explicit_http_config": {"http2_protocol_options": {}}}}
        out.append(c)
    return out


HF = "type.googleapis.com/envoy.extensions.filters.http."


T = "type.googleapis.com/"
PEER_METADATA = {"name": "istio.metadata_exchange", "typed_config": {
    "@type": T + "io.istio.http.peer_metadata.Config",
    "upstream_discovery": [{"istio_headers": {}}, {"workload_discovery": {}}],
    "upstream_propagation": [{"istio_headers": {}}]}}
ISTIO_ALPN = {"name": "istio.alpn", "typed_config": {
    "@type": T + "istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig",
    "alpn_override": [{"alpn_override": ["istio-http/1.0", "istio", "http/1.0"]},
                      {"upstream_protocol": "HTTP11", "alpn_override": ["istio-http/1.1", "istio", "http/1.1"]},
                      {"upstream_protocol": "HTTP2", "alpn_override": ["istio-h2", "istio", "h2"]}]}}
ISTIO_STATS = {"name": "istio.stats", "typed_config": {"@type": T + "stats.PluginConfig"}}


def istio_outbound_chain(telemetry=False, stats=True):
    """The HTTP filters istiod renders for a sidecar's outbound listener
    (../shared/testdata/istio/sidecar-listeners-configdump.json; ISTIO_SECURITY_TELEMETRY.md C.3,
    B.4, D.1 for today's configs), with istiod's typed configs, before the router; and istiod's
    HCM settings. ``telemetry=False``: only the filters Envoy's upstream build has (grpc_stats,
    fault, cors). ``telemetry=True``: istio.metadata_exchange first, istio.alpn after grpc_stats,
    istio.stats (unless ``stats=False``) last."""
    filters = [
        {"name": "envoy.filters.http.grpc_stats", "typed_config": {
            "@type": HF + "grpc_stats.v3.FilterConfig", "emit_filter_state": True,
            "stats_for_all_methods": False}},
        {"name": "envoy.filters.http.fault", "typed_config": {"@type": HF + "fault.v3.HTTPFault"}},
        {"name": "envoy.filters.http.cors", "typed_config": {"@type": HF + "cors.v3.Cors"}},
    ]
    if telemetry:
        filters = [PEER_METADATA, filters[0], ISTIO_ALPN] + filters[1:] + ([ISTIO_STATS] if stats else [])
    settings = {"use_remote_address": False, "normalize_path": True,
                "path_with_escaped_slashes_action": "KEEP_UNCHANGED", "upgrade_configs": [{"upgrade_type": "websocket"}],
                "stream_idle_timeout": "0s", "request_id_extension": {"typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.request_id.uuid.v3.UuidRequestIdConfig",
                    "use_request_id_for_trace_sampling": True}}}
    return filters, settings


def envoy_bootstrap(listen_port, upstream_port, upstream_h2=False, late_prefix=None, chain="router",
                    response_headers=False, misroute_port=None):
    """The bootstrap of one chain (module docstring) as a dict (dump with `write_yaml`).
    ``router``: the 20 routes to cluster `backend` at ``upstream_port``. The Istio chains
    (``istio``, ``istio-telemetry``, ``istio-telemetry-envoy``, ``istio-nostats``): route
    configuration "80", ISTIO_TARGET's cluster at ``upstream_port``, every other cluster at
    ``misroute_port`` (default: ``upstream_port``)."""
    if chain in ("istio", "istio-telemetry", "istio-telemetry-envoy", "istio-nostats"):
        return _istio_bootstrap(listen_port, upstream_port, upstream_h2, chain,
                                upstream_port if misroute_port is None else misroute_port)
    if chain != "router":
        raise ValueError(f"unknown chain {chain!r}")
    cluster = {
        "name": "backend",
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": "backend",
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
                "address": "127.0.0.1", "port_value": upstream_port}}}}]}],
        },
    }
    if upstream_h2:
        cluster["typed_extension_protocol_options"] = {HPO_KEY: {
            "@type": HPO_TYPE, "explicit_http_config": {"http2_protocol_options": {}}}}
    hcm = {
        "@type": HCM_TYPE,
        "stat_prefix": "bench",
        "codec_type": "AUTO",
        "route_config": {
            "name": "bench_routes",
            "virtual_hosts": [{"name": "bench", "domains": ["*"],
                               "routes": routes(late_prefix, response_headers)}],
        },
        "http_filters": [{"name": "envoy.filters.http.router",
                          "typed_config": {"@type": ROUTER_TYPE}}],
    }
    return {
        "node": {"id": "bench-node", "cluster": "bench"},
        "static_resources": {
            "listeners": [{
                "name": "bench_listener",
                "address": {"socket_address": {"address": "127.0.0.1",
                                               "port_value": listen_port}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": hcm}]}],
            }],
            "clusters": [cluster],
        },
    }


def _istio_bootstrap(listen_port, target_port, upstream_h2, chain, misroute_port):
    telemetry = chain in ("istio-telemetry", "istio-nostats")
    filters, settings = istio_outbound_chain(telemetry=telemetry, stats=chain != "istio-nostats")
    hcm = {"@type": HCM_TYPE, "stat_prefix": f"outbound_0.0.0.0_{ISTIO_PORT}", "codec_type": "AUTO",
           "route_config": istio_route_config(),
           "http_filters": filters + [{"name": "envoy.filters.http.router",
                                       "typed_config": {"@type": ROUTER_TYPE}}]}
    hcm.update(settings)
    return {
        "node": istio_node(),
        "static_resources": {
            "listeners": [{
                "name": f"0.0.0.0_{ISTIO_PORT}",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen_port}},
                "traffic_direction": "OUTBOUND",
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": hcm}]}],
            }],
            "clusters": istio_clusters(target_port, misroute_port, upstream_h2),
        },
    }


def write_yaml(path, doc):
    with open(path, "w") as f:
        yaml.safe_dump(doc, f, sort_keys=False)
    return path


def _nginx_common(tmp):
    paths = {k: os.path.join(tmp, k) for k in
             ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")}
    for p in paths.values():
        os.makedirs(p, exist_ok=True)
    return (
        f"client_body_temp_path {paths['client_body']};\n"
        f"    proxy_temp_path {paths['proxy']};\n"
        f"    fastcgi_temp_path {paths['fastcgi']};\n"
        f"    uwsgi_temp_path {paths['uwsgi']};\n"
        f"    scgi_temp_path {paths['scgi']};\n"
        "    access_log off;\n"
        "    keepalive_requests 100000000;\n"
        "    keepalive_timeout 300s;\n"
        "    default_type text/plain;\n"
    )


def _nginx_main(tmp, name, http_block):
    return (
        "worker_processes 1;\n"
        "daemon off;\n"
        "master_process on;\n"
        f"pid {os.path.join(tmp, name + '.pid')};\n"
        f"error_log {os.path.join(tmp, name + '.error.log')} error;\n"
        "events { worker_connections 8192; }\n"
        "http {\n    " + _nginx_common(tmp) + http_block + "}\n"
    )


def nginx_backend_conf(tmp, h1_port, h2_port, istio_ports=None):
    """Fixed backend: 1 KB body on h1_port (HTTP/1.1) and h2_port (h2c, prior knowledge), 200 only
    with `x-bench-route: r18`. ``istio_ports`` (dict with keys h1, h2, misroute_h1, misroute_h2)
    adds the Istio chains' ports: h1/h2 answer 200 only with `x-envoy-attempt-count: 1`, the
    misroute ports always 421."""
    body = BODY.replace("\n", "\\n")
    block = (
        "    server {\n"
        f"        listen 127.0.0.1:{h1_port} backlog=4096;\n"
        f"        listen 127.0.0.1:{h2_port} http2 backlog=4096;\n"
        "        location / {\n"
        f"            if ($http_{ROUTE_HEADER.replace('-', '_')} != \"{ROUTE_VALUE}\") "
        "{ return 421 \"misrouted\\n\"; }\n"
        f"            return 200 \"{body}\";\n"
        "        }\n"
        "    }\n"
    )
    if istio_ports:
        block += (
            "    server {\n"
            f"        listen 127.0.0.1:{istio_ports['h1']} backlog=4096;\n"
            f"        listen 127.0.0.1:{istio_ports['h2']} http2 backlog=4096;\n"
            "        location / {\n"
            f"            if ($http_{ATTEMPT_HEADER.replace('-', '_')} != \"1\") "
            "{ return 421 \"no attempt count\\n\"; }\n"
            f"            return 200 \"{body}\";\n"
            "        }\n"
            "    }\n"
            "    server {\n"
            f"        listen 127.0.0.1:{istio_ports['misroute_h1']} backlog=4096;\n"
            f"        listen 127.0.0.1:{istio_ports['misroute_h2']} http2 backlog=4096;\n"
            "        location / { return 421 \"wrong virtual host\\n\"; }\n"
            "    }\n")
    path = os.path.join(tmp, "backend.conf")
    with open(path, "w") as f:
        f.write(_nginx_main(tmp, "backend", block))
    return path


def nginx_proxy_conf(tmp, listen_port, upstream_port, mode="h1", late_prefix=None,
                     response_headers=False):
    """nginx as a proxy with the equivalent 20 locations.

    mode "h1": HTTP/1.1 both sides (proxy_pass, upstream keepalive).
    mode "h2": h2c downstream, HTTP/2 upstream through grpc_pass (nginx's only HTTP/2 upstream).
    mode "grpc": h2c downstream, grpc_pass upstream.
    nginx picks locations by its own rules (exact, then longest prefix), not first-match like
    Envoy, so the list order matters less; the header-matched routes 6-10 have no nginx
    equivalent and are plain prefixes here.
    """
    late_prefix = late_prefix or f"/r{LATE_ROUTE:02d}/"
    h2 = mode in ("h2", "grpc")
    lines = [
        "    upstream backend {\n"
        f"        server 127.0.0.1:{upstream_port};\n"
        "        keepalive 128;\n"
        "        keepalive_requests 100000000;\n"
        "    }\n",
        "    server {\n"
        f"        listen 127.0.0.1:{listen_port}{' http2' if h2 else ''} backlog=4096;\n",
    ]
    for i in range(1, ROUTE_COUNT + 1):
        m = _route_match(i, late_prefix)
        loc = f"= {m['path']}" if "path" in m else m["prefix"]
        if h2:
            body = (f"grpc_pass grpc://backend; "
                    f"grpc_set_header {ROUTE_HEADER} r{i:02d};")
        else:
            body = ("proxy_pass http://backend; proxy_http_version 1.1; "
                    "proxy_set_header Connection \"\"; proxy_set_header Host $host; "
                    f"proxy_set_header {ROUTE_HEADER} r{i:02d};")
        if response_headers and mode != "grpc":
            body += f" add_header {RESPONSE_HEADER} r{i:02d} always;"
        lines.append(f"        location {loc} {{ {body} }}\n")
    lines.append("    }\n")
    path = os.path.join(tmp, f"nginx-proxy-{mode}.conf")
    with open(path, "w") as f:
        f.write(_nginx_main(tmp, f"nginx-proxy-{mode}", "".join(lines)))
    return path


def nginx_istio_conf(tmp, listen_port, target_port, misroute_port, mode="h1"):
    """nginx as a proxy with the Istio route table's shape: one server per service, named by its
    domains (nginx matches Host without the port, so the ``:80`` forms are left out), proxying to
    the service's upstream with `x-envoy-attempt-count: 1` set; the default server proxies to the
    misroute port. mode "h2": h2c downstream, grpc_pass upstream."""
    h2 = mode == "h2"
    listen = f"        listen 127.0.0.1:{listen_port}{' http2' if h2 else ''}"
    lines = []
    for i, name in enumerate(ISTIO_SERVICES + ("PassthroughCluster",)):
        port = target_port if name == ISTIO_TARGET else misroute_port
        lines.append(f"    upstream u{i} {{\n        server 127.0.0.1:{port};\n"
                     "        keepalive 128;\n        keepalive_requests 100000000;\n    }\n")
        if name == "PassthroughCluster":
            server = listen + " default_server backlog=4096;\n"
        else:
            names = [d for d in istio_domains(i, name) if not d.endswith(f":{ISTIO_PORT}")]
            server = listen + ";\n" + f"        server_name {' '.join(names)};\n"
        if h2:
            loc = f"grpc_pass grpc://u{i}; grpc_set_header {ATTEMPT_HEADER} 1;"
        else:
            loc = (f"proxy_pass http://u{i}; proxy_http_version 1.1; "
                   "proxy_set_header Connection \"\"; proxy_set_header Host $host; "
                   f"proxy_set_header {ATTEMPT_HEADER} 1;")
        lines.append("    server {\n" + server + f"        location / {{ {loc} }}\n    }}\n")
    path = os.path.join(tmp, f"nginx-istio-{mode}.conf")
    with open(path, "w") as f:
        f.write(_nginx_main(tmp, f"nginx-istio-{mode}", "".join(lines)))
    return path
