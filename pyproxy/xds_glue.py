"""The config manager for dynamic resources: turns xDS updates into installed runtime objects.

It implements the xDS client's handler: every update is compiled and validated *as a whole*
before anything changes (a bad resource NACKs the update and the last good config stays), then
installed. It also owns RDS route providers, EDS/RDS/SDS subscriptions (re-subscribed as listeners
and clusters come and go), Envoy's per-type update stats and the dynamic parts of /config_dump.
"""

from __future__ import annotations

import hashlib
import logging
import time

from google.protobuf import json_format

from .config import ConfigError
from .xds_client import CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET, XdsClient
from .xds_client.target import target_from_grpc_service

log = logging.getLogger("pyproxy.config")


def _version_hash(v: str) -> int:
    return int.from_bytes(hashlib.blake2b(v.encode(), digest_size=8).digest(), "little") >> 1


class RouteProvider:
    """The current RouteTable for one RDS name; HCMs read ``provider.table`` per request."""

    __slots__ = ("name", "table", "proto", "version_info", "last_updated", "stat_scopes", "glue")

    def __init__(self, name, glue):
        self.name = name
        self.table = None
        self.proto = None
        self.version_info = ""
        self.last_updated = 0.0
        self.stat_scopes = {}
        self.glue = glue

    def register_stats(self, store, stat_prefix):
        if stat_prefix not in self.stat_scopes:
            s = store.scope("http.%s.rds.%s." % (stat_prefix, self.name))
            self.stat_scopes[stat_prefix] = (s.counter("update_attempt"), s.counter("update_success"),
                                             s.counter("update_rejected"), s.counter("update_empty"),
                                             s.gauge("version", accumulate=False),
                                             s.counter("config_reload"))

    def count(self, what: str, version: str = ""):
        idx = {"attempt": 0, "success": 1, "rejected": 2, "empty": 3}[what]
        for st in self.stat_scopes.values():
            st[idx].inc()
            if what == "success":
                st[4].set(_version_hash(version))
                st[5].inc()


class XdsGlue:
    """Handler for the ADS client(s)."""

    def __init__(self, server):
        self.server = server
        self.cm = server.cluster_manager
        self.lm = server.listener_manager
        self.stats = server.stats
        self.clients: list[XdsClient] = []
        self.client_for_type: dict = {}
        self.routes: dict[str, RouteProvider] = {}
        self.secrets: dict = {}
        self.secret_versions: dict = {}
        self.received: set = set()
        self.wanted_types: set = set()
        self.errors: dict = {}  # (type, name) -> error details for config_dump
        s = self.stats
        self.st = {}
        for t, prefix in ((CLUSTER, "cluster_manager.cds."), (LISTENER, "listener_manager.lds.")):
            sc = s.scope(prefix)
            self.st[t] = (sc.counter("update_attempt"), sc.counter("update_success"),
                          sc.counter("update_rejected"), sc.counter("update_empty"),
                          sc.gauge("version", accumulate=False), sc.counter("update_failure"),
                          sc.counter("init_fetch_timeout"))
            sc.gauge("version_text", accumulate=False)
        self.cm.eds_watchers.append(self._update_eds_subscription)

    # -- wiring -------------------------------------------------------------------------------------
    def route_provider(self, rds, stat_prefix) -> RouteProvider:
        name = rds.route_config_name
        if not name:
            raise ConfigError("rds.route_config_name must not be empty", field="rds")
        p = self.routes.get(name)
        if p is None:
            p = self.routes[name] = RouteProvider(name, self)
        p.register_stats(self.stats, stat_prefix)
        return p

    def initial_done(self) -> bool:
        for t in self.wanted_types:
            if t not in self.received:
                return False
        if self.cm.warming:
            return False
        for name in self._rds_names():
            p = self.routes.get(name)
            if p is not None and p.table is None:
                return False
        return True

    def _rds_names(self) -> set:
        names = set()
        for al in self.lm.active.values():
            for chain in al.config.chains + ([al.config.default_chain] if al.config.default_chain else []):
                for f in chain.filter_factories:
                    r = getattr(f, "routes", None)
                    if isinstance(r, RouteProvider):
                        names.add(r.name)
        return names

    def _update_eds_subscription(self):
        c = self.client_for_type.get(ENDPOINT)
        if c is not None:
            c.subscribe(ENDPOINT, self.cm.eds_names())

    def _update_rds_subscription(self):
        c = self.client_for_type.get(ROUTE)
        if c is not None:
            names = self._rds_names()
            c.subscribe(ROUTE, names)
            for n in [n for n, p in self.routes.items() if n not in names and p.table is None]:
                del self.routes[n]

    # -- XdsHandler ---------------------------------------------------------------------------------
    def on_connection_state(self, connected: bool) -> None:
        log.info("xDS stream %s", "connected" if connected else "disconnected")

    def on_resources(self, type_url, version_info, added, removed, sotw):
        if type_url == CLUSTER:
            self._apply_clusters(version_info, added, removed)
        elif type_url == ENDPOINT:
            self._apply_endpoints(version_info, added, removed)
        elif type_url == LISTENER:
            self._apply_listeners(version_info, added, removed)
        elif type_url == ROUTE:
            self._apply_routes(version_info, added, removed)
        elif type_url == SECRET:
            for name, sec in added.items():
                self.secrets[name] = sec
                self.secret_versions[name] = (version_info, time.time())
            for name in removed:
                self.secrets.pop(name, None)
        else:
            raise ConfigError("resource type '%s' is not supported" % type_url)
        self.received.add(type_url)

    def _stat_attempt(self, t):
        st = self.st.get(t)
        if st:
            st[0].inc()

    def _apply_clusters(self, version, added, removed):
        st = self.st[CLUSTER]
        st[0].inc()
        try:
            built = []
            for name, proto in added.items():
                built.append(self.cm.build(proto, added_via_api=True, version_info=version))
        except ConfigError as e:
            st[2].inc()
            raise
        static = {c.name for c in self.cm.active.values() if not c.added_via_api}
        for c in built:
            if c.name in static:
                st[2].inc()
                raise ConfigError("cluster '%s' is static and cannot be updated by CDS" % c.name)
        for c in built:
            self.cm.add_or_update(c)
        for name in removed:
            if name not in static:
                self.cm.remove(name)
        if not added and not removed:
            st[3].inc()
        st[1].inc()
        st[4].set(_version_hash(version))
        self._update_eds_subscription()

    def _apply_endpoints(self, version, added, removed):
        for name, cla in added.items():
            try:
                self.cm.validate_load_assignment(cla)
            except ConfigError as e:
                raise e.within(resource="ClusterLoadAssignment '%s'" % name)
        for name, cla in added.items():
            if not cla.cluster_name:
                cla.cluster_name = name
            self.cm.on_load_assignment(cla)

    def _apply_listeners(self, version, added, removed):
        st = self.st[LISTENER]
        st[0].inc()
        lm = self.lm
        built = []
        socks = []
        try:
            for name, proto in added.items():
                cfg = lm.build(proto, added_via_api=True, version_info=version)
                built.append(cfg)
            for cfg in built:
                lm.check_bindable(cfg)
            for cfg in built:
                cur = lm.active.get(cfg.name)
                if cur is not None and cur.config.proto == cfg.proto:
                    socks.append(None)
                    continue
                socks.append(lm.bind_socket(cfg) if lm.needs_new_socket(cfg) else None)
        except ConfigError:
            for s in socks:
                if s is not None:
                    s.close()
            st[2].inc()
            raise
        for cfg, s in zip(built, socks):
            lm.install(cfg, s)
        for name in removed:
            al = lm.active.get(name)
            if al is not None and al.config.added_via_api:
                lm.remove(name)
        st[1].inc()
        st[4].set(_version_hash(version))
        if self.server.state == 0:
            lm.start_workers()
        self._update_rds_subscription()

    def _apply_routes(self, version, added, removed):
        from .routing import compile_route_config
        compiled = {}
        for name, proto in added.items():
            p = self.routes.get(name)
            if p is not None:
                p.count("attempt")
            try:
                compiled[name] = compile_route_config(proto)
            except ConfigError as e:
                if p is not None:
                    p.count("rejected")
                raise e.within(resource="RouteConfiguration '%s'" % name)
        now = time.time()
        for name, table in compiled.items():
            p = self.routes.get(name)
            if p is None:
                p = self.routes[name] = RouteProvider(name, self)
            p.table = table
            p.proto = added[name]
            p.version_info = version
            p.last_updated = now
            p.count("success", version)
        for name in removed:
            p = self.routes.get(name)
            if p is not None:
                p.table = None

    # -- lifecycle ----------------------------------------------------------------------------------
    async def stop(self):
        for c in self.clients:
            await c.stop()


def route_provider(server, rds, stat_prefix):
    glue = getattr(server, "xds", None)
    if glue is None:
        glue = getattr(server, "_pending_glue", None)
    if glue is None and _has_dynamic(server.bootstrap):
        glue = server._pending_glue = XdsGlue(server)
    if glue is None:
        raise ConfigError("RDS (rds.route_config_name '%s') needs dynamic_resources (ADS) in the bootstrap"
                          % rds.route_config_name, field="rds")
    return glue.route_provider(rds, stat_prefix)


def _has_dynamic(bs) -> bool:
    dr = bs.dynamic_resources
    return dr.HasField("ads_config") or dr.HasField("cds_config") or dr.HasField("lds_config")


def _node_for_xds(server):
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


async def start_xds(server) -> XdsGlue:
    """Create the ADS client(s) from ``dynamic_resources`` and subscribe to LDS/CDS."""
    bs = server.bootstrap
    dr = bs.dynamic_resources
    glue = getattr(server, "_pending_glue", None) or XdsGlue(server)
    server._pending_glue = glue
    clusters = {c.name: c for c in bs.static_resources.clusters}
    node = _node_for_xds(server)
    ads = None
    if dr.HasField("ads_config"):
        a = dr.ads_config
        api = {1: "GRPC", 2: "GRPC", 3: "GRPC", 5: "DELTA_GRPC", 6: "DELTA_GRPC"}.get(a.api_type)
        from envoy.config.core.v3 import config_source_pb2
        api_name = config_source_pb2.ApiConfigSource.ApiType.Name(a.api_type)
        if api_name not in ("GRPC", "DELTA_GRPC", "AGGREGATED_GRPC", "AGGREGATED_DELTA_GRPC"):
            raise ConfigError("ads_config.api_type %s is not supported" % api_name, field="dynamic_resources.ads_config")
        api = "DELTA_GRPC" if "DELTA" in api_name else "GRPC"
        if not a.grpc_services:
            raise ConfigError("ads_config needs grpc_services", field="dynamic_resources.ads_config")
        target = target_from_grpc_service(a.grpc_services[0], clusters)
        ads = XdsClient(target=target, node=node, api_type=api, handler=glue, stats=server.stats,
                        set_node_on_first_message_only=a.set_node_on_first_message_only)
        glue.clients.append(ads)
    for t, src_name in ((CLUSTER, "cds_config"), (LISTENER, "lds_config")):
        if not dr.HasField(src_name):
            continue
        src = getattr(dr, src_name)
        kind = src.WhichOneof("config_source_specifier")
        if kind == "ads":
            if ads is None:
                raise ConfigError("%s uses ADS but ads_config is missing" % src_name, field="dynamic_resources")
            client = ads
        elif kind == "api_config_source":
            acs = src.api_config_source
            from envoy.config.core.v3 import config_source_pb2
            api_name = config_source_pb2.ApiConfigSource.ApiType.Name(acs.api_type)
            if api_name not in ("GRPC", "DELTA_GRPC") or not acs.grpc_services:
                raise ConfigError("%s: only gRPC api_config_source is supported" % src_name,
                                  field="dynamic_resources.%s" % src_name)
            target = target_from_grpc_service(acs.grpc_services[0], clusters)
            client = XdsClient(target=target, node=node, api_type=api_name, handler=glue,
                               stats=server.stats)
            glue.clients.append(client)
        else:
            raise ConfigError("%s: config source '%s' is not supported" % (src_name, kind),
                              field="dynamic_resources.%s" % src_name)
        glue.client_for_type[t] = client
        client.subscribe(t, None)
        glue.wanted_types.add(t)
    # EDS, RDS and SDS ride on the ADS stream (or the CDS/LDS source when there is no ADS)
    glue.client_for_type.setdefault(ENDPOINT, ads or glue.client_for_type.get(CLUSTER))
    glue.client_for_type.setdefault(ROUTE, ads or glue.client_for_type.get(LISTENER))
    glue.client_for_type.setdefault(SECRET, ads)
    glue.client_for_type = {k: v for k, v in glue.client_for_type.items() if v is not None}
    for c in glue.clients:
        c.start()
    return glue


# -- /config_dump sections -------------------------------------------------------------------------

def _ts(t):
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + ".000Z" if t else ""


def routes_config_dump(server) -> dict:
    out = {"@type": "type.googleapis.com/envoy.admin.v3.RoutesConfigDump"}
    static = []
    for al in server.listener_manager.active.values():
        for chain in al.config.chains + ([al.config.default_chain] if al.config.default_chain else []):
            for f in chain.filter_factories:
                pr = getattr(f, "proto", None)
                if pr is not None and hasattr(pr, "route_config") and pr.HasField("route_config"):
                    body = json_format.MessageToDict(pr.route_config, preserving_proto_field_name=True)
                    body["@type"] = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
                    static.append({"route_config": body, "last_updated": _ts(al.config.last_updated)})
    if static:
        out["static_route_configs"] = static
    glue = server.xds
    if glue is not None:
        dyn = []
        for p in glue.routes.values():
            if p.proto is None:
                continue
            body = json_format.MessageToDict(p.proto, preserving_proto_field_name=True)
            body["@type"] = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
            dyn.append({"version_info": p.version_info, "route_config": body, "last_updated": _ts(p.last_updated)})
        if dyn:
            out["dynamic_route_configs"] = dyn
    return out


def endpoints_config_dump(server) -> dict:
    out = {"@type": "type.googleapis.com/envoy.admin.v3.EndpointsConfigDump"}
    static, dyn = [], []
    for c in server.cluster_manager.active.values():
        if c.type == 3:  # EDS
            cla = server.cluster_manager.pending_cla.get(c.eds_service_name)
            if cla is not None:
                body = json_format.MessageToDict(cla, preserving_proto_field_name=True)
                body["@type"] = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
                dyn.append({"endpoint_config": body})
        elif c.proto.HasField("load_assignment"):
            body = json_format.MessageToDict(c.proto.load_assignment, preserving_proto_field_name=True)
            body["@type"] = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
            static.append({"endpoint_config": body})
    if static:
        out["static_endpoint_configs"] = static
    if dyn:
        out["dynamic_endpoint_configs"] = dyn
    return out


def secrets_config_dump(server) -> dict:
    out = {"@type": "type.googleapis.com/envoy.admin.v3.SecretsConfigDump"}
    glue = server.xds
    if glue is not None and glue.secrets:
        items = []
        for name, sec in glue.secrets.items():
            v, t = glue.secret_versions.get(name, ("", 0))
            body = json_format.MessageToDict(sec, preserving_proto_field_name=True)
            body["@type"] = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
            _redact(body)
            items.append({"name": name, "version_info": v, "last_updated": _ts(t), "secret": body})
        out["dynamic_active_secrets"] = items
    return out


def _redact(d):
    # Envoy prints "[redacted]" for private keys
    if isinstance(d, dict):
        for k, v in list(d.items()):
            if k == "private_key" and isinstance(v, dict):
                d[k] = {"inline_string": "[redacted]"}
            else:
                _redact(v)
    elif isinstance(d, list):
        for x in d:
            _redact(x)
