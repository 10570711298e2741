"""The command line as Istio's agent uses it: Envoy's flags, --mode validate, errors, --version."""

from __future__ import annotations

import json
import os
import socket
import tempfile

import pytest

from proxy_util import (ENVOY, Pyproxy, bootstrap, cluster, free_port, request, run_pyproxy,
                        tcp_listener)

ISTIO_FLAGS = ["--drain-time-s", "45", "--drain-strategy", "immediate", "--parent-shutdown-time-s", "60",
               "--local-address-ip-version", "v4", "--file-flush-interval-msec", "1000",
               "--disable-hot-restart", "--allow-unknown-static-fields", "-l", "warning",
               "--component-log-level", "misc:error", "--skip-deprecated-logs", "--concurrency", "2",
               "--base-id", "1", "--service-cluster", "x", "--service-node", "y",
               "--log-format", "[%Y-%m-%d %T.%e][%t][%l][%n] %v"]


def _write(tmp, bs, name="bs.json"):
    path = os.path.join(tmp, name)
    with open(path, "w") as f:
        f.write(bs if isinstance(bs, str) else json.dumps(bs))
    return path


def _bs(port=None):
    return bootstrap([tcp_listener(port or free_port(), "c")], [cluster("c", [free_port()])], admin=False)


def test_every_istio_flag_is_accepted_in_validate_mode():
    with tempfile.TemporaryDirectory() as tmp:
        p = run_pyproxy(["-c", _write(tmp, _bs()), "--mode", "validate"] + ISTIO_FLAGS)
        assert p.returncode == 0, p.stderr
        assert "OK" in p.stdout


def test_every_istio_flag_is_accepted_when_serving():
    port = free_port()
    bs = _bs(port)
    bs["admin"] = {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}}
    with Pyproxy(bs, extra_args=ISTIO_FLAGS) as px:
        st, _, body = request(px.admin_port, "GET", "/server_info")
        info = json.loads(body)
        opts = info["command_line_options"]
        assert opts["drain_time"] == "45s" and opts["service_cluster"] == "x" and opts["service_node"] == "y"
        assert info["node"].get("id") == "y" and info["node"].get("cluster") == "x"


def test_validate_binds_nothing():
    """--mode validate succeeds even when the listener's port is taken (nothing is bound)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            p = run_pyproxy(["--mode", "validate", "-c", _write(tmp, _bs(s.getsockname()[1]))])
            assert p.returncode == 0, p.stderr
    finally:
        s.close()


def test_validate_reports_invalid_config_precisely():
    bs = _bs()
    bs["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]["stat_prefix"] = ""
    with tempfile.TemporaryDirectory() as tmp:
        p = run_pyproxy(["--mode", "validate", "-c", _write(tmp, bs)])
        assert p.returncode == 1
        err = p.stderr.strip()
        assert "stat_prefix" in err and "listener 'tcp'" in err, err


def test_invalid_config_exits_1_when_serving():
    bs = _bs()
    bs["static_resources"]["clusters"].append({"name": "c", "type": "STATIC"})  # duplicate name
    with tempfile.TemporaryDirectory() as tmp:
        p = run_pyproxy(["-c", _write(tmp, bs)], timeout=20)
        assert p.returncode == 1
        assert "duplicate cluster 'c'" in p.stdout + p.stderr


def test_unknown_flag_is_one_line_exit_1():
    p = run_pyproxy(["--no-such-flag"])
    assert p.returncode == 1
    assert len(p.stderr.strip().splitlines()) == 1 and "--no-such-flag" in p.stderr


def test_unreadable_file_is_one_line_exit_1():
    p = run_pyproxy(["-c", "/nonexistent/bootstrap.yaml"])
    assert p.returncode == 1
    assert len(p.stderr.strip().splitlines()) == 1 and "/nonexistent/bootstrap.yaml" in p.stderr
    with tempfile.TemporaryDirectory() as tmp:
        bad = _write(tmp, "static_resources: [unclosed", "bad.yaml")
        p = run_pyproxy(["-c", bad])
        assert p.returncode == 1
        assert len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_no_config_is_an_error():
    p = run_pyproxy([])
    assert p.returncode == 1 and "config" in p.stderr


def test_version():
    p = run_pyproxy(["--version"])
    assert p.returncode == 0
    assert "version:" in p.stdout and "1.40" in p.stdout


def test_unknown_fields_rejected_unless_allowed():
    with tempfile.TemporaryDirectory() as tmp:
        path = _write(tmp, "static_resources: {clusters: [], no_such_field: 1}\n", "unk.yaml")
        p = run_pyproxy(["--mode", "validate", "-c", path])
        assert p.returncode == 1
        err = p.stderr.strip()
        assert len(err.splitlines()) == 1 and "no_such_field" in err, err
        p = run_pyproxy(["--mode", "validate", "-c", path, "--allow-unknown-static-fields"])
        assert p.returncode == 0, p.stderr


def test_config_yaml_is_merged_over_the_file():
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        path = _write(tmp, _bs(port))
        # an invalid addition through --config-yaml is rejected: it was merged
        p = run_pyproxy(["--mode", "validate", "-c", path, "--config-yaml",
                         "static_resources: {clusters: [{name: c, type: STATIC}]}"])
        assert p.returncode == 1 and "duplicate cluster" in p.stderr
        # --config-yaml alone is a whole bootstrap
        p = run_pyproxy(["--mode", "validate", "--config-yaml", json.dumps(_bs())])
        assert p.returncode == 0, p.stderr


def test_config_yaml_adds_admin_when_serving():
    port = free_port()
    bs = _bs(port)
    admin_port = free_port()
    over = "admin: {address: {socket_address: {address: 127.0.0.1, port_value: %d}}}" % admin_port
    with Pyproxy(bs, extra_args=["--config-yaml", over], wait_ready=False) as px:
        px.admin_port = admin_port
        px.wait_ready()
        st, _, _ = request(admin_port, "GET", "/ready")
        assert st == 200


@pytest.mark.skipif(ENVOY is None, reason="envoy not on PATH")
def test_validate_agrees_with_envoy_on_simple_cases():
    import subprocess
    cases = [_bs(), "static_resources: {clusters: [], no_such_field: 1}\n"]
    with tempfile.TemporaryDirectory() as tmp:
        for i, c in enumerate(cases):
            path = _write(tmp, c, "c%d.yaml" % i)
            ours = run_pyproxy(["--mode", "validate", "-c", path]).returncode
            theirs = subprocess.run([ENVOY, "--mode", "validate", "-c", path, "--base-id", "4242",
                                     "-l", "critical"], capture_output=True, timeout=30).returncode
            assert ours == theirs, (c, ours, theirs)
