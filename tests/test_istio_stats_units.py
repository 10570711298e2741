"""istio.stats config compilation and bounds, in process: metric overrides (drop, tags_to_remove,
dimensions) as istiod renders Telemetry API overrides, a clear rejection of what pyproxy cannot
evaluate, label-value truncation and the series cap."""

from __future__ import annotations

import pytest
from envoy.config.core.v3 import base_pb2
from google.protobuf import json_format

from pyproxy.config import ConfigError
from pyproxy.config.registry import message_class
from pyproxy.filters import istio_stats_core as core
from pyproxy.filters.http.istio_stats import IstioStatsHttpConfig
from pyproxy.http.headers import Headers
from pyproxy.stats import Store
from pyproxy.stream_info import StreamInfo
from pyproxy.admin import stats_render


class _Listener:
    inbound = True


class _Server:
    node = json_format.ParseDict({"id": "sidecar~1~b.ns~ns.svc.cluster.local", "metadata": {
        "WORKLOAD_NAME": "b", "NAMESPACE": "ns", "CLUSTER_ID": "c1",
        "LABELS": {"app": "b", "version": "v1"}}}, base_pb2.Node())


class _Ctx:
    def __init__(self):
        self.stats = Store()
        self.server = _Server()
        self.listener = _Listener()
        self.cluster_manager = None


class _Conn:
    ssl = None


class _Stream:
    connection = _Conn()

    def __init__(self, req, status="200"):
        self.request_headers = Headers(req)
        self.response_headers = Headers([(":status", status)])
        self.response_trailers = None
        si = self.stream_info = StreamInfo()
        si.response_code = int(status)
        si.end_monotonic = si.start_monotonic


def _cfg(d):
    m = message_class("stats.PluginConfig")()
    json_format.ParseDict(d, m)
    return m


def _run(f, req, status="200"):
    s = _Stream(req, status)
    flt = f.create(s)
    flt.decode_headers(s.request_headers, True)
    flt.on_destroy()


def _prom(store):
    return stats_render.render_prometheus(store, stats_render.Query({}, prometheus=True))


def test_overrides_drop_remove_and_dimensions():
    ctx = _Ctx()
    f = IstioStatsHttpConfig(_cfg({"metrics": [
        {"name": "requests_total", "dimensions": {"request_host": "request.host", "method": "request.method",
                                                 "tenant": "request.headers['x-tenant']", "fixed": "'lit'"},
         "tags_to_remove": ["source_principal", "grpc_response_status"]},
        {"name": "request_bytes", "drop": True},
        {"dimensions": {"response_code": "'masked'"}},
    ]}), ctx)
    _run(f, [(":method", "GET"), (":path", "/"), (":authority", "b.ns"), ("x-tenant", "t1")])
    _run(f, [(":method", "POST"), (":path", "/"), (":authority", "b.ns")])
    text = _prom(ctx.stats)
    lines = [l for l in text.splitlines() if l.startswith("istio_requests_total{")]
    assert len(lines) == 2
    first = lines[0] if 'method="GET"' in lines[0] else lines[1]
    assert 'source_principal=' not in first and "grpc_response_status" not in first
    assert 'response_code="masked"' in first
    # added dimensions come after the standard ones, in name order
    assert first.endswith(',fixed="lit",method="GET",request_host="b.ns",tenant="t1"} 1')
    post = lines[1] if first is lines[0] else lines[0]
    assert 'tenant="unknown"' in post
    assert "istio_request_bytes" not in text  # dropped
    assert "istio_response_bytes_bucket" in text and "istio_request_duration_milliseconds_bucket" in text


@pytest.mark.parametrize("cfg,msg", [
    ({"metrics": [{"dimensions": {"x": "request.size > 10 ? 'big' : 'small'"}}]}, "is not supported"),
    ({"metrics": [{"dimensions": {"x": "upstream_peer.labels['role'].value"}}]}, "is not supported"),
    ({"metrics": [{"name": "no_such_metric"}]}, "unknown metric"),
    ({"definitions": [{"name": "custom", "value": "1"}]}, "custom metric definitions"),
    ({"metrics": [{"match": "response.code == 200"}]}, "match"),
])
def test_unsupported_overrides_are_rejected_with_a_message(cfg, msg):
    with pytest.raises(ConfigError) as e:
        IstioStatsHttpConfig(_cfg(cfg), _Ctx())
    assert msg in str(e.value)


def test_huge_label_values_are_cut_and_counted():
    ctx = _Ctx()
    f = IstioStatsHttpConfig(_cfg({}), ctx)
    _run(f, [(":method", "GET"), (":path", "/"), (":authority", "h" * 5000)])
    text = _prom(ctx.stats)
    line = next(l for l in text.splitlines() if l.startswith("istio_requests_total{"))
    # disable_host_header_fallback is off: the host is the destination service, cut to the bound
    assert 'destination_service="%s"' % ("h" * core.MAX_LABEL_CHARS) in line
    assert ctx.stats.counters["istio_stats.label_truncated"].value == 2  # service and service name


def test_series_are_capped(monkeypatch):
    ctx = _Ctx()
    f = IstioStatsHttpConfig(_cfg({}), ctx)
    monkeypatch.setattr(core._Limits, "series", 0)
    monkeypatch.setattr(core, "MAX_SERIES", 8)  # 4 metrics per label set: room for two
    for i in range(5):
        _run(f, [(":method", "GET"), (":path", "/"), (":authority", "host%d" % i)])
    _run(f, [(":method", "GET"), (":path", "/"), (":authority", "host0")])  # existing series still count
    text = _prom(ctx.stats)
    lines = [l for l in text.splitlines() if l.startswith("istio_requests_total{")]
    assert len(lines) == 2
    assert any('destination_service="host0"' in l and l.endswith(" 2") for l in lines)
    assert ctx.stats.counters["istio_stats.series_overflow"].value == 3 * 4


def test_reporter_from_direction_and_gateway():
    ctx = _Ctx()
    assert IstioStatsHttpConfig(_cfg({}), ctx).reporter == "destination"
    ctx.listener = None
    assert IstioStatsHttpConfig(_cfg({}), ctx).reporter == "source"
    assert IstioStatsHttpConfig(_cfg({"reporter": "SERVER_GATEWAY"}), ctx).reporter == "waypoint"


def test_histogram_bucket_settings_from_the_bootstrap():
    """Istio's statsHistogramBuckets annotation becomes stats_config.histogram_bucket_settings
    (prefix istiocustom): the istio_* histograms use those buckets, the others Envoy's."""
    from envoy.config.metrics.v3 import stats_pb2
    from pyproxy.server import histogram_bucket_settings
    sc = json_format.ParseDict({"histogram_bucket_settings": [
        {"match": {"prefix": "istiocustom"}, "buckets": [100, 1, 10, 10]}]}, stats_pb2.StatsConfig())
    ctx = _Ctx()
    ctx.stats.bucket_settings = histogram_bucket_settings(sc)
    f = IstioStatsHttpConfig(_cfg({}), ctx)
    _run(f, [(":method", "GET"), (":path", "/"), (":authority", "h")])
    ctx.stats.histogram("http.x.downstream_rq_time").record(3)
    text = _prom(ctx.stats)
    les = [l.split('le="')[1].split('"')[0] for l in text.splitlines()
           if l.startswith("istio_request_duration_milliseconds_bucket{")]
    assert les == ["1", "10", "100", "+Inf"]
    assert text.count('envoy_http_downstream_rq_time_bucket{') == 20
    bad = json_format.ParseDict({"histogram_bucket_settings": [{"match": {"prefix": "x"}, "buckets": [0]}]},
                                stats_pb2.StatsConfig())
    with pytest.raises(ConfigError):
        histogram_bucket_settings(bad)
