"""Access logs: ``config.accesslog.v3.AccessLog`` lists compiled into loggers.

    loggers = build_access_logs(hcm.access_log)        # ConfigError on bad/unsupported config
    for lg in loggers: lg.log(stream_info, req_headers, resp_headers, resp_trailers)

Importing this package registers the file / stdout / stderr access loggers in ``REGISTRY``.
Lines are buffered and written by a background thread (see ``file.py``): call
``set_flush_interval(seconds)`` from ``--file-flush-interval-msec`` and ``flush_all()`` at shutdown.
"""

from __future__ import annotations

from ..config.errors import ConfigError
from ..config.registry import REGISTRY
from .file import dropped_lines, flush_all, reopen_all, set_flush_interval  # noqa: F401
from .filters import compile_filter

__all__ = ["AccessLogger", "build_access_logs", "flush_all", "reopen_all", "set_flush_interval",
           "dropped_lines"]

REGISTRY.register("access_logger", "envoy.extensions.access_loggers.file.v3.FileAccessLog",
                  "pyproxy.access_log.loggers:file_access_log",
                  names=("envoy.access_loggers.file", "envoy.file_access_log"))
REGISTRY.register("access_logger", "envoy.extensions.access_loggers.stream.v3.StdoutAccessLog",
                  "pyproxy.access_log.loggers:stdout_access_log",
                  names=("envoy.access_loggers.stdout",))
REGISTRY.register("access_logger", "envoy.extensions.access_loggers.stream.v3.StderrAccessLog",
                  "pyproxy.access_log.loggers:stderr_access_log",
                  names=("envoy.access_loggers.stderr",))


class AccessLogger:
    """One configured access log: an optional filter and a sink (``log(si, rq, rs, rt)``)."""

    __slots__ = ("name", "filter", "sink")

    def __init__(self, name, flt, sink):
        self.name = name
        self.filter = flt
        self.sink = sink

    def log(self, stream_info, req_headers=None, resp_headers=None, resp_trailers=None) -> None:
        f = self.filter
        if f is not None and not f(stream_info, req_headers, resp_headers, resp_trailers):
            return
        self.sink.log(stream_info, req_headers, resp_headers, resp_trailers)

    def __repr__(self):
        return "AccessLogger(%r)" % self.name


def build_access_logs(access_log_protos) -> list:
    """``AccessLog`` protos → ``AccessLogger`` list (unsupported types/filters → ConfigError)."""
    out = []
    for i, al in enumerate(access_log_protos):
        field = "access_log[%d]" % i
        try:
            tc = al.typed_config if al.HasField("typed_config") else None
            factory, msg = REGISTRY.resolve("access_logger", al.name, tc, what="access logger")
            if factory is None:
                continue
            if msg is None:
                cls_name = REGISTRY.type_for_name("access_logger", al.name)
                from ..config.registry import message_class
                msg = message_class(cls_name)()
            sink = factory(msg)
            flt = compile_filter(al.filter, "filter") if al.HasField("filter") else None
        except ConfigError as e:
            raise e.within(field=field)
        out.append(AccessLogger(al.name, flt, sink))
    return out
