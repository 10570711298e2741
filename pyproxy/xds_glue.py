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


from .config.bootstrap import check_config_source
from .config.dump import to_dict
from .config import ConfigError, duration_s
from .config.registry import message_class
from .xds_client import CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET, PartiallyApplied, XdsClient
from .xds_client.target import target_from_grpc_service

log = logging.getLogger("pyproxy.config")

EDS_TYPE = 3  # envoy.config.cluster.v3.Cluster.EDS


def _version_hash(v: str) -> int:
    return int.from_bytes(hashlib.blake2b(v.encode(), digest_size=8).digest(), "little") >> 1


DEFAULT_INITIAL_FETCH_TIMEOUT = 15.0   # Envoy's default when a config source does not say


def _fetch_timeout(config_source) -> float:
    """``initial_fetch_timeout`` of a ConfigSource in seconds (0 = wait forever)."""
    return duration_s(config_source, "initial_fetch_timeout", DEFAULT_INITIAL_FETCH_TIMEOUT) or 0.0


def _now_ts() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + ".%03dZ" % (int(t * 1000) % 1000)


def _load_wrapper_types():
    # json_format resolves an Any through the default descriptor pool: the wrappers Istio uses for
    # configs (TypedStruct) must be imported or every /config_dump holding one fails.
    for mod in ("xds.type.v3.typed_struct_pb2", "udpa.type.v1.typed_struct_pb2"):
        try:
            __import__(mod)
        except ImportError:  # pragma: no cover - part of xds-protos
            pass


_load_wrapper_types()


def _import_any_types(msg, depth=0) -> None:
    """Import the proto module of every Any inside ``msg`` that some module defines."""
    if depth > 32:
        return
    for fd, value in msg.ListFields():
        if fd.message_type is None:
            continue
        if fd.message_type.GetOptions().map_entry:
            vd = fd.message_type.fields_by_name["value"]
            items = list(value.values()) if vd.message_type is not None else []
        else:
            items = list(value) if _is_repeated(fd) else [value]
        for v in items:
            if v.DESCRIPTOR.full_name == "google.protobuf.Any":
                cls = message_class(v.type_url.rpartition("/")[2])
                if cls is not None:
                    inner = cls()
                    if v.Unpack(inner):
                        _import_any_types(inner, depth + 1)
            else:
                _import_any_types(v, depth + 1)


def _is_repeated(fd) -> bool:
    r = getattr(fd, "is_repeated", None)
    return r if r is not None else fd.label == fd.LABEL_REPEATED


def _as_json(msg, type_name: str) -> dict:
    """A resource as config_dump JSON; never raises (an Any of an unknown type becomes a note)."""
    try:
        body = to_dict(msg)
    except (TypeError, KeyError, ValueError):
        try:
            _import_any_types(msg)
            body = to_dict(msg)
        except Exception as e:  # noqa: BLE001 - a dump must not fail the update
            body = {"name": getattr(msg, "name", ""), "_unprintable": str(e)}
    body["@type"] = "type.googleapis.com/" + type_name
    return body


class RouteProvider:
    """The current RouteTable for one RDS name; HCMs read ``provider.table`` per request.

    ``ready`` is the provider's init target: set when its first response arrived (accepted, removed or
    rejected, as Envoy does) or its ``initial_fetch_timeout`` elapsed; listeners using it warm until then.
    """

    __slots__ = ("name", "table", "proto", "version_info", "last_updated", "stat_scopes", "glue",
                 "ready", "init_timeout", "timer", "error_state", "stats_owner")

    def __init__(self, name, glue, init_timeout=DEFAULT_INITIAL_FETCH_TIMEOUT):
        self.name = name
        self.table = None
        self.proto = None
        self.version_info = ""
        self.last_updated = 0.0
        self.stat_scopes = {}
        self.stats_owner = None  # owns http.<prefix>.rds.<name>.*: freed once no listener uses the name
        self.glue = glue
        self.ready = False
        self.init_timeout = init_timeout
        self.timer = None
        self.error_state = None

    def register_stats(self, store, stat_prefix):
        if stat_prefix not in self.stat_scopes:
            if self.stats_owner is None:
                self.stats_owner = store.new_owner(shared=True)
            s = store.owned_scope("http.%s.rds.%s." % (stat_prefix, self.name), self.stats_owner)
            s.counter("update_attempt").inc()    # the subscription's start, as Envoy counts it
            self.stat_scopes[stat_prefix] = (s.counter("update_attempt"), s.counter("update_success"),
                                             s.counter("update_rejected"), s.counter("update_empty"),
                                             s.gauge("version", accumulate=False),
                                             s.counter("config_reload"), s.counter("init_fetch_timeout"),
                                             s.counter("update_failure"))

    def release_stats(self):
        """No listener uses this route configuration any more: its stats go (as Envoy's RDS
        subscription and its scope go with the last HCM that held them)."""
        self.stat_scopes.clear()
        if self.stats_owner is not None:
            self.stats_owner.release()
            self.stats_owner = None

    def count(self, what: str, version: str = ""):
        idx = {"attempt": 0, "success": 1, "rejected": 2, "empty": 3, "timeout": 6, "failure": 7}[what]
        for st in self.stat_scopes.values():
            st[idx].inc()
            if what == "success":
                st[4].set(_version_hash(version))
                st[5].inc()

    def start_timer(self, loop, on_timeout):
        if self.ready or self.timer is not None or self.init_timeout <= 0:
            return
        self.timer = loop.call_later(self.init_timeout, on_timeout, self)

    def set_ready(self):
        self.ready = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class WarmingListener:
    """A compiled listener waiting for its routes; ``sock`` is its pre-bound socket (or None when it
    will take over the active listener's socket)."""

    __slots__ = ("cfg", "sock", "providers", "since")

    def __init__(self, cfg, sock, providers):
        self.cfg = cfg
        self.sock = sock
        self.providers = providers
        self.since = time.time()


def _listener_providers(cfg) -> list:
    out = []
    for chain in cfg.chains + ([cfg.default_chain] if cfg.default_chain else []):
        for f in chain.filter_factories:
            r = getattr(f, "routes", None)
            if isinstance(r, RouteProvider) and r not in out:
                out.append(r)
    return out


def _why(err, name: str) -> str:
    """A resource's rejection without the leading ``<kind> '<name>'`` (the NACK names it already)."""
    text = str(err)
    tag = "'%s': " % name
    i = text.find(tag)
    if 0 <= i < 48 and ":" not in text[:i]:
        return text[i + len(tag):]
    return text


def _listener_init_targets(cfg) -> list:
    """What a listener warms on: its RDS routes and the SDS secrets its TLS chains name."""
    out = _listener_providers(cfg)
    for chain in cfg.chains + ([cfg.default_chain] if cfg.default_chain else []):
        for p in getattr(chain.transport_socket, "secret_providers", ()):
            if p not in out:
                out.append(p)
    return out


class XdsGlue:
    """Handler for the ADS client(s).

    Warming, as Envoy's init managers do it: an EDS cluster stays in ``cm.warming`` until its endpoints
    arrive or its ``eds_config.initial_fetch_timeout`` elapses; a listener stays in
    ``warming_listeners`` (its socket bound, not accepting) until every RDS route it uses is ready.
    ``initial_done()`` is true once CDS and LDS answered (or timed out) and nothing warms.
    """

    def __init__(self, server):
        self.server = server
        self.loop = server.loop
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
        self.type_version: dict = {}       # type URL -> last accepted version_info
        self.errors: dict = {}             # (type URL, name) -> Envoy's UpdateFailureState as JSON
        self.warming_listeners: dict[str, WarmingListener] = {}
        self.connected = False
        self._type_timers = []
        self._batch = False        # a CDS response is being applied: subscribe to EDS names once, after
        s = self.stats
        self.st = {}
        for t, prefix in ((CLUSTER, "cluster_manager.cds."), (LISTENER, "listener_manager.lds.")):
            sc = s.scope(prefix)
            self.st[t] = (sc.counter("update_attempt"), sc.counter("update_success"),
                          sc.counter("update_rejected"), sc.counter("update_empty"),
                          sc.gauge("version", accumulate=False), sc.counter("update_failure"),
                          sc.counter("init_fetch_timeout"))
        self.st_duration = {t: (s.histogram(prefix + "update_duration"),
                                s.gauge(prefix + "update_time", accumulate=False))
                            for t, prefix in ((CLUSTER, "cluster_manager.cds."),
                                              (LISTENER, "listener_manager.lds."))}
        self.apply_seconds: dict = {}      # type URL -> seconds the latest response took to apply
        self.st_listeners_warming = s.gauge("listener_manager.total_listeners_warming", accumulate=False)
        self.cm.eds_watchers.append(self._update_eds_subscription)
        self._hook_config_dumps()
        self._secret_hook = False

    def _hook_config_dumps(self):
        # The server assembles /config_dump from the managers' dumps; the dynamic parts they do not
        # know about (warming listeners, error states, the per-type version_info) are added here.
        cm_dump, lm_dump = self.cm.config_dump, self.lm.config_dump
        if getattr(cm_dump, "_xds_wrapped", False):
            return

        def clusters():
            return self.decorate_clusters_dump(cm_dump())

        def listeners():
            return self.decorate_listeners_dump(lm_dump())
        clusters._xds_wrapped = listeners._xds_wrapped = True
        self.cm.config_dump = clusters
        self.lm.config_dump = listeners

    # -- wiring -------------------------------------------------------------------------------------
    def route_provider(self, rds, stat_prefix) -> RouteProvider:
        name = rds.route_config_name
        if not name:
            raise ConfigError("rds.route_config_name must not be empty", field="rds")
        p = self.routes.get(name)
        if p is None:
            p = self.routes[name] = RouteProvider(name, self, _fetch_timeout(rds.config_source))
        p.register_stats(self.stats, stat_prefix)
        return p

    def initial_done(self) -> bool:
        for t in self.wanted_types:
            if t not in self.received:
                return False
        if self.cm.warming or self.warming_listeners:
            return False
        for name in self._rds_names():
            p = self.routes.get(name)
            if p is not None and not p.ready:
                return False
        return True

    def _rds_names(self) -> set:
        names = set()
        for al in self.lm.active.values():
            names.update(p.name for p in _listener_providers(al.config))
        for w in self.warming_listeners.values():
            names.update(p.name for p in w.providers if isinstance(p, RouteProvider))
        return names

    def _update_eds_subscription(self):
        if self._batch:
            return
        c = self.client_for_type.get(ENDPOINT)
        if c is not None:
            c.subscribe(ENDPOINT, self.cm.eds_names())

    def _update_rds_subscription(self):
        names = self._rds_names()
        c = self.client_for_type.get(ROUTE)
        if c is not None:
            c.subscribe(ROUTE, names)
        for n, p in list(self.routes.items()):
            if n not in names:
                # no listener uses it: the provider, its table and its stats go (a draining
                # listener keeps the table it holds); the client forgets the name's version, so a
                # listener naming it again fetches it anew, as Envoy's new RDS subscription does
                p.release_stats()
                del self.routes[n]
                p.set_ready()
        for n in names:
            p = self.routes.get(n)
            if p is not None:
                p.start_timer(self.loop, self._rds_timed_out)

    # -- initial fetch timeouts -------------------------------------------------------------------
    def _type_timed_out(self, t):
        if t not in self.received:
            log.warning("xDS: initial fetch of %s timed out; continuing without it", t.rpartition(".")[2])
            self.received.add(t)
            st = self.st.get(t)
            if st:
                st[6].inc()

    def _rds_timed_out(self, p: RouteProvider):
        p.timer = None
        if not p.ready:
            log.warning("xDS: initial fetch of route configuration '%s' timed out", p.name)
            p.count("timeout")
            p.set_ready()
            self._check_warming_listeners()

    def _eds_timed_out(self, c):
        if self.cm.warming.get(c.name) is c:
            log.warning("xDS: initial fetch of endpoints for cluster '%s' timed out", c.name)
            c.scope.counter("init_fetch_timeout").inc()
            c.initial_fetch_timed_out()

    # -- XdsHandler ---------------------------------------------------------------------------------
    def on_connection_state(self, connected: bool) -> None:
        self.connected = connected
        log.info("xDS stream %s", "connected" if connected else "disconnected")

    def on_stream_failure(self) -> None:
        """The ADS stream ended or could not be opened: as Envoy, every subscription counts an
        update attempt that failed (``update_failure``): CDS, LDS, each RDS route and EDS cluster."""
        for t in self.wanted_types:
            st = self.st.get(t)
            if st is not None:
                st[0].inc()
                st[5].inc()
        for p in self.routes.values():
            p.count("attempt")
            p.count("failure")
        for c in list(self.cm.active.values()) + list(self.cm.warming.values()):
            if c.type == EDS_TYPE:
                sc = c.scope
                sc.counter("update_attempt").inc()
                sc.counter("update_failure").inc()

    def on_resources(self, type_url, version_info, added, removed, sotw):
        t0 = time.perf_counter()
        try:
            self._on_resources(type_url, version_info, added, removed, sotw)
        finally:
            # Envoy's update_duration (ms) and update_time (ms since the epoch) of CDS and LDS
            dt = time.perf_counter() - t0
            self.apply_seconds[type_url] = dt
            h = self.st_duration.get(type_url)
            if h is not None:
                h[0].record(dt * 1000.0)
                h[1].set(int(time.time() * 1000))
            (log.info if dt >= 0.5 else log.debug)(
                "xDS: %s: %d resource(s) applied, %d removed in %.3f s",
                type_url.rpartition(".")[2], len(added), len(removed), dt)

    def _on_resources(self, type_url, version_info, added, removed, sotw):
        try:
            if type_url == CLUSTER:
                self._apply_clusters(version_info, added, removed)
            elif type_url == ENDPOINT:
                self._apply_endpoints(version_info, added, removed)
            elif type_url == LISTENER:
                self._apply_listeners(version_info, added, removed)
            elif type_url == ROUTE:
                self._apply_routes(version_info, added, removed)
            elif type_url == SECRET:
                from .tls.secrets import STORE
                # validates, rebuilds the TLS contexts using them: a ConfigError NACKs the response
                STORE.apply_sds(added, removed, version_info)
                for name, sec in added.items():
                    self.secrets[name] = sec
                    self.secret_versions[name] = (version_info, time.time())
                for name in removed:
                    self.secrets.pop(name, None)
            else:
                raise ConfigError("resource type '%s' is not supported" % type_url)
        except PartiallyApplied as e:
            # the good resources are in force: the workers take exactly those
            self.received.add(type_url)
            self._forward(type_url, version_info, {n: added[n] for n in e.applied if n in added}, removed)
            raise
        self.received.add(type_url)
        self.type_version[type_url] = version_info
        self._forward(type_url, version_info, added, removed)

    def _forward(self, type_url, version_info, added, removed):
        workers = self.server.workers
        if workers is not None:
            workers.forward(type_url, version_info, added, removed)

    def _resource_version(self, type_url, name, version) -> str:
        """The version config_dump shows for one resource: delta's per-resource version (as Envoy
        shows it), else the response's version_info."""
        c = self.client_for_type.get(type_url)
        rv = getattr(c, "response_versions", None) if c is not None and c.delta else None
        return (rv or {}).get(name) or version

    def _record_failures(self, type_url, type_name, failures: list, added: dict) -> None:
        """Envoy's error_state (config_dump) for each rejected resource."""
        ts = _now_ts()
        for name, err in failures:
            self.errors[(type_url, name)] = {
                "failed_configuration": _as_json(added[name], type_name) if name in added else {},
                "last_update_attempt": ts, "details": str(err)}

    def _clear_errors(self, type_url, names):
        errors = self.errors
        if not errors:
            return
        for n in names:
            errors.pop((type_url, n), None)

    def _partial(self, header: str, failures: list, applied, sep: str = ", ", end: str = ""):
        """The NACK of a response whose good resources were applied: ``<header> <name>: <why>``
        for every rejected resource, joined as Envoy joins them."""
        text = header + " " + sep.join("%s: %s" % (name, _why(err, name)) for name, err in failures) + end
        return PartiallyApplied(text, applied)

    def _apply_clusters(self, version, added, removed):
        """CDS, as Envoy's: every good cluster is added or updated and the missing ones removed; a
        bad one keeps the cluster of that name in force (or is not added), and the NACK names each."""
        st = self.st[CLUSTER]
        st[0].inc()
        cm = self.cm
        static = {c.name for c in cm.active.values() if not c.added_via_api}
        applied, failures = [], []
        self._batch = True            # one EDS subscription update for the whole response
        try:
            for name, proto in added.items():
                try:
                    if name in static:
                        raise ConfigError("cluster '%s' is static and cannot be updated by CDS" % name)
                    c = cm.build(proto, added_via_api=True,
                                 version_info=self._resource_version(CLUSTER, name, version))
                except ConfigError as e:
                    failures.append((name, e))
                    continue
                applied.append(name)
                if cm.add_or_update(c):
                    if c.type == EDS_TYPE:     # its EDS subscription starts: an attempt (Envoy)
                        c.scope.counter("update_attempt").inc()
                    if c.type == EDS_TYPE and cm.warming.get(c.name) is c:
                        t = _fetch_timeout(c.proto.eds_cluster_config.eds_config)
                        if t > 0:
                            self.loop.call_later(t, self._eds_timed_out, c)
            gone = [n for n in removed if n not in static]
            for name in gone:
                cm.remove(name)
        finally:
            self._batch = False
        # endpoints held for clusters that are gone would be stale if the cluster came back
        if gone:
            still = cm.eds_names()
            for name in gone:
                if name not in still:
                    cm.pending_cla.pop(name, None)
        self._clear_errors(CLUSTER, applied + gone)
        self._update_eds_subscription()
        if failures:
            st[2].inc()
            self.received.add(CLUSTER)     # a rejected first response still ends CDS's initial fetch
            self._record_failures(CLUSTER, "envoy.config.cluster.v3.Cluster", failures, added)
            raise self._partial("Error adding/updating cluster(s)", failures, applied)
        if not added and not removed:
            st[3].inc()
        st[1].inc()
        st[4].set(_version_hash(version))

    def _eds_stats(self, c):
        s = c.scope
        return s.counter("update_attempt"), s.counter("update_success"), s.counter("update_rejected")

    def _apply_endpoints(self, version, added, removed):
        """EDS: each good assignment is applied to the clusters using it; the bad ones leave those
        clusters' hosts as they are and are named in the NACK (Envoy applies the watches it reaches
        before the bad one; pyproxy applies every good one). Linear in the response: clusters are
        looked up through one index built per response, each priority set is built once."""
        from .cluster.endpoints import build_priority_set
        cm = self.cm
        failures, built = [], {}
        for name, cla in added.items():
            try:
                built[name] = build_priority_set(cla)
            except ConfigError as e:
                failures.append((name, e.within(resource="ClusterLoadAssignment '%s'" % name)))
        by_service = {}
        for c in list(cm.active.values()) + list(cm.warming.values()):
            if c.type == EDS_TYPE:
                by_service.setdefault(c.eds_service_name, []).append(c)
        for name, ps in built.items():
            cla = added[name]
            if not cla.cluster_name:
                cla.cluster_name = name
            cm.pending_cla[name] = cla
            for i, c in enumerate(by_service.get(name, ())):
                st = self._eds_stats(c)
                st[0].inc()
                c.update_load_assignment(cla, ps if i == 0 else None)
                st[1].inc()
        if removed:
            from envoy.config.endpoint.v3 import endpoint_pb2
            for name in removed:
                if name in added:
                    continue
                # the assignment is gone: its clusters have no endpoints now
                empty = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
                for c in by_service.get(name, ()):
                    c.update_load_assignment(empty)
                cm.pending_cla.pop(name, None)
        self._clear_errors(ENDPOINT, list(built) + list(removed))
        if failures:
            # Envoy lets a warming cluster go on (without endpoints) when its EDS update is rejected,
            # and counts the rejection on every EDS cluster (each is a watch of the rejected response)
            for name, _ in failures:
                for c in by_service.get(name, ()):
                    self._eds_stats(c)[0].inc()
                    if cm.warming.get(c.name) is c:
                        c.initial_fetch_timed_out()
            for cs in by_service.values():
                for c in cs:
                    self._eds_stats(c)[2].inc()
            self._record_failures(ENDPOINT, "envoy.config.endpoint.v3.ClusterLoadAssignment", failures, added)
            raise self._partial("Error adding/updating cluster load assignment(s)", failures, built)

    def _take_socket(self, cfg, taken):
        """The listening socket for ``cfg``: None when the active listener's socket is kept, the
        socket of a warming listener of the same name at the same address, or a new bound one."""
        lm = self.lm
        if not lm.needs_new_socket(cfg):
            return None
        w = self.warming_listeners.get(cfg.name)
        if w is not None and w.sock is not None and w.cfg.family == cfg.family and \
                w.cfg.host == cfg.host and (w.cfg.port == cfg.port or cfg.port == 0) and \
                w.cfg.bind_to_port == cfg.bind_to_port:
            s, w.sock = w.sock, None
            cfg.port = w.cfg.port
            taken.append((w, s))
            return s
        return lm.bind_socket(cfg)

    def _apply_listeners(self, version, added, removed):
        """LDS, as Envoy's: every good listener is added or updated, the missing ones removed; a
        bad one (does not compile, or its address cannot be had) keeps the listener of that name in
        force (or is not added), and the NACK names each."""
        st = self.st[LISTENER]
        st[0].inc()
        lm = self.lm
        ready, failures = [], []
        for name, proto in added.items():
            try:
                cfg = lm.build(proto, added_via_api=True,
                               version_info=self._resource_version(LISTENER, name, version))
                lm.check_bindable(cfg)
                cur = lm.active.get(name)
                w = self.warming_listeners.get(name)
                if (cur is not None and cur.config.proto == cfg.proto and w is None) or \
                        (w is not None and w.cfg.proto == cfg.proto):
                    sock = None            # unchanged: left alone
                else:
                    sock = self._take_socket(cfg, [])
            except ConfigError as e:
                failures.append((name, e))
                continue
            ready.append((cfg, sock))
        for cfg, s in ready:
            cur = lm.active.get(cfg.name)
            w = self.warming_listeners.get(cfg.name)
            if cur is not None and cur.config.proto == cfg.proto:
                if w is not None:          # an update back to what is active: stop warming the other
                    self._drop_warming(cfg.name)
                continue
            if w is not None and w.cfg.proto == cfg.proto:
                continue
            if w is not None:
                self._drop_warming(cfg.name)
            providers = _listener_init_targets(cfg)
            if all(p.ready for p in providers):
                lm.install(cfg, s)
            else:
                self.warming_listeners[cfg.name] = WarmingListener(cfg, s, providers)
                if not self._secret_hook and any(not isinstance(p, RouteProvider) for p in providers):
                    from .tls.secrets import STORE
                    STORE.ready_hooks.append(self._check_warming_listeners)  # SDS secrets end warming
                    self._secret_hook = True
                log.info("listener '%s' warming (waiting for %s)", cfg.name,
                         ", ".join(p.name for p in providers if not p.ready))
        for name in removed:
            if name in self.warming_listeners:
                self._drop_warming(name)
            al = lm.active.get(name)
            if al is not None and al.config.added_via_api:
                lm.remove(name)
        applied = [cfg.name for cfg, _ in ready]
        # as Envoy's listener manager: the error states are those of the latest LDS update alone
        for key in [k for k in self.errors if k[0] == LISTENER]:
            del self.errors[key]
        self.st_listeners_warming.set(len(self.warming_listeners))
        if self.server.state == 0:
            lm.start_workers()
        self._update_rds_subscription()   # also forgets providers only the rejected listeners made
        if failures:
            st[2].inc()
            self.received.add(LISTENER)
            self._record_failures(LISTENER, "envoy.config.listener.v3.Listener", failures, added)
            raise self._partial("Error adding/updating listener(s)", failures, applied, sep="\n", end="\n")
        if not added and not removed:
            st[3].inc()
        st[1].inc()
        st[4].set(_version_hash(version))

    def _drop_warming(self, name):
        w = self.warming_listeners.pop(name, None)
        if w is not None and w.sock is not None:
            w.sock.close()
        self.st_listeners_warming.set(len(self.warming_listeners))

    def _check_warming_listeners(self):
        done = [n for n, w in self.warming_listeners.items() if all(p.ready for p in w.providers)]
        for n in done:
            w = self.warming_listeners.pop(n)
            log.info("listener '%s' warmed; now active", n)
            self.lm.install(w.cfg, w.sock)
        if done:
            self.st_listeners_warming.set(len(self.warming_listeners))
            if self.server.state == 0:
                self.lm.start_workers()

    def _apply_routes(self, version, added, removed):
        """RDS: each good route configuration is applied; a bad one keeps the one in force. As in
        Envoy, where every RDS subscription is a watch of the rejected response, every route
        provider counts the rejection."""
        from .routing import compile_route_config
        compiled, failures = {}, []
        for name, proto in added.items():
            p = self.routes.get(name)
            if p is not None:
                p.count("attempt")
            try:
                compiled[name] = compile_route_config(proto)
            except ConfigError as e:
                failures.append((name, e if name in e.resource else
                                 e.within(resource="RouteConfiguration '%s'" % name)))
        now = time.time()
        for name, table in compiled.items():
            p = self.routes.get(name)
            if p is None:
                p = self.routes[name] = RouteProvider(name, self)
            p.table = table
            p.proto = added[name]
            p.version_info = self._resource_version(ROUTE, name, version)
            p.last_updated = now
            p.count("success", version)
            p.set_ready()
        for name in removed:
            p = self.routes.get(name)
            if p is not None:
                p.table = None
                p.proto = None
                p.set_ready()
        self._clear_errors(ROUTE, list(compiled) + list(removed))
        if failures:
            for p in self.routes.values():
                p.count("rejected")
            for name, _ in failures:
                p = self.routes.get(name)
                if p is not None:
                    p.set_ready()   # as Envoy: a rejected first response ends the initial fetch
            self._record_failures(ROUTE, "envoy.config.route.v3.RouteConfiguration", failures, added)
        self._check_warming_listeners()
        if failures:
            raise self._partial("Error adding/updating route configuration(s)", failures, compiled)

    # -- /config_dump ---------------------------------------------------------------------------------
    def decorate_clusters_dump(self, out: dict) -> dict:
        v = self.type_version.get(CLUSTER)
        if v is not None:
            out["version_info"] = v
        for key in ("dynamic_active_clusters", "dynamic_warming_clusters"):
            for e in out.get(key, ()):
                err = self.errors.get((CLUSTER, e.get("cluster", {}).get("name")))
                if err is not None:
                    e["error_state"] = err
        return _ordered(out, ("@type", "version_info", "static_clusters", "dynamic_active_clusters",
                              "dynamic_warming_clusters"))

    def decorate_listeners_dump(self, out: dict) -> dict:
        v = self.type_version.get(LISTENER)
        if v is not None:
            out["version_info"] = v
        dyn = out.setdefault("dynamic_listeners", [])
        by_name = {e.get("name"): e for e in dyn}
        for name, w in self.warming_listeners.items():
            e = by_name.get(name)
            if e is None:
                e = by_name[name] = {"name": name}
                dyn.append(e)
            e["warming_state"] = {"version_info": w.cfg.version_info,
                                  "listener": _as_json(w.cfg.proto, "envoy.config.listener.v3.Listener"),
                                  "last_updated": _ts(w.since)}
        for (t, name), err in self.errors.items():
            if t != LISTENER:
                continue
            e = by_name.get(name)
            if e is None:
                e = by_name[name] = {"name": name}
                dyn.append(e)
            e["error_state"] = err
        if not dyn:
            del out["dynamic_listeners"]
        return _ordered(out, ("@type", "version_info", "static_listeners", "dynamic_listeners"))

    # -- lifecycle ----------------------------------------------------------------------------------
    async def stop(self):
        if self._secret_hook:
            from .tls.secrets import STORE
            if self._check_warming_listeners in STORE.ready_hooks:
                STORE.ready_hooks.remove(self._check_warming_listeners)
        for h in self._type_timers:
            h.cancel()
        for p in self.routes.values():
            if p.timer is not None:
                p.timer.cancel()
        for name in list(self.warming_listeners):
            self._drop_warming(name)
        for c in self.clients:
            await c.stop()


def _ordered(d: dict, keys) -> dict:
    out = {k: d[k] for k in keys if k in d}
    out.update((k, v) for k, v in d.items() if k not in out)
    return out


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
                        set_node_on_first_message_only=a.set_node_on_first_message_only,
                        **_backoff(a.grpc_services[0]))
        glue.clients.append(ads)
    for t, src_name in ((CLUSTER, "cds_config"), (LISTENER, "lds_config")):
        if not dr.HasField(src_name):
            continue
        src = getattr(dr, src_name)
        check_config_source(dr, src_name)     # only ADS; ads is set whenever ads_config is present
        client = ads
        glue.client_for_type[t] = client
        client.subscribe(t, None)
        glue.st[t][0].inc()        # as Envoy: a subscription's start counts as an update attempt
        glue.wanted_types.add(t)
        timeout = _fetch_timeout(src)
        if timeout > 0:
            glue._type_timers.append(server.loop.call_later(timeout, glue._type_timed_out, t))
    # EDS, RDS and SDS ride on the ADS stream (or the CDS/LDS source when there is no ADS)
    glue.client_for_type.setdefault(ENDPOINT, ads or glue.client_for_type.get(CLUSTER))
    glue.client_for_type.setdefault(ROUTE, ads or glue.client_for_type.get(LISTENER))
    glue.client_for_type.setdefault(SECRET, ads)
    glue.client_for_type = {k: v for k, v in glue.client_for_type.items() if v is not None}
    glue._update_rds_subscription()   # static listeners' RDS routes (and their fetch timers)
    for c in glue.clients:
        c.start()
    return glue


def _backoff(grpc_service) -> dict:
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
                    body = to_dict(pr.route_config)
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
            body = to_dict(p.proto)
            body["@type"] = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
            e = {"version_info": p.version_info, "route_config": body, "last_updated": _ts(p.last_updated)}
            err = glue.errors.get((ROUTE, p.name))
            if err is not None:
                e["error_state"] = err
            dyn.append(e)
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
                body = to_dict(cla)
                body["@type"] = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
                dyn.append({"endpoint_config": body})
        elif c.proto.HasField("load_assignment"):
            body = to_dict(c.proto.load_assignment)
            body["@type"] = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
            static.append({"endpoint_config": body})
    if static:
        out["static_endpoint_configs"] = static
    if dyn:
        out["dynamic_endpoint_configs"] = dyn
    return out
