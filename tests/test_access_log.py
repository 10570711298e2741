"""Access loggers: formats compared with the real Envoy, filters, buffered flushing."""

import json
import os
import re
import shutil
import tempfile
import time
import http.client

import pytest
from google.protobuf import json_format

from envoy.config.accesslog.v3 import accesslog_pb2
from proxy_util import wait_until
from pyproxy.access_log import build_access_logs, flush_all, set_flush_interval
from pyproxy.config.errors import ConfigError
from pyproxy.config.registry import ensure_types_for_json
from pyproxy.http.headers import Headers
from pyproxy.stream_info import StreamInfo

FILE_T = "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog"


def access_logs(*dicts):
    out = []
    for d in dicts:
        d = json.loads(json.dumps(d))
        ensure_types_for_json(d)
        al = accesslog_pb2.AccessLog()
        json_format.ParseDict(d, al)
        out.append(al)
    return build_access_logs(out)


def read(path):
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return ""


JSON_FMT = {"code": "%RESPONSE_CODE%", "path": "%REQ(:PATH)%", "missing": "%REQ(x-none)%",
            "mixed": "a-%RESPONSE_CODE%-%REQ(x-none)%", "nested": {"p": "%PROTOCOL%"},
            "bytes": "%BYTES_SENT%", "trunc": "%REQ(user-agent):3%", "flags": "%RESPONSE_FLAGS%",
            "lit": "plain"}
TEXT_FMT = "%REQ(x-none)%|%REQ(user-agent)%|%RESPONSE_CODE%|%ROUTE_NAME%|%REQ(x-a?user-agent)%\n"


def _al(path, log_format=None, flt=None):
    tc = {"@type": FILE_T, "path": path}
    if log_format is not None:
        tc["log_format"] = log_format
    d = {"name": "envoy.access_loggers.file", "typed_config": tc}
    if flt is not None:
        d["filter"] = flt
    return d


@pytest.mark.skipif(shutil.which("envoy") is None, reason="envoy binary not on PATH")
def test_formats_match_envoy():
    from test_routing_envoy import Envoy, _envoy_bootstrap
    rc = {"name": "r", "virtual_hosts": [{"name": "v", "domains": ["*"], "routes": [
        {"name": "rname", "match": {"prefix": "/"},
         "direct_response": {"status": 201, "body": {"inline_string": "hello"}}}]}]}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {k: os.path.join(tmp, k + ".log") for k in ("default", "json", "omit")}
        boot = _envoy_bootstrap(rc)
        hcm = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
            "typed_config"]
        hcm["access_log"] = [
            _al(paths["default"]),
            _al(paths["json"], {"json_format": JSON_FMT}),
            _al(paths["omit"], {"text_format_source": {"inline_string": TEXT_FMT},
                                "omit_empty_values": True}),
        ]
        e = Envoy(boot, tmp + "/")
        try:
            c = http.client.HTTPConnection("127.0.0.1", e.port, timeout=5)
            c.putrequest("GET", "/some/path?q=1", skip_host=True, skip_accept_encoding=True)
            c.putheader("Host", "example.test")
            c.putheader("User-Agent", "tester/1.0")
            c.endheaders()
            r = c.getresponse()
            r.read()
            c.close()
            assert wait_until(lambda: all(read(p).endswith("\n") for p in paths.values()), 10)
        finally:
            e.stop()
        envoy_lines = {k: read(p) for k, p in paths.items()}

    # the same request as pyproxy's HCM would describe it
    req = Headers([(":method", "GET"), (":scheme", "http"), (":authority", "example.test"),
                   (":path", "/some/path?q=1"), ("user-agent", "tester/1.0")])
    rid = re.search(r'"([0-9a-f-]{36})"', envoy_lines["default"])
    req.add("x-request-id", rid.group(1) if rid else "-")
    req.add("x-forwarded-proto", "http")
    resp = Headers([(":status", "201"), ("content-length", "5")])
    si = StreamInfo("127.0.0.1:5555", "127.0.0.1:80")
    si.response_code = 201
    si.bytes_sent = 5
    si.route_name = "rname"
    si.end_monotonic = si.start_monotonic
    with tempfile.TemporaryDirectory() as tmp:
        paths = {k: os.path.join(tmp, k + ".log") for k in ("default", "json", "omit")}
        loggers = access_logs(
            _al(paths["default"]),
            _al(paths["json"], {"json_format": JSON_FMT}),
            _al(paths["omit"], {"text_format_source": {"inline_string": TEXT_FMT},
                                "omit_empty_values": True}))
        for lg in loggers:
            lg.log(si, req, resp, None)
        flush_all()
        ours = {k: read(p) for k, p in paths.items()}

    ts = re.compile(r"^\[\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\]")
    assert ts.match(envoy_lines["default"]) and ts.match(ours["default"])
    assert ts.sub("[T]", envoy_lines["default"]) == ts.sub("[T]", ours["default"])
    assert envoy_lines["json"] == ours["json"]
    assert envoy_lines["omit"] == ours["omit"]


def _si(code=200, flags=(), dur=0.05):
    si = StreamInfo("10.0.0.1:1000", "10.0.0.2:80")
    si.response_code = code
    si.response_flags = set(flags)
    si.end_monotonic = si.start_monotonic + dur
    return si


def test_filters(tmp_path):
    p = str(tmp_path / "f.log")
    fmt = {"text_format_source": {"inline_string": "%RESPONSE_CODE%\n"}}
    lg_status, lg_dur, lg_flags, lg_or, lg_hdr, lg_grpc = access_logs(
        _al(p, fmt, {"status_code_filter": {"comparison": {"op": "GE", "value": {
            "default_value": 400, "runtime_key": "k"}}}}),
        _al(p, fmt, {"duration_filter": {"comparison": {"op": "GE", "value": {
            "default_value": 100, "runtime_key": "k"}}}}),
        _al(p, fmt, {"response_flag_filter": {"flags": ["NR", "UH"]}}),
        _al(p, fmt, {"or_filter": {"filters": [
            {"status_code_filter": {"comparison": {"op": "EQ", "value": {"default_value": 204,
                                                                         "runtime_key": "k"}}}},
            {"not_health_check_filter": {}}]}}),
        _al(p, fmt, {"header_filter": {"header": {"name": "x-log", "present_match": True}}}),
        _al(p, fmt, {"grpc_status_filter": {"statuses": ["UNAVAILABLE"]}}),
    )
    req = Headers([(":path", "/")])
    assert not lg_status.filter(_si(399), req, None, None)
    assert lg_status.filter(_si(503), req, None, None)
    assert not lg_dur.filter(_si(dur=0.05), req, None, None)
    assert lg_dur.filter(_si(dur=0.2), req, None, None)
    assert lg_flags.filter(_si(flags={"NR"}), req, None, None)
    assert not lg_flags.filter(_si(flags={"UF"}), req, None, None)
    assert lg_or.filter(_si(200), req, None, None)
    assert not lg_hdr.filter(_si(), req, None, None)
    assert lg_hdr.filter(_si(), Headers([("x-log", "1")]), None, None)
    assert lg_grpc.filter(_si(503), req, Headers([(":status", "503")]), None)
    assert lg_grpc.filter(_si(200), req, Headers([(":status", "200")]),
                          Headers([("grpc-status", "14")]))
    assert not lg_grpc.filter(_si(200), req, Headers([("grpc-status", "0")]), None)
    # a filtered-out line is never written
    lg_status.log(_si(200), req, None, None)
    lg_status.log(_si(500), req, None, None)
    flush_all()
    assert read(p) == "500\n"


@pytest.mark.parametrize("flt", [
    {"extension_filter": {"name": "x", "typed_config": {
        "@type": "type.googleapis.com/google.protobuf.Struct", "value": {}}}},
    {"response_flag_filter": {"flags": ["NOPE"]}},
    {"and_filter": {"filters": [{"not_health_check_filter": {}}]}},
])
def test_bad_filters(tmp_path, flt):
    with pytest.raises(ConfigError) as ei:
        access_logs(_al(str(tmp_path / "x.log"), None, flt))
    assert "access_log[0]" in str(ei.value)


def test_bad_configs(tmp_path):
    with pytest.raises(ConfigError, match="NOT_A_COMMAND"):
        access_logs(_al(str(tmp_path / "x"), {"text_format": "%NOT_A_COMMAND%"}))
    with pytest.raises(ConfigError, match="Failed to open"):
        access_logs(_al(str(tmp_path / "no" / "such" / "dir.log")))
    with pytest.raises(ConfigError, match="registered implementation"):
        access_logs({"name": "x", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.grpc.v3."
                     "HttpGrpcAccessLogConfig"}})


def test_periodic_flush_and_shared_files(tmp_path):
    p = str(tmp_path / "shared.log")
    fmt = {"text_format_source": {"inline_string": "%RESPONSE_CODE%\n"}}
    a, b = access_logs(_al(p, fmt), _al(p, fmt))
    assert a.sink.file is b.sink.file
    set_flush_interval(30)
    try:
        time.sleep(0.05)  # let the flusher pick up the new interval
        a.log(_si(201))
        b.log(_si(202))
        time.sleep(0.2)
        assert read(p) == ""  # buffered, not written per request
        set_flush_interval(0.05)
        assert wait_until(lambda: read(p) == "201\n202\n", 5)
    finally:
        set_flush_interval(1.0)


def test_stdout_logger(capfd):
    (lg,) = access_logs({"name": "envoy.access_loggers.stdout", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog",
        "log_format": {"json_format": {"c": "%RESPONSE_CODE%", "r": "%ROUTE_NAME%"}}}})
    lg.log(_si(204))
    flush_all()
    out = capfd.readouterr().out
    assert json.loads(out.strip().splitlines()[-1]) == {"c": 204, "r": None}
