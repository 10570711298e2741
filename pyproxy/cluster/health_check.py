"""Active health checking (``envoy.config.core.v3.HealthCheck``): HTTP, TCP and gRPC, as Envoy does it.

One ``HealthChecker`` per cluster (Envoy supports one ``health_checks`` entry), one ``Session``
(``health_check_session``) per host, each driven by ``loop.call_later`` timers over real
connections to the host (reused between checks unless ``reuse_connection`` is false); the proto
is validated by ``health_check_config``.

Semantics (Envoy's ``HealthCheckerImplBase`` / ``ActiveHealthCheckSession``):

* A host joining a health-checked cluster starts with ``failed_active_hc`` and
  ``pending_active_hc`` and is checked at once (after ``initial_jitter``); the cluster finishes
  initializing when every host has had its first result. The first success makes a host healthy
  at once; later, ``healthy_threshold`` successes in a row are needed.
* A failure counts toward ``unhealthy_threshold`` when it is a network failure (connect error,
  reset, timeout, a bad reply to a TCP check); an HTTP status outside ``expected_statuses`` (and
  not in ``retriable_statuses``) or a gRPC answer other than SERVING marks the host unhealthy at once.
  A timeout also sets ``active_hc_timeout`` (cleared when the host turns healthy).
* Next check: ``no_traffic_interval`` (``no_traffic_healthy_interval`` for a healthy host) while the
  cluster has never opened a connection; else ``interval`` (healthy), ``unhealthy_interval``
  (unhealthy), ``healthy_edge_interval`` / ``unhealthy_edge_interval`` while a transition is pending;
  plus ``interval_jitter_percent`` % and ``interval_jitter`` of random jitter.
* HTTP: ``GET`` (or ``method``) ``path`` with ``:authority`` = ``host`` or the cluster's name,
  ``user-agent: Envoy/HC``, ``request_headers_to_add``; an answer carrying ``x-envoy-degraded``
  marks the host ``degraded_active_hc``; HTTP/1.1 (``codec_client_type`` HTTP2 is
  refused). TCP: connect, write ``send``, then every ``receive`` payload must be found in order;
  no ``receive`` = a successful connect is enough. gRPC: ``grpc.health.v1.Health/Check`` over
  HTTP/2 (h2c) for ``service_name``, ``authority`` (default: the cluster's name).
* Checks use the cluster's transport socket for the host (TLS when its traffic uses TLS, with the
  same SNI, certificates and SAN checks).
* Stats ``cluster.<name>.health_check.{attempt,success,failure,network_failure,passive_failure,
  verify_cluster}`` and the gauges ``healthy`` and ``degraded``.
* A check passing on a host ejected by outlier detection brings it back
  (``successful_active_health_check_uneject_host``).

Not implemented (refused with a message): custom_health_check, tls_options, alt_port,
transport_socket_match_criteria, HTTP receive/send payload matching, HTTP/2 HTTP checks,
service_name_matcher, proxy_protocol_config. Event logging (``event_log_path``, ``event_logger``,
``always_log_health_check_*``) is accepted and not done: named in config/unacted.py.
"""


from __future__ import annotations

from ..config import ConfigError
from .health_check_config import HealthCheckConfig
from .health_check_session import Session
from .host import DEGRADED_ACTIVE_HC, FAILED_ACTIVE_HC, PENDING_ACTIVE_HC, PENDING_DYNAMIC_REMOVAL

_COUNTERS = ("attempt", "success", "failure", "passive_failure", "network_failure",
             "verify_cluster")


class HealthChecker:
    """A cluster's active health checker."""

    def __init__(self, cluster, protos):
        if len(protos) > 1:
            raise ConfigError("Multiple health checks not supported", "health_checks")
        self.cluster = cluster
        self.loop = cluster.loop
        try:
            self.cfg = HealthCheckConfig(protos[0], cluster.name)
        except ConfigError as e:
            raise e.within(field="health_checks[0]")
        scope = cluster.scope
        self.st = {n: scope.counter("health_check." + n) for n in _COUNTERS}
        self.st_healthy = scope.gauge("health_check.healthy")
        self.st_degraded = scope.gauge("health_check.degraded")
        self.sessions: dict = {}
        self.started = False
        self.closed = False
        self.awaiting_first: set = set()
        self.on_initial_round = None  # called once every host has had its first result

    def add_hosts(self, hosts) -> None:
        for h in hosts:
            if h in self.sessions:
                continue
            h.set_flag(FAILED_ACTIVE_HC | PENDING_ACTIVE_HC)
            s = Session(self, h)
            h.hc = s
            self.sessions[h] = s
            if self.started:
                s.start()
            else:
                self.awaiting_first.add(h)

    def remove_hosts(self, hosts) -> None:
        for h in hosts:
            s = self.sessions.pop(h, None)
            if s is not None:
                s.stop()
                if h.hc is s:
                    h.hc = None
            self.awaiting_first.discard(h)
        self._gauges()
        self._check_initial()

    def start(self) -> None:
        if self.started or self.closed:
            return
        self.started = True
        for s in list(self.sessions.values()):
            s.start()
        self._check_initial()

    def close(self) -> None:
        self.closed = True
        for s in self.sessions.values():
            s.stop()
        self.sessions.clear()
        self.awaiting_first.clear()

    def initial_round_done(self) -> bool:
        return self.started and not self.awaiting_first

    def _check_initial(self) -> None:
        if self.initial_round_done() and self.on_initial_round is not None:
            cb, self.on_initial_round = self.on_initial_round, None
            cb()

    def _gauges(self) -> None:
        self.st_healthy.set(sum(1 for h in self.sessions if not h.has_flag(FAILED_ACTIVE_HC)))
        self.st_degraded.set(sum(1 for h in self.sessions if h.has_flag(DEGRADED_ACTIVE_HC)))

    def on_result(self, session, changed: bool, first: bool, passed: bool) -> None:
        h = session.host
        if changed:
            self._gauges()
            if not passed and h.flags & PENDING_DYNAMIC_REMOVAL:
                self.cluster.health_check_failed(h)  # (EDS removed it: it goes now)
                return
            self.cluster.hosts_health_changed()
        if passed:
            od = self.cluster.outlier
            if od is not None:
                od.on_health_check_passed(h)
        if first:
            self.awaiting_first.discard(h)
            self._check_initial()
