"""The server: wires bootstrap, cluster and listener managers, admin, xDS, signals and drain.

This is the top of the import graph (the process layer); nothing below imports it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import signal
import sys
import time

from .config.dump import to_dict
from . import __version__
from .cluster.manager import ClusterManager
from .cluster.outlier import EventLog
from .config import ConfigError, unacted
from .config.bootstrap import check_dynamic_resources
from .listeners.manager import ListenerManager
from .routing.matchers import compile_string_matcher
from .config import runtime as _runtime
from .routing.regex import configure_from_bootstrap as _configure_re2
from .stats import Store
from .stats.matcher import compile_stats_matcher
from .stats.tags import compile_tag_specifiers

log = logging.getLogger("pyproxy.main")

LIVE, DRAINING, PRE_INITIALIZING, INITIALIZING = 0, 1, 2, 3
STATE_NAMES = {LIVE: "LIVE", DRAINING: "DRAINING", PRE_INITIALIZING: "PRE_INITIALIZING",
               INITIALIZING: "INITIALIZING"}


def histogram_bucket_settings(sc) -> list:
    """``stats_config.histogram_bucket_settings`` (Istio: the ``sidecar.istio.io/statsHistogramBuckets``
    annotation, e.g. prefix ``istiocustom``): ``[(match(name), sorted buckets)]``, first match wins."""
    out = []
    for i, s in enumerate(sc.histogram_bucket_settings):
        field = "stats_config.histogram_bucket_settings[%d]" % i
        if not s.HasField("match"):
            raise ConfigError("match is required", field=field + ".match")
        m = compile_string_matcher(s.match, field + ".match")
        if not len(s.buckets) or any(b <= 0 for b in s.buckets):
            raise ConfigError("buckets must be non-empty and each greater than 0", field=field + ".buckets")
        out.append((m.match, tuple(sorted(set(float(b) for b in s.buckets)))))
    return out


class FactoryContext:
    """What extension factories get at config time."""

    __slots__ = ("server", "loop", "stats", "cluster_manager", "listener", "route_provider")

    def __init__(self, server):
        self.server = server
        self.loop = server.loop
        self.stats = server.stats
        self.cluster_manager = server.cluster_manager
        self.listener = None
        self.route_provider = server.route_provider


class Options:
    """Command-line options, as Envoy names them (for /server_info)."""

    def __init__(self, **kw):
        self.config_path = ""
        self.config_yaml = ""
        self.mode = "serve"
        self.concurrency = 1
        self.log_level = "info"
        self.component_log_level = ""
        self.log_format = None
        self.log_path = None
        self.drain_time_s = 600
        self.drain_strategy = "gradual"
        self.parent_shutdown_time_s = 900
        self.local_address_ip_version = "v4"
        self.file_flush_interval_msec = 10000
        self.disable_hot_restart = False
        self.allow_unknown_static_fields = False
        self.reject_unknown_dynamic_fields = False
        self.base_id = 0
        self.service_cluster = ""
        self.service_node = ""
        self.service_zone = ""
        self.skip_deprecated_logs = False
        self.admin_address_path = ""
        self.__dict__.update(kw)


def _build_static(resources, manager, duplicate: str) -> list:
    """The bootstrap's static clusters or listeners built by their manager, in order; a name given
    twice is an error (``duplicate``: Envoy's words, with the name)."""
    built = []
    names = set()
    for r in resources:
        if r.name in names:
            raise ConfigError(duplicate % r.name)
        names.add(r.name)
        built.append(manager.build(r, added_via_api=False))
    return built


class Server:
    def __init__(self, bootstrap, options: Options, loop=None, *, worker_index: int = 0,
                 worker_links=None):
        self.bootstrap = bootstrap
        self.worker_index = worker_index  # 0: the main process (admin, xDS); >0: a worker
        self.worker_links = worker_links or []
        self.workers = None  # WorkerSet in the main process when --concurrency > 1
        self.worker_link = None  # WorkerLink in a worker
        self.exiting = False
        self.options = options
        self.loop = loop or asyncio.get_event_loop()
        _configure_re2(bootstrap)  # re2.max_program_size.* from the runtime layers, before any compile
        _runtime.configure(bootstrap)  # boolean runtime features read when listeners compile
        unacted.warn("bootstrap", bootstrap)
        sc = bootstrap.stats_config
        specifiers = compile_tag_specifiers(sc)  # stats_tags: regex, fixed_value or a default's name
        tags = [(t.tag_name, t.regex) for t in sc.stats_tags if t.regex and t.WhichOneof("tag_value") != "fixed_value"]
        use_default = sc.use_all_default_tags.value if sc.HasField("use_all_default_tags") else True
        # stats_matcher first: no stat exists before it (a bad pattern is a ConfigError here)
        self.stats = Store(tags, use_default_tags=use_default, matcher=compile_stats_matcher(sc))
        self.stats.tag_specifiers = specifiers
        self.stats.bucket_settings = histogram_bucket_settings(sc)
        self.cluster_manager = ClusterManager(self.loop, self.stats)
        if bootstrap.cluster_manager.outlier_detection.event_log_path:
            self.cluster_manager.outlier_event_log = EventLog(
                bootstrap.cluster_manager.outlier_detection.event_log_path)
        self.route_providers = {}
        self.listener_manager = ListenerManager(
            self.loop, self.stats, lambda: FactoryContext(self), drain_time=options.drain_time_s,
            reuse_port=(options.concurrency or 1) > 1)
        self.state = INITIALIZING
        self.start_time = time.time()
        self.admin = None
        self.xds = None
        self.sds = None
        self.healthcheck_failed = False
        self.exit_future = None
        self.node = bootstrap.node
        if options.service_cluster:
            self.node.cluster = options.service_cluster
        if options.service_node:
            self.node.id = options.service_node
        self.cluster_manager.node = self.node
        s = self.stats
        self.st_state = s.gauge("server.state", accumulate=False)
        self.st_live = s.gauge("server.live", accumulate=False)
        self.st_uptime = s.gauge("server.uptime", accumulate=False)
        self.st_concurrency = s.gauge("server.concurrency", accumulate=False)
        self.st_mem = s.gauge("server.memory_allocated", accumulate=False)
        self.st_heap = s.gauge("server.memory_heap_size", accumulate=False)
        self.st_total_connections = s.gauge("server.total_connections", accumulate=False)
        self.st_version = s.gauge("server.version", accumulate=False)
        self.st_days_cert = s.gauge("server.days_until_first_cert_expiring", accumulate=False)
        self.st_hot_restart_epoch = s.gauge("server.hot_restart_epoch", accumulate=False)
        self.st_init_time = s.histogram("server.initialization_time_ms")
        self.st_state.set(INITIALIZING)
        self.st_live.set(0)
        self.st_concurrency.set(max(1, options.concurrency or 1))
        self.st_days_cert.set(2147483647)
        self.st_hot_restart_epoch.set(0)
        self._stats_timer = None
        self.access_flush_interval = max(0.05, options.file_flush_interval_msec / 1000.0)

    # -- routes (RDS providers are owned by the xDS layer; inline routes need nothing here) ----------
    def route_provider(self, rds, stat_prefix):
        from .xds import has_dynamic_resources
        if self.xds is None and not has_dynamic_resources(self.bootstrap):
            raise ConfigError("RDS (rds.route_config_name '%s') needs dynamic_resources (ADS) in the "
                              "bootstrap" % rds.route_config_name, field="rds")
        return self.xds_manager().route_provider(rds, stat_prefix)

    def xds_manager(self):
        """The xDS manager, made on first use (a static listener's RDS routes need it before xDS
        starts)."""
        if self.xds is None:
            from .xds import XdsManager
            self.xds = XdsManager(self)
        return self.xds

    # -- static config ------------------------------------------------------------------------------
    def compile_static(self):
        """Compile every static cluster and listener (no sockets); raises ConfigError on the first bad one."""
        sr = self.bootstrap.static_resources
        if sr.secrets:
            from .tls.secrets import STORE
            STORE.load_static(sr.secrets)
        clusters = _build_static(sr.clusters, self.cluster_manager,
                                 "cluster manager: duplicate cluster '%s' found")
        for c in clusters:
            self.cluster_manager.add_or_update(c)
        listeners = _build_static(sr.listeners, self.listener_manager,
                                  "error adding listener: '%s' has duplicate name")
        for l in listeners:
            self.listener_manager.check_bindable(l)
        self._validate_bootstrap_extensions()
        check_dynamic_resources(self.bootstrap)  # the same check as pyproxy validate
        return listeners

    def _validate_bootstrap_extensions(self):
        from .config.registry import REGISTRY
        bs = self.bootstrap
        for i, e in enumerate(bs.bootstrap_extensions):
            f, cfg = REGISTRY.resolve("bootstrap", e.name, e.typed_config, is_optional=False,
                                      what="bootstrap extension")
            if f is None:
                log.info("bootstrap extension '%s': %s", e.name, cfg)
        for i, m in enumerate(bs.overload_manager.resource_monitors):
            f, cfg = REGISTRY.resolve("resource_monitor", m.name, m.typed_config, what="resource monitor")
            if f is None:
                log.info("resource monitor '%s': %s", m.name, cfg)
            else:
                f(cfg, self)      # e.g. the global downstream connection limit
        from .listeners.overload import configure_runtime
        configure_runtime(self)

    async def start(self):
        from . import extensions, access_log  # noqa: F401 (registers built-in extensions)
        t0 = time.monotonic()
        listeners = self.compile_static()
        socks = []
        try:
            for l in listeners:
                socks.append(self.listener_manager.bind_socket(l) if self.listener_manager.needs_new_socket(l) else None)
        except ConfigError:
            for s in socks:
                if s is not None:
                    s.close()
            raise
        for l, s in zip(listeners, socks):
            if not self._warm_static_listener(l, s):
                self.listener_manager.install(l, s)
        dr = self.bootstrap.dynamic_resources
        dynamic = dr.HasField("ads_config") or dr.HasField("cds_config") or dr.HasField("lds_config")
        if self.worker_index:
            # a worker: no admin, no xDS stream; resources come from the main process
            from .workers import WorkerLink
            if dynamic:
                self.xds_manager()
            self.worker_link = WorkerLink(self, self.worker_links[0], self.worker_index)
            await self.worker_link.start()
            self._stats_timer = self.loop.call_later(0, self._refresh_server_stats)
            self._go_live()
            return
        await self._start_admin()
        if self.worker_links:
            from .workers import WorkerSet
            self.workers = WorkerSet(self, self.worker_links)
            await self.workers.start()
        if dynamic:
            from .xds import start_xds
            await start_xds(self)
        self._start_sds(dynamic)
        self._stats_timer = self.loop.call_later(0, self._refresh_server_stats)
        from .access_log.file import set_flush_interval
        set_flush_interval(self.access_flush_interval)
        self._wait_initialized(t0)

    def _warm_static_listener(self, cfg, sock) -> bool:
        """A static listener whose TLS chains name SDS secrets not here yet waits for them, its
        socket bound but not accepting (Envoy: the listener's init targets). True if it waits."""
        if "pyproxy.tls.secrets" not in sys.modules:
            return False
        pending = [p for c in cfg.chains + ([cfg.default_chain] if cfg.default_chain else [])
                   for p in getattr(c.transport_socket, "secret_providers", ()) if not p.ready]
        if not pending:
            return False
        from .tls.secrets import STORE
        log.info("listener '%s' warming (waiting for %s)", cfg.name, ", ".join(sorted({p.name for p in pending})))
        self.listener_manager.warming_static[cfg.name] = cfg

        def check():
            if self.exiting or any(not p.ready for p in pending):
                return
            STORE.ready_hooks.remove(check)
            self.listener_manager.warming_static.pop(cfg.name, None)
            log.info("listener '%s' warmed; now active", cfg.name)
            self.listener_manager.install(cfg, sock)
        STORE.ready_hooks.append(check)
        return True

    def _start_sds(self, dynamic: bool) -> None:
        """The SDS client, when something may name a secret (grpc is loaded already then)."""
        if "pyproxy.tls.secrets" not in sys.modules and not dynamic:
            return
        from .tls.secrets import STORE
        if dynamic or STORE.providers:
            from .xds.sds import SdsManager
            self.sds = SdsManager(self)

    def _secrets_pending(self) -> bool:
        mod = sys.modules.get("pyproxy.tls.secrets")
        return mod is not None and bool(mod.STORE.pending())

    def _wait_initialized(self, t0):
        def check():
            if self.state != INITIALIZING:
                return
            if self.xds is not None and not self.xds.initial_done():
                self.loop.call_later(0.05, check)
                return
            if self._secrets_pending():  # static listeners/clusters naming SDS secrets
                self.loop.call_later(0.05, check)
                return
            if self.cluster_manager.warming:
                self.loop.call_later(0.05, check)
                return
            self.st_init_time.record((time.monotonic() - t0) * 1000)
            self._go_live()
        check()

    def _go_live(self):
        self.state = LIVE
        self.st_state.set(LIVE)
        self.st_live.set(1)
        self.listener_manager.start_workers()
        log.info("all clusters initialized. initializing init manager; starting workers")

    async def _start_admin(self):
        a = self.bootstrap.admin
        if not a.HasField("address"):
            return
        from .admin.server import start_admin
        from .admin_context import ServerAdminContext
        sa = a.address.socket_address
        pipe = a.address.pipe.path if a.address.HasField("pipe") else None
        access_logs = None
        if a.access_log:
            from .access_log import build_access_logs
            access_logs = build_access_logs(a.access_log)
        try:
            self.admin = await start_admin(ServerAdminContext(self), sa.address or "127.0.0.1",
                                           sa.port_value, uds_path=pipe, access_logs=access_logs)
        except OSError as e:
            raise ConfigError("cannot bind admin address %s:%d: %s" % (sa.address, sa.port_value, e.strerror or e))
        path = self.options.admin_address_path
        if path:
            with open(path, "w") as f:
                f.write("%s:%d\n" % (sa.address or "127.0.0.1", self.admin.port))
        log.info("admin address: %s:%d", sa.address, self.admin.port)

    def _refresh_server_stats(self):
        self.st_uptime.set(int(time.time() - self.start_time))
        try:
            with open("/proc/self/statm") as f:
                rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.st_mem.set(rss)
        self.st_heap.set(rss)
        self.st_total_connections.set(self.listener_manager.active_connections())
        self._stats_ticks = getattr(self, "_stats_ticks", 0) + 1
        if self._stats_ticks % 60 == 1 and "pyproxy.tls.context" in sys.modules:
            from .tls.certs import days_until_first_cert_expiring
            days = days_until_first_cert_expiring()
            self.st_days_cert.set(days if days is not None else 2147483647)
        self._stats_timer = self.loop.call_later(1.0, self._refresh_server_stats)

    # -- lifecycle ------------------------------------------------------------------------------------
    def install_signal_handlers(self):
        loop = self.loop
        loop.add_signal_handler(signal.SIGTERM, self.shutdown_gracefully)
        loop.add_signal_handler(signal.SIGINT, self.shutdown_gracefully)
        loop.add_signal_handler(signal.SIGUSR1, self.reopen_logs)
        loop.add_signal_handler(signal.SIGHUP, lambda: None)

    def reopen_logs(self):
        from .access_log.file import reopen_all
        reopen_all()

    def shutdown_gracefully(self):
        """SIGTERM: stop accepting, let in-flight requests finish (bounded by the drain time), exit 0."""
        if self.state == DRAINING:
            self.quit()
            return
        log.warning("caught SIGTERM; draining listeners for up to %ss", self.options.drain_time_s)
        self.state = DRAINING
        self.st_state.set(DRAINING)
        lm = self.listener_manager
        if self.workers is not None:
            self.workers.drain(False, False)
        lm.drain_listeners(inbound_only=False, graceful=False)
        if lm.active_connections() == 0:
            self.quit()
            return
        lm.drain_callbacks.append(self.quit)
        self.loop.call_later(self.options.drain_time_s, self.quit)

    def set_healthcheck_failed(self, failed: bool) -> None:
        """Admin /healthcheck/fail and /healthcheck/ok: while failing, Envoy's drain decision is
        true, so HTTP connections drain at their next request (here and in the workers)."""
        from .http.conn_manager import HEALTH
        self.healthcheck_failed = failed
        HEALTH.set(failed)
        if failed:
            self.listener_manager.health_check_failed()
        if self.workers is not None:
            self.workers.health_check_failed(failed)

    def drain_listeners(self, inbound_only: bool, graceful: bool, skip_exit: bool = True):
        if not inbound_only:
            self.state = DRAINING
            self.st_state.set(DRAINING)
        if self.workers is not None:
            self.workers.drain(inbound_only, graceful)
        self.listener_manager.drain_listeners(inbound_only=inbound_only, graceful=graceful)

    def quit(self):
        if self.exit_future is not None and not self.exit_future.done():
            self.exit_future.set_result(0)

    async def run_until_exit(self) -> int:
        self.exit_future = self.loop.create_future()
        rc = await self.exit_future
        await self.close()
        return rc

    async def close(self):
        self.exiting = True
        if self._stats_timer is not None:
            self._stats_timer.cancel()
        if self.worker_link is not None:
            self.worker_link.stop()
        self.listener_manager.close_all()
        if self.workers is not None:
            await self.workers.stop(max(1.0, float(self.options.drain_time_s)))
        if self.sds is not None:
            await self.sds.close()
        if self.xds is not None:
            await self.xds.stop()
        if self.admin is not None:
            await self.admin.close()
        from .access_log.file import flush_all
        flush_all()
        self.cluster_manager.close()

    # -- admin views ----------------------------------------------------------------------------------
    def state_name(self) -> str:
        """The admin's state (/ready, /server_info): DRAINING while /healthcheck/fail holds on a
        live server, as Envoy's serverState (the server.state gauge stays LIVE)."""
        if self.state == LIVE and self.healthcheck_failed:
            return "DRAINING"
        return STATE_NAMES[self.state]

    def server_info(self) -> dict:
        o = self.options
        up = int(time.time() - self.start_time)
        return {
            "version": "%s/%s/Clean/RELEASE/pyproxy" % (_VERSION_HASH, __version__),
            "state": self.state_name(),
            "hot_restart_version": "disabled",
            "command_line_options": {
                "base_id": str(o.base_id), "concurrency": o.concurrency,
                "config_path": o.config_path, "config_yaml": o.config_yaml,
                "allow_unknown_static_fields": o.allow_unknown_static_fields,
                "reject_unknown_dynamic_fields": o.reject_unknown_dynamic_fields,
                "log_level": o.log_level, "component_log_level": o.component_log_level,
                "log_format": o.log_format or "", "log_path": o.log_path or "",
                "service_cluster": o.service_cluster, "service_node": o.service_node,
                "service_zone": o.service_zone, "mode": "Serve" if o.mode == "serve" else "Validate",
                "disable_hot_restart": o.disable_hot_restart,
                "drain_time": "%ds" % o.drain_time_s, "parent_shutdown_time": "%ds" % o.parent_shutdown_time_s,
                "drain_strategy": "Immediate" if o.drain_strategy == "immediate" else "Gradual",
                "file_flush_interval": "%.3fs" % (o.file_flush_interval_msec / 1000.0),
                "local_address_ip_version": o.local_address_ip_version,
            },
            "node": to_dict(self.node),
            "uptime_current_epoch": "%ds" % up,
            "uptime_all_epochs": "%ds" % up,
        }

    def config_dump(self, resource: str | None = None, include_eds: bool = False) -> dict:
        bs = to_dict(self.bootstrap)
        configs = [{"@type": "type.googleapis.com/envoy.admin.v3.BootstrapConfigDump",
                    "bootstrap": bs, "last_updated": _ts(self.start_time)},
]
        from .tls.certs import secrets_config_dump
        if self.xds is not None:
            configs += self.xds.config_dumps(include_eds)
        else:
            from .xds import static_config_dumps
            configs += static_config_dumps(self, include_eds)
        configs.append(secrets_config_dump(self))
        if resource:
            out = []
            for c in configs:
                v = c.get(resource)
                if isinstance(v, list):
                    for item in v:
                        item = dict(item)
                        out.append(item)
            return {"configs": out}
        return {"configs": configs}


_VERSION_HASH = "0000000000000000000000000000000000000000"


def _ts(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + ".000Z"


def install_uvloop():
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a hard dependency, but stay runnable
        log.warning("uvloop not available; using the default asyncio loop")
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run(bootstrap, options: Options) -> int:
    index, links = 0, []
    if (options.concurrency or 1) > 1:
        # fork before any loop, thread or gRPC channel exists
        from .workers import fork_workers
        # main process: links = [(pid, socket)] to its workers; a worker: [socket] to the main one
        index, links = fork_workers(options.concurrency)
    loop = install_uvloop()
    asyncio.set_event_loop(loop)
    server = Server(bootstrap, options, loop, worker_index=index, worker_links=links)
    try:
        loop.run_until_complete(server.start())
    except ConfigError as e:
        log.critical("error initializing configuration '%s': %s", options.config_path, e)
        try:
            loop.run_until_complete(server.close())
        except Exception:
            pass
        return 1
    server.install_signal_handlers()
    # config objects live for the whole run: keep them out of the collector's way, and collect
    # young objects less often (request objects are freed by reference counting)
    import gc
    gc.collect()
    gc.freeze()
    gc.set_threshold(20000, 20, 50)
    try:
        rc = loop.run_until_complete(server.run_until_exit())
    finally:
        loop.close()
    log.info("exiting")
    sys.stdout.flush()
    return rc
