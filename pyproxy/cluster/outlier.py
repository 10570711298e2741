"""Outlier detection (``envoy.config.cluster.v3.OutlierDetection``) with Envoy's semantics and stats.

Results reach a host's ``HostMonitor`` (``host.outlier``) from the data path:

* ``put_http(status)`` for every upstream response head (``Cluster.count_response(status, host)``,
  called by the router lanes, retried responses included);
* ``put_result(CONNECT_FAILED)`` when a connection attempt for a request fails or the connection a
  request was bound to is lost (pools), ``put_result(TIMEOUT, 504)`` on a per-try or route timeout
  (router), ``put_result(CONNECT_SUCCESS)`` when a request is bound to a connection (pools).

Without ``split_external_local_origin_errors`` local-origin results become HTTP codes (connect
failure / reset 503, timeout 504; a connect success counts nothing). With it they feed a separate
counter (``consecutive_local_origin_failure``) and success-rate monitor.

Detection, as Envoy's ``DetectorImpl``:

* consecutive 5xx / gateway failures (502, 503, 504) / local-origin failures: reaching the
  threshold asks for an ejection on the next loop turn (Envoy posts it to the main thread);
* every ``interval``: hosts whose ejection time is over are brought back; the success-rate buckets
  rotate; success-rate (mean - stdev_factor/1000 * stdev over hosts with ``success_rate_request_volume``
  requests in the last interval, when at least ``success_rate_minimum_hosts`` qualify) and
  failure-percentage (failures >= ``failure_percentage_threshold`` %) detection run, for external
  then local-origin results; the ejection back-off of hosts not ejected for an interval shrinks.
* an ejection happens only while ``100 * (active + 1) / hosts <= max_ejection_percent`` (else
  ``ejections_overflow``; ``always_eject_one_host`` allows one), and is *enforced* with the
  ``enforcing_*`` percentage; an ejected host stays out ``min(base_ejection_time * backoff,
  max_ejection_time) + jitter`` (``backoff`` grows by one per ejection while
  ``backoff * base < max + base``), checked at each interval tick.
* a successful active health check brings an ejected host back
  (``successful_active_health_check_uneject_host``, default true).

An ejected host carries ``failed_outlier_check``: load balancers leave it out like any unhealthy
host, so the healthy panic threshold and priority failover apply to it as in Envoy.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time

from envoy.data.cluster.v3 import outlier_detection_event_pb2 as _ev
from google.protobuf import json_format

from ..config import ConfigError, duration_s
from .host import FAILED_ACTIVE_HC, FAILED_OUTLIER_CHECK

log = logging.getLogger("pyproxy.upstream")

# results (Envoy's Outlier::Result)
CONNECT_SUCCESS, CONNECT_SUCCESS_FINAL, CONNECT_FAILED, TIMEOUT, EXT_FAILED, EXT_SUCCESS = range(6)
_RESULT_CODE = {CONNECT_SUCCESS_FINAL: 200, EXT_SUCCESS: 200, TIMEOUT: 504, CONNECT_FAILED: 503,
                EXT_FAILED: 500}

# ejection types (envoy.data.cluster.v3.OutlierEjectionType) -> stat suffix / enforcing field
CONSECUTIVE_5XX = "consecutive_5xx"
CONSECUTIVE_GATEWAY_FAILURE = "consecutive_gateway_failure"
CONSECUTIVE_LOCAL_ORIGIN_FAILURE = "consecutive_local_origin_failure"
SUCCESS_RATE = "success_rate"
SUCCESS_RATE_LOCAL_ORIGIN = "local_origin_success_rate"
FAILURE_PERCENTAGE = "failure_percentage"
FAILURE_PERCENTAGE_LOCAL_ORIGIN = "local_origin_failure_percentage"
_TYPES = (CONSECUTIVE_5XX, CONSECUTIVE_GATEWAY_FAILURE, CONSECUTIVE_LOCAL_ORIGIN_FAILURE,
          SUCCESS_RATE, SUCCESS_RATE_LOCAL_ORIGIN, FAILURE_PERCENTAGE,
          FAILURE_PERCENTAGE_LOCAL_ORIGIN)
_EVENT_TYPE = {CONSECUTIVE_5XX: "CONSECUTIVE_5XX",
               CONSECUTIVE_GATEWAY_FAILURE: "CONSECUTIVE_GATEWAY_FAILURE",
               CONSECUTIVE_LOCAL_ORIGIN_FAILURE: "CONSECUTIVE_LOCAL_ORIGIN_FAILURE",
               SUCCESS_RATE: "SUCCESS_RATE", SUCCESS_RATE_LOCAL_ORIGIN: "SUCCESS_RATE_LOCAL_ORIGIN",
               FAILURE_PERCENTAGE: "FAILURE_PERCENTAGE",
               FAILURE_PERCENTAGE_LOCAL_ORIGIN: "FAILURE_PERCENTAGE_LOCAL_ORIGIN"}


class EventLog:
    """The bootstrap's ``cluster_manager.outlier_detection.event_log_path`` (Istio: /dev/stdout):
    one JSON ``OutlierDetectionEvent`` per line, as Envoy writes them."""

    def __init__(self, path: str):
        self.path = path
        self.f = None

    def write(self, event) -> None:
        line = json.dumps(json_format.MessageToDict(
            event, preserving_proto_field_name=True, always_print_fields_with_no_presence=True),
            separators=(",", ":"))
        try:
            if self.f is None:
                self.f = open(self.path, "a", buffering=1)
            self.f.write(line + "\n")
        except OSError as e:
            log.warning("outlier detection event log %s: %s", self.path, e)


_COUNTERS = (
    "ejections_consecutive_5xx", "ejections_detected_consecutive_5xx",
    "ejections_detected_consecutive_gateway_failure", "ejections_detected_success_rate",
    "ejections_detected_consecutive_local_origin_failure",
    "ejections_detected_local_origin_success_rate", "ejections_detected_failure_percentage",
    "ejections_detected_local_origin_failure_percentage", "ejections_enforced_consecutive_5xx",
    "ejections_enforced_consecutive_gateway_failure", "ejections_enforced_success_rate",
    "ejections_enforced_consecutive_local_origin_failure",
    "ejections_enforced_local_origin_success_rate", "ejections_enforced_failure_percentage",
    "ejections_enforced_local_origin_failure_percentage", "ejections_enforced_total",
    "ejections_overflow", "ejections_success_rate", "ejections_total",
    "ejections_detected_degradation",  # (Envoy 1.40 declares it; nothing here moves it)
)


def _u(msg, field, default):
    return getattr(msg, field).value if msg.HasField(field) else default


def _pct(msg, field, default):
    v = _u(msg, field, default)
    if v > 100:
        raise ConfigError("value must be less than or equal to 100", field)
    return v


# Envoy's Grpc::Utility::grpcToHttpStatus
_GRPC_HTTP = {0: 200, 1: 499, 2: 500, 3: 400, 4: 504, 5: 404, 6: 409, 7: 403, 8: 429, 9: 400,
              10: 409, 11: 400, 12: 501, 13: 500, 14: 503, 15: 500, 16: 401}


def grpc_to_http(grpc_status: str) -> int:
    try:
        return _GRPC_HTTP.get(int(grpc_status), 500)
    except ValueError:
        return 500


def put_response(host, status: int, headers=None) -> None:
    """Outlier detection sees every upstream response of ``host`` (``headers``: its headers,
    so that a gRPC trailers-only answer counts as its ``grpc-status`` mapped to HTTP, as
    Envoy's router reports it)."""
    m = host.outlier if host is not None else None
    if m is not None:
        if headers is not None and status == 200:
            gs = headers.get("grpc-status")
            if gs is not None:
                status = grpc_to_http(gs)
        m.put_http(status)


class OutlierConfig:
    """The compiled ``OutlierDetection`` (Envoy's defaults for unset fields)."""

    def __init__(self, od):
        self.interval = duration_s(od, "interval", 10.0)
        self.base_ejection_time = duration_s(od, "base_ejection_time", 30.0)
        self.max_ejection_time = duration_s(od, "max_ejection_time",
                                            max(300.0, self.base_ejection_time))
        self.max_ejection_time_jitter = duration_s(od, "max_ejection_time_jitter", 0.0)
        if self.max_ejection_time < self.base_ejection_time:
            raise ConfigError("outlier detector's max_ejection_time cannot be smaller than "
                              "base_ejection_time", "max_ejection_time")
        if self.interval <= 0:
            raise ConfigError("value must be greater than 0", "interval")
        self.consecutive_5xx = _u(od, "consecutive_5xx", 5)
        self.consecutive_gateway_failure = _u(od, "consecutive_gateway_failure", 5)
        self.consecutive_local_origin_failure = _u(od, "consecutive_local_origin_failure", 5)
        self.max_ejection_percent = min(100, _u(od, "max_ejection_percent", 10))
        self.always_eject_one_host = _u(od, "always_eject_one_host", False)
        self.success_rate_minimum_hosts = _u(od, "success_rate_minimum_hosts", 5)
        self.success_rate_request_volume = _u(od, "success_rate_request_volume", 100)
        self.success_rate_stdev_factor = _u(od, "success_rate_stdev_factor", 1900)
        self.failure_percentage_threshold = _pct(od, "failure_percentage_threshold", 85)
        self.failure_percentage_minimum_hosts = _u(od, "failure_percentage_minimum_hosts", 5)
        self.failure_percentage_request_volume = _u(od, "failure_percentage_request_volume", 50)
        self.split = od.split_external_local_origin_errors
        self.enforcing = {
            CONSECUTIVE_5XX: _pct(od, "enforcing_consecutive_5xx", 100),
            CONSECUTIVE_GATEWAY_FAILURE: _pct(od, "enforcing_consecutive_gateway_failure", 0),
            CONSECUTIVE_LOCAL_ORIGIN_FAILURE:
                _pct(od, "enforcing_consecutive_local_origin_failure", 100),
            SUCCESS_RATE: _pct(od, "enforcing_success_rate", 100),
            SUCCESS_RATE_LOCAL_ORIGIN: _pct(od, "enforcing_local_origin_success_rate", 100),
            FAILURE_PERCENTAGE: _pct(od, "enforcing_failure_percentage", 0),
            FAILURE_PERCENTAGE_LOCAL_ORIGIN:
                _pct(od, "enforcing_failure_percentage_local_origin", 0),
        }
        self.hc_unejects = _u(od, "successful_active_health_check_uneject_host", True)
        if len(od.monitors):
            raise ConfigError("outlier detection monitor extensions are not supported", "monitors")


class _SuccessRate:
    """Two buckets: the current interval's counts and the last complete interval's."""

    __slots__ = ("total", "success", "prev_total", "prev_success", "rate")

    def __init__(self):
        self.total = self.success = self.prev_total = self.prev_success = 0
        self.rate = -1.0  # for /clusters: the last computed success rate, -1 when none

    def rotate(self):
        self.prev_total, self.prev_success = self.total, self.success
        self.total = self.success = 0

    def last(self):
        """(success rate %, volume) of the last complete interval, or None."""
        if not self.prev_total:
            return None
        return self.prev_success * 100.0 / self.prev_total, self.prev_total


class HostMonitor:
    """One host's counters (``host.outlier``)."""

    __slots__ = ("detector", "host", "c5xx", "cgw", "clo", "ext", "local", "num_ejections",
                 "backoff", "last_ejection", "last_unejection", "jitter", "split", "cfg")

    def __init__(self, detector, host):
        self.detector = detector
        self.host = host
        self.cfg = detector.cfg
        self.split = detector.cfg.split
        self.c5xx = self.cgw = self.clo = 0
        self.ext = _SuccessRate()
        self.local = _SuccessRate()
        self.num_ejections = 0
        self.backoff = 0
        self.last_ejection = None
        self.last_unejection = None
        self.jitter = 0.0

    def put_http(self, code: int) -> None:
        ext = self.ext
        ext.total += 1
        if 500 <= code < 600:
            cfg = self.cfg
            if code in (502, 503, 504):
                self.cgw += 1
                if self.cgw == cfg.consecutive_gateway_failure:
                    self.detector.consecutive(self.host, CONSECUTIVE_GATEWAY_FAILURE)
            else:
                self.cgw = 0
            self.c5xx += 1
            if self.c5xx == cfg.consecutive_5xx:
                self.detector.consecutive(self.host, CONSECUTIVE_5XX)
        else:
            ext.success += 1
            self.c5xx = 0
            self.cgw = 0

    def put_result(self, result: int, code: int | None = None) -> None:
        if not self.split:
            if code is None:
                code = _RESULT_CODE.get(result)
            if code is not None:
                self.put_http(code)
            return
        if result in (CONNECT_SUCCESS, CONNECT_SUCCESS_FINAL):
            self._local_ok()
        elif result in (TIMEOUT, CONNECT_FAILED):
            loc = self.local
            loc.total += 1
            self.clo += 1
            if self.clo == self.cfg.consecutive_local_origin_failure:
                self.detector.consecutive(self.host, CONSECUTIVE_LOCAL_ORIGIN_FAILURE)
        elif result == EXT_FAILED:
            self.put_http(503)
        elif result == EXT_SUCCESS:
            self.put_http(200)
            self._local_ok()

    def _local_ok(self):
        loc = self.local
        loc.total += 1
        loc.success += 1
        self.clo = 0


class Detector:
    """A cluster's outlier detector: host monitors, the interval timer, stats."""

    def __init__(self, cluster, od_proto):
        self.cluster = cluster
        self.loop = cluster.loop
        try:
            self.cfg = OutlierConfig(od_proto)
        except ConfigError as e:
            raise e.within(field="outlier_detection")
        scope = cluster.scope
        self.st = {n: scope.counter("outlier_detection." + n) for n in _COUNTERS}
        self.st_active = scope.gauge("outlier_detection.ejections_active")
        self.monitors: dict = {}
        self.active = 0
        self.sr_average = {False: -1.0, True: -1.0}  # by local-origin
        self.sr_threshold = {False: -1.0, True: -1.0}
        self.timer = None
        self.closed = False
        self._rng = random.Random()
        self.event_log = getattr(cluster.manager, "outlier_event_log", None) \
            if getattr(cluster, "manager", None) is not None else None

    # -- hosts ---------------------------------------------------------------------------------
    def add_hosts(self, hosts) -> None:
        for h in hosts:
            if h.outlier is None or h.outlier.detector is not self:
                m = HostMonitor(self, h)
                h.outlier = m
                self.monitors[h] = m

    def remove_hosts(self, hosts) -> None:
        for h in hosts:
            m = self.monitors.pop(h, None)
            if m is None:
                continue
            if h.has_flag(FAILED_OUTLIER_CHECK):
                self._set_active(self.active - 1)
            if h.outlier is m:
                h.outlier = None

    def _set_active(self, n: int) -> None:
        self.active = n
        self.st_active.set(n)

    # -- timer ---------------------------------------------------------------------------------
    def start(self) -> None:
        if self.timer is None and not self.closed:
            self.timer = self.loop.call_later(self.cfg.interval, self._on_interval)

    def close(self) -> None:
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.active:
            self._set_active(0)

    def _on_interval(self) -> None:
        self.timer = None
        if self.closed:
            return
        now = self.loop.time()
        cfg = self.cfg
        changed = False
        for h, m in list(self.monitors.items()):
            if h.has_flag(FAILED_OUTLIER_CHECK):
                t = min(cfg.base_ejection_time * m.backoff, cfg.max_ejection_time) + m.jitter
                if now - m.last_ejection >= t - 1e-9:
                    self._uneject(h, m, now, notify=False)
                    changed = True
            m.ext.rotate()
            m.local.rotate()
            m.ext.rate = -1.0
            m.local.rate = -1.0
        if self._success_rate_pass(False):
            changed = True
        if self._success_rate_pass(True):
            changed = True
        for h, m in self.monitors.items():
            if not h.has_flag(FAILED_OUTLIER_CHECK) and m.last_unejection is not None \
                    and now - m.last_unejection >= cfg.interval - 1e-9 and m.backoff:
                m.backoff -= 1
        if changed:
            self.cluster.hosts_health_changed()
        self.timer = self.loop.call_later(cfg.interval, self._on_interval)

    # -- detection -----------------------------------------------------------------------------
    def consecutive(self, host, kind: str) -> None:
        """A consecutive-error threshold was reached: handled on the next loop turn, as Envoy
        posts it to its main thread."""
        self.loop.call_soon(self._on_consecutive, host, kind)

    def _on_consecutive(self, host, kind: str) -> None:
        m = self.monitors.get(host)
        if m is None or self.closed or host.has_flag(FAILED_OUTLIER_CHECK):
            return
        self.st["ejections_detected_" + kind].value += 1
        ejected = self._eject(host, m, kind)
        if kind == CONSECUTIVE_5XX:
            self.st["ejections_consecutive_5xx"].value += 1
            m.c5xx = 0
        elif kind == CONSECUTIVE_GATEWAY_FAILURE:
            m.cgw = 0
        else:
            m.clo = 0
        if ejected:
            self.cluster.hosts_health_changed()

    def _success_rate_pass(self, local: bool) -> bool:
        cfg = self.cfg
        self.sr_average[local] = self.sr_threshold[local] = -1.0
        n = len(self.monitors)
        if n < cfg.success_rate_minimum_hosts and n < cfg.failure_percentage_minimum_hosts:
            return False
        sr_hosts, fp_hosts = [], []
        total = 0.0
        min_vol = min(cfg.success_rate_request_volume, cfg.failure_percentage_request_volume)
        for h, m in self.monitors.items():
            if h.has_flag(FAILED_OUTLIER_CHECK):
                continue
            mon = m.local if local else m.ext
            last = mon.last()
            if last is None:
                continue
            rate, volume = last
            if volume >= min_vol:
                mon.rate = rate
            if volume >= cfg.success_rate_request_volume:
                sr_hosts.append((h, m, rate))
                total += rate
            if volume >= cfg.failure_percentage_request_volume:
                fp_hosts.append((h, m, rate))
        changed = False
        if sr_hosts and len(sr_hosts) >= cfg.success_rate_minimum_hosts:
            mean = total / len(sr_hosts)
            var = sum((r - mean) ** 2 for _, _, r in sr_hosts) / len(sr_hosts)
            threshold = mean - (cfg.success_rate_stdev_factor / 1000.0) * math.sqrt(var)
            self.sr_average[local], self.sr_threshold[local] = mean, threshold
            kind = SUCCESS_RATE_LOCAL_ORIGIN if local else SUCCESS_RATE
            for h, m, rate in sr_hosts:
                if rate < threshold:
                    self.st["ejections_success_rate"].value += 1
                    self.st["ejections_detected_" + kind].value += 1
                    changed |= self._eject(h, m, kind)
        if fp_hosts and len(fp_hosts) >= cfg.failure_percentage_minimum_hosts:
            kind = FAILURE_PERCENTAGE_LOCAL_ORIGIN if local else FAILURE_PERCENTAGE
            for h, m, rate in fp_hosts:
                if 100.0 - rate >= cfg.failure_percentage_threshold:
                    self.st["ejections_detected_" + kind].value += 1
                    changed |= self._eject(h, m, kind)
        return changed

    def _eject(self, host, m: HostMonitor, kind: str) -> bool:
        """Envoy's ejectHost: True when the host was ejected."""
        if host.has_flag(FAILED_OUTLIER_CHECK):
            return False  # (ejected earlier in the same pass)
        cfg = self.cfg
        should = 100.0 * (self.active + 1) / max(1, len(self.monitors)) <= cfg.max_ejection_percent
        if cfg.always_eject_one_host:
            should = should or self.active == 0
        if not should:
            self.st["ejections_overflow"].value += 1
            return False
        if kind in (CONSECUTIVE_5XX, SUCCESS_RATE):
            self.st["ejections_total"].value += 1
        pct = cfg.enforcing[kind]
        if not (pct >= 100 or (pct > 0 and self._rng.random() * 100 < pct)):
            log.debug("outlier detection: %s of cluster %s detected (%s), not enforced",
                      host.key, self.cluster.name, kind)
            if self.event_log is not None:
                self._log_event(host, m, kind, eject=True, enforced=False)
            return False
        self._set_active(self.active + 1)
        self.st["ejections_enforced_total"].value += 1
        self.st["ejections_enforced_" + kind].value += 1
        host.set_flag(FAILED_OUTLIER_CHECK)
        m.num_ejections += 1
        m.last_ejection = self.loop.time()
        jit = cfg.max_ejection_time_jitter
        m.jitter = (self._rng.randrange(int(jit * 1000) + 1) / 1000.0) if jit > 0 else 0.0
        if m.backoff * cfg.base_ejection_time < cfg.max_ejection_time + cfg.base_ejection_time:
            m.backoff += 1
        log.info("outlier detection: ejected %s of cluster %s (%s, ejection #%d)", host.key,
                 self.cluster.name, kind, m.num_ejections)
        if self.event_log is not None:
            self._log_event(host, m, kind, eject=True, enforced=True)
        return True

    def _log_event(self, host, m: HostMonitor, kind, eject: bool, enforced: bool = False) -> None:
        ev = _ev.OutlierDetectionEvent()
        now = self.loop.time()
        since = m.last_unejection if eject else m.last_ejection
        if since is not None:
            ev.secs_since_last_action.value = int(now - since)
        ev.cluster_name = self.cluster.name
        ev.upstream_url = host.key
        ev.num_ejections = m.num_ejections
        ev.timestamp.FromNanoseconds(time.time_ns())
        if eject:
            ev.type = _ev.OutlierEjectionType.Value(_EVENT_TYPE[kind])
            ev.action = _ev.EJECT
            ev.enforced = enforced
            local = kind in (SUCCESS_RATE_LOCAL_ORIGIN, FAILURE_PERCENTAGE_LOCAL_ORIGIN)
            mon = m.local if local else m.ext
            if kind in (SUCCESS_RATE, SUCCESS_RATE_LOCAL_ORIGIN):
                e = ev.eject_success_rate_event
                e.cluster_average_success_rate = self.sr_average[local]
                e.cluster_success_rate_ejection_threshold = self.sr_threshold[local]
                e.host_success_rate = mon.rate
            elif kind in (FAILURE_PERCENTAGE, FAILURE_PERCENTAGE_LOCAL_ORIGIN):
                ev.eject_failure_percentage_event.host_success_rate = mon.rate
            else:
                ev.eject_consecutive_event.SetInParent()
        else:
            ev.action = _ev.UNEJECT
        self.event_log.write(ev)

    def _uneject(self, host, m: HostMonitor, now: float, notify: bool = True) -> None:
        self._set_active(self.active - 1)
        host.clear_flag(FAILED_OUTLIER_CHECK)
        m.c5xx = m.cgw = m.clo = 0
        m.last_unejection = now
        if self.event_log is not None:
            self._log_event(host, m, None, eject=False)
        log.info("outlier detection: %s of cluster %s back in rotation", host.key,
                 self.cluster.name)
        if notify:
            self.cluster.hosts_health_changed()

    def on_health_check_passed(self, host) -> None:
        """An active health check succeeded: an ejected host (not failing active checks) comes
        back, as Envoy's ``successful_active_health_check_uneject_host``."""
        if not self.cfg.hc_unejects:
            return
        m = self.monitors.get(host)
        if m is not None and host.has_flag(FAILED_OUTLIER_CHECK) \
                and not host.has_flag(FAILED_ACTIVE_HC):
            self._uneject(host, m, self.loop.time())

    # -- admin ---------------------------------------------------------------------------------
    def status(self) -> dict:
        return {"success_rate_average": self.sr_average[False],
                "success_rate_ejection_threshold": self.sr_threshold[False],
                "local_origin_success_rate_average": self.sr_average[True],
                "local_origin_success_rate_ejection_threshold": self.sr_threshold[True]}
