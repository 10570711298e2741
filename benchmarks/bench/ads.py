"""xDS apply benchmark: ADS servers that time ACKs.

Two servers behind one interface (`start() -> port`, `poll(node_id) -> progress`, `stop()`):
- `ControlPlaneXds`: the project's `pyproxy.control_plane.ControlPlane` (SotW and delta), used
  when the pyproxy checkout has it;
- `BuiltinXds`: a minimal state-of-the-world server defined here (grpcio + xds-protos stubs).

Resources: N EDS clusters (c0000..), N ClusterLoadAssignments, one RouteConfiguration
`bench_vhosts` with N virtual hosts (one per cluster). The proxy's bootstrap has a static listener
whose HttpConnectionManager takes its routes over RDS from ADS, and `cds_config: {ads: {}}`.

The server records, per stream and per type URL: the first request, when the full set was sent,
and when the proxy ACKed it (a request carrying our nonce and version, no error_detail) or NACKed.
"""
import asyncio
import hashlib
import sys
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
            now = time.time()
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
                tt.sent_full = time.time()

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


# -- uniform interface over the two servers ------------------------------------------------
#
# poll(node_id) returns None (no stream yet) or
#   {"opened": wall time of the first request,
#    "types": {type_url: {"first_request": t, "ack": t | None, "nacks": [str],
#                         "names": number of names subscribed (0 = wildcard),
#                         "responses": int | None}}}
# where "ack" is the time of the ACK of the response that held the whole requested set.


class BuiltinXds:
    name = "builtin SotW ADS server (benchmarks/bench/ads.py)"
    apis = ("sotw",)

    def __init__(self, resources):
        self.servicer = BenchADS(resources)
        self.server = None

    def start(self, port):
        self.server = start_server(self.servicer, port)
        return port

    def poll(self, node_id):
        with self.servicer.lock:
            recs = [r for r in self.servicer.streams if r.node_id == node_id]
        if not recs or recs[-1].opened is None:
            return None
        rec = recs[-1]
        types = {}
        for t, tt in list(rec.types.items()):
            types[t] = {"first_request": tt.first_request, "ack": tt.acked_full,
                        "nacks": list(tt.nacks), "names": tt.requested,
                        "responses": tt.responses}
        return {"opened": rec.opened, "types": types}

    def stop(self):
        if self.server is not None:
            self.server.stop(grace=0).wait(5)
            self.server = None


def control_plane_available(root):
    """True when `pyproxy.control_plane.ControlPlane` can be imported from the checkout."""
    if root not in sys.path:
        sys.path.insert(0, root)
    try:
        from pyproxy.control_plane.server import ControlPlane  # noqa: F401
        from pyproxy.control_plane.loader import Resource  # noqa: F401
    except Exception:
        return False
    return True


class ControlPlaneXds:
    """pyproxy's own control plane, run on an asyncio loop in a background thread."""
    name = "pyproxy.control_plane.ControlPlane"
    apis = ("sotw", "delta")

    def __init__(self, resources, config_dir):
        from pyproxy.control_plane.loader import Resource
        from pyproxy.control_plane.server import ControlPlane
        self.cp = ControlPlane(config_dir, port=0, poll_interval=5.0)
        self.items = []
        for t, table in resources.items():
            for n, a in table.items():
                digest = hashlib.sha256(a.value).hexdigest()[:16]
                self.items.append(Resource(t, n, a, digest, "<bench>"))
        # names each type's subscription must reach before its ACK counts (0 = wildcard)
        self.expect_names = {CDS: 0, EDS: len(resources.get(EDS, {})), RDS: 1}
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="bench-cp",
                                       daemon=True)
        self.thread.start()

    def _call(self, coro, timeout=20):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self, port=None):
        async def go():
            await self.cp.start()
            self.cp.set_resources(self.items)
            return self.cp.port
        return self._call(go())

    def poll(self, node_id):
        async def snap():
            return self._snapshot(node_id)
        return self._call(snap(), timeout=10)

    def _snapshot(self, node_id):
        """Runs on the control plane's loop. An ACK counts for a type when its nonce is newer
        than the one echoed by the request that completed the subscription, i.e. it ACKs a
        response sent after the proxy asked for everything it will ask for."""
        cp = self.cp
        reqs = [r for r in cp.requests if r.get("node") == node_id]
        if not reqs:
            return None
        sid = reqs[-1]["stream"]
        reqs = [r for r in reqs if r["stream"] == sid]
        types = {}
        for r in reqs:
            t = r["type_url"]
            d = types.get(t)
            if d is None:
                d = types[t] = {"first_request": r["time"], "ack": None, "nacks": [],
                                "names": 0, "responses": None, "_names": set(),
                                "_wild": None, "_full_nonce": None}
            if "resource_names" in r:  # SotW: the request states the whole subscription
                d["_names"] = set(r["resource_names"]) - {"*"}
                if d["_wild"] is None or "*" in r["resource_names"]:
                    d["_wild"] = not r["resource_names"] or "*" in r["resource_names"]
            else:  # delta: subscribe / unsubscribe deltas
                if d["_wild"] is None:
                    d["_wild"] = not r.get("subscribe")
                d["_names"] |= set(r.get("subscribe") or ()) - {"*"}
                d["_names"] -= set(r.get("unsubscribe") or ())
            want = self.expect_names.get(t)
            complete = d["_wild"] if want == 0 else (want is not None
                                                      and len(d["_names"]) >= want)
            if complete and d["_full_nonce"] is None:
                d["_full_nonce"] = _nonce_int(r.get("nonce"))
            d["names"] = 0 if d["_wild"] else len(d["_names"])
        for a in cp.acks:
            d = types.get(a.get("type_url"))
            if (a.get("stream") == sid and d is not None and d["ack"] is None
                    and d["_full_nonce"] is not None
                    and _nonce_int(a.get("nonce")) > d["_full_nonce"]):
                d["ack"] = a["time"]
        for a in cp.nacks:
            d = types.get(a.get("type_url"))
            if a.get("stream") == sid and d is not None:
                d["nacks"].append(str(a.get("error"))[:300])
        for d in types.values():
            for k in ("_names", "_wild", "_full_nonce"):
                d.pop(k)
        return {"opened": reqs[0]["time"], "types": types}

    def stop(self):
        try:
            self._call(self.cp.stop(), timeout=15)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
            if not self.thread.is_alive():
                self.loop.close()


def _nonce_int(n):
    try:
        return int(n or 0)
    except ValueError:
        return 0


def bootstrap_api(doc, api):
    """Switch a bootstrap from `bootstrap()` to delta ADS when api == "delta"."""
    if api == "delta":
        doc["dynamic_resources"]["ads_config"]["api_type"] = "DELTA_GRPC"
    return doc
