"""Envoy-style logging: levels, component levels, spdlog formats, log file."""

from __future__ import annotations

import io
import logging
import os
import tempfile
import threading
import time

import pytest

from pyproxy import log as plog


@pytest.fixture(autouse=True)
def restore_levels():
    saved = plog.get_levels()
    try:
        yield
    finally:
        for k, v in saved.items():
            plog.set_level(k, v)


def _record(level=logging.INFO, msg="hello %s", args=("world",), name="pyproxy.upstream",
            created=None, lineno=42, path=None):
    r = logging.LogRecord(name, level, path or os.path.join(os.path.dirname(plog.__file__), "cluster",
                                                            "manager.py"),
                          lineno, msg, args, None, func="add_host")
    if created is not None:
        r.created = created
        r.msecs = int((created - int(created)) * 1000)
    return r


# 2024-03-05 07:08:09.123456 local time
def _ts():
    return time.mktime((2024, 3, 5, 7, 8, 9, 0, 0, -1)) + 0.123456


def test_envoy_default_format():
    f = plog.EnvoyFormatter(plog.DEFAULT_FORMAT)
    out = f.format(_record(created=_ts()))
    tid = threading.get_native_id()
    assert out == "[2024-03-05 07:08:09.123][%d][info][upstream] [pyproxy/cluster/manager.py:42] hello world" % tid


def test_istio_bootstrap_format():
    fmt = "%Y-%m-%dT%T.%fZ\t%l\tenvoy %n %g:%#\t%v\tthread=%t"
    out = plog.EnvoyFormatter(fmt).format(_record(level=logging.WARNING, created=_ts()))
    assert out == ("2024-03-05T07:08:09.123456Z\twarning\tenvoy upstream pyproxy/cluster/manager.py:42"
                   "\thello world\tthread=%d" % threading.get_native_id())


def test_more_flags_and_unknown_flags():
    rec = _record(level=plog.TRACE, msg='a "q"\nb\\', args=(), created=_ts())
    f = plog.EnvoyFormatter("%L|%l|%s|%@|%!|%j|%_|%Q|%%|%e|%F|%D|%H:%M:%S|%^x%$|%P|%+|%*|%b %a")
    parts = f.format(rec).split("|")
    assert parts[0:5] == ["T", "trace", "manager.py", "manager.py:42", "add_host"]
    assert parts[5] == 'a \\"q\\"\\nb\\\\'          # %j: JSON-escaped
    assert parts[6] == 'a "q"\\nb\\'                  # %_: newlines escaped
    assert parts[7] == "%Q"                           # unknown flag kept literally
    assert parts[8] == "%"
    assert parts[9] == "123" and parts[10].startswith("123456")
    assert parts[11] == "03/05/24" and parts[12] == "07:08:09"
    assert parts[13] == "x" and parts[14] == str(os.getpid())
    assert parts[15] == 'a "q"\nb\\' and parts[16] == ""
    assert parts[17] == "Mar Tue"


def test_padding():
    f = plog.EnvoyFormatter("[%-8l][%8n][%=9l][%3!l]")
    assert f.format(_record(level=logging.ERROR)) == "[error   ][upstream][  error  ][err]"


def test_levels_and_names():
    assert plog.parse_level("warn") == plog.parse_level("warning") == logging.WARNING
    assert plog.parse_level("TRACE") == plog.TRACE < logging.DEBUG
    assert plog.parse_level("off") > logging.CRITICAL
    with pytest.raises(ValueError, match="unknown logger level"):
        plog.parse_level("verbose")
    assert [plog.level_name(plog.parse_level(n)) for n in
            ("trace", "debug", "info", "warn", "error", "critical", "off")] == [
        "trace", "debug", "info", "warning", "error", "critical", "off"]


def test_setup_component_levels_and_output():
    buf = io.StringIO()
    plog.setup_logging("info", "upstream:debug,connection:trace", "[%l][%n] %v", None, stream=buf)
    levels = plog.get_levels()
    assert levels["upstream"] == "debug" and levels["connection"] == "trace"
    assert levels["http"] == "info" and list(levels)[:3] == ["a2a", "admin", "ai_protocol_manager"]
    up = plog.get_logger("upstream")
    http = plog.get_logger("http")
    assert up.isEnabledFor(logging.DEBUG) and not up.isEnabledFor(plog.TRACE)
    assert plog.get_logger("connection").isEnabledFor(plog.TRACE)
    assert not http.isEnabledFor(logging.DEBUG)
    up.debug("host %s added", "10.0.0.1:80")
    http.debug("hidden")
    http.info("shown")
    plog.get_logger("connection").log(plog.TRACE, "bytes")
    assert buf.getvalue() == "[debug][upstream] host 10.0.0.1:80 added\n[info][http] shown\n" \
                             "[trace][connection] bytes\n"
    # set_level for one component, and for all
    plog.set_level("http", "debug")
    assert plog.get_levels()["http"] == "debug"
    plog.set_level(None, "error")
    assert set(plog.get_levels().values()) == {"error"}
    plog.set_level(None, "off")
    plog.get_logger("main").critical("not even this")
    assert "not even this" not in buf.getvalue()


def test_setup_rejects_bad_input_without_changing_anything():
    plog.set_level(None, "info")
    with pytest.raises(ValueError, match="invalid component specified 'nosuch'"):
        plog.setup_logging("debug", "upstream:debug,nosuch:info", None, None)
    with pytest.raises(ValueError, match="unknown logger level"):
        plog.setup_logging("loud", "", None, None)
    with pytest.raises(ValueError, match="not correctly specified"):
        plog.setup_logging("info", "upstream", None, None)
    with pytest.raises(ValueError, match="cannot open log path"):
        plog.setup_logging("info", "", None, "/nonexistent-dir/x/envoy.log")
    assert set(plog.get_levels().values()) == {"info"}
    with pytest.raises(ValueError):
        plog.get_logger("nosuch")
    with pytest.raises(ValueError):
        plog.set_level("nosuch", "info")


def test_log_path_and_reopen():
    d = tempfile.mkdtemp()
    path = os.path.join(d, "proxy.log")
    try:
        plog.setup_logging("warning", "", "%l %n %v", path)
        plog.get_logger("main").warning("first")
        plog.get_logger("main").info("dropped")
        os.rename(path, path + ".1")  # logrotate, then /reopen_logs
        plog.reopen()
        plog.get_logger("config").error("second")
        for h in logging.getLogger("pyproxy").handlers:
            h.flush()
        with open(path + ".1") as f:
            assert f.read() == "warning main first\n"
        with open(path) as f:
            assert f.read() == "error config second\n"
    finally:
        plog.setup_logging("info", "", None, None, stream=io.StringIO())
        for n in os.listdir(d):
            os.unlink(os.path.join(d, n))
        os.rmdir(d)


def test_exception_is_appended():
    buf = io.StringIO()
    plog.setup_logging("info", "", "%v", None, stream=buf)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        plog.get_logger("main").exception("failed")
    out = buf.getvalue()
    assert out.startswith("failed\nTraceback") and "RuntimeError: boom" in out


def test_disabled_logging_is_cheap():
    plog.setup_logging("info", "", None, None, stream=io.StringIO())
    lg = plog.get_logger("router")
    n = 200_000
    t0 = time.perf_counter()
    for _ in range(n):
        lg.debug("x %s", 1)
    per_call = (time.perf_counter() - t0) / n
    assert per_call < 5e-6, per_call  # a cached level check, no formatting


def test_module_loggers_follow_component_or_base_level():
    buf = io.StringIO()
    plog.setup_logging("warning", "upstream:debug", "%n|%l|%v", None, stream=buf)
    logging.getLogger("pyproxy.upstream.dns").debug("resolved")   # follows 'upstream'
    logging.getLogger("pyproxy.xds_client.ads").info("dropped")   # follows -l warning
    logging.getLogger("pyproxy.xds_client.ads").warning("kept")
    assert buf.getvalue() == "upstream|debug|resolved\nxds_client|warning|kept\n"
