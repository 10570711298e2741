"""The %COMMAND% formatter."""

import calendar
import json
import time

import pytest

from pyproxy.config.errors import ConfigError
from pyproxy.formatter import DEFAULT_FORMAT, compile_format, compile_json_format
from pyproxy.http.headers import Headers
from pyproxy.stream_info import ResponseFlags, StreamInfo


def si_fixture():
    si = StreamInfo("[2001:db8::1]:4567", "10.0.0.2:8080", protocol="HTTP/2", connection_id=42)
    si.downstream_direct_remote_address = "192.0.2.7:1111"
    si.start_time = calendar.timegm((2024, 3, 5, 6, 7, 8)) + 0.123456789
    si.end_monotonic = si.start_monotonic + 0.250
    si.first_upstream_rx_byte = si.start_monotonic + 0.100
    si.response_code = 503
    si.response_flags = ResponseFlags()
    si.response_flags.add("URX")  # as the router sets them: the retry state gives up, then the failure
    si.response_flags.add("UF")
    si.response_code_details = "upstream_reset_before_response_started{connection_failure}"
    si.bytes_received = 11
    si.bytes_sent = 22
    si.upstream_host = "10.1.1.1:9080"
    si.upstream_cluster = "outbound|9080||reviews"
    si.upstream_local_address = "10.0.0.2:50000"
    si.route_name = "r1"
    si.requested_server_name = "reviews.default"
    si.attempt_count = 3
    si.dynamic_metadata = {"envoy.lb": {"canary": True, "n": {"x": "y"}}}
    si.filter_state = {"k": "fs-value"}
    return si


REQ = Headers([(":method", "POST"), (":path", "/a/b?c=d"), (":authority", "svc"),
               ("x-forwarded-for", "1.1.1.1"), ("user-agent", "ua/1")])
RESP = Headers([(":status", "503"), ("x-envoy-upstream-service-time", "7")])
TRAILERS = Headers([("grpc-status", "14")])


def fmt(s, **kw):
    return compile_format(s, **kw).format(si_fixture(), REQ, RESP, TRAILERS)


@pytest.mark.parametrize("command,expected", [
    ("%START_TIME%", "2024-03-05T06:07:08.123Z"),
    ("%START_TIME(%Y/%m/%d %H:%M:%S)%", "2024/03/05 06:07:08"),
    ("%START_TIME(%s.%3f)%", "%d.123" % calendar.timegm((2024, 3, 5, 6, 7, 8))),
    ("%START_TIME(%3f|%6f)%", "123|123456"),
    ("%REQ(:METHOD)% %REQ(:path)% %REQ(X-NONE?USER-AGENT)% %REQ(user-agent):2%", "POST /a/b?c=d ua/1 ua"),
    ("%REQ_WITHOUT_QUERY(:PATH)%", "/a/b"),
    ("%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% %TRAILER(grpc-status)%", "7 14"),
    ("%REQ(x-missing)%", "-"),
    ("%PROTOCOL% %RESPONSE_CODE% %RESPONSE_FLAGS%", "HTTP/2 503 URX,UF"),
    ("%RESPONSE_FLAGS_LONG%", "UpstreamRetryLimitExceeded,UpstreamConnectionFailure"),
    ("%RESPONSE_CODE_DETAILS%", "upstream_reset_before_response_started{connection_failure}"),
    ("%BYTES_RECEIVED% %BYTES_SENT% %DURATION% %RESPONSE_DURATION% %RESPONSE_TX_DURATION%",
     "11 22 250 100 150"),
    ("%REQUEST_DURATION%", "-"),
    ("%UPSTREAM_HOST% %UPSTREAM_CLUSTER% %UPSTREAM_LOCAL_ADDRESS%",
     "10.1.1.1:9080 outbound|9080||reviews 10.0.0.2:50000"),
    ("%UPSTREAM_TRANSPORT_FAILURE_REASON%", "-"),
    ("%DOWNSTREAM_REMOTE_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%",
     "[2001:db8::1]:4567 2001:db8::1"),
    ("%DOWNSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT% %DOWNSTREAM_LOCAL_PORT%",
     "10.0.0.2:8080 10.0.0.2 8080"),
    ("%DOWNSTREAM_DIRECT_REMOTE_ADDRESS% %DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT%",
     "192.0.2.7:1111 192.0.2.7"),
    ("%REQUESTED_SERVER_NAME% %ROUTE_NAME% %CONNECTION_ID% %UPSTREAM_REQUEST_ATTEMPT_COUNT%",
     "reviews.default r1 42 3"),
    ("%CONNECTION_TERMINATION_DETAILS%", "-"),
    ("%DYNAMIC_METADATA(envoy.lb:canary)% %DYNAMIC_METADATA(envoy.lb:n)% %DYNAMIC_METADATA(x:y)%",
     'true {"x":"y"} -'),
    ("%FILTER_STATE(k)% %FILTER_STATE(nope:PLAIN)%", "fs-value -"),
    ("%GRPC_STATUS% %GRPC_STATUS_NUMBER%", "Unavailable 14"),
    ("100%% sure", "100% sure"),
    ("", ""),
])
def test_commands(command, expected):
    assert fmt(command) == expected


def test_start_time_nanoseconds_have_nine_digits():
    v = fmt("%START_TIME(%f)%")
    assert len(v) == 9 and v.startswith("123456")  # float seconds carry ~7 exact digits


def test_hostname_and_environment(monkeypatch):
    monkeypatch.setenv("PYPROXY_FMT_TEST", "envval")
    import socket
    assert fmt("%HOSTNAME%|%ENVIRONMENT(PYPROXY_FMT_TEST)%|%ENVIRONMENT(PYPROXY_NOPE):3%") == \
        socket.gethostname() + "|envval|-"


def test_omit_empty_values():
    assert fmt("[%REQ(x-none)%]", omit_empty_values=True) == "[]"


def test_default_format():
    assert DEFAULT_FORMAT.startswith('[%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%')
    line = fmt(DEFAULT_FORMAT)
    assert line == ('[2024-03-05T06:07:08.123Z] "POST /a/b?c=d HTTP/2" 503 URX,UF 11 22 250 7 '
                    '"1.1.1.1" "ua/1" "-" "svc" "10.1.1.1:9080"\n')


@pytest.mark.parametrize("bad", ["%NOPE%", "%REQ%", "%REQ()%", "50% off", "%START_TIME", "%REQ(a?)%",
                                 "%PROTOCOL(x)%", "%DYNAMIC_METADATA()%"])
def test_errors(bad):
    with pytest.raises(ConfigError):
        compile_format(bad)


def test_json_typed_values():
    f = compile_json_format({"code": "%RESPONSE_CODE%", "dur": "%DURATION%", "missing": "%REQ(x)%",
                             "mixed": "c=%RESPONSE_CODE% %REQ(x)%", "n": {"proto": "%PROTOCOL%"},
                             "md": "%DYNAMIC_METADATA(envoy.lb)%", "const": 5})
    out = f.format(si_fixture(), REQ, RESP, TRAILERS)
    assert out.endswith("\n")
    assert json.loads(out) == {"code": 503, "dur": 250, "missing": None, "mixed": "c=503 -",
                               "n": {"proto": "HTTP/2"},
                               "md": {"canary": True, "n": {"x": "y"}}, "const": 5}
    f = compile_json_format({"missing": "%REQ(x)%", "code": "%RESPONSE_CODE%"},
                            omit_empty_values=True)
    assert json.loads(f.format(si_fixture(), REQ, RESP, None)) == {"code": 503}


def test_format_is_cheap():
    f = compile_format(DEFAULT_FORMAT)
    si = si_fixture()
    t = time.perf_counter()
    for _ in range(2000):
        f.format(si, REQ, RESP, None)
    per = (time.perf_counter() - t) / 2000
    assert per < 200e-6, per  # generous bound for a loaded 2-core box
