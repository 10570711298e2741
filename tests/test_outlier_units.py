"""Outlier detection's rules, driven with a fake clock (no sockets): ejection time growth and its
cap, the back-off shrinking while a host behaves, max_ejection_percent / always_eject_one_host,
enforcing_* percentages, success-rate math (Envoy's documented example), configuration errors."""

from __future__ import annotations

import pytest
from envoy.config.cluster.v3 import outlier_detection_pb2
from google.protobuf import json_format

from clock_util import FakeLoop
from pyproxy.cluster.host import FAILED_OUTLIER_CHECK, Host
from pyproxy.cluster.outlier import Detector
from pyproxy.config.errors import ConfigError
from pyproxy.stats import Store


class FakeCluster:
    name = "c"

    def __init__(self, loop):
        self.loop = loop
        self.scope = Store().scope("cluster.c.")
        self.changes = 0

    def hosts_health_changed(self):
        self.changes += 1


def _detector(n_hosts=10, **od):
    loop = FakeLoop()
    c = FakeCluster(loop)
    d = Detector(c, json_format.ParseDict(od, outlier_detection_pb2.OutlierDetection()))
    hosts = [Host("10.0.0.%d" % i, 80) for i in range(n_hosts)]
    d.add_hosts(hosts)
    d.start()
    return loop, d, hosts


def _fail(loop, h, n, code=503):
    for _ in range(n):
        h.outlier.put_http(code)
    loop.run_soon()


def test_ejection_time_grows_and_is_capped():
    loop, d, hosts = _detector(consecutive_5xx=2, interval="1s", base_ejection_time="2s",
                               max_ejection_time="5s", max_ejection_percent=100)
    h = hosts[0]
    durations = []
    for _ in range(4):
        _fail(loop, h, 2)
        assert h.has_flag(FAILED_OUTLIER_CHECK)
        t0 = loop.now
        while h.has_flag(FAILED_OUTLIER_CHECK):
            loop.advance(0.5)
        durations.append(round(loop.now - t0))
    # 2 s, 4 s, then capped at 5 s (checked on the 1 s interval ticks)
    assert durations == [2, 4, 5, 5], durations
    assert h.outlier.num_ejections == 4
    assert d.st["ejections_enforced_consecutive_5xx"].value == 4
    assert d.st_active.value == 0


def test_backoff_shrinks_while_the_host_behaves():
    loop, d, hosts = _detector(consecutive_5xx=2, interval="1s", base_ejection_time="2s",
                               max_ejection_percent=100)
    h = hosts[0]
    _fail(loop, h, 2)
    loop.advance(2)  # back at the t=2 tick; ejected again before the next tick
    assert not h.has_flag(FAILED_OUTLIER_CHECK)
    _fail(loop, h, 2)
    assert h.outlier.backoff == 2
    while h.has_flag(FAILED_OUTLIER_CHECK):
        loop.advance(1)
    loop.advance(10)  # one decrement per interval tick without an ejection
    assert h.outlier.backoff == 0
    _fail(loop, h, 2)
    t0 = loop.now
    while h.has_flag(FAILED_OUTLIER_CHECK):
        loop.advance(0.5)
    assert round(loop.now - t0) == 2  # back to the base ejection time


def test_max_ejection_percent_and_always_eject_one_host():
    loop, d, hosts = _detector(n_hosts=4, consecutive_5xx=1, max_ejection_percent=20)
    _fail(loop, hosts[0], 1)  # 1 of 4 = 25 % > 20 %: overflow
    assert not hosts[0].has_flag(FAILED_OUTLIER_CHECK)
    assert d.st["ejections_overflow"].value == 1
    loop, d, hosts = _detector(n_hosts=4, consecutive_5xx=1, max_ejection_percent=20,
                               always_eject_one_host=True)
    _fail(loop, hosts[0], 1)
    _fail(loop, hosts[1], 1)
    assert hosts[0].has_flag(FAILED_OUTLIER_CHECK) and not hosts[1].has_flag(FAILED_OUTLIER_CHECK)
    assert d.st["ejections_overflow"].value == 1


def test_enforcing_zero_detects_without_ejecting():
    loop, d, hosts = _detector(consecutive_5xx=2, enforcing_consecutive_5xx=0,
                               consecutive_gateway_failure=2,
                               enforcing_consecutive_gateway_failure=100,
                               max_ejection_percent=100)
    _fail(loop, hosts[0], 2, code=500)  # 5xx, not a gateway error
    assert not hosts[0].has_flag(FAILED_OUTLIER_CHECK)
    assert d.st["ejections_detected_consecutive_5xx"].value == 1
    assert d.st["ejections_total"].value == 1  # (Envoy's deprecated counter moves anyway)
    assert d.st["ejections_enforced_total"].value == 0
    _fail(loop, hosts[1], 2, code=504)
    assert hosts[1].has_flag(FAILED_OUTLIER_CHECK)
    assert d.st["ejections_enforced_consecutive_gateway_failure"].value == 1
    # a success in between resets the count
    hosts[2].outlier.put_http(502)
    hosts[2].outlier.put_http(200)
    _fail(loop, hosts[2], 1, code=502)
    assert not hosts[2].has_flag(FAILED_OUTLIER_CHECK)


def test_success_rate_threshold_as_documented():
    """Envoy's example: success rates {50, 100, 100, 100, 100} -> mean 90, stdev 20; with
    stdev_factor 1.9 the threshold is 52: the 50 % host is ejected."""
    loop, d, hosts = _detector(n_hosts=5, interval="1s", success_rate_minimum_hosts=5,
                               success_rate_request_volume=10, success_rate_stdev_factor=1900,
                               consecutive_5xx=1000, max_ejection_percent=100)
    for i, h in enumerate(hosts):
        for j in range(20):
            h.outlier.put_http(500 if i == 0 and j % 2 else 200)
    loop.advance(1.0)  # rotate: the interval's counts become the evaluated bucket
    assert d.sr_average[False] == pytest.approx(90.0)
    assert d.sr_threshold[False] == pytest.approx(52.0)
    assert hosts[0].has_flag(FAILED_OUTLIER_CHECK)
    assert d.st["ejections_enforced_success_rate"].value == 1
    assert hosts[0].outlier.ext.rate == pytest.approx(50.0)
    assert d.status()["success_rate_average"] == pytest.approx(90.0)


def test_config_errors():
    with pytest.raises(ConfigError, match="max_ejection_time cannot be smaller"):
        _detector(base_ejection_time="60s", max_ejection_time="10s")
    with pytest.raises(ConfigError, match="less than or equal to 100"):
        _detector(enforcing_consecutive_5xx=101)
