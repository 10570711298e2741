"""Envoy-style logging on top of the standard ``logging`` module.

One logger per Envoy component, named ``pyproxy.<component>`` (``pyproxy.upstream``,
``pyproxy.connection``...), each with its own level, all writing through one handler whose
formatter understands the spdlog pattern flags Envoy's ``--log-format`` uses. A module may also
log through ``logging.getLogger("pyproxy.<component>.<module>")`` (it follows the component's
level) or any other ``pyproxy.*`` name (it follows ``-l``); ``%n`` prints the component.

Levels are Envoy's: ``trace < debug < info < warning < error < critical < off``. Every component
logger carries an explicit level, so ``logger.isEnabledFor(DEBUG)`` is one cached lookup and a
disabled ``log.debug(...)`` costs almost nothing::

    from pyproxy.log import get_logger
    log = get_logger("upstream")
    if log.isEnabledFor(logging.DEBUG):
        log.debug("adding host %s", host)

``setup_logging(...)`` is called once by the CLI; ``get_levels()`` / ``set_level()`` back the
admin ``/logging`` endpoint.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
import time

TRACE = 5
OFF = logging.CRITICAL + 10
logging.addLevelName(TRACE, "TRACE")

# Envoy's level names -> logging levels. "warn" is accepted on input; output says "warning".
LEVELS: dict[str, int] = {
    "trace": TRACE,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
    "off": OFF,
}
_LEVEL_NAMES: dict[int, str] = {
    TRACE: "trace", logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warning",
    logging.ERROR: "error", logging.CRITICAL: "critical", OFF: "off",
}
_SHORT = {"trace": "T", "debug": "D", "info": "I", "warning": "W", "error": "E", "critical": "C",
          "off": "O"}

# Envoy 1.40's logger ids, in the order its /logging endpoint lists them.
COMPONENTS: tuple[str, ...] = (
    "a2a", "admin", "ai_protocol_manager", "alternate_protocols_cache", "aws", "assert",
    "backtrace", "basic_auth", "cache_filter", "client", "config", "connection", "conn_handler",
    "compression", "credential_injector", "decompression", "dns", "dubbo", "envoy_bug",
    "ext_authz", "ext_proc", "rocketmq", "file", "filter", "forward_proxy", "geolocation", "grpc",
    "happy_eyeballs", "hc", "health_checker", "http", "http2", "hystrix", "init", "io", "jwt",
    "json_rpc", "kafka", "key_value_store", "lua", "local_rate_limit", "main", "matcher", "mcp",
    "misc", "mongo", "multi_connection", "notification", "oauth2", "quic", "quic_stream", "pool",
    "rate_limit_quota", "rbac", "rds", "redis", "router", "runtime", "stats", "secret", "sse",
    "tap", "testing", "thrift", "tracing", "upstream", "udp", "wasm", "websocket", "golang",
    "stats_sinks", "dynamic_modules", "ip_tagging",
)
_COMPONENT_SET = frozenset(COMPONENTS)

ROOT_NAME = "pyproxy"
DEFAULT_FORMAT = "[%Y-%m-%d %T.%e][%t][%l][%n] [%g:%#] %v"
DEFAULT_LEVEL = "info"

_root = logging.getLogger(ROOT_NAME)
_lock = threading.Lock()
_handler: logging.Handler | None = None
_PKG_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def parse_level(level: str) -> int:
    """Envoy level name -> logging level; ``ValueError`` with Envoy's wording when unknown."""
    try:
        return LEVELS[level.strip().lower()]
    except (KeyError, AttributeError):
        raise ValueError("error: unknown logger level '%s'" % (level,)) from None


def level_name(levelno: int) -> str:
    """logging level -> Envoy name (``warning``, ``info``...)."""
    name = _LEVEL_NAMES.get(levelno)
    if name is not None:
        return name
    for lv in sorted(_LEVEL_NAMES):  # a level between two names takes the next one up
        if levelno <= lv:
            return _LEVEL_NAMES[lv]
    return "off"


def get_logger(component: str) -> logging.Logger:
    """The logger of an Envoy component (``upstream``, ``http``...). Unknown names are an error."""
    if component not in _COMPONENT_SET:
        raise ValueError("unknown logger name '%s'" % component)
    return logging.getLogger(ROOT_NAME + "." + component)


def _init_levels(levelno: int) -> None:
    # The root "pyproxy" logger carries the base level too, so module loggers outside the
    # component set ("pyproxy.xds_client.ads") follow -l; "pyproxy.<component>.<x>" loggers
    # follow their component. Levels only filter at the originating logger, so the root's
    # level never hides what a component lets through.
    _root.setLevel(levelno)
    for c in COMPONENTS:
        logging.getLogger(ROOT_NAME + "." + c).setLevel(levelno)


_init_levels(logging.INFO)


def parse_component_levels(spec: str) -> list[tuple[str, int]]:
    """``"upstream:debug,connection:trace"`` -> ``[("upstream", 10), ("connection", 5)]``."""
    out = []
    if not spec:
        return out
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, lvl = part.partition(":")
        if not sep or not name or not lvl:
            raise ValueError("error: component log level not correctly specified '%s'" % part)
        if name not in _COMPONENT_SET:
            raise ValueError("error: invalid component specified '%s'" % name)
        out.append((name, parse_level(lvl)))
    return out


def setup_logging(level: str = DEFAULT_LEVEL, component_levels: str = "",
                  log_format: str | None = None, log_path: str | None = None,
                  stream=None) -> logging.Handler:
    """Configure every component logger as Envoy's ``-l``, ``--component-log-level``,
    ``--log-format`` and ``--log-path`` do. Raises ``ValueError`` (one clear line) on bad input,
    before changing anything."""
    global _handler
    base = parse_level(level)
    overrides = parse_component_levels(component_levels or "")
    formatter = EnvoyFormatter(log_format or DEFAULT_FORMAT)
    if log_path:
        try:
            handler: logging.Handler = logging.FileHandler(log_path, mode="a", encoding="utf-8")
        except OSError as e:
            raise ValueError("error: cannot open log path '%s': %s" % (log_path, e.strerror)) from None
    else:
        handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(formatter)
    with _lock:
        if _handler is not None:
            _root.removeHandler(_handler)
            try:
                _handler.close()
            except Exception:
                pass
        _handler = handler
        _root.addHandler(handler)
        _root.propagate = False
        _init_levels(base)
        for name, lv in overrides:
            logging.getLogger(ROOT_NAME + "." + name).setLevel(lv)
    return handler


def get_levels() -> dict[str, str]:
    """Every component's level by Envoy name, in Envoy's order (for ``/logging``)."""
    return {c: level_name(logging.getLogger(ROOT_NAME + "." + c).level) for c in COMPONENTS}


def set_level(component: str | None, level: str) -> None:
    """Set one component's level, or every component's when ``component`` is None."""
    lv = parse_level(level)
    if component is None:
        with _lock:
            _init_levels(lv)
        return
    get_logger(component).setLevel(lv)


def reopen() -> None:
    """Reopen the log file (``/reopen_logs``)."""
    h = _handler
    if isinstance(h, logging.FileHandler):
        with _lock:
            h.acquire()
            try:
                if h.stream is not None:
                    h.stream.close()
                h.stream = h._open()
            finally:
                h.release()


# ---------------------------------------------------------------------------------------------
# spdlog pattern formatter

_TOKEN = re.compile(r"%(?:([-=]?)(\d+)(!?))?(.)", re.S)
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_DAYS_FULL = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_MONTHS_FULL = ("January", "February", "March", "April", "May", "June", "July", "August",
                "September", "October", "November", "December")


def _component(record) -> str:
    n = record.name
    if n.startswith(ROOT_NAME + "."):
        return n[len(ROOT_NAME) + 1:].split(".", 1)[0]
    return n


def _source_path(record) -> str:
    p = record.pathname or ""
    return p[len(_PKG_PARENT):] if p.startswith(_PKG_PARENT) else p


def _tz(tm) -> str:
    off = tm.tm_gmtoff or 0
    sign = "+" if off >= 0 else "-"
    off = abs(off)
    return "%s%02d:%02d" % (sign, off // 3600, (off % 3600) // 60)


def _json_escape(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)[1:-1]


def _h12(tm) -> int:
    return tm.tm_hour % 12 or 12


# Each flag renders from (record, time struct, message). The message is computed once per record.
_FLAGS = {
    "v": lambda r, t, m: m,
    "+": lambda r, t, m: m,          # Envoy: message without its extracted tags
    "*": lambda r, t, m: "",         # Envoy: extracted tags (none here)
    "_": lambda r, t, m: m.replace("\n", "\\n"),
    "j": lambda r, t, m: _json_escape(m),
    "t": lambda r, t, m: str(threading.get_native_id()),
    "P": lambda r, t, m: str(r.process or os.getpid()),
    "n": lambda r, t, m: _component(r),
    "l": lambda r, t, m: level_name(r.levelno),
    "L": lambda r, t, m: _SHORT[level_name(r.levelno)],
    "Y": lambda r, t, m: "%04d" % t.tm_year,
    "C": lambda r, t, m: "%02d" % (t.tm_year % 100),
    "m": lambda r, t, m: "%02d" % t.tm_mon,
    "d": lambda r, t, m: "%02d" % t.tm_mday,
    "H": lambda r, t, m: "%02d" % t.tm_hour,
    "I": lambda r, t, m: "%02d" % _h12(t),
    "M": lambda r, t, m: "%02d" % t.tm_min,
    "S": lambda r, t, m: "%02d" % t.tm_sec,
    "T": lambda r, t, m: "%02d:%02d:%02d" % (t.tm_hour, t.tm_min, t.tm_sec),
    "X": lambda r, t, m: "%02d:%02d:%02d" % (t.tm_hour, t.tm_min, t.tm_sec),
    "R": lambda r, t, m: "%02d:%02d" % (t.tm_hour, t.tm_min),
    "D": lambda r, t, m: "%02d/%02d/%02d" % (t.tm_mon, t.tm_mday, t.tm_year % 100),
    "x": lambda r, t, m: "%02d/%02d/%02d" % (t.tm_mon, t.tm_mday, t.tm_year % 100),
    "e": lambda r, t, m: "%03d" % int(r.msecs),
    "f": lambda r, t, m: "%06d" % int((r.created % 1) * 1_000_000),
    "F": lambda r, t, m: "%09d" % int((r.created % 1) * 1_000_000_000),
    "E": lambda r, t, m: str(int(r.created)),
    "p": lambda r, t, m: "AM" if t.tm_hour < 12 else "PM",
    "r": lambda r, t, m: "%02d:%02d:%02d %s" % (_h12(t), t.tm_min, t.tm_sec,
                                                 "AM" if t.tm_hour < 12 else "PM"),
    "a": lambda r, t, m: _DAYS[t.tm_wday],
    "A": lambda r, t, m: _DAYS_FULL[t.tm_wday],
    "b": lambda r, t, m: _MONTHS[t.tm_mon - 1],
    "h": lambda r, t, m: _MONTHS[t.tm_mon - 1],
    "B": lambda r, t, m: _MONTHS_FULL[t.tm_mon - 1],
    "c": lambda r, t, m: "%s %s %2d %02d:%02d:%02d %04d" % (
        _DAYS[t.tm_wday], _MONTHS[t.tm_mon - 1], t.tm_mday, t.tm_hour, t.tm_min, t.tm_sec, t.tm_year),
    "z": lambda r, t, m: _tz(t),
    "g": lambda r, t, m: _source_path(r),
    "s": lambda r, t, m: os.path.basename(r.pathname or ""),
    "#": lambda r, t, m: str(r.lineno),
    "!": lambda r, t, m: r.funcName or "",
    "@": lambda r, t, m: "%s:%d" % (os.path.basename(r.pathname or ""), r.lineno),
    "%": lambda r, t, m: "%",
    "^": lambda r, t, m: "",          # colour range start/end: no colours
    "$": lambda r, t, m: "",
}


def _padded(fn, align: str, width: int, truncate: bool):
    def render(r, t, m):
        s = fn(r, t, m)
        if len(s) >= width:
            return s[:width] if truncate else s
        if align == "-":
            return s.ljust(width)
        if align == "=":
            return s.center(width)
        return s.rjust(width)
    return render


class EnvoyFormatter(logging.Formatter):
    """A ``logging.Formatter`` for spdlog patterns (``%Y-%m-%d %T.%e``, ``%l``, ``%n``, ``%v``...).

    The pattern is compiled once into literal strings and flag renderers; unknown flags are
    kept literally (``%Q`` prints ``%Q``). Exceptions attached to a record follow the message on
    new lines, as Python's formatter does."""

    def __init__(self, pattern: str = DEFAULT_FORMAT):
        super().__init__()
        self.pattern = pattern
        self._parts: list = []
        pos = 0
        lit = []
        for m in _TOKEN.finditer(pattern):
            lit.append(pattern[pos:m.start()])
            pos = m.end()
            align, width, trunc, flag = m.groups()
            fn = _FLAGS.get(flag)
            if fn is None:
                lit.append(m.group(0))
                continue
            if "".join(lit):
                self._parts.append("".join(lit))
            lit = []
            if width:
                fn = _padded(fn, align, int(width), bool(trunc))
            self._parts.append(fn)
        lit.append(pattern[pos:])
        if "".join(lit):
            self._parts.append("".join(lit))

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            msg = msg + "\n" + record.exc_text
        if record.stack_info:
            msg = msg + "\n" + self.formatStack(record.stack_info)
        t = time.localtime(record.created)
        return "".join(p if p.__class__ is str else p(record, t, msg) for p in self._parts)
