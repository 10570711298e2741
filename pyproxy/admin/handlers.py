"""The admin endpoints: Envoy's paths, methods, status codes, content types and bodies.

Each handler takes ``(admin, params)`` and returns a ``Response``. ``admin`` is the running
``AdminServer`` (for ``ctx`` and start time); ``params`` the decoded query (first value wins,
a flag without ``=`` maps to ``""``).
"""

from __future__ import annotations

import html
import ipaddress
import json
import os
import time
import urllib.parse

import pyproxy
from pyproxy import log as _log
from pyproxy.admin import config_dump as _cd
from pyproxy.admin import stats_render as _sr

TEXT = "text/plain; charset=UTF-8"
JSON = "application/json"
HTML = "text/html; charset=UTF-8"

VERSION = "%s/%s/Clean/RELEASE/OpenSSL" % ("0" * 40, pyproxy.__version__)


class Response:
    __slots__ = ("status", "content_type", "body", "after")

    def __init__(self, status: int, content_type: str, body, after=None):
        self.status = status
        self.content_type = content_type
        self.body = body.encode() if isinstance(body, str) else body
        self.after = after  # called once the response is written (quitquitquit)


def _text(body: str, status: int = 200) -> Response:
    return Response(status, TEXT, body)


def _json_pretty(obj) -> Response:
    return Response(200, JSON, json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


def parse_query(query: str) -> dict:
    """``a&b=1&filter=%5E(x)`` -> ``{"a": "", "b": "1", "filter": "^(x)"}`` (first wins)."""
    out: dict = {}
    if not query:
        return out
    for part in query.split("&"):
        if not part:
            continue
        k, _, v = part.partition("=")
        k = urllib.parse.unquote(k)
        if k not in out:
            out[k] = urllib.parse.unquote(v)
    return out


# ---------------------------------------------------------------------------------------------
# Endpoint table: path -> (help, mutating (POST required), params [(name, help)], handler name)

def _h_home(admin, p):
    rows = "".join(
        "<tr><td>%s<a href='%s'>%s</a></td><td>%s</td></tr>\n" % (
            "(POST) " if post else "", html.escape(path), html.escape(path), html.escape(hlp))
        for path, (hlp, post, _params, _fn) in ENDPOINTS.items() if path != "/")
    body = ("<!DOCTYPE html>\n<html lang='en'>\n<head>\n<title>pyproxy admin</title>\n</head>\n"
            "<body>\n<table class='home-table'>\n<thead><tr><th>Command</th><th>Description</th>"
            "</tr></thead>\n<tbody>\n%s</tbody>\n</table>\n</body>\n</html>\n" % rows)
    return Response(200, HTML, body)


def help_text() -> str:
    lines = ["admin commands are:"]
    for path, (hlp, post, params, _fn) in sorted(ENDPOINTS.items()):
        lines.append("  %s%s: %s" % (path, " (POST)" if post else "", hlp))
        for name, phelp in params:
            lines.append("      %s: %s" % (name, phelp))
    return "\n".join(lines) + "\n"


def _h_help(admin, p):
    return _text(help_text())


def not_found() -> Response:
    return _text("invalid path. " + help_text(), 404)


def _h_ready(admin, p):
    st = admin.ctx.state()
    return _text(st + "\n", 200 if st == "LIVE" else 503)


def _duration(seconds: float) -> str:
    return "%ds" % int(seconds)


def server_info(admin) -> dict:
    ctx = admin.ctx
    info = dict(ctx.server_info() or {})
    up = time.monotonic() - admin.started_monotonic
    out = {
        "version": info.pop("version", VERSION),
        "state": info.pop("state", ctx.state()),
        "uptime_current_epoch": info.pop("uptime_current_epoch", _duration(up)),
        "uptime_all_epochs": info.pop("uptime_all_epochs", _duration(up)),
        "hot_restart_version": info.pop("hot_restart_version", "disabled"),
        "command_line_options": info.pop("command_line_options", {}),
        "node": info.pop("node", {}),
    }
    out.update(info)
    out.setdefault("hot_restart_initializing", False)
    return out


def _h_server_info(admin, p):
    return _json_pretty(server_info(admin))


def _h_hot_restart_version(admin, p):
    return _text("disabled\n")


def _h_stats(admin, p):
    fmt = p.get("format", "text") or "text"
    if fmt not in ("text", "json", "prometheus", "html", "active-html"):
        return _text("usage: /stats?format=(html|active-html|json|prometheus|text)\n", 400)
    try:
        if fmt == "prometheus":
            return _text(_sr.render_prometheus(admin.ctx.stats, _sr.Query(p, prometheus=True)))
        q = _sr.Query(p)
        if fmt == "json":
            return Response(200, JSON, _sr.render_json(admin.ctx.stats, q))
        body = _sr.render_text(admin.ctx.stats, q)
    except _sr.StatsParamError as e:
        return _text(str(e), 400)
    if fmt in ("html", "active-html"):
        return Response(200, HTML, "<!DOCTYPE html>\n<html><body><pre>%s</pre></body></html>\n"
                        % html.escape(body))
    return _text(body)


def _h_prometheus(admin, p, accept: str = ""):
    try:
        q = _sr.Query(p, prometheus=True)
        if _sr.wants_openmetrics(accept):  # the scraper asked for OpenMetrics (prometheus_client's)
            return Response(200, _sr.OPENMETRICS_TYPE, _sr.render_openmetrics(admin.ctx.stats, q))
        return _text(_sr.render_prometheus(admin.ctx.stats, q))
    except _sr.StatsParamError as e:
        return _text(str(e), 400)


_EDS_RESOURCES = ("static_endpoint_configs", "dynamic_endpoint_configs")


def _h_config_dump(admin, p):
    resource = p.get("resource") or None
    include_eds = "include_eds" in p or resource in _EDS_RESOURCES
    dump = admin.ctx.config_dump(resource, include_eds)
    try:
        out = _cd.apply_query(dump, resource, p.get("mask") or None, p.get("name_regex") or None)
    except _cd.DumpError as e:
        return Response(e.status, "text/plain", e.message)
    return _json_pretty(out)


# -- /clusters --------------------------------------------------------------------------------

_HOST_STATS = ("cx_active", "cx_connect_fail", "cx_total", "rq_active", "rq_error",
               "rq_pending_active", "rq_success", "rq_timeout", "rq_total")
_HOST_GAUGES = ("cx_active", "rq_active", "rq_pending_active")
_CB_DEFAULT = {"max_connections": 1024, "max_pending_requests": 1024, "max_requests": 1024,
               "max_retries": 3}
_CB_KEYS = ("max_connections", "max_pending_requests", "max_requests", "max_retries")
_FLAG_TO_JSON = {
    "failed_active_hc": "failed_active_health_check",
    "failed_outlier_check": "failed_outlier_check",
    "degraded_active_hc": "failed_active_degraded_check",
    "pending_dynamic_removal": "pending_dynamic_removal",
    "pending_active_hc": "pending_active_hc",
    "excluded_via_immediate_hc_fail": "excluded_via_immediate_hc_fail",
    "active_hc_timeout": "active_hc_timeout",
}


def _bool(v) -> str:
    return "true" if v else "false"


def _host_key(h) -> str:
    port = h.get("port")
    if port is None:
        return str(h.get("address", ""))
    addr = str(h.get("address", ""))
    if ":" in addr and not addr.startswith("["):
        addr = "[%s]" % addr
    return "%s:%d" % (addr, port)


def _thresholds(c, prio):
    cb = (c.get("circuit_breakers") or {}).get(prio) or {}
    return {k: cb.get(k, _CB_DEFAULT[k]) for k in _CB_KEYS}


def _cluster_filter(p):
    f = p.get("filter")
    return _sr.compile_filter(f) if f else None


def _h_clusters(admin, p):
    try:
        rx = _cluster_filter(p)
    except _sr.StatsParamError:
        return _text("Invalid re2 regex", 400)  # Envoy's /clusters says no more
    clusters = [c for c in admin.ctx.clusters_status() if rx is None or rx.search(c.get("name", ""))]
    if p.get("format") == "json":
        return _json_pretty({"cluster_statuses": [_cluster_json(c) for c in clusters]})
    lines = []
    for c in clusters:
        n = c["name"]
        lines.append("%s::observability_name::%s" % (n, c.get("observability_name") or n))
        if c.get("outlier_detection"):
            od = c["outlier_detection"]
            for k in ("success_rate_average", "success_rate_ejection_threshold",
                      "local_origin_success_rate_average",
                      "local_origin_success_rate_ejection_threshold"):
                lines.append("%s::outlier::%s::%s" % (n, k, _sr.fmt_num(od.get(k, -1))))
        for prio in ("default", "high"):
            th = _thresholds(c, prio)
            for k in _CB_KEYS:
                lines.append("%s::%s_priority::%s::%s" % (n, prio, k, th[k]))
        lines.append("%s::added_via_api::%s" % (n, _bool(c.get("added_via_api"))))
        if c.get("eds_service_name"):
            lines.append("%s::eds_service_name::%s" % (n, c["eds_service_name"]))
        for h in c.get("hosts", ()):
            hk = "%s::%s" % (n, _host_key(h))
            st = h.get("stats") or {}
            for s in _HOST_STATS:
                lines.append("%s::%s::%d" % (hk, s, int(st.get(s, 0))))
            flags = h.get("health_flags") or ()
            lines.append("%s::hostname::%s" % (hk, h.get("hostname", "")))
            lines.append("%s::health_flags::%s" % (hk, "/" + "/".join(flags) if flags else "healthy"))
            lines.append("%s::weight::%d" % (hk, int(h.get("weight", 1))))
            lines.append("%s::region::%s" % (hk, h.get("region", "")))
            lines.append("%s::zone::%s" % (hk, h.get("zone", "")))
            lines.append("%s::sub_zone::%s" % (hk, h.get("sub_zone", "")))
            lines.append("%s::canary::%s" % (hk, _bool(h.get("canary"))))
            lines.append("%s::priority::%d" % (hk, int(h.get("priority", 0))))
            lines.append("%s::success_rate::%s" % (hk, _sr.fmt_num(h.get("success_rate", -1))))
            lines.append("%s::local_origin_success_rate::%s"
                         % (hk, _sr.fmt_num(h.get("local_origin_success_rate", -1))))
    return _text("".join(line + "\n" for line in lines))


def _address_json(h) -> dict:
    if h.get("port") is None:
        return {"pipe": {"path": str(h.get("address", ""))}}
    return {"socket_address": {"address": str(h.get("address", "")), "port_value": int(h["port"])}}


def _cluster_json(c) -> dict:
    out: dict = {"name": c["name"]}
    if c.get("added_via_api"):
        out["added_via_api"] = True
    hosts = []
    for h in c.get("hosts", ()):
        st = h.get("stats") or {}
        stats = []
        for s in _HOST_STATS:
            if s in _HOST_GAUGES:
                continue
            e = {"name": s}
            if st.get(s):
                e["value"] = str(int(st[s]))
            stats.append(e)
        for s in _HOST_GAUGES:
            e = {"type": "GAUGE", "name": s}
            if st.get(s):
                e["value"] = str(int(st[s]))
            stats.append(e)
        flags = set(h.get("health_flags") or ())
        eds = h.get("eds_health_status")
        if eds is None:
            eds = ("UNHEALTHY" if "failed_eds_health" in flags else
                   "DEGRADED" if "degraded_eds_health" in flags else
                   "DRAINING" if "eds_status_draining" in flags else "HEALTHY")
        health: dict = {}
        for f in h.get("health_flags") or ():
            if f in _FLAG_TO_JSON:
                health[_FLAG_TO_JSON[f]] = True
        health["eds_health_status"] = eds
        hs: dict = {"address": _address_json(h), "stats": stats, "health_status": health,
                    "weight": int(h.get("weight", 1))}
        if h.get("hostname"):
            hs["hostname"] = h["hostname"]
        loc = {k: h[k] for k in ("region", "zone", "sub_zone") if h.get(k)}
        hs["locality"] = loc
        if h.get("priority"):
            hs["priority"] = int(h["priority"])
        sr = h.get("success_rate", -1)
        if sr is not None and sr >= 0:
            hs["success_rate"] = {"value": sr}
        lsr = h.get("local_origin_success_rate", -1)
        if lsr is not None and lsr >= 0:
            hs["local_origin_success_rate"] = {"value": lsr}
        hosts.append(hs)
    if hosts:
        out["host_statuses"] = hosts
    d, hi = _thresholds(c, "default"), _thresholds(c, "high")
    out["circuit_breakers"] = {"thresholds": [dict(d), {"priority": "HIGH", **hi}]}
    out["observability_name"] = c.get("observability_name") or c["name"]
    if c.get("eds_service_name"):
        out["eds_service_name"] = c["eds_service_name"]
    return out


# -- /listeners -------------------------------------------------------------------------------

def _split_hostport(a: str) -> dict:
    if not a:
        return {}
    if a.startswith("/") or a.startswith("@"):
        return {"pipe": {"path": a}}
    host, _, port = a.rpartition(":")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
        return {"socket_address": {"address": host, "port_value": int(port)}}
    except ValueError:
        return {"socket_address": {"address": host, "port_value": int(port) if port.isdigit() else 0}}


def _h_listeners(admin, p):
    ls = admin.ctx.listeners_status()
    if p.get("format") == "json":
        out = []
        for l in ls:
            e = {"name": l["name"], "local_address": _split_hostport(l.get("local_address", ""))}
            extra = l.get("additional_local_addresses")
            if extra:
                e["additional_local_addresses"] = [_split_hostport(a) for a in extra]
            out.append(e)
        return _json_pretty({"listener_statuses": out})
    lines = []
    for l in ls:
        addrs = [l.get("local_address", "")] + list(l.get("additional_local_addresses") or ())
        lines.append("%s::%s" % (l["name"], ",".join(addrs)))
    return _text("".join(line + "\n" for line in lines))


# -- /logging ---------------------------------------------------------------------------------

_LOGGING_USAGE = ("\nusage: /logging?<name>=<level> (change single level)\n"
                  "usage: /logging?paths=name1:level1,name2:level2,... (change multiple levels)\n"
                  "usage: /logging?level=<level> (change all levels)\n"
                  "levels: trace debug info warning error critical off\n")


def _levels_text() -> str:
    return "active loggers:\n" + "".join("  %s: %s\n" % kv for kv in _log.get_levels().items())


def _h_logging(admin, p):
    def bad(msg):
        return _text("error: %s\n%s" % (msg, _LOGGING_USAGE), 400)

    if not p:
        return _text(_levels_text())
    if len(p) != 1:
        return bad("invalid number of parameters")
    (key, value), = p.items()
    changes: list = []
    if key == "level":
        if value.lower() not in _log.LEVELS:
            return bad("unknown logger level")
        changes.append((None, value))
    elif key == "paths":
        for part in value.split(","):
            name, sep, lvl = part.strip().partition(":")
            if not sep:
                return bad("invalid paths")
            if name not in _log.COMPONENTS:
                return bad("unknown logger name")
            if lvl.lower() not in _log.LEVELS:
                return bad("unknown logger level")
            changes.append((name, lvl))
    else:
        if key not in _log.COMPONENTS:
            return bad("unknown logger name")
        if value.lower() not in _log.LEVELS:
            return bad("unknown logger level")
        changes.append((key, value))
    for name, lvl in changes:
        _log.set_level(name, lvl)
    return _text(_levels_text())


# -- lifecycle --------------------------------------------------------------------------------

def _h_quit(admin, p):
    return Response(200, TEXT, "OK\n", after=admin.ctx.quit)


def _h_drain(admin, p):
    admin.ctx.drain_listeners("inboundonly" in p, "graceful" in p, "skip_exit" in p)
    return _text("OK\n")


def _h_hc_fail(admin, p):
    admin.ctx.set_healthcheck_failed(True)
    return _text("OK\n")


def _h_hc_ok(admin, p):
    admin.ctx.set_healthcheck_failed(False)
    return _text("OK\n")


def _h_reset_counters(admin, p):
    admin.ctx.reset_counters()
    return _text("OK\n")


def _h_reopen_logs(admin, p):
    _log.reopen()
    fn = getattr(admin.ctx, "reopen_logs", None)
    if fn is not None:
        fn()
    return _text("OK\n")


# -- process info -----------------------------------------------------------------------------

def _rss_bytes() -> tuple[int, int]:
    """(resident, virtual) bytes from /proc/self/statm; zeros where it is unavailable."""
    try:
        with open("/proc/self/statm") as f:
            parts = f.read().split()
        page = os.sysconf("SC_PAGE_SIZE")
        return int(parts[1]) * page, int(parts[0]) * page
    except (OSError, ValueError, IndexError):
        return 0, 0


def _h_memory(admin, p):
    rss, _vsz = _rss_bytes()
    return _json_pretty({
        "allocated": str(rss), "heap_size": str(rss), "pageheap_unmapped": "0",
        "pageheap_free": "0", "total_thread_cache": "0", "total_physical_bytes": str(rss)})


def _h_runtime(admin, p):
    fn = getattr(admin.ctx, "runtime", None)
    return _json_pretty(fn() if fn is not None else {"layers": [], "entries": {}})


def _h_certs(admin, p):
    fn = getattr(admin.ctx, "certs", None)
    return _json_pretty(fn() if fn is not None else {"certificates": []})


def _h_contention(admin, p):
    return _text("Mutex contention tracing is not enabled. To enable, run Envoy with flag "
                 "--enable-mutex-tracing.")


ENDPOINTS: dict = {
    "/": ("Admin home page", False, [], _h_home),
    "/certs": ("print certs on machine", False, [], _h_certs),
    "/clusters": ("upstream cluster status", False, [
        ("filter", "Regular expression (Google re2) for filtering clusters by name"),
        ("format", "Format to use; One of (text, json)")], _h_clusters),
    "/config_dump": ("dump current Envoy configs", False, [
        ("resource", "The resource to dump"),
        ("mask", "The mask to apply. When both resource and mask are specified, the mask is applied "
                 "to every element in the desired repeated field so that only a subset of fields "
                 "are returned. The mask is parsed as a Protobuf::FieldMask"),
        ("name_regex", "Dump only the currently loaded configurations whose names match the "
                       "specified regex. Can be used with both resource and mask query parameters."),
        ("include_eds", "Dump currently loaded configuration including EDS. See the response "
                        "definition for more information")], _h_config_dump),
    "/contention": ("dump current Envoy mutex contention stats (if enabled)", False, [],
                    _h_contention),
    "/drain_listeners": ("drain listeners", True, [
        ("graceful", "When draining listeners, enter a graceful drain period prior to closing "
                     "listeners. This behaviour and duration is configurable via server options "
                     "or CLI"),
        ("skip_exit", "When draining listeners, drain the connections but never stop the "
                      "listeners. The graceful parameter has no effect when this is set, since the "
                      "drain period only delays stopping the listeners"),
        ("inboundonly", "Drains all inbound listeners. traffic_direction field in "
                        "envoy_v3_api_msg_config.listener.v3.Listener is used to determine whether "
                        "a listener is inbound or outbound.")], _h_drain),
    "/healthcheck/fail": ("cause the server to fail health checks", True, [], _h_hc_fail),
    "/healthcheck/ok": ("cause the server to pass health checks", True, [], _h_hc_ok),
    "/help": ("print out list of admin commands", False, [], _h_help),
    "/hot_restart_version": ("print the hot restart compatibility version", False, [],
                             _h_hot_restart_version),
    "/listeners": ("print listener info", False, [
        ("format", "File format to use; One of (text, json)")], _h_listeners),
    "/logging": ("query/change logging levels", True, [
        ("paths", "Change multiple logging levels by setting to "
                  "<logger_name1>:<desired_level1>,<logger_name2>:<desired_level2>."),
        ("level", "desired logging level, this will change all loggers's level; One of (, trace, "
                  "debug, info, warning, error, critical, off)")], _h_logging),
    "/memory": ("print current allocation/heap usage", False, [], _h_memory),
    "/quitquitquit": ("exit the server", True, [], _h_quit),
    "/ready": ("print server state, return 200 if LIVE, otherwise return 503", False, [], _h_ready),
    "/reopen_logs": ("reopen access logs", True, [], _h_reopen_logs),
    "/reset_counters": ("reset all counters to zero", True, [], _h_reset_counters),
    "/runtime": ("print runtime values", False, [], _h_runtime),
    "/server_info": ("print server version/status information", False, [], _h_server_info),
    "/stats": ("print server stats", False, [
        ("usedonly", "Only include stats that have been written by system since restart"),
        ("filter", "Regular expression (Google re2) for filtering stats"),
        ("invert_filter", "Invert the filter regex"),
        ("format", "Format to use; One of (html, active-html, text, json)"),
        ("type", "Stat types to include.; One of (All, Counters, Histograms, Gauges, TextReadouts)"),
        ("histogram_buckets", "Histogram bucket display mode; One of (cumulative, disjoint, "
                              "summary)")], _h_stats),
    "/stats/prometheus": ("print server stats in prometheus format", False, [
        ("usedonly", "Only include stats that have been written by system since restart"),
        ("text_readouts", "Render text_readouts as new gaugues with value 0 (increases Prometheus "
                          "data size)"),
        ("filter", "Regular expression (Google re2) for filtering stats"),
        ("invert_filter", "Invert the filter regex"),
        ("histogram_buckets", "Histogram bucket display mode; One of (cumulative, summary)")],
        _h_prometheus),
}


def dispatch(admin, method: str, path: str, query: str, accept: str = "") -> Response:
    """Route one request. Mutating endpoints need POST (405 otherwise, as Envoy answers).
    ``accept``: the request's Accept header (content negotiation on /stats/prometheus)."""
    ep = ENDPOINTS.get(path)
    if ep is None:
        return not_found()
    _hlp, post, _params, fn = ep
    if post and method != "POST":
        return _text("Method %s not allowed, POST required." % method, 405)
    if fn is _h_prometheus:
        return fn(admin, parse_query(query), accept)
    return fn(admin, parse_query(query))
