"""tcp_proxy fields istiod renders from a DestinationRule, side by side with Envoy (review finding
F54): ``max_downstream_connection_duration`` (connectionPool.tcp.maxConnectionDuration) closes the
connection when it passes (flag ``DT``, ``tcp.<prefix>.max_downstream_connection_duration``), and
``hash_policy: [{source_ip: {}}]`` (consistentHash.useSourceIp) keeps every connection from one
address on one endpoint of a RING_HASH cluster. The tcp_proxy fields still not acted on are named
by ``pyproxy validate``. Also (F50) how a failed connect and a missing cluster are logged: ``UF,URX``
with Envoy's failure reason (``delayed connect error: Connection refused``; none for a timeout),
``cluster.<c>.upstream_cx_connect_attempts_exceeded``; ``NC`` and no cluster name."""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time

import pytest

from proxy_util import (ENVOY, Envoy, Pyproxy, TcpBackend, bootstrap, cluster, free_port, run_pyproxy, tcp_listener,
                        wait_until, with_fresh_ports)

AL = "%RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT%\n"


def _with_log(bs, log):
    bs["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]["access_log"] = [{
        "name": "envoy.access_loggers.file", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog", "path": log,
            "log_format": {"text_format_source": {"inline_string": AL}}}}]
    return bs


def _duration(cls, tmp):
    log = os.path.join(tmp, cls.__name__ + "-d.log")
    open(log, "w").close()
    with TcpBackend() as tb:
        bs = _with_log(bootstrap([tcp_listener(free_port(), "t", max_downstream_connection_duration="0.5s")],
                                 [cluster("t", [tb.port])]), log)
        with cls(with_fresh_ports(bs), extra_args=["--file-flush-interval-msec", "100"]) as p:
            s = socket.create_connection(("127.0.0.1", p.port), timeout=5)
            t0 = time.monotonic()
            got = b""
            closed_at = None
            try:
                s.sendall(b"a")
                end = t0 + 3.0
                while time.monotonic() < end:
                    s.settimeout(max(0.01, end - time.monotonic()))
                    try:
                        d = s.recv(100)
                    except socket.timeout:
                        break
                    except ConnectionResetError:
                        d = b""
                    if not d:
                        closed_at = time.monotonic() - t0
                        break
                    got += d
            finally:
                s.close()
            assert wait_until(lambda: open(log).read().strip(), 5)
            return (got, closed_at is not None and 0.4 <= closed_at <= 2.0, open(log).read().strip(),
                    p.stats().get("tcp.tcp.max_downstream_connection_duration"))


def _hash(cls):
    with TcpBackend() as a, TcpBackend() as b, TcpBackend() as c:
        bs = bootstrap([tcp_listener(free_port(), "t", hash_policy=[{"source_ip": {}}])],
                       [cluster("t", [a.port, b.port, c.port], lb_policy="RING_HASH")])
        with cls(with_fresh_ports(bs)) as p:
            for _ in range(9):
                s = socket.create_connection(("127.0.0.1", p.port), timeout=5)
                try:
                    s.sendall(b"x")
                    s.recv(10)
                finally:
                    s.close()
            wait_until(lambda: a.connections + b.connections + c.connections >= 9, 5)
            return sorted([a.connections, b.connections, c.connections])


@pytest.mark.skipif(not ENVOY, reason="envoy not installed")
def test_max_downstream_connection_duration_as_envoy():
    tmp = tempfile.mkdtemp(prefix="tcpd-")
    try:
        px, ev = _duration(Pyproxy, tmp), _duration(Envoy, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert ev == (b"a", True, "DT 1 1", 1)
    assert px == ev


@pytest.mark.skipif(not ENVOY, reason="envoy not installed")
def test_hash_policy_source_ip_as_envoy():
    px, ev = _hash(Pyproxy), _hash(Envoy)
    assert ev == [0, 0, 9]
    assert px == ev


def test_validate_names_tcp_proxy_fields_not_acted_on(tmp_path):
    ln = tcp_listener(free_port(), "t", backoff_options={"base_interval": "0.1s"}, max_early_data_bytes=10,
                      max_downstream_connection_duration="1s", hash_policy=[{"source_ip": {}}])
    p = tmp_path / "bs.json"
    p.write_text(json.dumps(bootstrap([ln], [cluster("t", [1], lb_policy="RING_HASH")])))
    r = run_pyproxy(["validate", str(p)])
    assert r.returncode == 0, r.stdout
    assert "backoff_options is not implemented yet" in r.stdout and "max_early_data_bytes" in r.stdout, r.stdout
    assert "max_downstream_connection_duration" not in r.stdout and "hash_policy" not in r.stdout, r.stdout


def _failures(cls, tmp):
    """A refused endpoint (1 and 3 attempts); a tcp_proxy naming a cluster that is not there."""
    out = {}
    dead = free_port()
    for name, extra, cname in (("refused", {}, "t"), ("attempts", {"max_connect_attempts": 3}, "t"),
                               ("nocluster", {}, "zz")):
        log = os.path.join(tmp, "%s-%s.log" % (cls.__name__, name))
        open(log, "w").close()
        fmt = '%RESPONSE_FLAGS% "%UPSTREAM_TRANSPORT_FAILURE_REASON%" %UPSTREAM_CLUSTER% %BYTES_SENT%\n'
        bs = bootstrap([tcp_listener(free_port(), cname, **extra)], [cluster("t", [dead])])
        _with_log(bs, log)
        bs["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]["access_log"][0][
            "typed_config"]["log_format"]["text_format_source"]["inline_string"] = fmt
        with cls(with_fresh_ports(bs), extra_args=["--file-flush-interval-msec", "100"]) as p:
            s0 = p.stats()
            s = socket.create_connection(("127.0.0.1", p.port), timeout=5)
            try:
                s.settimeout(3)
                try:
                    while s.recv(100):
                        pass
                except OSError:
                    pass
            finally:
                s.close()
            assert wait_until(lambda: open(log).read().strip(), 5)
            s1 = p.stats()
            keys = ("cluster.t.upstream_cx_connect_attempts_exceeded", "cluster.t.upstream_cx_connect_fail",
                    "tcp.tcp.downstream_cx_no_route")
            out[name] = (open(log).read().strip(), {k: s1.get(k, 0) - s0.get(k, 0) for k in keys})
    return out


@pytest.mark.skipif(not ENVOY, reason="envoy not installed")
def test_connect_failures_logged_as_envoy():
    tmp = tempfile.mkdtemp(prefix="tcpf-")
    try:
        px, ev = _failures(Pyproxy, tmp), _failures(Envoy, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert ev["refused"][0] == 'UF,URX "delayed_connect_error:_Connection_refused" t 0'
    assert ev["nocluster"][0] == 'NC "-" - 0'
    assert px == ev
