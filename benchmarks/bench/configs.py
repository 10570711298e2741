"""Config generation: the routed Envoy v3 bootstrap (given to pyproxy and Envoy), the
equivalent nginx proxy config, and the fixed nginx backend.

The routed config: one virtual host with ROUTE_COUNT routes of mixed match kinds; the benchmark
path matches route LATE_ROUTE (the 18th of 20). Every route adds `x-bench-route: rNN`. The backend
answers 200 with a fixed body only when `x-bench-route` is exactly `r18`, otherwise 421 — so a
proxy that matches the wrong route, or does not add the header, shows up as non-2xx responses.
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


def routes(late_prefix=None):
    late_prefix = late_prefix or f"/r{LATE_ROUTE:02d}/"
    out = []
    for i in range(1, ROUTE_COUNT + 1):
        out.append({
            "name": f"route-{i:02d}",
            "match": _route_match(i, late_prefix),
            "route": {"cluster": "backend", "timeout": "15s"},
            "request_headers_to_add": [{
                "header": {"key": ROUTE_HEADER, "value": f"r{i:02d}"},
                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
            }],
        })
    return out


HF = "type.googleapis.com/envoy.extensions.filters.http."


def istio_outbound_chain():
    """``--chain istio``: the HTTP filters istiod renders for a sidecar's outbound listener
    (../shared/testdata/istio/sidecar-listeners-configdump.json) that both proxies have, in order,
    with istiod's typed configs, then the router; and istiod's HCM settings."""
    filters = [
        {"name": "envoy.filters.http.grpc_stats", "typed_config": {
            "@type": HF + "grpc_stats.v3.FilterConfig", "emit_filter_state": True,
            "stats_for_all_methods": False}},
        {"name": "envoy.filters.http.fault", "typed_config": {"@type": HF + "fault.v3.HTTPFault"}},
        {"name": "envoy.filters.http.cors", "typed_config": {"@type": HF + "cors.v3.Cors"}},
    ]
    settings = {"normalize_path": True, "upgrade_configs": [{"upgrade_type": "websocket"}],
                "stream_idle_timeout": "0s", "request_id_extension": {"typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.request_id.uuid.v3.UuidRequestIdConfig",
                    "use_request_id_for_trace_sampling": True}}}
    return filters, settings


def envoy_bootstrap(listen_port, upstream_port, upstream_h2=False, late_prefix=None, chain="router"):
    """The routed bootstrap as a dict (dump with `write_yaml`); ``chain="istio"`` puts Istio's
    outbound HTTP chain in front of the router (``istio_outbound_chain``)."""
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
                               "routes": routes(late_prefix)}],
        },
        "http_filters": [{"name": "envoy.filters.http.router",
                          "typed_config": {"@type": ROUTER_TYPE}}],
    }
    if chain == "istio":
        filters, settings = istio_outbound_chain()
        hcm["http_filters"] = filters + hcm["http_filters"]
        hcm.update(settings)
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


def nginx_backend_conf(tmp, h1_port, h2_port):
    """Fixed backend: 1 KB body on h1_port (HTTP/1.1) and h2_port (h2c, prior knowledge)."""
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
    path = os.path.join(tmp, "backend.conf")
    with open(path, "w") as f:
        f.write(_nginx_main(tmp, "backend", block))
    return path


def nginx_proxy_conf(tmp, listen_port, upstream_port, mode="h1", late_prefix=None):
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
        lines.append(f"        location {loc} {{ {body} }}\n")
    lines.append("    }\n")
    path = os.path.join(tmp, f"nginx-proxy-{mode}.conf")
    with open(path, "w") as f:
        f.write(_nginx_main(tmp, f"nginx-proxy-{mode}", "".join(lines)))
    return path
