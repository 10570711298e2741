"""Admin API: real sockets, real clients (http.client, curl), a small real context."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import random
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request

import pytest
from google.protobuf import any_pb2, json_format
from envoy.admin.v3 import config_dump_pb2 as cd0, config_dump_shared_pb2 as cd
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from prometheus_client.parser import text_string_to_metric_families

from proxy_util import raw  # (send raw bytes, read until the server closes)
from pyproxy import log as plog
from pyproxy.admin.server import MAX_HEADER_BYTES, start_admin
from pyproxy.stats import Store

try:
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None


# ---------------------------------------------------------------------------------------------
# A small real context

def _any(msg) -> any_pb2.Any:
    a = any_pb2.Any()
    a.Pack(msg)
    return a


def _cluster(name, port):
    c = cluster_pb2.Cluster(name=name, type=cluster_pb2.Cluster.STATIC)
    c.connect_timeout.FromSeconds(1)
    ep = c.load_assignment.endpoints.add().lb_endpoints.add()
    ep.endpoint.address.socket_address.address = "127.0.0.1"
    ep.endpoint.address.socket_address.port_value = port
    c.load_assignment.cluster_name = name
    return c


def _listener(name, port):
    lis = listener_pb2.Listener(name=name)
    lis.address.socket_address.address = "0.0.0.0"
    lis.address.socket_address.port_value = port
    return lis


class FakeAdminContext:
    """Everything the admin reads is real data built the way the process layer would."""

    def __init__(self):
        self.stats = Store()
        s = self.stats
        s.gauge("server.state").set(0)
        s.gauge("server.live").set(1)
        s.gauge("listener_manager.workers_started").set(1)
        s.counter("cluster_manager.cds.update_success").inc(2)
        s.counter("cluster_manager.cds.update_rejected")
        s.counter("listener_manager.lds.update_success").inc(1)
        s.counter("listener_manager.lds.update_rejected")
        s.counter("cluster.c1.upstream_rq_200").inc(5)
        s.counter("cluster.c1.upstream_rq_503").inc(1)
        s.counter("cluster.c1.upstream_rq_2xx").inc(5)
        s.counter("cluster.c1.upstream_rq_5xx").inc(1)
        s.counter("cluster.c1.upstream_rq_total").inc(6)
        s.counter("cluster.c1.upstream_cx_connect_fail")
        s.gauge("cluster.c1.upstream_cx_active").set(2)
        s.counter("http.ingress.downstream_rq_total").inc(6)
        s.counter("listener.0.0.0.0_15006.downstream_cx_total").inc(3)
        s.gauge("listener.0.0.0.0_15006.downstream_cx_active").set(1)
        s.gauge("cluster_manager.active_clusters").set(2)
        s.gauge("server.never_set")
        s.text_readout("control_plane.identifier", "istiod-1")
        h = s.histogram("cluster.c1.upstream_rq_time")
        for v in (0.3, 1, 2, 4.5, 7, 120):
            h.record(v)
        s.histogram("http.ingress.downstream_rq_time")  # never recorded
        self._state = "LIVE"
        self.calls: list = []
        self.hc_failed = False
        self.started = time.time()

    def state(self):
        return self._state

    def server_info(self):
        return {"command_line_options": {"concurrency": 2, "config_path": "/etc/b.json",
                                         "log_level": "warning", "drain_time": "45s"},
                "node": {"id": "sidecar~10.0.0.1~pod.ns~ns.svc.cluster.local", "cluster": "pod.ns"}}

    def config_dump(self, resource, include_eds):
        boot = bootstrap_pb2.Bootstrap()
        boot.node.id = "node1"
        boot.admin.address.socket_address.address = "127.0.0.1"
        boot.admin.address.socket_address.port_value = 15000
        cds = cd.ClustersConfigDump(version_info="7")
        cds.static_clusters.add(cluster=_any(_cluster("c1", 8080)))
        cds.dynamic_active_clusters.add(version_info="7",
                                        cluster=_any(_cluster("outbound|9080||reviews", 9080)))
        cds.dynamic_active_clusters.add(version_info="7",
                                        cluster=_any(_cluster("outbound|9080||ratings", 9081)))
        lds = cd.ListenersConfigDump(version_info="3")
        dl = lds.dynamic_listeners.add(name="virtualInbound")
        dl.active_state.listener.Pack(_listener("virtualInbound", 15006))
        dl.active_state.version_info = "3"
        dump = cd0.ConfigDump()
        b = cd0.BootstrapConfigDump(bootstrap=boot)
        for m in (b, cds, lds, cd.RoutesConfigDump(), cd0.SecretsConfigDump()):
            dump.configs.append(_any(m))
        if include_eds:
            dump.configs.append(_any(cd.EndpointsConfigDump()))
        return json_format.MessageToDict(dump, preserving_proto_field_name=True)

    def clusters_status(self):
        return [
            {"name": "c1", "added_via_api": False,
             "hosts": [{"address": "127.0.0.1", "port": 8080,
                        "stats": {"cx_active": 2, "cx_total": 7, "rq_success": 5, "rq_error": 1,
                                  "rq_total": 6},
                        "health_flags": [], "weight": 1, "success_rate": -1}]},
            {"name": "outbound|9080||reviews", "added_via_api": True,
             "circuit_breakers": {"default": {"max_connections": 4294967295,
                                              "max_pending_requests": 4294967295,
                                              "max_requests": 4294967295, "max_retries": 4294967295}},
             "hosts": [{"address": "10.1.2.3", "port": 9080, "region": "us", "zone": "us-a",
                        "health_flags": ["failed_active_hc", "failed_eds_health"], "weight": 3,
                        "priority": 1, "success_rate": 99.5},
                       {"address": "fd00::1", "port": 9080}]},
        ]

    def listeners_status(self):
        return [{"name": "virtualInbound", "local_address": "0.0.0.0:15006"},
                {"name": "virtualOutbound", "local_address": "0.0.0.0:15001",
                 "additional_local_addresses": ["[::]:15001"]}]

    def quit(self):
        self.calls.append(("quit",))

    def drain_listeners(self, inbound_only, graceful, skip_exit):
        self.calls.append(("drain", inbound_only, graceful, skip_exit))

    def set_healthcheck_failed(self, failed):
        self.hc_failed = failed
        self.calls.append(("hc", failed))

    def reset_counters(self):
        for c in self.stats.counters.values():
            c.value = 0
        self.calls.append(("reset",))


class RecordingAccessLog:
    def __init__(self):
        self.entries = []

    def log(self, stream_info, request_headers=None, response_headers=None, response_trailers=None):
        self.entries.append((request_headers.get(":method"), request_headers.get(":path"),
                             stream_info.response_code))


class LoopThread:
    def __init__(self):
        self.loop = uvloop.new_event_loop() if uvloop else asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout=10):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture(scope="module")
def loop_thread():
    lt = LoopThread()
    try:
        yield lt
    finally:
        lt.stop()


@pytest.fixture
def admin(loop_thread):
    ctx = FakeAdminContext()
    alog = RecordingAccessLog()
    srv = loop_thread.run(start_admin(ctx, "127.0.0.1", 0, access_logs=[alog]))
    srv.test_ctx = ctx
    srv.test_alog = alog
    try:
        yield srv
    finally:
        loop_thread.run(srv.close())


def req(admin, method, path, body=None, headers=None):
    c = http.client.HTTPConnection("127.0.0.1", admin.port, timeout=5)
    try:
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        return r.status, dict((k.lower(), v) for k, v in r.getheaders()), r.read().decode()
    finally:
        c.close()


def curl(*args):
    p = subprocess.run(["curl", "-sS", "--max-time", "5", "-w", "\n%{http_code}", *args],
                       capture_output=True, text=True, timeout=10)
    assert p.returncode == 0, p.stderr
    body, _, code = p.stdout.rpartition("\n")
    return int(code), body


AGENT_READY = r"/stats?usedonly&filter=^(server\.state|listener_manager\.workers_started)"


# ---------------------------------------------------------------------------------------------
# /ready, /server_info, /help, 404

def test_ready_follows_state(admin):
    assert req(admin, "GET", "/ready")[::2] == (200, "LIVE\n")
    admin.test_ctx._state = "DRAINING"
    assert req(admin, "GET", "/ready")[::2] == (503, "DRAINING\n")
    admin.test_ctx._state = "PRE_INITIALIZING"
    code, body = curl("http://127.0.0.1:%d/ready" % admin.port)
    assert (code, body) == (503, "PRE_INITIALIZING\n")


def test_server_info(admin):
    st, h, body = req(admin, "GET", "/server_info")
    assert st == 200 and h["content-type"] == "application/json"
    info = json.loads(body)
    assert info["state"] == "LIVE"
    assert re.fullmatch(r"\d+s", info["uptime_current_epoch"])
    assert re.fullmatch(r"\d+s", info["uptime_all_epochs"])
    assert info["hot_restart_version"] == "disabled"
    assert info["command_line_options"]["concurrency"] == 2
    assert info["node"]["cluster"] == "pod.ns"
    assert len(info["version"].split("/")) == 5


def test_help_and_unknown_path(admin):
    st, h, body = req(admin, "GET", "/help")
    assert st == 200 and body.startswith("admin commands are:\n")
    assert "  /quitquitquit (POST): exit the server\n" in body
    assert "      usedonly: Only include stats" in body
    st, h, body = req(admin, "GET", "/no/such/thing")
    assert st == 404 and body.startswith("invalid path. admin commands are:\n")
    st, h, body = req(admin, "GET", "/")
    assert st == 200 and h["content-type"].startswith("text/html") and "/stats" in body


# ---------------------------------------------------------------------------------------------
# /stats text, json, prometheus

def test_agent_readiness_query_exact(admin):
    code, body = curl("http://127.0.0.1:%d%s" % (admin.port, AGENT_READY))
    assert code == 200
    assert body == "listener_manager.workers_started: 1\nserver.state: 0\n"
    code, body = curl("http://127.0.0.1:%d/stats?usedonly&filter=%s" % (
        admin.port, r"^(cluster_manager\.cds|listener_manager\.lds)\.(update_success|update_rejected)$"))
    assert body == "cluster_manager.cds.update_success: 2\nlistener_manager.lds.update_success: 1\n"
    code, body = curl("http://127.0.0.1:%d/stats?usedonly&filter=downstream_cx_active$" % admin.port)
    assert body == "listener.0.0.0.0_15006.downstream_cx_active: 1\n"


def test_stats_text_format(admin):
    st, h, body = req(admin, "GET", "/stats")
    assert st == 200 and h["content-type"] == "text/plain; charset=UTF-8"
    lines = body.splitlines()
    # text readouts first, then counters and gauges sorted together, then histograms
    assert lines[0] == 'control_plane.identifier: "istiod-1"'
    hist_start = next(i for i, line in enumerate(lines) if "upstream_rq_time" in line)
    scalars = lines[1:hist_start]
    names = [line.split(": ")[0] for line in scalars]
    assert names == sorted(names)
    for line in scalars:
        assert re.fullmatch(r"[\w.\-|]+: -?\d+", line), line
    assert "server.never_set: 0" in scalars and "cluster.c1.upstream_cx_connect_fail: 0" in scalars
    hist = lines[hist_start:]
    assert hist[0].startswith("cluster.c1.upstream_rq_time: P0(nan,0.3) P25(")
    parts = hist[0].split(": ", 1)[1].split(" ")
    assert [p.split("(")[0] for p in parts] == ["P0", "P25", "P50", "P75", "P90", "P95", "P99",
                                                 "P99.5", "P99.9", "P100"]
    vals = [float(p.split(",")[1].rstrip(")")) for p in parts]
    assert vals == sorted(vals) and vals[-1] == 120
    assert hist[1] == "http.ingress.downstream_rq_time: No recorded values"


def test_stats_usedonly_filter_type(admin):
    body = req(admin, "GET", "/stats?usedonly")[2]
    assert "server.never_set" not in body and "upstream_cx_connect_fail" not in body
    assert "http.ingress.downstream_rq_time" not in body  # unused histogram
    assert "cluster.c1.upstream_cx_active: 2" in body
    # search semantics, not full match
    body = req(admin, "GET", "/stats?filter=rq_2")[2]
    assert body == "cluster.c1.upstream_rq_200: 5\ncluster.c1.upstream_rq_2xx: 5\n"
    body = req(admin, "GET", "/stats?filter=upstream_rq_%5B0-9%5D%7B3%7D%24")[2]  # url-encoded
    assert body == "cluster.c1.upstream_rq_200: 5\ncluster.c1.upstream_rq_503: 1\n"
    body = req(admin, "GET", "/stats?filter=%5B%5B:digit:%5D%5D%7B3%7D$&type=Counters")[2]
    assert body == "cluster.c1.upstream_rq_200: 5\ncluster.c1.upstream_rq_503: 1\n"
    body = req(admin, "GET", "/stats?type=Gauges&filter=^server")[2]
    assert body == "server.live: 1\nserver.never_set: 0\nserver.state: 0\n"
    body = req(admin, "GET", "/stats?type=Histograms&usedonly")[2]
    assert body.count("\n") == 1 and body.startswith("cluster.c1.upstream_rq_time: P0(")
    body = req(admin, "GET", "/stats?type=TextReadouts")[2]
    assert body == 'control_plane.identifier: "istiod-1"\n'
    body = req(admin, "GET", "/stats?filter=^server&invert_filter&type=Gauges&usedonly")[2]
    assert "server." not in body and "cluster.c1.upstream_cx_active: 2" in body
    assert req(admin, "GET", "/stats?filter=(")[0] == 400
    assert req(admin, "GET", "/stats?type=Bogus")[::2] == (400, "invalid &type= param")
    assert req(admin, "GET", "/stats?format=xml")[0] == 400
    body = req(admin, "GET", "/stats?filter=upstream_rq_time&histogram_buckets=cumulative")[2]
    assert body.startswith("cluster.c1.upstream_rq_time: B0.5(0,1) B1(0,2) B5(0,4) B10(0,5)")


def test_stats_json(admin):
    st, h, body = req(admin, "GET", "/stats?format=json")
    assert st == 200 and h["content-type"] == "application/json"
    assert "\n" not in body.strip()  # compact, like Envoy
    doc = json.loads(body)
    stats = doc["stats"]
    assert stats[0] == {"name": "control_plane.identifier", "value": "istiod-1"}
    scalars = [s for s in stats[1:] if "name" in s]
    assert [s["name"] for s in scalars] == sorted(s["name"] for s in scalars)
    assert {"name": "cluster.c1.upstream_rq_200", "value": 5} in scalars
    hist = stats[-1]["histograms"]
    assert hist["supported_quantiles"] == [0, 25, 50, 75, 90, 95, 99, 99.5, 99.9, 100]
    assert '"supported_quantiles":[0,25,50,75,90,95,99,99.5,99.9,100]' in body
    cq = {c["name"]: c["values"] for c in hist["computed_quantiles"]}
    assert cq["cluster.c1.upstream_rq_time"][0] == {"cumulative": 0.3, "interval": None}
    assert cq["cluster.c1.upstream_rq_time"][-1] == {"cumulative": 120, "interval": None}
    assert all(v == {"cumulative": None, "interval": None} for v in cq["http.ingress.downstream_rq_time"])
    doc = json.loads(req(admin, "GET", AGENT_READY + "&format=json")[2])
    assert doc == {"stats": [{"name": "listener_manager.workers_started", "value": 1},
                             {"name": "server.state", "value": 0}]}


def test_prometheus(admin):
    st, h, body = req(admin, "GET", "/stats/prometheus")
    assert st == 200 and h["content-type"].startswith("text/plain")
    parsed = list(text_string_to_metric_families(body))  # a real Prometheus parser accepts it
    fams = {f.name: f for f in parsed}
    got = {(s.labels["envoy_response_code"], s.labels["envoy_cluster_name"]): s.value
           for f in parsed for s in f.samples if "envoy_response_code" in s.labels}
    assert got == {("200", "c1"): 5, ("503", "c1"): 1}
    assert 'envoy_cluster_upstream_rq_xx{envoy_response_code_class="2",envoy_cluster_name="c1"} 5' in body
    assert "envoy_server_state{} 0" in body
    assert 'envoy_listener_downstream_cx_total{envoy_listener_address="0.0.0.0_15006"} 3' in body
    assert 'envoy_http_downstream_rq_total{envoy_http_conn_manager_prefix="ingress"} 6' in body
    h = fams["envoy_cluster_upstream_rq_time"]
    assert h.type == "histogram"
    buckets = [(s.labels["le"], s.value) for s in h.samples if s.name.endswith("_bucket")]
    assert buckets[0] == ("0.5", 1) and buckets[-1] == ("+Inf", 6)
    counts = [v for _, v in buckets]
    assert counts == sorted(counts)
    assert dict(buckets)["250"] == 6 and dict(buckets)["100"] == 5
    assert [s.value for s in h.samples if s.name.endswith("_count")] == [6]
    assert abs([s.value for s in h.samples if s.name.endswith("_sum")][0] - 134.8) < 1e-9
    # types come grouped: all counters, then gauges, then histograms
    kinds = [line.split()[-1] for line in body.splitlines() if line.startswith("# TYPE")]
    assert kinds == sorted(kinds, key=["counter", "gauge", "histogram"].index)
    body = req(admin, "GET", "/stats/prometheus?usedonly&filter=workers_started")[2]
    assert body == "# TYPE envoy_listener_manager_workers_started gauge\n" \
                   "envoy_listener_manager_workers_started{} 1\n"
    body = req(admin, "GET", "/stats?format=prometheus&filter=server.state")[2]
    assert body == "# TYPE envoy_server_state gauge\nenvoy_server_state{} 0\n"
    body = req(admin, "GET", "/stats/prometheus?text_readouts&filter=control_plane")[2]
    assert body == ('# TYPE envoy_control_plane_identifier gauge\n'
                    'envoy_control_plane_identifier{text_value="istiod-1"} 0\n')


# ---------------------------------------------------------------------------------------------
# /config_dump

def test_config_dump(admin):
    st, h, body = req(admin, "GET", "/config_dump")
    assert st == 200 and h["content-type"] == "application/json"
    doc = json.loads(body)
    types = [c["@type"].rsplit(".", 1)[-1] for c in doc["configs"]]
    assert types == ["BootstrapConfigDump", "ClustersConfigDump", "ListenersConfigDump",
                     "RoutesConfigDump", "SecretsConfigDump"]
    doc = json.loads(req(admin, "GET", "/config_dump?include_eds")[2])
    assert doc["configs"][-1]["@type"].endswith("EndpointsConfigDump")

    doc = json.loads(req(admin, "GET", "/config_dump?resource=dynamic_active_clusters")[2])
    assert [c["@type"] for c in doc["configs"]] == [
        "type.googleapis.com/envoy.admin.v3.ClustersConfigDump.DynamicCluster"] * 2
    assert doc["configs"][0]["cluster"]["name"] == "outbound|9080||reviews"
    assert doc["configs"][0]["version_info"] == "7"

    doc = json.loads(req(admin, "GET", "/config_dump?resource=dynamic_active_clusters&mask=cluster.name")[2])
    assert doc == {"configs": [
        {"@type": "type.googleapis.com/envoy.admin.v3.ClustersConfigDump.DynamicCluster",
         "cluster": {"@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
                     "name": "outbound|9080||reviews"}},
        {"@type": "type.googleapis.com/envoy.admin.v3.ClustersConfigDump.DynamicCluster",
         "cluster": {"@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
                     "name": "outbound|9080||ratings"}}]}

    doc = json.loads(req(admin, "GET", "/config_dump?resource=dynamic_active_clusters&name_regex=.*ratings")[2])
    assert [c["cluster"]["name"] for c in doc["configs"]] == ["outbound|9080||ratings"]

    doc = json.loads(req(admin, "GET", "/config_dump?mask=static_clusters")[2])
    assert doc["configs"] == [{"@type": "type.googleapis.com/envoy.admin.v3.ClustersConfigDump",
                               "static_clusters": json.loads(body)["configs"][1]["static_clusters"]}]

    doc = json.loads(req(admin, "GET", "/config_dump?name_regex=ratings")[2])  # FullMatch, as Envoy
    assert all("dynamic_active_clusters" not in c for c in doc["configs"])
    doc = json.loads(req(admin, "GET", "/config_dump?name_regex=virtual.*")[2])
    lds = doc["configs"][2]
    assert [d["name"] for d in lds["dynamic_listeners"]] == ["virtualInbound"]
    assert "dynamic_active_clusters" not in doc["configs"][1]
    assert "bootstrap" in doc["configs"][0]  # never filtered

    st, h, body = req(admin, "GET", "/config_dump?resource=nope")
    assert (st, body) == (404, "nope not found in config dump")
    st, h, body = req(admin, "GET", "/config_dump?mask=foo.bar")
    assert st == 400 and "could not be successfully applied to any configs" in body
    st, h, body = req(admin, "GET", "/config_dump?resource=dynamic_listeners&mask=active_state.listener.filter_chains.filters")
    assert st == 400 and "could not be successfully used" in body
    assert req(admin, "GET", "/config_dump?name_regex=(")[0] == 400


# ---------------------------------------------------------------------------------------------
# /clusters, /listeners

def test_clusters_text(admin):
    st, h, body = req(admin, "GET", "/clusters")
    assert st == 200
    lines = body.splitlines()
    assert lines[:10] == [
        "c1::observability_name::c1",
        "c1::default_priority::max_connections::1024",
        "c1::default_priority::max_pending_requests::1024",
        "c1::default_priority::max_requests::1024",
        "c1::default_priority::max_retries::3",
        "c1::high_priority::max_connections::1024",
        "c1::high_priority::max_pending_requests::1024",
        "c1::high_priority::max_requests::1024",
        "c1::high_priority::max_retries::3",
        "c1::added_via_api::false",
    ]
    assert "c1::127.0.0.1:8080::cx_active::2" in lines
    assert "c1::127.0.0.1:8080::rq_success::5" in lines
    assert "c1::127.0.0.1:8080::health_flags::healthy" in lines
    assert "outbound|9080||reviews::added_via_api::true" in lines
    assert "outbound|9080||reviews::default_priority::max_connections::4294967295" in lines
    assert "outbound|9080||reviews::10.1.2.3:9080::health_flags::/failed_active_hc/failed_eds_health" in lines
    assert "outbound|9080||reviews::10.1.2.3:9080::zone::us-a" in lines
    assert "outbound|9080||reviews::10.1.2.3:9080::success_rate::99.5" in lines
    assert "outbound|9080||reviews::[fd00::1]:9080::weight::1" in lines
    for line in lines:  # every line is name::...::value
        assert line.count("::") >= 2, line
    body = req(admin, "GET", "/clusters?filter=^c1$")[2]
    assert "outbound" not in body and body.startswith("c1::")


def test_clusters_json(admin):
    doc = json.loads(req(admin, "GET", "/clusters?format=json")[2])
    c1, rev = doc["cluster_statuses"]
    assert c1["name"] == "c1" and "added_via_api" not in c1
    hs = c1["host_statuses"][0]
    assert hs["address"] == {"socket_address": {"address": "127.0.0.1", "port_value": 8080}}
    stats = {s["name"]: s for s in hs["stats"]}
    assert stats["cx_total"] == {"name": "cx_total", "value": "7"}
    assert stats["cx_connect_fail"] == {"name": "cx_connect_fail"}
    assert stats["cx_active"] == {"type": "GAUGE", "name": "cx_active", "value": "2"}
    assert hs["health_status"] == {"eds_health_status": "HEALTHY"}
    assert c1["circuit_breakers"]["thresholds"][1]["priority"] == "HIGH"
    assert rev["added_via_api"] is True
    h0 = rev["host_statuses"][0]
    assert h0["health_status"] == {"failed_active_health_check": True, "eds_health_status": "UNHEALTHY"}
    assert h0["locality"] == {"region": "us", "zone": "us-a"}
    assert h0["priority"] == 1 and h0["success_rate"] == {"value": 99.5} and h0["weight"] == 3


def test_listeners(admin):
    st, h, body = req(admin, "GET", "/listeners")
    assert (st, body) == (200, "virtualInbound::0.0.0.0:15006\nvirtualOutbound::0.0.0.0:15001,[::]:15001\n")
    doc = json.loads(req(admin, "GET", "/listeners?format=json")[2])
    assert doc["listener_statuses"][0] == {
        "name": "virtualInbound",
        "local_address": {"socket_address": {"address": "0.0.0.0", "port_value": 15006}}}
    assert doc["listener_statuses"][1]["additional_local_addresses"] == [
        {"socket_address": {"address": "::", "port_value": 15001}}]


# ---------------------------------------------------------------------------------------------
# POST-only endpoints and lifecycle

@pytest.mark.parametrize("path", ["/quitquitquit", "/drain_listeners", "/healthcheck/fail",
                                  "/healthcheck/ok", "/reset_counters", "/logging", "/reopen_logs"])
def test_mutating_endpoints_need_post(admin, path):
    st, h, body = req(admin, "GET", path)
    assert (st, body) == (405, "Method GET not allowed, POST required.")
    assert admin.test_ctx.calls == []


def test_quit_answers_then_quits(admin):
    code, body = curl("-X", "POST", "http://127.0.0.1:%d/quitquitquit" % admin.port)
    assert (code, body) == (200, "OK\n")
    deadline = time.monotonic() + 2
    while ("quit",) not in admin.test_ctx.calls and time.monotonic() < deadline:
        time.sleep(0.01)
    assert admin.test_ctx.calls == [("quit",)]


def test_drain_healthcheck_reset(admin):
    ctx = admin.test_ctx
    assert req(admin, "POST", "/drain_listeners?inboundonly&graceful")[::2] == (200, "OK\n")
    assert req(admin, "POST", "/drain_listeners?skip_exit")[::2] == (200, "OK\n")
    assert req(admin, "POST", "/healthcheck/fail")[::2] == (200, "OK\n")
    assert ctx.hc_failed is True
    assert req(admin, "POST", "/healthcheck/ok")[::2] == (200, "OK\n")
    assert ctx.hc_failed is False
    assert req(admin, "POST", "/reset_counters")[::2] == (200, "OK\n")
    assert ctx.calls == [("drain", True, True, False), ("drain", False, False, True),
                         ("hc", True), ("hc", False), ("reset",)]
    assert req(admin, "GET", "/stats?filter=upstream_rq_200")[2] == "cluster.c1.upstream_rq_200: 0\n"


def test_logging(admin):
    saved = plog.get_levels()
    try:
        plog.set_level(None, "warning")
        st, h, body = req(admin, "POST", "/logging")
        assert st == 200 and body.startswith("active loggers:\n  a2a: warning\n  admin: warning\n")
        body = req(admin, "POST", "/logging?upstream=debug")[2]
        assert "  upstream: debug\n" in body and "  http: warning\n" in body
        assert plog.get_logger("upstream").isEnabledFor(10)
        body = req(admin, "POST", "/logging?paths=http:trace,pool:error")[2]
        assert "  http: trace\n" in body and "  pool: error\n" in body
        body = req(admin, "POST", "/logging?level=info")[2]
        assert set(plog.get_levels().values()) == {"info"}
        st, h, body = req(admin, "POST", "/logging?level=bogus")
        assert st == 400 and body.startswith("error: unknown logger level\n")
        st, h, body = req(admin, "POST", "/logging?nope=debug")
        assert st == 400 and body.startswith("error: unknown logger name\n")
        st, h, body = req(admin, "POST", "/logging?level=info&upstream=debug")
        assert st == 400 and body.startswith("error: invalid number of parameters\n")
        assert set(plog.get_levels().values()) == {"info"}  # nothing half-applied
    finally:
        for k, v in saved.items():
            plog.set_level(k, v)


def test_misc_endpoints(admin):
    doc = json.loads(req(admin, "GET", "/memory")[2])
    assert int(doc["allocated"]) > 1_000_000 and doc["heap_size"] == doc["allocated"]
    assert json.loads(req(admin, "GET", "/runtime")[2]) == {"layers": [], "entries": {}}
    assert json.loads(req(admin, "GET", "/certs")[2]) == {"certificates": []}
    st, h, body = req(admin, "GET", "/contention")
    assert st == 200 and "not enabled" in body
    assert req(admin, "GET", "/hot_restart_version")[2] == "disabled\n"


# ---------------------------------------------------------------------------------------------
# HTTP behaviour

def test_keep_alive_and_pipelining(admin):
    c = http.client.HTTPConnection("127.0.0.1", admin.port, timeout=5)
    try:
        for _ in range(3):
            c.request("GET", "/ready")
            r = c.getresponse()
            assert (r.status, r.read()) == (200, b"LIVE\n")
            assert r.getheader("connection") is None
        first_sock = c.sock
        c.request("GET", "/ready")
        c.getresponse().read()
        assert c.sock is first_sock  # same connection reused
    finally:
        c.close()
    out = raw(admin.port, b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n"
                          b"GET /hot_restart_version HTTP/1.1\r\nHost: x\r\n\r\n"
                          b"GET /ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert out.count(b"HTTP/1.1 200 OK") == 3
    assert out.index(b"LIVE\n") < out.index(b"disabled\n") < out.rindex(b"LIVE\n")
    assert out.rstrip().endswith(b"LIVE")  # server closed after the last one


def test_http10_and_head(admin):
    # HTTP/1.0 is refused as Envoy's admin refuses it (its codec's accept_http_10 default)
    out = raw(admin.port, b"GET /ready HTTP/1.0\r\n\r\n")
    assert re.sub(rb"date: [^\r]*", b"date: D", out) == (
        b"HTTP/1.1 426 Upgrade Required\r\ncontent-length: 16\r\ncontent-type: text/plain\r\n"
        b"date: D\r\nserver: envoy\r\nconnection: close\r\n\r\nUpgrade Required")
    out = raw(admin.port, b"HEAD /ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200 OK\r\n") and b"content-length: 5\r\n" in out
    assert out.endswith(b"\r\n\r\n")


def test_malformed_requests(admin):
    out = raw(admin.port, b"GARBAGE\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400 Bad Request\r\n") and b"connection: close" in out
    out = raw(admin.port, b"GET /ready HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                          b"Content-Length: 6\r\n\r\nhello")
    assert out.startswith(b"HTTP/1.1 400")
    out = raw(admin.port, b"GET /ready HTTP/1.1\r\nHo st: x\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400")
    out = raw(admin.port, b"\x00\x01\x02\xff\xfe" * 100)
    assert out.startswith(b"HTTP/1.1 400")
    # oversized headers: 431, before the whole thing is buffered
    big = b"GET /ready HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (MAX_HEADER_BYTES + 10) + b"\r\n\r\n"
    out = raw(admin.port, big)
    assert out.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    out = raw(admin.port, b"GET /ready?" + b"a" * (MAX_HEADER_BYTES + 10) + b" HTTP/1.1\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 431")
    many = b"GET /ready HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(200)) + b"\r\n"
    assert raw(admin.port, many).startswith(b"HTTP/1.1 431")
    # oversized body: 413
    out = raw(admin.port, b"POST /healthcheck/ok HTTP/1.1\r\nHost: x\r\nContent-Length: 3000000\r\n\r\n"
              + b"a" * 1_100_000)
    assert out.startswith(b"HTTP/1.1 413")
    assert admin.test_ctx.calls == []
    # still serving
    assert req(admin, "GET", "/ready")[0] == 200


def test_idle_connection_is_closed(loop_thread):
    ctx = FakeAdminContext()
    srv = loop_thread.run(start_admin(ctx, "127.0.0.1", 0, idle_timeout=0.3))
    try:
        s = socket.create_connection(("127.0.0.1", srv.port), timeout=3)
        s.sendall(b"GET /re")  # a partial request, then nothing
        t0 = time.monotonic()
        assert s.recv(100) == b""
        assert time.monotonic() - t0 < 2.5
        s.close()
    finally:
        loop_thread.run(srv.close())


def test_unix_socket(loop_thread):
    ctx = FakeAdminContext()
    d = tempfile.mkdtemp()
    path = os.path.join(d, "admin.sock")
    srv = loop_thread.run(start_admin(ctx, None, 0, uds_path=path))
    try:
        p = subprocess.run(["curl", "-sS", "--max-time", "5", "--unix-socket", path,
                            "http://localhost/ready"], capture_output=True, text=True, timeout=10)
        assert p.stdout == "LIVE\n"
    finally:
        loop_thread.run(srv.close())
        assert not os.path.exists(path)
        shutil.rmtree(d, ignore_errors=True)


def test_access_log(admin):
    req(admin, "GET", "/ready")
    req(admin, "POST", "/healthcheck/ok")
    assert admin.test_alog.entries == [("GET", "/ready", 200), ("POST", "/healthcheck/ok", 200)]


def test_access_log_with_a_real_file_logger(loop_thread, tmp_path):
    """The bootstrap's admin.access_log as built from its proto (Istio's: a file logger) writes a
    line per admin request (the admin server calls loggers as the listeners do)."""
    from envoy.config.accesslog.v3 import accesslog_pb2
    from envoy.extensions.access_loggers.file.v3 import file_pb2
    from pyproxy.access_log import build_access_logs
    from pyproxy.access_log.file import flush_all
    path = tmp_path / "admin.log"
    al = accesslog_pb2.AccessLog(name="envoy.access_loggers.file")
    al.typed_config.Pack(file_pb2.FileAccessLog(path=str(path)))
    srv = loop_thread.run(start_admin(FakeAdminContext(), "127.0.0.1", 0, access_logs=build_access_logs([al])))
    try:
        req(srv, "GET", "/ready")
    finally:
        loop_thread.run(srv.close())
    flush_all()
    text = path.read_text()
    assert '"GET /ready HTTP/1.1" 200' in text, text


def test_broken_context_gives_500_not_a_crash(loop_thread):
    ctx = FakeAdminContext()
    ctx.clusters_status = lambda: 1 / 0
    srv = loop_thread.run(start_admin(ctx, "127.0.0.1", 0))
    try:
        c = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
        c.request("GET", "/clusters")
        r = c.getresponse()
        assert r.status == 500 and b"division by zero" in r.read()
        c.request("GET", "/ready")  # same connection keeps working
        assert c.getresponse().read() == b"LIVE\n"
        c.close()
    finally:
        loop_thread.run(srv.close())


# ---------------------------------------------------------------------------------------------
# Compared with the real Envoy

ENVOY_BOOTSTRAP = """
node: {id: node1, cluster: clus1}
admin:
  address: {socket_address: {address: 127.0.0.1, port_value: %(admin)d}}
static_resources:
  listeners:
  - name: l1
    address: {socket_address: {address: 127.0.0.1, port_value: %(listener)d}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ing
          route_config:
            virtual_hosts:
            - {name: vh, domains: ["*"], routes: [{match: {prefix: "/"}, direct_response: {status: 200}}]}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
  clusters:
  - name: c1
    connect_timeout: 1s
    type: STATIC
    load_assignment:
      cluster_name: c1
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 9}}}}]}]
"""


def _free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


@pytest.fixture(scope="module")
def envoy_admin():
    if shutil.which("envoy") is None:
        pytest.skip("envoy binary not installed")
    d = tempfile.mkdtemp()
    port, lport = _free_port(), _free_port()
    cfg = os.path.join(d, "b.yaml")
    with open(cfg, "w") as f:
        f.write(ENVOY_BOOTSTRAP % {"admin": port, "listener": lport})
    proc = subprocess.Popen(["envoy", "-c", cfg, "--base-id", str(random.randint(1000, 60000)),
                             "--disable-hot-restart", "-l", "error", "--concurrency", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with urllib.request.urlopen("http://127.0.0.1:%d/ready" % port, timeout=1) as r:
                    if r.read() == b"LIVE\n":
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                pytest.fail("envoy did not become ready")
            time.sleep(0.05)
        yield port
    finally:
        proc.kill()
        proc.wait(5)
        shutil.rmtree(d, ignore_errors=True)


def _get(port, path):
    with urllib.request.urlopen("http://127.0.0.1:%d%s" % (port, path), timeout=5) as r:
        return r.status, r.headers.get("content-type"), r.read().decode()


def test_readiness_query_matches_envoy(admin, envoy_admin):
    path = AGENT_READY.replace("\\", "%5C").replace("^", "%5E").replace("|", "%7C")
    e = _get(envoy_admin, path)
    ours = _get(admin.port, path)
    assert e == ours == (200, "text/plain; charset=UTF-8",
                         "listener_manager.workers_started: 1\nserver.state: 0\n")
    for p in ("/stats?format=json&usedonly&filter=%5Eserver%5C.state%24",
              "/stats/prometheus?filter=%5Eserver%5C.state%24"):
        assert _get(envoy_admin, p) == _get(admin.port, p)
    for p in ("/quitquitquit", "/drain_listeners", "/no_such_path"):
        e = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                            "http://127.0.0.1:%d%s" % (envoy_admin, p)], capture_output=True, text=True)
        o = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                            "http://127.0.0.1:%d%s" % (admin.port, p)], capture_output=True, text=True)
        assert e.stdout == o.stdout


def _prom_series(text):
    """{family: (type, [series without value, in order])} from Prometheus text."""
    fams: dict = {}
    cur = None
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            cur = fams[name] = (kind, [])
        elif line and cur is not None:
            cur[1].append(line.rsplit(" ", 1)[0])
    return fams


def test_prometheus_names_and_labels_match_envoy(envoy_admin):
    """Envoy's own stat names, rendered by us, give Envoy's families, labels and order."""
    store = Store()
    n_stats = 0
    for kind, make in (("Counters", store.counter), ("Gauges", store.gauge),
                       ("Histograms", store.histogram)):
        names = [line.split(": ")[0] for line in _get(envoy_admin, "/stats?type=" + kind)[2].splitlines()]
        assert names, kind
        n_stats += len(names)
        for n in names:
            make(n)
    assert n_stats > 150

    from pyproxy.admin import stats_render
    envoy = _prom_series(_get(envoy_admin, "/stats/prometheus")[2])
    ours = _prom_series(stats_render.render_prometheus(store, stats_render.Query({}, prometheus=True)))
    assert sorted(ours) == sorted(envoy)
    for fam, (kind, series) in envoy.items():
        assert ours[fam] == (kind, series), fam  # same type, labels, label order, series order
    assert list(ours) == list(envoy)  # family order


def test_expect_100_continue_with_body(admin):
    code, body = curl("-X", "POST", "-H", "Expect: 100-continue", "--data-binary", "x" * 5000,
                      "http://127.0.0.1:%d/healthcheck/fail" % admin.port)
    assert (code, body) == (200, "OK\n")
    assert admin.test_ctx.hc_failed is True
