"""Active health checking (``envoy.config.core.v3.HealthCheck``): HTTP, TCP and gRPC, as Envoy does it.

One ``HealthChecker`` per cluster (Envoy supports one ``health_checks`` entry), one ``_Session``
per host, each driven by ``loop.call_later`` timers over real connections to the host (reused
between checks unless ``reuse_connection`` is false).

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

import asyncio
import logging
import random
import socket

import h2.config
import h2.connection
import h2.events
import httptools

from ..config import ConfigError, duration_s
from .host import (ACTIVE_HC_TIMEOUT, DEGRADED_ACTIVE_HC, FAILED_ACTIVE_HC, PENDING_ACTIVE_HC,
                   PENDING_DYNAMIC_REMOVAL)

log = logging.getLogger("pyproxy.hc")

HTTP, TCP, GRPC = "http", "tcp", "grpc"
_COUNTERS = ("attempt", "success", "failure", "passive_failure", "network_failure",
             "verify_cluster")
_MAX_RESPONSE = 64 * 1024  # bytes read from a TCP check / an HTTP body before giving up

# results of one check
_OK, _ACTIVE_FAIL, _NETWORK_FAIL, _TIMEOUT, _RETRIABLE_FAIL = range(5)


def _payload(p, field: str) -> bytes:
    which = p.WhichOneof("payload")
    if which == "text":
        try:
            return bytes.fromhex(p.text)
        except ValueError:
            raise ConfigError("payload text must be hex", field + ".text") from None
    if which == "binary":
        return bytes(p.binary)
    raise ConfigError("payload must be set", field)


def _ranges(rs, field: str) -> list:
    out = []
    for i, r in enumerate(rs):
        if not (100 <= r.start < r.end <= 600):
            raise ConfigError("status range [%d, %d) must be within [100, 600)" % (r.start, r.end),
                              "%s[%d]" % (field, i))
        out.append((r.start, r.end))
    return out


class HealthCheckConfig:
    def __init__(self, hc, cluster_name: str):
        if not hc.HasField("timeout"):
            raise ConfigError("timeout is required", "timeout")
        if not hc.HasField("interval"):
            raise ConfigError("interval is required", "interval")
        self.timeout = duration_s(hc, "timeout", 1.0)
        self.interval = duration_s(hc, "interval", 1.0)
        if self.timeout <= 0 or self.interval <= 0:
            raise ConfigError("value must be greater than 0", "interval" if self.interval <= 0
                              else "timeout")
        self.initial_jitter = duration_s(hc, "initial_jitter", 0.0)
        self.interval_jitter = duration_s(hc, "interval_jitter", 0.0)
        self.interval_jitter_percent = hc.interval_jitter_percent
        if not hc.HasField("unhealthy_threshold") or not hc.HasField("healthy_threshold"):
            raise ConfigError("unhealthy_threshold and healthy_threshold are required",
                              "unhealthy_threshold" if not hc.HasField("unhealthy_threshold")
                              else "healthy_threshold")
        self.unhealthy_threshold = max(1, hc.unhealthy_threshold.value)
        self.healthy_threshold = max(1, hc.healthy_threshold.value)
        self.reuse_connection = hc.reuse_connection.value if hc.HasField("reuse_connection") \
            else True
        self.no_traffic_interval = duration_s(hc, "no_traffic_interval", 60.0)
        self.no_traffic_healthy_interval = duration_s(hc, "no_traffic_healthy_interval",
                                                      self.no_traffic_interval)
        self.unhealthy_interval = duration_s(hc, "unhealthy_interval", self.interval)
        self.unhealthy_edge_interval = duration_s(hc, "unhealthy_edge_interval",
                                                  self.unhealthy_interval)
        self.healthy_edge_interval = duration_s(hc, "healthy_edge_interval", self.interval)
        for f in ("custom_health_check", "tls_options"):
            if hc.HasField(f):
                raise ConfigError("%s is not supported" % f, f)
        if hc.HasField("alt_port"):
            raise ConfigError("alt_port is not supported", "alt_port")
        if hc.HasField("transport_socket_match_criteria"):
            raise ConfigError("transport_socket_match_criteria is not supported",
                              "transport_socket_match_criteria")
        which = hc.WhichOneof("health_checker")
        if which == "http_health_check":
            self.kind = HTTP
            h = hc.http_health_check
            if h.codec_client_type not in (0,):  # HTTP1
                raise ConfigError("only HTTP/1.1 health checks are supported",
                                  "http_health_check.codec_client_type")
            if h.HasField("send") or len(h.receive):
                raise ConfigError("send/receive payloads of HTTP health checks are not supported",
                                  "http_health_check.receive")
            if not h.path:
                raise ConfigError("path is required", "http_health_check.path")
            if h.HasField("service_name_matcher"):
                raise ConfigError("service_name_matcher is not supported (the check would pass "
                                  "hosts it should fail)", "http_health_check.service_name_matcher")
            self.path = h.path
            self.host = h.host or cluster_name
            self.method = {0: "GET", 1: "GET", 2: "HEAD", 3: "POST", 4: "PUT", 5: "DELETE",
                           6: "CONNECT", 7: "OPTIONS", 8: "TRACE", 9: "PATCH"}.get(h.method, "GET")
            if self.method == "CONNECT":
                raise ConfigError("method CONNECT is not allowed", "http_health_check.method")
            self.expected = _ranges(h.expected_statuses, "http_health_check.expected_statuses") \
                or [(200, 201)]
            self.retriable = _ranges(h.retriable_statuses, "http_health_check.retriable_statuses")
            remove = {n.lower() for n in h.request_headers_to_remove}
            self.headers = [(hv.header.key.lower(), hv.header.value)
                            for hv in h.request_headers_to_add
                            if hv.header.key.lower() not in remove]
            for k, v in self.headers:
                if any(c in k + v for c in "\r\n\0"):
                    raise ConfigError("invalid header in request_headers_to_add",
                                      "http_health_check.request_headers_to_add")
        elif which == "tcp_health_check":
            self.kind = TCP
            t = hc.tcp_health_check
            if t.HasField("proxy_protocol_config"):
                raise ConfigError("proxy_protocol_config is not supported",
                                  "tcp_health_check.proxy_protocol_config")
            self.send = _payload(t.send, "tcp_health_check.send") if t.HasField("send") else b""
            self.receive = [_payload(p, "tcp_health_check.receive[%d]" % i)
                            for i, p in enumerate(t.receive)]
        elif which == "grpc_health_check":
            self.kind = GRPC
            g = hc.grpc_health_check
            self.service_name = g.service_name
            self.authority = g.authority or cluster_name
            self.metadata = [(m.header.key.lower(), m.header.value) for m in g.initial_metadata]
        else:
            raise ConfigError("health checker type '%s' is not supported" % which,
                              which or "health_checker")


# --------------------------------------------------------------------------------------------
# one connection per host session (an asyncio protocol per check kind)

class _Conn(asyncio.Protocol):
    """The connection of a session: feeds bytes to the check in progress."""

    def __init__(self, session):
        self.session = session
        self.transport = None
        self.closed = False

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.session.on_data(self, data)

    def eof_received(self):
        return False

    def connection_lost(self, exc):
        self.closed = True
        self.session.on_conn_lost(self)

    def write(self, data: bytes) -> None:
        if not self.closed:
            self.transport.write(data)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.abort()


class _HttpParse:
    """httptools callbacks for one HTTP/1.1 health check response."""

    def __init__(self):
        self.done = False
        self.body = 0
        self.keep_alive = True
        self.degraded = False

    def on_header(self, name, value):
        if len(name) == 16 and name.lower() == b"x-envoy-degraded":
            self.degraded = True

    def on_body(self, b):
        self.body += len(b)

    def on_message_complete(self):
        self.done = True


def _grpc_request(service: str) -> bytes:
    body = b""
    if service:
        s = service.encode()
        n = len(s)
        var = bytearray()
        while True:
            b = n & 0x7F
            n >>= 7
            var.append(b | (0x80 if n else 0))
            if not n:
                break
        body = b"\x0a" + bytes(var) + s
    return b"\x00" + len(body).to_bytes(4, "big") + body


def _grpc_serving(msg: bytes) -> int:
    """The ``status`` field of a HealthCheckResponse (0 when absent / unparsable)."""
    i = 0
    while i < len(msg):
        key = msg[i]
        i += 1
        if key == 0x08:  # field 1, varint
            v = shift = 0
            while i < len(msg):
                b = msg[i]
                i += 1
                v |= (b & 0x7F) << shift
                shift += 7
                if not b & 0x80:
                    return v
            return 0
        return 0  # (other fields: not expected)
    return 0


class _Session:
    """Health checking of one host."""

    def __init__(self, checker, host):
        self.checker = checker
        self.host = host
        self.cfg = checker.cfg
        self.loop = checker.loop
        self.timer = None
        self.timeout_timer = None
        self.conn = None
        self.connecting = False
        self.num_healthy = 0
        self.num_unhealthy = 0
        self.first_check = True
        self.in_check = False
        self.stopped = False
        # per-check state
        self.parser = None
        self.http = None
        self.buf = b""
        self.h2 = None
        self.grpc_sid = None
        self.grpc_data = b""
        self.grpc_status = None
        self.grpc_http = 0

    # -- scheduling -------------------------------------------------------------------------------
    def start(self) -> None:
        j = self.cfg.initial_jitter
        delay = random.random() * j if j > 0 else 0.0
        self.timer = self.loop.call_later(delay, self._on_interval)

    def stop(self) -> None:
        self.stopped = True
        for t in (self.timer, self.timeout_timer):
            if t is not None:
                t.cancel()
        self.timer = self.timeout_timer = None
        self._close_conn()

    def _close_conn(self) -> None:
        c = self.conn
        self.conn = None
        self.h2 = None
        if c is not None:
            c.close()

    def _next(self, healthy: bool, pending: bool) -> float:
        cfg = self.cfg
        if self.checker.cluster.st_cx_total.value:
            if not healthy:
                base = cfg.unhealthy_edge_interval if pending else cfg.unhealthy_interval
            else:
                base = cfg.healthy_edge_interval if pending else cfg.interval
        else:
            base = cfg.no_traffic_healthy_interval if healthy else cfg.no_traffic_interval
        ms = int(base * 1000)
        if cfg.interval_jitter_percent:
            mod = cfg.interval_jitter_percent * ms // 100
            if mod > 0:
                ms += random.randrange(mod)
        j = int(cfg.interval_jitter * 1000)
        if j > 0:
            ms += random.randrange(j)
        return ms / 1000.0

    def _on_interval(self) -> None:
        self.timer = None
        if self.stopped:
            return
        self.checker.st["attempt"].value += 1
        self.in_check = True
        self.timeout_timer = self.loop.call_later(self.cfg.timeout, self._on_timeout)
        if self.conn is None or self.conn.closed:
            self.conn = None
            if not self.connecting:
                self.connecting = True
                self.loop.create_task(self._connect())
        else:
            self._send_check()

    async def _connect(self) -> None:
        h = self.host
        conn = _Conn(self)
        try:
            if h.pipe:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                addr = h.pipe
            else:
                sock = socket.socket(h.family, socket.SOCK_STREAM)
                addr = (h.address, h.port)
            try:
                sock.setblocking(False)
                await self.loop.sock_connect(sock, addr)
            except BaseException:
                sock.close()
                raise
            # the cluster's transport socket for this host (TLS as its traffic uses it)
            ts = self.checker.cluster.transport_for(h)
            if ts.is_tls:
                await ts.connect(self.loop, sock, conn, self.cfg.timeout, self.checker.cluster.scope)
            else:
                try:
                    await self.loop.create_connection(lambda: conn, sock=sock)
                except BaseException:
                    sock.close()
                    raise
        except asyncio.CancelledError:
            self.connecting = False
            raise
        except (OSError, asyncio.TimeoutError):
            self.connecting = False
            if self.in_check and not self.stopped:
                self._result(_NETWORK_FAIL)
            return
        self.connecting = False
        if self.stopped or not self.in_check:
            conn.close()  # (the check timed out meanwhile)
            return
        self.conn = conn
        if self.cfg.kind == GRPC:
            self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(
                client_side=True, header_encoding="utf-8"))
            self.h2.initiate_connection()
            conn.write(self.h2.data_to_send())
        self._send_check()

    # -- one check ---------------------------------------------------------------------------------
    def _send_check(self) -> None:
        cfg = self.cfg
        conn = self.conn
        if cfg.kind == HTTP:
            self.http = _HttpParse()
            self.parser = httptools.HttpResponseParser(self.http)
            head = "%s %s HTTP/1.1\r\nhost: %s\r\nuser-agent: Envoy/HC\r\n" % (
                cfg.method, cfg.path, cfg.host)
            head += "".join("%s: %s\r\n" % kv for kv in cfg.headers)
            if not cfg.reuse_connection:
                head += "connection: close\r\n"
            conn.write((head + "\r\n").encode("latin-1"))
        elif cfg.kind == TCP:
            self.buf = b""
            if cfg.send:
                conn.write(cfg.send)
            if not cfg.receive:
                self._result(_OK)
        else:
            h = self.h2
            sid = self.grpc_sid = h.get_next_available_stream_id()
            self.grpc_data = b""
            self.grpc_status = None
            self.grpc_http = 0
            hdrs = [(":method", "POST"), (":scheme", "http"),
                    (":path", "/grpc.health.v1.Health/Check"), (":authority", cfg.authority),
                    ("content-type", "application/grpc"), ("te", "trailers"),
                    ("user-agent", "Envoy/HC")] + cfg.metadata
            try:
                h.send_headers(sid, hdrs)
                h.send_data(sid, _grpc_request(cfg.service_name), end_stream=True)
            except Exception:
                self._result(_NETWORK_FAIL)
                return
            conn.write(h.data_to_send())

    def on_data(self, conn, data: bytes) -> None:
        if conn is not self.conn:
            return
        cfg = self.cfg
        if not self.in_check:
            if cfg.kind == GRPC and self.h2 is not None:
                self._grpc_feed(data)  # (pings, settings between checks)
                return
            self._close_conn()  # unsolicited bytes: start afresh next time
            return
        if cfg.kind == HTTP:
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserError:
                self._result(_NETWORK_FAIL)
                return
            p = self.http
            if p.body > _MAX_RESPONSE:
                self._result(_NETWORK_FAIL)
                return
            if p.done:
                status = self.parser.get_status_code()
                p.keep_alive = self.parser.should_keep_alive()
                if any(a <= status < b for a, b in cfg.expected):
                    self._result(_OK, degraded=p.degraded)
                elif any(a <= status < b for a, b in cfg.retriable):
                    self._result(_RETRIABLE_FAIL)  # (counted toward the threshold)
                else:
                    self._result(_ACTIVE_FAIL)
        elif cfg.kind == TCP:
            self.buf += data
            if len(self.buf) > _MAX_RESPONSE:
                self._result(_NETWORK_FAIL)
                return
            pos = 0
            for want in cfg.receive:
                i = self.buf.find(want, pos)
                if i < 0:
                    return
                pos = i + len(want)
            self._result(_OK)
        else:
            self._grpc_feed(data)

    def _grpc_feed(self, data: bytes) -> None:
        h = self.h2
        try:
            events = h.receive_data(data)
        except Exception:
            if self.in_check:
                self._result(_NETWORK_FAIL)
            else:
                self._close_conn()
            return
        out = h.data_to_send()
        if out and self.conn is not None:
            self.conn.write(out)
        sid = self.grpc_sid
        for e in events:
            if isinstance(e, (h2.events.ResponseReceived, h2.events.TrailersReceived)) \
                    and e.stream_id == sid:
                for k, v in e.headers:
                    if k == ":status":
                        self.grpc_http = int(v)
                    elif k == "grpc-status":
                        self.grpc_status = v
            elif isinstance(e, h2.events.DataReceived) and e.stream_id == sid:
                h.acknowledge_received_data(e.flow_controlled_length, sid)
                self.grpc_data += e.data
                if len(self.grpc_data) > _MAX_RESPONSE:
                    self._result(_NETWORK_FAIL)
                    return
            elif isinstance(e, h2.events.StreamReset) and e.stream_id == sid:
                self._result(_NETWORK_FAIL)
                return
            elif isinstance(e, h2.events.ConnectionTerminated):
                if self.in_check:
                    self._result(_NETWORK_FAIL)
                else:
                    self._close_conn()
                return
            if isinstance(e, h2.events.StreamEnded) and e.stream_id == sid and self.in_check:
                ok = False
                if self.grpc_http == 200 and self.grpc_status == "0" and \
                        len(self.grpc_data) >= 5:
                    ok = _grpc_serving(self.grpc_data[5:]) == 1
                self._result(_OK if ok else (_ACTIVE_FAIL if self.grpc_http == 200
                                             else _NETWORK_FAIL))
                return
        out = h.data_to_send()
        if out and self.conn is not None:
            self.conn.write(out)

    def on_conn_lost(self, conn) -> None:
        if conn is not self.conn:
            return
        self.conn = None
        self.h2 = None
        if self.in_check:
            p = self.http
            if self.cfg.kind == HTTP and p is not None and not p.done:
                try:
                    self.parser.feed_data(b"")  # (a close-delimited body ends here)
                except httptools.HttpParserError:
                    pass
                if p.done:
                    return
            self._result(_NETWORK_FAIL)

    def _on_timeout(self) -> None:
        self.timeout_timer = None
        if self.in_check:
            self._result(_TIMEOUT)

    # -- the result ----------------------------------------------------------------------------------
    def _result(self, r: int, degraded: bool = False) -> None:
        if not self.in_check or self.stopped:
            return
        self.in_check = False
        if self.timeout_timer is not None:
            self.timeout_timer.cancel()
            self.timeout_timer = None
        cfg = self.cfg
        if r != _OK or not cfg.reuse_connection or (
                cfg.kind == HTTP and self.http is not None and not self.http.keep_alive):
            self._close_conn()
        if r == _OK:
            healthy, pending = self._on_success(degraded)
        else:
            healthy, pending = self._on_failure(r)
        self.timer = self.loop.call_later(self._next(healthy, pending), self._on_interval)

    def _on_success(self, degraded: bool = False):
        h = self.host
        ck = self.checker
        changed = pending = False
        self.num_unhealthy = 0
        if h.has_flag(FAILED_ACTIVE_HC):
            self.num_healthy += 1
            if self.first_check or self.num_healthy >= self.cfg.healthy_threshold:
                h.clear_flag(ACTIVE_HC_TIMEOUT | FAILED_ACTIVE_HC)
                changed = True
                log.info("health check: %s of cluster %s is healthy", h.key, ck.cluster.name)
            else:
                pending = True
        if h.has_flag(PENDING_ACTIVE_HC):
            h.clear_flag(PENDING_ACTIVE_HC)
            changed = True
        if degraded != h.has_flag(DEGRADED_ACTIVE_HC):  # (x-envoy-degraded in the answer)
            if degraded:
                h.set_flag(DEGRADED_ACTIVE_HC)
            else:
                h.clear_flag(DEGRADED_ACTIVE_HC)
            changed = True
        ck.st["success"].value += 1
        first = self.first_check
        self.first_check = False
        ck.on_result(self, changed, first, passed=True)
        return True, pending

    def _on_failure(self, r: int):
        h = self.host
        ck = self.checker
        changed = pending = False
        self.num_healthy = 0
        network = r in (_NETWORK_FAIL, _TIMEOUT)
        if not h.has_flag(FAILED_ACTIVE_HC):
            self.num_unhealthy += 1
            if r == _ACTIVE_FAIL or self.num_unhealthy >= self.cfg.unhealthy_threshold:
                h.set_flag(FAILED_ACTIVE_HC)
                changed = True
                log.info("health check: %s of cluster %s is unhealthy", h.key, ck.cluster.name)
            else:
                pending = True
        if r == _TIMEOUT and not h.has_flag(ACTIVE_HC_TIMEOUT):
            h.set_flag(ACTIVE_HC_TIMEOUT)
        if h.has_flag(PENDING_ACTIVE_HC):
            h.clear_flag(PENDING_ACTIVE_HC)
            changed = True
        ck.st["failure"].value += 1
        if network:
            ck.st["network_failure"].value += 1
        first = self.first_check
        self.first_check = False
        ck.on_result(self, changed, first, passed=False)
        return not h.has_flag(FAILED_ACTIVE_HC), pending


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
            s = _Session(self, h)
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
