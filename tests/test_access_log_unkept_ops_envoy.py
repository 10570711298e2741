"""Access-log operators Envoy has and pyproxy keeps no data for (review finding F55): a format using
them no longer refuses the listener (a mesh-wide format would have refused every listener); each
renders "-", is named by ``pyproxy validate`` and logged at WARNING. Every such name is checked to be
a real Envoy operator (``envoy --mode validate`` takes a format with all of them), and
``%UPSTREAM_PEER_URI_SAN%`` / ``%UPSTREAM_LOCAL_URI_SAN%`` are served from the upstream TLS state."""

from __future__ import annotations

import json
import subprocess

import pytest

from proxy_util import ENVOY, bootstrap, cluster, free_port, http_listener, route, route_config, run_pyproxy
from pyproxy.formatter import compile_format
from pyproxy.formatter_unkept import NOT_KEPT

pytestmark = pytest.mark.skipif(not ENVOY, reason="envoy not installed")


def _bs(fmt):
    al = [{"name": "envoy.access_loggers.file", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
        "path": "/dev/null", "log_format": {"text_format_source": {"inline_string": fmt}}}}]
    return bootstrap([http_listener(free_port(), route_config([route("/", "b")]), stat_prefix="in", access_log=al)],
                     [cluster("b", [free_port()])])


def test_unkept_operators_accepted_named_and_real(tmp_path):
    fmt = " ".join("%%%s%%" % n for n in sorted(NOT_KEPT) + ["UPSTREAM_PEER_URI_SAN", "UPSTREAM_LOCAL_URI_SAN"]) + "\n"
    path = tmp_path / "bs.json"
    path.write_text(json.dumps(_bs(fmt)))
    env = subprocess.run([ENVOY, "--mode", "validate", "-c", str(path), "-l", "critical"],
                         capture_output=True, text=True, timeout=60)
    assert env.returncode == 0, env.stdout + env.stderr  # (every name is Envoy's)
    px = run_pyproxy(["validate", str(path)])
    assert "listener 'http': accepted with ignored parts" in px.stdout, px.stdout
    for n in sorted(NOT_KEPT):
        assert "%%%s%% is not implemented" % n in px.stdout, (n, px.stdout)
    assert "UPSTREAM_PEER_URI_SAN%" not in px.stdout  # (served, not named)


def test_unknown_operator_still_refused():
    with pytest.raises(Exception) as e:
        compile_format("%NOT_AN_ENVOY_OPERATOR%\n")
    assert "Not supported field" in str(e.value)
