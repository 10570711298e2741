"""xDS apply benchmark: a minimal state-of-the-world ADS server that times ACKs.

Resources: N EDS clusters (c0000..), N ClusterLoadAssignments, one RouteConfiguration
`bench_vhosts` with N virtual hosts (one per cluster). The proxy's bootstrap has a static listener
whose HttpConnectionManager takes its routes over RDS from ADS, and `cds_config: {ads: {}}`.

The server records, per stream and per type URL: the first request, when the full set was sent,
and when the proxy ACKed it (a request carrying our nonce and version, no error_detail) or NACKed.
"""
import threading
import time
from concurrent import futures

import grpc
from google.protobuf import any_pb2

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.route.v3 import route_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from . import configs

CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
EDS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
RDS = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
LDS = "type.googleapis.com/envoy.config.listener.v3.Listener"
SHORT = {CDS: "cds", EDS: "eds", RDS: "rds", LDS: "lds"}
ROUTE_NAME = "bench_vhosts"


def _any(msg):
    a = any_pb2.Any()
    a.Pack(msg)
    return a


def build_resources(n, endpoint_port):
    """{type_url: {name: Any}} with n clusters, n assignments, one route table of n vhosts."""
    clusters, clas = {}, {}
    rc = route_pb2.RouteConfiguration(name=ROUTE_NAME)
    for i in range(n):
        name = f"c{i:04d}"
        c = cluster_pb2.Cluster(name=name, type=cluster_pb2.Cluster.EDS)
        c.connect_timeout.FromMilliseconds(1000)
        c.eds_cluster_config.eds_config.ads.SetInParent()
        c.eds_cluster_config.eds_config.resource_api_version = 2  # V3
        clusters[name] = _any(c)
        cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
        lb = cla.endpoints.add().lb_endpoints.add()
        sa = lb.endpoint.address.socket_address
        sa.address = "127.0.0.1"
        sa.port_value = endpoint_port
        clas[name] = _any(cla)
        vh = rc.virtual_hosts.add(name=f"vh{i:04d}")
        host = f"svc{i:04d}.bench.svc.cluster.local"
        vh.domains.extend([host, host + ":80"])
        r = vh.routes.add()
        r.match.prefix = "/"
        r.route.cluster = name
        r.route.timeout.FromSeconds(0)
    return {CDS: clusters, EDS: clas, RDS: {ROUTE_NAME: _any(rc)}, LDS: {}}


class TypeTimes:
    __slots__ = ("first_request", "sent_full", "acked_full", "nacks", "responses",
                 "requested")

    def __init__(self):
        self.first_request = None
        self.sent_full = None
        self.acked_full = None
        self.nacks = []
        self.responses = 0
        self.requested = 0

    def as_dict(self, t0):
        def rel(t):
            return None if t is None or t0 is None else round(t - t0, 4)
        return {"first_request_s": rel(self.first_request), "sent_full_s": rel(self.sent_full),
                "ack_s": rel(self.acked_full), "nacks": self.nacks[:5],
                "responses": self.responses, "names_requested": self.requested}


class StreamRecord:
    def __init__(self):
        self.opened = None
        self.node_id = ""
        self.types = {}
        self.done = threading.Event()


class BenchADS(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    """SotW only. Wildcard for CDS/LDS, named subscriptions for EDS/RDS."""

    def __init__(self, resources, expect=(CDS, EDS, RDS)):
        self.resources = resources
        self.expect = expect
        self.streams = []
        self.lock = threading.Lock()
        self.new_stream = threading.Condition(self.lock)
        self.version = "1"

    def _full_count(self, type_url):
        return len(self.resources.get(type_url, {}))

    def StreamAggregatedResources(self, request_iterator, context):
        rec = StreamRecord()
        with self.lock:
            self.streams.append(rec)
            self.new_stream.notify_all()
        sent = {}  # type_url -> (nonce, frozenset(names), full)
        nonce = 0
        for req in request_iterator:
            now = time.monotonic()
            if rec.opened is None:
                rec.opened = now
                rec.node_id = req.node.id
            t = req.type_url
            tt = rec.types.setdefault(t, TypeTimes())
            if tt.first_request is None:
                tt.first_request = now
            names = frozenset(req.resource_names)
            tt.requested = len(names)
            last = sent.get(t)
            if req.response_nonce and last is not None:
                if req.response_nonce != last[0]:
                    continue  # stale nonce: superseded response, ignore
                if req.HasField("error_detail"):
                    tt.nacks.append(req.error_detail.message[:300])
                    continue
                if req.version_info == self.version and last[2] and tt.acked_full is None:
                    tt.acked_full = now
                    self._check_done(rec)
                if names == last[1]:
                    continue  # plain ACK, subscription unchanged
            table = self.resources.get(t, {})
            wildcard = not names or "*" in names
            chosen = list(table.values()) if wildcard else [table[n] for n in sorted(names)
                                                             if n in table]
            nonce += 1
            resp = discovery_pb2.DiscoveryResponse(version_info=self.version, type_url=t,
                                                   nonce=str(nonce))
            resp.resources.extend(chosen)
            full = len(chosen) == self._full_count(t)
            sent[t] = (str(nonce), names, full)
            tt.responses += 1
            yield resp
            if full and tt.sent_full is None:
                tt.sent_full = time.monotonic()

    def _check_done(self, rec):
        if all(rec.types.get(t) and rec.types[t].acked_full for t in self.expect):
            rec.done.set()

    def wait_stream(self, timeout):
        deadline = time.monotonic() + timeout
        with self.lock:
            while not self.streams:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.new_stream.wait(left)
            return self.streams[-1]


def start_server(servicer, port):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4),
                         options=[("grpc.max_send_message_length", 256 << 20),
                                  ("grpc.max_receive_message_length", 256 << 20),
                                  ("grpc.so_reuseport", 0)])
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(servicer, server)
    if server.add_insecure_port(f"127.0.0.1:{port}") == 0:
        raise RuntimeError(f"ADS server cannot bind 127.0.0.1:{port}")
    server.start()
    return server


def bootstrap(ads_port, listen_port, node_id="bench-xds"):
    """Bootstrap: ADS over a static xds_cluster (HTTP/2), CDS from ADS, a listener with RDS."""
    hcm = {
        "@type": configs.HCM_TYPE,
        "stat_prefix": "xds_bench",
        "rds": {"route_config_name": ROUTE_NAME,
                "config_source": {"ads": {}, "resource_api_version": "V3"}},
        "http_filters": [{"name": "envoy.filters.http.router",
                          "typed_config": {"@type": configs.ROUTER_TYPE}}],
    }
    return {
        "node": {"id": node_id, "cluster": "bench"},
        "dynamic_resources": {
            "ads_config": {"api_type": "GRPC", "transport_api_version": "V3",
                           "grpc_services": [{"envoy_grpc": {"cluster_name": "xds_cluster"}}],
                           "set_node_on_first_message_only": True},
            "cds_config": {"ads": {}, "resource_api_version": "V3"},
        },
        "static_resources": {
            "listeners": [{
                "name": "xds_bench_listener",
                "address": {"socket_address": {"address": "127.0.0.1",
                                               "port_value": listen_port}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": hcm}]}],
            }],
            "clusters": [{
                "name": "xds_cluster",
                "type": "STATIC",
                "connect_timeout": "1s",
                "typed_extension_protocol_options": {configs.HPO_KEY: {
                    "@type": configs.HPO_TYPE,
                    "explicit_http_config": {"http2_protocol_options": {}}}},
                "load_assignment": {"cluster_name": "xds_cluster", "endpoints": [{
                    "lb_endpoints": [{"endpoint": {"address": {"socket_address": {
                        "address": "127.0.0.1", "port_value": ads_port}}}}]}]},
            }],
        },
    }
