"""Access logger extensions: file, stdout and stderr (``envoy.extensions.access_loggers.*``)."""

from __future__ import annotations

from google.protobuf import json_format

from ..config.errors import ConfigError
from ..formatter import DEFAULT_FORMAT, compile_format, compile_json_format, \
    compile_substitution_format
from .file import get_file


class FileLogger:
    """Formats a line and hands it to a shared buffered file."""

    __slots__ = ("formatter", "file")

    def __init__(self, formatter, file):
        self.formatter = formatter
        self.file = file

    def log(self, si, rq=None, rs=None, rt=None) -> None:
        self.file.write(self.formatter.format(si, rq, rs, rt))


def file_access_log(cfg) -> FileLogger:
    """``envoy.extensions.access_loggers.file.v3.FileAccessLog``."""
    if not cfg.path:
        raise ConfigError("path is required", "path")
    which = cfg.WhichOneof("access_log_format")
    if which == "format":
        fmt = compile_format(cfg.format or DEFAULT_FORMAT)
    elif which == "json_format":
        fmt = compile_json_format(json_format.MessageToDict(cfg.json_format))
    elif which == "typed_json_format":
        fmt = compile_json_format(json_format.MessageToDict(cfg.typed_json_format))
    elif which == "log_format":
        try:
            fmt = compile_substitution_format(cfg.log_format)
        except ConfigError as e:
            raise e.within(field="log_format")
    else:
        fmt = compile_format(DEFAULT_FORMAT)
    return FileLogger(fmt, get_file(cfg.path))


def _stream_log(path):
    def factory(cfg) -> FileLogger:
        fmt = compile_substitution_format(cfg.log_format if cfg.HasField("log_format") else None)
        return FileLogger(fmt, get_file(path))
    return factory


stdout_access_log = _stream_log("/dev/stdout")
stderr_access_log = _stream_log("/dev/stderr")
