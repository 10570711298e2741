"""Helpers for tests that compare access-log lines (pyproxy and Envoy side by side): a file access
logger for an HCM, and bounded waits for the lines to be flushed."""

from __future__ import annotations

import os
import shutil
import tempfile
import time

try:
    from proxy_util import Envoy, HttpBackend, Pyproxy, with_fresh_ports
except ImportError:  # imported as tests.<module>
    from tests.proxy_util import Envoy, HttpBackend, Pyproxy, with_fresh_ports

FILE_ACCESS_LOG_TYPE = "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog"
FLUSH_FAST = ["--file-flush-interval-msec", "100"]  # (proxy arguments: lines reach the file within 0.1 s)


def file_access_log(path, fmt: str) -> list:
    """An HCM ``access_log`` list: one file logger writing ``fmt`` (a text format) to ``path``."""
    return [{"name": "envoy.access_loggers.file", "typed_config": {
        "@type": FILE_ACCESS_LOG_TYPE, "path": str(path),
        "log_format": {"text_format_source": {"inline_string": fmt}}}}]


def hcm_config(bs: dict, listener: int = 0) -> dict:
    """The HTTP connection manager config of a bootstrap's listener (its first filter)."""
    return bs["static_resources"]["listeners"][listener]["filter_chains"][0]["filters"][0]["typed_config"]


def log_lines(path, n: int, timeout: float = 3.0) -> list:
    """The file's lines once it has at least ``n`` (or what it has after ``timeout`` seconds)."""
    end = time.monotonic() + timeout
    while True:
        with open(path) as f:
            lines = f.read().splitlines()
        if len(lines) >= n or time.monotonic() >= end:
            return lines
        time.sleep(0.05)


def last_log_line(path, prefix: str, timeout: float = 3.0, skip: int = 0):
    """The last line starting with ``prefix + " "`` (the first ``skip`` lines passed over), once one
    is there; None after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with open(path) as f:
            hit = [l for l in f.read().splitlines()[skip:] if l.startswith(prefix + " ")]
        if hit:
            return hit[-1]
        time.sleep(0.05)
    return None


def logged_each(make_bootstrap, send, n: int, handler=None) -> dict:
    """Pyproxy and Envoy in turn, each with a fresh backend (``HttpBackend(handler)``) and the
    bootstrap ``make_bootstrap(backend port, log path)`` (on fresh ports, log lines flushed every
    0.1 s): ``send(proxy port)``, then the access log's lines once there are ``n`` (bounded).
    Returns {"pyproxy": lines, "envoy": lines}."""
    tmp = tempfile.mkdtemp(prefix="px-log-")
    out = {}
    try:
        for name, cls in (("pyproxy", Pyproxy), ("envoy", Envoy)):
            log = os.path.join(tmp, name + ".log")
            open(log, "w").close()
            with HttpBackend(handler) as be:
                with cls(with_fresh_ports(make_bootstrap(be.port, log)), extra_args=FLUSH_FAST) as p:
                    send(p.port)
                    out[name] = log_lines(log, n)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
